"""Crash recovery: leases kept alive during long steps, provider batches created but never recorded, uploaded files
no batch uses, and the one-worker rule of SQLite.

A worker may die at any line. What it held is a lease in a row (``lease_owner``, ``lease_expires_at``); once the
lease has run out another worker takes the row over and finishes the step. Two things can outlive a worker
outside the database, at the provider:

* a provider batch created but whose id was never recorded (killed between create and the recording
  transaction, or a create whose answer was lost). The next submit of that batch looks for it before creating
  anything: by our batch id in its metadata where the API has metadata (OpenAI), else by creation time and
  request count (Anthropic), recording on the batch row when more than one batch matched
  (:func:`find_unrecorded`). :func:`sweep` also cancels provider batches whose metadata names a batch of ours
  that has since recorded another one (an orphan of a submit that outlived its lease).
* an uploaded input file no batch will use (killed between upload and recording its id, or a batch refused or
  emptied after its upload). :func:`sweep` deletes those, never a file younger than a lease or one a batch of
  ours may still create from, and never a file it cannot tie to a batch of this database.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import sqlalchemy as sa

from batcher.db.engine import Database
from batcher.db.tables import batches, jobs
from batcher.domain import BATCH_AT_PROVIDER, BatchState, JobState
from batcher.errors import ConfigError
from batcher.providers.base import BatchStatus, ProviderAdapter

logger = logging.getLogger(__name__)

__all__ = [
    "INPUT_FILE_RE",
    "RECOVERY_UNCERTAIN",
    "BatchLease",
    "JobsLease",
    "LeaseLost",
    "SweepReport",
    "WorkerLock",
    "find_unrecorded",
    "input_file_name",
    "sweep",
]

#: the name batcher uploads a batch's input file under; recovery ties files to batches by it
INPUT_FILE_RE = re.compile(r"batcher-([0-9a-f]{32})\.jsonl")
_CANCELLABLE = BATCH_AT_PROVIDER - {BatchState.CANCELLING}
#: the code of the note left on a batch adopted by creation time and size when more than one batch matched
RECOVERY_UNCERTAIN = "recovery_uncertain"


def input_file_name(batch_id: str) -> str:
    return f"batcher-{batch_id}.jsonl"


class LeaseLost(Exception):
    """Our lease ran out and another worker took the row over; the step stops without touching it."""


# ------------------------------------------------------------------------------------------------ leases


class _Keeper:
    """Renews a lease every ``lease_s / 3`` seconds in the background while a long step runs.

    Lease times stay in the step's own time frame: a renewal sets ``now + elapsed + lease_s``, where ``now`` is
    the time the step was started with and ``elapsed`` what ``clock`` says has passed since.
    """

    def __init__(self, *, now: datetime, lease_s: float, clock: Callable[[], datetime]) -> None:
        self.now = now
        self.lease_s = lease_s
        self.clock = clock
        self._started = clock()
        self._task: asyncio.Task[None] | None = None
        #: a background renewal found the lease gone
        self.lost = False

    def until(self) -> datetime:
        return self.now + (self.clock() - self._started) + timedelta(seconds=self.lease_s)

    async def renew(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    async def _run(self) -> None:
        interval = max(self.lease_s / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.renew():
                    self.lost = True
                    return
            except Exception:  # a failed renewal is tried again; the lease still has two thirds to run
                logger.exception("lease renewal failed")

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class BatchLease(_Keeper):
    """``async with BatchLease(...) as lease:`` keeps a batch's lease alive during a long step.

    :meth:`check` renews it at once (optionally writing more columns in the same guarded UPDATE) and raises
    :class:`LeaseLost` when the row is no longer ours: call it right before a provider call that must not happen
    twice.
    """

    def __init__(
        self, db: Database, batch_id: str, owner: str, *, now: datetime, lease_s: float, clock: Callable[[], datetime]
    ) -> None:
        super().__init__(now=now, lease_s=lease_s, clock=clock)
        self.db = db
        self.batch_id = batch_id
        self.owner = owner

    async def renew(self, **values: Any) -> bool:
        async with self.db.engine.begin() as conn:
            result = await conn.execute(
                sa.update(batches)
                .where(batches.c.id == self.batch_id, batches.c.lease_owner == self.owner)
                .values(lease_expires_at=self.until(), **values)
            )
        return bool(result.rowcount == 1)

    async def check(self, **values: Any) -> None:
        """Renew now; raise :class:`LeaseLost` if another worker holds the row."""
        if self.lost or not await self.renew(**values):
            self.lost = True
            raise LeaseLost(f"batch {self.batch_id}: lease lost")


class JobsLease(_Keeper):
    """Keeps claimed fallback jobs' claims alive (their ``updated_at``) while their real-time calls run."""

    def __init__(
        self,
        db: Database,
        claims: dict[str, int],
        *,
        now: datetime,
        lease_s: float,
        clock: Callable[[], datetime],
    ) -> None:
        super().__init__(now=now, lease_s=lease_s, clock=clock)
        self.db = db
        #: job id → the attempt we claimed it at; settled jobs are removed by the caller
        self.claims = claims

    def touched_at(self) -> datetime:
        return self.until() - timedelta(seconds=self.lease_s)

    async def renew(self) -> bool:
        if not self.claims:
            return True
        stamp = self.touched_at()
        async with self.db.engine.begin() as conn:
            for job_id, attempt in list(self.claims.items()):
                await conn.execute(
                    sa.update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.state == JobState.FALLBACK.value, jobs.c.attempts == attempt)
                    .values(updated_at=stamp)
                )
        return True


# ------------------------------------------------------------------------------- unrecorded provider batches


def _created_at(status: BatchStatus) -> datetime | None:
    raw = status.raw.get("created_at")
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(raw)
    return None


async def find_unrecorded(
    db: Database, adapter: ProviderAdapter, row: Mapping[str, Any], *, clock_skew_s: float
) -> BatchStatus | None:
    """The provider batch an earlier, interrupted submit of ``row`` created, if there is one.

    By our batch id in the provider batch's metadata first. Where batches carry no metadata: the batches created
    since the earlier create was sent (``submitted_at`` is set right before every create call; ``clock_skew_s``
    of slack) with as many requests as its file held, leaving out those another batch of ours recorded. One
    match is taken as ours. Several: the one created closest to our create is taken, and the uncertainty is
    noted on the batch (an ``errors`` entry with code :data:`RECOVERY_UNCERTAIN` naming the others).

    Raises:
        ProviderError: listing failed (the submit is retried later; nothing is created meanwhile).
    """
    found = await adapter.find_batch(row["id"])
    if found is not None:
        return found
    marker: datetime | None = row["submitted_at"]
    if marker is None:
        return None  # create was never called for this batch
    candidates = await adapter.find_batch_candidates(marker - timedelta(seconds=clock_skew_s), row["request_count"])
    if not candidates:
        return None
    async with db.engine.connect() as conn:
        recorded = {
            r[0]
            for r in await conn.execute(
                sa.select(batches.c.provider_batch_id).where(
                    batches.c.account == row["account"],
                    batches.c.provider_batch_id.in_([c.provider_batch_id for c in candidates]),
                )
            )
        }
    free = [c for c in candidates if c.provider_batch_id not in recorded]
    if not free:
        return None

    def distance(status: BatchStatus) -> float:
        created = _created_at(status)
        return abs((created - marker).total_seconds()) if created is not None else float("inf")

    free.sort(key=distance)
    chosen = free[0]
    if len(free) == 1:
        logger.warning(
            "batch %s: adopting provider batch %s (created after our create, %d requests)",
            row["id"],
            chosen.provider_batch_id,
            row["request_count"],
        )
        return chosen
    others = [c.provider_batch_id for c in free[1:]]
    message = (
        f"recovered by creation time and request count ({row['request_count']}); {len(free)} provider batches "
        f"matched: adopted {chosen.provider_batch_id} (created nearest our create), not {', '.join(others)}"
    )
    logger.warning("batch %s: %s", row["id"], message)
    note = {"code": RECOVERY_UNCERTAIN, "message": message, "line": None, "param": None}
    return dataclasses.replace(chosen, errors=[*chosen.errors, note])


# --------------------------------------------------------------------------------------------------- sweep


@dataclass
class SweepReport:
    """What a recovery sweep of one account did."""

    account: str
    #: provider batches cancelled because a batch of ours recorded another one
    orphans_cancelled: list[str] = field(default_factory=list)
    #: uploaded files deleted because no batch uses them
    files_deleted: list[str] = field(default_factory=list)


async def _rows(db: Database, ids: Sequence[str]) -> dict[str, Mapping[str, Any]]:
    if not ids:
        return {}
    out: dict[str, Mapping[str, Any]] = {}
    async with db.engine.connect() as conn:
        for start in range(0, len(ids), 1000):
            query = sa.select(
                batches.c.id,
                batches.c.state,
                batches.c.provider_batch_id,
                batches.c.input_file_id,
                batches.c.lease_expires_at,
            ).where(batches.c.id.in_(list(ids[start : start + 1000])))
            for r in (await conn.execute(query)).mappings():
                out[r["id"]] = dict(r)
    return out


async def sweep(db: Database, adapter: ProviderAdapter, *, now: datetime, lease_s: float) -> SweepReport:
    """Cancel orphan provider batches and delete unused uploads of one account. Idempotent; any worker may run it.

    Raises:
        ProviderError: listing failed (what was done before stays done).
    """
    report = SweepReport(adapter.account)
    in_flight = {BatchState.OPEN.value, BatchState.SUBMITTING.value}

    recent = await adapter.recent_batches()
    rows = await _rows(db, sorted({ours for ours, _ in recent if ours}))
    for ours, status in recent:
        row = rows.get(ours or "")
        if row is None or row["provider_batch_id"] == status.provider_batch_id:
            continue  # not a batch of this database, or the one it recorded
        if row["state"] in in_flight or status.state not in _CANCELLABLE:
            continue  # its own submit looks for it before creating anything; or it is finished or cancelling
        logger.warning(
            "cancelling provider batch %s: batch %s recorded %s instead",
            status.provider_batch_id,
            ours,
            row["provider_batch_id"],
        )
        try:
            await adapter.cancel(status.provider_batch_id)
        except Exception as exc:  # best effort: the next sweep tries again
            logger.warning("could not cancel orphan provider batch %s: %s", status.provider_batch_id, exc)
            continue
        report.orphans_cancelled.append(status.provider_batch_id)

    uploads = [(f, m.group(1)) for f in await adapter.list_uploads() if (m := INPUT_FILE_RE.fullmatch(f.filename))]
    rows = await _rows(db, sorted({batch_id for _, batch_id in uploads}))
    young = now - timedelta(seconds=lease_s)
    for upload, batch_id in uploads:
        row = rows.get(batch_id)
        if row is None or upload.created_at > young:
            continue  # not ours to judge, or an upload whose id may be about to be recorded
        if row["input_file_id"] == upload.file_id and (row["state"] in in_flight or row["provider_batch_id"]):
            continue  # a create may still use it, or a provider batch ran from it
        lease = row["lease_expires_at"]
        if row["state"] == BatchState.SUBMITTING.value and lease is not None and lease >= now:
            continue  # a live submit may have uploaded it a moment ago
        logger.info("deleting file %s: no batch uses it (batch %s, %s)", upload.file_id, batch_id, row["state"])
        try:
            await adapter.delete_file(upload.file_id)
        except Exception as exc:  # best effort: the next sweep tries again
            logger.warning("could not delete unused file %s: %s", upload.file_id, exc)
            continue
        report.files_deleted.append(upload.file_id)
    if report.orphans_cancelled or report.files_deleted:
        logger.warning("recovery sweep of %s: %s", adapter.account, report)
    return report


# ----------------------------------------------------------------------------------------- one SQLite worker


class WorkerLock:
    """One worker per SQLite database: an advisory lock (``flock``) on ``<database>.worker.lock``.

    The operating system releases it when the process ends, however it ends (SIGKILL included), so a crashed
    worker never blocks the next. PostgreSQL needs no such lock (row locks and leases let many workers share it).

    Args:
        database_url: the worker's database.
    """

    def __init__(self, database_url: str) -> None:
        self.database = _sqlite_file(database_url)
        self.path = None if self.database is None else self.database.with_name(self.database.name + ".worker.lock")
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            ConfigError: another worker holds it (the message says what to do).
        """
        if self.path is None or self._fh is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            logger.warning("cannot check for a second worker on %s: no flock on this system", self.path)
            return
        fh = self.path.open("a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise ConfigError(
                f"another batcher worker (pid {holder}) is already running on the SQLite database {self.database}. "
                "SQLite supports a single worker: stop the other one, or use PostgreSQL "
                "(BATCHER_DATABASE_URL=postgresql://…) to run several."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.seek(0)
                self._fh.truncate()
            self._fh.close()  # closing drops the flock
            self._fh = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _sqlite_file(database_url: str) -> Path | None:
    url = sa.engine.make_url(database_url)
    if not url.get_backend_name().startswith("sqlite"):
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).resolve()
