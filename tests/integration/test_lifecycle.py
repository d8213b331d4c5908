"""The lifecycle driven by FakeProvider against real databases (SQLite and PostgreSQL), with explicit ``now``.

No sockets for the provider: FakeProvider (batcher.testing) is scripted per request. Every step is driven by
hand (pack → due → submit / poll / collect) at chosen times, so leases, back-off and crash recovery are
deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from batcher import lifecycle, packer, settle
from batcher.config import Settings
from batcher.db.engine import Database
from batcher.db.tables import batches, jobs, ledger, pauses
from batcher.domain import BATCH_AT_PROVIDER, BatchState, JobSpec, Provider
from batcher.errors import ProviderError
from batcher.intake import enqueue_specs
from batcher.lifecycle import Pipeline
from batcher.providers.base import BatchStatus, Limits, Outcome, OutcomeKind
from batcher.testing import FAKE_LIMITS, FakeProvider, FakeResult
from batcher.timeutil import utcnow

ENDPOINT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"

POLL_MIN_S = 1.0
POLL_MAX_S = 8.0
MAX_WAIT_S = 60.0
LEASE_S = 30.0
PAUSE_S = 100.0
TURNAROUND_S = 3600.0
MAX_ATTEMPTS = 3

_custom_ids = itertools.count()


# ---------------------------------------------------------------------------------------------- helpers


def small(max_requests: int = 50_000, max_bytes: int = FAKE_LIMITS.max_bytes) -> Limits:
    return replace(FAKE_LIMITS, max_requests=max_requests, max_bytes=max_bytes)


def make_settings(db_url: str, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "poll_min_s": POLL_MIN_S,
        "poll_max_s": POLL_MAX_S,
        "pack_max_wait_s": MAX_WAIT_S,
        "lease_s": LEASE_S,
        "max_attempts": MAX_ATTEMPTS,
        "token_limit_pause_s": PAUSE_S,
        "expected_turnaround_s": TURNAROUND_S,
        # retry delays exact (no jitter): these tests pin them to the second
        "retry_jitter": 0.0,
    }
    values.update(over)
    return Settings(**values)


def make_pipeline(
    db: Database,
    db_url: str,
    fake: FakeProvider | None = None,
    *,
    owner: str = "w1",
    clock: Callable[[], datetime] | None = None,
    extra: dict[str, FakeProvider] | None = None,
    **over: Any,
) -> tuple[Pipeline, FakeProvider]:
    fake = fake if fake is not None else FakeProvider("fake")
    adapters: dict[str, Any] = {"fake": fake, **(extra or {})}
    kwargs: dict[str, Any] = {"owner": owner}
    if clock is not None:
        kwargs["clock"] = clock
    return Pipeline(db, make_settings(db_url, **over), adapters, **kwargs), fake


def spec(
    *,
    run: str = "r",
    model: str = "m1",
    endpoint: str = ENDPOINT,
    account: str = "fake",
    priority: int = 0,
    not_after: datetime | None = None,
    text: str = "hello",
) -> JobSpec:
    if endpoint == EMBEDDINGS:
        body: dict[str, Any] = {"model": model, "input": text}
    else:
        body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return JobSpec(
        provider=Provider.OPENAI,
        endpoint=endpoint,
        model=model,
        custom_id=f"c{next(_custom_ids)}",
        body=body,
        run=run,
        account=account,
        priority=priority,
        not_after=not_after,
    )


async def enqueue(db: Database, n: int = 1, **kw: Any) -> list[str]:
    return await enqueue_specs(db, [spec(**kw) for _ in range(n)])


async def job_rows(db: Database) -> dict[str, dict[str, Any]]:
    async with db.engine.connect() as conn:
        return {r["id"]: dict(r) for r in (await conn.execute(sa.select(jobs))).mappings()}


async def batch_rows(db: Database) -> list[dict[str, Any]]:
    async with db.engine.connect() as conn:
        query = sa.select(batches).order_by(batches.c.created_at, batches.c.id)
        return [dict(r) for r in (await conn.execute(query)).mappings()]


async def batch_row(db: Database, batch_id: str) -> dict[str, Any]:
    async with db.engine.connect() as conn:
        return dict((await conn.execute(sa.select(batches).where(batches.c.id == batch_id))).mappings().one())


def after(t: datetime, seconds: float) -> datetime:
    return t + timedelta(seconds=seconds)


async def step(p: Pipeline, t: datetime, *, force: bool = True) -> None:
    """One tick: pack, then every due submit, poll and collect."""
    await p.pack(t, force=force)
    due = await p.due(t)
    for batch_id in due.submit:
        await p.submit(batch_id, t)
    for batch_id in due.poll:
        await p.poll(batch_id, t)
    for batch_id in due.collect:
        await p.collect(batch_id, t)


async def drive(p: Pipeline, t: datetime, *, force: bool = True, max_rounds: int = 300) -> datetime:
    """Tick until nothing is pending; returns the time it ended."""
    for _ in range(max_rounds):
        await step(p, t, force=force)
        if not await p.pending():
            return t
        t = after(t, POLL_MAX_S + 1)
    raise AssertionError("the pipeline never finished")


async def packed_and_submitted(p: Pipeline, t: datetime) -> list[str]:
    """Pack everything now and submit each new batch; returns the batch ids."""
    created = await p.pack(t, force=True)
    for batch_id in created:
        await p.submit(batch_id, t)
    return created


async def to_collect(p: Pipeline, batch_id: str, t: datetime) -> datetime:
    """Poll a submitted (instant) batch until it is ready to collect; returns the time."""
    t = after(t, POLL_MIN_S)
    state = await p.poll(batch_id, t)
    assert state is not None
    return t


def provider_id(row: dict[str, Any]) -> str:
    pid = row["provider_batch_id"]
    assert isinstance(pid, str)
    return pid


class Scripted(FakeProvider):
    """A FakeProvider whose result stream can repeat lines, add foreign ones, crash part-way or go slowly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra: list[Outcome] = []
        self.repeat = 1
        self.crash_after: int | None = None
        self.crash: BaseException = ProviderError("results: connection reset", provider="fake", retryable=True)
        self.delay_s = 0.0
        self.lines_sent = 0

    async def results(self, status: BatchStatus) -> AsyncIterator[Outcome]:
        async def lines() -> AsyncIterator[Outcome]:
            async for outcome in super(Scripted, self).results(status):
                for _ in range(self.repeat):
                    yield outcome
            for outcome in self.extra:
                yield outcome

        sent = 0
        async for outcome in lines():
            if self.crash_after is not None and sent >= self.crash_after:
                self.crash_after = None
                raise self.crash
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            sent += 1
            self.lines_sent += 1
            yield outcome


class WorkerDied(Exception):
    """Stands for a worker killed at a line (not a ProviderError: nothing catches it)."""


# ------------------------------------------------------------------------------------------------- pack


async def test_pack_groups_by_account_endpoint_model(db: Database, db_url: str) -> None:
    other = FakeProvider("other")
    p, _ = make_pipeline(db, db_url, extra={"other": other})
    await enqueue(db, 3, model="m1")
    await enqueue(db, 2, model="m2")
    await enqueue(db, 2, model="m1", endpoint=EMBEDDINGS)
    await enqueue(db, 2, model="m1", account="other")
    unserved = await enqueue(db, 2, model="m1", account="nobody")
    created = await p.pack(utcnow(), force=True)
    assert len(created) == 4
    rows = await job_rows(db)
    made = {b["id"]: b for b in await batch_rows(db)}
    assert set(made) == set(created)
    seen: dict[tuple[str, str, str], int] = {}
    for batch in made.values():
        members = [r for r in rows.values() if r["batch_id"] == batch["id"]]
        assert batch["state"] == "open"
        assert batch["request_count"] == len(members)
        # one account, one endpoint, one model per batch
        assert {(r["account"], r["endpoint"], r["model"]) for r in members} == {
            (batch["account"], batch["endpoint"], batch["model"])
        }
        assert {r["state"] for r in members} == {"packed"}
        seen[(batch["account"], batch["endpoint"], batch["model"])] = len(members)
    assert seen == {
        ("fake", ENDPOINT, "m1"): 3,
        ("fake", ENDPOINT, "m2"): 2,
        ("fake", EMBEDDINGS, "m1"): 2,
        ("other", ENDPOINT, "m1"): 2,
    }
    # an account this worker has no adapter for is left alone
    assert all(rows[j]["state"] == "queued" and rows[j]["batch_id"] is None for j in unserved)


async def test_pack_records_the_batch_row(db: Database, db_url: str) -> None:
    p, _ = make_pipeline(db, db_url)
    ids = await enqueue(db, 4, model="m1")
    t = utcnow()
    [batch_id] = await p.pack(t, force=True)
    batch = await batch_row(db, batch_id)
    assert (batch["provider"], batch["account"], batch["endpoint"], batch["model"]) == (
        "openai",
        "fake",
        ENDPOINT,
        "m1",
    )
    assert batch["state"] == "open" and batch["request_count"] == 4
    assert batch["next_poll_at"] == t and batch["poll_interval_s"] == POLL_MIN_S
    assert batch["provider_batch_id"] is None and batch["lease_owner"] is None
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "packed" and rows[j]["batch_id"] == batch_id for j in ids)
    # nothing left to pack: a second call makes no empty batch
    assert await p.pack(t, force=True) == []


async def test_pack_splits_by_count_highest_priority_first(db: Database, db_url: str) -> None:
    p, _ = make_pipeline(db, db_url, FakeProvider("fake", limits=small(max_requests=3)))
    by_priority = {prio: (await enqueue(db, 1, priority=prio))[0] for prio in (0, 5, 1, 9, 2)}
    t = utcnow()
    # 5 jobs, 3 per batch: one full batch now, the remainder waits for company (not yet max-wait)
    [first] = await p.pack(t)
    rows = await job_rows(db)
    assert {j for j, r in rows.items() if r["batch_id"] == first} == {by_priority[9], by_priority[5], by_priority[2]}
    assert rows[by_priority[1]]["state"] == rows[by_priority[0]]["state"] == "queued"
    assert await p.pack(t) == []
    [second] = await p.pack(t, force=True)
    rows = await job_rows(db)
    assert {j for j, r in rows.items() if r["batch_id"] == second} == {by_priority[1], by_priority[0]}


async def test_pack_splits_by_bytes(db: Database, db_url: str) -> None:
    # each body is ~1,100 bytes + 160 of envelope: two fit in 3,000 bytes, three do not
    p, _ = make_pipeline(db, db_url, FakeProvider("fake", limits=small(max_bytes=3000)))
    await enqueue(db, 5, text="x" * 1050)
    created = await p.pack(utcnow(), force=True)
    made = await batch_rows(db)
    assert len(created) == 3
    assert sorted(b["request_count"] for b in made) == [1, 2, 2]


async def test_pack_waits_for_max_wait(db: Database, db_url: str) -> None:
    p, _ = make_pipeline(db, db_url)
    await enqueue(db, 3)
    t0 = utcnow()
    assert await p.pack(t0) == []
    assert await p.pack(after(t0, MAX_WAIT_S - 5)) == []
    assert len(await p.pack(after(t0, MAX_WAIT_S))) == 1


async def test_pack_deadline_forces_packing(db: Database, db_url: str) -> None:
    p, _ = make_pipeline(db, db_url)
    lead = p.settings.deadline_lead_s
    t0 = utcnow()
    # a batch can still make it, but only if it goes now (within the lead before the last moment)
    urgent = await enqueue(db, 1, model="m1", not_after=after(t0, TURNAROUND_S + lead - 10))
    relaxed = await enqueue(db, 1, model="m2", not_after=after(t0, TURNAROUND_S + 600))
    # too late for any batch: left to the deadline sweep (real-time fallback), never packed
    doomed = await enqueue(db, 1, model="m3", not_after=after(t0, TURNAROUND_S - 10))
    created = await p.pack(t0)
    assert len(created) == 1
    rows = await job_rows(db)
    assert rows[urgent[0]]["batch_id"] == created[0]
    assert rows[relaxed[0]]["state"] == "queued"
    assert rows[doomed[0]]["state"] == "queued" and rows[doomed[0]]["batch_id"] is None
    # ten minutes later (less the lead) the relaxed one's deadline is within the turnaround too
    assert len(await p.pack(after(t0, 600 - lead + 1))) == 1
    # even forced, the doomed one is not packed
    assert await p.pack(after(t0, 600 - lead + 1), force=True) == []
    assert (await job_rows(db))[doomed[0]]["state"] == "queued"


async def test_pack_skips_paused_account_model(db: Database, db_url: str) -> None:
    p, _ = make_pipeline(db, db_url)
    paused = await enqueue(db, 2, model="m1")
    await enqueue(db, 2, model="m2")
    t0 = utcnow()
    async with db.engine.begin() as conn:
        await conn.execute(
            pauses.insert().values(account="fake", model="m1", until=after(t0, 50), backoff_s=50, reason="test")
        )
        # a pause of another account's model does not matter here
        await conn.execute(
            pauses.insert().values(account="other", model="m2", until=after(t0, 500), backoff_s=500, reason="test")
        )
    created = await p.pack(t0, force=True)
    assert [b["model"] for b in await batch_rows(db)] == ["m2"]
    assert len(created) == 1
    assert await p.pack(after(t0, 49), force=True) == []
    # the pause runs out
    [later] = await p.pack(after(t0, 51), force=True)
    rows = await job_rows(db)
    assert all(rows[j]["batch_id"] == later for j in paused)


async def test_pack_survives_rows_taken_between_read_and_write(
    sqlite_db: Database, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a job cancelled between the packer's read and its write made pack() raise.

    On SQLite the packer's SELECT takes no lock, so a concurrent writer (a cancel from the API, another worker)
    can change a candidate row before the UPDATE. The group is rolled back and must simply wait for the next
    tick; other groups are still packed.
    """
    # SQLite only: on PostgreSQL the packer's FOR UPDATE SKIP LOCKED closes this window
    db, db_url = sqlite_db, sqlite_url
    p, _ = make_pipeline(db, db_url)
    m1 = await enqueue(db, 3, model="m1", run="a")
    await enqueue(db, 2, model="m2", run="b")
    path = db.engine.url.database
    assert path
    real_split = packer.split
    raced: list[str] = []

    def racing_split(rows: Iterable[tuple[str, int]], limits: Limits, *, keep_partial: bool) -> list[list[str]]:
        rows = list(rows)
        if not raced and rows and rows[0][0] in m1:
            raced.append(rows[0][0])
            with contextlib.closing(sqlite3.connect(path, timeout=30)) as other:
                other.execute(
                    "UPDATE jobs SET state = 'cancelled', settled_at = '2025-01-01 00:00:00.000000' WHERE id = ?",
                    (rows[0][0],),
                )
                other.commit()
        return real_split(rows, limits, keep_partial=keep_partial)

    monkeypatch.setattr(lifecycle, "split", racing_split)
    t = utcnow()
    created = await p.pack(t, force=True)
    assert raced
    # the m1 group lost the race and was rolled back; m2 was packed
    assert [b["model"] for b in await batch_rows(db)] == ["m2"]
    assert len(created) == 1
    rows = await job_rows(db)
    assert sorted(rows[j]["state"] for j in m1) == ["cancelled", "queued", "queued"]
    # next tick packs what is left of m1, and only that
    [again] = await p.pack(t, force=True)
    rows = await job_rows(db)
    assert sorted(j for j in m1 if rows[j]["batch_id"] == again) == sorted(j for j in m1 if j not in raced)
    assert (await batch_row(db, again))["request_count"] == 2


# ----------------------------------------------------------------------------------------------- submit


class SpyProvider(FakeProvider):
    """Checks, at the moment the provider is called, what the database already holds."""

    def __init__(self, db: Database) -> None:
        super().__init__("fake")
        self.db = db
        self.seen: list[tuple[str, str, str | None]] = []

    async def _look(self, method: str) -> None:
        async with self.db.engine.connect() as conn:
            state, owner = (await conn.execute(sa.select(batches.c.state, batches.c.lease_owner))).one()
        self.seen.append((method, state, owner))

    async def upload(self, path: Path) -> str:
        await self._look("upload")
        return await super().upload(path)

    async def create(
        self, *, batch_id: str, endpoint: str, model: str, input_file_id: str | None, path: Path
    ) -> BatchStatus:
        await self._look("create")
        return await super().create(
            batch_id=batch_id, endpoint=endpoint, model=model, input_file_id=input_file_id, path=path
        )


async def test_submit_commits_the_claim_before_calling_the_provider(db: Database, db_url: str) -> None:
    p, spy = make_pipeline(db, db_url, SpyProvider(db))
    ids = await enqueue(db, 3)
    t = utcnow()
    [batch_id] = await p.pack(t, force=True)
    await p.submit(batch_id, t)
    assert isinstance(spy, SpyProvider)
    # seen from another connection: the row was committed submitting, under our lease, before each call
    assert spy.seen == [("upload", "submitting", "w1"), ("create", "submitting", "w1")]
    batch = await batch_row(db, batch_id)
    assert batch["state"] == "validating"
    assert batch["lease_owner"] is None and batch["lease_expires_at"] is None
    assert batch["submit_attempts"] == 1
    assert batch["submitted_at"] == t and batch["next_poll_at"] == after(t, POLL_MIN_S)
    assert batch["input_file_id"] in spy.files
    assert batch["bytes"] > 0 and batch["request_count"] == 3
    fake_batch = spy.batches[provider_id(batch)]
    # our batch id travels in the provider batch's metadata
    assert fake_batch.batch_id == batch_id
    assert sorted(fake_batch.results) == sorted(ids)
    assert spy.received == dict.fromkeys(ids, 1)
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "submitted" and rows[j]["attempts"] == 1 for j in ids)
    # the batch file is gone once the provider has it
    assert not list(p.work_dir.glob(f"batcher-{batch_id}.jsonl"))


async def test_submit_is_a_no_op_for_a_batch_not_due_or_not_open(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url)
    await enqueue(db, 2)
    t = utcnow()
    [batch_id] = await p.pack(t, force=True)
    # not due yet
    await p.submit(batch_id, after(t, -1))
    assert (await batch_row(db, batch_id))["state"] == "open"
    await p.submit(batch_id, t)
    await p.submit(batch_id, after(t, 100))
    assert fake.calls["create"] == 1 and len(fake.batches) == 1
    assert (await batch_row(db, batch_id))["submit_attempts"] == 1


@pytest.mark.parametrize("method", ["upload", "create"])
@pytest.mark.parametrize("retry_after_s", [None, 20.0])
async def test_submit_retryable_error_reopens_the_batch(
    db: Database, db_url: str, method: str, retry_after_s: float | None
) -> None:
    p, fake = make_pipeline(db, db_url)
    ids = await enqueue(db, 3)
    t = utcnow()
    [batch_id] = await p.pack(t, force=True)
    fake.fail_next(method=method, retryable=True, retry_after_s=retry_after_s)
    await p.submit(batch_id, t)
    batch = await batch_row(db, batch_id)
    delay = retry_after_s or POLL_MIN_S
    assert batch["state"] == "open"
    assert batch["next_poll_at"] == after(t, delay)
    assert batch["lease_owner"] is None and batch["provider_batch_id"] is None
    assert not fake.batches
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "packed" and rows[j]["attempts"] == 0 for j in ids)
    # not due before the delay
    assert (await p.due(after(t, delay - 0.5))).submit == []
    assert (await p.due(after(t, delay))).submit == [batch_id]
    await p.submit(batch_id, after(t, delay))
    batch = await batch_row(db, batch_id)
    assert batch["state"] == "validating" and batch["submit_attempts"] == 2
    assert len(fake.batches) == 1
    assert fake.received == dict.fromkeys(ids, 1)
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "submitted" and rows[j]["attempts"] == 1 for j in ids)
    # a file uploaded before a failed create is reused, not uploaded again
    assert fake.calls["upload"] == (2 if method == "upload" else 1)


async def test_submit_create_response_lost_is_recovered_via_find_batch(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url)
    ids = await enqueue(db, 4)
    t = utcnow()
    [batch_id] = await p.pack(t, force=True)
    fake.fail_next(method="create", retryable=True, after=True)
    await p.submit(batch_id, t)
    assert (await batch_row(db, batch_id))["state"] == "open"
    [created_pid] = list(fake.batches)
    t2 = after(t, POLL_MIN_S)
    await p.submit(batch_id, t2)
    batch = await batch_row(db, batch_id)
    assert batch["state"] == "validating"
    assert batch["provider_batch_id"] == created_pid
    assert fake.calls["find_batch"] == 1 and fake.calls["create"] == 1
    assert len(fake.batches) == 1
    assert fake.received == dict.fromkeys(ids, 1)
    await drive(p, t2)
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "succeeded" and rows[j]["attempts"] == 1 for j in ids)
    assert fake.received == dict.fromkeys(ids, 1)


async def test_worker_dying_after_create_is_recovered_once_the_lease_runs_out(db: Database, db_url: str) -> None:
    class DiesAfterCreate(FakeProvider):
        dead = False

        async def create(self, **kwargs: Any) -> BatchStatus:
            status = await super().create(**kwargs)
            if not self.dead:
                self.dead = True
                raise WorkerDied("killed before recording the provider batch id")
            return status

    fake = DiesAfterCreate("fake")
    p1, _ = make_pipeline(db, db_url, fake, owner="w1")
    p2, _ = make_pipeline(db, db_url, fake, owner="w2")
    ids = await enqueue(db, 5)
    t = utcnow()
    [batch_id] = await p1.pack(t, force=True)
    with pytest.raises(WorkerDied):
        await p1.submit(batch_id, t)
    batch = await batch_row(db, batch_id)
    assert batch["state"] == "submitting" and batch["lease_owner"] == "w1"
    assert batch["provider_batch_id"] is None
    # the lease still holds: nobody else touches it
    assert (await p2.due(after(t, LEASE_S - 1))).submit == []
    await p2.submit(batch_id, after(t, LEASE_S - 1))
    assert fake.calls["create"] == 1
    # the lease ran out: the next submit finds the provider batch instead of creating another
    t2 = after(t, LEASE_S + 1)
    assert (await p2.due(t2)).submit == [batch_id]
    await p2.submit(batch_id, t2)
    batch = await batch_row(db, batch_id)
    [pid] = list(fake.batches)
    assert batch["state"] == "validating" and batch["provider_batch_id"] == pid
    assert batch["submit_attempts"] == 2
    assert fake.calls["create"] == 1 and fake.calls["find_batch"] == 1
    await drive(p2, t2)
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "succeeded" and rows[j]["attempts"] == 1 for j in ids)
    assert fake.received == dict.fromkeys(ids, 1)


async def test_worker_dying_before_create_creates_once_after_the_lease(db: Database, db_url: str) -> None:
    class DiesAfterUpload(FakeProvider):
        dead = False

        async def upload(self, path: Path) -> str:
            file_id = await super().upload(path)
            if not self.dead:
                self.dead = True
                raise WorkerDied("killed after upload")
            return file_id

    fake = DiesAfterUpload("fake")
    p, _ = make_pipeline(db, db_url, fake)
    ids = await enqueue(db, 2)
    t = utcnow()
    [batch_id] = await p.pack(t, force=True)
    with pytest.raises(WorkerDied):
        await p.submit(batch_id, t)
    await p.submit(batch_id, after(t, LEASE_S + 1))
    assert fake.calls["find_batch"] == 1 and fake.calls["create"] == 1
    assert (await batch_row(db, batch_id))["state"] == "validating"
    assert fake.received == dict.fromkeys(ids, 1)


class GatedCreate(FakeProvider):
    """The first create waits for ``gate`` (a slow provider call outliving its lease)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.gated = True
        self.before_create: Callable[[], Any] | None = None

    async def create(self, **kwargs: Any) -> BatchStatus:
        if self.gated:
            self.gated = False
            self.entered.set()
            await self.gate.wait()
        if self.before_create is not None:
            await self.before_create()
        return await super().create(**kwargs)


async def test_submit_outliving_its_lease_cancels_its_orphan_batch(db: Database, db_url: str) -> None:
    """Regression: a submit whose lease ran out while create was in flight left the provider batch it created
    running although another worker had recorded its own: the jobs ran twice and one batch was never collected."""
    fake = GatedCreate("fake")
    p1, _ = make_pipeline(db, db_url, fake, owner="w1")
    p2, _ = make_pipeline(db, db_url, fake, owner="w2")
    ids = await enqueue(db, 3)
    t = utcnow()
    [batch_id] = await p1.pack(t, force=True)
    slow = asyncio.create_task(p1.submit(batch_id, t))
    await fake.entered.wait()
    # w1's lease runs out; w2 finds nothing at the provider yet and creates the batch itself
    await p2.submit(batch_id, after(t, LEASE_S + 1))
    recorded = provider_id(await batch_row(db, batch_id))
    fake.gate.set()
    await slow
    assert len(fake.batches) == 2
    [orphan] = [pid for pid in fake.batches if pid != recorded]
    assert fake.batches[orphan].cancel_requested
    assert not fake.batches[recorded].cancel_requested
    batch = await batch_row(db, batch_id)
    assert batch["provider_batch_id"] == recorded and batch["state"] == "validating"
    await drive(p2, after(t, LEASE_S + 1))
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "succeeded" and rows[j]["attempts"] == 1 for j in ids)


async def test_jobs_cancelled_during_create_stop_the_provider_batch(db: Database, db_url: str) -> None:
    """Regression: jobs cancelled while their batch was being created left a provider batch running (and billed)
    for nobody."""
    fake = GatedCreate("fake", instant=False)
    fake.gated = False
    p, _ = make_pipeline(db, db_url, fake)
    ids = await enqueue(db, 3, run="doomed")
    t = utcnow()
    [batch_id] = await p.pack(t, force=True)

    async def cancel_meanwhile() -> None:
        report = await p.cancel_run("doomed", t)
        assert report.jobs_cancelled == 3 and report.batches_cancelled == 0

    fake.before_create = cancel_meanwhile
    await p.submit(batch_id, t)
    batch = await batch_row(db, batch_id)
    assert batch["state"] == "cancelling"
    assert fake.batches[provider_id(batch)].cancel_requested
    fake.advance()
    await drive(p, t)
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "cancelled" for j in ids)
    assert (await batch_row(db, batch_id))["state"] == "collected"


async def test_jobs_cancelled_during_create_that_the_provider_ran_are_in_the_ledger(db: Database, db_url: str) -> None:
    """Regression: a run cancelled while its batch was being created, in a batch shared with another run, was sent
    and billed all the same, but its jobs had no ledger entry: spend was lost."""
    fake = GatedCreate("fake", instant=False)
    fake.gated = False
    p, _ = make_pipeline(db, db_url, fake)
    doomed = await enqueue(db, 2, run="doomed", model="gpt-4o-mini")
    [kept] = await enqueue(db, 1, run="kept", model="gpt-4o-mini")
    t = utcnow()
    [batch_id] = await p.pack(t, force=True)

    async def cancel_meanwhile() -> None:
        report = await p.cancel_run("doomed", t)
        assert report.jobs_cancelled == 2

    fake.before_create = cancel_meanwhile
    await p.submit(batch_id, t)
    # the file was written before the cancel: the provider runs all three
    assert set(fake.received) == {*doomed, kept}
    fake.advance()
    await drive(p, t)
    rows = await job_rows(db)
    assert [rows[j]["state"] for j in doomed] == ["cancelled", "cancelled"] and rows[kept]["state"] == "succeeded"
    async with db.engine.connect() as conn:
        entries = {r["job_id"]: r for r in (await conn.execute(sa.select(ledger))).mappings()}
    assert set(entries) == {*doomed, kept}
    for job_id in doomed:
        # billed like the job that ran on, under the attempt that never counted
        assert entries[job_id]["actual_usd"] == entries[kept]["actual_usd"] > 0
        assert entries[job_id]["attempt"] == rows[job_id]["attempts"] + 1 == 1
    # collecting again records nothing twice
    await p.collect(batch_id, t)
    async with db.engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(ledger)) == 3


async def test_submit_refused_fails_the_jobs_after_max_attempts(db: Database, db_url: str) -> None:
    """Regression: a batch the provider refuses (non-retryable) requeued its never-sent jobs without counting
    the attempt, so they were packed and refused again forever."""
    p, fake = make_pipeline(db, db_url)
    ids = await enqueue(db, 3)
    fake.fail_next(100, method="create", retryable=False, message="file is malformed")
    t = utcnow()
    [batch_id] = await p.pack(t, force=True)
    await p.submit(batch_id, t)
    batch = await batch_row(db, batch_id)
    assert batch["state"] == "failed" and batch["lease_owner"] is None
    assert batch["errors"][0]["code"] == "submit_failed"
    assert "file is malformed" in batch["errors"][0]["message"]
    assert not fake.batches
    assert (await p.due(t)).collect == [batch_id]
    report = await p.collect(batch_id, t)
    assert report is not None and report.requeued == 3
    rows = await job_rows(db)
    # the refusal counts as an attempt
    assert all(rows[j]["state"] == "queued" and rows[j]["attempts"] == 1 for j in ids)
    await drive(p, t)
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "failed" for j in ids)
    assert {rows[j]["error_code"] for j in ids} == {"submit_failed"}
    assert {rows[j]["attempts"] for j in ids} == {MAX_ATTEMPTS}
    assert fake.calls["create"] == MAX_ATTEMPTS
    assert {b["state"] for b in await batch_rows(db)} == {"collected"}


async def test_empty_open_batch_ends_cancelled_then_collected(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url)
    ids = await enqueue(db, 3, run="doomed")
    t = utcnow()
    [batch_id] = await p.pack(t, force=True)
    report = await p.cancel_run("doomed", t)
    assert report.jobs_cancelled == 3 and report.batches_cancelled == 0
    await p.submit(batch_id, t)
    batch = await batch_row(db, batch_id)
    assert batch["state"] == "cancelled" and batch["lease_owner"] is None
    # nothing was sent
    assert fake.calls["upload"] == 0 and fake.calls["create"] == 0
    assert (await p.due(t)).collect == [batch_id]
    collected = await p.collect(batch_id, t)
    assert collected is not None and collected.cancelled == 3
    batch = await batch_row(db, batch_id)
    assert batch["state"] == "collected" and batch["cancelled"] == 3
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "cancelled" for j in ids)
    assert not await p.pending()


async def test_jobs_cancelled_after_upload_are_not_sent(db: Database, db_url: str) -> None:
    """Regression: a batch reopened after a failed create reused its uploaded file even when some of its jobs
    had been cancelled meanwhile, so the provider ran (and billed) cancelled jobs."""
    p, fake = make_pipeline(db, db_url)
    keep = await enqueue(db, 2, run="keep")
    drop = await enqueue(db, 2, run="drop")
    t = utcnow()
    [batch_id] = await p.pack(t, force=True)
    fake.fail_next(method="create", retryable=True)
    await p.submit(batch_id, t)
    stale_file = (await batch_row(db, batch_id))["input_file_id"]
    assert stale_file is not None
    await p.cancel_run("drop", t)
    # deleting the stale file fails: no matter, the batch goes on with a fresh one
    fake.fail_next(method="delete_file", retryable=False)
    await p.submit(batch_id, after(t, POLL_MIN_S))
    batch = await batch_row(db, batch_id)
    assert batch["state"] == "validating"
    assert batch["input_file_id"] != stale_file
    assert batch["request_count"] == 2
    assert fake.received == dict.fromkeys(keep, 1)
    assert fake.calls["delete_file"] == 1
    await drive(p, after(t, POLL_MIN_S))
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "succeeded" for j in keep)
    assert all(rows[j]["state"] == "cancelled" for j in drop)


# ------------------------------------------------------------------------------------------------- poll


async def test_poll_backs_off_and_caps(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url, FakeProvider("fake", instant=False))
    await enqueue(db, 2)
    t = utcnow()
    [batch_id] = await packed_and_submitted(p, t)
    intervals = []
    for _ in range(6):
        batch = await batch_row(db, batch_id)
        due_at = batch["next_poll_at"]
        # not due a moment before
        assert await p.poll(batch_id, after(due_at, -0.5)) is None
        assert await p.poll(batch_id, due_at) is BatchState.VALIDATING
        batch = await batch_row(db, batch_id)
        intervals.append(batch["poll_interval_s"])
        assert batch["next_poll_at"] == after(due_at, batch["poll_interval_s"])
        assert batch["last_polled_at"] == due_at and batch["lease_owner"] is None
    assert intervals == [2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    fake.advance(to=BatchState.IN_PROGRESS)
    due_at = (await batch_row(db, batch_id))["next_poll_at"]
    assert await p.poll(batch_id, due_at) is BatchState.IN_PROGRESS
    fake.advance()
    due_at = (await batch_row(db, batch_id))["next_poll_at"]
    assert await p.poll(batch_id, due_at) is BatchState.ENDED
    batch = await batch_row(db, batch_id)
    assert batch["state"] == "ended" and batch["ended_at"] == due_at and batch["next_poll_at"] == due_at
    assert batch["output_file_id"]
    assert (await p.due(due_at)).collect == [batch_id]
    # an ended batch is no longer polled
    assert await p.poll(batch_id, after(due_at, 100)) is None


async def test_poll_keeps_state_when_the_provider_goes_backwards(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url, FakeProvider("fake", instant=False))
    await enqueue(db, 1)
    t = utcnow()
    [batch_id] = await packed_and_submitted(p, t)
    fake.advance(to=BatchState.FINALIZING)
    t = after(t, POLL_MIN_S)
    assert await p.poll(batch_id, t) is BatchState.FINALIZING
    fake.batches[provider_id(await batch_row(db, batch_id))].state = BatchState.VALIDATING
    t = after(t, POLL_MAX_S)
    assert await p.poll(batch_id, t) is BatchState.FINALIZING
    assert (await batch_row(db, batch_id))["state"] == "finalizing"


async def test_poll_lease_excludes_a_second_poller_until_it_expires(db: Database, db_url: str) -> None:
    fake = FakeProvider("fake", instant=False)
    p1, _ = make_pipeline(db, db_url, fake, owner="w1")
    p2, _ = make_pipeline(db, db_url, fake, owner="w2")
    await enqueue(db, 2)
    t = utcnow()
    [batch_id] = await packed_and_submitted(p1, t)
    t = after(t, POLL_MIN_S)
    claimed = await p1._claim(batch_id, t, BATCH_AT_PROVIDER, due_only=True)
    assert claimed is not None and claimed["lease_owner"] == "w1"
    assert await p2._claim(batch_id, t, BATCH_AT_PROVIDER, due_only=True) is None
    assert await p1._claim(batch_id, t, BATCH_AT_PROVIDER, due_only=True) is None
    assert await p2.poll(batch_id, t) is None
    assert batch_id not in (await p2.due(t)).poll
    assert fake.calls["retrieve"] == 0
    # w1 died holding the lease: w2 takes over once it has expired
    late = after(t, LEASE_S + 1)
    assert batch_id in (await p2.due(late)).poll
    assert await p2.poll(batch_id, late) is BatchState.VALIDATING
    assert fake.calls["retrieve"] == 1
    batch = await batch_row(db, batch_id)
    assert batch["lease_owner"] is None and batch["last_polled_at"] == late
    # w1's late release does not clobber w2's work
    await p1._release(batch_id, late, state=BatchState.FAILED.value)
    assert (await batch_row(db, batch_id))["state"] == "validating"


async def test_concurrent_polls_call_the_provider_once(db: Database, db_url: str) -> None:
    fake = FakeProvider("fake", instant=False)
    p1, _ = make_pipeline(db, db_url, fake, owner="w1")
    p2, _ = make_pipeline(db, db_url, fake, owner="w2")
    await enqueue(db, 2)
    t = utcnow()
    [batch_id] = await packed_and_submitted(p1, t)
    t = after(t, POLL_MIN_S)
    results = await asyncio.gather(p1.poll(batch_id, t), p2.poll(batch_id, t))
    assert sorted(str(r) for r in results) == sorted([str(None), str(BatchState.VALIDATING)])
    assert fake.calls["retrieve"] == 1


@pytest.mark.parametrize("retry_after_s", [None, 45.0])
async def test_poll_retryable_error_keeps_state_and_pushes_next_poll(
    db: Database, db_url: str, retry_after_s: float | None
) -> None:
    p, fake = make_pipeline(db, db_url, FakeProvider("fake", instant=False))
    await enqueue(db, 2)
    t = utcnow()
    [batch_id] = await packed_and_submitted(p, t)
    t = after(t, POLL_MIN_S)
    assert await p.poll(batch_id, t) is BatchState.VALIDATING  # interval now 2s
    t = after(t, 2)
    fake.fail_next(method="retrieve", retryable=True, retry_after_s=retry_after_s)
    assert await p.poll(batch_id, t) is BatchState.VALIDATING
    batch = await batch_row(db, batch_id)
    delay = retry_after_s if retry_after_s is not None else 2.0
    assert batch["state"] == "validating"
    assert batch["next_poll_at"] == after(t, delay)
    # a failed poll does not count as a poll (no back-off step, no last_polled_at)
    assert batch["poll_interval_s"] == 2.0 and batch["last_polled_at"] == after(t, -2)
    assert batch["lease_owner"] is None
    assert await p.poll(batch_id, after(t, delay - 0.5)) is None
    fake.advance()
    assert await p.poll(batch_id, after(t, delay)) is BatchState.ENDED


# ---------------------------------------------------------------------------------------------- collect


async def test_collect_settles_every_outcome_kind(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url)
    ok, permanent, retryable, missing, cancelled = [(await enqueue(db, 1))[0] for _ in range(5)]
    fake.script(permanent, FakeResult.FAIL_PERMANENT)
    fake.script(retryable, FakeResult.FAIL_RETRYABLE)
    fake.script(missing, FakeResult.MISSING)
    fake.script(cancelled, FakeResult.CANCEL)
    t = utcnow()
    [batch_id] = await packed_and_submitted(p, t)
    t = await to_collect(p, batch_id, t)
    report = await p.collect(batch_id, t)
    assert report is not None
    assert (report.succeeded, report.failed, report.requeued, report.cancelled) == (1, 1, 2, 1)
    assert (report.results, report.missing, report.expired) == (4, 1, 0)
    rows = await job_rows(db)
    assert rows[ok]["state"] == "succeeded" and rows[ok]["settled_at"] == t
    assert '"chat.completion"' in rows[ok]["result"] and rows[ok]["usage"]["total_tokens"] == 15
    assert rows[ok]["error"] is None
    assert rows[permanent]["state"] == "failed" and rows[permanent]["error_code"] == "invalid_request_error"
    assert rows[permanent]["error"]["message"] == "fake invalid request"
    assert rows[permanent]["error"]["status_code"] == 400
    assert rows[retryable]["state"] == "queued" and rows[retryable]["error_code"] == "server_error"
    assert rows[retryable]["attempts"] == 1 and rows[retryable]["queued_at"] == t
    assert rows[missing]["state"] == "queued" and rows[missing]["error_code"] == "missing_result"
    assert rows[cancelled]["state"] == "cancelled"
    batch = await batch_row(db, batch_id)
    assert batch["state"] == "collected" and batch["collected_at"] == t
    assert batch["lease_owner"] is None and batch["next_poll_at"] is None
    assert (batch["succeeded"], batch["failed"], batch["expired"], batch["cancelled"]) == (1, 3, 0, 1)
    # a collected batch is not collected again
    assert await p.collect(batch_id, after(t, 1)) is None


async def test_retryable_and_missing_results_fail_at_max_attempts(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url)
    retryable, missing, recovers = [(await enqueue(db, 1))[0] for _ in range(3)]
    fake.script(retryable, FakeResult.FAIL_RETRYABLE)
    fake.script(missing, FakeResult.MISSING)
    fake.script(recovers, FakeResult.FAIL_RETRYABLE, FakeResult.MISSING, FakeResult.SUCCEED)
    await drive(p, utcnow())
    rows = await job_rows(db)
    assert rows[retryable]["state"] == "failed" and rows[retryable]["error_code"] == "server_error"
    assert rows[missing]["state"] == "failed" and rows[missing]["error_code"] == "missing_result"
    assert rows[recovers]["state"] == "succeeded" and rows[recovers]["error_code"] is None
    assert {r["attempts"] for r in rows.values()} == {MAX_ATTEMPTS}
    assert fake.received == {retryable: MAX_ATTEMPTS, missing: MAX_ATTEMPTS, recovers: MAX_ATTEMPTS}
    made = await batch_rows(db)
    assert len(made) == MAX_ATTEMPTS
    assert {b["state"] for b in made} == {"collected"}


async def test_expired_requests_are_retried_then_fail(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url)
    ok, always, recovers = [(await enqueue(db, 1))[0] for _ in range(3)]
    fake.script(always, FakeResult.EXPIRE)
    fake.script(recovers, FakeResult.EXPIRE, FakeResult.SUCCEED)
    t = utcnow()
    [first] = await packed_and_submitted(p, t)
    t = await to_collect(p, first, t)
    assert (await batch_row(db, first))["state"] == "expired"
    report = await p.collect(first, t)
    assert report is not None
    assert (report.succeeded, report.requeued, report.expired) == (1, 2, 2)
    batch = await batch_row(db, first)
    assert (batch["succeeded"], batch["failed"], batch["expired"]) == (1, 0, 2)
    rows = await job_rows(db)
    assert rows[always]["state"] == "queued" and rows[always]["error_code"] == "expired"
    await drive(p, t)
    rows = await job_rows(db)
    assert rows[ok]["state"] == "succeeded" and rows[ok]["attempts"] == 1
    assert rows[recovers]["state"] == "succeeded" and rows[recovers]["attempts"] == 2
    assert rows[always]["state"] == "failed" and rows[always]["error_code"] == "expired"
    assert rows[always]["attempts"] == MAX_ATTEMPTS


async def test_leftovers_of_an_expired_batch_are_expired(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url)
    expires, lost = [(await enqueue(db, 1))[0] for _ in range(2)]
    fake.script(expires, FakeResult.EXPIRE)
    fake.script(lost, FakeResult.MISSING)
    t = utcnow()
    [batch_id] = await packed_and_submitted(p, t)
    t = await to_collect(p, batch_id, t)
    report = await p.collect(batch_id, t)
    assert report is not None and report.expired == 2 and report.missing == 1
    rows = await job_rows(db)
    assert rows[lost]["error_code"] == "expired" and rows[lost]["state"] == "queued"
    assert (await batch_row(db, batch_id))["expired"] == 2


async def test_foreign_and_duplicate_result_lines_change_nothing(db: Database, db_url: str) -> None:
    fake = Scripted("fake")
    p, _ = make_pipeline(db, db_url, fake)
    [elsewhere] = await enqueue(db, 1, model="m2")
    mine = await enqueue(db, 2, model="m1")
    fake.script(mine[1], FakeResult.FAIL_PERMANENT)
    t = utcnow()
    created = await packed_and_submitted(p, t)
    assert len(created) == 2
    rows = await job_rows(db)
    [batch_id] = {rows[mine[0]]["batch_id"]}
    other_batch = rows[elsewhere]["batch_id"]
    fake.repeat = 2  # every line twice
    fake.extra = [
        Outcome("0" * 32, OutcomeKind.SUCCEEDED, body="{}"),
        Outcome(elsewhere, OutcomeKind.FAILED, error_code="invalid_request_error", retryable=False),
        Outcome(mine[0], OutcomeKind.FAILED, error_code="late_duplicate", retryable=False),
        Outcome(mine[1], OutcomeKind.SUCCEEDED, body='{"late": true}'),
    ]
    t = await to_collect(p, batch_id, t)
    report = await p.collect(batch_id, t)
    assert report is not None and report.results == 8
    rows = await job_rows(db)
    assert rows[mine[0]]["state"] == "succeeded" and rows[mine[0]]["error_code"] is None
    assert rows[mine[1]]["state"] == "failed" and rows[mine[1]]["result"] is None
    # a job of another batch, still at the provider, is untouched
    assert rows[elsewhere]["state"] == "submitted" and rows[elsewhere]["error"] is None
    batch = await batch_row(db, batch_id)
    assert (batch["succeeded"], batch["failed"]) == (1, 1)
    fake.repeat, fake.extra = 1, []
    await drive(p, t)
    rows = await job_rows(db)
    assert rows[elsewhere]["state"] == "succeeded"
    assert (await batch_row(db, other_batch))["succeeded"] == 1


async def test_duplicate_expired_lines_do_not_skew_counts(db: Database, db_url: str) -> None:
    """Regression: expired lines were counted per line, not per job, so a repeated line made the batch's
    ``failed`` count negative."""
    fake = Scripted("fake")
    p, _ = make_pipeline(db, db_url, fake)
    _ok, expires = [(await enqueue(db, 1))[0] for _ in range(2)]
    fake.script(expires, FakeResult.EXPIRE)
    fake.repeat = 3
    t = utcnow()
    [batch_id] = await packed_and_submitted(p, t)
    t = await to_collect(p, batch_id, t)
    report = await p.collect(batch_id, t)
    assert report is not None and report.expired == 1
    batch = await batch_row(db, batch_id)
    assert (batch["succeeded"], batch["failed"], batch["expired"]) == (1, 0, 1)


def mixed_scripts(fake: FakeProvider, ids: list[str]) -> dict[str, str]:
    """Script a spread of outcomes over ``ids``; returns the state each job must end in after one collect."""
    kinds = [
        (FakeResult.SUCCEED, "succeeded"),
        (FakeResult.FAIL_PERMANENT, "failed"),
        (FakeResult.FAIL_RETRYABLE, "queued"),
        (FakeResult.EXPIRE, "queued"),
        (FakeResult.MISSING, "queued"),
        (FakeResult.CANCEL, "cancelled"),
    ]
    expected = {}
    for i, job_id in enumerate(sorted(ids)):
        result, state = kinds[i % len(kinds)]
        fake.script(job_id, result)
        expected[job_id] = state
    return expected


@pytest.mark.parametrize("crash", ["provider_error", "worker_died"])
async def test_collect_again_after_a_crash_settles_each_job_once(db: Database, db_url: str, crash: str) -> None:
    fake = Scripted("fake")
    p, _ = make_pipeline(db, db_url, fake, settle_chunk=3)
    ids = await enqueue(db, 14)
    expected = mixed_scripts(fake, ids)
    t = utcnow()
    [batch_id] = await packed_and_submitted(p, t)
    t = await to_collect(p, batch_id, t)
    fake.crash_after = 7
    if crash == "worker_died":
        fake.crash = WorkerDied("killed mid-collect")
        with pytest.raises(WorkerDied):
            await p.collect(batch_id, t)
        # the lease holds until it runs out
        assert await p.collect(batch_id, after(t, 1)) is None
        t2 = after(t, LEASE_S + 1)
    else:
        assert await p.collect(batch_id, t) is None
        batch = await batch_row(db, batch_id)
        assert batch["lease_owner"] is None
        # the retry waits at least poll_min_s
        assert batch["next_poll_at"] == after(t, POLL_MIN_S)
        assert batch_id not in (await p.due(t)).collect
        t2 = after(t, POLL_MIN_S)
    assert (await batch_row(db, batch_id))["state"] == "expired"
    rows = await job_rows(db)
    # two chunks of three were settled before the crash; the rest is still at the provider
    assert sum(r["state"] != "submitted" for r in rows.values()) == 6
    assert batch_id in (await p.due(t2)).collect
    report = await p.collect(batch_id, t2)
    assert report is not None
    rows = await job_rows(db)
    assert {j: rows[j]["state"] for j in ids} == expected
    # settled once: jobs settled by the first collect kept its time
    first_run = {j for j in ids if rows[j]["updated_at"] == t}
    assert len(first_run) == 6
    states = [expected[j] for j in ids]
    assert report.succeeded == states.count("succeeded") == 3
    assert report.failed == states.count("failed") == 3
    assert report.cancelled == states.count("cancelled") == 2
    assert report.requeued == states.count("queued") == 6
    # the EXPIRE lines and (in an expired batch) the missing ones count as expired
    assert report.expired == 4
    batch = await batch_row(db, batch_id)
    assert batch["state"] == "collected"
    assert (batch["succeeded"], batch["failed"], batch["expired"], batch["cancelled"]) == (3, 5, 4, 2)
    assert all(rows[j]["attempts"] == 1 for j in ids)


async def test_unreadable_results_settle_as_missing(db: Database, db_url: str) -> None:
    """Regression: a non-retryable error reading results (the output file is gone) was retried forever, so the
    batch and its jobs never settled."""
    p, fake = make_pipeline(db, db_url)
    ids = await enqueue(db, 3)
    t = utcnow()
    [batch_id] = await packed_and_submitted(p, t)
    t = await to_collect(p, batch_id, t)
    fake.fail_next(method="results", retryable=False, message="output file not found")
    report = await p.collect(batch_id, t)
    assert report is not None and report.missing == 3 and report.requeued == 3
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "queued" and rows[j]["error_code"] == "missing_result" for j in ids)
    assert (await batch_row(db, batch_id))["state"] == "collected"
    await drive(p, t)
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "succeeded" and rows[j]["attempts"] == 2 for j in ids)


async def test_token_limit_requeues_gives_attempts_back_and_pauses(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url)
    ids = await enqueue(db, 3, model="m1")
    fake.fail_next_batch("token_limit_exceeded")
    t = utcnow()
    [batch_id] = await packed_and_submitted(p, t)
    # another model of the same account is not paused
    other = await enqueue(db, 2, model="m2")
    t = await to_collect(p, batch_id, t)
    batch = await batch_row(db, batch_id)
    assert batch["state"] == "failed" and batch["errors"][0]["code"] == "token_limit_exceeded"
    report = await p.collect(batch_id, t)
    assert report is not None and report.requeued == 3
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "queued" and rows[j]["attempts"] == 0 for j in ids)
    async with db.engine.connect() as conn:
        pause = dict((await conn.execute(sa.select(pauses))).mappings().one())
    assert (pause["account"], pause["model"], pause["reason"]) == ("fake", "m1", "token_limit_exceeded")
    assert pause["backoff_s"] == PAUSE_S and pause["until"] == after(t, PAUSE_S)
    # nothing else of m1 was at the provider: the batch alone was over the limit, so the next ones are halved
    assert pause["batch_cap"] == 1 and pause["batch_cap_until"] == after(t, settle.BATCH_CAP_S)
    # with no batch active, the end of the pause is the next thing due
    assert await p.next_due_in(after(t, 10)) == PAUSE_S - 10
    # paused: not packed even when forced (only m2 is)
    [m2_batch] = await p.pack(after(t, PAUSE_S - 1), force=True)
    assert (await batch_row(db, m2_batch))["model"] == "m2"
    assert await p.pack(after(t, PAUSE_S - 1), force=True) == []
    # second hit, while the model's other batches are at the provider: a queue to wait out, the pause doubles
    fake.fail_next_batch("token_limit_exceeded")
    t = after(t, PAUSE_S + 1)
    again = await packed_and_submitted(p, t)
    assert len(again) == 3, "one job per batch under the cap"
    t = await to_collect(p, again[0], t)
    await p.collect(again[0], t)
    async with db.engine.connect() as conn:
        pause = dict((await conn.execute(sa.select(pauses))).mappings().one())
    assert pause["backoff_s"] == 2 * PAUSE_S and pause["until"] == after(t, 2 * PAUSE_S)
    assert pause["batch_cap"] == 1
    await drive(p, t)
    rows = await job_rows(db)
    # two refusals did not use up the jobs' attempts
    assert all(rows[j]["state"] == "succeeded" and rows[j]["attempts"] == 1 for j in ids + other)


async def test_failed_batch_with_line_errors(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url, FakeProvider("fake", instant=False))
    ids = sorted(await enqueue(db, 4))
    fake.fail_next_batch("invalid_batch")
    t = utcnow()
    [batch_id] = await packed_and_submitted(p, t)
    fake.advance()
    pid = provider_id(await batch_row(db, batch_id))
    # the provider names lines 2 and 4 (1-based, in file order)
    fake.batches[pid].errors = [
        {"code": "invalid_body", "message": "line 2: body.messages is required", "line": 2, "param": "body"},
        {"code": None, "message": "line 4: bad", "line": 4, "param": None},
    ]
    t = after(t, POLL_MIN_S)
    assert await p.poll(batch_id, t) is BatchState.FAILED
    report = await p.collect(batch_id, t)
    assert report is not None and (report.failed, report.requeued) == (2, 2)
    rows = await job_rows(db)
    assert rows[ids[1]]["state"] == "failed" and rows[ids[1]]["error_code"] == "invalid_body"
    assert rows[ids[1]]["error"]["message"] == "line 2: body.messages is required"
    assert rows[ids[3]]["state"] == "failed" and rows[ids[3]]["error_code"] == "invalid_request"
    # the others were not at fault: requeued with their attempt given back
    for j in (ids[0], ids[2]):
        assert rows[j]["state"] == "queued" and rows[j]["attempts"] == 0
    fake.instant = True
    await drive(p, t)
    rows = await job_rows(db)
    assert rows[ids[0]]["state"] == rows[ids[2]]["state"] == "succeeded"


async def test_failed_batch_line_errors_skip_jobs_cancelled_before_submit(db: Database, db_url: str) -> None:
    """Regression: line numbers were mapped over every job ever packed in the batch, including ones cancelled
    before the file was written, so the provider's error landed on the wrong job."""
    p, fake = make_pipeline(db, db_url, FakeProvider("fake", instant=False))
    [gone] = await enqueue(db, 1, run="gone")
    await asyncio.sleep(0.005)  # job ids start with the time in ms: this one sorts first
    ids = sorted(await enqueue(db, 3, run="keep"))
    assert gone < ids[0]
    t = utcnow()
    [batch_id] = await p.pack(t, force=True)
    await p.cancel_run("gone", t)
    fake.fail_next_batch("invalid_batch")
    await p.submit(batch_id, t)
    pid = provider_id(await batch_row(db, batch_id))
    assert list(fake.batches[pid].results) == ids
    fake.advance()
    fake.batches[pid].errors = [{"code": "invalid_body", "message": "line 1 is bad", "line": 1, "param": None}]
    t = after(t, POLL_MIN_S)
    await p.poll(batch_id, t)
    await p.collect(batch_id, t)
    rows = await job_rows(db)
    assert rows[ids[0]]["state"] == "failed" and rows[ids[0]]["error_code"] == "invalid_body"
    assert rows[ids[1]]["state"] == rows[ids[2]]["state"] == "queued"
    assert rows[gone]["state"] == "cancelled"


async def test_failed_batch_without_line_errors_counts_an_attempt(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url)
    ids = await enqueue(db, 2)
    fake.fail_next_batch("server_error", "the batch failed", count=MAX_ATTEMPTS)
    await drive(p, utcnow())
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "failed" and rows[j]["attempts"] == MAX_ATTEMPTS for j in ids)
    assert {rows[j]["error_code"] for j in ids} == {"server_error"}
    assert {rows[j]["error"]["message"] for j in ids} == {"the batch failed"}
    assert fake.received == dict.fromkeys(ids, MAX_ATTEMPTS)


async def test_collect_only_claims_batches_ready_to_collect(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url, FakeProvider("fake", instant=False))
    await enqueue(db, 1)
    t = utcnow()
    [batch_id] = await p.pack(t, force=True)
    assert await p.collect(batch_id, t) is None  # open
    await p.submit(batch_id, t)
    assert await p.collect(batch_id, t) is None  # at the provider
    assert fake.calls["results"] == 0


# ------------------------------------------------------------------------------- due / pending / next_due_in


async def test_due_pending_next_due_in_through_a_lifecycle(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url, FakeProvider("fake", instant=False))
    t = utcnow()
    assert not await p.due(t)
    assert not await p.pending()
    assert await p.next_due_in(t) is None
    ids = await enqueue(db, 2)
    # queued jobs: pending, but no batch step is due
    assert await p.pending()
    assert not await p.due(t)
    assert await p.next_due_in(t) is None
    [batch_id] = await p.pack(t, force=True)
    due = await p.due(t)
    assert (due.submit, due.poll, due.collect) == ([batch_id], [], [])
    assert await p.next_due_in(t) == 0.0
    await p.submit(batch_id, t)
    assert not await p.due(t)
    assert await p.next_due_in(t) == POLL_MIN_S
    assert await p.next_due_in(after(t, 5)) == 0.0
    assert (await p.due(after(t, POLL_MIN_S))).poll == [batch_id]
    fake.advance()
    t = after(t, POLL_MIN_S)
    await p.poll(batch_id, t)
    assert (await p.due(t)).collect == [batch_id]
    assert await p.pending()
    await p.collect(batch_id, t)
    assert not await p.due(after(t, 1000))
    assert not await p.pending()
    assert await p.next_due_in(t) is None
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "succeeded" for j in ids)


async def test_pending_until_every_batch_is_collected(db: Database, db_url: str) -> None:
    p, _ = make_pipeline(db, db_url)
    await enqueue(db, 1, run="x")
    t = utcnow()
    [batch_id] = await p.pack(t, force=True)
    await p.cancel_run("x", t)
    # every job is terminal, but the batch is not collected yet
    assert await p.pending()
    await p.submit(batch_id, t)
    assert await p.pending()
    await p.collect(batch_id, t)
    assert not await p.pending()


async def test_leased_batches_are_not_due(db: Database, db_url: str) -> None:
    p, _ = make_pipeline(db, db_url, FakeProvider("fake", instant=False))
    await enqueue(db, 1)
    t = utcnow()
    [batch_id] = await packed_and_submitted(p, t)
    t = after(t, POLL_MIN_S)
    assert await p._claim(batch_id, t, BATCH_AT_PROVIDER, due_only=True) is not None
    assert not await p.due(t)
    assert (await p.due(after(t, LEASE_S + 1))).poll == [batch_id]


async def test_work_of_an_unserved_account_is_not_this_workers(db: Database, db_url: str) -> None:
    """Regression: due() listed batches of accounts this worker has no adapter for (each claim then held the
    batch's lease while failing), and pending() stayed true for them forever."""
    other = FakeProvider("other")
    p_other, _ = make_pipeline(db, db_url, other, owner="w-other")
    p_other.adapters = {"other": other}
    p, _ = make_pipeline(db, db_url)
    await enqueue(db, 2, account="other")
    t = utcnow()
    [batch_id] = await p_other.pack(t, force=True)
    assert await p_other.pending()
    assert (await p_other.due(t)).submit == [batch_id]
    assert not await p.due(t)
    assert not await p.pending()
    assert await p.pack(t, force=True) == []


# ---------------------------------------------------------------------------------------------- cancel


async def test_cancel_run(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url, FakeProvider("fake", instant=False))
    packed = await enqueue(db, 2, run="a", model="m2")
    alone = await enqueue(db, 3, run="a", model="m3")
    shared_a = await enqueue(db, 2, run="a", model="m4")
    shared_b = await enqueue(db, 2, run="b", model="m4")
    t = utcnow()
    made = await p.pack(t, force=True)
    rows = await job_rows(db)
    open_batch, alone_batch, shared_batch = (rows[group[0]]["batch_id"] for group in (packed, alone, shared_a))
    assert set(made) == {open_batch, alone_batch, shared_batch}
    await p.submit(alone_batch, t)
    await p.submit(shared_batch, t)
    queued = await enqueue(db, 2, run="a", model="m1")
    report = await p.cancel_run("a", t)
    assert (report.jobs_cancelled, report.batches_cancelled, report.batches_shared) == (4, 1, 1)
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "cancelled" and rows[j]["settled_at"] == t for j in queued + packed)
    # in-flight jobs settle when their batch is collected
    assert all(rows[j]["state"] == "submitted" for j in alone + shared_a + shared_b)
    alone_row, shared_row = await batch_row(db, alone_batch), await batch_row(db, shared_batch)
    assert alone_row["state"] == "cancelling"
    assert fake.batches[provider_id(alone_row)].cancel_requested
    assert shared_row["state"] == "validating"
    assert not fake.batches[provider_id(shared_row)].cancel_requested
    assert fake.calls["cancel"] == 1
    fake.advance()
    await drive(p, t)
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "cancelled" for j in alone)
    # the shared batch ran to the end; its results are kept
    assert all(rows[j]["state"] == "succeeded" for j in shared_a + shared_b)
    final = {b["id"]: b for b in await batch_rows(db)}
    assert {b["state"] for b in final.values()} == {"collected"}
    assert final[alone_batch]["cancelled"] == 3 and final[alone_batch]["provider_state"] == "cancelled"
    assert final[open_batch]["cancelled"] == 2 and final[open_batch]["provider_batch_id"] is None
    # the open batch's jobs never reached the provider
    assert not set(fake.received) & set(packed + queued)
    assert fake.calls["cancel"] == 1


async def test_cancelled_batch_does_not_requeue_its_jobs(db: Database, db_url: str) -> None:
    """Regression: in a batch cancelled by cancel_run, a request that had failed in a retryable way was
    requeued and sent again, although its run was cancelled."""
    p, fake = make_pipeline(db, db_url, FakeProvider("fake", instant=False))
    ids = await enqueue(db, 3, run="a")
    fake.script(ids[0], FakeResult.FAIL_RETRYABLE)
    fake.script(ids[1], FakeResult.EXPIRE)
    t = utcnow()
    await packed_and_submitted(p, t)
    report = await p.cancel_run("a", t)
    assert report.batches_cancelled == 1
    fake.advance()
    await drive(p, t)
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "cancelled" for j in ids)
    assert fake.received == dict.fromkeys(ids, 1)


async def test_cancel_run_leaves_ended_batches_to_collect(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url)
    ids = await enqueue(db, 2, run="a")
    t = utcnow()
    [batch_id] = await packed_and_submitted(p, t)
    t = await to_collect(p, batch_id, t)  # instant: ended already
    report = await p.cancel_run("a", t)
    assert (report.jobs_cancelled, report.batches_cancelled, report.batches_shared) == (0, 0, 0)
    assert fake.calls["cancel"] == 0
    await p.collect(batch_id, t)
    rows = await job_rows(db)
    assert all(rows[j]["state"] == "succeeded" for j in ids)


# --------------------------------------------------------------------------------------------- end to end


async def test_many_jobs_many_batches_every_job_settles_once(db: Database, db_url: str) -> None:
    p, fake = make_pipeline(db, db_url, FakeProvider("fake", limits=small(max_requests=7)))
    ids: list[str] = []
    for model in ("m1", "m2", "m3"):
        ids += await enqueue(db, 20, model=model, priority=len(ids) % 3)
    for j in ids[::5]:
        fake.script(j, FakeResult.FAIL_RETRYABLE, FakeResult.SUCCEED)
    await drive(p, utcnow())
    rows = await job_rows(db)
    assert {r["state"] for r in rows.values()} == {"succeeded"}
    for j in ids:
        assert fake.received[j] == rows[j]["attempts"] == (2 if j in ids[::5] else 1)
    made = await batch_rows(db)
    assert all(1 <= b["request_count"] <= 7 for b in made)
    assert sum(b["succeeded"] for b in made) == len(ids)


# -------------------------------------------------------------------------------- concurrency (PostgreSQL)


async def test_concurrent_packers_never_share_a_job(pg_db: Database, pg_url: str) -> None:
    db, db_url = pg_db, pg_url  # PostgreSQL only: row locks between workers
    limits = small(max_requests=7)
    db2 = Database(db_url)
    try:
        p1, _ = make_pipeline(db, db_url, FakeProvider("fake", limits=limits), owner="w1")
        p2, _ = make_pipeline(db2, db_url, FakeProvider("fake", limits=limits), owner="w2")
        t = utcnow()
        enqueued = 0
        for round_ in range(12):
            model = ("m1", "m2")[round_ % 2]
            await asyncio.gather(
                enqueue(db, 15, model=model, run=f"r{round_}"),
                p1.pack(t, force=round_ % 3 == 0),
                p2.pack(t, force=round_ % 3 == 0),
                p1.pack(t),
                p2.pack(t),
            )
            enqueued += 15
        await asyncio.gather(p1.pack(t, force=True), p2.pack(t, force=True))
        await asyncio.gather(p1.pack(t, force=True), p2.pack(t, force=True))
        rows = await job_rows(db)
        made = await batch_rows(db)
        assert len(rows) == enqueued
        assert {r["state"] for r in rows.values()} == {"packed"}
        members: dict[str, list[str]] = {}
        for job_id, r in rows.items():
            members.setdefault(r["batch_id"], []).append(job_id)
        assert set(members) == {b["id"] for b in made}
        for b in made:
            assert b["request_count"] == len(members[b["id"]]) <= 7
            assert {rows[j]["model"] for j in members[b["id"]]} == {b["model"]}
        assert sum(b["request_count"] for b in made) == len(rows)
        assert {b["lease_owner"] for b in made} == {None}
    finally:
        await db2.aclose()


async def test_concurrent_collects_settle_each_job_once(pg_db: Database, pg_url: str) -> None:
    db, db_url = pg_db, pg_url  # PostgreSQL only: row locks between workers
    fake = Scripted("fake")
    db2 = Database(db_url)
    try:
        t0 = utcnow()
        # w1's clock stands still, so its lease renewals do not keep w2 out once the lease has run out
        p1, _ = make_pipeline(db, db_url, fake, owner="w1", clock=lambda: t0, settle_chunk=4)
        p2, _ = make_pipeline(db2, db_url, fake, owner="w2", settle_chunk=4)
        ids = await enqueue(db, 30, run="c1")
        expected = mixed_scripts(fake, ids)
        [batch_id] = await packed_and_submitted(p1, t0)
        t = await to_collect(p1, batch_id, t0)
        # same time: only one of them gets the batch
        fake.delay_s = 0.0
        r1, r2 = await asyncio.gather(p1.collect(batch_id, t), p2.collect(batch_id, t))
        assert (r1 is None) != (r2 is None)
        assert fake.calls["results"] == 1
        rows = await job_rows(db)
        assert {j: rows[j]["state"] for j in ids} == expected

        # again with a slow stream: w2 takes over the lease while w1 is still settling
        await p1.cancel_run("c1", t)  # the first round's requeued jobs stay out of the second batch
        ids2 = await enqueue(db, 30, run="c2")
        expected2 = mixed_scripts(fake, ids2)
        [batch2] = await packed_and_submitted(p1, t)
        t = await to_collect(p1, batch2, t)
        fake.delay_s = 0.01

        async def late_collect() -> Any:
            await asyncio.sleep(0.1)
            return await p2.collect(batch2, after(t, LEASE_S + 1))

        r1, r2 = await asyncio.gather(p1.collect(batch2, t), late_collect())
        # both read the whole stream, at the same time
        assert r1 is not None and r2 is not None
        assert fake.calls["results"] == 3
        rows = await job_rows(db)
        assert {j: rows[j]["state"] for j in ids2} == expected2
        assert all(rows[j]["attempts"] == 1 for j in ids2)
        batch = await batch_row(db, batch2)
        assert batch["state"] == "collected" and batch["lease_owner"] is None
        assert (batch["succeeded"], batch["cancelled"]) == (5, 5)
        assert r2.succeeded == 5 and r2.failed == 5 and r2.requeued == 15
    finally:
        await db2.aclose()


@pytest.mark.parametrize(("endpoint", "priced"), [(ENDPOINT, False), ("/v1/moderations", True)])
async def test_a_success_without_usage_costs_unknown_not_zero(
    db: Database, db_url: str, endpoint: str, priced: bool
) -> None:
    """A host that leaves ``usage`` out billed the request all the same: its cost is unknown (NULL), never $0 —
    except a moderation, which OpenAI answers without usage because it is free."""
    p, _ = make_pipeline(db, db_url, FakeProvider("fake", usage={}))
    body: dict[str, Any] = {"model": "gpt-4o-mini", "input": "hi"}
    if endpoint == ENDPOINT:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    await enqueue_specs(
        db,
        [
            JobSpec(
                provider=Provider.OPENAI,
                endpoint=endpoint,
                model="gpt-4o-mini",
                custom_id="u1",
                body=body,
                run="r",
                account="fake",
            )
        ],
    )
    await drive(p, utcnow())
    async with db.engine.connect() as conn:
        (entry,) = (await conn.execute(sa.select(ledger))).mappings().all()
    assert (await job_rows(db)).popitem()[1]["state"] == "succeeded"
    if priced:
        assert entry["actual_usd"] == 0 and entry["realtime_usd"] == 0
    else:
        assert entry["actual_usd"] is None and entry["realtime_usd"] is None
