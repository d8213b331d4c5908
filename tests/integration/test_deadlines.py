"""Deadlines: a job a batch can no longer return in time goes to the real-time API (or fails ``deadline_missed``).

Against the emulator's real-time endpoints (OpenAI and Anthropic) and, where the timing must be exact, against
FakeProvider with explicit ``now``. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from emulated_env import emulated

from batcher.config import Settings
from batcher.db.engine import Database
from batcher.db.tables import batches, jobs, ledger
from batcher.domain import JobSpec, Provider
from batcher.emulator import EmulatorSettings
from batcher.intake import enqueue_specs
from batcher.lifecycle import Pipeline
from batcher.pricing import PriceBook, normalize_usage
from batcher.providers.base import Outcome
from batcher.testing import FakeProvider, FakeResult
from batcher.timeutil import utcnow

TURNAROUND_S = 3600.0
LEASE_S = 30.0

_n = itertools.count()


def spec(
    account: str, *, not_after: datetime | None, model: str = "gpt-4o-mini", kind: Provider = Provider.OPENAI
) -> JobSpec:
    if kind is Provider.ANTHROPIC:
        return JobSpec(
            provider=kind,
            account=account,
            endpoint="/v1/messages",
            model=model,
            custom_id=f"d{next(_n)}",
            body={"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
            not_after=not_after,
        )
    return JobSpec(
        provider=kind,
        account=account,
        endpoint="/v1/chat/completions",
        model=model,
        custom_id=f"d{next(_n)}",
        body={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        not_after=not_after,
    )


def fake_pipeline(db: Database, db_url: str, *adapters: FakeProvider, owner: str = "w1", **over: Any) -> Pipeline:
    values: dict[str, Any] = {
        "database_url": db_url,
        "poll_min_s": 1.0,
        "poll_max_s": 8.0,
        "lease_s": LEASE_S,
        "expected_turnaround_s": TURNAROUND_S,
        "retry_jitter": 0.0,
    }
    values.update(over)
    return Pipeline(db, Settings(**values), {a.account: a for a in adapters}, owner=owner)


async def rows(db: Database) -> dict[str, dict[str, Any]]:
    async with db.engine.connect() as conn:
        return {r["id"]: dict(r) for r in (await conn.execute(sa.select(jobs))).mappings()}


async def entries(db: Database) -> list[dict[str, Any]]:
    async with db.engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(sa.select(ledger).order_by(ledger.c.id))).mappings()]


async def batch_count(db: Database) -> int:
    async with db.engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(batches)) or 0)


# ------------------------------------------------------------------------------------------ through the emulator


@pytest.mark.parametrize("provider", [Provider.OPENAI, Provider.ANTHROPIC])
async def test_job_a_batch_cannot_meet_goes_real_time_at_the_real_time_price(
    db_url: str, redis_url: str, tmp_path: Path, provider: Provider
) -> None:
    async with emulated(
        db_url, tmp_path / "emu", provider=provider, redis_url=redis_url, expected_turnaround_s=TURNAROUND_S
    ) as env:
        now = utcnow()
        late = await env.enqueue(3, not_after=now + timedelta(seconds=600))
        relaxed = await env.enqueue(3, not_after=now + timedelta(days=2))
        await env.burst()
        got = await env.jobs()
        assert all(got[j]["state"] == "succeeded" and got[j]["attempts"] == 1 for j in late + relaxed)
        assert all(got[j]["batch_id"] is None for j in late), "a late job never went into a batch"
        by_job = {e["job_id"]: e for e in await env.ledger()}
        assert set(by_job) == set(late + relaxed)
        prices = PriceBook({}, {})
        for j in late:
            entry = by_job[j]
            assert entry["mode"] == "realtime" and entry["batch_id"] is None and entry["attempt"] == 1
            usage = normalize_usage(provider.value, got[j]["usage"])
            expected = prices.cost(provider.value, env.model, usage, mode="realtime")
            # charged the real-time price: what was paid is what real time costs, nothing saved
            assert entry["actual_usd"] == entry["realtime_usd"] == expected.realtime_usd
            assert entry["actual_usd"] is not None and entry["actual_usd"] > Decimal(0)
            assert entry["input_tokens"] == usage.input_tokens > 0
        for j in relaxed:
            entry = by_job[j]
            assert entry["mode"] == "batch" and entry["actual_usd"] < entry["realtime_usd"]
        stats = await env.stats()
        # only the relaxed jobs went through a batch
        assert stats["batches_created"] == 1
        assert set(stats["requests_by_custom_id"]) == set(relaxed)


async def test_fallback_disabled_fails_with_deadline_missed(db_url: str, tmp_path: Path) -> None:
    async with emulated(db_url, tmp_path / "emu", expected_turnaround_s=TURNAROUND_S, fallback_enabled=False) as env:
        now = utcnow()
        late = await env.enqueue(2, not_after=now + timedelta(seconds=600))
        ok = await env.enqueue(2, not_after=now + timedelta(days=2))
        await env.drive()
        got = await env.jobs()
        for j in late:
            assert got[j]["state"] == "failed" and got[j]["error_code"] == "deadline_missed"
            assert "disabled" in got[j]["error"]["message"] and got[j]["attempts"] == 0
        assert all(got[j]["state"] == "succeeded" for j in ok)
        assert {e["job_id"] for e in await env.ledger()} == set(ok)
        assert set((await env.stats())["requests_by_custom_id"]) == set(ok)


async def test_rate_limited_real_time_call_waits_for_retry_after(db_url: str, tmp_path: Path) -> None:
    emu = EmulatorSettings(latency_s=0.2, api_error_rate=1.0, api_error_kinds=["429"], retry_after_s=2)
    async with emulated(db_url, tmp_path / "emu", emulator=emu, expected_turnaround_s=TURNAROUND_S) as env:
        p = env.pipeline
        now = utcnow()
        [job] = await env.enqueue(1, not_after=now + timedelta(seconds=600))
        assert await p.sweep_deadlines(now) == ["openai"]
        report = await p.run_fallback("openai", now)
        assert (report.claimed, report.requeued) == (1, 1)
        got = (await env.jobs())[job]
        # refused with a Retry-After: not run, so its attempt is given back
        assert got["state"] == "queued" and got["attempts"] == 0 and got["error_code"] == "fallback_failed"
        held = p.fallback_not_before["openai"]
        assert now + timedelta(seconds=2) <= held < now + timedelta(seconds=2.5)
        env.emu.settings.api_error_rate = 0.0
        # not before the provider said
        early = await p.run_fallback("openai", now + timedelta(seconds=1.9))
        assert early.claimed == 0
        report = await p.run_fallback("openai", held)
        assert report.succeeded == 1
        got = (await env.jobs())[job]
        assert got["state"] == "succeeded" and got["attempts"] == 1 and got["error_code"] is None
        assert (await env.stats())["api_errors_injected"] == 1


# ----------------------------------------------------------------------------------------- with FakeProvider


async def test_deadline_already_passed_fails_without_a_call(db: Database, db_url: str) -> None:
    fake = FakeProvider("fake")
    p = fake_pipeline(db, db_url, fake)
    t = utcnow()
    [gone] = await enqueue_specs(db, [spec("fake", not_after=t - timedelta(seconds=1))])
    assert await p.sweep_deadlines(t) == []
    got = (await rows(db))[gone]
    assert got["state"] == "failed" and got["error_code"] == "deadline_missed" and got["settled_at"] == t
    assert fake.calls["run_realtime"] == 0 and await entries(db) == []


async def test_turnaround_is_per_provider_and_account(db: Database, db_url: str) -> None:
    openai_like = FakeProvider("oa")
    anthropic_like = FakeProvider("an", kind=Provider.ANTHROPIC)
    slow = FakeProvider("slow")
    p = fake_pipeline(
        db,
        db_url,
        openai_like,
        anthropic_like,
        slow,
        provider_turnaround_s={"anthropic": 60.0, "slow": 7200.0},
    )
    t = utcnow()
    deadline = t + timedelta(seconds=1800)
    a, b, c = await enqueue_specs(
        db,
        [
            spec("oa", not_after=deadline),
            spec("an", not_after=deadline, model="claude-haiku-4-5", kind=Provider.ANTHROPIC),
            spec("slow", not_after=t + timedelta(seconds=5400)),
        ],
    )
    assert p.turnaround_s("oa") == TURNAROUND_S and p.turnaround_s("an") == 60.0 and p.turnaround_s("slow") == 7200.0
    # openai's hour does not fit in half an hour, anthropic's minute does; "slow" needs two hours, has 1.5
    assert await p.sweep_deadlines(t) == ["oa", "slow"]
    packed = await p.pack(t, force=True)
    got = await rows(db)
    assert got[b]["state"] == "packed" and got[b]["batch_id"] in packed
    assert got[a]["state"] == "queued" and got[c]["state"] == "queued"
    for account in ("oa", "slow"):
        report = await p.run_fallback(account, t)
        assert report.succeeded == 1
    got = await rows(db)
    assert got[a]["state"] == got[c]["state"] == "succeeded"
    assert openai_like.realtime_received[a] == 1 and slow.realtime_received[c] == 1


async def test_job_of_a_batch_held_back_is_taken_out_and_sent_real_time(db: Database, db_url: str) -> None:
    fake = FakeProvider("fake")
    p = fake_pipeline(db, db_url, fake)
    t0 = utcnow()
    late, calm = await enqueue_specs(
        db,
        [spec("fake", not_after=t0 + timedelta(seconds=TURNAROUND_S + 120)), spec("fake", not_after=None)],
    )
    [batch_id] = await p.pack(t0, force=True)
    # the provider keeps the batch out for a long while
    fake.fail_next(method="upload", retryable=True, retry_after_s=1000)
    await p.submit(batch_id, t0)
    got = await rows(db)
    assert got[late]["state"] == got[calm]["state"] == "packed"
    # three minutes on, a batch sent now would come back too late for it
    t1 = t0 + timedelta(seconds=180)
    assert await p.sweep_deadlines(t1) == ["fake"]
    got = await rows(db)
    assert got[late]["state"] == "queued" and got[calm]["state"] == "packed"
    await p.run_fallback("fake", t1)
    t2 = t0 + timedelta(seconds=1000)
    await p.submit(batch_id, t2)
    got = await rows(db)
    assert got[late]["state"] == "succeeded" and got[late]["attempts"] == 1
    assert fake.realtime_received[late] == 1 and fake.received[late] == 0
    # the batch went without it
    assert got[calm]["state"] == "submitted" and fake.received[calm] == 1
    [entry] = await entries(db)
    assert (entry["job_id"], entry["mode"]) == (late, "realtime")


async def test_submit_takes_late_jobs_out_of_its_batch(db: Database, db_url: str) -> None:
    fake = FakeProvider("fake")
    p = fake_pipeline(db, db_url, fake)
    t0 = utcnow()
    late, calm = await enqueue_specs(
        db,
        [spec("fake", not_after=t0 + timedelta(seconds=TURNAROUND_S + 30)), spec("fake", not_after=None)],
    )
    [batch_id] = await p.pack(t0, force=True)
    # the batch was not sent in time (a slow tick): submitting it now would make the deadline impossible
    await p.submit(batch_id, t0 + timedelta(seconds=60))
    got = await rows(db)
    assert got[late]["state"] == "queued" and got[calm]["state"] == "submitted"
    assert fake.received == {calm: 1}


async def test_real_time_refusal_fails_with_the_providers_message(db: Database, db_url: str) -> None:
    fake = FakeProvider("fake")
    p = fake_pipeline(db, db_url, fake)
    t = utcnow()
    bad, flaky = await enqueue_specs(db, [spec("fake", not_after=t + timedelta(seconds=60)) for _ in range(2)])
    fake.script(bad, FakeResult.FAIL_PERMANENT)
    fake.script(flaky, FakeResult.FAIL_RETRYABLE, FakeResult.SUCCEED)
    await p.sweep_deadlines(t)
    report = await p.run_fallback("fake", t)
    assert (report.claimed, report.failed, report.requeued) == (2, 1, 1)
    got = await rows(db)
    assert got[bad]["state"] == "failed" and got[bad]["error_code"] == "invalid_request_error"
    assert got[bad]["error"]["message"] == "fake invalid request" and got[bad]["error"]["mode"] == "realtime"
    assert got[flaky]["state"] == "queued" and got[flaky]["attempts"] == 1
    t2 = t + timedelta(seconds=1)
    await p.sweep_deadlines(t2)
    await p.run_fallback("fake", t2)
    got = await rows(db)
    assert got[flaky]["state"] == "succeeded" and got[flaky]["attempts"] == 2
    by_job = {e["job_id"]: e for e in await entries(db)}
    # the refusal is recorded (unbilled), the success once, at the attempt that succeeded
    assert by_job[bad]["actual_usd"] == 0 and by_job[bad]["mode"] == "realtime"
    assert by_job[flaky]["attempt"] == 2 and by_job[flaky]["mode"] == "realtime"
    assert len(await entries(db)) == 2


class GatedRealtime(FakeProvider):
    """The first real-time call waits for ``gate`` (a worker stuck, then gone, mid-call)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.gated = True

    async def run_realtime(
        self, custom_id: str, endpoint: str, body_json: str, *, attempt: int | None = None
    ) -> Outcome:
        if self.gated:
            self.gated = False
            self.entered.set()
            await self.gate.wait()
        return await super().run_realtime(custom_id, endpoint, body_json, attempt=attempt)


async def test_real_time_call_of_a_stopped_worker_is_taken_over_and_settled_once(db: Database, db_url: str) -> None:
    fake = GatedRealtime("fake")
    t0 = utcnow()
    # w1's clock stands still: its claim is not renewed past the lease
    p1 = fake_pipeline(db, db_url, fake, owner="w1")
    p1.clock = lambda: t0
    p2 = fake_pipeline(db, db_url, fake, owner="w2")
    [job] = await enqueue_specs(db, [spec("fake", not_after=t0 + timedelta(seconds=600))])
    await p1.sweep_deadlines(t0)
    stuck = asyncio.create_task(p1.run_fallback("fake", t0))
    await fake.entered.wait()
    got = (await rows(db))[job]
    assert got["state"] == "fallback" and got["attempts"] == 1
    # within the lease nobody touches it
    assert await p2.sweep_deadlines(t0 + timedelta(seconds=LEASE_S - 1)) == []
    # w1 is gone for good as far as anyone can tell: the job goes back to the queue and w2 sends it again
    t1 = t0 + timedelta(seconds=LEASE_S + 1)
    assert await p2.sweep_deadlines(t1) == ["fake"]
    report = await p2.run_fallback("fake", t1)
    assert report.succeeded == 1
    # w1's call comes back late: its claim (attempt 1) is stale, it settles nothing
    fake.gate.set()
    late = await stuck
    assert late.succeeded == 0
    got = (await rows(db))[job]
    assert got["state"] == "succeeded" and got["attempts"] == 2
    [entry] = await entries(db)
    assert entry["attempt"] == 2 and entry["mode"] == "realtime"
    assert fake.realtime_received[job] == 2


async def test_cancelled_fallback_releases_its_jobs(db: Database, db_url: str) -> None:
    fake = GatedRealtime("fake")
    p = fake_pipeline(db, db_url, fake)
    t = utcnow()
    [job] = await enqueue_specs(db, [spec("fake", not_after=t + timedelta(seconds=600))])
    await p.sweep_deadlines(t)
    running = asyncio.create_task(p.run_fallback("fake", t))
    await fake.entered.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    got = (await rows(db))[job]
    # handed back at once (the call may have gone out: the attempt stays counted)
    assert got["state"] == "queued" and got["attempts"] == 1
    fake.gate.set()
    await p.sweep_deadlines(t)
    await p.run_fallback("fake", t)
    assert (await rows(db))[job]["state"] == "succeeded"
