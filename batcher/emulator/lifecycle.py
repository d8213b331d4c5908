"""Batch statuses and the time schedule of an emulated batch.

Pure: times are parameters. A batch created at ``t`` with latency ``L`` is ``validating`` until
``t + 0.2L``, ``in_progress`` until ``t + 0.8L``, ``finalizing`` until ``t + L`` and then
``completed``. A cancellation requested at ``c`` ends at ``c + 0.1L``. Expiry, when a batch is fated
to expire, happens at the end of ``in_progress``.

Transitions::

    validating --> failed                      (bad input file, enqueued-token limit)
    validating --> in_progress --> finalizing --> completed
    in_progress --> expired
    validating | in_progress --> cancelling --> cancelled
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum

from batcher.emulator.seeding import stable_unit

logger = logging.getLogger(__name__)

__all__ = [
    "ACTIVE",
    "ALLOWED_TRANSITIONS",
    "CANCELLABLE",
    "TERMINAL",
    "BatchStatus",
    "Schedule",
    "expire_done_count",
    "is_fated_to_expire",
]

VALIDATE_SHARE = 0.2
PROGRESS_END_SHARE = 0.8
CANCEL_SHARE = 0.1


class BatchStatus(str, Enum):
    """Status of a batch, with OpenAI's values."""

    #: The input file is being checked.
    VALIDATING = "validating"
    #: The input file was rejected, or the enqueued-token limit was reached.
    FAILED = "failed"
    #: Requests are running.
    IN_PROGRESS = "in_progress"
    #: Requests are done; result files are being written.
    FINALIZING = "finalizing"
    #: Done; results are in the output and error files.
    COMPLETED = "completed"
    #: The completion window ran out; finished requests are in the output file.
    EXPIRED = "expired"
    #: A cancellation was requested and is being carried out.
    CANCELLING = "cancelling"
    #: Cancelled; requests finished before the cancellation are in the output file.
    CANCELLED = "cancelled"


TERMINAL: frozenset[BatchStatus] = frozenset(
    {BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)
ACTIVE: frozenset[BatchStatus] = frozenset(BatchStatus) - TERMINAL
CANCELLABLE: frozenset[BatchStatus] = frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS})
ALLOWED_TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.VALIDATING: frozenset({BatchStatus.FAILED, BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING}),
    BatchStatus.IN_PROGRESS: frozenset({BatchStatus.FINALIZING, BatchStatus.EXPIRED, BatchStatus.CANCELLING}),
    BatchStatus.FINALIZING: frozenset({BatchStatus.COMPLETED}),
    BatchStatus.CANCELLING: frozenset({BatchStatus.CANCELLED}),
    BatchStatus.FAILED: frozenset(),
    BatchStatus.COMPLETED: frozenset(),
    BatchStatus.EXPIRED: frozenset(),
    BatchStatus.CANCELLED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class Schedule:
    """When each phase of a batch ends, given the emulator latency.

    Args:
        latency_s: Seconds from creation to completion.
    """

    latency_s: float

    def validated_at(self, created_at: float) -> float:
        """End of ``validating``."""
        return created_at + VALIDATE_SHARE * self.latency_s

    def progress_end_at(self, created_at: float) -> float:
        """End of ``in_progress`` (start of ``finalizing``, or expiry)."""
        return created_at + PROGRESS_END_SHARE * self.latency_s

    def completed_at(self, created_at: float) -> float:
        """End of ``finalizing``."""
        return created_at + self.latency_s

    def cancelled_at(self, cancelling_at: float) -> float:
        """End of ``cancelling``."""
        return cancelling_at + CANCEL_SHARE * self.latency_s

    def progress(self, created_at: float, now: float) -> float:
        """Fraction (0..1) of the requests done at ``now`` while ``in_progress``."""
        start, end = self.validated_at(created_at), self.progress_end_at(created_at)
        if end <= start:
            return 1.0 if now >= end else 0.0
        return min(1.0, max(0.0, (now - start) / (end - start)))


def is_fated_to_expire(seed: int, ordinal: int, expire_rate: float, ordinals: frozenset[int] = frozenset()) -> bool:
    """Whether the ``ordinal``-th batch of a run expires (deterministic for a seed), by rate or by name."""
    return ordinal in ordinals or stable_unit(seed, "expire", ordinal) < expire_rate


def expire_done_count(seed: int, ordinal: int, total: int) -> int:
    """How many requests (in input order) an expiring batch finishes: between 25% and 75%.

    A batch of two or more requests always finishes at least one and leaves at least one undone.
    """
    fraction = 0.25 + 0.5 * stable_unit(seed, "expire-progress", ordinal)
    done = math.floor(total * fraction)
    if total >= 2:
        done = min(max(done, 1), total - 1)
    return done
