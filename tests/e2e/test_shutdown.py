"""Graceful shutdown: ``batcher worker`` on SIGTERM finishes or releases its in-flight work within 10 s.

The worker runs as a subprocess against the emulator (also a subprocess) and a private redis-server. On SQLite and
PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cluster import ARQ_WORKER, BATCHER, WorkerProcess, emulator, redis_server, worker_env

from batcher.db import migrate
from batcher.db.engine import Database
from batcher.db.tables import batches, jobs, ledger
from batcher.domain import JobSpec, Provider
from batcher.intake import enqueue_specs
from batcher.timeutil import utcnow

SHUTDOWN_LIMIT_S = 10.0


def specs(n: int) -> list[JobSpec]:
    return [
        JobSpec(
            provider=Provider.OPENAI,
            endpoint="/v1/chat/completions",
            model="gpt-4o-mini",
            custom_id=f"s{i}",
            body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 8},
        )
        for i in range(n)
    ]


@pytest.fixture
def services(tmp_path: Path) -> Iterator[tuple[str, str]]:
    with emulator(tmp_path, latency_s=0.5) as base_url, redis_server() as redis_url:
        yield base_url, redis_url


async def until(check: Any, timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def counts(db: Database) -> dict[str, int]:
    async with db.engine.connect() as conn:
        return {s: n for s, n in await conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state))}


async def held_leases(db: Database) -> list[dict[str, Any]]:
    """Batch rows whose lease still keeps other workers out."""
    now = utcnow()
    async with db.engine.connect() as conn:
        query = sa.select(batches.c.id, batches.c.state, batches.c.lease_owner, batches.c.lease_expires_at).where(
            batches.c.lease_owner.is_not(None), batches.c.lease_expires_at > now
        )
        return [dict(r) for r in (await conn.execute(query)).mappings()]


@pytest.mark.parametrize("cli", ["batcher", "arq"])
async def test_sigterm_mid_collect_releases_the_batch_within_10_s(
    cli: str, db_url: str, tmp_path: Path, services: tuple[str, str]
) -> None:
    base_url, redis_url = services
    db = Database(db_url)
    await migrate.upgrade(db.engine)
    try:
        ids = await enqueue_specs(db, specs(3000))
        env = worker_env(
            db_url,
            redis_url,
            base_url,
            tick_s="1",
            poll_min_s="0.2",
            poll_max_s="0.5",
            pack_max_wait="0",
            # one transaction per result: collecting 3,000 takes seconds, long enough to be interrupted
            settle_chunk="1",
            # a long lease: what follows is the worker releasing the batch, not the lease running out
            lease_s="120",
            shutdown_grace_s="1",
        )
        worker = WorkerProcess("w", env, tmp_path)
        if cli == "arq":
            worker.command = ARQ_WORKER
        worker.start()
        try:

            async def collecting() -> bool:
                async with db.engine.connect() as conn:
                    entries = await conn.scalar(sa.select(sa.func.count()).select_from(ledger))
                return bool(entries and entries >= 50)

            await until(collecting, 60, "the collect to start")
            took = await asyncio.to_thread(worker.terminate)
        finally:
            worker.close()
        assert took < SHUTDOWN_LIMIT_S, worker.log_text()
        assert worker.proc is not None and worker.proc.returncode == 0, worker.log_text()
        assert "Traceback" not in worker.log_text()
        # interrupted part-way: some results settled, the rest waits, and nothing holds the batch
        states = await counts(db)
        assert 0 < states.get("succeeded", 0) < 3000 and states.get("submitted", 0) > 0, states
        assert await held_leases(db) == []
        # so the next worker takes over at once (not after the two-minute lease)
        again = WorkerProcess("again", env, tmp_path, args=("--burst",))
        again.start()
        try:
            assert again.proc is not None
            code = await asyncio.to_thread(again.proc.wait, 120)
        finally:
            again.close()
        assert code == 0, again.log_text()
        assert await counts(db) == {"succeeded": 3000}
        async with db.engine.connect() as conn:
            job_ids = [r[0] for r in await conn.execute(sa.select(ledger.c.job_id))]
        assert sorted(job_ids) == sorted(ids), "each result settled once into the ledger"
    finally:
        await db.aclose()


async def test_sigterm_lets_running_steps_finish_and_exits_within_10_s(
    db_url: str, tmp_path: Path, services: tuple[str, str]
) -> None:
    base_url, redis_url = services
    db = Database(db_url)
    await migrate.upgrade(db.engine)
    try:
        await enqueue_specs(db, specs(400))
        env = worker_env(
            db_url,
            redis_url,
            base_url,
            tick_s="1",
            poll_min_s="0.1",
            poll_max_s="0.3",
            pack_max_wait="0",
            lease_s="120",
            providers__openai__max_requests="50",
            providers__openai__base_url=base_url,
            providers__openai__api_key="e2e-key",
        )
        worker = WorkerProcess("w", env, tmp_path)
        worker.start()
        try:

            async def busy() -> bool:
                return (await counts(db)).get("submitted", 0) > 0

            await until(busy, 60, "batches at the provider")
            took = await asyncio.to_thread(worker.terminate)
        finally:
            worker.close()
        assert took < SHUTDOWN_LIMIT_S, worker.log_text()
        assert worker.proc is not None and worker.proc.returncode == 0, worker.log_text()
        assert "Traceback" not in worker.log_text()
        assert await held_leases(db) == []
        async with db.engine.connect() as conn:
            stuck = await conn.scalar(
                sa.select(sa.func.count()).where(
                    batches.c.state == "submitting", batches.c.updated_at < utcnow() - timedelta(seconds=1)
                )
            )
        assert not stuck
    finally:
        await db.aclose()


async def test_a_second_worker_on_one_sqlite_database_says_so(tmp_path: Path, services: tuple[str, str]) -> None:
    base_url, redis_url = services
    database = tmp_path / "one.db"
    env = worker_env(f"sqlite+aiosqlite:///{database}", redis_url, base_url, tick_s="1")
    first = WorkerProcess("first", env, tmp_path)
    first.start()
    try:
        lock = database.with_name("one.db.worker.lock")

        async def holding() -> bool:
            return await asyncio.to_thread(lambda: lock.exists() and bool(lock.read_text().strip()))

        await until(holding, 60, "the first worker to start")
        second = await asyncio.create_subprocess_exec(
            str(BATCHER),
            "worker",
            "--burst",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(second.communicate(), 60)
        assert second.returncode == 1
        message = err.decode()
        assert "SQLite supports a single worker" in message and "PostgreSQL" in message
        assert f"pid {first.proc.pid if first.proc else ''}" in message
        assert "Traceback" not in message
        assert first.alive
    finally:
        took = await asyncio.to_thread(first.terminate) if first.alive else 0.0
        first.close()
    assert took < SHUTDOWN_LIMIT_S
