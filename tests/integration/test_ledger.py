"""The ledger through a real run: every settled request priced, exactly, once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from emulated_env import emulated
from pydantic import SecretStr

from batcher import Batcher, JobSpec, Provider, Settings
from batcher.db import migrate
from batcher.db.engine import Database
from batcher.db.tables import batches, jobs, ledger
from batcher.demo import sample_specs
from batcher.emulator import EmulatorSettings, serve_emulator
from batcher.intake import enqueue_specs
from batcher.ledger import savings
from batcher.lifecycle import Pipeline
from batcher.pricing import PriceBook, normalize_usage
from batcher.providers.openai import OpenAIAdapter
from batcher.timeutil import utcnow
from workers.settings import run_worker


@pytest.fixture
async def ran(db_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[Database, Pipeline]]:
    """1,000 mixed demo jobs (plus a few for a model with no price) run through the emulator."""
    emu = EmulatorSettings(latency_s=0.1, error_rate=0.05, seed=2, data_dir=tmp_path / "emu")
    async with serve_emulator(emu) as base_url:
        settings = Settings(
            database_url=db_url,
            redis_url=redis_url,
            openai_base_url=base_url,
            openai_api_key=SecretStr("k"),
            poll_min_s=0.05,
            poll_max_s=0.2,
        )
        unpriced = [
            JobSpec(
                provider=Provider.OPENAI,
                endpoint="/v1/chat/completions",
                model="ft:gpt-4o-mini:acme:custom",
                custom_id=f"ft-{i}",
                body={"model": "ft:gpt-4o-mini:acme:custom", "messages": [{"role": "user", "content": "hi"}]},
                run="demo",
            )
            for i in range(5)
        ]
        async with Batcher(settings) as b:
            await b.enqueue_many([*sample_specs(1000), *unpriced])
        db = Database(db_url)
        await migrate.upgrade(db.engine)
        adapter = OpenAIAdapter("openai", api_key="k", base_url=base_url)
        pipeline = Pipeline(db, settings, {"openai": adapter})
        try:
            await run_worker(settings, burst=True, pipeline=pipeline)
            yield db, pipeline
        finally:
            await adapter.aclose()
            await db.aclose()


async def test_ledger_equals_usage_times_price(ran: tuple[Database, Pipeline]) -> None:
    db, _ = ran
    book = PriceBook()
    async with db.engine.connect() as conn:
        succeeded = (
            await conn.execute(sa.select(jobs.c.id, jobs.c.model, jobs.c.usage).where(jobs.c.state == "succeeded"))
        ).all()
        entries = (await conn.execute(sa.select(ledger))).mappings().all()
        total_jobs = await conn.scalar(sa.select(sa.func.count()).select_from(jobs))
    assert total_jobs == 1005
    # one entry per settled provider request: every success, and every failure (billed 0)
    assert len({(e["job_id"], e["attempt"]) for e in entries}) == len(entries)
    by_job = {e["job_id"]: e for e in entries if e["actual_usd"] != 0 or e["input_tokens"]}
    expected_actual = Decimal(0)
    expected_realtime = Decimal(0)
    unpriced = 0
    for job_id, model, usage in succeeded:
        cost = book.cost("openai", model, normalize_usage("openai", usage), mode="batch")
        entry = by_job[job_id]
        assert entry["actual_usd"] == cost.actual_usd
        assert entry["realtime_usd"] == cost.realtime_usd
        assert entry["input_tokens"] == normalize_usage("openai", usage).input_tokens
        if cost.actual_usd is None:
            unpriced += 1
            continue
        expected_actual += cost.actual_usd
        expected_realtime += cost.realtime_usd or Decimal(0)
    assert unpriced == 5
    async with db.engine.connect() as conn:
        report = await savings(conn)
    assert report.totals.actual_usd == expected_actual
    assert report.totals.realtime_usd == expected_realtime
    assert report.totals.unpriced_jobs == 5
    assert report.unpriced_models == ["ft:gpt-4o-mini:acme:custom"]
    # the demo's models have published batch prices at half, embeddings are derived at half
    assert 49 < report.totals.saved_pct <= 50.0
    failures = [e for e in entries if e["job_id"] not in by_job]
    assert all(e["actual_usd"] == 0 and e["realtime_usd"] == 0 for e in failures)


async def test_collecting_again_adds_nothing(ran: tuple[Database, Pipeline]) -> None:
    db, pipeline = ran
    async with db.engine.begin() as conn:
        before = await conn.scalar(sa.select(sa.func.count()).select_from(ledger))
        total_before = (await savings(conn)).totals.actual_usd
        # pretend every batch still waits to be collected, as after a crash
        await conn.execute(sa.update(batches).values(state="ended", lease_owner=None, lease_expires_at=None))
        ids = [r[0] for r in await conn.execute(sa.select(batches.c.id))]
    from batcher.timeutil import utcnow

    for batch_id in ids:
        await pipeline.collect(batch_id, utcnow())
    async with db.engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(ledger)) == before
        assert (await savings(conn)).totals.actual_usd == total_before


async def test_savings_groupings(ran: tuple[Database, Pipeline]) -> None:
    db, _ = ran
    async with db.engine.connect() as conn:
        total = (await savings(conn)).totals
        for by in ("provider", "model", "run", "day", "tag:team"):
            report = await savings(conn, by=by)
            assert sum(g.jobs for g in report.groups) == total.jobs, by
            assert sum(g.actual_usd for g in report.groups) == total.actual_usd, by
            assert report.totals.realtime_usd == total.realtime_usd, by
            # by model the list comes from the groups, otherwise from the unpriced entries' index: the same
            assert report.unpriced_models == ["ft:gpt-4o-mini:acme:custom"], by
        models = {g.key for g in (await savings(conn, by="model")).groups}
        assert {"gpt-4o-mini", "text-embedding-3-small"} <= models
        teams = {g.key for g in (await savings(conn, by="tag:team")).groups}
        assert teams == {"search", "billing", "support", "(none)"}
        assert (await savings(conn, run="nope")).totals.jobs == 0


# ------------------------------------------------------------------------------------ Anthropic 1-hour cache writes

#: claude-sonnet-4-5, USD per million tokens in real time (a batch pays half of each): input, 1-hour cache write,
#: output — 1-hour writes cost $6/M, not the $3.75/M of 5-minute writes
SONNET_45 = {"input": Decimal(3), "write_1h": Decimal(6), "output": Decimal(15)}


def hour_cached(custom_id: str, prefix: str, **over: Any) -> JobSpec:
    """A Messages job whose system prompt (just under 40,000 characters: 10,000 tokens) is cached for an hour."""
    system = [
        {"type": "text", "text": prefix * (40_000 // len(prefix)), "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    ]
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 16,
        "system": system,
        "messages": [{"role": "user", "content": "go"}],
    }
    return JobSpec(
        provider=Provider.ANTHROPIC,
        account="anthropic",
        endpoint="/v1/messages",
        model="claude-sonnet-4-5",
        custom_id=custom_id,
        body=body,
        run="hour",
        **over,
    )


async def test_anthropic_one_hour_cache_writes_priced_in_batch_and_real_time(db_url: str, tmp_path: Path) -> None:
    async with emulated(db_url, tmp_path / "emu", provider=Provider.ANTHROPIC, expected_turnaround_s=3600.0) as env:
        now = utcnow()
        # one job a batch can return in time, one that must go to the real-time API; each writes its own prefix
        await enqueue_specs(
            env.db,
            [
                hour_cached("batched", "Batch prefix. ", not_after=now + timedelta(days=2)),
                hour_cached("late", "Fallback text ", not_after=now + timedelta(seconds=600)),
            ],
        )
        await env.drive()
        async with env.db.engine.connect() as conn:
            query = sa.select(jobs.c.custom_id, ledger).join(ledger, ledger.c.job_id == jobs.c.id)
            entries = {r["custom_id"]: r for r in (await conn.execute(query)).mappings()}
    assert set(entries) == {"batched", "late"}
    assert (entries["batched"]["mode"], entries["late"]["mode"]) == ("batch", "realtime")
    for name, entry in entries.items():
        assert entry["cache_creation_tokens"] == entry["cache_creation_1h_tokens"] == 10_000, name
        assert entry["cached_input_tokens"] == 0, name
        uncached = entry["input_tokens"] - 10_000
        assert uncached > 0 and entry["output_tokens"] > 0, name
        realtime = (
            uncached * SONNET_45["input"]
            + 10_000 * SONNET_45["write_1h"]
            + entry["output_tokens"] * SONNET_45["output"]
        ) / 1_000_000
        assert entry["realtime_usd"] == realtime, name
        # a batch pays half of every kind of token; a real-time fallback pays the real-time price
        assert entry["actual_usd"] == (realtime / 2 if entry["mode"] == "batch" else realtime), name
        assert not entry["batch_price_derived"]
