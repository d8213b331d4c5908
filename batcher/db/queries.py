"""Read-side queries shared by the CLI, the Python API and the HTTP API."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from batcher.db.tables import batches, jobs, ledger
from batcher.domain import BatchState, JobState
from batcher.ledger import cost_by_run


@dataclass(frozen=True)
class JobInfo:
    """One job as the outside sees it."""

    id: str
    run: str
    provider: str
    account: str
    endpoint: str
    model: str
    custom_id: str
    state: str
    attempts: int
    priority: int
    tags: dict[str, Any]
    batch_id: str | None
    not_after: datetime | None
    created_at: datetime
    updated_at: datetime
    settled_at: datetime | None
    error_code: str | None
    error: Any
    usage: Any
    result: str | None = None

    def to_json(self, *, with_result: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "run": self.run,
            "provider": self.provider,
            "account": self.account,
            "endpoint": self.endpoint,
            "model": self.model,
            "custom_id": self.custom_id,
            "state": self.state,
            "attempts": self.attempts,
            "priority": self.priority,
            "tags": self.tags,
            "batch_id": self.batch_id,
            "not_after": _iso(self.not_after),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "settled_at": _iso(self.settled_at),
            "error_code": self.error_code,
            "error": self.error,
            "usage": self.usage,
        }
        if with_result:
            out["result"] = self.result
        return out


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


_JOB_COLUMNS = [
    jobs.c.id,
    jobs.c.run,
    jobs.c.provider,
    jobs.c.account,
    jobs.c.endpoint,
    jobs.c.model,
    jobs.c.custom_id,
    jobs.c.state,
    jobs.c.attempts,
    jobs.c.priority,
    jobs.c.tags,
    jobs.c.batch_id,
    jobs.c.not_after,
    jobs.c.created_at,
    jobs.c.updated_at,
    jobs.c.settled_at,
    jobs.c.error_code,
    jobs.c.error,
    jobs.c.usage,
]


async def get_job(conn: AsyncConnection, job_id: str) -> JobInfo | None:
    row = (await conn.execute(sa.select(*_JOB_COLUMNS, jobs.c.result).where(jobs.c.id == job_id))).mappings().first()
    return None if row is None else JobInfo(**row)


async def list_jobs(
    conn: AsyncConnection,
    *,
    run: str | None = None,
    state: JobState | None = None,
    batch_id: str | None = None,
    limit: int = 50,
) -> list[JobInfo]:
    """Jobs, newest first (ids are time-ordered). ``batch_id`` is our batch id or the provider's."""
    query = sa.select(*_JOB_COLUMNS).order_by(jobs.c.id.desc()).limit(limit)
    if run is not None:
        query = query.where(jobs.c.run == run)
    if state is not None:
        query = query.where(jobs.c.state == state.value)
    if batch_id is not None:
        # our batch id or the provider's
        named = sa.select(batches.c.id).where(sa.or_(batches.c.id == batch_id, batches.c.provider_batch_id == batch_id))
        query = query.where(jobs.c.batch_id.in_(named))
    return [JobInfo(**row) for row in (await conn.execute(query)).mappings()]


@dataclass
class RunStatus:
    run: str
    jobs: dict[str, int] = field(default_factory=dict)
    total: int = 0
    oldest_queued_at: datetime | None = None
    batches_in_flight: int = 0
    #: cost so far from the ledger (``None``: nothing settled yet)
    actual_usd: Decimal | None = None
    realtime_usd: Decimal | None = None
    unpriced_jobs: int = 0

    @property
    def settled(self) -> int:
        return sum(self.jobs.get(s.value, 0) for s in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED))

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "jobs": self.jobs,
            "total": self.total,
            "settled": self.settled,
            "oldest_queued_at": _iso(self.oldest_queued_at),
            "batches_in_flight": self.batches_in_flight,
            "actual_usd": None if self.actual_usd is None else str(self.actual_usd),
            "realtime_usd": None if self.realtime_usd is None else str(self.realtime_usd),
            "saved_usd": (
                None
                if self.actual_usd is None or self.realtime_usd is None
                else str(self.realtime_usd - self.actual_usd)
            ),
            "unpriced_jobs": self.unpriced_jobs,
        }


@dataclass
class StatusReport:
    totals: dict[str, int]
    runs: list[RunStatus]
    batches: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"totals": self.totals, "runs": [r.to_json() for r in self.runs], "batches": self.batches}


async def status(conn: AsyncConnection, *, run: str | None = None) -> StatusReport:
    """Job counts by state, overall and per run, and batch counts by state (only ``run``'s batches, if given)."""
    query = sa.select(jobs.c.run, jobs.c.state, sa.func.count(), sa.func.min(jobs.c.queued_at)).group_by(
        jobs.c.run, jobs.c.state
    )
    if run is not None:
        query = query.where(jobs.c.run == run)
    totals = {s.value: 0 for s in JobState}
    runs: dict[str, RunStatus] = {}
    for run_name, state, count, oldest in await conn.execute(query):
        info = runs.setdefault(run_name, RunStatus(run=run_name, jobs={s.value: 0 for s in JobState}))
        info.jobs[state] = count
        info.total += count
        totals[state] += count
        if state == JobState.QUEUED.value and oldest is not None:
            info.oldest_queued_at = oldest
    in_flight = (
        sa.select(jobs.c.run, sa.func.count(sa.distinct(jobs.c.batch_id)))
        .where(jobs.c.state.in_([JobState.PACKED.value, JobState.SUBMITTED.value]))
        .group_by(jobs.c.run)
    )
    if run is not None:
        in_flight = in_flight.where(jobs.c.run == run)
    for run_name, count in await conn.execute(in_flight):
        if run_name in runs:
            runs[run_name].batches_in_flight = count
    batch_counts = {s.value: 0 for s in BatchState}
    by_state = sa.select(batches.c.state, sa.func.count()).group_by(batches.c.state)
    if run is not None:
        by_state = by_state.where(batches.c.id.in_(_batches_of_run(run)))
    for state, count in await conn.execute(by_state):
        batch_counts[state] = count
    for name, cost in (await cost_by_run(conn, list(runs))).items():
        runs[name].actual_usd, runs[name].realtime_usd = cost.actual_usd, cost.realtime_usd
        runs[name].unpriced_jobs = cost.unpriced_jobs
    return StatusReport(totals=totals, runs=sorted(runs.values(), key=lambda r: r.run), batches=batch_counts)


@dataclass(frozen=True)
class BatchInfo:
    """One provider batch as the outside sees it, with what its requests cost so far.

    ``actual_usd`` / ``realtime_usd`` are sums over the batch's ledger entries: ``None`` until one is priced.
    """

    id: str
    provider: str
    account: str
    provider_batch_id: str | None
    model: str
    endpoint: str
    state: str
    provider_state: str | None
    request_count: int
    succeeded: int
    failed: int
    expired: int
    cancelled: int
    created_at: datetime
    submitted_at: datetime | None
    ended_at: datetime | None
    collected_at: datetime | None
    actual_usd: Decimal | None
    realtime_usd: Decimal | None

    def age_s(self, now: datetime) -> float | None:
        """Seconds since the batch was made, while the provider has not ended it (``None`` once ended)."""
        return None if self.ended_at is not None else round((now - self.created_at).total_seconds(), 3)

    @property
    def turnaround_s(self) -> float | None:
        """Seconds from submission (or creation, if never submitted) to the provider's end; ``None`` until then."""
        if self.ended_at is None:
            return None
        return round((self.ended_at - (self.submitted_at or self.created_at)).total_seconds(), 3)

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {
            "id": self.id,
            "provider": self.provider,
            "account": self.account,
            "provider_batch_id": self.provider_batch_id,
            "model": self.model,
            "endpoint": self.endpoint,
            "state": self.state,
            "provider_state": self.provider_state,
            "requests": {
                "total": self.request_count,
                "succeeded": self.succeeded,
                "failed": self.failed,
                "expired": self.expired,
                "cancelled": self.cancelled,
            },
            "created_at": _iso(self.created_at),
            "submitted_at": _iso(self.submitted_at),
            "ended_at": _iso(self.ended_at),
            "collected_at": _iso(self.collected_at),
            "age_s": self.age_s(now),
            "turnaround_s": self.turnaround_s,
            "actual_usd": _money(self.actual_usd),
            "realtime_usd": _money(self.realtime_usd),
        }


@dataclass(frozen=True)
class BatchDetail:
    """Everything about one batch: its :class:`BatchInfo`, the provider's errors, polling, lease, files, jobs."""

    info: BatchInfo
    errors: list[Any] | None
    bytes: int
    submit_attempts: int
    last_polled_at: datetime | None
    next_poll_at: datetime | None
    poll_interval_s: float
    lease_owner: str | None
    lease_expires_at: datetime | None
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    updated_at: datetime
    #: jobs whose current batch this is, by state (a requeued job moves on to its next batch)
    jobs: dict[str, int]
    #: up to ``FAILED_SAMPLE`` of its failed jobs
    failed_jobs: list[dict[str, Any]]

    def to_json(self, now: datetime) -> dict[str, Any]:
        return self.info.to_json(now) | {
            "errors": self.errors,
            "bytes": self.bytes,
            "submit_attempts": self.submit_attempts,
            "last_polled_at": _iso(self.last_polled_at),
            "next_poll_at": _iso(self.next_poll_at),
            "poll_interval_s": self.poll_interval_s,
            "lease_owner": self.lease_owner,
            "lease_expires_at": _iso(self.lease_expires_at),
            "input_file_id": self.input_file_id,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "updated_at": _iso(self.updated_at),
            "jobs": self.jobs,
            "failed_jobs": self.failed_jobs,
        }


def _money(value: Decimal | None) -> str | None:
    """Money in JSON is a string: exact, never a float."""
    return None if value is None else str(value)


#: how many failed jobs ``batch_detail`` shows
FAILED_SAMPLE = 10

_BATCH_COLUMNS = [
    batches.c.id,
    batches.c.provider,
    batches.c.account,
    batches.c.provider_batch_id,
    batches.c.model,
    batches.c.endpoint,
    batches.c.state,
    batches.c.provider_state,
    batches.c.request_count,
    batches.c.succeeded,
    batches.c.failed,
    batches.c.expired,
    batches.c.cancelled,
    batches.c.created_at,
    batches.c.submitted_at,
    batches.c.ended_at,
    batches.c.collected_at,
]


def _batches_with_cost() -> sa.Select[Any]:
    cost = (
        sa.select(
            ledger.c.batch_id,
            sa.func.sum(ledger.c.actual_usd).label("actual_usd"),
            sa.func.sum(ledger.c.realtime_usd).label("realtime_usd"),
        )
        .where(ledger.c.batch_id.is_not(None))
        .group_by(ledger.c.batch_id)
        .subquery("cost")
    )
    return sa.select(*_BATCH_COLUMNS, cost.c.actual_usd, cost.c.realtime_usd).select_from(
        batches.outerjoin(cost, cost.c.batch_id == batches.c.id)
    )


def _batches_of_run(run: str) -> sa.CompoundSelect[Any]:
    """Ids of the batches holding jobs of ``run``: a job names only its latest batch, so a batch whose jobs were
    all requeued into later batches is found through the ledger once its results are priced."""
    return sa.union(
        sa.select(jobs.c.batch_id).where(jobs.c.run == run, jobs.c.batch_id.is_not(None)),
        sa.select(ledger.c.batch_id).where(ledger.c.run == run, ledger.c.batch_id.is_not(None)),
    )


async def list_batches(
    conn: AsyncConnection,
    *,
    run: str | None = None,
    provider: str | None = None,
    state: BatchState | None = None,
    since: datetime | None = None,
    limit: int = 50,
) -> list[BatchInfo]:
    """Batches, newest first.

    Args:
        run: only batches that hold jobs of this run. A job names only its latest batch, so a batch whose jobs
            were all requeued into later batches is found through the ledger once its results are priced.
        provider: only this provider's batches.
        state: only batches in this state.
        since: only batches created at or after this time.
        limit: at most this many.
    """
    query = _batches_with_cost().order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit)
    if run is not None:
        query = query.where(batches.c.id.in_(_batches_of_run(run)))
    if provider is not None:
        query = query.where(batches.c.provider == provider)
    if state is not None:
        query = query.where(batches.c.state == state.value)
    if since is not None:
        query = query.where(batches.c.created_at >= since)
    return [BatchInfo(**row) for row in (await conn.execute(query)).mappings()]


async def resolve_batch_ids(conn: AsyncConnection, ref: str) -> list[str]:
    """Our ids of the batches ``ref`` names: our own id, or the provider's batch id (one per account)."""
    query = sa.select(batches.c.id).where(sa.or_(batches.c.id == ref, batches.c.provider_batch_id == ref))
    return sorted(r[0] for r in await conn.execute(query))


async def batch_detail(conn: AsyncConnection, batch_id: str) -> BatchDetail | None:
    """Everything about one batch (by our id), or ``None``."""
    row = (await conn.execute(_batches_with_cost().where(batches.c.id == batch_id))).mappings().first()
    if row is None:
        return None
    extra = (
        (
            await conn.execute(
                sa.select(
                    batches.c.errors,
                    batches.c.bytes,
                    batches.c.submit_attempts,
                    batches.c.last_polled_at,
                    batches.c.next_poll_at,
                    batches.c.poll_interval_s,
                    batches.c.lease_owner,
                    batches.c.lease_expires_at,
                    batches.c.input_file_id,
                    batches.c.output_file_id,
                    batches.c.error_file_id,
                    batches.c.updated_at,
                ).where(batches.c.id == batch_id)
            )
        )
        .mappings()
        .one()
    )
    counts = {s.value: 0 for s in JobState}
    for state, count in await conn.execute(
        sa.select(jobs.c.state, sa.func.count()).where(jobs.c.batch_id == batch_id).group_by(jobs.c.state)
    ):
        counts[state] = count
    failed = [
        dict(r)
        for r in (
            await conn.execute(
                sa.select(jobs.c.id, jobs.c.run, jobs.c.custom_id, jobs.c.error_code, jobs.c.error)
                .where(jobs.c.batch_id == batch_id, jobs.c.state == JobState.FAILED.value)
                .order_by(jobs.c.id)
                .limit(FAILED_SAMPLE)
            )
        ).mappings()
    ]
    return BatchDetail(info=BatchInfo(**row), **extra, jobs=counts, failed_jobs=failed)
