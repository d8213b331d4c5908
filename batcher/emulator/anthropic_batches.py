"""Message Batches of the emulator: records, their JSON, and their lifecycle.

A batch is ``in_progress`` from creation until ``created + latency_s``, then ``ended``. A cancel at ``c`` makes it
``canceling`` until ``c + 0.1 * latency_s`` (or its normal end, if sooner); the requests it got to by ``c`` (pro
rata of the time elapsed) keep their results, the others are ``canceled``. A batch fated to expire
(``expire_rate``) ends at the normal time with 25-75% of its requests ``expired``. Every count but ``processing``
stays 0 until the batch ends, as on the real API.

Transitions are lazy, as on the OpenAI side (:mod:`batcher.emulator.state`): every call first runs
:meth:`AnthropicBatches.advance`, which carries out all transitions due by ``now`` in time order, so a run
depends only on the seed and the calls made. Batches share the OpenAI side's ``batches_created`` counter (it is
also each batch's ordinal, which drives its fates) and ``requests_by_custom_id``.

Transitions::

    in_progress --> ended
    in_progress --> canceling --> ended
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batcher.emulator.anthropic_errors import invalid_request, not_found
from batcher.emulator.anthropic_models import PromptCache, new_id
from batcher.emulator.anthropic_requests import ParsedRequests
from batcher.emulator.anthropic_results import ResultCounts, ResultsPlan, write_results
from batcher.emulator.lifecycle import CANCEL_SHARE, expire_done_count, is_fated_to_expire
from batcher.emulator.state import EmulatorState

logger = logging.getLogger(__name__)

__all__ = ["EXPIRY_S", "AnthropicBatches", "MessageBatchRecord", "ProcessingStatus", "message_batch_object", "rfc3339"]

#: a batch expires 24 h after creation (``expires_at``)
EXPIRY_S = 24 * 3600


class ProcessingStatus(str, enum.Enum):
    """``processing_status`` of a Message Batch."""

    #: requests are running
    IN_PROGRESS = "in_progress"
    #: a cancel was asked for and is being carried out
    CANCELING = "canceling"
    #: every request has a result; ``results_url`` is set
    ENDED = "ended"


@dataclass(slots=True)
class MessageBatchRecord:
    """A Message Batch and what is needed to move it along its schedule."""

    id: str
    ordinal: int
    created_at: float
    total: int
    requests_path: Path
    results_path: Path
    status: ProcessingStatus = ProcessingStatus.IN_PROGRESS
    cancel_initiated_at: float | None = None
    ended_at: float | None = None
    counts: ResultCounts = field(default_factory=ResultCounts)


def rfc3339(ts: float) -> str:
    """Unix seconds as an RFC 3339 UTC string with microseconds, e.g. ``2026-08-20T18:37:24.100435Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _opt(ts: float | None) -> str | None:
    return None if ts is None else rfc3339(ts)


def message_batch_object(batch: MessageBatchRecord, origin: str) -> dict[str, Any]:
    """The ``MessageBatch`` JSON of a batch.

    Args:
        batch: The batch.
        origin: Scheme, host and port clients reach this server at; ``results_url`` is absolute.
    """
    ended = batch.status is ProcessingStatus.ENDED
    if ended:
        counts = batch.counts.as_json()
    else:
        counts = {"processing": batch.total, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": batch.status.value,
        "request_counts": counts,
        "ended_at": _opt(batch.ended_at),
        "created_at": rfc3339(batch.created_at),
        "expires_at": rfc3339(batch.created_at + EXPIRY_S),
        "archived_at": None,
        "cancel_initiated_at": _opt(batch.cancel_initiated_at),
        "results_url": f"{origin}/v1/messages/batches/{batch.id}/results" if ended else None,
    }


class AnthropicBatches:
    """Every Message Batch the emulator knows, for one app.

    Args:
        state: The emulator's shared state (settings, data directory, counters, fault dice).
    """

    def __init__(self, state: EmulatorState) -> None:
        self.state = state
        self.settings = state.settings
        self.prompt_cache = PromptCache()
        self._dir = state.data_dir / "anthropic"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock = asyncio.Lock()
        self._batches: dict[str, MessageBatchRecord] = {}
        self._clock = 0.0
        state.reset_hooks.append(self.reset)

    # ------------------------------------------------------------------ create, read

    def allocate(self) -> tuple[str, Path]:
        """A new batch id and the path its requests must be written to."""
        batch_id = new_id("msgbatch_")
        return batch_id, self._dir / f"{batch_id}.requests.jsonl"

    async def register(
        self, batch_id: str, requests_path: Path, parsed: ParsedRequests, now: float
    ) -> MessageBatchRecord:
        """Record a batch whose requests were checked and written to ``requests_path`` (from :meth:`allocate`)."""
        async with self._lock:
            await self._advance_locked(now)
            self.state.batches_created += 1
            batch = MessageBatchRecord(
                id=batch_id,
                ordinal=self.state.batches_created,
                created_at=max(now, self._clock),
                total=parsed.count,
                requests_path=requests_path,
                results_path=self._dir / f"{batch_id}.results.jsonl",
            )
            self._batches[batch_id] = batch
            self.state.requests_by_custom_id.update(parsed.custom_ids)
            logger.info("message batch %s created (%d requests)", batch_id, parsed.count)
            return batch

    def get(self, batch_id: str) -> MessageBatchRecord:
        """The batch with this id.

        Raises:
            AnthropicApiError: 404 if there is none.
        """
        batch = self._batches.get(batch_id)
        if batch is None:
            raise not_found(f"Message Batch {batch_id} not found.")
        return batch

    def page(self, *, after_id: str | None, before_id: str | None, limit: int) -> tuple[list[MessageBatchRecord], bool]:
        """A page of batches, newest first, and whether more follow in the direction of travel.

        Raises:
            AnthropicApiError: 400 for an unknown cursor, or both cursors at once.
        """
        if after_id is not None and before_id is not None:
            raise invalid_request("after_id: cannot be combined with before_id")
        records = sorted(self._batches.values(), key=lambda b: b.ordinal, reverse=True)
        ids = [r.id for r in records]
        if after_id is not None:
            start = self._cursor(ids, "after_id", after_id) + 1
            return records[start : start + limit], start + limit < len(records)
        if before_id is not None:
            end = self._cursor(ids, "before_id", before_id)
            start = max(0, end - limit)
            return records[start:end], start > 0
        return records[:limit], limit < len(records)

    @staticmethod
    def _cursor(ids: list[str], name: str, value: str) -> int:
        try:
            return ids.index(value)
        except ValueError:
            raise invalid_request(f"{name}: no Message Batch with id '{value}'") from None

    # ------------------------------------------------------------------ cancel, delete, results

    async def cancel(self, batch_id: str, now: float) -> MessageBatchRecord:
        """Start canceling an ``in_progress`` batch; a ``canceling`` one is returned as is.

        Raises:
            AnthropicApiError: 404 for an unknown id, 400 if the batch has ended.
        """
        async with self._lock:
            await self._advance_locked(now)
            batch = self.get(batch_id)
            if batch.status is ProcessingStatus.ENDED:
                raise invalid_request(f"Message Batch {batch_id} has already ended and cannot be canceled.")
            if batch.status is ProcessingStatus.IN_PROGRESS:
                batch.status = ProcessingStatus.CANCELING
                batch.cancel_initiated_at = max(now, self._clock)
                logger.info("message batch %s canceling", batch_id)
            return batch

    async def delete(self, batch_id: str, now: float) -> None:
        """Forget an ended batch and remove its results.

        Raises:
            AnthropicApiError: 404 for an unknown id, 400 while it is still processing.
        """
        async with self._lock:
            await self._advance_locked(now)
            batch = self.get(batch_id)
            if batch.status is not ProcessingStatus.ENDED:
                raise invalid_request(
                    f"Message Batch {batch_id} is still {batch.status.value}; it can be deleted once it has "
                    "ended. Cancel it first."
                )
            del self._batches[batch_id]
            batch.results_path.unlink(missing_ok=True)
            batch.requests_path.unlink(missing_ok=True)
            logger.info("message batch %s deleted", batch_id)

    async def results_path(self, batch_id: str, now: float) -> Path:
        """The results file of an ended batch.

        Raises:
            AnthropicApiError: 404 for an unknown id, 400 while it is still processing.
        """
        async with self._lock:
            await self._advance_locked(now)
            batch = self.get(batch_id)
            if batch.status is not ProcessingStatus.ENDED:
                raise invalid_request(
                    f"Message Batch {batch_id} is still {batch.status.value}; results are available once its "
                    "processing_status is 'ended'."
                )
            return batch.results_path

    # ------------------------------------------------------------------ lifecycle

    async def advance(self, now: float) -> None:
        """Carry out every transition due by ``now``."""
        async with self._lock:
            await self._advance_locked(now)

    def _natural_end(self, batch: MessageBatchRecord) -> float:
        return batch.created_at + self.settings.latency_s

    def _end_at(self, batch: MessageBatchRecord) -> float | None:
        if batch.status is ProcessingStatus.ENDED:
            return None
        natural = self._natural_end(batch)
        if batch.cancel_initiated_at is not None:
            return min(natural, batch.cancel_initiated_at + CANCEL_SHARE * self.settings.latency_s)
        return natural

    async def _advance_locked(self, now: float) -> None:
        self._clock = max(self._clock, now)
        while True:
            due: tuple[float, int, MessageBatchRecord] | None = None
            for batch in self._batches.values():
                at = self._end_at(batch)
                if at is not None and at <= self._clock and (due is None or (at, batch.ordinal) < due[:2]):
                    due = (at, batch.ordinal, batch)
            if due is None:
                return
            at, _, batch = due
            try:
                await self._end(batch, at)
            except Exception:  # a bug or a vanished file must not wedge every later call
                logger.exception("message batch %s: internal error while ending", batch.id)
                batch.counts = ResultCounts(errored=batch.total)
                batch.status = ProcessingStatus.ENDED
                batch.ended_at = at
                with contextlib.suppress(OSError):
                    batch.results_path.write_bytes(b"")  # ended with no results: every request goes missing

    def _done_count(self, batch: MessageBatchRecord, at: float) -> tuple[int, str]:
        """How many requests (in input order) ran, and the result type of the others."""
        settings = self.settings
        if batch.cancel_initiated_at is not None and at < self._natural_end(batch):
            latency = settings.latency_s
            progress = 1.0 if latency <= 0 else min(1.0, (batch.cancel_initiated_at - batch.created_at) / latency)
            return math.floor(batch.total * max(0.0, progress)), "canceled"
        if is_fated_to_expire(settings.seed, batch.ordinal, settings.expire_rate, settings.expire_ordinals):
            return expire_done_count(settings.seed, batch.ordinal, batch.total), "expired"
        return batch.total, "expired"

    async def _end(self, batch: MessageBatchRecord, at: float) -> None:
        done, unfinished = self._done_count(batch, at)
        plan = ResultsPlan(
            batch_id=batch.id,
            ordinal=batch.ordinal,
            seed=self.settings.seed,
            error_rate=self.settings.error_rate,
            done_count=done,
            unfinished=unfinished,
            requests_path=batch.requests_path,
            results_path=batch.results_path,
            cache=self.prompt_cache,
            malformed_rate=self.settings.malformed_rate,
        )
        try:
            batch.counts = await asyncio.to_thread(write_results, plan)
        except BaseException:
            batch.results_path.unlink(missing_ok=True)
            raise
        batch.status = ProcessingStatus.ENDED
        batch.ended_at = at
        batch.requests_path.unlink(missing_ok=True)
        logger.info("message batch %s ended: %s", batch.id, batch.counts)

    # ------------------------------------------------------------------ reset

    async def reset(self) -> None:
        """Forget every batch and delete their files."""
        async with self._lock:
            await asyncio.to_thread(shutil.rmtree, self._dir, True)
            self._dir.mkdir(parents=True, exist_ok=True)
            self._batches.clear()
            self._clock = 0.0
            self.prompt_cache.clear()
