"""The batch lifecycle: pack, submit, poll, collect, cancel — driving provider adapters and the database.

Every step follows one pattern: claim rows in a short transaction (a state change or a lease in the
row), commit, do the network call with no session open, then record the outcome in one transaction
whose ``UPDATE … WHERE state IN (…)`` guards decide any race. A worker killed at any line leaves rows
another worker can finish: an ``open`` batch is submitted again, a ``submitting`` batch whose lease ran
out is first looked up at the provider (:func:`batcher.recovery.find_unrecorded`), a batch half collected is
collected again and the already-settled jobs are skipped by their state guard. Leases are renewed in the
background while a step runs (:class:`batcher.recovery.BatchLease`), and a step cancelled (a worker shutting
down) hands its batch over at once instead of leaving it to the lease's expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from batcher import fallback, recovery, settle
from batcher.config import Settings
from batcher.db.engine import Database
from batcher.db.tables import batches, jobs, pauses
from batcher.domain import (
    BATCH_AT_PROVIDER,
    BATCH_TO_COLLECT,
    BATCH_TRANSITIONS,
    JOB_ACTIVE,
    BatchState,
    JobState,
    new_id,
    state_values,
)
from batcher.errors import ConfigError, NotFound, ProviderError
from batcher.packer import (
    FlushReason,
    GroupKey,
    GroupStats,
    flush_reason,
    next_poll_interval,
    retry_delay,
    split,
)
from batcher.pricing import PriceBook, load_overrides
from batcher.providers import registry
from batcher.providers.base import BatchStatus, Limits, ProviderAdapter
from batcher.recovery import BatchLease, LeaseLost, SweepReport
from batcher.settle import CollectReport
from batcher.timeutil import utcnow

logger = logging.getLogger(__name__)

#: ids per ``IN (…)`` list: well under SQLite's 32,766 bound variables
ID_CHUNK = 5000


#: states past the provider's validation: it accepted the batch (and the enqueued tokens)
_VALIDATED = frozenset({BatchState.IN_PROGRESS, BatchState.FINALIZING, BatchState.ENDED})
#: a lease time in the past: a submitting batch handed over this way is claimed by the next worker at once
_HANDED_OVER = datetime(2000, 1, 1, tzinfo=UTC)
RETRIEVE_FAILED = "retrieve_failed"
#: how far back the recovery sweep looks for an account's batches
RECOVERY_WINDOW = timedelta(days=2)


@dataclass
class Due:
    """Work whose time has come, by kind (batch ids).

    ``keys`` tells one due occasion of a batch from the next (its state, next poll and lease as read), so a task
    id built from it is new each time the batch becomes due again — in particular once a dead worker's lease has
    run out — and the same while one occasion waits in the queue.
    """

    submit: list[str] = field(default_factory=list)
    poll: list[str] = field(default_factory=list)
    collect: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.submit or self.poll or self.collect)


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
        rand: random numbers in ``[0, 1)`` for retry jitter.
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
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.clock = clock
        self.rand = rand
        #: per account: no real-time call before this time (a provider's Retry-After), and failures in a row
        self.fallback_not_before: dict[str, datetime] = {}
        self.fallback_failures: dict[str, int] = {}
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

    def _lease(self, batch_id: str, now: datetime) -> BatchLease:
        return BatchLease(self.db, batch_id, self.owner, now=now, lease_s=self.settings.lease_s, clock=self.clock)

    def turnaround_s(self, account: str) -> float:
        """How long a batch of ``account`` is expected to take (settings; by account, then provider kind)."""
        adapter = self.adapters.get(account)
        return self.settings.turnaround_s(account, adapter.kind.value if adapter is not None else "")

    def retry_delay(self, failures: int, exc: ProviderError, *, base_s: float, max_s: float) -> float:
        """Seconds before a failed provider call is tried again: its Retry-After, else jittered back-off."""
        return retry_delay(
            failures,
            base_s=base_s,
            max_s=max_s,
            retry_after_s=exc.retry_after_s,
            jitter=self.rand(),
            spread=self.settings.retry_jitter,
        )

    # ------------------------------------------------------------------ pack

    async def pack(self, now: datetime, *, force: bool = False) -> list[str]:
        """Turn due groups of queued jobs into ``open`` batches; returns the new batch ids.

        Jobs whose deadline a batch can no longer meet are left out (they are the deadline sweep's,
        :meth:`sweep_deadlines`).
        """
        created: list[str] = []
        async with self.db.engine.connect() as conn:
            groups, caps = await self._queued_groups(conn, now)
        for stats in groups:
            adapter = self.adapters[stats.key.account]
            limits = adapter.limits
            cap = caps.get((stats.key.account, stats.key.model))
            if cap is not None and cap < limits.max_requests:
                # a batch of this model alone was over the provider's enqueued-token limit: smaller ones
                limits = replace(limits, max_requests=cap)
            reason = flush_reason(
                stats,
                limits,
                now,
                max_wait_s=self.settings.pack_max_wait_s,
                turnaround_s=self.turnaround_s(stats.key.account),
                lead_s=self.settings.deadline_lead_s,
                force=force,
            )
            if reason is None:
                continue
            # forced (burst mode) packs the remainder too; a full group otherwise leaves it waiting for company
            keep_partial = force or reason is not FlushReason.FULL
            try:
                created.extend(await self._pack_group(stats.key, limits, now, keep_partial=keep_partial))
            except _RaceLost as exc:
                # rolled back; the group's rows are packed on a later tick. Other groups still go now.
                logger.info("%s; retrying next tick", exc)
        if created:
            logger.info("packed %d batch(es)", len(created))
        return created

    def _batchable(self, account: str, now: datetime) -> sa.ColumnElement[bool]:
        """Queued jobs of ``account`` a batch can still return in time (no deadline, or one far enough away)."""
        return sa.and_(
            jobs.c.account == account,
            sa.or_(
                jobs.c.not_after.is_(None),
                jobs.c.not_after >= now + timedelta(seconds=self.turnaround_s(account)),
            ),
        )

    async def _queued_groups(
        self, conn: AsyncConnection, now: datetime
    ) -> tuple[list[GroupStats], dict[tuple[str, str], int]]:
        """What is queued per group (paused ones left out), and the learned batch caps per (account, model)."""
        paused_keys: set[tuple[str, str]] = set()
        caps: dict[tuple[str, str], int] = {}
        pause_query = sa.select(
            pauses.c.account, pauses.c.model, pauses.c.until, pauses.c.batch_cap, pauses.c.batch_cap_until
        )
        for row in await conn.execute(pause_query):
            if row.until > now:
                paused_keys.add((row.account, row.model))
            if row.batch_cap is not None and row.batch_cap_until is not None and row.batch_cap_until > now:
                caps[(row.account, row.model)] = row.batch_cap
        out = []
        # only the accounts this worker serves: another worker's are not ours to pack
        for account in sorted(self.adapters):
            query = (
                sa.select(
                    jobs.c.provider,
                    jobs.c.endpoint,
                    jobs.c.model,
                    sa.func.count(),
                    sa.func.sum(jobs.c.body_bytes),
                    sa.func.min(jobs.c.queued_at),
                    sa.func.min(jobs.c.not_after),
                    sa.func.sum(jobs.c.inputs),
                )
                .where(jobs.c.state == JobState.QUEUED.value, self._batchable(account, now))
                .group_by(jobs.c.provider, jobs.c.endpoint, jobs.c.model)
            )
            for provider, endpoint, model, count, body_bytes, oldest, deadline, inputs in await conn.execute(query):
                if (account, model) in paused_keys:
                    continue
                key = GroupKey(provider, account, endpoint, model)
                out.append(GroupStats(key, count, int(body_bytes), oldest, deadline, int(inputs)))
        return out, caps

    async def _pack_group(self, key: GroupKey, limits: Limits, now: datetime, *, keep_partial: bool) -> list[str]:
        query = (
            sa.select(jobs.c.id, jobs.c.body_bytes, jobs.c.inputs)
            .where(
                jobs.c.state == JobState.QUEUED.value,
                self._batchable(key.account, now),
                jobs.c.endpoint == key.endpoint,
                jobs.c.model == key.model,
            )
            .order_by(jobs.c.priority.desc(), jobs.c.queued_at, jobs.c.id)
            # bounded: a group with a million queued jobs is packed a few full batches per tick
            .limit(self.adapters[key.account].limits.max_requests * 2)
        )
        if not self.db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        created: list[str] = []
        async with self.db.engine.begin() as conn:
            rows = [(r[0], r[1], r[2]) for r in await conn.execute(query)]
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

        The batch row is ``submitting`` under our lease before the provider is called, and the lease is renewed
        while the upload and create run. Right before create the lease is checked (a submit that lost it stops
        there) and the time is noted in ``submitted_at``; the provider batch carries our id in its metadata where
        the API allows; its id is recorded right after create. A batch whose earlier submit died with its lease is
        first looked up at the provider (:func:`batcher.recovery.find_unrecorded`), so it is never created twice.
        Jobs whose deadline this batch can no longer meet are taken out of it first (back to the queue, where the
        deadline sweep sends them to the real-time API).
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
        path = self.work_dir / recovery.input_file_name(batch_id)
        try:
            async with self._lease(batch_id, now) as lease:
                status = await self._submit_steps(row, adapter, path, now, lease)
        except ProviderError as exc:
            await self._release_submit(batch_id, now, exc, failures=row["submit_attempts"])
            return
        except LeaseLost:
            logger.warning("batch %s: lease lost during submit; another worker has it", batch_id)
            return
        except asyncio.CancelledError:
            # shutting down: hand the batch over now. Create may have reached the provider, so it stays
            # ``submitting`` and whoever takes it first looks for it there.
            await asyncio.shield(self._hand_over_submit(batch_id, now))
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if status is None:
            await self._finish_empty(batch_id, now)
            return
        try:
            moved = await self._record_submitted(batch_id, status, now, adapter)
        except sa.exc.IntegrityError:
            # recovery adopted a provider batch another batch of ours recorded meanwhile: look again later
            logger.warning("batch %s: provider batch %s is another batch's", batch_id, status.provider_batch_id)
            error = ProviderError("recovered provider batch already recorded", provider=adapter.account, retryable=True)
            await self._release_submit(batch_id, now, error, failures=row["submit_attempts"])
            return
        if moved == 0:
            # every job was cancelled while the provider batch was being created: stop it there, nobody waits
            # for its results
            await self.cancel_batch(batch_id, now)

    async def _hand_over_submit(self, batch_id: str, now: datetime) -> None:
        async with self.db.engine.begin() as conn:
            await conn.execute(
                sa.update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.lease_owner == self.owner,
                    batches.c.state == BatchState.SUBMITTING.value,
                )
                .values(lease_expires_at=_HANDED_OVER, updated_at=now)
            )
        logger.info("batch %s handed over mid-submit", batch_id)

    async def _submit_steps(
        self, row: Mapping[str, Any], adapter: ProviderAdapter, path: Path, now: datetime, lease: BatchLease
    ) -> BatchStatus | None:
        """Find (after a crash), or upload and create, the provider batch. ``None``: no jobs left in it."""
        batch_id = row["id"]
        if row["submit_attempts"] > 1:
            # an earlier submit died holding the lease (or its create's answer was lost): the provider may have
            # the batch already
            logger.info(
                "batch %s: submit attempt %d; looking for an earlier one at the provider",
                batch_id,
                row["submit_attempts"],
            )
            found = await recovery.find_unrecorded(
                self.db, adapter, row, clock_skew_s=self.settings.recovery_clock_skew_s
            )
            if found is not None:
                logger.warning(
                    "batch %s was created at the provider as %s but never recorded", batch_id, found.provider_batch_id
                )
                return found
        await self._release_late_jobs(batch_id, row["account"], now)
        count, size = await self._write_file(batch_id, adapter, path)
        if count == 0:
            return None
        file_id = row["input_file_id"]
        if file_id is not None and count != row["request_count"]:
            # jobs left the batch (cancelled, or too late for it) since that file was uploaded by an earlier
            # attempt: sending it would run (and bill) them anyway. Upload the current file instead.
            logger.info("batch %s lost jobs since its upload; replacing file %s", batch_id, file_id)
            try:
                await adapter.delete_file(file_id)
            except ProviderError as exc:  # a stray file costs nothing; the recovery sweep tries again
                logger.warning("could not delete stale input file %s of batch %s: %s", file_id, batch_id, exc)
            file_id = None
        if file_id is None:
            file_id = await adapter.upload(path)
            if not await lease.renew(input_file_id=file_id, bytes=size, request_count=count, updated_at=now):
                # another worker took the batch over while we uploaded: this file is nobody's
                if file_id is not None:
                    with contextlib.suppress(ProviderError):
                        await adapter.delete_file(file_id)
                raise LeaseLost(f"batch {batch_id}: lease lost during upload")
        # the last moment before a call that must not happen twice: still ours? Note when create was sent, for
        # recovery by creation time where batches carry no metadata.
        await lease.check(submitted_at=self.clock())
        return await adapter.create(
            batch_id=batch_id, endpoint=row["endpoint"], model=row["model"], input_file_id=file_id, path=path
        )

    async def _release_late_jobs(self, batch_id: str, account: str, now: datetime) -> None:
        """Jobs of an unsent batch whose deadline the batch can no longer meet go back to the queue."""
        too_late = now + timedelta(seconds=self.turnaround_s(account))
        async with self.db.engine.begin() as conn:
            result = await conn.execute(
                sa.update(jobs)
                .where(
                    jobs.c.batch_id == batch_id,
                    jobs.c.state == JobState.PACKED.value,
                    jobs.c.not_after.is_not(None),
                    jobs.c.not_after < too_late,
                )
                .values(state=JobState.QUEUED.value, queued_at=now, updated_at=now)
            )
        if result.rowcount:
            logger.info("batch %s: %d job(s) can no longer make their deadline by batch", batch_id, result.rowcount)

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

    async def _release_submit(self, batch_id: str, now: datetime, exc: ProviderError, *, failures: int) -> None:
        """A submit step failed: back to ``open`` to retry later, or ``failed`` if the provider refused it.

        The retry waits for the provider's Retry-After, else backs off (doubling per failed attempt, jittered).
        """
        values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
        if exc.retryable:
            delay = self.retry_delay(failures, exc, base_s=self.settings.poll_min_s, max_s=self.settings.poll_max_s)
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
        """Ask the provider how a batch is doing and record it; returns the new state (``None``: not ours now).

        A failed retrieve is retried later (the provider's Retry-After, else the poll interval, jittered). One
        that cannot succeed (not retryable) backs off, and once the batch's status has been unreadable for
        ``poll_give_up_s`` the batch is given up: cancelled at the provider where possible and failed, so its
        jobs go back to the queue instead of waiting forever.
        """
        claimed = await self._claim(batch_id, now, BATCH_AT_PROVIDER, due_only=True)
        if claimed is None:
            return None
        adapter = self.adapter(claimed["account"])
        try:
            status = await adapter.retrieve(claimed["provider_batch_id"])
        except ProviderError as exc:
            return await self._poll_failed(claimed, adapter, now, exc)
        except asyncio.CancelledError:
            # shutting down: due again at once (a new due time, so a new task id: see ``Due``)
            await asyncio.shield(self._release(batch_id, now, next_poll_at=now))
            raise
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
            # from here the interval is the collect's retry back-off
            values["poll_interval_s"] = self.settings.poll_min_s
        async with self.db.engine.begin() as conn:
            result = await conn.execute(
                sa.update(batches)
                .where(batches.c.id == batch_id, batches.c.lease_owner == self.owner, batches.c.state == current.value)
                .values(**values)
            )
            if result.rowcount == 1 and current is BatchState.VALIDATING and target in _VALIDATED:
                # the provider took a batch of this model again: a token-limit pause that has run its course
                # starts over from its base the next time, instead of doubling on from an old streak; a learned
                # batch cap stays until it runs out
                ran_out = sa.and_(
                    pauses.c.account == claimed["account"], pauses.c.model == claimed["model"], pauses.c.until <= now
                )
                capped = sa.and_(pauses.c.batch_cap.is_not(None), pauses.c.batch_cap_until > now)
                await conn.execute(sa.delete(pauses).where(ran_out, sa.not_(capped)))
                await conn.execute(sa.update(pauses).where(ran_out, capped).values(backoff_s=0))
        return target

    async def _poll_failed(
        self, claimed: Mapping[str, Any], adapter: ProviderAdapter, now: datetime, exc: ProviderError
    ) -> BatchState:
        batch_id = claimed["id"]
        current = BatchState(claimed["state"])
        interval = claimed["poll_interval_s"]
        if exc.retryable:
            delay = self.retry_delay(1, exc, base_s=interval, max_s=interval)
            logger.warning("poll of batch %s failed, next in %.1fs: %s", batch_id, delay, exc)
            await self._release(batch_id, now, next_poll_at=now + timedelta(seconds=delay))
            return current
        last_seen = claimed["last_polled_at"] or claimed["submitted_at"] or claimed["created_at"]
        if now - last_seen < timedelta(seconds=self.settings.poll_give_up_s):
            interval = next_poll_interval(interval, min_s=self.settings.poll_min_s, max_s=self.settings.poll_max_s)
            delay = self.retry_delay(1, exc, base_s=interval, max_s=interval)
            logger.warning("poll of batch %s failed (not retryable), next in %.1fs: %s", batch_id, delay, exc)
            await self._release(batch_id, now, poll_interval_s=interval, next_poll_at=now + timedelta(seconds=delay))
            return current
        logger.error("batch %s: status unreadable since %s, giving it up: %s", batch_id, last_seen, exc)
        with contextlib.suppress(ProviderError):
            # it may still run there; nobody would collect it
            await adapter.cancel(claimed["provider_batch_id"])
        await self._release(
            batch_id,
            now,
            state=BatchState.FAILED.value,
            errors=[{"code": RETRIEVE_FAILED, "message": str(exc), "line": None, "param": None}],
            ended_at=now,
            next_poll_at=now,
            poll_interval_s=self.settings.poll_min_s,
        )
        return BatchState.FAILED

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
        try:
            async with self._lease(batch_id, now):
                return await settle.collect_claimed(self, claimed, now)
        except asyncio.CancelledError:
            # shutting down: what is settled stays settled; the next worker reads the rest at once (a new due
            # time gives the task a new id, which no copy of this task kept in Redis can hold back)
            await asyncio.shield(self._release(batch_id, now, next_poll_at=now))
            raise

    # ------------------------------------------------------------ scheduling

    async def due(self, now: datetime) -> Due:
        """Batches whose next step is due: open ones to submit, running ones to poll, ended ones to collect."""
        free = sa.or_(batches.c.lease_owner.is_(None), batches.c.lease_expires_at < now)
        due_time = sa.or_(batches.c.next_poll_at.is_(None), batches.c.next_poll_at <= now)
        query = sa.select(
            batches.c.id, batches.c.state, batches.c.next_poll_at, batches.c.lease_expires_at, batches.c.submit_attempts
        ).where(
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
            for batch_id, state, next_poll_at, lease_expires_at, submit_attempts in await conn.execute(query):
                out.keys[batch_id] = f"{state}-{_stamp(next_poll_at)}-{_stamp(lease_expires_at)}-{submit_attempts}"
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
                    jobs.c.state.in_(state_values(JOB_ACTIVE)),
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

    # ------------------------------------------------------------- deadlines

    async def sweep_deadlines(self, now: datetime) -> list[str]:
        """Enforce deadlines on jobs not yet at a provider; returns the accounts with real-time work to do.

        See :func:`batcher.fallback.sweep`.
        """
        return await fallback.sweep(self, now)

    async def run_fallback(self, account: str, now: datetime) -> fallback.FallbackReport:
        """Send a share of ``account``'s jobs a batch cannot return in time to its real-time API and settle them.

        See :func:`batcher.fallback.run`.
        """
        return await fallback.run(self, account, now)

    # -------------------------------------------------------------- recovery

    async def recover(self, account: str, now: datetime) -> SweepReport:
        """Cancel orphan provider batches and delete unused uploads of ``account`` (:func:`batcher.recovery.sweep`).

        Only an account with batches in the last two days is asked (what is older is past every provider's batch
        window); a failed listing is logged and left to the next sweep.
        """
        adapter = self.adapter(account)
        async with self.db.engine.connect() as conn:
            recent = await conn.scalar(
                sa.select(batches.c.id)
                .where(batches.c.account == account, batches.c.created_at >= now - RECOVERY_WINDOW)
                .limit(1)
            )
        if recent is None:
            return SweepReport(account)
        try:
            return await recovery.sweep(self.db, adapter, now=now, lease_s=self.settings.lease_s)
        except ProviderError as exc:
            logger.warning("recovery sweep of %s failed, next time then: %s", account, exc)
            return SweepReport(account)

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


def _stamp(at: datetime | None) -> str:
    return "-" if at is None else str(int(at.timestamp() * 1000))


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
