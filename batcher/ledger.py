"""The cost ledger: one append-only entry per settled provider request, and the savings reports over it.

An entry is written in the same transaction that settles its job, by ``INSERT … SELECT`` from the job row
still in ``submitted`` state, with ``ON CONFLICT (job_id, attempt) DO NOTHING``: a result settled twice
(a retried collect, a duplicate line) writes nothing the second time, and a line for a job that is not
in the batch writes nothing at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from batcher.db.bulk import RowValues, filter_only
from batcher.db.engine import Database
from batcher.db.tables import jobs, ledger
from batcher.domain import JobState
from batcher.pricing import ZERO_COST, Cost, TokenUsage

#: columns an entry takes from bind parameters (the rest come from the job row)
_PARAMS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_creation_tokens",
    "cache_creation_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
    "actual_usd",
    "realtime_usd",
    "batch_price_derived",
    "price_source",
    "price_version",
)

#: the values of an entry that do not come from its job row, in the order of :func:`entry_row`
ENTRY_VALUES: dict[str, sa.types.TypeEngine[Any]] = {
    "job_id": ledger.c.job_id.type,
    **{name: ledger.c[name].type for name in _PARAMS},
}


def entry_row(job_id: str, usage: TokenUsage | None, cost: Cost) -> tuple[Any, ...]:
    """One entry's :data:`ENTRY_VALUES`. A request the provider did not bill has no usage and costs 0."""
    if usage is None:
        usage, cost = TokenUsage(), ZERO_COST
    return (
        job_id,
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.cache_creation_tokens,
        usage.cache_creation_1h_tokens,
        usage.output_tokens,
        usage.reasoning_tokens,
        cost.actual_usd,
        cost.realtime_usd,
        cost.batch_price_derived,
        cost.price_source,
        cost.price_version,
    )


def entry_params(job_id: str, usage: TokenUsage | None, cost: Cost) -> dict[str, Any]:
    """:func:`entry_row` as bind parameters named ``l_<column>``, for a statement that records one entry."""
    return {f"l_{name}": value for name, value in zip(ENTRY_VALUES, entry_row(job_id, usage, cost), strict=True)}


def entries_from_batch(
    db: Database,
    values: RowValues,
    *,
    only: sa.ColumnElement[bool] | None = None,
    state: JobState = JobState.SUBMITTED,
) -> Any:
    """The INSERT that records an entry per row of ``values`` whose job is in the batch and still ``submitted``.

    Run before the jobs settle: a job settled before writes nothing. The statement binds ``batch_id``, ``mode``
    and ``now`` (the entries' ``settled_at``).

    Args:
        values: the rows, with the columns of :data:`ENTRY_VALUES`.
        only: a further condition on the job row (e.g. its attempts are used up).
        state: ``cancelled`` instead: jobs cancelled while their batch was being sent, which the provider ran
            (and billed) all the same. Their attempt never counted, so the entry is for the next one.
    """
    attempt = jobs.c.attempts if state is JobState.SUBMITTED else jobs.c.attempts + 1
    select = sa.select(
        jobs.c.id,
        attempt,
        jobs.c.batch_id,
        jobs.c.provider,
        jobs.c.account,
        jobs.c.model,
        jobs.c.run,
        jobs.c.tags,
        sa.bindparam("mode", type_=ledger.c.mode.type),
        *(values.c[name] for name in _PARAMS),
        sa.bindparam("now", type_=ledger.c.settled_at.type),
    ).where(
        jobs.c.id == values.c["job_id"],
        filter_only(jobs.c.batch_id) == sa.bindparam("batch_id", type_=jobs.c.batch_id.type),
        filter_only(jobs.c.state) == state.value,
        *(() if only is None else (only,)),
    )
    columns = ["job_id", "attempt", "batch_id", "provider", "account", "model", "run", "tags", "mode", *_PARAMS]
    return (
        db.insert(ledger)
        .from_select([*columns, "settled_at"], select)
        .on_conflict_do_nothing(index_elements=["job_id", "attempt"])
    )


# ------------------------------------------------------------------------------------------------ reports

GROUPINGS = ("provider", "model", "run", "day")


@dataclass
class SavingsRow:
    """Totals for one group (or for everything)."""

    key: str | None
    jobs: int = 0
    actual_usd: Decimal = Decimal(0)
    realtime_usd: Decimal = Decimal(0)
    input_tokens: int = 0
    output_tokens: int = 0
    unpriced_jobs: int = 0

    @property
    def saved_usd(self) -> Decimal:
        return self.realtime_usd - self.actual_usd

    @property
    def saved_pct(self) -> float:
        if not self.realtime_usd:
            return 0.0
        return round(float(self.saved_usd / self.realtime_usd * 100), 2)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.key is None else {"key": self.key}
        out |= {
            "jobs": self.jobs,
            "actual_usd": str(self.actual_usd),
            "realtime_usd": str(self.realtime_usd),
            "saved_usd": str(self.saved_usd),
            "saved_pct": self.saved_pct,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "unpriced_jobs": self.unpriced_jobs,
        }
        return out


@dataclass
class SavingsReport:
    by: str | None
    totals: SavingsRow
    groups: list[SavingsRow] = field(default_factory=list)
    unpriced_models: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "totals": self.totals.to_json(),
            "groups": [g.to_json() for g in self.groups],
            "unpriced_models": self.unpriced_models,
        }


def _group_column(by: str) -> sa.ColumnElement[Any]:
    if by in ("provider", "model", "run"):
        return ledger.c[by]
    if by == "day":
        return sa.func.date(ledger.c.settled_at)
    if by.startswith("tag:") and len(by) > 4:
        tag: sa.ColumnElement[Any] = ledger.c.tags[by[4:]].as_string()
        return tag
    raise ValueError(f"cannot group by {by!r}: use provider, model, run, day or tag:KEY")


async def savings(
    conn: AsyncConnection,
    *,
    run: str | None = None,
    runs: list[str] | None = None,
    since: datetime | None = None,
    by: str | None = None,
) -> SavingsReport:
    """Actual cost, real-time equivalent and savings, in total and per group.

    Unpriced entries count in ``jobs`` and ``unpriced_jobs`` and add nothing to the amounts (their cost is
    unknown, not zero).

    Raises:
        ValueError: an unknown grouping.
    """
    conditions: list[sa.ColumnElement[bool]] = []
    if run is not None:
        conditions.append(ledger.c.run == run)
    if runs is not None:
        conditions.append(ledger.c.run.in_(runs))
    if since is not None:
        conditions.append(ledger.c.settled_at >= since)
    measures = [
        sa.func.count(),
        sa.func.sum(ledger.c.actual_usd),
        sa.func.sum(ledger.c.realtime_usd),
        sa.func.sum(ledger.c.input_tokens),
        sa.func.sum(ledger.c.output_tokens),
        sa.func.sum(sa.case((ledger.c.actual_usd.is_(None), 1), else_=0)),
    ]

    def row(key: Any, values: Any) -> SavingsRow:
        count, actual, realtime, tokens_in, tokens_out, unpriced = values
        return SavingsRow(
            key=None if key is None else str(key),
            jobs=int(count or 0),
            actual_usd=actual if actual is not None else Decimal(0),
            realtime_usd=realtime if realtime is not None else Decimal(0),
            input_tokens=int(tokens_in or 0),
            output_tokens=int(tokens_out or 0),
            unpriced_jobs=int(unpriced or 0),
        )

    groups: list[SavingsRow] = []
    if by is None:
        totals = row(None, (await conn.execute(sa.select(*measures).where(*conditions))).one())
    else:
        key = _group_column(by).label("key")
        query = sa.select(key, *measures).where(*conditions).group_by(key).order_by(key)
        for r in await conn.execute(query):
            groups.append(row(r[0] if r[0] is not None else "(none)", r[1:]))
        totals = SavingsRow(key=None)
        for g in groups:
            totals.jobs += g.jobs
            totals.actual_usd += g.actual_usd
            totals.realtime_usd += g.realtime_usd
            totals.input_tokens += g.input_tokens
            totals.output_tokens += g.output_tokens
            totals.unpriced_jobs += g.unpriced_jobs
    unpriced_models: list[str] = []
    if by == "model":
        unpriced_models = [g.key for g in groups if g.unpriced_jobs and g.key is not None]
    elif totals.unpriced_jobs:
        query = sa.select(ledger.c.model).where(ledger.c.actual_usd.is_(None), *conditions).distinct()
        unpriced_models = sorted(m for (m,) in await conn.execute(query))
    return SavingsReport(by=by, totals=totals, groups=groups, unpriced_models=unpriced_models)


async def cost_by_run(conn: AsyncConnection, runs: list[str]) -> dict[str, SavingsRow]:
    """Cost so far for each of ``runs`` (for ``batcher status``)."""
    if not runs:
        return {}
    report = await savings(conn, runs=runs, by="run")
    return {g.key: g for g in report.groups if g.key is not None}
