"""Provider faults, one test each, through the emulator's knobs, on SQLite and PostgreSQL.

429 with Retry-After, 5xx and connection resets (OpenAI and Anthropic), a batch refused at validation, partial
expiry and a malformed result line (both), the enqueued-token limit, and a batch whose status can no longer be
read. Each ends with the same audit: every job settled once, the ledger holds one entry per job that got a result
and none twice, and the provider received each request exactly as many times as the job counts attempts.
"""

from __future__ import annotations

import random
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from emulated_env import Env, emulated

from batcher.db.tables import jobs
from batcher.domain import Provider
from batcher.emulator import EmulatorSettings
from batcher.timeutil import utcnow

PROVIDERS = [Provider.OPENAI, Provider.ANTHROPIC]


def seconds(delta: timedelta) -> float:
    return delta.total_seconds()


async def audit(env: Env, *, exact_received: bool = True) -> dict[str, dict[str, Any]]:
    """Every job terminal; ledger entries unique and one per job that got a provider result; provider receipts
    never above the job's attempts."""
    rows = await env.jobs()
    assert {r["state"] for r in rows.values()} <= {"succeeded", "failed", "cancelled"}
    entries = await env.ledger()
    keys = Counter((e["job_id"], e["attempt"]) for e in entries)
    assert all(n == 1 for n in keys.values()), "a ledger entry was written twice"
    per_job = Counter(e["job_id"] for e in entries)
    assert all(n == 1 for n in per_job.values()), "a job was charged twice"
    succeeded = {j for j, r in rows.items() if r["state"] == "succeeded"}
    assert succeeded <= set(per_job)
    for e in entries:
        assert e["attempt"] == rows[e["job_id"]]["attempts"]
    received = (await env.stats())["requests_by_custom_id"]
    for job_id, row in rows.items():
        if exact_received:
            assert received.get(job_id, 0) == row["attempts"], (job_id, row["state"], row["error_code"])
        else:
            assert received.get(job_id, 0) <= row["attempts"]
    return rows


# ------------------------------------------------------------------------------------------ HTTP-level faults


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_rate_limited_429_waits_for_retry_after(db_url: str, tmp_path: Path, provider: Provider) -> None:
    emu = EmulatorSettings(latency_s=0.2, api_error_rate=1.0, api_error_kinds=["429"], retry_after_s=2)
    async with emulated(db_url, tmp_path / "emu", provider=provider, emulator=emu) as env:
        p = env.pipeline
        await env.enqueue(5)
        t = utcnow()
        [batch_id] = await p.pack(t, force=True)
        await p.submit(batch_id, t)
        batch = await env.batch(batch_id)
        assert batch["state"] == "open" and batch["provider_batch_id"] is None and batch["lease_owner"] is None
        # exactly the provider's Retry-After: not the jittered back-off of a server error, not poll_min_s
        assert seconds(batch["next_poll_at"] - t) == 2.0
        assert (await p.due(t + timedelta(seconds=1.9))).submit == []
        env.emu.settings.api_error_rate = 0.0
        await p.submit(batch_id, t + timedelta(seconds=1.9))
        assert (await env.stats())["batches_created"] == 0, "submitted before the Retry-After"
        await p.submit(batch_id, t + timedelta(seconds=2))
        batch = await env.batch(batch_id)
        assert batch["provider_batch_id"] and batch["state"] in ("validating", "in_progress")
        # a poll answered 429 waits as long
        env.emu.settings.api_error_rate = 1.0
        t2 = batch["next_poll_at"]
        await p.poll(batch_id, t2)
        batch = await env.batch(batch_id)
        assert seconds(batch["next_poll_at"] - t2) == 2.0 and batch["state"] in ("validating", "in_progress")
        env.emu.settings.api_error_rate = 0.0
        await env.drive()
        rows = await audit(env)
        assert {r["state"] for r in rows.values()} == {"succeeded"}
        assert {r["attempts"] for r in rows.values()} == {1}
        assert (await env.stats())["api_errors_injected"] == 2


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_server_errors_back_off_with_jitter(db_url: str, tmp_path: Path, provider: Provider) -> None:
    emu = EmulatorSettings(latency_s=0.2, api_error_rate=1.0, api_error_kinds=["500", "503"])
    rng = random.Random(11)
    async with emulated(
        db_url,
        tmp_path / "emu",
        provider=provider,
        emulator=emu,
        max_requests=2,
        rand=rng.random,
        poll_min_s=0.2,
        poll_max_s=1.6,
    ) as env:
        p = env.pipeline
        await env.enqueue(12)
        t = utcnow()
        made: list[str] = []
        while created := await p.pack(t, force=True):  # a few batches per pack: twice the batch size at most
            made += created
        assert len(made) == 6
        for batch_id in made:
            await p.submit(batch_id, t)
        first = [seconds((await env.batch(b))["next_poll_at"] - t) for b in made]
        # poll_min_s plus a random share of up to half of it, different for each batch
        assert all(0.2 <= d <= 0.3 for d in first), first
        assert len(set(first)) == len(first)
        # failing again doubles the delay (then jitter on top)
        second = []
        for batch_id, delay in zip(made, first, strict=True):
            at = t + timedelta(seconds=delay)
            await p.submit(batch_id, at)
            second.append(seconds((await env.batch(batch_id))["next_poll_at"] - at))
        assert all(0.4 <= d <= 0.6 for d in second), second
        assert (await env.stats())["api_errors_injected"] == 12
        assert (await env.stats())["batches_created"] == 0
        env.emu.settings.api_error_rate = 0.0
        await env.drive()
        rows = await audit(env)
        assert {r["state"] for r in rows.values()} == {"succeeded"}
        assert {r["attempts"] for r in rows.values()} == {1}
        assert {b["submit_attempts"] for b in await env.batches()} == {3}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_connection_resets_are_retried(db_url: str, redis_url: str, tmp_path: Path, provider: Provider) -> None:
    emu = EmulatorSettings(latency_s=0.2, api_error_rate=0.3, api_error_kinds=["reset"], seed=4)
    async with emulated(
        db_url, tmp_path / "emu", provider=provider, emulator=emu, max_requests=10, redis_url=redis_url
    ) as env:
        await env.enqueue(40)
        # the real worker (arq, burst mode): every step whose connection was reset is queued again
        await env.burst(timeout_s=90)
        rows = await audit(env)
        assert {r["state"] for r in rows.values()} == {"succeeded"}
        assert {r["attempts"] for r in rows.values()} == {1}
        stats = await env.stats()
        assert stats["api_errors_injected"] >= 3
        assert stats["batches_created"] == 4


# ------------------------------------------------------------------------------------------ batch-level faults


async def test_batch_failing_validation_fails_bad_lines_and_requeues_the_rest(db_url: str, tmp_path: Path) -> None:
    async with emulated(db_url, tmp_path / "emu") as env:
        ids = sorted(await env.enqueue(6))
        # the last line asks for another model: the provider refuses the whole file at validation, naming it
        bad = ids[-1]
        body = orjson.loads((await env.jobs())[bad]["body"])
        body["model"] = "gpt-4.1-mini"
        async with env.db.engine.begin() as conn:
            await conn.execute(sa.update(jobs).where(jobs.c.id == bad).values(body=orjson.dumps(body).decode()))
        await env.drive()
        # the refused batch counted as the bad job's attempt, though the provider never ran it
        rows = await audit(env, exact_received=False)
        assert rows[bad]["state"] == "failed" and rows[bad]["error_code"] == "model_mismatch"
        assert "does not match" in rows[bad]["error"]["message"] and rows[bad]["error"]["line"] == 6
        good = [j for j in ids if j != bad]
        assert all(rows[j]["state"] == "succeeded" and rows[j]["attempts"] == 1 for j in good)
        refused, resent = await env.batches()
        assert refused["provider_state"] == "failed" and refused["state"] == "collected"
        assert [e["code"] for e in refused["errors"]] == ["model_mismatch"]
        assert resent["request_count"] == 5
        # the refused batch ran nothing: the good jobs reached the model once, the bad one never
        assert (await env.stats())["requests_by_custom_id"] == dict.fromkeys(good, 1)
        assert {e["job_id"] for e in await env.ledger()} == set(good)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_partial_expiry_settles_what_ran_and_resends_the_rest(
    db_url: str, tmp_path: Path, provider: Provider
) -> None:
    emu = EmulatorSettings(latency_s=0.2, expire_ordinals=frozenset({1}), seed=2)
    async with emulated(db_url, tmp_path / "emu", provider=provider, emulator=emu) as env:
        await env.enqueue(40)
        await env.drive()
        rows = await audit(env)
        assert {r["state"] for r in rows.values()} == {"succeeded"}
        first, second = await env.batches()
        assert first["provider_state"] == ("expired" if provider is Provider.OPENAI else "ended")
        assert 0 < first["succeeded"] < 40 and first["expired"] == 40 - first["succeeded"]
        resent = [j for j, r in rows.items() if r["attempts"] == 2]
        assert len(resent) == first["expired"] == second["request_count"]
        entries = await env.ledger()
        assert len(entries) == 40 and {e["mode"] for e in entries} == {"batch"}
        assert {e["batch_id"] for e in entries if e["job_id"] in resent} == {second["id"]}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_malformed_result_line_retries_that_job_and_settles_the_rest(
    db_url: str, tmp_path: Path, provider: Provider
) -> None:
    emu = EmulatorSettings(latency_s=0.2, malformed_rate=0.15, seed=9)
    async with emulated(db_url, tmp_path / "emu", provider=provider, emulator=emu) as env:
        ids = await env.enqueue(30)

        async def first_collected() -> bool:
            made = await env.batches()
            return bool(made) and made[0]["state"] == "collected"

        await env.drive(until=first_collected)
        rows = await env.jobs()
        unreadable = [j for j in ids if rows[j]["state"] == "queued"]
        assert unreadable, "seed 9 writes some lines unreadable"
        assert all(rows[j]["error_code"] == "missing_result" for j in unreadable)
        assert all(rows[j]["state"] == "succeeded" for j in ids if j not in unreadable)
        assert getattr(env.adapter, "malformed_lines", None) == len(unreadable)
        env.emu.settings.malformed_rate = 0.0
        await env.drive()
        rows = await audit(env)
        assert {r["state"] for r in rows.values()} == {"succeeded"}
        assert {j for j in ids if rows[j]["attempts"] == 2} == set(unreadable)
        assert len(await env.ledger()) == 30


async def test_token_limit_pauses_the_model_resumes_and_resets(db_url: str, tmp_path: Path) -> None:
    # two batches of one model; the emulator's enqueued-token cap fits one at a time
    emu = EmulatorSettings(latency_s=0.4, token_limit=300)
    async with emulated(db_url, tmp_path / "emu", emulator=emu, max_requests=25, token_limit_pause_s=0.5) as env:
        p = env.pipeline
        await env.enqueue(50)

        async def refused_collected() -> bool:
            return any(b["provider_state"] == "failed" and b["state"] == "collected" for b in await env.batches())

        await env.drive(until=refused_collected)
        [pause] = await env.pauses()
        assert (pause["account"], pause["model"], pause["backoff_s"]) == ("openai", env.model, 0.5)
        requeued = [r for r in (await env.jobs()).values() if r["state"] == "queued"]
        assert len(requeued) == 25 and {r["attempts"] for r in requeued} == {0}
        # paused: nothing of that model is packed, even forced
        assert await p.pack(utcnow(), force=True) == []
        await env.drive()
        rows = await audit(env)
        assert {r["state"] for r in rows.values()} == {"succeeded"}
        assert {r["attempts"] for r in rows.values()} == {1}
        refused = [b for b in await env.batches() if b["provider_state"] == "failed"]
        assert refused and all(e["code"] == "token_limit_exceeded" for b in refused for e in b["errors"])
        # the model's next batch was accepted after the pause: the pause and its back-off are gone
        assert await env.pauses() == []
        # so the next hit pauses for the base time again, not double the last
        await env.enqueue(50)
        await env.drive(until=lambda: _paused(env))
        [pause] = await env.pauses()
        assert pause["backoff_s"] == 0.5


async def _paused(env: Env) -> bool:
    return bool(await env.pauses())


async def test_unreadable_batch_status_is_given_up_and_its_jobs_resent(db_url: str, tmp_path: Path) -> None:
    """Regression: a retrieve failing in a way that cannot succeed (the batch is gone: 404) was polled forever."""
    async with emulated(db_url, tmp_path / "emu", poll_give_up_s=1.0) as env:
        p = env.pipeline
        ids = await env.enqueue(4)
        t = utcnow()
        [batch_id] = await p.pack(t, force=True)
        await p.submit(batch_id, t)
        await env.emu.reset()  # the provider forgets the batch

        async def first_collected() -> bool:
            return (await env.batch(batch_id))["state"] == "collected"

        await env.drive(until=first_collected, timeout_s=30)
        given_up = await env.batch(batch_id)
        assert [e["code"] for e in given_up["errors"]] == ["retrieve_failed"]
        assert "404" in given_up["errors"][0]["message"]
        await env.drive()
        rows = await env.jobs()
        assert all(rows[j]["state"] == "succeeded" and rows[j]["attempts"] == 2 for j in ids)
