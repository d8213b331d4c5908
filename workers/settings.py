"""arq wiring: the task functions, the cron tick, and a runner for ``batcher worker``.

arq is imported only in this package. Long waits never become deferred queue messages: a batch's next
poll lives in its row (``next_poll_at``) and the tick, every few seconds, queues what is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from arq import cron
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Function, Worker, func

from batcher.config import Settings
from batcher.embedded import EmbeddedRedis
from batcher.lifecycle import Pipeline
from batcher.timeutil import utcnow
from workers import tasks

logger = logging.getLogger(__name__)

#: results are not kept, so a task id is free again as soon as its task is done
FUNCTIONS: list[Function] = [
    func(tasks.submit_batch, name="submit_batch", keep_result=0, max_tries=3),
    func(tasks.poll_batch, name="poll_batch", keep_result=0, max_tries=3),
    func(tasks.collect_batch, name="collect_batch", keep_result=0, max_tries=3, timeout=3600),
]


def cron_jobs(settings: Settings) -> list[Any]:
    every = settings.tick_s
    return [
        cron(
            tasks.tick,
            name="tick",
            second=set(range(0, 60, every)),
            run_at_startup=True,
            keep_result=0,
            unique=True,
        )
    ]


async def run_worker(settings: Settings, *, burst: bool = False, pipeline: Pipeline | None = None) -> None:
    """Run the worker until stopped, or in burst mode until no work is left.

    With ``settings.redis_url`` unset a private embedded redis-server is started and stopped around it.

    Args:
        settings: configuration.
        burst: pack every queued group at once and return when nothing is left to do.
        pipeline: use this pipeline (tests, the demo) instead of building one from settings.
    """
    async with contextlib.AsyncExitStack() as stack:
        url = settings.redis_url
        if url is None:
            url = (await stack.enter_async_context(EmbeddedRedis())).url
            assert url is not None
        pool = await create_pool(RedisSettings.from_dsn(url))
        stack.push_async_callback(pool.aclose)
        ctx: dict[str, Any] = {"settings": settings, "redis": pool}
        if pipeline is not None:
            ctx["pipeline"] = pipeline
        await tasks.startup(ctx)
        stack.push_async_callback(tasks.shutdown, ctx)
        if burst:
            await _run_burst(ctx, pool)
        else:
            await _run_forever(settings, ctx, pool)


async def _run_burst(ctx: dict[str, Any], pool: ArqRedis) -> None:
    pipeline: Pipeline = ctx["pipeline"]
    ctx["force_pack"] = True
    while True:
        await tasks.tick(ctx)
        worker = Worker(
            functions=FUNCTIONS,
            redis_pool=pool,
            burst=True,
            ctx=ctx,
            handle_signals=False,
            poll_delay=0.05,
            max_jobs=16,
            keep_result=0,
            job_timeout=3600,
        )
        await worker.main()
        if not await pipeline.pending():
            return
        wait_s = await pipeline.next_due_in(utcnow())
        await asyncio.sleep(min(max(wait_s if wait_s is not None else 0.5, 0.05), pipeline.settings.tick_s))


async def _run_forever(settings: Settings, ctx: dict[str, Any], pool: ArqRedis) -> None:
    worker = Worker(
        functions=FUNCTIONS,
        cron_jobs=cron_jobs(settings),
        redis_pool=pool,
        ctx=ctx,
        handle_signals=True,
        max_jobs=16,
        keep_result=0,
        job_timeout=3600,
    )
    with contextlib.suppress(asyncio.CancelledError):
        await worker.async_run()
