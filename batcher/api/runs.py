"""``/v1/runs/{run}``: counts, cost and savings; streamed results; the run's callback; cancel. ``/v1/savings``."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from aiohttp import web
from pydantic import ValidationError

from batcher.api.auth import tenant_of
from batcher.api.errors import from_validation, invalid, not_found
from batcher.api.io import check_query, json_response, query_enum, query_id, query_text, read_body
from batcher.api.models import CancelledRun, ResultLine, RunCallbackIn, RunCallbackOut, RunOut, SavingsOut
from batcher.api.openapi import Param, Route
from batcher.api.state import state_of
from batcher.api.views import JobCost, job_costs, result_fragment
from batcher.db import queries
from batcher.db.tables import jobs, tenant_runs
from batcher.domain import JobState
from batcher.export import ExportState
from batcher.ledger import GROUPINGS, savings
from batcher.tenants import run_prefix
from batcher.timeutil import parse_duration, utcnow

#: settled jobs per database round trip while streaming results
RESULTS_PAGE = 1000
_RUN = re.compile(r"^[^\x00-\x1f\x7f/]{1,128}$")
_SETTLED = {
    ExportState.SUCCEEDED: [JobState.SUCCEEDED.value],
    ExportState.FAILED: [JobState.FAILED.value],
    ExportState.ALL: [JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value],
}


def _run_name(request: web.Request) -> tuple[str, str]:
    """(the run as the tenant names it, as it is stored)."""
    name = request.match_info["run"]
    if not _RUN.match(name):
        raise invalid("a run name is 1 to 128 printable characters without '/'", field="run")
    return name, run_prefix(tenant_of(request).name) + name


def _callback_json(name: str, row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"run": name, "url": row["callback_url"], "armed": bool(row["armed"]), "notified_jobs": row["notified_jobs"]}


async def _callback_row(conn: Any, stored: str) -> Any:
    query = sa.select(tenant_runs.c.callback_url, tenant_runs.c.armed, tenant_runs.c.notified_jobs).where(
        tenant_runs.c.run == stored
    )
    return (await conn.execute(query)).mappings().first()


async def get_run(request: web.Request) -> web.StreamResponse:
    check_query(request, frozenset())
    name, stored = _run_name(request)
    async with state_of(request).db.engine.connect() as conn:
        report = await queries.status(conn, run=stored)
        callback = await _callback_row(conn, stored)
        cost = await savings(conn, run=stored)
    if not report.runs and callback is None:
        raise not_found(f"run {name!r}")
    status = report.runs[0] if report.runs else queries.RunStatus(run=stored, jobs={s.value: 0 for s in JobState})
    totals = cost.totals.to_json()
    return json_response(
        {
            "run": name,
            "jobs": status.jobs,
            "total": status.total,
            "settled": status.settled,
            "oldest_queued_at": None if status.oldest_queued_at is None else status.oldest_queued_at.isoformat(),
            "batches_in_flight": status.batches_in_flight,
            "cost": {
                k: totals[k] for k in ("jobs", "actual_usd", "realtime_usd", "saved_usd", "saved_pct", "unpriced_jobs")
            },
            "callback": _callback_json(name, callback)
            if callback is not None and callback["callback_url"] is not None
            else None,
        }
    )


async def _run_exists(conn: Any, stored: str) -> bool:
    return await conn.scalar(sa.select(jobs.c.id).where(jobs.c.run == stored).limit(1)) is not None


async def run_results(request: web.Request) -> web.StreamResponse:
    check_query(request, frozenset({"state", "after"}))
    state = state_of(request)
    name, stored = _run_name(request)
    which = query_enum(request, "state", ExportState) or ExportState.ALL
    after = query_id(request, "after") or ""
    async with state.db.engine.connect() as conn:
        if not await _run_exists(conn, stored):
            raise not_found(f"run {name!r}")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    columns = (jobs.c.id, jobs.c.custom_id, jobs.c.state, jobs.c.result, jobs.c.error_code, jobs.c.error, jobs.c.usage)
    while True:
        # page by page, no connection held while the client reads
        query = (
            sa.select(*columns)
            .where(jobs.c.run == stored, jobs.c.state.in_(_SETTLED[which]), jobs.c.id > after)
            .order_by(jobs.c.id)
            .limit(RESULTS_PAGE)
        )
        async with state.db.engine.connect() as conn:
            rows = list((await conn.execute(query)).mappings())
            costs = await job_costs(conn, [r["id"] for r in rows])
        if not rows:
            break
        lines = []
        for r in rows:
            cost = costs.get(r["id"])
            line = {
                "id": r["id"],
                "custom_id": r["custom_id"],
                "state": r["state"],
                "result": result_fragment(r["result"]),
                "error_code": r["error_code"],
                "error": r["error"],
                "usage": r["usage"],
                "cost": (cost or JobCost()).to_json(True),
            }
            lines.append(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
        await response.write(b"".join(lines))
        after = rows[-1]["id"]
        if len(rows) < RESULTS_PAGE:
            break
    await response.write_eof()
    return response


async def put_callback(request: web.Request) -> web.StreamResponse:
    check_query(request, frozenset())
    state = state_of(request)
    tenant = tenant_of(request)
    name, stored = _run_name(request)
    body = await read_body(request, 1 << 16, "a callback body is at most 64 KiB")
    try:
        given = RunCallbackIn.model_validate_json(body, context={"allow_private": state.settings.webhook_allow_private})
    except ValidationError as exc:
        raise from_validation(exc) from None
    now = utcnow()
    async with state.db.engine.begin() as conn:
        await conn.execute(
            state.db.insert(tenant_runs)
            .values(
                run=stored,
                tenant=tenant.name,
                callback_url=None,
                armed=False,
                arm_seq=0,
                notified_jobs=0,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["run"])
        )
        # armed: fires once every job of the run has settled (at once, if they all have)
        await conn.execute(
            sa.update(tenant_runs)
            .where(tenant_runs.c.run == stored)
            .values(callback_url=given.url, armed=True, arm_seq=tenant_runs.c.arm_seq + 1, updated_at=now)
        )
        row = await _callback_row(conn, stored)
    return json_response(_callback_json(name, row))


async def delete_callback(request: web.Request) -> web.StreamResponse:
    check_query(request, frozenset())
    state = state_of(request)
    name, stored = _run_name(request)
    async with state.db.engine.begin() as conn:
        result = await conn.execute(
            sa.update(tenant_runs)
            .where(tenant_runs.c.run == stored, tenant_runs.c.callback_url.is_not(None))
            .values(callback_url=None, armed=False, updated_at=utcnow())
        )
    if result.rowcount == 0:
        raise not_found(f"callback of run {name!r}")
    return web.Response(status=204)


async def cancel_run(request: web.Request) -> web.StreamResponse:
    check_query(request, frozenset())
    state = state_of(request)
    name, stored = _run_name(request)
    async with state.db.engine.connect() as conn:
        if not await _run_exists(conn, stored):
            raise not_found(f"run {name!r}")
    report = await state.run_pipeline().cancel_run(stored, utcnow())
    return json_response(
        {
            "run": name,
            "jobs_cancelled": report.jobs_cancelled,
            "batches_cancelled": report.batches_cancelled,
            "batches_shared": report.batches_shared,
        }
    )


def _since(text: str) -> datetime:
    try:
        return utcnow() - parse_duration(text)
    except ValueError:
        pass
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise invalid(f"since {text!r}: give a duration (7d, 36h) or an ISO 8601 time", field="since") from None
    if value.tzinfo is None:
        raise invalid("since: give the time zone (e.g. 2026-11-01T00:00:00Z)", field="since")
    return value


async def get_savings(request: web.Request) -> web.StreamResponse:
    check_query(request, frozenset({"by", "since", "run"}))
    state = state_of(request)
    tenant = tenant_of(request)
    by = query_text(request, "by", max_length=100)
    if by is not None and by not in GROUPINGS and not (by.startswith("tag:") and len(by) > 4):
        raise invalid(f"by {by!r}: use one of {', '.join(GROUPINGS)} or tag:KEY", field="by")
    since_text = query_text(request, "since", max_length=64)
    since = None if since_text is None else _since(since_text)
    run = query_text(request, "run", max_length=128)
    prefix = run_prefix(tenant.name)
    async with state.db.engine.connect() as conn:
        if run is not None:
            runs = [prefix + run]
        else:
            query = sa.select(tenant_runs.c.run).where(tenant_runs.c.tenant == tenant.name)
            runs = [r for (r,) in await conn.execute(query)]
        report = await savings(conn, runs=runs, since=since, by=by)
    out = report.to_json()
    if by == "run":
        for group in out["groups"]:
            group["key"] = str(group["key"]).removeprefix(prefix)
    return json_response(out)


_RUN_PARAM = Param("run", "path", "the run's name")

ROUTES = [
    Route(
        "GET",
        "/v1/runs/{run}",
        get_run,
        "A run: job counts, cost and savings, callback",
        "getRun",
        response=RunOut,
        params=(_RUN_PARAM,),
        errors=(401, 404, 422),
    ),
    Route(
        "GET",
        "/v1/runs/{run}/results",
        run_results,
        "The run's settled jobs, streamed as JSON Lines (one ResultLine each, in id order)",
        "getRunResults",
        response=ResultLine,
        media_type="application/x-ndjson",
        params=(
            _RUN_PARAM,
            Param("state", "query", "which settled jobs", {"enum": [s.value for s in ExportState]}),
            Param("after", "query", "only jobs after this id (resume a download)"),
        ),
        errors=(401, 404, 422),
    ),
    Route(
        "PUT",
        "/v1/runs/{run}/callback",
        put_callback,
        "POST the run's summary to a URL once every job of it has settled",
        "setRunCallback",
        request=RunCallbackIn,
        response=RunCallbackOut,
        params=(_RUN_PARAM,),
        errors=(401, 413, 422),
    ),
    Route(
        "DELETE",
        "/v1/runs/{run}/callback",
        delete_callback,
        "Remove the run's callback",
        "deleteRunCallback",
        status=204,
        params=(_RUN_PARAM,),
        errors=(401, 404, 422),
    ),
    Route(
        "POST",
        "/v1/runs/{run}/cancel",
        cancel_run,
        "Cancel the run's queued jobs and the provider batches that hold only its jobs",
        "cancelRun",
        response=CancelledRun,
        params=(_RUN_PARAM,),
        errors=(401, 404, 422, 503),
    ),
    Route(
        "GET",
        "/v1/savings",
        get_savings,
        "What batching saved: actual cost next to the real-time equivalent, in total and per group",
        "getSavings",
        response=SavingsOut,
        params=(
            Param("by", "query", f"group by {', '.join(GROUPINGS)} or tag:KEY"),
            Param("since", "query", "only entries settled since: a duration (7d) or an ISO 8601 time"),
            Param("run", "query", "only this run"),
        ),
    ),
]
