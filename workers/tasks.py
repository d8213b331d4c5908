"""arq task functions: thin shells that take ids, call the pipeline, and return.

Every task may run twice (a worker killed mid-task, Redis flushed and the tick re-deriving work): the
pipeline's claims and state guards make the second run a no-op. Task ids are deterministic
(``submit:<batch id>``…), so a tick never queues a second copy of work still waiting to run.
"""

from __future__ import annotations

import logging
from typing import Any

from arq import ArqRedis

from batcher.config import Settings
from batcher.db import migrate
from batcher.db.engine import Database
from batcher.lifecycle import Pipeline
from batcher.providers.registry import build_adapters, close_adapters
from batcher.timeutil import utcnow

logger = logging.getLogger(__name__)

Ctx = dict[str, Any]


async def startup(ctx: Ctx) -> None:
    """Open the database and the provider clients; build the pipeline (unless the caller gave one)."""
    if "pipeline" in ctx:
        return
    settings: Settings = ctx.get("settings") or Settings()
    db = Database(settings.database_url)
    await migrate.upgrade(db.engine)
    adapters = build_adapters(settings)
    ctx["pipeline"] = Pipeline(db, settings, adapters)
    ctx["owns_pipeline"] = True


async def shutdown(ctx: Ctx) -> None:
    if ctx.pop("owns_pipeline", False):
        pipeline: Pipeline = ctx.pop("pipeline")
        await close_adapters(pipeline.adapters)
        await pipeline.db.aclose()


async def enqueue_due(pipeline: Pipeline, redis: ArqRedis) -> int:
    """Queue a task for every batch whose next step is due; returns how many were queued now."""
    due = await pipeline.due(utcnow())
    queued = 0
    for name, ids in (("submit_batch", due.submit), ("poll_batch", due.poll), ("collect_batch", due.collect)):
        for batch_id in ids:
            job = await redis.enqueue_job(name, batch_id, _job_id=f"{name}:{batch_id}")
            queued += job is not None
    return queued


async def tick(ctx: Ctx) -> int:
    """The cron tick: pack what is due, then queue submit/poll/collect tasks for due batches.

    All scheduling is re-derived from the database each time, so a flushed Redis loses nothing.
    """
    pipeline: Pipeline = ctx["pipeline"]
    await pipeline.pack(utcnow(), force=bool(ctx.get("force_pack")))
    return await enqueue_due(pipeline, ctx["redis"])


async def submit_batch(ctx: Ctx, batch_id: str) -> None:
    await ctx["pipeline"].submit(batch_id, utcnow())


async def poll_batch(ctx: Ctx, batch_id: str) -> None:
    await ctx["pipeline"].poll(batch_id, utcnow())


async def collect_batch(ctx: Ctx, batch_id: str) -> None:
    await ctx["pipeline"].collect(batch_id, utcnow())
