"""The batch lifecycle: pack, submit, poll, collect, cancel — driving provider adapters and the database.

Every step follows one pattern: claim rows in a short transaction (a state change or a lease in the
row), commit, do the network call with no session open, then record the outcome in one transaction
whose ``UPDATE … WHERE state IN (…)`` guards decide any race. A worker killed at any line leaves rows
another worker can finish: an ``open`` batch is submitted again, a ``submitting`` batch whose lease ran
out is first looked up at the provider (our batch id travels in its metadata), a batch half collected is
collected again and the already-settled jobs are skipped by their state guard.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from batcher.config import Settings
from batcher.db.engine import Database
from batcher.db.tables import batches, jobs, pauses
from batcher.domain import (
    BATCH_AT_PROVIDER,
    BATCH_TO_COLLECT,
    BATCH_TRANSITIONS,
    BatchState,
    JobState,
    new_id,
    state_values,
)
from batcher.errors import ConfigError, NotFound, ProviderError
from batcher.ledger import entries_from_batch, entry_params
from batcher.packer import FlushReason, GroupKey, GroupStats, flush_reason, next_poll_interval, pause_backoff, split
from batcher.pricing import ZERO_COST, PriceBook, load_overrides, normalize_usage
from batcher.providers import registry
from batcher.providers.base import BatchStatus, Outcome, OutcomeKind, ProviderAdapter
from batcher.timeutil import utcnow

logger = logging.getLogger(__name__)

#: ids per ``IN (…)`` list: well under SQLite's 32,766 bound variables
ID_CHUNK = 5000
TOKEN_LIMIT = "token_limit_exceeded"


@dataclass
class Due:
    """Work whose time has come, by kind (batch ids)."""

    submit: list[str] = field(default_factory=list)
    poll: list[str] = field(default_factory=list)
    collect: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.submit or self.poll or self.collect)


@dataclass
class CollectReport:
    """What collecting one batch did (job counts read back from the database once it is done)."""

    succeeded: int = 0
    failed: int = 0
    requeued: int = 0
    cancelled: int = 0
    #: requests the provider reported expired (requeued or failed)
    expired: int = 0
    #: result lines read
    results: int = 0
    #: jobs with no result line at all (requeued or failed as ``missing_result``)
    missing: int = 0


@dataclass
class CancelReport:
    jobs_cancelled: int = 0
    batches_cancelled: int = 0
    #: provider batches left running because they also hold other runs' jobs
    batches_shared: int = 0


def _ids(chunked: Sequence[str]) -> list[list[str]]:
    return [list(chunked[i : i + ID_CHUNK]) for i in range(0, len(chunked), ID_CHUNK)]


class Pipeline:
    """Moves jobs through batches for a set of provider accounts.

    Args:
        db: the database.
        settings: timing, attempts and limits.
        adapters: provider adapters by account name.
        owner: this worker's name, written into leases.
        work_dir: where batch input files are written before upload (default: the system temp dir).
        clock: the current time, for leases renewed during long steps.
        prices: the price book for ledger entries (default: genai-prices with the settings' discounts and
            overrides).
    """

    def __init__(
        self,
        db: Database,
        settings: Settings,
        adapters: Mapping[str, ProviderAdapter],
        *,
        owner: str | None = None,
        work_dir: Path | None = None,
        clock: Callable[[], datetime] = utcnow,
        prices: PriceBook | None = None,
    ) -> None:
        self.clock = clock
        self.prices = prices or PriceBook(registry.discounts(settings), load_overrides(settings.price_overrides_file))
        self._price_providers: dict[str, str] = {}
        self.db = db
        self.settings = settings
        self.adapters = dict(adapters)
        self.owner = owner or f"worker-{new_id()[-8:]}"
        self.work_dir = work_dir or Path(tempfile.gettempdir())

    def adapter(self, account: str) -> ProviderAdapter:
        try:
            return self.adapters[account]
        except KeyError:
            raise NotFound(f"no provider account {account!r} is configured") from None

    def price_provider(self, account: str) -> str:
        """Whose price list applies to an account (a configured one's, else its adapter's kind)."""
        if account not in self._price_providers:
            try:
                found = registry.price_provider(account, registry.account_settings(self.settings, account))
            except ConfigError:
                found = self.adapter(account).kind.value
            self._price_providers[account] = found
        return self._price_providers[account]

    def _lease_until(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.settings.lease_s)

    # ------------------------------------------------------------------ pack

    async def pack(self, now: datetime, *, force: bool = False) -> list[str]:
        """Turn due groups of queued jobs into ``open`` batches; returns the new batch ids."""
        created: list[str] = []
        async with self.db.engine.connect() as conn:
            groups = await self._queued_groups(conn, now)
        for stats in groups:
            adapter = self.adapters.get(stats.key.account)
            if adapter is None:
                continue  # an account this worker does not serve
            reason = flush_reason(
                stats,
                adapter.limits,
                now,
                max_wait_s=self.settings.pack_max_wait_s,
                turnaround_s=self.settings.expected_turnaround_s,
                force=force,
            )
            if reason is None:
                continue
            # forced (burst mode) packs the remainder too; a full group otherwise leaves it waiting for company
            keep_partial = force or reason is not FlushReason.FULL
            try:
                created.extend(await self._pack_group(stats.key, adapter, now, keep_partial=keep_partial))
            except _RaceLost as exc:
                # rolled back; the group's rows are packed on a later tick. Other groups still go now.
                logger.info("%s; retrying next tick", exc)
        if created:
            logger.info("packed %d batch(es)", len(created))
        return created

    async def _queued_groups(self, conn: AsyncConnection, now: datetime) -> list[GroupStats]:
        paused = sa.select(pauses.c.account, pauses.c.model).where(pauses.c.until > now)
        paused_keys = {(a, m) for a, m in await conn.execute(paused)}
        query = (
            sa.select(
                jobs.c.provider,
                jobs.c.account,
                jobs.c.endpoint,
                jobs.c.model,
                sa.func.count(),
                sa.func.sum(jobs.c.body_bytes),
                sa.func.min(jobs.c.queued_at),
                sa.func.min(jobs.c.not_after),
            )
            .where(jobs.c.state == JobState.QUEUED.value)
            .group_by(jobs.c.provider, jobs.c.account, jobs.c.endpoint, jobs.c.model)
        )
        out = []
        for provider, account, endpoint, model, count, body_bytes, oldest, deadline in await conn.execute(query):
            if (account, model) in paused_keys:
                continue
            out.append(
                GroupStats(GroupKey(provider, account, endpoint, model), count, int(body_bytes), oldest, deadline)
            )
        return out

    async def _pack_group(
        self, key: GroupKey, adapter: ProviderAdapter, now: datetime, *, keep_partial: bool
    ) -> list[str]:
        limits = adapter.limits
        query = (
            sa.select(jobs.c.id, jobs.c.body_bytes)
            .where(
                jobs.c.state == JobState.QUEUED.value,
                jobs.c.account == key.account,
                jobs.c.endpoint == key.endpoint,
                jobs.c.model == key.model,
            )
            .order_by(jobs.c.priority.desc(), jobs.c.queued_at, jobs.c.id)
            # bounded: a group with a million queued jobs is packed a few batches per tick
            .limit(limits.max_requests * 2)
        )
        if not self.db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        created: list[str] = []
        async with self.db.engine.begin() as conn:
            rows = [(r[0], r[1]) for r in await conn.execute(query)]
            for chunk in split(rows, limits, keep_partial=keep_partial):
                batch_id = new_id()
                await conn.execute(
                    batches.insert().values(
                        id=batch_id,
                        provider=key.provider,
                        account=key.account,
                        endpoint=key.endpoint,
                        model=key.model,
                        state=BatchState.OPEN.value,
                        request_count=len(chunk),
                        bytes=0,
                        created_at=now,
                        updated_at=now,
                        next_poll_at=now,
                        poll_interval_s=self.settings.poll_min_s,
                    )
                )
                moved = 0
                for ids in _ids(chunk):
                    result = await conn.execute(
                        sa.update(jobs)
                        .where(jobs.c.id.in_(ids), jobs.c.state == JobState.QUEUED.value)
                        .values(state=JobState.PACKED.value, batch_id=batch_id, updated_at=now)
                    )
                    moved += result.rowcount
                if moved != len(chunk):
                    # another packer took some of these rows; roll the whole group back and retry next tick
                    raise _RaceLost(f"packing {key}: expected {len(chunk)} jobs, moved {moved}")
                created.append(batch_id)
        return created

    # ---------------------------------------------------------------- submit

    async def submit(self, batch_id: str, now: datetime) -> None:
        """Write the batch file, upload it and create the provider batch.

        The batch row is ``submitting`` under our lease before the provider is called; the provider batch
        carries our id in its metadata; its id is recorded right after create. A batch whose earlier
        submit died with its lease is first looked up at the provider, so it is never created twice.
        """
        claim = (
            sa.update(batches)
            .where(
                batches.c.id == batch_id,
                sa.or_(
                    sa.and_(
                        batches.c.state == BatchState.OPEN.value,
                        sa.or_(batches.c.next_poll_at.is_(None), batches.c.next_poll_at <= now),
                    ),
                    sa.and_(batches.c.state == BatchState.SUBMITTING.value, batches.c.lease_expires_at < now),
                ),
            )
            .values(
                state=BatchState.SUBMITTING.value,
                lease_owner=self.owner,
                lease_expires_at=self._lease_until(now),
                submit_attempts=batches.c.submit_attempts + 1,
                updated_at=now,
            )
        )
        async with self.db.engine.begin() as conn:
            if (await conn.execute(claim)).rowcount != 1:
                return
            row = dict((await conn.execute(sa.select(batches).where(batches.c.id == batch_id))).mappings().one())
        adapter = self.adapter(row["account"])
        path = self.work_dir / f"batcher-{batch_id}.jsonl"
        try:
            status = await self._submit_steps(row, adapter, path, now)
        except ProviderError as exc:
            await self._release_submit(batch_id, now, exc)
            return
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if status is None:
            await self._finish_empty(batch_id, now)
            return
        moved = await self._record_submitted(batch_id, status, now, adapter)
        if moved == 0:
            # every job was cancelled while the provider batch was being created: stop it there, nobody waits
            # for its results
            await self.cancel_batch(batch_id, now)

    async def _submit_steps(
        self, row: Mapping[str, Any], adapter: ProviderAdapter, path: Path, now: datetime
    ) -> BatchStatus | None:
        """Find (after a crash), or upload and create, the provider batch. ``None``: no jobs left in it."""
        batch_id = row["id"]
        if row["submit_attempts"] > 1:
            # an earlier submit died holding the lease: the provider may have the batch already
            found = await adapter.find_batch(batch_id)
            if found is not None:
                logger.warning("batch %s was created at the provider as %s but never recorded", batch_id, found)
                return found
        count, size = await self._write_file(batch_id, adapter, path)
        if count == 0:
            return None
        file_id = row["input_file_id"]
        if file_id is not None and count != row["request_count"]:
            # jobs left the batch (cancelled) since that file was uploaded by an earlier attempt: sending it
            # would run (and bill) them anyway. Upload the current file instead.
            logger.info("batch %s lost jobs since its upload; replacing file %s", batch_id, file_id)
            try:
                await adapter.delete_file(file_id)
            except ProviderError as exc:  # a stray file costs nothing; the batch goes on
                logger.warning("could not delete stale input file %s of batch %s: %s", file_id, batch_id, exc)
            file_id = None
        if file_id is None:
            file_id = await adapter.upload(path)
            async with self.db.engine.begin() as conn:
                await conn.execute(
                    sa.update(batches)
                    .where(batches.c.id == batch_id, batches.c.lease_owner == self.owner)
                    .values(input_file_id=file_id, bytes=size, request_count=count, updated_at=now)
                )
        return await adapter.create(
            batch_id=batch_id, endpoint=row["endpoint"], model=row["model"], input_file_id=file_id, path=path
        )

    async def _write_file(self, batch_id: str, adapter: ProviderAdapter, path: Path) -> tuple[int, int]:
        """Stream the batch's jobs into its input file; memory does not grow with the batch."""
        query = (
            sa.select(jobs.c.id, jobs.c.endpoint, jobs.c.body)
            .where(jobs.c.batch_id == batch_id, jobs.c.state == JobState.PACKED.value)
            .order_by(jobs.c.id)
            .execution_options(yield_per=2000)
        )
        count = size = 0
        async with self.db.engine.connect() as conn:
            result = await conn.stream(query)
            with path.open("wb") as fh:
                async for partition in result.partitions():
                    lines = b"".join(
                        adapter.encode_line(job_id, endpoint, body) for job_id, endpoint, body in partition
                    )
                    fh.write(lines)
                    count += len(partition)
                    size += len(lines)
        return count, size

    async def _finish_empty(self, batch_id: str, now: datetime) -> None:
        async with self.db.engine.begin() as conn:
            await conn.execute(
                sa.update(batches)
                .where(batches.c.id == batch_id, batches.c.state == BatchState.SUBMITTING.value)
                .values(state=BatchState.CANCELLED.value, lease_owner=None, lease_expires_at=None, updated_at=now)
            )

    async def _release_submit(self, batch_id: str, now: datetime, exc: ProviderError) -> None:
        """A submit step failed: back to ``open`` to retry later, or ``failed`` if the provider refused it."""
        values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
        if exc.retryable:
            delay = max(exc.retry_after_s or 0.0, self.settings.poll_min_s)
            values |= {"state": BatchState.OPEN.value, "next_poll_at": now + timedelta(seconds=delay)}
            logger.warning("submit of batch %s failed, retrying in %.0fs: %s", batch_id, delay, exc)
        else:
            values |= {
                "state": BatchState.FAILED.value,
                "errors": [{"code": "submit_failed", "message": str(exc), "line": None, "param": None}],
                "ended_at": now,
            }
            logger.error("provider refused batch %s: %s", batch_id, exc)
        async with self.db.engine.begin() as conn:
            await conn.execute(
                sa.update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.state == BatchState.SUBMITTING.value,
                    batches.c.lease_owner == self.owner,
                )
                .values(**values)
            )

    async def _record_submitted(
        self, batch_id: str, status: BatchStatus, now: datetime, adapter: ProviderAdapter
    ) -> int | None:
        """Record the provider batch and move the jobs to ``submitted``; returns how many moved.

        ``None``: the row left ``submitting`` first (our lease ran out and another worker took over). If it
        holds a provider batch other than ours, ours is an orphan nobody would collect, running the jobs a
        second time: it is cancelled at the provider.
        """
        state = status.state if status.state is not BatchState.OPEN else BatchState.VALIDATING
        async with self.db.engine.begin() as conn:
            result = await conn.execute(
                sa.update(batches)
                .where(batches.c.id == batch_id, batches.c.state == BatchState.SUBMITTING.value)
                .values(
                    state=state.value,
                    provider_state=status.provider_state,
                    provider_batch_id=status.provider_batch_id,
                    submitted_at=now,
                    next_poll_at=now + timedelta(seconds=self.settings.poll_min_s),
                    poll_interval_s=self.settings.poll_min_s,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                    **_status_values(status, now),
                )
            )
            if result.rowcount != 1:
                recorded = await conn.scalar(sa.select(batches.c.provider_batch_id).where(batches.c.id == batch_id))
            else:
                moved = await conn.execute(
                    sa.update(jobs)
                    .where(jobs.c.batch_id == batch_id, jobs.c.state == JobState.PACKED.value)
                    .values(state=JobState.SUBMITTED.value, attempts=jobs.c.attempts + 1, updated_at=now)
                )
        if result.rowcount != 1:
            logger.warning("batch %s left submitting before it was recorded", batch_id)
            if recorded != status.provider_batch_id:
                logger.warning("cancelling orphan provider batch %s of batch %s", status.provider_batch_id, batch_id)
                try:
                    await adapter.cancel(status.provider_batch_id)
                except ProviderError as exc:
                    logger.error("could not cancel orphan provider batch %s: %s", status.provider_batch_id, exc)
            return None
        logger.info("batch %s submitted as %s (%s)", batch_id, status.provider_batch_id, status.provider_state)
        return int(moved.rowcount)

    # ------------------------------------------------------------------ poll

    async def poll(self, batch_id: str, now: datetime) -> BatchState | None:
        """Ask the provider how a batch is doing and record it; returns the new state (``None``: not ours now)."""
        claimed = await self._claim(batch_id, now, BATCH_AT_PROVIDER, due_only=True)
        if claimed is None:
            return None
        adapter = self.adapter(claimed["account"])
        try:
            status = await adapter.retrieve(claimed["provider_batch_id"])
        except ProviderError as exc:
            delay = max(exc.retry_after_s or 0.0, claimed["poll_interval_s"])
            logger.warning("poll of batch %s failed, next in %.0fs: %s", batch_id, delay, exc)
            await self._release(batch_id, now, next_poll_at=now + timedelta(seconds=delay))
            return BatchState(claimed["state"])
        current = BatchState(claimed["state"])
        target = status.state
        if target is not current and target not in BATCH_TRANSITIONS[current]:
            logger.warning("batch %s: provider went %s → %s; keeping %s", batch_id, current, target, current)
            target = current
        interval = next_poll_interval(
            claimed["poll_interval_s"], min_s=self.settings.poll_min_s, max_s=self.settings.poll_max_s
        )
        values: dict[str, Any] = {
            "state": target.value,
            "provider_state": status.provider_state,
            "last_polled_at": now,
            "poll_interval_s": interval,
            "next_poll_at": now + timedelta(seconds=interval),
            "lease_owner": None,
            "lease_expires_at": None,
            "updated_at": now,
            **_status_values(status, now),
        }
        if target in BATCH_TO_COLLECT:
            values["ended_at"] = now
            values["next_poll_at"] = now
        async with self.db.engine.begin() as conn:
            await conn.execute(
                sa.update(batches)
                .where(batches.c.id == batch_id, batches.c.lease_owner == self.owner, batches.c.state == current.value)
                .values(**values)
            )
        return target

    async def _claim(
        self, batch_id: str, now: datetime, states: frozenset[BatchState], *, due_only: bool
    ) -> Mapping[str, Any] | None:
        conditions = [
            batches.c.id == batch_id,
            batches.c.state.in_(state_values(states)),
            sa.or_(batches.c.lease_owner.is_(None), batches.c.lease_expires_at < now),
        ]
        if due_only:
            conditions.append(sa.or_(batches.c.next_poll_at.is_(None), batches.c.next_poll_at <= now))
        async with self.db.engine.begin() as conn:
            result = await conn.execute(
                sa.update(batches)
                .where(*conditions)
                .values(lease_owner=self.owner, lease_expires_at=self._lease_until(now))
            )
            if result.rowcount != 1:
                return None
            return dict((await conn.execute(sa.select(batches).where(batches.c.id == batch_id))).mappings().one())

    async def _release(self, batch_id: str, now: datetime, **values: Any) -> None:
        async with self.db.engine.begin() as conn:
            await conn.execute(
                sa.update(batches)
                .where(batches.c.id == batch_id, batches.c.lease_owner == self.owner)
                .values(lease_owner=None, lease_expires_at=None, updated_at=now, **values)
            )

    # --------------------------------------------------------------- collect

    async def collect(self, batch_id: str, now: datetime) -> CollectReport | None:
        """Settle every job of an ended batch from its results, then mark the batch ``collected``.

        Results are streamed and settled in chunks; each job settles once (its ``state = 'submitted'``
        guard), so collecting again after a crash only finishes what is left.
        """
        claimed = await self._claim(batch_id, now, BATCH_TO_COLLECT, due_only=False)
        if claimed is None:
            return None
        state = BatchState(claimed["state"])
        report = CollectReport()
        errors = claimed["errors"] or []
        if state is BatchState.FAILED and any(e.get("code") == TOKEN_LIMIT for e in errors):
            await self._requeue_token_limited(claimed, now, report)
        elif state is BatchState.FAILED:
            await self._settle_failed_batch(claimed, now, report)
        elif claimed["provider_batch_id"] is None:
            # never reached the provider (every job was cancelled while it was open): no results to read
            await self._settle_leftovers(claimed, now, report)
        else:
            adapter = self.adapter(claimed["account"])
            try:
                await self._settle_results(claimed, adapter, now, report)
            except ProviderError as exc:
                if exc.retryable:
                    delay = max(exc.retry_after_s or 0.0, self.settings.poll_min_s)
                    logger.warning("collect of batch %s failed, retrying in %.0fs: %s", batch_id, delay, exc)
                    await self._release(batch_id, now, next_poll_at=now + timedelta(seconds=delay))
                    return None
                # the results cannot be read, now or later (e.g. the output file is gone): retrying would
                # keep the batch, and its jobs, stuck forever. What did not settle is treated as missing.
                logger.error("results of batch %s cannot be read, settling the rest as missing: %s", batch_id, exc)
            await self._settle_leftovers(claimed, now, report)
        async with self.db.engine.begin() as conn:
            counts: dict[str, int] = {
                state: count
                for state, count in await conn.execute(
                    sa.select(jobs.c.state, sa.func.count()).where(jobs.c.batch_id == batch_id).group_by(jobs.c.state)
                )
            }
            report.succeeded = counts.get(JobState.SUCCEEDED.value, 0)
            report.failed = counts.get(JobState.FAILED.value, 0)
            report.cancelled = counts.get(JobState.CANCELLED.value, 0)
            report.requeued = counts.get(JobState.QUEUED.value, 0)
            # per job, not per result line (a line may repeat, and a collect resumed after a crash re-reads
            # lines an earlier one settled); the error names the batch, so an older attempt's expiry is not
            # counted here
            report.expired = int(
                await conn.scalar(
                    sa.select(sa.func.count()).where(
                        jobs.c.batch_id == batch_id,
                        jobs.c.state.in_([JobState.QUEUED.value, JobState.FAILED.value]),
                        jobs.c.error_code == "expired",
                        jobs.c.error["batch_id"].as_string() == batch_id,
                    )
                )
                or 0
            )
            await conn.execute(
                sa.update(batches)
                .where(batches.c.id == batch_id, batches.c.lease_owner == self.owner)
                .values(
                    state=BatchState.COLLECTED.value,
                    collected_at=now,
                    succeeded=report.succeeded,
                    failed=report.failed + report.requeued - report.expired,
                    expired=report.expired,
                    cancelled=report.cancelled,
                    lease_owner=None,
                    lease_expires_at=None,
                    next_poll_at=None,
                    updated_at=now,
                )
            )
        logger.info("batch %s collected: %s", batch_id, report)
        return report

    async def _settle_results(
        self, batch: Mapping[str, Any], adapter: ProviderAdapter, now: datetime, report: CollectReport
    ) -> None:
        status = _status_from_row(batch)
        chunk: list[Outcome] = []
        async for outcome in adapter.results(status):
            chunk.append(outcome)
            if len(chunk) >= self.settings.settle_chunk:
                await self._settle_chunk(batch, chunk, now, report)
                chunk = []
                await self._extend_lease(batch["id"], now)
        if chunk:
            await self._settle_chunk(batch, chunk, now, report)

    async def _extend_lease(self, batch_id: str, now: datetime) -> None:
        async with self.db.engine.begin() as conn:
            await conn.execute(
                sa.update(batches)
                .where(batches.c.id == batch_id, batches.c.lease_owner == self.owner)
                .values(lease_expires_at=self._lease_until(self.clock()))
            )

    async def _settle_chunk(
        self, batch: Mapping[str, Any], outcomes: list[Outcome], now: datetime, report: CollectReport
    ) -> None:
        """Settle one chunk of outcomes in one transaction.

        Each UPDATE is guarded by ``batch_id`` and ``state = 'submitted'``: a duplicate line, a line for a
        job of another batch, or a line settled by an earlier (crashed) collect changes nothing.
        """
        batch_id = batch["id"]
        cancelled_batch = batch["state"] == BatchState.CANCELLED.value
        succeeded: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        retry: list[dict[str, Any]] = []
        cancelled: list[str] = []
        report.results += len(outcomes)
        seen: set[str] = set()
        for o in outcomes:
            # a repeated line is waste: the first one settles the job (as it would in an earlier chunk)
            if o.custom_id in seen:
                continue
            seen.add(o.custom_id)
            if o.kind is OutcomeKind.SUCCEEDED:
                succeeded.append({"b_id": o.custom_id, "b_result": o.body, "b_usage": o.usage})
                continue
            expired = o.kind is OutcomeKind.EXPIRED
            if o.kind is OutcomeKind.CANCELLED or (cancelled_batch and (expired or o.retryable)):
                # the batch was cancelled: what did not finish is cancelled, never sent again
                cancelled.append(o.custom_id)
                continue
            code = "expired" if expired else (o.error_code or "error")
            error = {"code": code, "message": o.error_message, "status_code": o.status_code, "batch_id": batch_id}
            entry = {"b_id": o.custom_id, "b_code": code[:64], "b_error": error}
            (retry if o.retryable or expired else failed).append(entry)
        entries = self._ledger_params(batch, succeeded, failed, cancelled)
        exhausted = [entry_params(e["b_id"], None, ZERO_COST) for e in retry]
        guard = sa.and_(
            jobs.c.id == sa.bindparam("b_id"), jobs.c.batch_id == batch_id, jobs.c.state == JobState.SUBMITTED.value
        )
        error_values = {
            "error_code": sa.bindparam("b_code"),
            "error": sa.bindparam("b_error", type_=jobs.c.error.type),
            "updated_at": now,
        }
        async with self.db.engine.begin() as conn:
            # the ledger first, from the rows still ``submitted``: a job settled before writes nothing
            if entries:
                await conn.execute(entries_from_batch(self.db, batch_id, mode="batch", now=now), entries)
            if exhausted:
                used_up = jobs.c.attempts >= self.settings.max_attempts
                await conn.execute(
                    entries_from_batch(self.db, batch_id, mode="batch", now=now, only=used_up), exhausted
                )
            if succeeded:
                await conn.execute(
                    sa.update(jobs)
                    .where(guard)
                    .values(
                        state=JobState.SUCCEEDED.value,
                        result=sa.bindparam("b_result"),
                        usage=sa.bindparam("b_usage", type_=jobs.c.usage.type),
                        error=None,
                        error_code=None,
                        settled_at=now,
                        updated_at=now,
                    ),
                    succeeded,
                )
            if failed:
                await conn.execute(
                    sa.update(jobs).where(guard).values(state=JobState.FAILED.value, settled_at=now, **error_values),
                    failed,
                )
            if retry:
                # retryable failures go back to the queue while attempts remain; the rest fail
                await conn.execute(
                    sa.update(jobs)
                    .where(guard, jobs.c.attempts < self.settings.max_attempts)
                    .values(state=JobState.QUEUED.value, queued_at=now, **error_values),
                    retry,
                )
                await conn.execute(
                    sa.update(jobs).where(guard).values(state=JobState.FAILED.value, settled_at=now, **error_values),
                    retry,
                )
            for ids in _ids(cancelled):
                await conn.execute(
                    sa.update(jobs)
                    .where(jobs.c.id.in_(ids), jobs.c.batch_id == batch_id, jobs.c.state == JobState.SUBMITTED.value)
                    .values(state=JobState.CANCELLED.value, settled_at=now, updated_at=now)
                )

    def _ledger_params(
        self,
        batch: Mapping[str, Any],
        succeeded: list[dict[str, Any]],
        failed: list[dict[str, Any]],
        cancelled: list[str],
    ) -> list[dict[str, Any]]:
        """Ledger bind parameters for the outcomes that settle a job for good; only successes are billed."""
        provider = self.price_provider(batch["account"])
        entries = []
        for s in succeeded:
            usage = normalize_usage(batch["provider"], s["b_usage"])
            cost = self.prices.cost(provider, batch["model"], usage, mode="batch")
            entries.append(entry_params(s["b_id"], usage, cost))
        entries.extend(entry_params(f["b_id"], None, ZERO_COST) for f in failed)
        entries.extend(entry_params(job_id, None, ZERO_COST) for job_id in cancelled)
        return entries

    async def _settle_leftovers(self, batch: Mapping[str, Any], now: datetime, report: CollectReport) -> None:
        """Jobs of the batch that got no result line: cancelled with a cancelled batch, else retried."""
        batch_id = batch["id"]
        in_batch = sa.and_(jobs.c.batch_id == batch_id, jobs.c.state == JobState.SUBMITTED.value)
        async with self.db.engine.begin() as conn:
            if batch["state"] == BatchState.CANCELLED.value:
                result = await conn.execute(
                    sa.update(jobs)
                    .where(in_batch)
                    .values(state=JobState.CANCELLED.value, settled_at=now, updated_at=now)
                )
                report.cancelled += result.rowcount
                return
            code = "expired" if batch["state"] == BatchState.EXPIRED.value else "missing_result"
            error = {"code": code, "message": "the provider returned no result for this request", "batch_id": batch_id}
            requeued = await conn.execute(
                sa.update(jobs)
                .where(in_batch, jobs.c.attempts < self.settings.max_attempts)
                .values(state=JobState.QUEUED.value, error_code=code, error=error, queued_at=now, updated_at=now)
            )
            failed = await conn.execute(
                sa.update(jobs)
                .where(in_batch)
                .values(state=JobState.FAILED.value, error_code=code, error=error, settled_at=now, updated_at=now)
            )
        report.missing += requeued.rowcount + failed.rowcount
        if report.missing:
            logger.warning("batch %s: %d job(s) had no result line", batch_id, report.missing)

    async def _requeue_token_limited(self, batch: Mapping[str, Any], now: datetime, report: CollectReport) -> None:
        """The provider's enqueued-token cap failed the batch: not the jobs' fault. Requeue them, pause the model."""
        batch_id = batch["id"]
        async with self.db.engine.begin() as conn:
            result = await conn.execute(
                sa.update(jobs)
                .where(jobs.c.batch_id == batch_id, jobs.c.state.in_([JobState.SUBMITTED.value, JobState.PACKED.value]))
                .values(
                    state=JobState.QUEUED.value,
                    # the attempt that never ran is given back
                    attempts=sa.case(
                        (jobs.c.state == JobState.SUBMITTED.value, jobs.c.attempts - 1), else_=jobs.c.attempts
                    ),
                    queued_at=now,
                    updated_at=now,
                )
            )
            report.requeued += result.rowcount
            previous = await conn.scalar(
                sa.select(pauses.c.backoff_s).where(
                    pauses.c.account == batch["account"], pauses.c.model == batch["model"]
                )
            )
            backoff = pause_backoff(previous, base_s=self.settings.token_limit_pause_s)
            until = now + timedelta(seconds=backoff)
            values = {"account": batch["account"], "model": batch["model"], "until": until, "backoff_s": backoff}
            stmt = self.db.insert(pauses).values(**values, reason=TOKEN_LIMIT)
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["account", "model"], set_={"until": until, "backoff_s": backoff}
                )
            )
        logger.warning(
            "batch %s hit the token limit: %d job(s) requeued, %s/%s paused %.0fs",
            batch_id,
            report.requeued,
            batch["account"],
            batch["model"],
            backoff,
        )

    async def _settle_failed_batch(self, batch: Mapping[str, Any], now: datetime, report: CollectReport) -> None:
        """A batch the provider failed as a whole.

        Errors that name a line fail that line's job with the provider's message; the other jobs were not
        at fault and go back to the queue with their attempt given back. Without any line errors the
        batch's failure counts as an attempt for every job.
        """
        batch_id = batch["id"]
        errors = [e for e in (batch["errors"] or []) if isinstance(e, dict)]
        line_errors = {int(e["line"]): e for e in errors if isinstance(e.get("line"), int) and e["line"] >= 1}
        async with self.db.engine.begin() as conn:
            # the file held the batch's jobs that were still packed when it was written, in id order; those
            # are the submitted ones now (jobs cancelled while the batch was open were not in it)
            ordered = [
                r[0]
                for r in await conn.execute(
                    sa.select(jobs.c.id)
                    .where(jobs.c.batch_id == batch_id, jobs.c.state == JobState.SUBMITTED.value)
                    .order_by(jobs.c.id)
                )
            ]
            bad = {ordered[line - 1]: e for line, e in line_errors.items() if line <= len(ordered)}
            for job_id, e in bad.items():
                code = str(e.get("code") or "invalid_request")[:64]
                error = {"code": code, "message": e.get("message"), "line": e.get("line"), "batch_id": batch_id}
                result = await conn.execute(
                    sa.update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.state.in_([JobState.SUBMITTED.value, JobState.PACKED.value]))
                    .values(state=JobState.FAILED.value, error_code=code, error=error, settled_at=now, updated_at=now)
                )
                report.failed += result.rowcount
            first = errors[0] if errors else {"code": "batch_failed", "message": "the provider failed the batch"}
            error = {
                "code": str(first.get("code") or "batch_failed")[:64],
                "message": first.get("message"),
                "batch_id": batch_id,
            }
            in_batch = sa.and_(
                jobs.c.batch_id == batch_id, jobs.c.state.in_([JobState.SUBMITTED.value, JobState.PACKED.value])
            )
            if bad:
                give_back = sa.case(
                    (jobs.c.state == JobState.SUBMITTED.value, jobs.c.attempts - 1), else_=jobs.c.attempts
                )
                result = await conn.execute(
                    sa.update(jobs)
                    .where(in_batch)
                    .values(state=JobState.QUEUED.value, attempts=give_back, queued_at=now, updated_at=now)
                )
                report.requeued += result.rowcount
                return
            # jobs still packed were refused at submit and never counted an attempt: count it now, or a batch
            # the provider always refuses would be packed and refused forever
            counted = sa.case((jobs.c.state == JobState.PACKED.value, jobs.c.attempts + 1), else_=jobs.c.attempts)
            requeued = await conn.execute(
                sa.update(jobs)
                .where(in_batch, counted < self.settings.max_attempts)
                .values(
                    state=JobState.QUEUED.value,
                    attempts=counted,
                    error_code=error["code"],
                    error=error,
                    queued_at=now,
                    updated_at=now,
                )
            )
            failed = await conn.execute(
                sa.update(jobs)
                .where(in_batch)
                .values(
                    state=JobState.FAILED.value,
                    attempts=counted,
                    error_code=error["code"],
                    error=error,
                    settled_at=now,
                    updated_at=now,
                )
            )
            report.requeued += requeued.rowcount
            report.failed += failed.rowcount

    # ------------------------------------------------------------ scheduling

    async def due(self, now: datetime) -> Due:
        """Batches whose next step is due: open ones to submit, running ones to poll, ended ones to collect."""
        free = sa.or_(batches.c.lease_owner.is_(None), batches.c.lease_expires_at < now)
        due_time = sa.or_(batches.c.next_poll_at.is_(None), batches.c.next_poll_at <= now)
        query = sa.select(batches.c.id, batches.c.state).where(
            # another worker's accounts: claiming them here would only hold their lease and fail
            batches.c.account.in_(sorted(self.adapters)),
            free,
            sa.or_(
                sa.and_(batches.c.state == BatchState.OPEN.value, due_time),
                batches.c.state == BatchState.SUBMITTING.value,
                sa.and_(batches.c.state.in_(state_values(BATCH_AT_PROVIDER)), due_time),
                # a collect that failed on a retryable error waits until next_poll_at
                sa.and_(batches.c.state.in_(state_values(BATCH_TO_COLLECT)), due_time),
            ),
        )
        out = Due()
        async with self.db.engine.connect() as conn:
            for batch_id, state in await conn.execute(query):
                if state in (BatchState.OPEN.value, BatchState.SUBMITTING.value):
                    out.submit.append(batch_id)
                elif state in state_values(BATCH_AT_PROVIDER):
                    out.poll.append(batch_id)
                else:
                    out.collect.append(batch_id)
        return out

    async def pending(self) -> bool:
        """Whether anything is left to do: queued or in-flight jobs, or batches not yet collected."""
        async with self.db.engine.connect() as conn:
            active_job = await conn.scalar(
                sa.select(jobs.c.id)
                .where(
                    jobs.c.state.in_(state_values({JobState.QUEUED, JobState.PACKED, JobState.SUBMITTED})),
                    # queued jobs of an account this worker does not serve are another worker's business
                    jobs.c.account.in_(sorted(self.adapters)),
                )
                .limit(1)
            )
            if active_job is not None:
                return True
            active_batch = await conn.scalar(
                sa.select(batches.c.id)
                .where(batches.c.state != BatchState.COLLECTED.value, batches.c.account.in_(sorted(self.adapters)))
                .limit(1)
            )
            return active_batch is not None

    async def next_due_in(self, now: datetime) -> float | None:
        """Seconds until the next batch step is due (0 if one is due now), ``None`` when no batch is active."""
        async with self.db.engine.connect() as conn:
            earliest = await conn.scalar(
                sa.select(sa.func.min(batches.c.next_poll_at)).where(
                    batches.c.state != BatchState.COLLECTED.value, batches.c.account.in_(sorted(self.adapters))
                )
            )
            paused_until = await conn.scalar(sa.select(sa.func.min(pauses.c.until)).where(pauses.c.until > now))
        candidates: list[datetime] = [t for t in (earliest, paused_until) if t is not None]
        if not candidates:
            return None
        return max(0.0, (min(candidates) - now).total_seconds())

    # ---------------------------------------------------------------- cancel

    async def cancel_run(self, run: str, now: datetime) -> CancelReport:
        """Cancel a run: its queued and packed jobs at once, and the provider batches that hold only its jobs.

        Batches shared with other runs keep running (their results are paid for either way) and settle
        normally.
        """
        report = CancelReport()
        async with self.db.engine.begin() as conn:
            result = await conn.execute(
                sa.update(jobs)
                .where(jobs.c.run == run, jobs.c.state.in_([JobState.QUEUED.value, JobState.PACKED.value]))
                .values(state=JobState.CANCELLED.value, settled_at=now, updated_at=now)
            )
            report.jobs_cancelled += result.rowcount
            in_flight = [
                r[0]
                for r in await conn.execute(
                    sa.select(jobs.c.batch_id)
                    .where(jobs.c.run == run, jobs.c.state == JobState.SUBMITTED.value)
                    .distinct()
                )
            ]
        for batch_id in in_flight:
            async with self.db.engine.connect() as conn:
                others = await conn.scalar(
                    sa.select(sa.func.count()).where(
                        jobs.c.batch_id == batch_id, jobs.c.run != run, jobs.c.state == JobState.SUBMITTED.value
                    )
                )
            if others:
                report.batches_shared += 1
                continue
            if await self.cancel_batch(batch_id, now):
                report.batches_cancelled += 1
        return report

    async def cancel_batch(self, batch_id: str, now: datetime) -> bool:
        """Ask the provider to cancel one batch; True when it accepted."""
        claimed = await self._claim(
            batch_id,
            now,
            frozenset({BatchState.VALIDATING, BatchState.IN_PROGRESS, BatchState.FINALIZING}),
            due_only=False,
        )
        if claimed is None:
            return False
        adapter = self.adapter(claimed["account"])
        try:
            status = await adapter.cancel(claimed["provider_batch_id"])
        except ProviderError as exc:
            logger.warning("cancel of batch %s failed: %s", batch_id, exc)
            await self._release(batch_id, now)
            return False
        target = (
            status.state if status.state in BATCH_TRANSITIONS[BatchState(claimed["state"])] else BatchState.CANCELLING
        )
        await self._release(
            batch_id,
            now,
            state=target.value,
            provider_state=status.provider_state,
            next_poll_at=now + timedelta(seconds=self.settings.poll_min_s),
            poll_interval_s=self.settings.poll_min_s,
        )
        return True


class _RaceLost(Exception):
    """Another worker changed the rows between our read and our write; the transaction is rolled back."""


def _status_values(status: BatchStatus, now: datetime) -> dict[str, Any]:
    values: dict[str, Any] = {
        "output_file_id": status.output_file_id or status.results_ref,
        "error_file_id": status.error_file_id,
    }
    if status.errors:
        values["errors"] = status.errors
    return values


def _status_from_row(batch: Mapping[str, Any]) -> BatchStatus:
    return BatchStatus(
        provider_batch_id=batch["provider_batch_id"],
        state=BatchState(batch["state"]),
        provider_state=batch["provider_state"] or "",
        output_file_id=batch["output_file_id"],
        error_file_id=batch["error_file_id"],
        results_ref=batch["output_file_id"],
        errors=list(batch["errors"] or []),
    )
