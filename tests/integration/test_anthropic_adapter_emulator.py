"""AnthropicAdapter against the emulator over real sockets: create, poll, results, cancel, recovery, errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from batcher.domain import BatchState
from batcher.emulator import EmulatorSettings, serve_emulator
from batcher.errors import ProviderError
from batcher.providers.anthropic import AnthropicAdapter
from batcher.providers.base import BatchStatus, Outcome, OutcomeKind
from batcher.providers.limits import ANTHROPIC_ENDPOINT

MODEL = "claude-emulated-1"
AT_PROVIDER = {BatchState.IN_PROGRESS, BatchState.CANCELLING}


class Emulated:
    """An adapter on a running emulator, plus the emulator's stats."""

    def __init__(self, adapter: AnthropicAdapter, url: str) -> None:
        self.adapter = adapter
        self.url = url

    async def stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(self.url.removesuffix("/v1") + "/_emulator/stats") as r:
            return dict(await r.json())


EmulatedFactory = Callable[..., AbstractAsyncContextManager[Emulated]]


@pytest.fixture
def emulated(tmp_path: Path) -> EmulatedFactory:
    """``async with emulated(latency_s=0, ...) as emu``: an emulator with those settings and an adapter on it."""

    @asynccontextmanager
    async def factory(*, max_retries: int = 0, **settings: Any) -> AsyncIterator[Emulated]:
        settings.setdefault("latency_s", 0)
        settings.setdefault("seed", 7)
        settings.setdefault("data_dir", tmp_path / "emu")
        async with serve_emulator(EmulatorSettings(**settings)) as base_url:
            # the emulator hands out an OpenAI-style URL ending in /v1; the adapter drops it
            adapter = AnthropicAdapter("emu", api_key="sk-ant-emulator", base_url=base_url, max_retries=max_retries)
            try:
                yield Emulated(adapter, base_url)
            finally:
                await adapter.aclose()

    return factory


def ids(n: int) -> list[str]:
    return [f"job-{i:05d}" for i in range(n)]


def write_jsonl(adapter: AnthropicAdapter, path: Path, bodies: dict[str, dict[str, Any]]) -> Path:
    with path.open("wb") as fh:
        for custom_id, body in bodies.items():
            fh.write(adapter.encode_line(custom_id, ANTHROPIC_ENDPOINT, orjson.dumps(body).decode()))
    return path


def body_for(n: int | str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": f"tell me about {n}"}], **extra}


async def submit(
    adapter: AnthropicAdapter,
    tmp_path: Path,
    custom_ids: list[str],
    batch_id: str = "ours-1",
    bodies: dict[str, dict[str, Any]] | None = None,
) -> BatchStatus:
    bodies = bodies if bodies is not None else {cid: body_for(cid) for cid in custom_ids}
    path = write_jsonl(adapter, tmp_path / f"{batch_id}.jsonl", bodies)
    assert await adapter.upload(path) is None
    return await adapter.create(
        batch_id=batch_id, endpoint=ANTHROPIC_ENDPOINT, model=MODEL, input_file_id=None, path=path
    )


async def wait_done(adapter: AnthropicAdapter, provider_batch_id: str, timeout_s: float = 30) -> BatchStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await adapter.retrieve(provider_batch_id)
        if status.state not in AT_PROVIDER:
            return status
        assert time.monotonic() < deadline, f"batch still {status.provider_state}"
        await asyncio.sleep(0.05)


async def collect(adapter: AnthropicAdapter, status: BatchStatus) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    async for outcome in adapter.results(status):
        assert outcome.custom_id not in outcomes, f"{outcome.custom_id} came back twice"
        outcomes[outcome.custom_id] = outcome
    return outcomes


async def test_happy_path(emulated: EmulatedFactory, tmp_path: Path) -> None:
    async with emulated(latency_s=0.3) as emu:
        adapter = emu.adapter
        created = await submit(adapter, tmp_path, ids(25))
        assert created.state is BatchState.IN_PROGRESS and created.provider_state == "in_progress"
        assert created.provider_batch_id.startswith("msgbatch_") and created.counts.total == 25
        assert created.results_ref is None and created.raw["results_url"] is None
        status = await wait_done(adapter, created.provider_batch_id)
        assert status.state is BatchState.ENDED and status.provider_state == "ended"
        assert status.counts.total == 25 and status.counts.succeeded == 25
        assert status.results_ref == created.provider_batch_id and status.raw["results_url"]
        outcomes = await collect(adapter, status)
        assert set(outcomes) == set(ids(25))
        for outcome in outcomes.values():
            assert outcome.kind is OutcomeKind.SUCCEEDED
            assert outcome.body is not None and orjson.loads(outcome.body)["type"] == "message"
            assert outcome.usage is not None and outcome.usage["input_tokens"] > 0
        assert adapter.malformed_lines == 0
        # the status the lifecycle rebuilds from its row (id and state only) is enough to stream results
        bare = BatchStatus(provider_batch_id=status.provider_batch_id, state=BatchState.ENDED, provider_state="ended")
        assert set(await collect(adapter, bare)) == set(ids(25))
        stats = await emu.stats()
        assert stats["batches_created"] == 1 and set(stats["requests_by_custom_id"]) == set(ids(25))


async def test_failures_are_classified(emulated: EmulatedFactory, tmp_path: Path) -> None:
    bodies = {cid: body_for(cid) for cid in ids(8)}
    bodies["bad-max-tokens"] = body_for("x", max_tokens=0)
    async with emulated(error_rate=1.0) as emu:
        status = await wait_done(
            emu.adapter, (await submit(emu.adapter, tmp_path, [], bodies=bodies)).provider_batch_id
        )
        assert status.state is BatchState.ENDED and status.counts.failed == 9
        outcomes = await collect(emu.adapter, status)
        assert set(outcomes) == set(bodies)
        assert all(o.kind is OutcomeKind.FAILED and o.error_code and o.error_message for o in outcomes.values())
        retryable = {o.error_code for o in outcomes.values() if o.retryable}
        permanent = {o.error_code for o in outcomes.values() if not o.retryable}
        assert retryable == {"rate_limit_error", "overloaded_error", "api_error"}
        assert permanent == {"invalid_request_error"}
        bad = outcomes["bad-max-tokens"]
        assert bad.error_code == "invalid_request_error" and bad.error_message is not None
        assert bad.error_message.startswith("max_tokens:")


async def test_expired_requests(emulated: EmulatedFactory, tmp_path: Path) -> None:
    async with emulated(expire_rate=1.0) as emu:
        status = await wait_done(emu.adapter, (await submit(emu.adapter, tmp_path, ids(20))).provider_batch_id)
        assert status.state is BatchState.ENDED and 0 < status.counts.expired < 20
        outcomes = await collect(emu.adapter, status)
        assert set(outcomes) == set(ids(20))
        expired = [o for o in outcomes.values() if o.kind is OutcomeKind.EXPIRED]
        assert len(expired) == status.counts.expired and all(o.retryable for o in expired)
        assert {o.kind for o in outcomes.values()} == {OutcomeKind.EXPIRED, OutcomeKind.SUCCEEDED}


async def test_cancel(emulated: EmulatedFactory, tmp_path: Path) -> None:
    async with emulated(latency_s=3.0) as emu:
        created = await submit(emu.adapter, tmp_path, ids(10))
        cancelling = await emu.adapter.cancel(created.provider_batch_id)
        assert cancelling.state is BatchState.CANCELLING and cancelling.provider_state == "canceling"
        status = await wait_done(emu.adapter, created.provider_batch_id)
        assert status.state is BatchState.CANCELLED and status.provider_state == "ended"
        assert status.counts.cancelled > 0
        outcomes = await collect(emu.adapter, status)
        assert set(outcomes) == set(ids(10))
        assert {o.kind for o in outcomes.values()} <= {OutcomeKind.CANCELLED, OutcomeKind.SUCCEEDED}
        assert sum(o.kind is OutcomeKind.CANCELLED for o in outcomes.values()) == status.counts.cancelled
        with pytest.raises(ProviderError) as info:
            await emu.adapter.cancel(created.provider_batch_id)  # ended: nothing left to cancel
        assert not info.value.retryable


async def test_results_before_the_end_fail_cleanly(emulated: EmulatedFactory, tmp_path: Path) -> None:
    async with emulated(latency_s=5.0) as emu:
        created = await submit(emu.adapter, tmp_path, ids(2))
        with pytest.raises(ProviderError, match="results_url"):
            await collect(emu.adapter, created)


async def test_find_batch_is_none_and_candidates_match_time_and_size(emulated: EmulatedFactory, tmp_path: Path) -> None:
    async with emulated() as emu:
        before = datetime.now(UTC) - timedelta(seconds=1)
        first = await submit(emu.adapter, tmp_path, ids(3), batch_id="ours-a")
        await submit(emu.adapter, tmp_path, ids(2), batch_id="ours-b")
        assert await emu.adapter.find_batch("ours-a") is None
        found = await emu.adapter.find_batch_candidates(before, 3)
        assert [s.provider_batch_id for s in found] == [first.provider_batch_id]
        assert await emu.adapter.find_batch_candidates(datetime.now(UTC) + timedelta(minutes=1), 3) == []


async def test_create_time_refusal_is_not_retryable(emulated: EmulatedFactory, tmp_path: Path) -> None:
    async with emulated() as emu:
        path = tmp_path / "bad.jsonl"
        path.write_bytes(emu.adapter.encode_line("has space", ANTHROPIC_ENDPOINT, orjson.dumps(body_for(1)).decode()))
        with pytest.raises(ProviderError, match=r"requests\.0\.custom_id") as info:
            await emu.adapter.create(
                batch_id="b", endpoint=ANTHROPIC_ENDPOINT, model=MODEL, input_file_id=None, path=path
            )
        assert not info.value.retryable
        with pytest.raises(ProviderError) as info:
            await emu.adapter.retrieve("msgbatch_does_not_exist")
        assert not info.value.retryable


async def test_api_errors_become_retryable_provider_errors(emulated: EmulatedFactory) -> None:
    async with emulated(api_error_rate=1.0) as emu:
        errors: list[ProviderError] = []
        for _ in range(3):
            with pytest.raises(ProviderError) as info:
                await emu.adapter.retrieve("msgbatch_whatever")
            errors.append(info.value)
        assert all(e.retryable for e in errors)
        assert [e.retry_after_s for e in errors] == [1.0, None, None]
        assert (
            "rate_limit_error" in str(errors[0])
            and "overloaded_error" in str(errors[1])
            and "HTTP 500" in str(errors[2])
        )


async def test_streamed_body_survives_sdk_retries(emulated: EmulatedFactory, tmp_path: Path) -> None:
    # seed 1 injects a 429 (retry-after 1 s) on the first call: the create is sent twice, streamed from disk twice
    async with emulated(api_error_rate=0.3, seed=1, max_retries=2) as emu:
        created = await submit(emu.adapter, tmp_path, ids(50))
        assert created.counts.total == 50
        stats = await emu.stats()
        assert stats["api_errors_injected"] == 1 and stats["batches_created"] == 1
        assert set(stats["requests_by_custom_id"]) == set(ids(50))


async def test_run_realtime(emulated: EmulatedFactory) -> None:
    async with emulated() as emu:
        ok = await emu.adapter.run_realtime("job-1", ANTHROPIC_ENDPOINT, orjson.dumps(body_for(1)).decode())
        assert ok.kind is OutcomeKind.SUCCEEDED and ok.status_code == 200
        assert ok.body is not None and orjson.loads(ok.body)["model"] == MODEL
        assert ok.usage is not None and ok.usage["service_tier"] == "standard"
        refused = await emu.adapter.run_realtime("job-2", ANTHROPIC_ENDPOINT, '{"model": "m", "max_tokens": 5}')
        assert refused.kind is OutcomeKind.FAILED and refused.status_code == 400
        assert refused.error_code == "invalid_request_error" and refused.error_message == "messages: Field required"
    async with emulated(api_error_rate=1.0) as emu:
        with pytest.raises(ProviderError) as info:
            await emu.adapter.run_realtime("job-1", ANTHROPIC_ENDPOINT, orjson.dumps(body_for(1)).decode())
        assert info.value.retryable and info.value.retry_after_s == 1.0


async def test_hundred_thousand_requests(emulated: EmulatedFactory, tmp_path: Path) -> None:
    """Anthropic's maximum batch, streamed from disk both ways."""
    custom_ids = ids(100_000)
    async with emulated() as emu:
        path = tmp_path / "big.jsonl"
        body = orjson.dumps(body_for("x")).decode()
        with path.open("wb") as fh:
            fh.write(b"".join(emu.adapter.encode_line(cid, ANTHROPIC_ENDPOINT, body) for cid in custom_ids))
        created = await emu.adapter.create(
            batch_id="big", endpoint=ANTHROPIC_ENDPOINT, model=MODEL, input_file_id=None, path=path
        )
        assert created.counts.total == 100_000
        status = await wait_done(emu.adapter, created.provider_batch_id, timeout_s=120)
        assert status.counts.succeeded == 100_000
        seen = 0
        async for outcome in emu.adapter.results(status):
            assert outcome.kind is OutcomeKind.SUCCEEDED
            seen += 1
        assert seen == 100_000
