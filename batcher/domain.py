"""Job and batch states, their one transition table each, and the plain models passed between layers."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from batcher.errors import StateConflict


class JobState(str, Enum):
    """Where a job is. Only ``succeeded``, ``failed`` and ``cancelled`` are terminal."""

    #: waiting to be packed into a batch
    QUEUED = "queued"
    #: assigned to a batch that is not yet at the provider
    PACKED = "packed"
    #: its batch is at the provider
    SUBMITTED = "submitted"
    #: its deadline cannot be met by a batch; the real-time call is running
    FALLBACK = "fallback"
    #: a result came back and was recorded
    SUCCEEDED = "succeeded"
    #: failed for good (``error`` says why)
    FAILED = "failed"
    #: cancelled by a user
    CANCELLED = "cancelled"


class BatchState(str, Enum):
    """Where a batch is. Provider statuses map onto these; the provider's own word is kept beside."""

    #: created by the packer, jobs assigned, nothing sent yet
    OPEN = "open"
    #: upload and create are in flight (row committed before the provider is called)
    SUBMITTING = "submitting"
    #: the provider is validating the input
    VALIDATING = "validating"
    #: the provider is running the requests
    IN_PROGRESS = "in_progress"
    #: the provider is writing results
    FINALIZING = "finalizing"
    #: the provider finished; results wait to be collected
    ENDED = "ended"
    #: the provider refused or failed the batch as a whole
    FAILED = "failed"
    #: the provider's window ran out; part of the results may exist
    EXPIRED = "expired"
    #: a cancel was requested at the provider
    CANCELLING = "cancelling"
    #: the provider cancelled it; partial results may exist
    CANCELLED = "cancelled"
    #: results and leftovers are settled; nothing more to do
    COLLECTED = "collected"


JOB_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
JOB_ACTIVE = frozenset(JobState) - JOB_TERMINAL

BATCH_TERMINAL = frozenset({BatchState.COLLECTED})
#: batches the provider holds and that must be polled
BATCH_AT_PROVIDER = frozenset(
    {BatchState.VALIDATING, BatchState.IN_PROGRESS, BatchState.FINALIZING, BatchState.CANCELLING}
)
#: batches whose results (or leftovers) wait to be collected
BATCH_TO_COLLECT = frozenset({BatchState.ENDED, BatchState.FAILED, BatchState.EXPIRED, BatchState.CANCELLED})
BATCH_ACTIVE = frozenset(BatchState) - BATCH_TERMINAL

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.PACKED, JobState.FALLBACK, JobState.FAILED, JobState.CANCELLED}),
    # packed → queued: the batch was never created at the provider (released or token limit)
    JobState.PACKED: frozenset({JobState.SUBMITTED, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}),
    # submitted → queued: retryable failure, expiry, or the batch failed as a whole for a reason not theirs
    JobState.SUBMITTED: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.QUEUED, JobState.CANCELLED}),
    JobState.FALLBACK: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

BATCH_TRANSITIONS: dict[BatchState, frozenset[BatchState]] = {
    BatchState.OPEN: frozenset({BatchState.SUBMITTING, BatchState.CANCELLED}),
    BatchState.SUBMITTING: frozenset(
        {BatchState.VALIDATING, BatchState.IN_PROGRESS, BatchState.FAILED, BatchState.OPEN, BatchState.CANCELLED}
    ),
    BatchState.VALIDATING: frozenset(
        {
            BatchState.IN_PROGRESS,
            BatchState.FINALIZING,
            BatchState.ENDED,
            BatchState.FAILED,
            BatchState.EXPIRED,
            BatchState.CANCELLING,
            BatchState.CANCELLED,
        }
    ),
    BatchState.IN_PROGRESS: frozenset(
        {
            BatchState.FINALIZING,
            BatchState.ENDED,
            BatchState.FAILED,
            BatchState.EXPIRED,
            BatchState.CANCELLING,
            BatchState.CANCELLED,
        }
    ),
    BatchState.FINALIZING: frozenset(
        {BatchState.ENDED, BatchState.FAILED, BatchState.EXPIRED, BatchState.CANCELLING, BatchState.CANCELLED}
    ),
    BatchState.CANCELLING: frozenset({BatchState.CANCELLED, BatchState.ENDED, BatchState.EXPIRED, BatchState.FAILED}),
    BatchState.ENDED: frozenset({BatchState.COLLECTED}),
    BatchState.FAILED: frozenset({BatchState.COLLECTED}),
    BatchState.EXPIRED: frozenset({BatchState.COLLECTED}),
    BatchState.CANCELLED: frozenset({BatchState.COLLECTED}),
    BatchState.COLLECTED: frozenset(),
}


def job_sources(target: JobState) -> frozenset[JobState]:
    """States a job may move to ``target`` from (for ``UPDATE … WHERE state IN (…)``)."""
    return frozenset(s for s, targets in JOB_TRANSITIONS.items() if target in targets)


def batch_sources(target: BatchState) -> frozenset[BatchState]:
    """States a batch may move to ``target`` from."""
    return frozenset(s for s, targets in BATCH_TRANSITIONS.items() if target in targets)


def check_job_transition(current: JobState, target: JobState) -> None:
    """Raise :class:`StateConflict` unless ``current → target`` is in the job table."""
    if target not in JOB_TRANSITIONS[current]:
        raise StateConflict(f"job cannot go from {current.value} to {target.value}")


def check_batch_transition(current: BatchState, target: BatchState) -> None:
    """Raise :class:`StateConflict` unless ``current → target`` is in the batch table."""
    if target not in BATCH_TRANSITIONS[current]:
        raise StateConflict(f"batch cannot go from {current.value} to {target.value}")


def state_values(states: Iterable[Enum]) -> list[str]:
    """The string values of some states, sorted (stable SQL)."""
    return sorted(str(s.value) for s in states)


def new_id() -> str:
    """A 32-hex-digit id: 48 bits of milliseconds then 80 random bits.

    Time-ordered (index locality, newest-first listing) and wide enough never to collide —
    one peer lost jobs to 8-hex-digit ids that did.
    """
    return f"{int(time.time() * 1000):012x}{os.urandom(10).hex()}"


class Provider(str, Enum):
    """Provider APIs batcher speaks. Accounts (several keys, OpenAI-compatible hosts) name one of these."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class JobSpec(BaseModel):
    """One request as handed to batcher, before it has an id.

    ``body`` is the provider-native request (OpenAI body or Anthropic params), never rewritten.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: Provider
    endpoint: str
    model: str
    custom_id: str
    body: dict[str, Any]
    run: str = "default"
    account: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    priority: int = 0
    not_after: datetime | None = None
