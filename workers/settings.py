"""arq wiring: the task functions, the cron tick, and a runner for ``batcher worker``.

arq is imported only in this package. Long waits never become deferred queue messages: a batch's next
poll lives in its row (``next_poll_at``) and the tick, every few seconds, queues what is due.

The runner survives Redis going away (a restart, a failover): the worker loop is started again once Redis
answers, and the tick re-derives every task from the database. On SIGTERM (or SIGINT) it stops taking tasks,
lets running ones finish for ``shutdown_grace_s``, then cancels the rest — each releases what it held (its
batch's lease, its real-time jobs) on the way out — and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from typing import Any

from arq import cron
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import default_queue_name
from arq.worker import Function, Worker, func
from redis.exceptions import RedisError

from batcher.config import Settings
from batcher.embedded import EmbeddedRedis
from batcher.lifecycle import Pipeline
from batcher.timeutil import utcnow
from workers import tasks
from workers.webhooks import webhook_crons

logger = logging.getLogger(__name__)

#: results are not kept, so a task id is free again as soon as its task is done
FUNCTIONS: list[Function] = [
    func(tasks.submit_batch, name="submit_batch", keep_result=0, max_tries=3),
    func(tasks.poll_batch, name="poll_batch", keep_result=0, max_tries=3),
    func(tasks.collect_batch, name="collect_batch", keep_result=0, max_tries=3, timeout=3600),
    func(tasks.run_fallback, name="run_fallback", keep_result=0, max_tries=3, timeout=1800),
    func(tasks.recover_account, name="recover_account", keep_result=0, max_tries=1, timeout=600),
]

#: seconds a stopping worker waits for its cancelled tasks to release what they hold
RELEASE_WAIT_S = 2.0
#: the arq queue of ``batcher worker --burst``
BURST_QUEUE = "batcher:burst"


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
        ),
        *webhook_crons(settings),
    ]


async def run_worker(settings: Settings, *, burst: bool = False, pipeline: Pipeline | None = None) -> None:
    """Run the worker until stopped (SIGTERM, SIGINT, or the caller cancelling it), or in burst mode until no
    work is left.

    With ``settings.redis_url`` unset a private embedded redis-server is started and stopped around it.

    Args:
        settings: configuration.
        burst: pack every queued group at once and return when nothing is left to do.
        pipeline: use this pipeline (tests, the demo) instead of building one from settings.

    Raises:
        ConfigError: e.g. a second worker on one SQLite database.
    """
    async with contextlib.AsyncExitStack() as stack:
        url = settings.redis_url
        if url is None:
            url = (await stack.enter_async_context(EmbeddedRedis())).url
            assert url is not None
        # a burst run has a queue of its own: it ends when that queue is empty, which tasks a long-running
        # worker scheduled for later (its cron, retries) in the shared queue would otherwise put off
        queue = BURST_QUEUE if burst else default_queue_name
        pool = await create_pool(RedisSettings.from_dsn(url), default_queue_name=queue)
        stack.push_async_callback(pool.aclose)
        ctx: dict[str, Any] = {"settings": settings, "redis": pool}
        if pipeline is not None:
            ctx["pipeline"] = pipeline
        await tasks.startup(ctx)
        stack.push_async_callback(tasks.shutdown, ctx)
        runner = _Runner(settings, ctx, pool)
        if burst:
            await runner.burst()
        else:
            await runner.forever()


class _Runner:
    """Runs arq workers one after another: again after Redis was lost, and not again after a stop signal."""

    def __init__(self, settings: Settings, ctx: dict[str, Any], pool: ArqRedis) -> None:
        self.settings = settings
        self.ctx = ctx
        self.pool = pool
        self.stopping = asyncio.Event()

    def _worker(self, **kwargs: Any) -> Worker:
        worker = Worker(
            functions=FUNCTIONS,
            redis_pool=self.pool,
            queue_name=self.pool.default_queue_name,
            ctx=self.ctx,
            handle_signals=True,
            # SIGTERM/SIGINT: stop picking tasks, let running ones finish this long, then cancel them
            job_completion_wait=max(1, math.floor(self.settings.shutdown_grace_s)),
            max_jobs=16,
            keep_result=0,
            job_timeout=3600,
            **kwargs,
        )
        worker.on_stop = self._on_stop
        return worker

    def _on_stop(self, sig: signal.Signals) -> None:
        logger.info("worker stopping on %s", sig.name)
        self.stopping.set()

    async def _run(self, worker: Worker) -> bool:
        """Run one arq worker; ``True`` to run another (Redis was lost), ``False`` when done or stopped."""
        try:
            await worker.async_run()
        except asyncio.CancelledError:
            if not self.stopping.is_set():
                # our caller cancelled us, not a signal: stop what runs, let it release, go on being cancelled
                for task in worker.tasks.values():
                    task.cancel()
                await _wait(worker)
                raise
            await _wait(worker)
            return False
        except (RedisError, OSError) as exc:
            for task in worker.tasks.values():
                # their work is done or given up in the database; arq's own bookkeeping may fail without Redis
                task.add_done_callback(_quietly)
            if self.stopping.is_set():
                return False
            logger.warning("lost Redis (%s); running tasks go on, the worker waits for it to come back", exc)
            await self._wait_for_redis()
            return not self.stopping.is_set()
        return False

    async def _wait_for_redis(self) -> None:
        """Until Redis answers again (or a stop signal), at least a moment: a Redis that answers PING but fails
        the worker's commands must not make the loop spin."""
        delay = 0.2
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            try:
                await self.pool.ping()
            except (RedisError, OSError):
                delay = min(delay * 2, 5.0)
                continue
            logger.info("Redis is back; the tick re-derives the queue from the database")
            return

    async def forever(self) -> None:
        while await self._run(self._worker(cron_jobs=cron_jobs(self.settings))):
            pass

    async def burst(self) -> None:
        pipeline: Pipeline = self.ctx["pipeline"]
        self.ctx["force_pack"] = True
        while not self.stopping.is_set():
            try:
                await tasks.tick(self.ctx)
            except (RedisError, OSError) as exc:
                logger.warning("tick failed (%s); waiting for Redis", exc)
                await self._wait_for_redis()
                continue
            if await self._run(self._worker(burst=True, poll_delay=0.05)):
                continue
            if self.stopping.is_set() or not await pipeline.pending():
                return
            wait_s = await pipeline.next_due_in(utcnow())
            await asyncio.sleep(min(max(wait_s if wait_s is not None else 0.5, 0.05), pipeline.settings.tick_s))


def _quietly(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.info("a task of the worker that lost Redis ended with %r", exc)


async def _wait(worker: Worker) -> None:
    running = [task for task in worker.tasks.values() if not task.done()]
    if running:
        await asyncio.wait(running, timeout=RELEASE_WAIT_S)
