"""Enqueue over HTTP: intake's one code path, group commit, tenant limits and idempotency keys.

A 202 means the jobs are committed. Concurrent single-job POSTs are committed together: while one transaction
runs, the next requests queue, and the committer stores them in one :func:`batcher.intake.enqueue` call — one
INSERT and one commit for many requests, which is what lets the API keep up with clients. A group holds one
tenant's requests and never two with the same (run, custom_id) or the same idempotency key; a bulk POST is
its own group.

Inside the intake transaction, once the rows are in, :func:`_after_insert` checks the tenant's limits
(:func:`batcher.tenants.check_limits`), registers the runs (and re-arms their callbacks), and records the
answer of every request that carried an ``Idempotency-Key``. When a group fails for one of its requests
(a limit, a key recorded meanwhile), each request is tried again on its own, so only that one fails.

Idempotency: a job posted with an ``Idempotency-Key`` and no ``custom_id`` gets its custom_id from the key, so
even a retry that races the first request, or follows a crash between commit and answer, finds the same job
through the (run, custom_id) unique key: never a second job. The first answer is stored with the jobs, in the
same transaction, and a retry gets it back byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from batcher.api.errors import ApiError
from batcher.api.views import public_run
from batcher.config import Settings
from batcher.db.engine import Database
from batcher.db.tables import idempotency_keys, jobs, tenant_runs
from batcher.domain import JobState
from batcher.intake import Enqueued, SpecLike, enqueue
from batcher.pricing import PriceBook
from batcher.tenants import Tenant, check_limits, estimate_usd
from batcher.timeutil import utcnow

logger = logging.getLogger(__name__)

#: most jobs one group commit stores
MAX_GROUP_JOBS = 2000
#: group commit: after a group of at least LINGER_AFTER requests (a busy API), wait LINGER_S for more to arrive
#: unless LINGER_UNTIL already wait
LINGER_AFTER = 8
LINGER_UNTIL = 48
LINGER_S = 0.002
#: runs one process remembers as recorded before it forgets them all (and records each once more)
MAX_KNOWN_RUNS = 100_000
#: above this many jobs, estimates are computed off the event loop
_THREAD_ESTIMATES = 64


@dataclass(frozen=True)
class Answer:
    """A response body ready to send."""

    status: int
    body: bytes
    replayed: bool = False


@dataclass(frozen=True)
class IdempotencyKey:
    key: str
    #: SHA-256 of method, path and body
    request_hash: str

    @staticmethod
    def of(key: str, method: str, path: str, body: bytes) -> IdempotencyKey:
        digest = hashlib.sha256(f"{method} {path}\n".encode() + body).hexdigest()
        return IdempotencyKey(key, digest)

    def custom_id(self, position: int | None = None) -> str:
        """The custom_id of a job posted with this key and none of its own (fits every provider's rules)."""
        base = "idem-" + hashlib.sha256(self.key.encode()).hexdigest()[:40]
        return base if position is None else f"{base}-{position}"


@dataclass
class Submission:
    """One POST's jobs, on their way into the database."""

    tenant: Tenant
    specs: Sequence[SpecLike]
    callback_urls: list[str | None]
    idempotency: IdempotencyKey | None = None
    bulk: bool = False
    future: asyncio.Future[Answer] | None = field(default=None, repr=False)

    def keys(self) -> set[tuple[str, str]]:
        return {(s.run, s.custom_id) for s in self.specs}


class _KeyRecordedMeanwhile(Exception):
    """An idempotency key of the group was recorded by a request that committed first."""


def idempotency_conflict(key: str) -> ApiError:
    return ApiError(
        409,
        "conflict",
        f"Idempotency-Key {key!r} was used before with a different request; use a new key for a new request",
        field="Idempotency-Key",
    )


async def stored_answer(db: Database, tenant: str, idem: IdempotencyKey) -> Answer | None:
    """The first answer to a request with this key, or ``None``.

    Raises:
        ApiError: 409 when the key was used for a different request.
    """
    query = sa.select(idempotency_keys.c.request_hash, idempotency_keys.c.status, idempotency_keys.c.response).where(
        idempotency_keys.c.tenant == tenant, idempotency_keys.c.key == idem.key
    )
    async with db.engine.connect() as conn:
        row = (await conn.execute(query)).first()
    if row is None:
        return None
    if row[0] != idem.request_hash:
        raise idempotency_conflict(idem.key)
    return Answer(int(row[1]), row[2].encode(), replayed=True)


async def record_answer(db: Database, tenant: str, idem: IdempotencyKey, answer: Answer) -> Answer:
    """Store the answer to a keyed request that is not an enqueue (cancel); returns the first answer for the key."""
    async with db.engine.begin() as conn:
        inserted = await conn.execute(
            db.insert(idempotency_keys)
            .values(
                tenant=tenant,
                key=idem.key,
                request_hash=idem.request_hash,
                status=answer.status,
                response=answer.body.decode(),
                created_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["tenant", "key"])
            .returning(idempotency_keys.c.key)
        )
        first = inserted.first() is not None
    if first:
        return answer
    stored = await stored_answer(db, tenant, idem)
    return stored if stored is not None else answer


class Enqueuer:
    """Stores submissions; single-job ones by group commit.

    On PostgreSQL up to ``api_commit_concurrency`` groups commit at once (their WAL flushes overlap); a
    submission whose (run, custom_id) or idempotency key is in a group still committing waits for it, so
    concurrent groups never contend for one key. SQLite has one writer: one group at a time.

    Args:
        db: the database.
        settings: intake chunk size, commit concurrency.
        prices: prices for the estimates of tenants with a budget.
    """

    def __init__(self, db: Database, settings: Settings, prices: PriceBook) -> None:
        self.db = db
        self.settings = settings
        self.prices = prices
        self.workers = 1 if db.is_sqlite else settings.api_commit_concurrency
        self._pending: deque[Submission] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        #: (run, custom_id) and (tenant, idempotency key) of the groups committing now
        self._busy_keys: set[tuple[str, str]] = set()
        self._busy_idem: set[tuple[str, str]] = set()
        #: runs this process has seen committed in ``tenant_runs`` (runs are never deleted), whose row need
        #: not be inserted again
        self._known_runs: set[str] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="batcher-api-committer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._pending:
            sub = self._pending.popleft()
            if sub.future is not None and not sub.future.done():
                sub.future.set_exception(ApiError(503, "unavailable", "the API is shutting down; retry"))

    async def submit(self, sub: Submission) -> Answer:
        """Store a submission; returns its answer once committed.

        Raises:
            ApiError: an idempotency key reused for another request (409).
            TooManyQueued, OverBudget: a tenant limit.
            InvalidInput: a job intake refuses.
        """
        if sub.bulk or self._task is None:
            return (await self._store([sub]))[0]
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        sub.future = future
        self._pending.append(sub)
        self._wake.set()
        # a caller that goes away cancels only its wait: the commit goes on, and _settle skips a done future
        return await future

    async def _run(self) -> None:
        last_group = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            if last_group >= LINGER_AFTER and len(self._pending) < LINGER_UNTIL:
                # busy: a moment's wait lets the requests now on their way join this commit
                await asyncio.sleep(LINGER_S)
            while self._pending and len(self._running) < self.workers:
                group = self._take_group()
                if group is None:
                    break  # all that waits conflicts with a group committing now: its end wakes us
                keys = set().union(*(sub.keys() for sub in group))
                idem = {(sub.tenant.name, sub.idempotency.key) for sub in group if sub.idempotency is not None}
                self._busy_keys |= keys
                self._busy_idem |= idem
                task = asyncio.create_task(self._commit(group, keys, idem))
                self._running.add(task)
                last_group = len(group)

    async def _commit(self, group: list[Submission], keys: set[tuple[str, str]], idem: set[tuple[str, str]]) -> None:
        try:
            await self._store_group(group)
        except Exception:  # pragma: no cover - _store_group settles every future itself
            logger.exception("group commit failed")
        finally:
            self._busy_keys -= keys
            self._busy_idem -= idem
            task = asyncio.current_task()
            if task is not None:
                self._running.discard(task)
            self._wake.set()

    def _free(self, sub: Submission, keys: set[tuple[str, str]], idem: set[tuple[str, str]]) -> bool:
        """Whether ``sub`` conflicts with neither the groups committing now nor ``keys``/``idem``."""
        sub_keys = sub.keys()
        if not self._busy_keys.isdisjoint(sub_keys) or not keys.isdisjoint(sub_keys):
            return False
        if sub.idempotency is None:
            return True
        pair = (sub.tenant.name, sub.idempotency.key)
        return pair not in self._busy_idem and pair not in idem

    def _take_group(self) -> list[Submission] | None:
        """The next group: one tenant's submissions in arrival order, no two (nor a busy one) sharing a key."""
        group: list[Submission] = []
        keys: set[tuple[str, str]] = set()
        idem: set[tuple[str, str]] = set()
        jobs_in = 0
        left: deque[Submission] = deque()
        while self._pending and jobs_in < MAX_GROUP_JOBS:
            sub = self._pending.popleft()
            if (group and sub.tenant.name != group[0].tenant.name) or not self._free(sub, keys, idem):
                left.append(sub)
                continue
            group.append(sub)
            keys |= sub.keys()
            jobs_in += len(sub.specs)
            if sub.idempotency is not None:
                idem.add((sub.tenant.name, sub.idempotency.key))
        left.extend(self._pending)
        self._pending = left
        return group or None

    async def _store_group(self, group: list[Submission]) -> None:
        try:
            answers = await self._store(group)
        except Exception as exc:
            if len(group) == 1:
                _settle(group[0], exc=exc)
                return
            # one request's limit or key failed the lot: each on its own, so only that one fails
            for sub in group:
                try:
                    (answer,) = await self._store([sub])
                except Exception as one_exc:
                    _settle(sub, exc=one_exc)
                else:
                    _settle(sub, answer=answer)
            return
        for sub, answer in zip(group, answers, strict=True):
            _settle(sub, answer=answer)

    async def _store(self, subs: Sequence[Submission]) -> list[Answer]:
        tenant = subs[0].tenant
        specs = [s for sub in subs for s in sub.specs]
        callbacks = [c for sub in subs for c in sub.callback_urls]
        estimates: list[Decimal | None] | None = None
        if tenant.monthly_budget_usd is not None:
            if len(specs) > _THREAD_ESTIMATES:
                estimates = await asyncio.to_thread(lambda: [estimate_usd(self.prices, s) for s in specs])
            else:
                estimates = [estimate_usd(self.prices, s) for s in specs]
        answers: list[Answer] = []

        async def after_insert(conn: AsyncConnection, done: Enqueued) -> None:
            answers.clear()
            answers.extend(await _after_insert(self.db, conn, tenant, subs, done, estimates, self._known_runs))

        try:
            for attempt in range(_TRANSIENT_RETRIES + 1):
                try:
                    await enqueue(
                        self.db,
                        specs,
                        chunk_size=self.settings.intake_chunk,
                        tenant=tenant.name,
                        callback_urls=callbacks if any(c is not None for c in callbacks) else None,
                        after_insert=after_insert,
                    )
                    break
                except sa.exc.DBAPIError as exc:
                    # two transactions waiting on each other's keys (a bulk POST racing its own retry): the
                    # database picked one to fail; it is rolled back whole and simply tried again
                    if attempt == _TRANSIENT_RETRIES or _sqlstate(exc) not in _TRANSIENT:
                        raise
                    logger.info("enqueue retried after %s", _sqlstate(exc))
        except _KeyRecordedMeanwhile:
            if len(subs) > 1:
                raise
            sub = subs[0]
            assert sub.idempotency is not None
            stored = await stored_answer(self.db, tenant.name, sub.idempotency)
            if stored is None:  # pragma: no cover - the key was there a moment ago and keys are not deleted so soon
                raise ApiError(503, "unavailable", "retry the request") from None
            return [stored]
        if len(self._known_runs) > MAX_KNOWN_RUNS:
            self._known_runs.clear()
        self._known_runs.update(spec.run for spec in specs)
        return answers


#: deadlock detected, serialization failure: the transaction may simply be tried again
_TRANSIENT = frozenset({"40P01", "40001"})
_TRANSIENT_RETRIES = 3


def _sqlstate(exc: sa.exc.DBAPIError) -> str | None:
    code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
    return None if code is None else str(code)


def _settle(sub: Submission, *, answer: Answer | None = None, exc: BaseException | None = None) -> None:
    if sub.future is None or sub.future.done():
        return
    if exc is not None:
        sub.future.set_exception(exc)
    else:
        assert answer is not None
        sub.future.set_result(answer)


async def _after_insert(
    db: Database,
    conn: AsyncConnection,
    tenant: Tenant,
    subs: Sequence[Submission],
    done: Enqueued,
    estimates: list[Decimal | None] | None,
    known_runs: Collection[str],
) -> list[Answer]:
    """Inside the intake transaction: limits, runs, answers and idempotency records."""
    now = utcnow()
    created_ids = [job_id for job_id, new in zip(done.ids, done.created, strict=True) if new]
    estimate_by_id = (
        None
        if estimates is None
        else {job_id: est for job_id, new, est in zip(done.ids, done.created, estimates, strict=True) if new}
    )
    models = None
    if estimate_by_id is not None and None in estimate_by_id.values():  # to name what has no price
        specs = (s for sub in subs for s in sub.specs)
        models = {i: f"{s.provider.value}/{s.model}" for i, s in zip(done.ids, specs, strict=True)}
    await check_limits(conn, tenant, created_ids, estimate_by_id, now, models)

    new_runs = sorted(
        {s.run for s, new in zip((s for sub in subs for s in sub.specs), done.created, strict=True) if new}
    )
    if new_runs:
        unknown = [run for run in new_runs if run not in known_runs]
        await register_runs(db, conn, tenant.name, new_runs, now, insert=unknown)

    states: dict[str, str] = {}
    old = [job_id for job_id, new in zip(done.ids, done.created, strict=True) if not new]
    for i in range(0, len(old), 500):
        query = sa.select(jobs.c.id, jobs.c.state).where(jobs.c.id.in_(old[i : i + 500]))
        states.update({job_id: state for job_id, state in await conn.execute(query)})

    answers: list[Answer] = []
    position = 0
    for sub in subs:
        n = len(sub.specs)
        ids = done.ids[position : position + n]
        created = done.created[position : position + n]
        position += n
        if sub.bulk:
            made = sum(created)
            body = {"jobs": n, "created": made, "duplicates": n - made, "ids": ids}
        else:
            spec = sub.specs[0]
            body = {
                "id": ids[0],
                "custom_id": spec.custom_id,
                "run": public_run(spec.run, tenant.name),
                "state": JobState.QUEUED.value if created[0] else states[ids[0]],
                "created": created[0],
            }
        answers.append(Answer(202, orjson.dumps(body)))

    keyed = [(sub.idempotency, answer) for sub, answer in zip(subs, answers, strict=True) if sub.idempotency]
    if keyed:
        rows = [
            {
                "tenant": tenant.name,
                "key": idem.key,
                "request_hash": idem.request_hash,
                "status": answer.status,
                "response": answer.body.decode(),
                "created_at": now,
            }
            for idem, answer in keyed
        ]
        inserted = await conn.execute(
            db.insert(idempotency_keys)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["tenant", "key"])
            .returning(idempotency_keys.c.key)
        )
        if len(inserted.all()) < len(rows):
            # a request with one of these keys committed first: its answer is the one to give (rolls back)
            raise _KeyRecordedMeanwhile()
    return answers


async def register_runs(
    db: Database,
    conn: AsyncConnection,
    tenant: str,
    runs: Sequence[str],
    now: datetime,
    *,
    insert: Sequence[str] | None = None,
) -> None:
    """Record the tenant's runs that just got jobs, and re-arm the callback of each that has one.

    Two statements, neither of which locks a run without a callback: an ``INSERT … ON CONFLICT DO NOTHING`` of
    ``insert`` (default: all of ``runs``), then an ``UPDATE`` of those of ``runs`` with a callback. (One
    ``ON CONFLICT DO UPDATE … WHERE`` would lock the existing row even where its ``WHERE`` is false, so
    concurrent commits of one run would queue behind each other.)
    """
    insert = runs if insert is None else insert
    if insert:
        await conn.execute(
            db.insert(tenant_runs).on_conflict_do_nothing(index_elements=["run"]),
            [
                {
                    "run": run,
                    "tenant": tenant,
                    "callback_url": None,
                    "armed": False,
                    "arm_seq": 0,
                    "notified_jobs": 0,
                    "created_at": now,
                    "updated_at": now,
                }
                for run in insert
            ],
        )
    await conn.execute(_REARM, {"runs": list(runs), "now": now})


#: re-arms the callbacks of ``:runs`` (built once: building it per group commit cost more than running it)
_REARM = (
    sa.update(tenant_runs)
    .where(tenant_runs.c.run.in_(sa.bindparam("runs", expanding=True)), tenant_runs.c.callback_url.is_not(None))
    .values(
        armed=True,
        arm_seq=tenant_runs.c.arm_seq + 1,
        updated_at=sa.bindparam("now", type_=tenant_runs.c.updated_at.type),
    )
)
