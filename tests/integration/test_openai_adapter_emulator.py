"""OpenAIAdapter against the emulator over real sockets: upload, create, poll, results, cancel, recovery, errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from batcher.domain import BatchState
from batcher.emulator import EmulatorSettings, serve_emulator
from batcher.errors import ProviderError
from batcher.providers.base import BatchStatus, Outcome, OutcomeKind
from batcher.providers.openai import OpenAIAdapter

ENDPOINT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
AT_PROVIDER = {BatchState.VALIDATING, BatchState.IN_PROGRESS, BatchState.FINALIZING, BatchState.CANCELLING}

AdapterFactory = Callable[..., AbstractAsyncContextManager[OpenAIAdapter]]


@pytest.fixture
def emulated(tmp_path: Path) -> AdapterFactory:
    """``async with emulated(latency_s=0, ...) as adapter``: an emulator with those settings and an adapter on it."""

    @asynccontextmanager
    async def factory(*, max_retries: int = 0, **settings: Any) -> AsyncIterator[OpenAIAdapter]:
        settings.setdefault("latency_s", 0)
        settings.setdefault("seed", 7)
        settings.setdefault("data_dir", tmp_path / "emulator")
        async with serve_emulator(EmulatorSettings(**settings)) as base_url:
            adapter = OpenAIAdapter("emu", api_key="sk-emulator", base_url=base_url, max_retries=max_retries)
            try:
                yield adapter
            finally:
                await adapter.aclose()

    return factory


def write_jsonl(adapter: OpenAIAdapter, path: Path, custom_ids: list[str]) -> Path:
    with path.open("wb") as fh:
        for n, cid in enumerate(custom_ids):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"say something about {n}"}]}
            fh.write(adapter.encode_line(cid, ENDPOINT, orjson.dumps(body).decode()))
    return path


async def submit(
    adapter: OpenAIAdapter, tmp_path: Path, custom_ids: list[str], batch_id: str = "ours-1"
) -> BatchStatus:
    path = write_jsonl(adapter, tmp_path / f"{batch_id}.jsonl", custom_ids)
    file_id = await adapter.upload(path)
    assert file_id
    return await adapter.create(batch_id=batch_id, endpoint=ENDPOINT, model=MODEL, input_file_id=file_id, path=path)


async def wait_done(adapter: OpenAIAdapter, provider_batch_id: str, timeout_s: float = 15) -> BatchStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await adapter.retrieve(provider_batch_id)
        if status.state not in AT_PROVIDER:
            return status
        assert time.monotonic() < deadline, f"batch still {status.provider_state}"
        await asyncio.sleep(0.05)


async def collect(adapter: OpenAIAdapter, status: BatchStatus) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    async for outcome in adapter.results(status):
        assert outcome.custom_id not in outcomes, f"{outcome.custom_id} came back twice"
        outcomes[outcome.custom_id] = outcome
    return outcomes


def ids(n: int) -> list[str]:
    return [f"job-{i:04d}" for i in range(n)]


async def test_happy_path(emulated: AdapterFactory, tmp_path: Path) -> None:
    async with emulated() as adapter:
        created = await submit(adapter, tmp_path, ids(25))
        assert created.state in AT_PROVIDER | {BatchState.ENDED}
        assert created.raw["metadata"] == {"batcher_batch_id": "ours-1"}
        status = await wait_done(adapter, created.provider_batch_id)
        assert status.state is BatchState.ENDED and status.provider_state == "completed"
        assert status.counts.total == 25 and status.counts.succeeded == 25
        assert status.output_file_id
        outcomes = await collect(adapter, status)
        assert set(outcomes) == set(ids(25))
        for outcome in outcomes.values():
            assert outcome.kind is OutcomeKind.SUCCEEDED
            assert outcome.body is not None and orjson.loads(outcome.body)["object"] == "chat.completion"
            assert outcome.usage is not None and outcome.usage["prompt_tokens"] > 0
        assert adapter.malformed_lines == 0
        assert status.output_file_id is not None
        await adapter.delete_file(status.output_file_id)
        await adapter.delete_file(status.output_file_id)  # already gone: fine


async def test_failures_in_both_forms(emulated: AdapterFactory, tmp_path: Path) -> None:
    async with emulated(error_rate=1.0) as adapter:
        status = await wait_done(adapter, (await submit(adapter, tmp_path, ids(16))).provider_batch_id)
        assert status.state is BatchState.ENDED
        assert status.error_file_id
        outcomes = await collect(adapter, status)
        assert set(outcomes) == set(ids(16))
        assert all(o.kind is OutcomeKind.FAILED for o in outcomes.values())
        assert all(o.error_code and o.error_message for o in outcomes.values())
        http_level = [o for o in outcomes.values() if o.status_code is not None]
        top_level = [o for o in outcomes.values() if o.status_code is None]
        assert http_level and top_level
        for o in http_level:
            assert o.retryable is (o.status_code in (429, 500)), o
            assert o.body is not None
        assert {o.status_code for o in http_level} >= {400, 429, 500}
        assert any(o.error_code == "context_length_exceeded" and not o.retryable for o in http_level)


async def test_expired_batch(emulated: AdapterFactory, tmp_path: Path) -> None:
    async with emulated(expire_rate=1.0) as adapter:
        status = await wait_done(adapter, (await submit(adapter, tmp_path, ids(20))).provider_batch_id)
        assert status.state is BatchState.EXPIRED
        outcomes = await collect(adapter, status)
        assert set(outcomes) == set(ids(20))
        expired = [o for o in outcomes.values() if o.kind is OutcomeKind.EXPIRED]
        assert expired
        assert all(o.error_code == "batch_expired" for o in expired)
        assert {o.kind for o in outcomes.values()} <= {OutcomeKind.EXPIRED, OutcomeKind.SUCCEEDED}


async def test_token_limit(emulated: AdapterFactory, tmp_path: Path) -> None:
    async with emulated(token_limit=1) as adapter:
        status = await wait_done(adapter, (await submit(adapter, tmp_path, ids(3))).provider_batch_id)
        assert status.state is BatchState.FAILED
        assert status.token_limit_exceeded
        assert status.errors and status.errors[0]["code"] == "token_limit_exceeded"
        assert await collect(adapter, status) == {}


async def test_cancel_while_in_progress(emulated: AdapterFactory, tmp_path: Path) -> None:
    async with emulated(latency_s=2.0) as adapter:
        created = await submit(adapter, tmp_path, ids(10))
        deadline = time.monotonic() + 10
        while (await adapter.retrieve(created.provider_batch_id)).state is BatchState.VALIDATING:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        cancelling = await adapter.cancel(created.provider_batch_id)
        assert cancelling.state is BatchState.CANCELLING and cancelling.provider_state == "cancelling"
        status = await wait_done(adapter, created.provider_batch_id)
        assert status.state is BatchState.CANCELLED
        outcomes = await collect(adapter, status)
        assert set(outcomes) == set(ids(10))
        assert {o.kind for o in outcomes.values()} <= {OutcomeKind.CANCELLED, OutcomeKind.SUCCEEDED}
        assert any(o.kind is OutcomeKind.CANCELLED for o in outcomes.values())


async def test_cancel_while_validating_leaves_no_results(emulated: AdapterFactory, tmp_path: Path) -> None:
    async with emulated(latency_s=5.0) as adapter:
        created = await submit(adapter, tmp_path, ids(3))
        cancelling = await adapter.cancel(created.provider_batch_id)
        assert cancelling.state is BatchState.CANCELLING
        status = await wait_done(adapter, created.provider_batch_id)
        assert status.state is BatchState.CANCELLED
        assert await collect(adapter, status) == {}  # nothing ran: the lifecycle re-queues them as missing


async def test_find_batch(emulated: AdapterFactory, tmp_path: Path) -> None:
    async with emulated() as adapter:
        first = await submit(adapter, tmp_path, ids(2), batch_id="ours-a")
        second = await submit(adapter, tmp_path, ids(2), batch_id="ours-b")
        found = await adapter.find_batch("ours-a")
        assert found is not None and found.provider_batch_id == first.provider_batch_id
        found = await adapter.find_batch("ours-b")
        assert found is not None and found.provider_batch_id == second.provider_batch_id
        assert await adapter.find_batch("never-created") is None


async def test_unknown_batch_is_not_retryable(emulated: AdapterFactory) -> None:
    async with emulated() as adapter:
        with pytest.raises(ProviderError) as info:
            await adapter.retrieve("batch_does_not_exist")
        assert not info.value.retryable


async def test_api_errors_become_retryable_provider_errors(emulated: AdapterFactory) -> None:
    async with emulated(api_error_rate=1.0, max_retries=0) as adapter:
        errors: list[ProviderError] = []
        for _ in range(20):
            with pytest.raises(ProviderError) as info:
                await adapter.retrieve("batch_whatever")
            errors.append(info.value)
            if info.value.retry_after_s is not None:
                break
        assert all(e.retryable and e.provider == "emu" for e in errors)
        assert errors[-1].retry_after_s is not None and errors[-1].retry_after_s >= 0
        assert "sk-emulator" not in str(errors[-1])


async def test_unreachable_host_is_retryable(unused_tcp_port: int) -> None:
    adapter = OpenAIAdapter(api_key="sk-x", base_url=f"http://127.0.0.1:{unused_tcp_port}/v1", max_retries=0)
    try:
        with pytest.raises(ProviderError) as info:
            await adapter.retrieve("batch_1")
        assert info.value.retryable
    finally:
        await adapter.aclose()


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        (ENDPOINT, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}),
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
        ("/v1/responses", {"model": MODEL, "input": "hi"}),
    ],
)
async def test_run_realtime(emulated: AdapterFactory, endpoint: str, body: dict[str, Any]) -> None:
    async with emulated() as adapter:
        outcome = await adapter.run_realtime("rt-1", endpoint, orjson.dumps(body).decode())
        if outcome.status_code == 404:
            pytest.skip("the emulator does not serve real-time endpoints")
        assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
        assert outcome.custom_id == "rt-1"
        assert outcome.body is not None and isinstance(orjson.loads(outcome.body), dict)
        assert outcome.usage is not None


async def test_run_realtime_refused_request(emulated: AdapterFactory) -> None:
    async with emulated() as adapter:
        outcome = await adapter.run_realtime("rt-1", ENDPOINT, '{"messages": []}')
        assert outcome.kind is OutcomeKind.FAILED
        assert outcome.status_code == 400 and not outcome.retryable
        assert outcome.error_code and outcome.error_message
