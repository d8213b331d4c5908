"""Chaos: three ``batcher worker`` processes on PostgreSQL, killed with SIGKILL and started again at random moments,
Redis flushed mid-run, the emulator failing requests and calls and letting a batch expire. Nothing is lost and
nothing is paid twice.

At the end every job is in a terminal state; the ledger holds exactly one entry for each job settled from a
provider result (successes, and failures the provider answered) and no other; and the emulator never received a
request more times than its job counts attempts (no batch was created twice, none created and forgotten). Every
uploaded file is used by a batch, or was swept.

``test_three_workers_share_the_work_exactly_once`` is the same cluster without the kills, quick enough for every
run; ``test_chaos`` (marked ``slow``) is the full run. Its numbers are printed (``-s``) and written to
``chaos-report.json`` in the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from cluster import WorkerProcess, emulator, emulator_stats, redis_server, worker_env
from pydantic import SecretStr

from batcher.config import Settings
from batcher.db import migrate
from batcher.db.engine import Database
from batcher.db.tables import batches, jobs, ledger
from batcher.domain import JobSpec, Provider
from batcher.intake import enqueue_specs
from batcher.lifecycle import Pipeline
from batcher.providers.openai import OpenAIAdapter
from batcher.timeutil import utcnow

TERMINAL = {"succeeded", "failed", "cancelled"}
MODELS = ("gpt-4o-mini", "gpt-4.1-mini")


def specs(n: int) -> list[JobSpec]:
    return [
        JobSpec(
            provider=Provider.OPENAI,
            endpoint="/v1/chat/completions",
            model=MODELS[i % len(MODELS)],
            custom_id=f"x{i}",
            body={
                "model": MODELS[i % len(MODELS)],
                "messages": [{"role": "user", "content": f"chaos question {i} " + "word " * (i % 9)}],
                "max_tokens": 12,
            },
        )
        for i in range(n)
    ]


def cluster_env(pg_url: str, redis_url: str, base_url: str, *, max_requests: int) -> dict[str, str]:
    return worker_env(
        pg_url,
        redis_url,
        base_url,
        tick_s="1",
        poll_min_s="0.3",
        poll_max_s="1.5",
        pack_max_wait="0",
        # a short lease: a killed worker's batches are taken over within seconds
        lease_s="4",
        recovery_interval_s="5",
        max_attempts="3",
        providers__openai__max_requests=str(max_requests),
        providers__openai__base_url=base_url,
        providers__openai__api_key="e2e-key",
    )


@dataclass
class Outcome:
    jobs: int
    states: dict[str, int]
    batches: int
    provider_batches: int
    expired_batches: int
    kills: int
    flushes: int
    duration_s: float
    ledger_entries: int
    max_attempts_seen: int
    files_swept: int


async def audit(db: Database, base_url: str, *, lease_s: float) -> Outcome:
    async with db.engine.connect() as conn:
        rows = {r["id"]: dict(r) for r in (await conn.execute(sa.select(jobs))).mappings()}
        entries = [dict(r) for r in (await conn.execute(sa.select(ledger))).mappings()]
        made = [dict(r) for r in (await conn.execute(sa.select(batches))).mappings()]
    states = Counter(r["state"] for r in rows.values())
    assert set(states) <= TERMINAL, states
    assert {b["state"] for b in made} == {"collected"}
    # the ledger: one entry per job settled from a provider result, none twice, none for anything else
    per_job = Counter(e["job_id"] for e in entries)
    assert max(per_job.values(), default=1) == 1, "a job was charged twice"
    from_provider = {
        j
        for j, r in rows.items()
        if r["state"] == "succeeded" or (r["state"] == "failed" and "status_code" in (r["error"] or {}))
    }
    assert set(per_job) == from_provider
    for e in entries:
        assert e["attempt"] == rows[e["job_id"]]["attempts"] and e["mode"] == "batch"
    assert all(rows[e["job_id"]]["state"] == "succeeded" for e in entries if e["actual_usd"])
    # the provider's side: no request sent more often than its job knows of
    stats = emulator_stats(base_url)
    received = stats["requests_by_custom_id"]
    over = {j: (n, rows[j]["attempts"]) for j, n in received.items() if n > rows[j]["attempts"]}
    assert not over, f"requests the ledger does not know of: {over}"
    assert set(received) <= set(rows)
    # uploaded files: each one the input of a batch that ran, once the sweep has been round
    settings = Settings(
        database_url=db.url, openai_base_url=base_url, openai_api_key=SecretStr("e2e-key"), lease_s=lease_s
    )
    adapter = OpenAIAdapter("openai", api_key="e2e-key", base_url=base_url, max_retries=5)
    try:
        pipeline = Pipeline(db, settings, {"openai": adapter})
        swept = await pipeline.recover("openai", utcnow() + timedelta(seconds=lease_s + 1))
        used = {b["input_file_id"] for b in made if b["provider_batch_id"]}
        left = {f.file_id for f in await adapter.list_uploads()}
        assert left <= used, left - used
    finally:
        await adapter.aclose()
    return Outcome(
        jobs=len(rows),
        states=dict(states),
        batches=len(made),
        provider_batches=int(stats["batches_created"]),
        expired_batches=sum(b["provider_state"] == "expired" for b in made),
        kills=0,
        flushes=0,
        duration_s=0.0,
        ledger_entries=len(entries),
        max_attempts_seen=max(r["attempts"] for r in rows.values()),
        files_swept=len(swept.files_deleted),
    )


async def stuck_report(db: Database) -> str:
    """What is left, for a failure message."""
    async with db.engine.connect() as conn:
        states = dict((await conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state))).all())
        query = sa.select(
            batches.c.id,
            batches.c.state,
            batches.c.provider_state,
            batches.c.lease_owner,
            batches.c.lease_expires_at,
            batches.c.next_poll_at,
            batches.c.submit_attempts,
            batches.c.provider_batch_id,
        ).where(batches.c.state != "collected")
        left = [dict(r) for r in (await conn.execute(query)).mappings()]
        orphans = (
            await conn.execute(
                sa.select(jobs.c.state, batches.c.state, sa.func.count())
                .join(batches, jobs.c.batch_id == batches.c.id)
                .where(jobs.c.state.in_(["packed", "submitted"]))
                .group_by(jobs.c.state, batches.c.state)
            )
        ).all()
    return f"now {utcnow()}\njobs {states}\nbatches not collected {left}\nin-batch jobs by batch state {orphans}"


async def settled(db: Database) -> bool:
    async with db.engine.connect() as conn:
        active_job = await conn.scalar(sa.select(jobs.c.id).where(jobs.c.state.not_in(sorted(TERMINAL))).limit(1))
        open_batch = await conn.scalar(sa.select(batches.c.id).where(batches.c.state != "collected").limit(1))
    return active_job is None and open_batch is None


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    made: list[WorkerProcess] = []
    yield made
    for worker in made:
        worker.close()


async def test_three_workers_share_the_work_exactly_once(
    pg_url: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    db = Database(pg_url)
    await migrate.upgrade(db.engine)
    try:
        with emulator(tmp_path, latency_s=1.0, seed=3) as base_url, redis_server() as redis_url:
            await enqueue_specs(db, specs(1500))
            env = cluster_env(pg_url, redis_url, base_url, max_requests=100)
            workers.extend(WorkerProcess(f"w{i}", env, tmp_path) for i in range(3))
            for worker in workers:
                worker.start()
            deadline = time.monotonic() + 120
            while not await settled(db):
                assert all(w.alive for w in workers), "\n".join(w.log_text() for w in workers)
                assert time.monotonic() < deadline, "the cluster did not finish in time\n" + await stuck_report(db)
                await asyncio.sleep(0.5)
            took = await asyncio.gather(*(asyncio.to_thread(w.terminate) for w in workers))
            assert max(took) < 10
            outcome = await audit(db, base_url, lease_s=4.0)
        assert outcome.states == {"succeeded": 1500}
        assert outcome.ledger_entries == 1500 and outcome.max_attempts_seen == 1
        # with nothing failing, each job went into exactly one batch, each batch was created once
        assert outcome.provider_batches == outcome.batches
        logs = "\n".join(w.log_text() for w in workers)
        assert "Traceback" not in logs
    finally:
        await db.aclose()


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_chaos(pg_url: str, tmp_path: Path, workers: list[WorkerProcess]) -> None:
    rng = random.Random(20260817)
    n_jobs = 5000
    lease_s = 4.0
    db = Database(pg_url)
    await migrate.upgrade(db.engine)
    started = time.monotonic()
    try:
        with (
            emulator(
                tmp_path,
                latency_s=5.0,
                error_rate=0.05,
                api_error_rate=0.02,
                expire_ordinals=[3],
                seed=17,
            ) as base_url,
            redis_server() as redis_url,
        ):
            await enqueue_specs(db, specs(n_jobs))
            env = cluster_env(pg_url, redis_url, base_url, max_requests=50)
            workers.extend(WorkerProcess(f"w{i}", env, tmp_path) for i in range(3))
            for worker in workers:
                worker.start()
            flushes = 0
            # kill a worker at a random moment, every second or so, until each has died five times; a worker is
            # only killed once it is past its start-up (about a second of imports), so the kills land in its work
            while min(w.kills for w in workers) < 5:
                await asyncio.sleep(rng.uniform(0.3, 1.2))
                ready = [w for w in workers if w.kills < 5 and w.uptime_s >= rng.uniform(2.0, 4.0)]
                if not ready:
                    continue
                victim = rng.choice(ready)
                victim.kill()
                await asyncio.sleep(rng.uniform(0.1, 0.6))
                victim.start()
                if flushes == 0 and sum(w.kills for w in workers) == 7:
                    client = aioredis.Redis.from_url(redis_url)
                    try:
                        await client.flushall()
                    finally:
                        await client.aclose()
                    flushes += 1
            deadline = time.monotonic() + 240
            while not await settled(db):
                assert time.monotonic() < deadline, "the cluster did not finish in time\n" + await stuck_report(db)
                for worker in workers:
                    assert worker.alive, worker.log_text()
                await asyncio.sleep(0.5)
            duration_s = time.monotonic() - started
            took = await asyncio.gather(*(asyncio.to_thread(w.terminate) for w in workers))
            assert max(took) < 10
            outcome = await audit(db, base_url, lease_s=lease_s)
        outcome.kills = sum(w.kills for w in workers)
        outcome.flushes = flushes
        outcome.duration_s = round(duration_s, 1)
        assert outcome.jobs == n_jobs and outcome.kills >= 15 and outcome.flushes == 1
        assert outcome.expired_batches == 1
        assert min(w.kills for w in workers) >= 5
        # the expired batch and the failed requests were sent again; most jobs got through
        assert outcome.max_attempts_seen >= 2
        assert outcome.states.get("succeeded", 0) > 0.95 * n_jobs
        # what the workers' logs say recovery did
        events = {
            name: sum(w.log_count(text) for w in workers)
            for name, text in (
                ("submits_resumed", "looking for an earlier one at the provider"),
                ("adopted_unrecorded_batches", "but never recorded"),
                ("leases_lost", "lease lost"),
                ("orphans_cancelled", "cancelling orphan provider batch"),
                ("stray_files_deleted", "no batch uses it"),
                ("collects_retried", "collect of batch"),
                ("submits_retried", "submit of batch"),
                ("redis_lost", "lost Redis"),
            )
        }
        report = {**outcome.__dict__, "restarts": sum(w.runs - 1 for w in workers), "events": events}
        (tmp_path / "chaos-report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        print("\nchaos:", orjson.dumps(report).decode())
    finally:
        await db.aclose()
