"""Collecting an ended batch: its results settled into jobs and ledger entries, its leftovers retried or failed.

Called by :meth:`batcher.lifecycle.Pipeline.collect` once it holds the batch's lease. Results are streamed and
settled in chunks, one transaction each; every job settles once (``UPDATE … WHERE batch_id = :batch AND state =
'submitted'``) and its ledger entry is written in the same transaction from the row still ``submitted``, with
``ON CONFLICT (job_id, attempt) DO NOTHING`` — so a collect resumed after a crash, a repeated line or a line of
another batch changes nothing already settled. A batch the provider failed as a whole is settled from its error
list (:func:`_settle_failed_batch`); one failed by the enqueued-token cap requeues its jobs and pauses the model
(:func:`_requeue_token_limited`).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from batcher.db.bulk import BulkStatement, RowValues, filter_only
from batcher.db.engine import Database
from batcher.db.tables import batches, jobs, pauses
from batcher.domain import BatchState, JobState
from batcher.errors import ProviderError
from batcher.ledger import ENTRY_VALUES, entries_from_batch, entry_row
from batcher.packer import next_poll_interval, pause_backoff
from batcher.pricing import UNKNOWN_COST, ZERO_COST, normalize_usage
from batcher.providers.base import BatchStatus, Outcome, OutcomeKind, ProviderAdapter
from batcher.providers.limits import MODERATIONS_ENDPOINT

if TYPE_CHECKING:
    from batcher.lifecycle import Pipeline

logger = logging.getLogger(__name__)

__all__ = ["TOKEN_LIMIT", "CollectReport", "collect_claimed"]

TOKEN_LIMIT = "token_limit_exceeded"
_job_id = operator.itemgetter(0)


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


async def collect_claimed(p: Pipeline, claimed: Mapping[str, Any], now: datetime) -> CollectReport | None:
    """Settle the batch ``claimed`` (its row, leased by ``p``) and mark it ``collected``.

    Returns:
        What was settled, or ``None`` when reading the results failed in a way worth retrying (the batch is
        released with its next try set, backing off).
    """
    batch_id = claimed["id"]
    state = BatchState(claimed["state"])
    report = CollectReport()
    errors = claimed["errors"] or []
    if state is BatchState.FAILED and any(e.get("code") == TOKEN_LIMIT for e in errors):
        await _requeue_token_limited(p, claimed, now, report)
    elif state is BatchState.FAILED:
        await _settle_failed_batch(p, claimed, now, report)
    elif claimed["provider_batch_id"] is None:
        # never reached the provider (every job was cancelled while it was open): no results to read
        await _settle_leftovers(p, claimed, now, report)
    else:
        adapter = p.adapter(claimed["account"])
        try:
            await _settle_results(p, claimed, adapter, now, report)
        except ProviderError as exc:
            if exc.retryable:
                # back off from poll_min_s, doubling per failure in a row (kept in poll_interval_s)
                interval = max(claimed["poll_interval_s"], p.settings.poll_min_s)
                delay = p.retry_delay(1, exc, base_s=interval, max_s=interval)
                logger.warning("collect of batch %s failed, retrying in %.1fs: %s", batch_id, delay, exc)
                await p._release(
                    batch_id,
                    now,
                    next_poll_at=now + timedelta(seconds=delay),
                    poll_interval_s=next_poll_interval(
                        interval, min_s=p.settings.poll_min_s, max_s=p.settings.poll_max_s
                    ),
                )
                return None
            # the results cannot be read, now or later (e.g. the output file is gone): retrying would
            # keep the batch, and its jobs, stuck forever. What did not settle is treated as missing.
            logger.error("results of batch %s cannot be read, settling the rest as missing: %s", batch_id, exc)
        await _settle_leftovers(p, claimed, now, report)
    async with p.db.engine.begin() as conn:
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
            .where(batches.c.id == batch_id, batches.c.lease_owner == p.owner)
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
    p: Pipeline, batch: Mapping[str, Any], adapter: ProviderAdapter, now: datetime, report: CollectReport
) -> None:
    """Read the results and settle them chunk by chunk, one transaction each, in the order read."""
    status = _status_from_row(batch)
    async with p.db.engine.connect() as conn:
        # jobs cancelled while the batch was being sent: the provider may have run (and billed) them
        cancelled_early = bool(
            await conn.scalar(
                sa.select(sa.func.count()).where(
                    jobs.c.batch_id == batch["id"], jobs.c.state == JobState.CANCELLED.value
                )
            )
        )
    chunk: list[Outcome] = []
    async for outcome in adapter.results(status):
        chunk.append(outcome)
        if len(chunk) >= p.settings.settle_chunk:
            await _write_chunk(p, _prepare_chunk(p, batch, chunk, now, report, cancelled_early=cancelled_early))
            chunk = []
    if chunk:
        await _write_chunk(p, _prepare_chunk(p, batch, chunk, now, report, cancelled_early=cancelled_early))


@dataclass(frozen=True)
class _Statements:
    """The statements that settle a chunk of results, compiled for one dialect (see :mod:`batcher.db.bulk`).

    Each binds ``batch_id`` and ``now``, and touches only jobs of that batch still ``submitted``.
    """

    #: a ledger entry per row (:data:`batcher.ledger.ENTRY_VALUES`); binds ``mode``
    entries: BulkStatement
    #: the same, only for jobs whose attempts are used up; binds ``mode`` and ``max_attempts``
    used_up_entries: BulkStatement
    #: the same for jobs of the batch cancelled while it was being sent (the provider ran them); binds ``mode``
    cancelled_entries: BulkStatement
    #: rows ``(id, result, usage)``
    succeeded: BulkStatement
    #: rows ``(id, error_code, error)``
    failed: BulkStatement
    #: rows ``(id, error_code, error)``: back to the queue if attempts remain; binds ``max_attempts``
    requeued: BulkStatement
    #: rows ``(id,)``
    cancelled: BulkStatement


#: by (dialect, driver): compiling them anew per chunk would cost more than running them
_STATEMENTS: dict[tuple[str, str], _Statements] = {}


def _statements(db: Database) -> _Statements:
    dialect = db.engine.dialect
    key = (dialect.name, dialect.driver)
    found = _STATEMENTS.get(key)
    if found is None:
        found = _STATEMENTS[key] = _compile_statements(db)
    return found


def _compile_statements(db: Database) -> _Statements:
    dialect = db.engine.dialect
    now = sa.bindparam("now", type_=jobs.c.updated_at.type)
    max_attempts = sa.bindparam("max_attempts", type_=jobs.c.attempts.type)

    def in_batch(values: RowValues) -> sa.ColumnElement[bool]:
        return sa.and_(
            jobs.c.id == values.c["id"],
            filter_only(jobs.c.batch_id) == sa.bindparam("batch_id", type_=jobs.c.batch_id.type),
            filter_only(jobs.c.state) == JobState.SUBMITTED.value,
        )

    entry = RowValues(dialect, ENTRY_VALUES)
    result = RowValues(dialect, {"id": jobs.c.id.type, "result": jobs.c.result.type, "usage": jobs.c.usage.type})
    error = RowValues(dialect, {"id": jobs.c.id.type, "error_code": jobs.c.error_code.type, "error": jobs.c.error.type})
    ids = RowValues(dialect, {"id": jobs.c.id.type})
    error_values = {"error_code": error.c["error_code"], "error": error.c["error"], "updated_at": now}
    return _Statements(
        entries=BulkStatement(entries_from_batch(db, entry), entry, dialect),
        used_up_entries=BulkStatement(
            entries_from_batch(db, entry, only=jobs.c.attempts >= max_attempts), entry, dialect
        ),
        cancelled_entries=BulkStatement(entries_from_batch(db, entry, state=JobState.CANCELLED), entry, dialect),
        succeeded=BulkStatement(
            sa.update(jobs)
            .where(in_batch(result))
            .values(
                state=JobState.SUCCEEDED.value,
                result=result.c["result"],
                usage=result.c["usage"],
                error=None,
                error_code=None,
                settled_at=now,
                updated_at=now,
            ),
            result,
            dialect,
        ),
        failed=BulkStatement(
            sa.update(jobs).where(in_batch(error)).values(state=JobState.FAILED.value, settled_at=now, **error_values),
            error,
            dialect,
        ),
        requeued=BulkStatement(
            sa.update(jobs)
            .where(in_batch(error), jobs.c.attempts < max_attempts)
            .values(state=JobState.QUEUED.value, queued_at=now, **error_values),
            error,
            dialect,
        ),
        cancelled=BulkStatement(
            sa.update(jobs).where(in_batch(ids)).values(state=JobState.CANCELLED.value, settled_at=now, updated_at=now),
            ids,
            dialect,
        ),
    )


#: one chunk, ready to write: each statement with its parameters, in the order they run
_Writes = list[tuple[BulkStatement, tuple[Any, ...]]]


def _prepare_chunk(
    p: Pipeline,
    batch: Mapping[str, Any],
    outcomes: list[Outcome],
    now: datetime,
    report: CollectReport,
    *,
    cancelled_early: bool = False,
) -> _Writes:
    """Sort a chunk's outcomes into what each statement settles, price the successes, and bind the statements.

    With ``cancelled_early`` (the batch has jobs cancelled while it was being sent), a success of such a job is
    recorded in the ledger all the same: the provider billed it. The job stays cancelled.
    """
    batch_id = batch["id"]
    cancelled_batch = batch["state"] == BatchState.CANCELLED.value
    succeeded: list[tuple[str, str | None, dict[str, Any] | None]] = []
    failed: list[tuple[str, str, dict[str, Any]]] = []
    retry: list[tuple[str, str, dict[str, Any]]] = []
    cancelled: list[tuple[str]] = []
    report.results += len(outcomes)
    seen: set[str] = set()
    for o in outcomes:
        # a repeated line is waste: the first one settles the job (as it would in an earlier chunk)
        if o.custom_id in seen:
            continue
        seen.add(o.custom_id)
        if o.kind is OutcomeKind.SUCCEEDED:
            succeeded.append((o.custom_id, o.body, o.usage))
            continue
        expired = o.kind is OutcomeKind.EXPIRED
        if o.kind is OutcomeKind.CANCELLED or (cancelled_batch and (expired or o.retryable)):
            # the batch was cancelled: what did not finish is cancelled, never sent again
            cancelled.append((o.custom_id,))
            continue
        code = "expired" if expired else (o.error_code or "error")
        error = {"code": code, "message": o.error_message, "status_code": o.status_code, "batch_id": batch_id}
        (retry if o.retryable or expired else failed).append((o.custom_id, code[:64], error))
    billed = _priced_entries(p, batch, succeeded)
    entries = list(billed)
    # only successes are billed; a failure settled for good gets an entry of cost 0
    entries.extend(entry_row(job_id, None, ZERO_COST) for job_id, _, _ in failed)
    entries.extend(entry_row(job_id, None, ZERO_COST) for (job_id,) in cancelled)
    used_up = [entry_row(job_id, None, ZERO_COST) for job_id, _, _ in retry]

    s = _statements(p.db)
    writes: _Writes = []

    def write(statement: BulkStatement, rows: list[Any], **shared: Any) -> None:
        if rows:
            # in job id order, the order of the primary key: each statement walks its index forward
            rows = sorted(rows, key=_job_id)
            writes.append((statement, statement.params(rows, batch_id=batch_id, now=now, **shared)))

    # the ledger first, from the rows still ``submitted``: a job settled before writes nothing
    write(s.entries, entries, mode="batch")
    if cancelled_early:
        write(s.cancelled_entries, billed, mode="batch")
    write(s.used_up_entries, used_up, mode="batch", max_attempts=p.settings.max_attempts)
    write(s.succeeded, succeeded)
    write(s.failed, failed)
    # retryable failures go back to the queue while attempts remain; the rest fail
    write(s.requeued, retry, max_attempts=p.settings.max_attempts)
    write(s.failed, retry)
    write(s.cancelled, cancelled)
    return writes


async def _write_chunk(p: Pipeline, writes: _Writes) -> None:
    """Settle one chunk in one transaction.

    Each statement is guarded by ``batch_id`` and ``state = 'submitted'``: a duplicate line, a line for a
    job of another batch, or a line settled by an earlier (crashed) collect changes nothing.
    """
    async with p.db.engine.begin() as conn:
        for statement, params in writes:
            await statement.execute(conn, params)


def _priced_entries(
    p: Pipeline, batch: Mapping[str, Any], succeeded: list[tuple[str, str | None, dict[str, Any] | None]]
) -> list[tuple[Any, ...]]:
    """Ledger entries of the succeeded jobs, priced (every job of a batch has its account and model).

    A success the provider reported no usage for has an unknown cost (``None``), never zero — except a
    moderation, which OpenAI answers without usage because it is free.
    """
    provider = batch["provider"]
    free = batch["endpoint"] == MODERATIONS_ENDPOINT
    price_provider = p.price_provider(batch["account"])
    model = batch["model"]
    cost = p.prices.cost
    entries = []
    for job_id, _, reported in succeeded:
        usage = normalize_usage(provider, reported)
        priced = cost(price_provider, model, usage, mode="batch") if reported or free else UNKNOWN_COST
        entries.append(entry_row(job_id, usage, priced))
    return entries


async def _settle_leftovers(p: Pipeline, batch: Mapping[str, Any], now: datetime, report: CollectReport) -> None:
    """Jobs of the batch that got no result line: cancelled with a cancelled batch, else retried."""
    batch_id = batch["id"]
    in_batch = sa.and_(jobs.c.batch_id == batch_id, jobs.c.state == JobState.SUBMITTED.value)
    async with p.db.engine.begin() as conn:
        if batch["state"] == BatchState.CANCELLED.value:
            result = await conn.execute(
                sa.update(jobs).where(in_batch).values(state=JobState.CANCELLED.value, settled_at=now, updated_at=now)
            )
            report.cancelled += result.rowcount
            return
        code = "expired" if batch["state"] == BatchState.EXPIRED.value else "missing_result"
        error = {"code": code, "message": "the provider returned no result for this request", "batch_id": batch_id}
        requeued = await conn.execute(
            sa.update(jobs)
            .where(in_batch, jobs.c.attempts < p.settings.max_attempts)
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


#: how long a batch cap learned from the enqueued-token limit holds (a higher usage tier raises the limit)
BATCH_CAP_S = 24 * 3600


async def _requeue_token_limited(p: Pipeline, batch: Mapping[str, Any], now: datetime, report: CollectReport) -> None:
    """The provider's enqueued-token cap failed the batch: not the jobs' fault. Requeue them, pause the model.

    When no other batch of the model was at the provider meanwhile, waiting frees nothing: the batch alone is
    over the limit. The model's next batches then hold at most half as many jobs (``pauses.batch_cap``, for
    :data:`BATCH_CAP_S`), halving again while it recurs; a single job over the limit on its own fails with the
    provider's message instead of being sent again and again.
    """
    batch_id = batch["id"]
    account, model = batch["account"], batch["model"]
    in_batch = sa.and_(jobs.c.batch_id == batch_id, jobs.c.state.in_([JobState.SUBMITTED.value, JobState.PACKED.value]))
    started, ended = batch["submitted_at"], batch["ended_at"] or now
    async with p.db.engine.begin() as conn:
        # batches of the model the provider held (took, not refused) while it had this one
        others = await conn.scalar(
            sa.select(sa.func.count()).where(
                batches.c.account == account,
                batches.c.model == model,
                batches.c.id != batch_id,
                batches.c.provider_batch_id.is_not(None),
                sa.or_(batches.c.provider_state.is_(None), batches.c.provider_state != "failed"),
                batches.c.submitted_at <= ended,
                sa.true() if started is None else sa.or_(batches.c.ended_at.is_(None), batches.c.ended_at >= started),
            )
        )
        size = int(await conn.scalar(sa.select(sa.func.count()).where(in_batch)) or 0)
        if size == 0:
            return  # settled by a collect that stopped before marking the batch collected
        alone = not others
        if alone and size == 1:
            message = next((e.get("message") for e in batch["errors"] or [] if e.get("code") == TOKEN_LIMIT), None)
            error = {
                "code": TOKEN_LIMIT,
                "message": f"this request alone is over the provider's enqueued-token limit for {model}: {message}",
                "batch_id": batch_id,
            }
            result = await conn.execute(
                sa.update(jobs)
                .where(in_batch)
                .values(
                    state=JobState.FAILED.value, error_code=TOKEN_LIMIT, error=error, settled_at=now, updated_at=now
                )
            )
            report.failed += result.rowcount
            logger.warning(
                "batch %s: its one job alone is over the token limit of %s/%s: failed", batch_id, account, model
            )
            return
        result = await conn.execute(
            sa.update(jobs)
            .where(in_batch)
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
        row = (
            await conn.execute(
                sa.select(pauses.c.backoff_s, pauses.c.batch_cap, pauses.c.batch_cap_until).where(
                    pauses.c.account == account, pauses.c.model == model
                )
            )
        ).first()
        previous, cap, cap_until = (None, None, None) if row is None else row
        if cap_until is None or cap_until <= now:
            cap = None
        values: dict[str, Any] = {}
        if alone:
            # smaller batches, not a longer wait
            backoff = p.settings.token_limit_pause_s
            # half the failed batch, never more than a cap learned meanwhile (batches that failed together)
            cap = max(1, min(cap or size, size // 2))
            values = {"batch_cap": cap, "batch_cap_until": now + timedelta(seconds=BATCH_CAP_S)}
        else:
            backoff = pause_backoff(previous, base_s=p.settings.token_limit_pause_s)
        until = now + timedelta(seconds=backoff)
        values.update(until=until, backoff_s=backoff)
        stmt = p.db.insert(pauses).values(account=account, model=model, reason=TOKEN_LIMIT, **values)
        await conn.execute(stmt.on_conflict_do_update(index_elements=["account", "model"], set_=values))
    logger.warning(
        "batch %s hit the token limit: %d job(s) requeued, %s/%s paused %.0fs%s",
        batch_id,
        report.requeued,
        account,
        model,
        backoff,
        f", its batches capped at {cap} job(s)" if alone else "",
    )


async def _settle_failed_batch(p: Pipeline, batch: Mapping[str, Any], now: datetime, report: CollectReport) -> None:
    """A batch the provider failed as a whole.

    Errors that name a line fail that line's job with the provider's message; the other jobs were not
    at fault and go back to the queue with their attempt given back. Without any line errors the
    batch's failure counts as an attempt for every job.
    """
    batch_id = batch["id"]
    errors = [e for e in (batch["errors"] or []) if isinstance(e, dict)]
    line_errors = {int(e["line"]): e for e in errors if isinstance(e.get("line"), int) and e["line"] >= 1}
    async with p.db.engine.begin() as conn:
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
            give_back = sa.case((jobs.c.state == JobState.SUBMITTED.value, jobs.c.attempts - 1), else_=jobs.c.attempts)
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
            .where(in_batch, counted < p.settings.max_attempts)
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
