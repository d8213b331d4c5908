from __future__ import annotations

import pytest

from batcher.domain import (
    BATCH_TERMINAL,
    BATCH_TRANSITIONS,
    JOB_TERMINAL,
    JOB_TRANSITIONS,
    BatchState,
    JobState,
    batch_sources,
    check_batch_transition,
    check_job_transition,
    job_sources,
    new_id,
)
from batcher.errors import StateConflict


def test_every_state_has_a_row() -> None:
    assert set(JOB_TRANSITIONS) == set(JobState)
    assert set(BATCH_TRANSITIONS) == set(BatchState)


def test_terminal_states_have_no_way_out() -> None:
    for state in JOB_TERMINAL:
        assert JOB_TRANSITIONS[state] == frozenset()
    for bstate in BATCH_TERMINAL:
        assert BATCH_TRANSITIONS[bstate] == frozenset()
    assert {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED} == JOB_TERMINAL


def test_every_non_terminal_state_can_end() -> None:
    # from every job state some path reaches a terminal state
    for start in JobState:
        seen, todo = {start}, [start]
        while todo:
            for nxt in JOB_TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert seen & JOB_TERMINAL, start
    for bstart in BatchState:
        bseen, btodo = {bstart}, [bstart]
        while btodo:
            for bnxt in BATCH_TRANSITIONS[btodo.pop()]:
                if bnxt not in bseen:
                    bseen.add(bnxt)
                    btodo.append(bnxt)
        assert BatchState.COLLECTED in bseen, bstart


@pytest.mark.parametrize(
    ("current", "target", "ok"),
    [
        (JobState.QUEUED, JobState.PACKED, True),
        (JobState.PACKED, JobState.SUBMITTED, True),
        (JobState.SUBMITTED, JobState.SUCCEEDED, True),
        (JobState.SUBMITTED, JobState.QUEUED, True),
        (JobState.SUCCEEDED, JobState.QUEUED, False),
        (JobState.QUEUED, JobState.SUCCEEDED, False),
        (JobState.CANCELLED, JobState.QUEUED, False),
    ],
)
def test_job_transitions(current: JobState, target: JobState, ok: bool) -> None:
    if ok:
        check_job_transition(current, target)
    else:
        with pytest.raises(StateConflict):
            check_job_transition(current, target)


def test_sources_are_the_inverse_table() -> None:
    assert job_sources(JobState.PACKED) == {JobState.QUEUED}
    assert JobState.SUBMITTED in job_sources(JobState.SUCCEEDED)
    assert batch_sources(BatchState.SUBMITTING) == {BatchState.OPEN}
    with pytest.raises(StateConflict):
        check_batch_transition(BatchState.COLLECTED, BatchState.OPEN)


def test_ids_are_unique_and_time_ordered() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 for i in ids)
    assert ids[0][:12] <= ids[-1][:12]
