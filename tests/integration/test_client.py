"""``BatcherClient`` against the real API, a real worker and the provider emulator, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from api_env import ApiEnv, api_env, chat
from pydantic import SecretStr

from batcher.api.models import JobIn
from batcher.client import ApiError, ApiNotFound, BatcherClient, OverBudgetError, Unauthorized
from batcher.domain import JobState, Provider
from batcher.emulator import EmulatorSettings, serve_emulator
from batcher.errors import NotFound
from batcher.tenants import set_limits
from workers.settings import run_worker

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def test_enqueue_wait_get_results(db_url: str, redis_url: str, tmp_path: Path) -> None:
    async with (
        serve_emulator(EmulatorSettings(latency_s=0.2, data_dir=tmp_path / "emu")) as base_url,
        api_env(db_url) as env,
        BatcherClient(env.url, env.keys["acme"]) as client,
    ):
        settings = env.settings.model_copy(
            update={
                "redis_url": redis_url,
                "openai_base_url": base_url,
                "openai_api_key": SecretStr("test-key"),
                "poll_min_s": 0.05,
                "poll_max_s": 0.2,
                "tick_s": 1,
            }
        )
        one = await client.enqueue(provider="openai", body=BODY, run="r", custom_id="one", tags={"team": "search"})
        assert (one.custom_id, one.run, one.state, one.created) == ("one", "r", JobState.QUEUED, True)
        many = await client.enqueue_many(
            [
                JobIn(provider=Provider.OPENAI, body=BODY | {"max_tokens": 4}, run="r", custom_id="two"),
                {"provider": "openai", "body": BODY, "run": "r", "custom_id": "three"},
            ]
        )
        assert (many.jobs, many.created) == (2, 2)
        assert (await client.get(one.id)).state is JobState.QUEUED

        waiting = asyncio.create_task(client.wait(one.id, poll_s=0.05, max_poll_s=0.2, timeout_s=60))
        await asyncio.wait_for(run_worker(settings, burst=True), 60)
        done = await waiting
        assert done.state is JobState.SUCCEEDED
        assert done.result["object"] == "chat.completion"
        assert done.cost is not None and done.cost.actual_usd is not None
        assert done.tags == {"team": "search"}

        lines = [line async for line in client.results("r")]
        assert sorted(line.custom_id for line in lines) == ["one", "three", "two"]
        assert all(line.state is JobState.SUCCEEDED and line.result is not None for line in lines)
        listed = [job async for job in client.jobs(run="r", page_size=2)]
        assert [j.id for j in listed] == [many.ids[1], many.ids[0], one.id]
        run = await client.run("r")
        assert (run.total, run.settled) == (3, 3)
        by_model = await client.savings(by="model")
        assert [g.key for g in by_model.groups] == ["gpt-4o-mini"]
        assert by_model.totals.jobs == 3

        late = await client.enqueue(provider="openai", body=BODY, run="r")
        assert (await client.cancel(late.id)).state is JobState.CANCELLED
        with pytest.raises(TimeoutError):
            await client.wait((await client.enqueue(provider="openai", body=BODY)).id, poll_s=0.05, timeout_s=0.3)


async def test_errors_are_typed(db_url: str) -> None:
    async with api_env(db_url) as env, BatcherClient(env.url, env.keys["acme"]) as client:
        mine = await client.enqueue(provider="openai", body=BODY)
        async with BatcherClient(env.url, env.keys["globex"]) as theirs:
            with pytest.raises(ApiNotFound) as not_found:
                await theirs.get(mine.id)
            assert isinstance(not_found.value, NotFound)
            assert not_found.value.status == 404
            with pytest.raises(ApiNotFound):
                async for _ in theirs.results("default"):
                    pass
        with pytest.raises(ApiError) as invalid:
            await client.enqueue(provider="openai", body={"messages": []})
        assert (invalid.value.status, invalid.value.type, invalid.value.field) == (422, "invalid_request", "body.model")
        with pytest.raises(ApiError) as bulk:
            await client.enqueue_many([chat(0), chat(1, priority="high")])
        assert (bulk.value.line, bulk.value.field) == (2, "priority")
        async with BatcherClient(env.url, "bk_wrong") as stranger:
            with pytest.raises(Unauthorized):
                await stranger.get(mine.id)
        await set_limits(env.db, "acme", monthly_budget_usd=Decimal(0))
        with pytest.raises(OverBudgetError, match="monthly budget"):
            await client.enqueue(provider="openai", body=BODY)


@asynccontextmanager
async def losing_first_answer(env: ApiEnv) -> AsyncIterator[str]:
    """A proxy in front of the API that forwards the first POST, then answers 503 instead of the API's answer."""
    seen = {"posts": 0}

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with (
            aiohttp.ClientSession() as http,
            http.request(request.method, env.url + request.path_qs, data=body, headers=headers) as resp,
        ):
            answer = await resp.read()
            status = resp.status
        if request.method == "POST":
            seen["posts"] += 1
            if seen["posts"] == 1:
                return web.Response(status=503, text="the answer got lost")
        return web.Response(status=status, body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a for a in runner.addresses if isinstance(a, tuple))[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_retried_post_makes_no_second_job(db_url: str) -> None:
    async with (
        api_env(db_url) as env,
        losing_first_answer(env) as proxy,
        BatcherClient(proxy, env.keys["acme"], backoff_s=0.01) as client,
    ):
        # no custom_id: the job was stored by the first POST, whose answer was lost; the retry finds it
        accepted = await client.enqueue(provider="openai", body=BODY)
        assert await env.count() == 1
        assert (await env.jobs())[0]["id"] == accepted.id
