"""Packing policy: which queued groups become batches now, and how they split. Pure functions, no I/O.

Jobs are grouped by provider, account, endpoint and model (one model per batch is the strictest
provider's rule, and it keeps price lookup per batch trivial). A group is flushed when it fills a batch,
when its oldest job has waited ``max_wait_s``, when a job's deadline needs the batch to start now, or
when the caller forces it (burst mode: no more work is coming).

Also the other small policies the lifecycle asks of plain data: poll and pause back-off, and the delay before a
failed provider call is tried again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from batcher.providers.base import Limits

#: bytes a line adds around the stored body (custom_id, method, url and punctuation), rounded up
LINE_OVERHEAD_BYTES = 160


class FlushReason(str, Enum):
    #: enough jobs (or bytes) for a full batch
    FULL = "full"
    #: the oldest job has waited long enough
    MAX_WAIT = "max_wait"
    #: a job's deadline leaves no more time to wait
    DEADLINE = "deadline"
    #: the caller asked (burst mode)
    FORCED = "forced"


@dataclass(frozen=True)
class GroupKey:
    provider: str
    account: str
    endpoint: str
    model: str


@dataclass(frozen=True)
class GroupStats:
    """What the queue holds for one group."""

    key: GroupKey
    count: int
    body_bytes: int
    oldest_queued_at: datetime
    earliest_deadline: datetime | None
    #: embedding inputs summed over the jobs (:attr:`Limits.max_inputs`)
    inputs: int = 0

    @property
    def line_bytes(self) -> int:
        return self.body_bytes + self.count * LINE_OVERHEAD_BYTES


def flush_reason(
    stats: GroupStats,
    limits: Limits,
    now: datetime,
    *,
    max_wait_s: float,
    turnaround_s: float,
    lead_s: float = 0.0,
    force: bool = False,
) -> FlushReason | None:
    """Why the group should be packed now, or ``None`` to let it wait for more jobs.

    Args:
        stats: the group's queue.
        limits: the provider's batch limits.
        now: the current time.
        max_wait_s: how long the oldest job may wait for company.
        turnaround_s: how long a batch is expected to take at this provider; a job whose deadline is
            nearer than that (plus ``lead_s``) cannot wait any longer.
        lead_s: how long before that last moment to flush, for the time packing and submitting take.
        force: pack whatever is there.
    """
    if stats.count <= 0:
        return None
    if (
        stats.count >= limits.max_requests
        or stats.line_bytes >= limits.max_bytes
        or (limits.max_inputs is not None and stats.inputs >= limits.max_inputs)
    ):
        return FlushReason.FULL
    if force:
        return FlushReason.FORCED
    if (
        stats.earliest_deadline is not None
        and stats.earliest_deadline - timedelta(seconds=turnaround_s + lead_s) <= now
    ):
        return FlushReason.DEADLINE
    if now - stats.oldest_queued_at >= timedelta(seconds=max_wait_s):
        return FlushReason.MAX_WAIT
    return None


def split(candidates: Iterable[tuple[str, int, int]], limits: Limits, *, keep_partial: bool) -> list[list[str]]:
    """Cut ``(job_id, body_bytes, inputs)`` triples, already in packing order, into batches within the limits.

    Args:
        candidates: queued jobs, highest priority first; ``inputs`` counts a job's embedding inputs (1 for any
            other request), which only matter where the provider caps them (:attr:`Limits.max_inputs`).
        limits: the provider's request, byte and embedding-input caps per batch.
        keep_partial: keep the last batch even when it is not full (the group is being flushed); when
            ``False`` only full batches are returned and the rest keeps waiting.

    Returns:
        Job ids per batch, in order.
    """
    max_inputs = limits.max_inputs
    batches: list[list[str]] = []
    current: list[str] = []
    current_bytes = current_inputs = 0
    for job_id, body_bytes, inputs in candidates:
        line = body_bytes + LINE_OVERHEAD_BYTES
        if current and (
            len(current) >= limits.max_requests
            or current_bytes + line > limits.max_bytes
            or (max_inputs is not None and current_inputs + inputs > max_inputs)
        ):
            batches.append(current)
            current, current_bytes, current_inputs = [], 0, 0
        current.append(job_id)
        current_bytes += line
        current_inputs += inputs
    if current:
        full = (
            len(current) >= limits.max_requests
            or current_bytes >= limits.max_bytes
            or (max_inputs is not None and current_inputs >= max_inputs)
        )
        if keep_partial or full:
            batches.append(current)
    return batches


def next_poll_interval(current_s: float, *, min_s: float, max_s: float) -> float:
    """Poll back-off: double the interval each time the batch is still running, within ``[min_s, max_s]``."""
    return max(min_s, min(current_s * 2, max_s))


def pause_backoff(previous_s: float | None, *, base_s: float, max_s: float = 6 * 3600) -> float:
    """How long to pause a provider+model after its token limit was hit: ``base_s``, doubling while it recurs."""
    if previous_s is None or previous_s <= 0:
        return base_s
    return min(previous_s * 2, max_s)


def retry_delay(
    failures: int, *, base_s: float, max_s: float, retry_after_s: float | None, jitter: float, spread: float
) -> float:
    """Seconds to wait before trying a failed provider call again.

    A ``Retry-After`` the provider sent is honoured as given (never less than ``base_s``). Otherwise the delay
    doubles with each failure in a row, from ``base_s`` up to ``max_s``, and a random share of up to ``spread``
    of it is added on top, so that workers that failed together do not all come back at the same moment.

    Args:
        failures: failures in a row, this one included (1 for the first).
        base_s: the first delay.
        max_s: the longest delay before jitter.
        retry_after_s: the provider's Retry-After, if it sent one.
        jitter: a random number in ``[0, 1)`` (the caller's ``random.random()``).
        spread: the largest share added (0 for none).
    """
    if retry_after_s is not None:
        return max(retry_after_s, base_s)
    exponent = min(max(failures, 1) - 1, 30)
    delay = min(max_s, base_s * 2.0**exponent)
    return delay * (1 + spread * jitter)
