"""The pure packing policy: flush reasons, limit splitting, poll and pause back-off."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher.packer import (
    LINE_OVERHEAD_BYTES,
    FlushReason,
    GroupKey,
    GroupStats,
    flush_reason,
    next_poll_interval,
    pause_backoff,
    split,
)
from batcher.providers.base import Limits

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
KEY = GroupKey("openai", "fake", "/v1/chat/completions", "m1")
LIMITS = Limits(max_requests=10, max_bytes=10_000, one_model_per_batch=True, endpoints=frozenset())
MAX_WAIT_S = 300.0
TURNAROUND_S = 3600.0


def stats(
    count: int = 3,
    *,
    body_bytes: int | None = None,
    waited_s: float = 0.0,
    deadline_in_s: float | None = None,
) -> GroupStats:
    return GroupStats(
        KEY,
        count,
        100 * count if body_bytes is None else body_bytes,
        NOW - timedelta(seconds=waited_s),
        None if deadline_in_s is None else NOW + timedelta(seconds=deadline_in_s),
    )


@pytest.mark.parametrize(
    ("group", "force", "expected"),
    [
        pytest.param(stats(10), False, FlushReason.FULL, id="full-by-count"),
        pytest.param(stats(11), False, FlushReason.FULL, id="over-full-by-count"),
        # 2 * (4840 + 160) = 10,000 line bytes: exactly the cap
        pytest.param(stats(2, body_bytes=9680), False, FlushReason.FULL, id="full-by-bytes"),
        pytest.param(stats(2, body_bytes=9679), False, None, id="one-byte-short-of-full"),
        pytest.param(stats(3, waited_s=MAX_WAIT_S), False, FlushReason.MAX_WAIT, id="max-wait-reached"),
        pytest.param(stats(3, waited_s=MAX_WAIT_S - 1), False, None, id="max-wait-not-reached"),
        pytest.param(stats(3, deadline_in_s=TURNAROUND_S), False, FlushReason.DEADLINE, id="deadline-minus-turnaround"),
        pytest.param(stats(3, deadline_in_s=TURNAROUND_S - 1), False, FlushReason.DEADLINE, id="deadline-near"),
        pytest.param(stats(3, deadline_in_s=-5), False, FlushReason.DEADLINE, id="deadline-passed"),
        pytest.param(stats(3, deadline_in_s=TURNAROUND_S + 1), False, None, id="deadline-far"),
        pytest.param(stats(3), True, FlushReason.FORCED, id="forced"),
        pytest.param(stats(3), False, None, id="none"),
        pytest.param(stats(0), True, None, id="empty-even-forced"),
        # full outranks the rest: only full batches are cut, the remainder keeps waiting for company
        pytest.param(stats(10, waited_s=MAX_WAIT_S), True, FlushReason.FULL, id="full-outranks-forced"),
        pytest.param(stats(3, waited_s=MAX_WAIT_S, deadline_in_s=0), False, FlushReason.DEADLINE, id="deadline-first"),
    ],
)
def test_flush_reason(group: GroupStats, force: bool, expected: FlushReason | None) -> None:
    got = flush_reason(group, LIMITS, NOW, max_wait_s=MAX_WAIT_S, turnaround_s=TURNAROUND_S, force=force)
    assert got is expected


@pytest.mark.parametrize(("inputs", "expected"), [(100, FlushReason.FULL), (99, None)])
def test_flush_reason_full_by_embedding_inputs(inputs: int, expected: FlushReason | None) -> None:
    group = replace(stats(3), inputs=inputs)
    assert flush_reason(group, EMBEDDINGS, NOW, max_wait_s=MAX_WAIT_S, turnaround_s=TURNAROUND_S) is expected
    # a provider without an input cap ignores them
    assert flush_reason(group, LIMITS, NOW, max_wait_s=MAX_WAIT_S, turnaround_s=TURNAROUND_S) is None


def test_line_bytes_adds_the_envelope() -> None:
    assert stats(4, body_bytes=1000).line_bytes == 1000 + 4 * LINE_OVERHEAD_BYTES


def jobs(*sizes: int, inputs: int = 1) -> list[tuple[str, int, int]]:
    return [(f"j{i}", size, inputs) for i, size in enumerate(sizes)]


EMBEDDINGS = Limits(max_requests=10, max_bytes=10_000, one_model_per_batch=True, endpoints=frozenset(), max_inputs=100)


@pytest.mark.parametrize(
    ("candidates", "limits", "keep_partial", "expected"),
    [
        pytest.param(jobs(*[10] * 25), LIMITS, True, [10, 10, 5], id="count-keep-partial"),
        pytest.param(jobs(*[10] * 25), LIMITS, False, [10, 10], id="count-drop-partial"),
        pytest.param(jobs(*[10] * 20), LIMITS, False, [10, 10], id="count-exact"),
        # each line is 2,500 + 160 = 2,660 bytes: three fit in 10,000, a fourth does not
        pytest.param(jobs(*[2500] * 7), LIMITS, True, [3, 3, 1], id="bytes-keep-partial"),
        pytest.param(jobs(*[2500] * 7), LIMITS, False, [3, 3], id="bytes-drop-partial"),
        # 2 * (4840 + 160) = 10,000: a batch exactly at the byte cap is full
        pytest.param(jobs(4840, 4840), LIMITS, False, [2], id="bytes-exactly-full"),
        pytest.param(jobs(4841, 4840), LIMITS, True, [1, 1], id="bytes-one-over"),
        # a single job larger than the cap still goes alone (the provider decides), never with others
        pytest.param(jobs(20_000, 10), LIMITS, True, [1, 1], id="oversized-alone"),
        pytest.param([], LIMITS, True, [], id="empty"),
        # OpenAI's 50,000 embedding inputs per batch, scaled down to 100: 40 + 40 fit, a third does not
        pytest.param(jobs(10, 10, 10, 10, 10, inputs=40), EMBEDDINGS, True, [2, 2, 1], id="inputs-keep-partial"),
        pytest.param(jobs(10, 10, 10, 10, 10, inputs=40), EMBEDDINGS, False, [2, 2], id="inputs-drop-partial"),
        pytest.param(jobs(10, 10, 10, 10, inputs=50), EMBEDDINGS, False, [2, 2], id="inputs-exactly-full"),
        pytest.param(jobs(10, 10, 10, inputs=1), EMBEDDINGS, False, [], id="inputs-far-from-full"),
    ],
)
def test_split_sizes(
    candidates: list[tuple[str, int, int]], limits: Limits, keep_partial: bool, expected: list[int]
) -> None:
    assert [len(b) for b in split(candidates, limits, keep_partial=keep_partial)] == expected


def test_split_keeps_priority_order() -> None:
    candidates = jobs(*[10] * 23)
    out = split(candidates, LIMITS, keep_partial=True)
    assert [job_id for batch in out for job_id in batch] == [job_id for job_id, _, _ in candidates]
    # the highest-priority jobs (first given) fill the first batch
    assert out[0] == [f"j{i}" for i in range(10)]


@pytest.mark.parametrize(
    ("current", "expected"),
    [(0.0, 1.0), (0.4, 1.0), (1.0, 2.0), (2.0, 4.0), (8.0, 16.0), (40.0, 60.0), (60.0, 60.0), (500.0, 60.0)],
)
def test_next_poll_interval_doubles_within_bounds(current: float, expected: float) -> None:
    assert next_poll_interval(current, min_s=1.0, max_s=60.0) == expected


def test_poll_backoff_sequence_reaches_cap_and_stays() -> None:
    interval, seen = 1.0, []
    for _ in range(10):
        interval = next_poll_interval(interval, min_s=1.0, max_s=30.0)
        seen.append(interval)
    assert seen == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0, 30.0, 30.0]


@pytest.mark.parametrize(
    ("previous", "expected"),
    [
        (None, 600.0),
        (0.0, 600.0),
        (-3.0, 600.0),
        (600.0, 1200.0),
        (1200.0, 2400.0),
        (15000.0, 21600.0),
        (21600.0, 21600.0),
    ],
)
def test_pause_backoff_doubles_with_cap(previous: float | None, expected: float) -> None:
    assert pause_backoff(previous, base_s=600.0) == expected


def test_pause_backoff_custom_cap() -> None:
    assert pause_backoff(100.0, base_s=50.0, max_s=150.0) == 150.0


@settings(max_examples=300, deadline=None)
@given(
    jobs_=st.lists(
        st.tuples(st.integers(min_value=0, max_value=3000), st.integers(min_value=1, max_value=60)), max_size=120
    ),
    max_requests=st.integers(min_value=1, max_value=15),
    max_bytes=st.integers(min_value=200, max_value=8000),
    max_inputs=st.one_of(st.none(), st.integers(min_value=60, max_value=300)),
    keep_partial=st.booleans(),
)
def test_split_property(
    jobs_: list[tuple[int, int]], max_requests: int, max_bytes: int, max_inputs: int | None, keep_partial: bool
) -> None:
    limits = Limits(
        max_requests=max_requests,
        max_bytes=max_bytes,
        one_model_per_batch=True,
        endpoints=frozenset(),
        max_inputs=max_inputs,
    )
    candidates = [(f"j{i}", size, inputs) for i, (size, inputs) in enumerate(jobs_)]
    size_of = {job_id: size for job_id, size, _ in candidates}
    inputs_of = {job_id: inputs for job_id, _, inputs in candidates}
    out = split(candidates, limits, keep_partial=keep_partial)
    flat = [job_id for batch in out for job_id in batch]
    # never duplicates, never reorders
    assert len(flat) == len(set(flat))
    assert flat == [job_id for job_id, _, _ in candidates][: len(flat)]
    for batch in out:
        assert 1 <= len(batch) <= max_requests
        line_bytes = sum(size_of[j] + LINE_OVERHEAD_BYTES for j in batch)
        # over the byte cap only when one job alone is larger than it
        assert line_bytes <= max_bytes or len(batch) == 1
        # never over the input cap (intake refuses a job over it on its own)
        assert max_inputs is None or sum(inputs_of[j] for j in batch) <= max_inputs
    if keep_partial:
        # never loses an id
        assert flat == [job_id for job_id, _, _ in candidates]
    else:
        # what is held back is a tail that does not fill a batch
        rest = candidates[len(flat) :]
        assert len(rest) < max_requests
        assert sum(size + LINE_OVERHEAD_BYTES for _, size, _ in rest) < max_bytes or len(rest) == 0
        assert max_inputs is None or sum(inputs for _, _, inputs in rest) < max_inputs
