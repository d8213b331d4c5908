"""The emulator's batch lifecycle with explicit clocks: no sockets, no sleeping."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from batcher.emulator import EmulatorSettings, EmulatorState
from batcher.emulator.errors import ApiError
from batcher.emulator.lifecycle import (
    ALLOWED_TRANSITIONS,
    TERMINAL,
    BatchStatus,
    Schedule,
    expire_done_count,
    is_fated_to_expire,
)
from batcher.emulator.objects import BatchRecord
from batcher.emulator.results import ShuffledWriter

T0 = 1_000.0
CHAT = "/v1/chat/completions"


def _lines(count: int, prefix: str = "r", text: str = "hello") -> bytes:
    rows = [
        {
            "custom_id": f"{prefix}{i}",
            "method": "POST",
            "url": CHAT,
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]},
        }
        for i in range(count)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _state(tmp_path: Path, **settings: Any) -> EmulatorState:
    settings.setdefault("latency_s", 10.0)
    return EmulatorState(EmulatorSettings(**settings), tmp_path)


def _upload(state: EmulatorState, content: bytes) -> str:
    file_id, path = state.allocate_file()
    path.write_bytes(content)
    state.register_upload(
        file_id, path, filename="in.jsonl", purpose="batch", size=len(content), now=T0, expires_after_s=None
    )
    return file_id


async def _create(state: EmulatorState, content: bytes, now: float = T0) -> BatchRecord:
    return await state.create_batch(
        input_file_id=_upload(state, content), endpoint=CHAT, metadata=None, output_expires_after_s=None, now=now
    )


def _lines_of(state: EmulatorState, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in state.get_file(file_id).path.read_text().splitlines()]


async def test_phases_follow_the_latency_schedule(tmp_path: Path) -> None:
    state = _state(tmp_path)
    batch = await _create(state, _lines(10))
    await state.advance(T0 + 1.9)
    assert batch.status is BatchStatus.VALIDATING
    assert state.batch_json(batch, T0 + 1.9)["request_counts"] == {"total": 0, "completed": 0, "failed": 0}

    await state.advance(T0 + 2.0)
    assert batch.status is BatchStatus.IN_PROGRESS and batch.in_progress_at == T0 + 2.0
    halfway = state.batch_json(batch, T0 + 5.0)
    assert halfway["request_counts"] == {"total": 10, "completed": 5, "failed": 0}
    assert halfway["output_file_id"] is None

    await state.advance(T0 + 8.0)
    assert batch.status is BatchStatus.FINALIZING and batch.finalizing_at == T0 + 8.0
    await state.advance(T0 + 9.99)
    assert batch.status is BatchStatus.FINALIZING
    await state.advance(T0 + 10.0)
    assert batch.status is BatchStatus.COMPLETED and batch.completed_at == T0 + 10.0
    assert len(_lines_of(state, batch.output_file_id)) == 10
    assert batch.error_file_id is None


async def test_a_late_read_stamps_each_transition_at_its_due_time(tmp_path: Path) -> None:
    state = _state(tmp_path)
    batch = await _create(state, _lines(3))
    await state.advance(T0 + 3_600)
    body = state.batch_json(batch, T0 + 3_600)
    assert (body["in_progress_at"], body["finalizing_at"], body["completed_at"]) == (1002, 1008, 1010)


async def test_zero_latency_completes_on_the_next_read(tmp_path: Path) -> None:
    state = _state(tmp_path, latency_s=0)
    batch = await _create(state, _lines(2))
    assert batch.status is BatchStatus.VALIDATING
    await state.advance(T0)
    assert batch.status is BatchStatus.COMPLETED


async def test_cancel_in_progress_keeps_the_finished_half(tmp_path: Path) -> None:
    state = _state(tmp_path)
    batch = await _create(state, _lines(10))
    await state.cancel_batch(batch.id, T0 + 5.0)  # half of in_progress (2 s .. 8 s)
    assert batch.status is BatchStatus.CANCELLING and batch.cancelling_at == T0 + 5.0
    assert state.batch_json(batch, T0 + 5.5)["request_counts"]["completed"] == 5
    await state.advance(T0 + 5.9)
    assert batch.status is BatchStatus.CANCELLING
    await state.advance(T0 + 6.0)
    assert batch.status is BatchStatus.CANCELLED and batch.cancelled_at == T0 + 6.0
    done, undone = _lines_of(state, batch.output_file_id), _lines_of(state, batch.error_file_id)
    assert len(done) == 5 and len(undone) == 5
    assert {line["error"]["code"] for line in undone} == {"batch_cancelled"}
    assert (batch.completed, batch.failed, batch.total) == (5, 0, 10)
    with pytest.raises(ApiError) as late:
        await state.cancel_batch(batch.id, T0 + 7.0)
    assert late.value.status == 400


async def test_finalizing_batches_cannot_be_cancelled(tmp_path: Path) -> None:
    state = _state(tmp_path)
    batch = await _create(state, _lines(1))
    with pytest.raises(ApiError, match="finalizing"):
        await state.cancel_batch(batch.id, T0 + 9.0)


async def test_enqueued_tokens_are_released_when_a_batch_ends(tmp_path: Path) -> None:
    content = _lines(4, text="x" * 40)  # 4 x 10 tokens
    state = _state(tmp_path, token_limit=60)
    first = await _create(state, content)
    blocked = await _create(state, content, now=T0 + 1.0)
    await state.advance(T0 + 3.1)
    assert first.status is BatchStatus.IN_PROGRESS
    assert blocked.status is BatchStatus.FAILED and blocked.failed_at == T0 + 3.0
    assert blocked.errors is not None and blocked.errors[0]["code"] == "token_limit_exceeded"
    later = await _create(state, content, now=T0 + 10.0)  # first completes at T0 + 10
    await state.advance(T0 + 12.0)
    assert first.status is BatchStatus.COMPLETED
    assert later.status is BatchStatus.IN_PROGRESS


async def test_expiry_is_seeded_and_partial(tmp_path: Path) -> None:
    state = _state(tmp_path, expire_rate=1.0, seed=5)
    batch = await _create(state, _lines(9))
    await state.advance(T0 + 8.0)
    assert batch.status is BatchStatus.EXPIRED and batch.expired_at == T0 + 8.0
    expected = expire_done_count(5, batch.ordinal, 9)
    assert 1 <= expected <= 8
    assert len(_lines_of(state, batch.output_file_id)) == batch.completed == expected
    assert len(_lines_of(state, batch.error_file_id)) == 9 - expected


def test_expire_dice() -> None:
    assert not any(is_fated_to_expire(0, n, 0.0) for n in range(100))
    assert all(is_fated_to_expire(0, n, 1.0) for n in range(100))
    assert 20 < sum(is_fated_to_expire(0, n, 0.5) for n in range(100)) < 80
    assert expire_done_count(0, 1, 1) == 0
    assert all(1 <= expire_done_count(s, 1, 2) <= 1 for s in range(20))


def test_transition_table_is_closed() -> None:
    for status in BatchStatus:
        assert (status in TERMINAL) == (not ALLOWED_TRANSITIONS[status])
    schedule = Schedule(0)
    assert schedule.progress(T0, T0) == 1.0


def test_settings_validate_ranges_and_read_the_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ({"error_rate": 1.5}, {"expire_rate": -0.1}, {"api_error_rate": 2}, {"latency_s": -1}):
        with pytest.raises(ValidationError):
            EmulatorSettings(**bad)
    with pytest.raises(ValidationError):
        EmulatorSettings(token_limit=0)
    monkeypatch.setenv("BATCHER_EMULATOR_ERROR_RATE", "0.25")
    monkeypatch.setenv("BATCHER_EMULATOR_TOKEN_LIMIT", "1000")
    settings = EmulatorSettings()
    assert settings.error_rate == 0.25 and settings.token_limit == 1000
    assert settings.max_requests == 50_000 and settings.max_bytes == 200 * 1024 * 1024


@pytest.mark.parametrize("lines", [2, 3, 200])
def test_result_writer_never_keeps_the_input_order(lines: int) -> None:
    for seed in range(20):  # with two lines, half of all shuffles keep the order
        fh = io.BytesIO()
        writer = ShuffledWriter(fh, random.Random(seed))
        for i in range(lines):
            writer.write({"custom_id": f"r{i}"})
        writer.flush()
        written = [json.loads(line)["custom_id"] for line in fh.getvalue().splitlines()]
        assert sorted(written) == sorted(f"r{i}" for i in range(lines))
        assert written != [f"r{i}" for i in range(lines)]
