"""arq task functions: thin shells that take ids, call the pipeline, and return.

Every task may run twice (a worker killed mid-task, Redis flushed and the tick re-deriving work): the
pipeline's claims and state guards make the second run a no-op. Task ids are deterministic per due occasion and
lease period (``poll_batch:<batch id>:<due key>:<period>``…), so a tick does not queue a second copy of work still
waiting to run. A worker killed after arq handed it a task keeps that task's id "in progress" for the task's whole
timeout (up to an hour); the id changes when the batch's row does (its due key: state, next poll, lease) and in
any case with the next lease period, so the work is queued again within a lease.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from arq import ArqRedis

from batcher.config import Settings
from batcher.db import migrate
from batcher.db.engine import Database
from batcher.errors import ConfigError
from batcher.lifecycle import Pipeline
from batcher.providers.registry import accounts, build_adapters, close_adapters, keyless_accounts
from batcher.recovery import WorkerLock
from batcher.tenants import prepare_secrets
from batcher.timeutil import utcnow

logger = logging.getLogger(__name__)

Ctx = dict[str, Any]

#: the Redis key (per account) that spaces recovery sweeps across all workers; losing it only means an early sweep
RECOVERY_KEY = "batcher:recovery:{account}"


async def startup(ctx: Ctx) -> None:
    """Open the database and the provider clients; build the pipeline (unless the caller gave one).

    On SQLite, take the one-worker lock first.

    Raises:
        ConfigError: another worker already runs on this SQLite database; no provider account has an API key; the
            database has tenants but this worker has no key for their webhook secrets.
    """
    given: Pipeline | None = ctx.get("pipeline")
    settings: Settings = ctx.get("settings") or (given.settings if given is not None else Settings())
    keyless = {} if given is not None else keyless_accounts(settings)
    if keyless and len(keyless) == len(accounts(settings)):
        raise ConfigError(
            "no provider account has an API key: set "
            + " or ".join(sorted(set(keyless.values())))
            + " (any value works against the emulator)"
        )
    lock = WorkerLock(given.db.url if given is not None else settings.database_url)
    lock.acquire()
    ctx["worker_lock"] = lock
    if given is not None:
        return
    db = Database(settings.database_url)
    try:
        await migrate.upgrade(db.engine)
        # webhooks are signed with the tenants' sealed secrets: without the key (PostgreSQL, BATCHER_SECRET_KEY
        # unset) a database that has tenants is refused here, one without needs none
        await prepare_secrets(db, settings, required=False)
    except BaseException:
        await db.aclose()
        lock.release()
        raise
    # an account without a key would fail every batch (and use up its jobs' attempts): its jobs stay queued
    # for a worker that has one
    for name, variable in sorted(keyless.items()):
        logger.warning("account %s has no API key (%s): this worker leaves its jobs queued", name, variable)
    adapters = {name: adapter for name, adapter in build_adapters(settings).items() if name not in keyless}
    ctx["pipeline"] = Pipeline(db, settings, adapters)
    ctx["owns_pipeline"] = True


async def shutdown(ctx: Ctx) -> None:
    if ctx.pop("owns_pipeline", False):
        pipeline: Pipeline = ctx.pop("pipeline")
        await close_adapters(pipeline.adapters)
        await pipeline.db.aclose()
    lock: WorkerLock | None = ctx.pop("worker_lock", None)
    if lock is not None:
        lock.release()


def lease_period(pipeline: Pipeline, now: datetime) -> int:
    """The number of the lease-long period ``now`` falls in (part of task ids; see the module docstring)."""
    settings = pipeline.settings
    return int(now.timestamp() // max(settings.lease_s, settings.tick_s))


async def enqueue_due(pipeline: Pipeline, redis: ArqRedis, now: datetime | None = None) -> int:
    """Queue a task for every batch whose next step is due; returns how many were queued now."""
    now = now or utcnow()
    due = await pipeline.due(now)
    period = lease_period(pipeline, now)
    queued = 0
    for name, ids in (("submit_batch", due.submit), ("poll_batch", due.poll), ("collect_batch", due.collect)):
        for batch_id in ids:
            task_id = f"{name}:{batch_id}:{due.keys.get(batch_id, '')}:{period}"
            queued += await redis.enqueue_job(name, batch_id, _job_id=task_id) is not None
    return queued


async def tick(ctx: Ctx) -> int:
    """The cron tick: enforce deadlines, pack what is due, then queue the tasks of due batches, real-time
    fallbacks and (every ``recovery_interval_s``) recovery sweeps.

    All scheduling is re-derived from the database each time, so a flushed Redis loses nothing.
    """
    pipeline: Pipeline = ctx["pipeline"]
    redis: ArqRedis = ctx["redis"]
    now = utcnow()
    late = await pipeline.sweep_deadlines(now)
    await pipeline.pack(now, force=bool(ctx.get("force_pack")))
    queued = await enqueue_due(pipeline, redis, now)
    settings = pipeline.settings
    # one fallback task per account per lease period at most; a dead worker's holds its id only that long
    period = lease_period(pipeline, now)
    for account in late:
        job = await redis.enqueue_job("run_fallback", account, _job_id=f"run_fallback:{account}:{period}")
        queued += job is not None
    for account in sorted(pipeline.adapters):
        key = RECOVERY_KEY.format(account=account)
        if await redis.set(key, pipeline.owner, nx=True, ex=max(1, int(settings.recovery_interval_s))):
            job = await redis.enqueue_job("recover_account", account, _job_id=f"recover_account:{account}:{period}")
            queued += job is not None
    return queued


async def submit_batch(ctx: Ctx, batch_id: str) -> None:
    await ctx["pipeline"].submit(batch_id, utcnow())


async def poll_batch(ctx: Ctx, batch_id: str) -> None:
    await ctx["pipeline"].poll(batch_id, utcnow())


async def collect_batch(ctx: Ctx, batch_id: str) -> None:
    await ctx["pipeline"].collect(batch_id, utcnow())


async def run_fallback(ctx: Ctx, account: str) -> None:
    await ctx["pipeline"].run_fallback(account, utcnow())


async def recover_account(ctx: Ctx, account: str) -> None:
    await ctx["pipeline"].recover(account, utcnow())
