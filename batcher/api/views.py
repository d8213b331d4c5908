"""Jobs, costs and webhook deliveries as the HTTP API (and the webhooks it sends) show them.

Plain dicts built straight from rows, documented by :mod:`batcher.api.models`. A stored result is the
provider's response body as JSON text; it is spliced into the answer unparsed (:class:`orjson.Fragment`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from batcher.db.tables import jobs, ledger, webhook_deliveries
from batcher.domain import JOB_TERMINAL, Provider

JOB_COLUMNS = [
    jobs.c.id,
    jobs.c.custom_id,
    jobs.c.run,
    jobs.c.provider,
    jobs.c.endpoint,
    jobs.c.model,
    jobs.c.state,
    jobs.c.attempts,
    jobs.c.priority,
    jobs.c.tags,
    jobs.c.not_after,
    jobs.c.created_at,
    jobs.c.updated_at,
    jobs.c.settled_at,
    jobs.c.error_code,
    jobs.c.error,
    jobs.c.usage,
    jobs.c.tenant,
    jobs.c.callback_url,
]

DELIVERY_COLUMNS = [
    webhook_deliveries.c.id,
    webhook_deliveries.c.tenant,
    webhook_deliveries.c.event,
    webhook_deliveries.c.job_id,
    webhook_deliveries.c.run,
    webhook_deliveries.c.url,
    webhook_deliveries.c.state,
    webhook_deliveries.c.attempts,
    webhook_deliveries.c.next_attempt_at,
    webhook_deliveries.c.last_attempt_at,
    webhook_deliveries.c.last_status,
    webhook_deliveries.c.last_error,
    webhook_deliveries.c.created_at,
    webhook_deliveries.c.delivered_at,
]

_TERMINAL = frozenset(s.value for s in JOB_TERMINAL)


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def money(value: Decimal | None) -> str | None:
    """Money in JSON is a string: exact, never a float."""
    return None if value is None else str(value)


def public_run(run: str, tenant: str | None) -> str:
    """A stored run name as its tenant knows it (``acme/nightly`` → ``nightly``)."""
    return run if tenant is None else run.removeprefix(f"{tenant}/")


def result_fragment(result: str | None) -> orjson.Fragment | None:
    return None if result is None else orjson.Fragment(result)


class JobCost:
    """A job's ledger entries summed: ``None`` amounts when any entry has no price."""

    __slots__ = ("actual", "entries", "priced", "realtime")

    def __init__(
        self, entries: int = 0, priced: int = 0, actual: Decimal | None = None, realtime: Decimal | None = None
    ):
        self.entries = entries
        self.priced = priced
        self.actual = actual
        self.realtime = realtime

    def to_json(self, settled: bool) -> dict[str, str | None] | None:
        if not self.entries:
            # a job settled without a provider request (cancelled in the queue) cost nothing
            return {"actual_usd": "0", "realtime_usd": "0", "saved_usd": "0"} if settled else None
        if self.priced < self.entries or self.actual is None or self.realtime is None:
            return {"actual_usd": None, "realtime_usd": None, "saved_usd": None}
        return {
            "actual_usd": str(self.actual),
            "realtime_usd": str(self.realtime),
            "saved_usd": str(self.realtime - self.actual),
        }


async def job_costs(conn: AsyncConnection, ids: Sequence[str]) -> dict[str, JobCost]:
    """Ledger sums per job."""
    if not ids:
        return {}
    query = (
        sa.select(
            ledger.c.job_id,
            sa.func.count(),
            sa.func.count(ledger.c.actual_usd),
            sa.func.sum(ledger.c.actual_usd),
            sa.func.sum(ledger.c.realtime_usd),
        )
        .where(ledger.c.job_id.in_(list(ids)))
        .group_by(ledger.c.job_id)
    )
    return {row[0]: JobCost(int(row[1]), int(row[2]), row[3], row[4]) for row in await conn.execute(query)}


def delivery_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "event": row["event"],
        "job_id": row["job_id"],
        "run": None if row["run"] is None else public_run(row["run"], row["tenant"]),
        "url": row["url"],
        "state": row["state"],
        "attempts": row["attempts"],
        "next_attempt_at": iso(row["next_attempt_at"]),
        "last_attempt_at": iso(row["last_attempt_at"]),
        "last_status": row["last_status"],
        "last_error": row["last_error"],
        "created_at": iso(row["created_at"]),
        "delivered_at": iso(row["delivered_at"]),
    }


async def job_deliveries(conn: AsyncConnection, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The webhook delivery of each job that has one."""
    if not ids:
        return {}
    query = sa.select(*DELIVERY_COLUMNS).where(webhook_deliveries.c.job_id.in_(list(ids)))
    return {row["job_id"]: delivery_json(row) for row in (await conn.execute(query)).mappings()}


def job_json(
    row: Mapping[Any, Any],
    *,
    cost: JobCost | None,
    webhook: dict[str, Any] | None,
    result: str | None = None,
    with_result: bool = False,
) -> dict[str, Any]:
    """A job as the API shows it (:class:`batcher.api.models.JobOut`)."""
    settled = row["state"] in _TERMINAL
    out: dict[str, Any] = {
        "id": row["id"],
        "custom_id": row["custom_id"],
        "run": public_run(row["run"], row["tenant"]),
        "provider": row["provider"],
        "url": row["endpoint"] if row["provider"] == Provider.OPENAI.value else None,
        "model": row["model"],
        "state": row["state"],
        "attempts": row["attempts"],
        "priority": row["priority"],
        "tags": row["tags"],
        "not_after": iso(row["not_after"]),
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
        "settled_at": iso(row["settled_at"]),
        "result": result_fragment(result) if with_result else None,
        "error_code": row["error_code"],
        "error": row["error"],
        "usage": row["usage"],
        "cost": (cost or JobCost()).to_json(settled),
        # once its delivery is scheduled the job's own column is cleared; the delivery keeps the URL
        "callback_url": row["callback_url"] if row["callback_url"] is not None else (webhook or {}).get("url"),
        "webhook": webhook,
    }
    return out


async def jobs_json(
    conn: AsyncConnection, rows: Iterable[Mapping[Any, Any]], *, with_result: bool = False
) -> list[dict[str, Any]]:
    """Jobs with their costs and webhook deliveries (two more queries for the lot)."""
    rows = list(rows)
    ids = [r["id"] for r in rows]
    costs = await job_costs(conn, ids)
    hooks = await job_deliveries(conn, ids)
    return [
        job_json(
            r,
            cost=costs.get(r["id"]),
            webhook=hooks.get(r["id"]),
            result=r.get("result") if with_result else None,
            with_result=with_result,
        )
        for r in rows
    ]
