"""Read-side queries shared by the CLI, the Python API and the HTTP API."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from batcher.db.tables import batches, jobs
from batcher.domain import BatchState, JobState


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
    """Jobs, newest first (ids are time-ordered)."""
    query = sa.select(*_JOB_COLUMNS).order_by(jobs.c.id.desc()).limit(limit)
    if run is not None:
        query = query.where(jobs.c.run == run)
    if state is not None:
        query = query.where(jobs.c.state == state.value)
    if batch_id is not None:
        query = query.where(jobs.c.batch_id == batch_id)
    return [JobInfo(**row) for row in (await conn.execute(query)).mappings()]


@dataclass
class RunStatus:
    run: str
    jobs: dict[str, int] = field(default_factory=dict)
    total: int = 0
    oldest_queued_at: datetime | None = None
    batches_in_flight: int = 0

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
        }


@dataclass
class StatusReport:
    totals: dict[str, int]
    runs: list[RunStatus]
    batches: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"totals": self.totals, "runs": [r.to_json() for r in self.runs], "batches": self.batches}


async def status(conn: AsyncConnection, *, run: str | None = None) -> StatusReport:
    """Job counts by state, overall and per run, and batch counts by state."""
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
    for state, count in await conn.execute(sa.select(batches.c.state, sa.func.count()).group_by(batches.c.state)):
        batch_counts[state] = count
    return StatusReport(totals=totals, runs=sorted(runs.values(), key=lambda r: r.run), batches=batch_counts)


async def usage_totals(conn: AsyncConnection, *, run: str | None = None) -> dict[str, int]:
    """Tokens reported by the provider over succeeded jobs (OpenAI and Anthropic usage shapes)."""
    query = sa.select(jobs.c.usage).where(jobs.c.state == JobState.SUCCEEDED.value, jobs.c.usage.is_not(None))
    if run is not None:
        query = query.where(jobs.c.run == run)
    totals = {"jobs": 0, "input_tokens": 0, "output_tokens": 0}
    result = await conn.stream(query.execution_options(yield_per=5000))
    async for (usage,) in result:
        totals["jobs"] += 1
        totals["input_tokens"] += int(usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0)
        totals["output_tokens"] += int(usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0)
    return totals
