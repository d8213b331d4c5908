"""A pipeline against an in-process provider emulator whose knobs the test can turn while it runs.

Shared by the fault, recovery and deadline tests. ``emulated()`` serves the emulator app on a free port and keeps
its :class:`~batcher.emulator.state.EmulatorState` at hand (``env.emu``): a test flips ``env.emu.settings.…`` to
start or stop a fault. ``Env.drive()`` runs the pipeline's steps in a loop, in real time, without Redis (what the
tick and the tasks do, in one process); ``Env.burst()`` runs the real arq worker in burst mode.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from pydantic import SecretStr

from batcher.config import Settings
from batcher.db import migrate
from batcher.db.engine import Database
from batcher.db.tables import batches, jobs, ledger, pauses
from batcher.domain import JobSpec, Provider
from batcher.emulator import EmulatorSettings, create_app
from batcher.emulator.http import STATE_KEY
from batcher.emulator.state import EmulatorState
from batcher.intake import enqueue_specs
from batcher.lifecycle import Pipeline
from batcher.providers.anthropic import AnthropicAdapter
from batcher.providers.base import BatchStatus, Outcome, ProviderAdapter, UploadedFile
from batcher.providers.limits import ANTHROPIC_LIMITS, OPENAI_LIMITS
from batcher.providers.openai import OpenAIAdapter
from batcher.timeutil import utcnow
from workers.settings import run_worker

MODELS = {Provider.OPENAI: "gpt-4o-mini", Provider.ANTHROPIC: "claude-haiku-4-5"}
ENDPOINTS = {Provider.OPENAI: "/v1/chat/completions", Provider.ANTHROPIC: "/v1/messages"}

_ids = itertools.count()


def body(provider: Provider, model: str, i: int) -> dict[str, Any]:
    text = f"question number {i} " + "word " * (i % 5)
    if provider is Provider.ANTHROPIC:
        return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": text}]}
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16}


@dataclass
class Env:
    db: Database
    settings: Settings
    pipeline: Pipeline
    adapter: ProviderAdapter
    emu: EmulatorState
    base_url: str
    provider: Provider
    account: str
    #: added to the real time by :meth:`step` (a test that jumped past a lease keeps its clock there)
    offset: timedelta = timedelta(0)

    @property
    def model(self) -> str:
        return MODELS[self.provider]

    def worker(self, owner: str, adapter: ProviderAdapter | None = None, **over: Any) -> Pipeline:
        """Another worker's pipeline on the same database and provider (its own adapter, if given)."""
        settings = self.settings.model_copy(update=over) if over else self.settings
        served = adapter if adapter is not None else self.adapter
        return Pipeline(self.db, settings, {self.account: served}, owner=owner, work_dir=self.pipeline.work_dir)

    async def enqueue(
        self, n: int, *, run: str = "r", not_after: datetime | None = None, model: str | None = None
    ) -> list[str]:
        model = model or self.model
        specs = []
        for _ in range(n):
            i = next(_ids)
            specs.append(
                JobSpec(
                    provider=self.provider,
                    account=self.account,
                    endpoint=ENDPOINTS[self.provider],
                    model=model,
                    custom_id=f"c{i}",
                    body=body(self.provider, model, i),
                    run=run,
                    not_after=not_after,
                )
            )
        return await enqueue_specs(self.db, specs)

    async def jobs(self) -> dict[str, dict[str, Any]]:
        async with self.db.engine.connect() as conn:
            return {r["id"]: dict(r) for r in (await conn.execute(sa.select(jobs))).mappings()}

    async def batches(self) -> list[dict[str, Any]]:
        async with self.db.engine.connect() as conn:
            query = sa.select(batches).order_by(batches.c.created_at, batches.c.id)
            return [dict(r) for r in (await conn.execute(query)).mappings()]

    async def batch(self, batch_id: str) -> dict[str, Any]:
        async with self.db.engine.connect() as conn:
            return dict((await conn.execute(sa.select(batches).where(batches.c.id == batch_id))).mappings().one())

    async def ledger(self) -> list[dict[str, Any]]:
        async with self.db.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(sa.select(ledger))).mappings()]

    async def pauses(self) -> list[dict[str, Any]]:
        async with self.db.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(sa.select(pauses))).mappings()]

    async def stats(self) -> dict[str, Any]:
        import time

        await self.emu.advance(time.time())
        return self.emu.stats()

    async def step(self, now: datetime | None = None) -> None:
        """One round of what the tick and the tasks do: deadlines, pack (forced), every due step, fallbacks."""
        p = self.pipeline

        def clock() -> datetime:
            return utcnow() + self.offset

        now = now or clock()
        late = await p.sweep_deadlines(now)
        await p.pack(now, force=True)
        due = await p.due(now)
        for batch_id in due.submit:
            await p.submit(batch_id, clock())
        for batch_id in due.poll:
            await p.poll(batch_id, clock())
        for batch_id in due.collect:
            await p.collect(batch_id, clock())
        for account in late:
            await p.run_fallback(account, clock())

    async def drive(self, timeout_s: float = 60, *, until: Callable[[], Any] | None = None) -> None:
        """Step in real time until nothing is pending (or ``until()`` is true)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            await self.step()
            if until is not None:
                if await until():
                    return
            elif not await self.pipeline.pending():
                return
            assert loop.time() < deadline, "the pipeline did not finish in time"
            await asyncio.sleep(0.02)

    async def burst(self, timeout_s: float = 60) -> None:
        await asyncio.wait_for(run_worker(self.settings, burst=True, pipeline=self.pipeline), timeout_s)


@asynccontextmanager
async def serve(emulator: EmulatorSettings) -> AsyncIterator[tuple[str, EmulatorState]]:
    """The emulator app on a free port: its ``/v1`` base URL and its state."""
    app = create_app(emulator)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        yield f"http://127.0.0.1:{port}/v1", app[STATE_KEY]
    finally:
        await runner.cleanup()


@asynccontextmanager
async def emulated(
    db_url: str,
    data_dir: Path,
    *,
    provider: Provider = Provider.OPENAI,
    emulator: EmulatorSettings | None = None,
    max_requests: int | None = None,
    max_retries: int = 0,
    redis_url: str | None = None,
    work_dir: Path | None = None,
    rand: Callable[[], float] | None = None,
    wrap: Callable[[ProviderAdapter], ProviderAdapter] | None = None,
    **over: Any,
) -> AsyncIterator[Env]:
    """A migrated database, the emulator, one adapter (SDK retries off by default) and a pipeline over them."""
    emu_settings = (emulator or EmulatorSettings(latency_s=0.2)).model_copy(update={"data_dir": data_dir})
    async with serve(emu_settings) as (base_url, state):
        account = provider.value
        values: dict[str, Any] = {
            "database_url": db_url,
            "redis_url": redis_url,
            "openai_base_url": base_url,
            "openai_api_key": SecretStr("test-key"),
            "anthropic_base_url": base_url,
            "anthropic_api_key": SecretStr("test-key"),
            "poll_min_s": 0.05,
            "poll_max_s": 0.2,
            "lease_s": 30.0,
            "tick_s": 1,
            "token_limit_pause_s": 0.3,
        }
        values.update(over)
        settings = Settings(**values)
        db = Database(db_url)
        await migrate.upgrade(db.engine)
        adapter: ProviderAdapter
        if provider is Provider.ANTHROPIC:
            limits = ANTHROPIC_LIMITS if max_requests is None else replace(ANTHROPIC_LIMITS, max_requests=max_requests)
            adapter = AnthropicAdapter(
                account, api_key="test-key", base_url=base_url, limits=limits, max_retries=max_retries
            )
        else:
            limits = OPENAI_LIMITS if max_requests is None else replace(OPENAI_LIMITS, max_requests=max_requests)
            adapter = OpenAIAdapter(
                account, api_key="test-key", base_url=base_url, limits=limits, max_retries=max_retries
            )
        served = wrap(adapter) if wrap is not None else adapter
        kwargs: dict[str, Any] = {}
        if work_dir is not None:
            kwargs["work_dir"] = work_dir
        if rand is not None:
            kwargs["rand"] = rand
        pipeline = Pipeline(db, settings, {account: served}, owner="w1", **kwargs)
        try:
            yield Env(db, settings, pipeline, served, state, base_url, provider, account)
        finally:
            await adapter.aclose()
            await db.aclose()


class WorkerDied(Exception):
    """Stands for a worker killed at a line (not a ProviderError: nothing in the pipeline catches it)."""


class Interrupting(ProviderAdapter):
    """Delegates to a real adapter, and "kills the worker" (raises :class:`WorkerDied`) at a chosen point once.

    Attributes:
        die: ``"after_upload"``, ``"before_create"``, ``"after_create"`` or ``"mid_results"`` (after
            ``results_before_death`` outcomes); ``None`` once it has fired.
        gate: when set, create waits for it first (a slow call), after setting ``entered``.
    """

    def __init__(self, inner: ProviderAdapter, die: str | None = None, *, results_before_death: int = 0) -> None:
        super().__init__(inner.account, inner.limits)
        self.kind = inner.kind
        self.inner = inner
        self.die = die
        self.results_before_death = results_before_death
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    def _fire(self, point: str) -> None:
        if self.die == point:
            self.die = None
            raise WorkerDied(point)

    def encode_line(self, custom_id: str, endpoint: str, body_json: str) -> bytes:
        return self.inner.encode_line(custom_id, endpoint, body_json)

    async def upload(self, path: Path) -> str | None:
        file_id = await self.inner.upload(path)
        self._fire("after_upload")
        return file_id

    async def create(
        self, *, batch_id: str, endpoint: str, model: str, input_file_id: str | None, path: Path
    ) -> BatchStatus:
        self._fire("before_create")
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        status = await self.inner.create(
            batch_id=batch_id, endpoint=endpoint, model=model, input_file_id=input_file_id, path=path
        )
        self._fire("after_create")
        return status

    async def retrieve(self, provider_batch_id: str) -> BatchStatus:
        return await self.inner.retrieve(provider_batch_id)

    async def results(self, status: BatchStatus) -> AsyncIterator[Outcome]:
        sent = 0
        async for outcome in self.inner.results(status):
            if self.die == "mid_results" and sent >= self.results_before_death:
                self._fire("mid_results")
            sent += 1
            yield outcome

    async def cancel(self, provider_batch_id: str) -> BatchStatus:
        return await self.inner.cancel(provider_batch_id)

    async def find_batch(self, batch_id: str) -> BatchStatus | None:
        return await self.inner.find_batch(batch_id)

    async def find_batch_candidates(self, created_after: datetime, request_count: int) -> list[BatchStatus]:
        return await self.inner.find_batch_candidates(created_after, request_count)

    async def recent_batches(self) -> list[tuple[str | None, BatchStatus]]:
        return await self.inner.recent_batches()

    async def list_uploads(self) -> list[UploadedFile]:
        return await self.inner.list_uploads()

    async def delete_file(self, file_id: str) -> None:
        await self.inner.delete_file(file_id)

    async def run_realtime(
        self, custom_id: str, endpoint: str, body_json: str, *, attempt: int | None = None
    ) -> Outcome:
        return await self.inner.run_realtime(custom_id, endpoint, body_json, attempt=attempt)
