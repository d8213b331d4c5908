"""The worker against the provider emulator, through every path, on SQLite and PostgreSQL.

Each test enqueues jobs, runs the real arq worker in burst mode against a real redis-server and the
emulator's OpenAI API (spoken to by the official SDK), and checks what the database ends with.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from batcher import Batcher, JobSpec, Provider, Settings
from batcher.db import migrate
from batcher.db.engine import Database
from batcher.db.tables import batches, jobs, pauses
from batcher.emulator import EmulatorSettings, serve_emulator
from batcher.lifecycle import Pipeline
from batcher.providers.limits import OPENAI_LIMITS
from batcher.providers.openai import OpenAIAdapter
from batcher.timeutil import utcnow
from workers.settings import run_worker

MODELS = ("gpt-4o-mini", "gpt-4.1-mini")


def specs(n: int, *, run: str = "r", models: tuple[str, ...] = MODELS) -> list[JobSpec]:
    return [
        JobSpec(
            provider=Provider.OPENAI,
            endpoint="/v1/chat/completions",
            model=models[i % len(models)],
            custom_id=f"c{i}",
            body={
                "model": models[i % len(models)],
                "messages": [{"role": "user", "content": f"question number {i} " + "word " * (i % 7)}],
                "max_tokens": 20,
            },
            run=run,
        )
        for i in range(n)
    ]


class Env:
    def __init__(self, db: Database, settings: Settings, pipeline: Pipeline, base_url: str) -> None:
        self.db = db
        self.settings = settings
        self.pipeline = pipeline
        self.base_url = base_url

    async def enqueue(self, items: list[JobSpec]) -> list[str]:
        async with Batcher(self.settings, migrate=False) as b:
            return await b.enqueue_many(items)

    async def burst(self, timeout_s: float = 60) -> None:
        await asyncio.wait_for(run_worker(self.settings, burst=True, pipeline=self.pipeline), timeout_s)

    async def jobs(self) -> list[dict[str, Any]]:
        async with self.db.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(sa.select(jobs))).mappings()]

    async def batches(self) -> list[dict[str, Any]]:
        async with self.db.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(sa.select(batches))).mappings()]

    async def stats(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.base_url.removesuffix("/v1") + "/_emulator/stats") as resp,
        ):
            data: dict[str, Any] = await resp.json()
            return data


@pytest.fixture
def make_env(db_url: str, redis_url: str) -> Callable[..., Any]:
    @asynccontextmanager
    async def factory(
        emulator: EmulatorSettings | None = None, *, max_requests: int | None = None, max_retries: int = 2, **over: Any
    ) -> AsyncIterator[Env]:
        emu = emulator or EmulatorSettings(latency_s=0.2)
        async with serve_emulator(emu) as base_url:
            settings = Settings(
                database_url=db_url,
                redis_url=redis_url,
                openai_base_url=base_url,
                openai_api_key=SecretStr("test-key"),
                poll_min_s=0.05,
                poll_max_s=0.2,
                tick_s=1,
                token_limit_pause_s=0.3,
                **over,
            )
            db = Database(db_url)
            await migrate.upgrade(db.engine)
            limits = OPENAI_LIMITS if max_requests is None else replace(OPENAI_LIMITS, max_requests=max_requests)
            adapter = OpenAIAdapter(
                "openai", api_key="test-key", base_url=base_url, limits=limits, max_retries=max_retries
            )
            pipeline = Pipeline(db, settings, {"openai": adapter})
            try:
                yield Env(db, settings, pipeline, base_url)
            finally:
                await adapter.aclose()
                await db.aclose()

    return factory


async def test_success_every_job_settles_once(make_env: Callable[..., Any]) -> None:
    async with make_env(max_requests=40) as env:
        ids = await env.enqueue(specs(100))
        await env.burst()
        rows = await env.jobs()
        assert {r["state"] for r in rows} == {"succeeded"}
        for r in rows:
            body = orjson.loads(r["result"])
            assert body["object"] == "chat.completion"
            assert body["model"] == r["model"]
            assert r["usage"]["prompt_tokens"] > 0
            assert r["attempts"] == 1
        made = await env.batches()
        # one model per batch, at most 40 requests each: 50 + 50 → 2 + 2 batches
        assert len(made) == 4
        assert all(b["state"] == "collected" and b["provider_batch_id"] for b in made)
        assert sum(b["succeeded"] for b in made) == 100
        stats = await env.stats()
        assert stats["batches_created"] == 4
        # batcher's own custom_ids (the job ids) reached the provider, each exactly once
        assert set(stats["requests_by_custom_id"]) == set(ids)
        assert set(stats["requests_by_custom_id"].values()) == {1}


async def test_request_errors_of_both_forms(make_env: Callable[..., Any]) -> None:
    async with make_env(EmulatorSettings(latency_s=0.1, error_rate=0.4, seed=3), max_attempts=3) as env:
        await env.enqueue(specs(150))
        await env.burst()
        rows = await env.jobs()
        assert {r["state"] for r in rows} <= {"succeeded", "failed"}
        failed = [r for r in rows if r["state"] == "failed"]
        assert failed, "an error rate of 40% must leave some failures"
        codes = {r["error_code"] for r in failed}
        # HTTP-level failures carry the body's error, top-level ones their own code
        assert codes, codes
        for r in failed:
            assert r["error"]["message"]
        # retried jobs were received once per attempt, never more
        stats = await env.stats()
        by_id = stats["requests_by_custom_id"]
        assert any(r["attempts"] > 1 for r in rows), "retryable failures must be retried"
        for r in rows:
            assert by_id[r["id"]] == r["attempts"] <= 3


async def test_expiry_keeps_partial_results_and_requeues_the_rest(make_env: Callable[..., Any]) -> None:
    async with make_env(EmulatorSettings(latency_s=0.1, expire_rate=1.0, seed=5), max_attempts=2) as env:
        await env.enqueue(specs(60, models=("gpt-4o-mini",)))
        await env.burst()
        rows = await env.jobs()
        made = await env.batches()
        assert len(made) >= 2, "the unfinished part of an expired batch is sent again"
        first = min(made, key=lambda b: b["created_at"])
        assert first["provider_state"] == "expired"
        assert 0 < first["succeeded"] < 60
        assert {r["state"] for r in rows} <= {"succeeded", "failed"}
        succeeded = [r for r in rows if r["state"] == "succeeded"]
        expired = [r for r in rows if r["state"] == "failed"]
        assert succeeded and expired
        assert all(r["error_code"] == "expired" and r["attempts"] == 2 for r in expired)


async def test_cancel_run(make_env: Callable[..., Any]) -> None:
    async with make_env(EmulatorSettings(latency_s=4)) as env:
        await env.enqueue(specs(30, run="doomed", models=("gpt-4o-mini",)))
        await env.enqueue(specs(5, run="later", models=("gpt-4.1-mini",))[:5])
        p = env.pipeline
        now = utcnow()
        assert len(await p.pack(now, force=True)) == 2
        [batch_id] = [b["id"] for b in await env.batches() if b["model"] == "gpt-4o-mini"]
        await p.submit(batch_id, now)
        report = await p.cancel_run("doomed", utcnow())
        assert (report.batches_cancelled, report.jobs_cancelled, report.batches_shared) == (1, 0, 0)
        await env.burst()
        rows = await env.jobs()
        doomed = [r for r in rows if r["run"] == "doomed"]
        assert {r["state"] for r in doomed} == {"cancelled"}
        assert {r["state"] for r in rows if r["run"] == "later"} == {"succeeded"}
        cancelled = next(b for b in await env.batches() if b["id"] == batch_id)
        assert cancelled["provider_state"] == "cancelled"
        assert cancelled["state"] == "collected"


async def test_token_limit_requeues_and_pauses(make_env: Callable[..., Any]) -> None:
    # two batches of one model; the emulator's enqueued-token cap fits only one at a time
    emu = EmulatorSettings(latency_s=0.3, token_limit=400)
    async with make_env(emu, max_requests=25) as env:
        await env.enqueue(specs(50, models=("gpt-4o-mini",)))
        await env.burst()
        rows = await env.jobs()
        assert {r["state"] for r in rows} == {"succeeded"}
        made = await env.batches()
        refused = [b for b in made if b["provider_state"] == "failed"]
        assert refused, "one batch must have hit the token limit"
        assert all(e["code"] == "token_limit_exceeded" for b in refused for e in b["errors"])
        # not the jobs' fault: the attempt that never ran was given back
        assert {r["attempts"] for r in rows} == {1}
        async with env.db.engine.connect() as conn:
            paused = (await conn.execute(sa.select(pauses))).mappings().all()
        # the pause ran out, and the model's next batch was accepted: the pause (and its back-off) was reset
        assert paused == []


async def test_a_batch_alone_over_the_token_limit_is_sent_again_smaller(make_env: Callable[..., Any]) -> None:
    # 20 jobs of 170 prompt tokens in all, 5 to 13 each; the cap takes 60 at a time: the batch of 20 fails with
    # nothing else in flight, so waiting would free nothing; halving until a batch fits (any 5 jobs do) ends it
    emu = EmulatorSettings(latency_s=0.1, token_limit=60)
    async with make_env(emu, max_requests=25) as env:
        await env.enqueue(specs(20, models=("gpt-4o-mini",)))
        await env.burst(timeout_s=90)
        rows = await env.jobs()
        assert {r["state"] for r in rows} == {"succeeded"}
        assert {r["attempts"] for r in rows} == {1}, "a batch the token limit refused is not the jobs' attempt"
        made = await env.batches()
        refused = [b for b in made if b["provider_state"] == "failed"]
        assert refused and all(e["code"] == "token_limit_exceeded" for b in refused for e in b["errors"])
        accepted = [b for b in made if b["provider_state"] != "failed"]
        assert accepted and all(b["request_count"] <= 5 for b in accepted)
        async with env.db.engine.connect() as conn:
            (pause,) = (await conn.execute(sa.select(pauses))).mappings().all()
        # the cap is kept (a day) although the pause ran out and later batches were taken
        assert pause["batch_cap"] == 5 and pause["batch_cap_until"] > utcnow()


async def test_a_job_alone_over_the_token_limit_fails_with_the_providers_message(
    make_env: Callable[..., Any],
) -> None:
    emu = EmulatorSettings(latency_s=0.1, token_limit=3)
    async with make_env(emu) as env:
        await env.enqueue(specs(2, models=("gpt-4o-mini",)))
        await env.burst(timeout_s=60)
        rows = await env.jobs()
        assert {r["state"] for r in rows} == {"failed"}
        for r in rows:
            assert r["error_code"] == "token_limit_exceeded"
            assert "alone is over the provider's enqueued-token limit for gpt-4o-mini" in r["error"]["message"]
            assert "Enqueued token limit reached" in r["error"]["message"]


async def test_embedding_batches_hold_at_most_50000_inputs(make_env: Callable[..., Any]) -> None:
    # three requests of 20,000 inputs each: any two are over OpenAI's 50,000 embedding inputs per batch, which
    # the emulator enforces; packed by request count alone they would go in one batch and one would be failed
    def embedding(i: int) -> JobSpec:
        body = {"model": "text-embedding-3-small", "input": [f"w{i}"] * 20_000, "dimensions": 1}
        return JobSpec(
            provider=Provider.OPENAI,
            endpoint="/v1/embeddings",
            model="text-embedding-3-small",
            custom_id=f"e{i}",
            body=body,
            run="r",
        )

    async with make_env() as env:
        await env.enqueue([embedding(i) for i in range(3)])
        async with env.db.engine.connect() as conn:
            assert set((await conn.scalars(sa.select(jobs.c.inputs))).all()) == {20_000}
        await env.burst(timeout_s=90)
        rows = await env.jobs()
        assert {r["state"] for r in rows} == {"succeeded"}
        assert {len(orjson.loads(r["result"])["data"]) for r in rows} == {20_000}
        assert sorted(b["request_count"] for b in await env.batches()) == [1, 2]


async def test_api_errors_are_retried(make_env: Callable[..., Any]) -> None:
    emu = EmulatorSettings(latency_s=0.1, api_error_rate=0.3, seed=11)
    async with make_env(emu, max_retries=0) as env:
        ids = await env.enqueue(specs(40))
        await env.burst(timeout_s=120)
        rows = await env.jobs()
        assert {r["state"] for r in rows} == {"succeeded"}
        stats = await env.stats()
        assert stats["api_errors_injected"] > 0
        # failed calls never made a second provider batch for the same jobs
        assert set(stats["requests_by_custom_id"].values()) == {1}
        assert set(stats["requests_by_custom_id"]) == set(ids)
