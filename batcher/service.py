"""``batcher.Batcher``: the Python door in. Same code path as the CLI and the HTTP API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from batcher.config import Settings
from batcher.db import migrate, queries
from batcher.db.engine import Database
from batcher.db.tables import jobs
from batcher.domain import JOB_TERMINAL, BatchState, JobSpec, JobState, Provider
from batcher.errors import InvalidInput, NotFound
from batcher.export import ExportReport, ExportState, export_run
from batcher.intake import Defaults, IntakeResult, enqueue_specs, submit_file
from batcher.ledger import SavingsReport
from batcher.ledger import savings as ledger_savings
from batcher.lifecycle import CancelReport, Pipeline
from batcher.providers import registry
from batcher.providers.registry import build_adapters, close_adapters
from batcher.timeutil import utcnow

logger = logging.getLogger(__name__)


class Batcher:
    """Enqueue requests and read their outcome.

    Use as ``async with Batcher(settings) as b: ...``. On entry the database is migrated to the
    current schema (set ``migrate=False`` where migrations are run separately).

    Args:
        settings: configuration (default: from the environment).
        migrate: apply migrations on entry.
    """

    def __init__(self, settings: Settings | None = None, *, migrate: bool = True) -> None:
        self.settings = settings or Settings()
        self._migrate = migrate
        self._db: Database | None = None

    @property
    def db(self) -> Database:
        if self._db is None:
            raise RuntimeError("use Batcher as an async context manager")
        return self._db

    async def __aenter__(self) -> Self:
        self._db = Database(self.settings.database_url)
        if self._migrate:
            await migrate.upgrade(self._db.engine)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._db is not None:
            await self._db.aclose()
            self._db = None

    async def enqueue(
        self,
        *,
        provider: Provider | str,
        body: dict[str, Any],
        custom_id: str,
        endpoint: str | None = None,
        run: str = "default",
        account: str | None = None,
        tags: dict[str, str] | None = None,
        priority: int = 0,
        not_after: datetime | None = None,
    ) -> str:
        """Store one request; returns its job id (the existing one if ``custom_id`` is already in ``run``).

        Raises:
            InvalidInput: naming the field that is wrong.
        """
        spec = _spec(provider, body, custom_id, endpoint, run, account, tags, priority, not_after)
        return (await enqueue_specs(self.db, [spec]))[0]

    async def enqueue_many(self, specs: Iterable[JobSpec]) -> list[str]:
        """Store many requests in one transaction; all or nothing. Returns the job ids in order."""
        return await enqueue_specs(self.db, specs, chunk_size=self.settings.intake_chunk)

    async def submit_file(
        self,
        path: str | Path,
        *,
        provider: Provider | str,
        run: str = "default",
        account: str | None = None,
        tags: dict[str, str] | None = None,
        priority: int = 0,
        not_after: datetime | None = None,
        rejects_path: str | Path | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> IntakeResult:
        """Store every request of a provider batch file (OpenAI or Anthropic input format).

        Raises:
            InvalidFile: some lines are invalid (named) and ``rejects_path`` was not given; nothing stored.
            ConfigError: ``account`` is not configured.
            InvalidInput: ``account`` speaks another provider's API.
        """
        provider = Provider(provider)
        name = account or provider.value
        acct = registry.account_settings(self.settings, name)
        if acct.kind is not provider:
            raise InvalidInput(f"account {name!r} speaks the {acct.kind.value} API, not {provider.value}")
        return await submit_file(
            self.db,
            Path(path),
            provider,
            Defaults(run, name, tags, priority, not_after),
            limits=registry.account_limits(acct),
            rejects_path=None if rejects_path is None else Path(rejects_path),
            chunk_size=self.settings.intake_chunk,
            progress=progress,
        )

    async def savings(
        self, *, run: str | None = None, since: datetime | None = None, by: str | None = None
    ) -> SavingsReport:
        """Actual cost next to the real-time equivalent, in total and per group (see ``batcher savings``).

        Raises:
            NotFound: ``run`` is given and has no jobs.
        """
        async with self.db.engine.connect() as conn:
            if run is not None:
                await _require_run(conn, run)
            return await ledger_savings(conn, run=run, since=since, by=by)

    async def get(self, job_id: str) -> queries.JobInfo:
        """One job, with its result. Raises :class:`NotFound`."""
        async with self.db.engine.connect() as conn:
            job = await queries.get_job(conn, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    async def wait(self, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0) -> queries.JobInfo:
        """Wait until the job is settled (succeeded, failed or cancelled) and return it.

        Raises:
            NotFound: no such job.
            TimeoutError: not settled within ``timeout_s``.
        """
        async with asyncio.timeout(timeout_s):
            while True:
                job = await self.get(job_id)
                if JobState(job.state) in JOB_TERMINAL:
                    return job
                await asyncio.sleep(poll_s)

    async def jobs(
        self, *, run: str | None = None, state: JobState | None = None, batch_id: str | None = None, limit: int = 50
    ) -> list[queries.JobInfo]:
        """Jobs, newest first. ``batch_id`` is our batch id or the provider's.

        Raises:
            NotFound: ``batch_id`` is given and names no batch.
        """
        async with self.db.engine.connect() as conn:
            if batch_id is not None and not await queries.resolve_batch_ids(conn, batch_id):
                raise NotFound(f"no batch {batch_id}")
            return await queries.list_jobs(conn, run=run, state=state, batch_id=batch_id, limit=limit)

    async def status(self, *, run: str | None = None) -> queries.StatusReport:
        """Job counts by state, overall and per run, and batch counts by state (of ``run``'s batches, if given).

        Raises:
            NotFound: ``run`` is given and has no jobs.
        """
        async with self.db.engine.connect() as conn:
            if run is not None:
                await _require_run(conn, run)
            return await queries.status(conn, run=run)

    async def batches(
        self,
        *,
        run: str | None = None,
        provider: Provider | str | None = None,
        state: BatchState | None = None,
        since: datetime | None = None,
        limit: int = 50,
    ) -> list[queries.BatchInfo]:
        """Provider batches, newest first, with their request counts and cost so far."""
        async with self.db.engine.connect() as conn:
            return await queries.list_batches(
                conn,
                run=run,
                provider=None if provider is None else Provider(provider).value,
                state=state,
                since=since,
                limit=limit,
            )

    async def batch(self, ref: str) -> queries.BatchDetail:
        """Everything about one batch, named by our id or the provider's batch id.

        Raises:
            NotFound: no batch has that id.
            InvalidInput: the provider id names batches of several accounts (use our id).
        """
        async with self.db.engine.connect() as conn:
            ids = await queries.resolve_batch_ids(conn, ref)
            if len(ids) > 1:
                raise InvalidInput(f"{ref} names {len(ids)} batches ({', '.join(ids)}); give one of these ids")
            detail = None if not ids else await queries.batch_detail(conn, ids[0])
        if detail is None:
            raise NotFound(f"no batch {ref}")
        return detail

    async def cancel_run(self, run: str) -> CancelReport:
        """Cancel a run: its queued jobs at once, and the provider batches that hold only its jobs.

        Batches shared with other runs keep running. Jobs of cancelled batches settle (``cancelled``, or
        ``succeeded`` where the provider finished them first) when a worker next collects.

        Raises:
            NotFound: the run has no jobs.
        """
        async with self.db.engine.connect() as conn:
            await _require_run(conn, run)
        adapters = build_adapters(self.settings)
        try:
            return await Pipeline(self.db, self.settings, adapters).cancel_run(run, utcnow())
        finally:
            await close_adapters(adapters)

    async def export(self, run: str, out: BinaryIO, *, state: ExportState | str = ExportState.ALL) -> ExportReport:
        """Write the run's settled jobs to ``out`` in the provider's batch output format, under the user's custom_ids.

        Raises:
            NotFound: the run has no jobs.
        """
        return await export_run(self.db, run, out, state=ExportState(state))


async def _require_run(conn: AsyncConnection, run: str) -> None:
    """Raise :class:`NotFound` unless ``run`` has at least one job."""
    if await conn.scalar(sa.select(jobs.c.id).where(jobs.c.run == run).limit(1)) is None:
        raise NotFound(f"no run {run!r} (no jobs in it)")


def _spec(
    provider: Provider | str,
    body: dict[str, Any],
    custom_id: str,
    endpoint: str | None,
    run: str,
    account: str | None,
    tags: dict[str, str] | None,
    priority: int,
    not_after: datetime | None,
) -> JobSpec:
    provider = Provider(provider)
    if endpoint is None:
        endpoint = "/v1/messages" if provider is Provider.ANTHROPIC else "/v1/chat/completions"
    model = body.get("model")
    return JobSpec(
        provider=provider,
        endpoint=endpoint,
        model=model if isinstance(model, str) else "",
        custom_id=custom_id,
        body=body,
        run=run,
        account=account,
        tags=tags or {},
        priority=priority,
        not_after=not_after,
    )
