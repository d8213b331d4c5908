"""``/v1/jobs``: enqueue one or many, read, list, cancel. A tenant only ever sees its own jobs (others: 404)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from batcher.api.auth import tenant_of
from batcher.api.enqueue import Answer, Submission, record_answer, stored_answer
from batcher.api.errors import ApiError, from_intake, from_validation, invalid, not_found
from batcher.api.io import (
    answer_response,
    check_query,
    idempotency_key,
    json_response,
    query_enum,
    query_id,
    query_int,
    query_text,
    read_body,
)
from batcher.api.models import BulkAccepted, JobAccepted, JobIn, JobOut, JobPage
from batcher.api.openapi import IDEMPOTENCY, Param, Route
from batcher.api.state import state_of
from batcher.api.views import JOB_COLUMNS, jobs_json
from batcher.db.tables import jobs
from batcher.domain import JobState, Provider, new_id
from batcher.errors import InvalidInput
from batcher.tenants import Tenant, run_prefix
from batcher.timeutil import utcnow

_BULK = TypeAdapter(list[JobIn])
#: bad JSONL lines listed in one answer
_MAX_LINE_ERRORS = 50


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a bulk POST is validated and stored.

    Validating and storing a big body makes tens of thousands of objects, which sets off full collections of the
    whole heap again and again: they doubled the time of a 10,000-job POST. Reference counting still frees
    everything meanwhile (only reference cycles wait), and the pause lasts one request: a second or two for the
    largest bodies the size limits let in.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _context(request: web.Request) -> dict[str, Any]:
    return {"allow_private": state_of(request).settings.webhook_allow_private}


@dataclass(frozen=True, slots=True)
class ApiSpec:
    """A validated job as intake takes it (:class:`batcher.intake.SpecLike`), in its tenant's namespace of runs.

    Not a :class:`batcher.domain.JobSpec`: :class:`JobIn` has checked every field and intake checks the request
    itself, and building a pydantic model per job again was a tenth of a bulk POST's time.
    """

    provider: Provider
    endpoint: str
    model: str
    custom_id: str
    body: dict[str, Any]
    run: str
    account: str | None
    tags: dict[str, str]
    priority: int
    not_after: datetime | None


def to_spec(job: JobIn, tenant: Tenant, custom_id: str) -> ApiSpec:
    """A validated job as intake takes it, in the tenant's namespace of runs."""
    model = job.body.get("model")
    return ApiSpec(
        job.provider,
        job.endpoint(),
        model if isinstance(model, str) else "",
        custom_id,
        job.body,
        run_prefix(tenant.name) + job.run,
        None,
        job.tags,
        job.priority,
        job.not_after,
    )


async def post_job(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    tenant = tenant_of(request)
    body = await read_body(request, state.settings.api_max_job_bytes, "BATCHER_API_MAX_JOB_BYTES")
    idem = idempotency_key(request, body)
    if idem is not None:
        stored = await stored_answer(state.db, tenant.name, idem)
        if stored is not None:
            return answer_response(stored)
    try:
        job = JobIn.model_validate_json(body, context=_context(request))
    except ValidationError as exc:
        raise from_validation(exc) from None
    custom_id = job.custom_id or (idem.custom_id() if idem is not None else new_id())
    try:
        answer = await state.enqueuer.submit(
            Submission(tenant, [to_spec(job, tenant, custom_id)], [job.callback_url], idem)
        )
    except InvalidInput as exc:
        raise from_intake(exc) from None
    return answer_response(answer)


def parse_bulk(body: bytes, context: dict[str, Any], max_jobs: int) -> list[JobIn]:
    """A bulk body: a JSON array of jobs, or JSON Lines (one job per line).

    Raises:
        ApiError: 422 naming each bad job (its position, or its line for JSON Lines) and field; 413 past
            ``max_jobs``.
    """
    if body.lstrip()[:1] == b"[":
        try:
            items = _BULK.validate_json(body, context=context)
        except ValidationError as exc:
            raise from_validation(exc, items=True) from None
    else:
        items = _jsonl(body, context)
    if not items:
        raise invalid("no jobs: send a JSON array of jobs, or one job (JSON) per line", field="body")
    if len(items) > max_jobs:
        raise ApiError(
            413,
            "too_large",
            f"{len(items):,} jobs in one request; the limit is {max_jobs:,} (BATCHER_API_MAX_BULK_JOBS)",
            field="body",
        )
    return items


def _jsonl(body: bytes, context: dict[str, Any]) -> list[JobIn]:
    """JSON Lines of jobs: validated in one pass as an array; line by line only to name the bad lines."""
    lines = [line for line in (raw.strip() for raw in body.split(b"\n")) if line]
    try:
        items = _BULK.validate_json(b"[" + b",".join(lines) + b"]", context=context)
    except ValidationError:
        pass
    else:
        if len(items) == len(lines):  # else a line held more than one value: refused below, by its line
            return items
    items = []
    errors: list[dict[str, Any]] = []
    problems = 0
    first: ApiError | None = None
    for lineno, raw in enumerate(body.split(b"\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            items.append(JobIn.model_validate_json(line, context=context))
        except ValidationError as exc:
            found = from_validation(exc, line=lineno)
            first = first or found
            problems += exc.error_count()
            errors.extend(dict(e) for e in found.errors[: max(0, _MAX_LINE_ERRORS - len(errors))])
    if first is not None:
        more = f" (and {problems - 1} more problem(s), listed in errors)" if problems > 1 else ""
        message = first.message.split(" (and ", 1)[0]
        raise ApiError(422, "invalid_request", message + more, field=first.field, line=first.line, errors=errors)
    return items


async def post_bulk(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    tenant = tenant_of(request)
    settings = state.settings
    body = await read_body(request, settings.api_max_bulk_bytes, "BATCHER_API_MAX_BULK_BYTES")
    idem = idempotency_key(request, body)
    if idem is not None:
        stored = await stored_answer(state.db, tenant.name, idem)
        if stored is not None:
            return answer_response(stored)
    with _collector_paused():
        items = parse_bulk(body, _context(request), settings.api_max_bulk_jobs)
        specs = [
            to_spec(job, tenant, job.custom_id or (idem.custom_id(i) if idem is not None else new_id()))
            for i, job in enumerate(items, start=1)
        ]
        submission = Submission(tenant, specs, [job.callback_url for job in items], idem, bulk=True)
        try:
            answer = await state.enqueuer.submit(submission)
        except InvalidInput as exc:
            raise from_intake(exc, bulk=True) from None
    return answer_response(answer)


async def _job_row(request: web.Request, job_id: str) -> dict[str, Any]:
    state = state_of(request)
    tenant = tenant_of(request)
    query = sa.select(*JOB_COLUMNS, jobs.c.result).where(jobs.c.id == job_id, jobs.c.tenant == tenant.name)
    async with state.db.engine.connect() as conn:
        row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise not_found(f"job {job_id}")
        (job,) = await jobs_json(conn, [row], with_result=True)
    return job


async def get_job(request: web.Request) -> web.StreamResponse:
    check_query(request, frozenset())
    return json_response(await _job_row(request, request.match_info["id"]))


_LIST_PARAMS = frozenset({"run", "state", "cursor", "limit"})


async def list_jobs(request: web.Request) -> web.StreamResponse:
    check_query(request, _LIST_PARAMS)
    state = state_of(request)
    tenant = tenant_of(request)
    run = query_text(request, "run", max_length=128)
    job_state = query_enum(request, "state", JobState)
    cursor = query_id(request, "cursor")
    limit = query_int(request, "limit", 100, low=1, high=1000)
    query = sa.select(*JOB_COLUMNS).where(jobs.c.tenant == tenant.name).order_by(jobs.c.id.desc()).limit(limit + 1)
    if run is not None:
        query = query.where(jobs.c.run == run_prefix(tenant.name) + run)
    if job_state is not None:
        query = query.where(jobs.c.state == job_state.value)
    if cursor is not None:
        query = query.where(jobs.c.id < cursor)
    async with state.db.engine.connect() as conn:
        rows = list((await conn.execute(query)).mappings())
        page = await jobs_json(conn, rows[:limit])
    next_cursor = rows[limit - 1]["id"] if len(rows) > limit else None
    return json_response({"jobs": page, "next_cursor": next_cursor})


_CANCELLABLE = [JobState.QUEUED.value, JobState.PACKED.value]


async def cancel_job(request: web.Request) -> web.StreamResponse:
    check_query(request, frozenset())
    state = state_of(request)
    tenant = tenant_of(request)
    job_id = request.match_info["id"]
    idem = idempotency_key(request, b"")
    if idem is not None:
        stored = await stored_answer(state.db, tenant.name, idem)
        if stored is not None:
            return answer_response(stored)
    now = utcnow()
    mine = jobs.c.id == job_id, jobs.c.tenant == tenant.name
    async with state.db.engine.begin() as conn:
        # the database decides a race with a worker packing or submitting the job: only queued/packed cancel
        await conn.execute(
            sa.update(jobs)
            .where(*mine, jobs.c.state.in_(_CANCELLABLE))
            .values(state=JobState.CANCELLED.value, settled_at=now, updated_at=now)
        )
        found = (await conn.execute(sa.select(jobs.c.state, jobs.c.batch_id, jobs.c.run).where(*mine))).first()
    if found is None:
        raise not_found(f"job {job_id}")
    current, batch_id, run = found
    if current == JobState.SUBMITTED.value:
        public = run.removeprefix(run_prefix(tenant.name))
        raise ApiError(
            409,
            "conflict",
            f"job {job_id} is at the provider in batch {batch_id}: a request inside a provider batch cannot be "
            f"cancelled alone. Cancel its run (POST /v1/runs/{public}/cancel) to cancel the batches it holds alone.",
        )
    if current != JobState.CANCELLED.value:
        raise ApiError(409, "conflict", f"job {job_id} is {current}: only queued jobs can be cancelled")
    answer = Answer(200, orjson.dumps(await _job_row(request, job_id)))
    if idem is not None:
        answer = await record_answer(state.db, tenant.name, idem, answer)
    return answer_response(answer)


_ID = Param("id", "path", "the job id")

ROUTES = [
    Route(
        "POST",
        "/v1/jobs",
        post_job,
        "Enqueue one job (202 once it is committed)",
        "createJob",
        request=JobIn,
        response=JobAccepted,
        status=202,
        params=(IDEMPOTENCY,),
        errors=(401, 402, 409, 413, 422, 429),
    ),
    Route(
        "POST",
        "/v1/jobs/bulk",
        post_bulk,
        "Enqueue many jobs, all or none: a JSON array, or JSON Lines (202 once committed)",
        "createJobs",
        request=JobIn,
        bulk=True,
        response=BulkAccepted,
        status=202,
        params=(IDEMPOTENCY,),
        errors=(401, 402, 409, 413, 422, 429),
    ),
    Route(
        "GET",
        "/v1/jobs",
        list_jobs,
        "List jobs, newest first",
        "listJobs",
        response=JobPage,
        params=(
            Param("run", "query", "only this run"),
            Param("state", "query", "only jobs in this state", {"enum": [s.value for s in JobState]}),
            Param("cursor", "query", "next_cursor of the previous page"),
            Param("limit", "query", "jobs per page", {"type": "integer", "minimum": 1, "maximum": 1000}),
        ),
    ),
    Route(
        "GET",
        "/v1/jobs/{id}",
        get_job,
        "A job: state, result, error, cost, webhook",
        "getJob",
        response=JobOut,
        params=(_ID,),
        errors=(401, 404, 422),
    ),
    Route(
        "POST",
        "/v1/jobs/{id}/cancel",
        cancel_job,
        "Cancel a job that is still queued",
        "cancelJob",
        response=JobOut,
        params=(_ID, IDEMPOTENCY),
        errors=(401, 404, 409, 413, 422),
    ),
]
