"""Deadlines: a job a batch can no longer return in time goes to the provider's real-time API, or fails.

A job's ``not_after`` can be met by a batch while ``not_after - turnaround >= now``, the turnaround being what
settings expect of its account (:meth:`batcher.config.Settings.turnaround_s`); the packer flushes a group
``deadline_lead_s`` before that moment and never packs a job past it. Past it:

* the deadline has passed, fallback is off (``fallback_enabled``), or the job's attempts are used up: the job
  fails with ``deadline_missed``;
* otherwise it is sent to the real-time API: state ``fallback``, then ``succeeded`` or ``failed``; its ledger
  entry has mode ``realtime`` and is charged the real-time price on both sides (actual = real-time equivalent).

A job already at a provider stays with its batch: sending it again in real time would pay for it twice.

Each tick, :func:`sweep` takes such jobs out of batches not yet sent (``packed`` → ``queued``, under a lock on
the batch row so a submit claiming it at that moment either sees them gone or keeps them), fails the missed ones
and names the accounts with real-time work. A fallback task per account then :func:`run`\\ s: it claims up to
``fallback_batch`` jobs (``queued`` → ``fallback``, attempt + 1; ``updated_at`` is the claim's lease, renewed
while the calls run), sends them with at most ``fallback_concurrency`` in flight, and settles each outcome with
its ledger entry in one transaction guarded by ``state = 'fallback' AND attempts = <claimed attempt>``.

A worker that dies mid-call leaves its jobs in ``fallback`` with an ``updated_at`` that stops moving; after
``lease_s`` the sweep puts them back in the queue and they are claimed again with the next attempt number, so a
late answer to the dead worker's call can never settle them (nor write a second ledger entry). The real-time API
has no idempotency key: such a job's first call may have been answered (and billed) without being recorded.
A provider's Retry-After pauses the account's real-time calls until then; other failures back off, jittered.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from batcher.db.engine import Database
from batcher.db.tables import batches, jobs, ledger
from batcher.domain import BatchState, JobState
from batcher.errors import ProviderError
from batcher.ledger import entry_params
from batcher.pricing import UNKNOWN_COST, ZERO_COST, normalize_usage
from batcher.providers.base import Outcome, OutcomeKind
from batcher.providers.limits import MODERATIONS_ENDPOINT
from batcher.recovery import JobsLease

if TYPE_CHECKING:
    from batcher.lifecycle import Pipeline

logger = logging.getLogger(__name__)

__all__ = ["DEADLINE_MISSED", "FALLBACK_FAILED", "FallbackReport", "run", "sweep"]

DEADLINE_MISSED = "deadline_missed"
#: a real-time call the provider refused for a reason not the request's (e.g. the key)
FALLBACK_FAILED = "fallback_failed"
MODE = "realtime"

#: ledger columns taken from bind parameters (the rest come from the job row)
_PARAMS = [key[2:] for key in entry_params("", None, ZERO_COST) if key != "l_job_id"]


@dataclass
class FallbackReport:
    """What one fallback task did for an account."""

    account: str
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    #: back to the queue (a retryable failure, or never sent because the provider asked to wait)
    requeued: int = 0


@dataclass(frozen=True)
class _Claimed:
    id: str
    account: str
    endpoint: str
    body: str
    model: str
    provider: str
    attempt: int


# ------------------------------------------------------------------------------------------------- sweep


async def sweep(p: Pipeline, now: datetime) -> list[str]:
    """Enforce deadlines on the jobs of ``p``'s accounts that are not yet at a provider.

    Returns:
        The accounts with jobs waiting for a real-time call (a fallback task should :func:`run` for each).
    """
    settings = p.settings
    accounts = sorted(p.adapters)
    stale = now - timedelta(seconds=settings.lease_s)
    async with p.db.engine.begin() as conn:
        # real-time calls whose worker died: the jobs go back to the queue and are claimed again
        revived = await conn.execute(
            sa.update(jobs)
            .where(jobs.c.state == JobState.FALLBACK.value, jobs.c.account.in_(accounts), jobs.c.updated_at < stale)
            .values(state=JobState.QUEUED.value, queued_at=now, updated_at=now)
        )
    if revived.rowcount:
        logger.warning("%d real-time call(s) were left by a stopped worker; trying again", revived.rowcount)
    work: list[str] = []
    for account in accounts:
        too_late = now + timedelta(seconds=p.turnaround_s(account))
        late = sa.and_(jobs.c.not_after.is_not(None), jobs.c.not_after < too_late)
        async with p.db.engine.begin() as conn:
            # jobs of batches not yet sent whose batch would be late: out of the batch. The batch row is locked
            # (PostgreSQL; SQLite runs one statement at a time), so a submit claiming it now either sees them
            # gone or keeps them all. A batch whose create was tried (its answer may have been lost) may exist at
            # the provider with them in it: its next submit looks there first, and takes them out only if not.
            unsent = (
                sa.select(batches.c.id)
                .where(
                    batches.c.account == account,
                    batches.c.state == BatchState.OPEN.value,
                    batches.c.submitted_at.is_(None),
                )
                .with_for_update(skip_locked=True)
            )
            released = await conn.execute(
                sa.update(jobs)
                .where(jobs.c.state == JobState.PACKED.value, late, jobs.c.batch_id.in_(unsent.scalar_subquery()))
                .values(state=JobState.QUEUED.value, queued_at=now, updated_at=now)
            )
        missed_when = [jobs.c.not_after <= now, sa.and_(late, jobs.c.attempts >= settings.max_attempts)]
        if not settings.fallback_enabled:
            missed_when.append(late)
        async with p.db.engine.begin() as conn:
            missed = await conn.execute(
                sa.update(jobs)
                .where(
                    jobs.c.state == JobState.QUEUED.value,
                    jobs.c.account == account,
                    jobs.c.not_after.is_not(None),
                    sa.or_(*missed_when),
                )
                .values(
                    state=JobState.FAILED.value,
                    error_code=DEADLINE_MISSED,
                    error={
                        "code": DEADLINE_MISSED,
                        "message": "its deadline passed, or no batch could return it in time"
                        + ("" if settings.fallback_enabled else " (real-time fallback is disabled)"),
                    },
                    settled_at=now,
                    updated_at=now,
                )
            )
            waiting = await conn.scalar(
                sa.select(jobs.c.id)
                .where(
                    jobs.c.state == JobState.QUEUED.value,
                    jobs.c.account == account,
                    late,
                    jobs.c.not_after > now,
                    jobs.c.attempts < settings.max_attempts,
                )
                .limit(1)
            )
        if released.rowcount or missed.rowcount:
            logger.info(
                "%s: %d job(s) taken out of unsent batches, %d missed their deadline",
                account,
                released.rowcount,
                missed.rowcount,
            )
        if waiting is not None and settings.fallback_enabled:
            work.append(account)
    return work


# --------------------------------------------------------------------------------------------------- run


async def run(p: Pipeline, account: str, now: datetime) -> FallbackReport:
    """Claim up to ``fallback_batch`` of ``account``'s late jobs, call the real-time API for each, settle them."""
    report = FallbackReport(account)
    not_before = p.fallback_not_before.get(account)
    if not p.settings.fallback_enabled or (not_before is not None and not_before > now):
        return report
    adapter = p.adapter(account)
    claimed = await _claim(p, account, now)
    if not claimed:
        return report
    report.claimed = len(claimed)
    claims = {job.id: job.attempt for job in claimed}
    gate = asyncio.Semaphore(p.settings.fallback_concurrency)
    async with JobsLease(p.db, claims, now=now, lease_s=p.settings.lease_s, clock=p.clock) as lease:

        async def one(job: _Claimed) -> None:
            async with gate:
                held = p.fallback_not_before.get(account)
                if held is not None and held > lease.touched_at():
                    # the provider asked us to wait: this one was never sent, its attempt is given back
                    await _requeue(p.db, job, lease.touched_at(), give_back=True)
                    report.requeued += 1
                else:
                    try:
                        outcome = await adapter.run_realtime(job.id, job.endpoint, job.body, attempt=job.attempt)
                    except ProviderError as exc:
                        await _settle_error(p, job, exc, lease.touched_at(), report)
                    else:
                        await _settle_outcome(p, job, outcome, lease.touched_at(), report)
                claims.pop(job.id, None)

        try:
            await asyncio.gather(*(one(job) for job in claimed))
        except asyncio.CancelledError:
            # shutting down: what was not settled goes back to the queue for another worker
            await asyncio.shield(_release(p.db, claims, now))
            raise
    logger.info("fallback %s: %s", account, report)
    return report


async def _claim(p: Pipeline, account: str, now: datetime) -> list[_Claimed]:
    too_late = now + timedelta(seconds=p.turnaround_s(account))
    query = (
        sa.select(jobs.c.id)
        .where(
            jobs.c.state == JobState.QUEUED.value,
            jobs.c.account == account,
            jobs.c.not_after > now,
            jobs.c.not_after < too_late,
            jobs.c.attempts < p.settings.max_attempts,
        )
        .order_by(jobs.c.not_after, jobs.c.id)
        .limit(p.settings.fallback_batch)
    )
    if not p.db.is_sqlite:
        query = query.with_for_update(skip_locked=True)
    async with p.db.engine.begin() as conn:
        ids = [r[0] for r in await conn.execute(query)]
        if not ids:
            return []
        rows = await conn.execute(
            sa.update(jobs)
            .where(jobs.c.id.in_(ids), jobs.c.state == JobState.QUEUED.value)
            .values(state=JobState.FALLBACK.value, attempts=jobs.c.attempts + 1, updated_at=now)
            .returning(
                jobs.c.id, jobs.c.account, jobs.c.endpoint, jobs.c.body, jobs.c.model, jobs.c.provider, jobs.c.attempts
            )
        )
        return [_Claimed(*r) for r in rows]


def _guard(job: _Claimed) -> sa.ColumnElement[bool]:
    return sa.and_(jobs.c.id == job.id, jobs.c.state == JobState.FALLBACK.value, jobs.c.attempts == job.attempt)


def _entry(db: Database, job: _Claimed, now: datetime) -> Any:
    """The INSERT of a job's ledger entry from its row, while still claimed by us (mode ``realtime``)."""
    select = sa.select(
        jobs.c.id,
        jobs.c.attempts,
        sa.cast(sa.null(), ledger.c.batch_id.type),
        jobs.c.provider,
        jobs.c.account,
        jobs.c.model,
        jobs.c.run,
        jobs.c.tags,
        sa.literal(MODE, sa.String()),
        *(sa.bindparam(f"l_{name}", type_=ledger.c[name].type) for name in _PARAMS),
        sa.literal(now, ledger.c.settled_at.type),
    ).where(_guard(job))
    columns = ["job_id", "attempt", "batch_id", "provider", "account", "model", "run", "tags", "mode", *_PARAMS]
    return (
        db.insert(ledger)
        .from_select([*columns, "settled_at"], select)
        .on_conflict_do_nothing(index_elements=["job_id", "attempt"])
    )


async def _settle_outcome(p: Pipeline, job: _Claimed, outcome: Outcome, now: datetime, report: FallbackReport) -> None:
    if outcome.kind is OutcomeKind.SUCCEEDED:
        usage = normalize_usage(job.provider, outcome.usage)
        cost = (
            p.prices.cost(p.price_provider(job.account), job.model, usage, mode=MODE)
            if outcome.usage or job.endpoint == MODERATIONS_ENDPOINT
            else UNKNOWN_COST  # no usage reported: the cost is unknown, not zero (moderations are free)
        )
        async with p.db.engine.begin() as conn:
            await conn.execute(_entry(p.db, job, now), entry_params(job.id, usage, cost))
            result = await conn.execute(
                sa.update(jobs)
                .where(_guard(job))
                .values(
                    state=JobState.SUCCEEDED.value,
                    result=outcome.body,
                    usage=outcome.usage,
                    error=None,
                    error_code=None,
                    settled_at=now,
                    updated_at=now,
                )
            )
        report.succeeded += result.rowcount
        p.fallback_failures.pop(job.account, None)
        return
    code = outcome.error_code or ("expired" if outcome.kind is OutcomeKind.EXPIRED else "error")
    error = {"code": code, "message": outcome.error_message, "status_code": outcome.status_code, "mode": MODE}
    retry = outcome.retryable or outcome.kind in (OutcomeKind.EXPIRED, OutcomeKind.CANCELLED)
    async with p.db.engine.begin() as conn:
        if retry and job.attempt < p.settings.max_attempts:
            result = await conn.execute(
                sa.update(jobs)
                .where(_guard(job))
                .values(state=JobState.QUEUED.value, error_code=code[:64], error=error, queued_at=now, updated_at=now)
            )
            report.requeued += result.rowcount
            return
        # the provider answered: an entry (unbilled) records it, as for a failed batch request
        await conn.execute(_entry(p.db, job, now), entry_params(job.id, None, ZERO_COST))
        result = await conn.execute(
            sa.update(jobs)
            .where(_guard(job))
            .values(state=JobState.FAILED.value, error_code=code[:64], error=error, settled_at=now, updated_at=now)
        )
    report.failed += result.rowcount


async def _settle_error(p: Pipeline, job: _Claimed, exc: ProviderError, now: datetime, report: FallbackReport) -> None:
    account = job.account
    error = {"code": FALLBACK_FAILED, "message": str(exc), "mode": MODE}
    if exc.retryable:
        failures = p.fallback_failures.get(account, 0) + 1
        p.fallback_failures[account] = failures
        delay = p.retry_delay(failures, exc, base_s=p.settings.poll_min_s, max_s=p.settings.poll_max_s)
        held = now + timedelta(seconds=delay)
        if held > p.fallback_not_before.get(account, held - timedelta(seconds=1)):
            p.fallback_not_before[account] = held
        logger.warning("real-time call of job %s failed, %s waits %.1fs: %s", job.id, account, delay, exc)
        rate_limited = exc.retry_after_s is not None
        if rate_limited or job.attempt < p.settings.max_attempts:
            # a request refused with a Retry-After was not run: its attempt is given back
            await _requeue(p.db, job, now, give_back=rate_limited, error=error)
            report.requeued += 1
            return
    else:
        logger.error("real-time call of job %s refused: %s", job.id, exc)
    async with p.db.engine.begin() as conn:
        result = await conn.execute(
            sa.update(jobs)
            .where(_guard(job))
            .values(
                state=JobState.FAILED.value, error_code=FALLBACK_FAILED, error=error, settled_at=now, updated_at=now
            )
        )
    report.failed += result.rowcount


async def _requeue(
    db: Database, job: _Claimed, now: datetime, *, give_back: bool, error: dict[str, Any] | None = None
) -> None:
    values: dict[str, Any] = {"state": JobState.QUEUED.value, "queued_at": now, "updated_at": now}
    if give_back:
        values["attempts"] = job.attempt - 1
    if error is not None:
        values |= {"error_code": str(error["code"])[:64], "error": error}
    async with db.engine.begin() as conn:
        await conn.execute(sa.update(jobs).where(_guard(job)).values(**values))


async def _release(db: Database, claims: dict[str, int], now: datetime) -> None:
    if not claims:
        return
    async with db.engine.begin() as conn:
        await conn.execute(
            sa.update(jobs)
            .where(
                jobs.c.id == sa.bindparam("r_id"),
                jobs.c.state == JobState.FALLBACK.value,
                jobs.c.attempts == sa.bindparam("r_attempt"),
            )
            .values(state=JobState.QUEUED.value, queued_at=now, updated_at=now),
            [{"r_id": job_id, "r_attempt": attempt} for job_id, attempt in claims.items()],
        )
    logger.info("released %d real-time call(s) on shutdown", len(claims))
