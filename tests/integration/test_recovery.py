"""Crash safety and recovery: a worker killed at each point of a batch's life, leases handed over, Redis lost and
flushed, and the one-worker rule of SQLite. Against the emulator (OpenAI and Anthropic), on SQLite and PostgreSQL.

A "kill" is :class:`WorkerDied` raised at the chosen line: nothing in the pipeline catches it, so the database is
left exactly as a SIGKILL would leave it (the lease in the row, nothing released). The next worker runs at a
``now`` past the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from emulated_env import Env, Interrupting, WorkerDied, emulated
from pydantic import SecretStr

from batcher import lifecycle
from batcher.config import Settings
from batcher.db.engine import Database
from batcher.db.tables import batches, jobs
from batcher.domain import Provider
from batcher.embedded import redis_server_path
from batcher.emulator import EmulatorSettings
from batcher.errors import ConfigError
from batcher.intake import enqueue_specs
from batcher.lifecycle import Pipeline
from batcher.recovery import RECOVERY_UNCERTAIN, WorkerLock
from batcher.testing import FakeProvider
from batcher.timeutil import utcnow
from workers.settings import run_worker

LEASE_S = 30.0
PAST_LEASE = timedelta(seconds=LEASE_S + 5)


def interrupting(die: str, **kw: Any) -> Any:
    return lambda inner: Interrupting(inner, die, **kw)


async def settled_once(env: Env, ids: list[str], *, attempts: int = 1) -> None:
    rows = await env.jobs()
    assert all(rows[j]["state"] == "succeeded" and rows[j]["attempts"] == attempts for j in ids)
    entries = await env.ledger()
    assert sorted(e["job_id"] for e in entries) == sorted(ids), "one ledger entry per job, none twice"
    received = (await env.stats())["requests_by_custom_id"]
    assert received == dict.fromkeys(ids, attempts)


# ----------------------------------------------------------------------------------------------- packing


async def test_killed_while_packing_leaves_every_job_queued(
    db: Database, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from batcher.testing import FAKE_LIMITS

    fake = FakeProvider("fake", limits=replace(FAKE_LIMITS, max_requests=3))
    p = Pipeline(db, Settings(database_url=db_url), {"fake": fake})
    from batcher.domain import JobSpec

    specs = [
        JobSpec(
            provider=Provider.OPENAI,
            account="fake",
            endpoint="/v1/chat/completions",
            model="m",
            custom_id=f"p{i}",
            body={"model": "m", "messages": []},
        )
        for i in range(6)
    ]
    ids = await enqueue_specs(db, specs)
    real_new_id = lifecycle.new_id
    made: list[str] = []

    def dying_new_id() -> str:
        # the first batch row and its jobs are written; the worker dies before the second
        if made:
            raise WorkerDied("killed mid-pack")
        made.append(real_new_id())
        return made[-1]

    monkeypatch.setattr(lifecycle, "new_id", dying_new_id)
    with pytest.raises(WorkerDied):
        await p.pack(utcnow(), force=True)
    monkeypatch.setattr(lifecycle, "new_id", real_new_id)
    async with db.engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(batches)) == 0
        states = {r[0] for r in await conn.execute(sa.select(jobs.c.state))}
    assert states == {"queued"}
    assert len(await p.pack(utcnow(), force=True)) == 2
    async with db.engine.connect() as conn:
        assert {r[0] for r in await conn.execute(sa.select(jobs.c.state).where(jobs.c.id.in_(ids)))} == {"packed"}


# ------------------------------------------------------------------------------------------------ submit


async def test_killed_between_upload_and_recording_it_the_stray_file_is_deleted(db_url: str, tmp_path: Path) -> None:
    async with emulated(db_url, tmp_path / "emu", wrap=interrupting("after_upload"), lease_s=LEASE_S) as env:
        assert isinstance(env.adapter, Interrupting)
        ids = await env.enqueue(4)
        t = utcnow()
        [batch_id] = await env.pipeline.pack(t, force=True)
        with pytest.raises(WorkerDied):
            await env.pipeline.submit(batch_id, t)
        row = await env.batch(batch_id)
        assert row["state"] == "submitting" and row["lease_owner"] == "w1" and row["input_file_id"] is None
        [stray] = [f.file_id for f in await env.adapter.inner.list_uploads()]
        w2 = env.worker("w2", env.adapter.inner)
        # the lease holds: nobody else touches it
        await w2.submit(batch_id, t + timedelta(seconds=LEASE_S - 1))
        assert (await env.stats())["files_uploaded"] == 1
        await w2.submit(batch_id, t + PAST_LEASE)
        row = await env.batch(batch_id)
        assert row["state"] in ("validating", "in_progress") and row["submit_attempts"] == 2
        assert row["input_file_id"] != stray
        stats = await env.stats()
        assert stats["batches_created"] == 1 and stats["files_uploaded"] == 2
        # the sweep deletes the file no batch uses, and only that one (a file younger than a lease is left alone)
        assert (await w2.recover("openai", utcnow())).files_deleted == []
        report = await w2.recover("openai", utcnow() + PAST_LEASE)
        assert report.files_deleted == [stray] and report.orphans_cancelled == []
        assert [f.file_id for f in await env.adapter.inner.list_uploads()] == [row["input_file_id"]]
        env.pipeline, env.offset = w2, PAST_LEASE
        await env.drive()
        await settled_once(env, ids)


async def test_killed_after_recording_the_upload_creates_once_from_that_file(db_url: str, tmp_path: Path) -> None:
    async with emulated(db_url, tmp_path / "emu", wrap=interrupting("before_create"), lease_s=LEASE_S) as env:
        assert isinstance(env.adapter, Interrupting)
        ids = await env.enqueue(4)
        t = utcnow()
        [batch_id] = await env.pipeline.pack(t, force=True)
        with pytest.raises(WorkerDied):
            await env.pipeline.submit(batch_id, t)
        uploaded = (await env.batch(batch_id))["input_file_id"]
        assert uploaded is not None
        w2 = env.worker("w2", env.adapter.inner)
        await w2.submit(batch_id, t + PAST_LEASE)
        row = await env.batch(batch_id)
        assert row["provider_batch_id"] and row["input_file_id"] == uploaded
        stats = await env.stats()
        assert stats["batches_created"] == 1 and stats["files_uploaded"] == 1
        assert (await w2.recover("openai", utcnow() + PAST_LEASE)).files_deleted == []
        env.pipeline, env.offset = w2, PAST_LEASE
        await env.drive()
        await settled_once(env, ids)


@pytest.mark.parametrize("provider", [Provider.OPENAI, Provider.ANTHROPIC])
async def test_killed_after_create_before_recording_the_batch_is_found_not_made_again(
    db_url: str, tmp_path: Path, provider: Provider
) -> None:
    async with emulated(
        db_url, tmp_path / "emu", provider=provider, wrap=interrupting("after_create"), lease_s=LEASE_S
    ) as env:
        assert isinstance(env.adapter, Interrupting)
        ids = await env.enqueue(5)
        t = utcnow()
        [batch_id] = await env.pipeline.pack(t, force=True)
        with pytest.raises(WorkerDied):
            await env.pipeline.submit(batch_id, t)
        row = await env.batch(batch_id)
        assert row["state"] == "submitting" and row["provider_batch_id"] is None
        # the moment create was sent is on the row (Anthropic's batches are matched by it)
        assert row["submitted_at"] is not None
        assert (await env.stats())["batches_created"] == 1
        w2 = env.worker("w2", env.adapter.inner)
        await w2.submit(batch_id, t + PAST_LEASE)
        row = await env.batch(batch_id)
        assert row["provider_batch_id"] is not None and row["state"] in ("validating", "in_progress")
        # found at the provider (OpenAI: by our id in its metadata; Anthropic: by creation time and size)
        assert (await env.stats())["batches_created"] == 1
        assert not any(e.get("code") == RECOVERY_UNCERTAIN for e in row["errors"] or [])
        env.pipeline, env.offset = w2, PAST_LEASE
        await env.drive()
        await settled_once(env, ids)


async def test_anthropic_match_by_time_and_size_records_its_uncertainty(db_url: str, tmp_path: Path) -> None:
    async with emulated(
        db_url,
        tmp_path / "emu",
        provider=Provider.ANTHROPIC,
        wrap=interrupting("after_create"),
        lease_s=LEASE_S,
        max_requests=3,
    ) as env:
        assert isinstance(env.adapter, Interrupting)
        first = await env.enqueue(3, run="a")
        second = await env.enqueue(3, run="b")
        t = utcnow()
        # two batches of the same size, both created and neither recorded (two workers killed at once)
        made = await env.pipeline.pack(t, force=True)
        assert len(made) == 2
        for batch_id in made:
            env.adapter.die = "after_create"
            with pytest.raises(WorkerDied):
                await env.pipeline.submit(batch_id, t)
        assert (await env.stats())["batches_created"] == 2
        w2 = env.worker("w2", env.adapter.inner)
        await w2.submit(made[0], t + PAST_LEASE)
        row = await env.batch(made[0])
        [note] = [e for e in row["errors"] if e["code"] == RECOVERY_UNCERTAIN]
        assert "2 provider batches matched" in note["message"] and row["provider_batch_id"] in note["message"]
        # the second finds only the one left
        await w2.submit(made[1], t + PAST_LEASE)
        other = await env.batch(made[1])
        assert other["provider_batch_id"] not in (None, row["provider_batch_id"])
        assert not any(e["code"] == RECOVERY_UNCERTAIN for e in other["errors"] or [])
        assert (await env.stats())["batches_created"] == 2
        env.pipeline, env.offset = w2, PAST_LEASE
        await env.drive()
        # the nearest creation time was the right one: every job settled from its own batch
        await settled_once(env, first + second)


async def test_orphan_provider_batch_is_cancelled_by_the_sweep(db_url: str, tmp_path: Path) -> None:
    async with emulated(db_url, tmp_path / "emu", emulator=EmulatorSettings(latency_s=3), lease_s=LEASE_S) as env:
        ids = await env.enqueue(3)
        t = utcnow()
        [batch_id] = await env.pipeline.pack(t, force=True)
        await env.pipeline.submit(batch_id, t)
        recorded = (await env.batch(batch_id))["provider_batch_id"]
        # a submit that outlived its lease created a second provider batch for the same batch, then was killed
        # before it could cancel it
        path = tmp_path / "again.jsonl"
        rows = await env.jobs()
        path.write_bytes(b"".join(env.adapter.encode_line(j, rows[j]["endpoint"], rows[j]["body"]) for j in ids))
        file_id = await env.adapter.upload(path)
        orphan = await env.adapter.create(
            batch_id=batch_id, endpoint="/v1/chat/completions", model=env.model, input_file_id=file_id, path=path
        )
        report = await env.pipeline.recover("openai", utcnow())
        assert report.orphans_cancelled == [orphan.provider_batch_id]
        assert (await env.adapter.retrieve(orphan.provider_batch_id)).provider_state in ("cancelling", "cancelled")
        assert (await env.adapter.retrieve(recorded)).provider_state not in ("cancelling", "cancelled")
        assert (await env.batch(batch_id))["provider_batch_id"] == recorded
        # idempotent: a second sweep finds nothing to do
        assert (await env.pipeline.recover("openai", utcnow())).orphans_cancelled == []


async def test_shutdown_mid_submit_hands_the_batch_over_at_once(db_url: str, tmp_path: Path) -> None:
    async with emulated(db_url, tmp_path / "emu", wrap=interrupting("none"), lease_s=LEASE_S) as env:
        assert isinstance(env.adapter, Interrupting)
        env.adapter.gate = asyncio.Event()
        ids = await env.enqueue(3)
        t = utcnow()
        [batch_id] = await env.pipeline.pack(t, force=True)
        running = asyncio.create_task(env.pipeline.submit(batch_id, t))
        await env.adapter.entered.wait()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        row = await env.batch(batch_id)
        # still submitting (create may have reached the provider) but free for the next worker now, not in 30 s
        assert row["state"] == "submitting" and row["lease_expires_at"] < t
        w2 = env.worker("w2", env.adapter.inner)
        assert (await w2.due(t)).submit == [batch_id]
        await w2.submit(batch_id, t)
        env.pipeline, env.offset = w2, PAST_LEASE
        await env.drive()
        await settled_once(env, ids)


# ------------------------------------------------------------------------------------------------ collect


@pytest.mark.parametrize("provider", [Provider.OPENAI, Provider.ANTHROPIC])
async def test_killed_mid_collect_the_rest_settles_once(db_url: str, tmp_path: Path, provider: Provider) -> None:
    async with emulated(
        db_url,
        tmp_path / "emu",
        provider=provider,
        wrap=interrupting("mid_results", results_before_death=7),
        lease_s=LEASE_S,
        settle_chunk=3,
    ) as env:
        ids = await env.enqueue(20)

        async def ended() -> bool:
            return (await env.batches())[0]["state"] == "ended"

        t = utcnow()
        [batch_id] = await env.pipeline.pack(t, force=True)
        await env.pipeline.submit(batch_id, t)
        while not await ended():
            await env.pipeline.poll(batch_id, utcnow() + timedelta(seconds=1))
            await asyncio.sleep(0.05)
        t = utcnow()
        with pytest.raises(WorkerDied):
            await env.pipeline.collect(batch_id, t)
        rows = await env.jobs()
        assert sum(r["state"] == "succeeded" for r in rows.values()) == 6  # two chunks of three
        assert len(await env.ledger()) == 6
        w2 = env.worker("w2", env.adapter.inner)  # type: ignore[attr-defined]
        assert await w2.collect(batch_id, t + timedelta(seconds=LEASE_S - 1)) is None
        report = await w2.collect(batch_id, t + PAST_LEASE)
        assert report is not None and report.succeeded == 20
        await settled_once(env, ids)


async def test_shutdown_mid_collect_releases_the_batch(db_url: str, tmp_path: Path) -> None:
    async with emulated(db_url, tmp_path / "emu", lease_s=LEASE_S, settle_chunk=1) as env:
        ids = await env.enqueue(30)
        t = utcnow()
        [batch_id] = await env.pipeline.pack(t, force=True)
        await env.pipeline.submit(batch_id, t)
        await env.drive(until=lambda: _ended(env, batch_id))
        running = asyncio.create_task(env.pipeline.collect(batch_id, utcnow()))
        await wait_for(lambda: _settled_at_least(env, 3), 30, every_s=0.001)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        row = await env.batch(batch_id)
        assert row["state"] == "ended" and row["lease_owner"] is None
        w2 = env.worker("w2")
        assert (await w2.due(utcnow())).collect == [batch_id]
        await w2.collect(batch_id, utcnow())
        await settled_once(env, ids)


async def _ended(env: Env, batch_id: str) -> bool:
    return (await env.batch(batch_id))["state"] in ("ended", "collected")


# ------------------------------------------------------------------------------------------- Redis is disposable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(port: int) -> Iterator[subprocess.Popen[bytes]]:
    folder = Path(tempfile.mkdtemp(prefix="batcher-test-redis-"))
    proc = subprocess.Popen(
        [redis_server_path(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, pipeline: Pipeline) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(run_worker(settings, pipeline=pipeline))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_redis_flushed_and_restarted_mid_run_loses_no_job(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    emu = EmulatorSettings(latency_s=1.0)
    async with emulated(db_url, tmp_path / "emu", emulator=emu, max_requests=20, redis_url=url, poll_min_s=0.2) as env:
        ids = await env.enqueue(200)
        with redis_server(port) as first:
            async with running_worker(env.settings, env.pipeline) as worker:
                await wait_for(lambda: _some_state(env, "validating", "in_progress"), 30)
                client = aioredis.Redis.from_url(url)
                try:
                    assert await client.dbsize() > 0
                    await client.flushall()
                finally:
                    await client.aclose()
                await wait_for(lambda: _some_state(env, "collected"), 30)
                # Redis goes away for a while, then comes back empty on the same port
                first.kill()
                first.wait(5)
                await asyncio.sleep(1.5)
                assert not worker.done()
                with redis_server(port):
                    await wait_for(lambda: _all_settled(env), 60)
                    assert not worker.done()
        await settled_once(env, ids)


async def wait_for(check: Any, timeout_s: float, *, every_s: float = 0.05) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(every_s)


async def _settled_at_least(env: Env, n: int) -> bool:
    return len(await env.ledger()) >= n


async def _some_state(env: Env, *states: str) -> bool:
    return any(b["state"] in states for b in await env.batches())


async def _all_settled(env: Env) -> bool:
    return all(r["state"] in ("succeeded", "failed", "cancelled") for r in (await env.jobs()).values())


# ---------------------------------------------------------------------------------------- one SQLite worker


async def test_second_worker_on_sqlite_is_refused(sqlite_url: str, redis_url: str) -> None:
    settings = Settings(database_url=sqlite_url, redis_url=redis_url, tick_s=1, openai_api_key=SecretStr("k"))
    first = asyncio.create_task(run_worker(settings))
    try:
        lock = WorkerLock(sqlite_url)
        assert lock.path is not None
        await wait_for(lambda: _holds(lock.path), 20)
        with pytest.raises(ConfigError, match="SQLite supports a single worker") as info:
            await asyncio.wait_for(run_worker(settings, burst=True), 20)
        assert f"pid {os.getpid()}" in str(info.value) and "PostgreSQL" in str(info.value)
    finally:
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
    # the lock went with the first worker: a new one starts
    await asyncio.wait_for(run_worker(settings, burst=True), 20)


async def test_a_burst_run_is_not_held_up_by_tasks_scheduled_for_later(sqlite_url: str, redis_url: str) -> None:
    """Another worker's task due in an hour sits in arq's shared queue; a burst run with nothing to do still ends."""
    from arq.connections import RedisSettings, create_pool

    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        assert await pool.enqueue_job("tick", _job_id="later", _defer_by=3600) is not None
        await asyncio.wait_for(
            run_worker(
                Settings(database_url=sqlite_url, redis_url=redis_url, openai_api_key=SecretStr("k")), burst=True
            ),
            30,
        )
        assert await pool.zcard(pool.default_queue_name) == 1  # left for the worker it belongs to
    finally:
        await pool.aclose()


async def _holds(path: Path) -> bool:
    return await asyncio.to_thread(lambda: path.exists() and path.read_text().strip() == str(os.getpid()))


async def test_several_workers_on_postgresql_are_fine(pg_url: str) -> None:
    locks = [WorkerLock(pg_url), WorkerLock(pg_url)]
    for lock in locks:
        lock.acquire()
        assert lock.path is None
    for lock in locks:
        lock.release()


def test_worker_lock_is_released_with_its_process(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"
    code = (
        "import os, sys; from batcher.recovery import WorkerLock; "
        f"WorkerLock({url!r}).acquire(); print('held', flush=True); os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert "held" in proc.stdout and proc.returncode == -9
    with WorkerLock(url) as lock:  # a SIGKILLed worker never blocks the next
        assert lock.path is not None and lock.path.exists()
