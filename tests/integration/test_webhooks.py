"""Webhooks against a local aiohttp receiver, on SQLite and PostgreSQL: signatures, retries, runs, refusals."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from aiohttp import web
from api_env import ApiEnv, api_env, chat
from pydantic import SecretStr

from batcher import webhooks
from batcher.config import Settings
from batcher.db.tables import jobs, tenant_runs, webhook_deliveries
from batcher.domain import JobSpec, JobState, Provider
from batcher.emulator import EmulatorSettings, serve_emulator
from batcher.intake import enqueue
from batcher.timeutil import utcnow
from workers.settings import cron_jobs, run_worker

FAST = {"webhook_retry_base_s": 0.05, "webhook_retry_max_s": 0.2, "webhook_timeout_s": 5.0}


@dataclass
class Receiver:
    """A webhook receiver that answers 500 to its first ``fail_first`` requests."""

    fail_first: int = 0
    url: str = ""
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        self.arrived.set()
        if len(self.got) <= self.fail_first:
            return web.Response(status=500, text="receiver down")
        return web.Response(status=204)


@asynccontextmanager
async def receiving(fail_first: int = 0) -> AsyncIterator[Receiver]:
    receiver = Receiver(fail_first)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a for a in runner.addresses if isinstance(a, tuple))[1]
    receiver.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield receiver
    finally:
        await runner.cleanup()


async def deliveries(env: ApiEnv) -> list[dict[str, Any]]:
    async with env.db.engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(sa.select(webhook_deliveries))).mappings()]


async def pump(env: ApiEnv, settings: Settings | None = None, *, until: int = 1, rounds: int = 100) -> None:
    """What the worker's delivery cron does, in a loop, until ``until`` deliveries have ended (or rounds run out)."""
    for _ in range(rounds):
        await webhooks.schedule(env.db, utcnow())
        await webhooks.send_due(env.db, settings or env.settings, utcnow())
        ended = [d for d in await deliveries(env) if d["state"] != "pending"]
        if len(ended) >= until:
            return
        await asyncio.sleep(0.05)


async def test_job_webhook_is_signed_and_retried_after_the_receiver_fails_twice(db_url: str) -> None:
    async with receiving(fail_first=2) as receiver, api_env(db_url, **FAST) as env:
        job_id = (await env.post_job(chat(1, run="r", custom_id="q1", callback_url=receiver.url))).json["id"]
        await webhooks.schedule(env.db, utcnow())
        assert await deliveries(env) == []  # not settled yet: nothing to send
        await env.settle(job_id)
        await pump(env)

        assert len(receiver.got) == 3
        ids = {headers[webhooks.DELIVERY_HEADER] for headers, _ in receiver.got}
        assert len(ids) == 1
        bodies = {body for _, body in receiver.got}
        assert len(bodies) == 1  # every attempt sends the same bytes (signed afresh)
        for headers, body in receiver.got:
            webhooks.verify(env.secrets["acme"], body, headers)
            assert headers[webhooks.EVENT_HEADER] == "job.settled"
            assert headers["Content-Type"] == "application/json"
            with pytest.raises(webhooks.InvalidSignature):
                webhooks.verify(env.secrets["globex"], body, headers)
            with pytest.raises(webhooks.InvalidSignature):
                webhooks.verify(env.secrets["acme"], body + b" ", headers)
        payload = orjson.loads(receiver.got[-1][1])
        assert payload["event"] == "job.settled"
        job = payload["job"]
        assert (job["id"], job["custom_id"], job["run"], job["state"]) == (job_id, "q1", "r", "succeeded")
        assert job["result"]["choices"][0]["message"]["content"] == "42"
        assert job["cost"]["actual_usd"] == "0.000500000000"

        (delivery,) = await deliveries(env)
        assert (delivery["state"], delivery["attempts"], delivery["last_status"]) == ("delivered", 3, 204)
        assert delivery["last_error"] is None
        (row,) = await env.jobs(id=job_id)
        assert row["callback_url"] is None  # scheduled: the delivery row holds it now

        # the API shows where it stands
        shown = (await env.call("GET", f"/v1/jobs/{job_id}")).json
        assert shown["callback_url"] == receiver.url
        assert (shown["webhook"]["state"], shown["webhook"]["attempts"]) == ("delivered", 3)
        listed = (await env.call("GET", "/v1/webhooks", params={"state": "delivered"})).json["webhooks"]
        assert [d["job_id"] for d in listed] == [job_id]
        assert (await env.call("GET", f"/v1/webhooks/{delivery['id']}")).json["state"] == "delivered"
        assert (await env.call("GET", f"/v1/webhooks/{delivery['id']}", tenant="globex")).status == 404
        assert (await env.call("GET", "/v1/webhooks", tenant="globex")).json["webhooks"] == []

        # and the CLI
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("batcher")),
            "webhooks",
            "list",
            "--json",
            env={**os.environ, "BATCHER_DATABASE_URL": db_url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        (listed_by_cli,) = orjson.loads(out)
        assert (listed_by_cli["job_id"], listed_by_cli["state"], listed_by_cli["attempts"]) == (job_id, "delivered", 3)
        assert listed_by_cli["tenant"] == "acme"

        # nothing more is sent
        await pump(env, rounds=2)
        assert len(receiver.got) == 3


async def test_failed_and_cancelled_jobs_are_sent_too(db_url: str) -> None:
    async with receiving() as receiver, api_env(db_url, **FAST) as env:
        failed = (await env.post_job(chat(1, callback_url=receiver.url))).json["id"]
        cancelled = (await env.post_job(chat(2, callback_url=receiver.url))).json["id"]
        await env.settle(failed, state=JobState.FAILED)
        assert (await env.call("POST", f"/v1/jobs/{cancelled}/cancel")).status == 200
        await pump(env, until=2)
        states = {orjson.loads(body)["job"]["id"]: orjson.loads(body)["job"]["state"] for _, body in receiver.got}
        assert states == {failed: "failed", cancelled: "cancelled"}


async def test_a_delivery_is_given_up_after_its_window(db_url: str) -> None:
    async with receiving(fail_first=10**6) as receiver, api_env(db_url, webhook_give_up_s=0.4, **FAST) as env:
        job_id = (await env.post_job(chat(1, callback_url=receiver.url))).json["id"]
        await env.settle(job_id)
        await pump(env)
        (delivery,) = await deliveries(env)
        assert delivery["state"] == "failed"
        assert delivery["last_status"] == 500
        assert delivery["last_error"] == "the receiver answered HTTP 500"  # its body ("receiver down") is not kept
        assert 2 <= delivery["attempts"] == len(receiver.got)

        retried = await env.call("POST", f"/v1/webhooks/{delivery['id']}/retry")
        assert (retried.status, retried.json["state"]) == (200, "pending")
        assert (await env.call("POST", f"/v1/webhooks/{delivery['id']}/retry", tenant="globex")).status == 404


async def test_a_delivery_claimed_twice_is_sent_once(db_url: str) -> None:
    async with receiving() as receiver, api_env(db_url, **FAST) as env:
        ids = [(await env.post_job(chat(i, callback_url=receiver.url))).json["id"] for i in range(20)]
        for job_id in ids:
            await env.settle(job_id)
        await asyncio.gather(*(webhooks.schedule(env.db, utcnow()) for _ in range(3)))
        assert len(await deliveries(env)) == 20
        await asyncio.gather(*(webhooks.send_due(env.db, env.settings, utcnow()) for _ in range(3)))
        assert sorted(orjson.loads(body)["job"]["id"] for _, body in receiver.got) == sorted(ids)


async def test_run_webhook_fires_when_the_run_settles_and_again_after_new_jobs(db_url: str) -> None:
    async with receiving() as receiver, api_env(db_url, **FAST) as env:
        assert (await env.call("PUT", "/v1/runs/nightly/callback", json={"url": receiver.url})).status == 200
        ids = [(await env.post_job(chat(i, run="nightly"))).json["id"] for i in range(3)]
        await env.settle(ids[0])
        await env.settle(ids[1])
        await pump(env, rounds=2)
        assert receiver.got == []  # one job still queued

        await env.settle(ids[2], state=JobState.FAILED)
        await pump(env)
        (first,) = receiver.got
        webhooks.verify(env.secrets["acme"], first[1], first[0])
        assert first[0][webhooks.EVENT_HEADER] == "run.settled"
        run = orjson.loads(first[1])["run"]
        assert (run["run"], run["total"], run["settled"], run["jobs"]["succeeded"]) == ("nightly", 3, 3, 2)
        assert run["cost"]["actual_usd"] == "0.001000000000"
        assert run["results"] == "/v1/runs/nightly/results"

        # settled again: nothing more
        await pump(env, rounds=2)
        assert len(receiver.got) == 1
        # a new job re-arms it; it fires once that job settles too
        late = (await env.post_job(chat(9, run="nightly"))).json["id"]
        await pump(env, rounds=2)
        assert len(receiver.got) == 1
        await env.settle(late)
        await pump(env, until=2)
        assert len(receiver.got) == 2
        assert orjson.loads(receiver.got[1][1])["run"]["total"] == 4
        shown = (await env.call("GET", "/v1/runs/nightly")).json["callback"]
        assert (shown["armed"], shown["notified_jobs"]) == (False, 4)


async def test_jobs_added_while_the_scheduler_looks_are_not_missed(db_url: str) -> None:
    async with receiving() as receiver, api_env(db_url, **FAST) as env:
        await env.call("PUT", "/v1/runs/r/callback", json={"url": receiver.url})
        first = (await env.post_job(chat(0, run="r"))).json["id"]
        await env.settle(first)
        async with env.db.engine.connect() as conn:
            seq = await conn.scalar(sa.select(tenant_runs.c.arm_seq).where(tenant_runs.c.run == "acme/r"))
        # an enqueue lands between the scheduler's read and its write: arm_seq moved, so its write changes nothing
        await env.post_job(chat(1, run="r"))
        async with env.db.engine.begin() as conn:
            changed = await conn.execute(
                sa.update(tenant_runs)
                .where(tenant_runs.c.run == "acme/r", tenant_runs.c.arm_seq == seq)
                .values(armed=False)
            )
        assert changed.rowcount == 0
        await pump(env, rounds=2)
        assert receiver.got == []


async def test_private_addresses_are_refused_at_send_time(db_url: str) -> None:
    async with receiving() as receiver, api_env(db_url, webhook_allow_private=False, **FAST) as env:
        port = receiver.url.split(":")[2].split("/")[0]
        urls = [f"http://127.0.0.1:{port}/hook", f"http://localhost:{port}/hook"]
        # stored past the API's own check (as if the policy changed since)
        specs = [
            JobSpec(
                provider=Provider.OPENAI,
                endpoint="/v1/chat/completions",
                model="gpt-4o-mini",
                custom_id=f"p{i}",
                body=chat(i)["body"],
                run="acme/r",
            )
            for i in range(2)
        ]
        done = await enqueue(env.db, specs, tenant="acme", callback_urls=urls)
        for job_id in done.ids:
            await env.settle(job_id)
        await pump(env, until=2)
        assert receiver.got == []
        found = await deliveries(env)
        assert {d["state"] for d in found} == {"failed"}
        assert all(d["attempts"] == 1 and d["last_error"].startswith("refused") for d in found)


async def test_the_worker_delivers_end_to_end(db_url: str, redis_url: str, tmp_path: Path) -> None:
    """API → queued → the real worker packs, submits, polls and collects against the emulator → signed webhook."""
    assert any(job.name == "deliver_webhooks" for job in cron_jobs(Settings()))
    async with (
        receiving(fail_first=1) as receiver,
        serve_emulator(EmulatorSettings(latency_s=0.2, data_dir=tmp_path / "emu")) as base_url,
        api_env(db_url, **FAST) as env,
    ):
        settings = env.settings.model_copy(
            update={
                "redis_url": redis_url,
                "openai_base_url": base_url,
                "openai_api_key": SecretStr("test-key"),
                "pack_max_wait_s": 0.0,
                "poll_min_s": 0.05,
                "poll_max_s": 0.2,
                "tick_s": 1,
            }
        )
        job_id = (await env.post_job(chat(1, callback_url=receiver.url))).json["id"]
        worker = asyncio.create_task(run_worker(settings))
        try:
            async with asyncio.timeout(60):
                while len(receiver.got) < 2:
                    receiver.arrived.clear()
                    await receiver.arrived.wait()
        finally:
            worker.cancel()
            with pytest.raises(asyncio.CancelledError):
                await worker
        headers, body = receiver.got[-1]
        webhooks.verify(env.secrets["acme"], body, headers)
        job = orjson.loads(body)["job"]
        assert (job["id"], job["state"]) == (job_id, "succeeded")
        assert job["result"]["object"] == "chat.completion"
        assert job["usage"]["completion_tokens"] >= 1
        async with env.db.engine.connect() as conn:
            assert await conn.scalar(sa.select(jobs.c.state).where(jobs.c.id == job_id)) == "succeeded"
