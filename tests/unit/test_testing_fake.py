"""The in-memory FakeProvider behaves as scripted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batcher.domain import BatchState, Provider
from batcher.errors import ProviderError
from batcher.providers.base import BatchStatus, Limits, Outcome, OutcomeKind, ProviderAdapter
from batcher.testing import FakeProvider, FakeResult

ENDPOINT = "/v1/chat/completions"


def write_batch(fake: FakeProvider, path: Path, custom_ids: list[str]) -> Path:
    with path.open("wb") as fh:
        for cid in custom_ids:
            fh.write(fake.encode_line(cid, ENDPOINT, '{"model":"m","messages":[]}'))
    return path


async def submit(fake: FakeProvider, tmp_path: Path, custom_ids: list[str], batch_id: str = "b1") -> BatchStatus:
    path = write_batch(fake, tmp_path / f"{batch_id}.jsonl", custom_ids)
    file_id = await fake.upload(path)
    return await fake.create(batch_id=batch_id, endpoint=ENDPOINT, model="m", input_file_id=file_id, path=path)


async def collect(fake: FakeProvider, status: BatchStatus) -> dict[str, Outcome]:
    return {o.custom_id: o async for o in fake.results(status)}


def test_is_an_adapter() -> None:
    fake = FakeProvider()
    assert isinstance(fake, ProviderAdapter)
    assert fake.kind is Provider.OPENAI
    assert FakeProvider(kind=Provider.ANTHROPIC).kind is Provider.ANTHROPIC


def test_encode_line_keeps_body() -> None:
    body = '{"model": "m",  "x": 1.50}'
    line = FakeProvider().encode_line("c1", ENDPOINT, body)
    assert line.endswith(b"\n") and body.encode() in line
    assert json.loads(line)["custom_id"] == "c1"


async def test_instant_lifecycle_all_succeed(tmp_path: Path) -> None:
    fake = FakeProvider()
    status = await submit(fake, tmp_path, ["a", "b", "c"])
    assert status.state is BatchState.VALIDATING
    assert status.counts.total == 3
    status = await fake.retrieve(status.provider_batch_id)
    assert status.state is BatchState.ENDED
    assert status.counts.succeeded == 3
    outcomes = await collect(fake, status)
    assert set(outcomes) == {"a", "b", "c"}
    assert all(o.kind is OutcomeKind.SUCCEEDED for o in outcomes.values())
    assert outcomes["a"].usage == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert outcomes["a"].body is not None and json.loads(outcomes["a"].body)["usage"] == outcomes["a"].usage
    assert fake.received == {"a": 1, "b": 1, "c": 1}


async def test_scripted_outcomes(tmp_path: Path) -> None:
    fake = FakeProvider(usage={"input_tokens": 1})
    fake.script("r", FakeResult.FAIL_RETRYABLE)
    fake.script("p", FakeResult.FAIL_PERMANENT)
    fake.script("m", FakeResult.MISSING)
    status = await fake.retrieve((await submit(fake, tmp_path, ["ok", "r", "p", "m"])).provider_batch_id)
    assert status.state is BatchState.ENDED
    assert (status.counts.succeeded, status.counts.failed) == (1, 2)
    outcomes = await collect(fake, status)
    assert set(outcomes) == {"ok", "r", "p"}
    assert outcomes["ok"].usage == {"input_tokens": 1}
    assert outcomes["r"].kind is OutcomeKind.FAILED and outcomes["r"].retryable and outcomes["r"].status_code == 500
    assert outcomes["p"].kind is OutcomeKind.FAILED and not outcomes["p"].retryable


async def test_script_sequence_then_repeat(tmp_path: Path) -> None:
    fake = FakeProvider()
    fake.script("x", FakeResult.FAIL_RETRYABLE, FakeResult.SUCCEED)
    kinds = []
    for n in range(3):
        status = await fake.retrieve((await submit(fake, tmp_path, ["x"], batch_id=f"b{n}")).provider_batch_id)
        kinds.append((await collect(fake, status))["x"].kind)
    assert kinds == [OutcomeKind.FAILED, OutcomeKind.SUCCEEDED, OutcomeKind.SUCCEEDED]
    assert fake.received["x"] == 3


async def test_expire_ends_batch_expired(tmp_path: Path) -> None:
    fake = FakeProvider()
    fake.script("late", FakeResult.EXPIRE)
    status = await fake.retrieve((await submit(fake, tmp_path, ["done", "late"])).provider_batch_id)
    assert status.state is BatchState.EXPIRED
    assert status.counts.expired == 1
    outcomes = await collect(fake, status)
    assert outcomes["done"].kind is OutcomeKind.SUCCEEDED
    assert outcomes["late"].kind is OutcomeKind.EXPIRED and outcomes["late"].error_code == "batch_expired"


async def test_default_result(tmp_path: Path) -> None:
    fake = FakeProvider()
    fake.default = FakeResult.FAIL_PERMANENT
    status = await fake.retrieve((await submit(fake, tmp_path, ["a"])).provider_batch_id)
    assert (await collect(fake, status))["a"].kind is OutcomeKind.FAILED


@pytest.mark.parametrize("code", ["token_limit_exceeded", "invalid_json_line"])
async def test_batch_level_failure(tmp_path: Path, code: str) -> None:
    fake = FakeProvider()
    fake.fail_next_batch(code)
    first = await submit(fake, tmp_path, ["a"], batch_id="b1")
    assert first.state is BatchState.VALIDATING  # like OpenAI: created, then failed
    failed = await fake.retrieve(first.provider_batch_id)
    assert failed.state is BatchState.FAILED
    assert failed.token_limit_exceeded is (code == "token_limit_exceeded")
    assert failed.errors[0]["code"] == code
    assert await collect(fake, failed) == {}
    second = await fake.retrieve((await submit(fake, tmp_path, ["a"], batch_id="b2")).provider_batch_id)
    assert second.state is BatchState.ENDED
    assert fake.received["a"] == 2


async def test_step_wise_progression(tmp_path: Path) -> None:
    fake = FakeProvider(instant=False)
    s1 = await submit(fake, tmp_path, ["a"], batch_id="b1")
    s2 = await submit(fake, tmp_path, ["b"], batch_id="b2")
    assert (await fake.retrieve(s1.provider_batch_id)).state is BatchState.VALIDATING
    assert await collect(fake, s1) == {}  # nothing before it ends
    fake.advance(s1.provider_batch_id, to=BatchState.IN_PROGRESS)
    assert (await fake.retrieve(s1.provider_batch_id)).state is BatchState.IN_PROGRESS
    fake.advance(to=BatchState.FINALIZING)
    assert (await fake.retrieve(s2.provider_batch_id)).state is BatchState.FINALIZING
    fake.advance(s1.provider_batch_id)
    assert (await fake.retrieve(s1.provider_batch_id)).state is BatchState.ENDED
    assert (await fake.retrieve(s2.provider_batch_id)).state is BatchState.FINALIZING
    fake.advance()
    assert (await fake.retrieve(s2.provider_batch_id)).state is BatchState.ENDED
    with pytest.raises(ValueError):
        fake.advance(to=BatchState.ENDED)


async def test_cancel(tmp_path: Path) -> None:
    fake = FakeProvider(instant=False)
    fake.script("bad", FakeResult.FAIL_PERMANENT)
    status = await submit(fake, tmp_path, ["a", "bad"])
    status = await fake.cancel(status.provider_batch_id)
    assert status.state is BatchState.CANCELLING
    fake.advance(to=BatchState.IN_PROGRESS)  # a cancelling batch does not step back
    assert (await fake.retrieve(status.provider_batch_id)).state is BatchState.CANCELLING
    fake.advance()
    status = await fake.retrieve(status.provider_batch_id)
    assert status.state is BatchState.CANCELLED
    outcomes = await collect(fake, status)
    assert outcomes["a"].kind is OutcomeKind.CANCELLED
    assert outcomes["bad"].kind is OutcomeKind.FAILED


async def test_cancel_instant_and_after_end(tmp_path: Path) -> None:
    fake = FakeProvider()
    status = await submit(fake, tmp_path, ["a"])
    assert (await fake.cancel(status.provider_batch_id)).state is BatchState.CANCELLING
    assert (await fake.retrieve(status.provider_batch_id)).state is BatchState.CANCELLED
    assert (await fake.cancel(status.provider_batch_id)).state is BatchState.CANCELLED
    ended = await fake.retrieve((await submit(fake, tmp_path, ["b"], batch_id="b2")).provider_batch_id)
    assert (await fake.cancel(ended.provider_batch_id)).state is BatchState.ENDED


async def test_fail_next_calls(tmp_path: Path) -> None:
    fake = FakeProvider()
    status = await submit(fake, tmp_path, ["a"])
    fake.fail_next(2, method="retrieve", retry_after_s=5.0)
    for _ in range(2):
        with pytest.raises(ProviderError) as info:
            await fake.retrieve(status.provider_batch_id)
        assert info.value.retryable and info.value.retry_after_s == 5.0
        assert info.value.provider == "fake"
    assert (await fake.retrieve(status.provider_batch_id)).state is BatchState.ENDED
    assert fake.calls["retrieve"] == 3

    fake.fail_next(retryable=False)  # any method
    with pytest.raises(ProviderError) as info:
        await fake.find_batch("b1")
    assert not info.value.retryable
    assert await fake.find_batch("b1") is not None


async def test_fail_before_create_sends_nothing(tmp_path: Path) -> None:
    fake = FakeProvider()
    fake.fail_next(method="create")
    with pytest.raises(ProviderError):
        await submit(fake, tmp_path, ["a"])
    assert fake.received == {}
    assert fake.batches == {}


async def test_lost_create_response_is_found_by_find_batch(tmp_path: Path) -> None:
    fake = FakeProvider()
    fake.fail_next(method="create", after=True)
    with pytest.raises(ProviderError):
        await submit(fake, tmp_path, ["a"], batch_id="ours")
    assert fake.received["a"] == 1
    found = await fake.find_batch("ours")
    assert found is not None and found.state is BatchState.VALIDATING
    assert found.raw["metadata"] == {"batcher_batch_id": "ours"}
    assert await fake.find_batch("other") is None


async def test_find_batch_returns_newest(tmp_path: Path) -> None:
    fake = FakeProvider()
    await submit(fake, tmp_path, ["a"], batch_id="same")
    newer = await submit(fake, tmp_path, ["b"], batch_id="same")
    found = await fake.find_batch("same")
    assert found is not None and found.provider_batch_id == newer.provider_batch_id


async def test_create_without_file_id_reads_path(tmp_path: Path) -> None:
    fake = FakeProvider()
    path = write_batch(fake, tmp_path / "x.jsonl", ["a", "b"])
    status = await fake.create(batch_id="b1", endpoint=ENDPOINT, model="m", input_file_id=None, path=path)
    assert status.counts.total == 2
    assert fake.calls["upload"] == 0


async def test_upload_refuses_over_limits_and_garbage(tmp_path: Path) -> None:
    limits = Limits(max_requests=2, max_bytes=10_000, one_model_per_batch=True, endpoints=frozenset({ENDPOINT}))
    fake = FakeProvider(limits=limits)
    with pytest.raises(ProviderError):
        await fake.upload(write_batch(fake, tmp_path / "big.jsonl", ["a", "b", "c"]))
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"not json\n")
    with pytest.raises(ProviderError, match="line 1"):
        await fake.upload(garbage)
    with pytest.raises(ProviderError):
        await fake.create(batch_id="b", endpoint=ENDPOINT, model="m", input_file_id="file-nope", path=garbage)


async def test_delete_file(tmp_path: Path) -> None:
    fake = FakeProvider()
    file_id = await fake.upload(write_batch(fake, tmp_path / "x.jsonl", ["a"]))
    await fake.delete_file(file_id)
    await fake.delete_file("file-unknown")
    assert file_id not in fake.files
    assert fake.deleted_files == [file_id, "file-unknown"]


async def test_unknown_batch() -> None:
    with pytest.raises(ProviderError):
        await FakeProvider().retrieve("batch-nope")


async def test_run_realtime() -> None:
    fake = FakeProvider()
    fake.script("x", FakeResult.FAIL_RETRYABLE, FakeResult.EXPIRE)
    first = await fake.run_realtime("x", ENDPOINT, '{"model":"gpt-x"}')
    assert first.kind is OutcomeKind.FAILED and first.retryable
    second = await fake.run_realtime("x", ENDPOINT, '{"model":"gpt-x"}')
    assert second.kind is OutcomeKind.SUCCEEDED
    assert second.body is not None and json.loads(second.body)["model"] == "gpt-x"
    assert fake.realtime_received["x"] == 2
    assert fake.received == {}


async def test_aclose() -> None:
    fake = FakeProvider()
    await fake.aclose()
    assert fake.closed


def test_script_needs_a_result() -> None:
    with pytest.raises(ValueError):
        FakeProvider().script("x")
