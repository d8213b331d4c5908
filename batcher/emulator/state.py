"""In-memory registry of the emulator: files (kept on disk), batches, fault dice and statistics.

Batches move lazily: every API call first runs :meth:`EmulatorState.advance`, which carries out all
transitions due by ``now`` in time order (ties by creation order), so the outcome depends only on the
seed and the calls made, never on when a background task happened to wake up. Reading files and
writing results run in a worker thread; an ``asyncio.Lock`` serialises transitions.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from batcher.emulator.errors import ApiError, invalid_value, not_found
from batcher.emulator.fake_models import SUPPORTED_ENDPOINTS
from batcher.emulator.lifecycle import (
    ACTIVE,
    ALLOWED_TRANSITIONS,
    CANCELLABLE,
    TERMINAL,
    BatchStatus,
    Schedule,
    expire_done_count,
    is_fated_to_expire,
)
from batcher.emulator.objects import BatchRecord, FileRecord, batch_object, new_batch_id, new_file_id
from batcher.emulator.results import ResultPlan, request_fails, write_results
from batcher.emulator.settings import EmulatorSettings
from batcher.emulator.validation import batch_error, validate_input_file

logger = logging.getLogger(__name__)

__all__ = ["ORGANIZATION", "EmulatorState"]

ORGANIZATION = "org-emulator"
INPUT_FILE_TTL_S = 30 * 24 * 3600  # files with purpose=batch expire after 30 days by default
#: real-time answers kept for their ``Idempotency-Key`` at most; the oldest is forgotten first
MAX_KEPT_ANSWERS = 100_000


class EmulatorState:
    """Everything the emulator knows, for one app.

    Args:
        settings: Behaviour and fault knobs.
        data_dir: Directory for uploaded and generated files (created if missing).
    """

    def __init__(self, settings: EmulatorSettings, data_dir: Path) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.schedule = Schedule(settings.latency_s)
        self._files_dir = data_dir / "files"
        self._files_dir.mkdir(parents=True, exist_ok=True)
        self._lock = asyncio.Lock()
        #: called by :meth:`reset` after the registry is emptied (other APIs on the same app forget theirs)
        self.reset_hooks: list[Callable[[], Awaitable[None]]] = []
        self._init_registry()

    def _init_registry(self) -> None:
        self._files: dict[str, FileRecord] = {}
        self._batches: dict[str, BatchRecord] = {}
        self._orphans: set[Path] = set()  # deleted files still read by an active batch
        self._file_seq = 0
        self._clock = 0.0
        self._api_rng = random.Random(self.settings.seed)
        self.batches_created = 0
        self.files_uploaded = 0
        self.api_errors_injected = 0
        self.requests_by_custom_id: Counter[str] = Counter()
        self.realtime_answers = 0
        self.realtime_replays = 0
        self._answers: dict[str, tuple[str, bytes]] = {}  # Idempotency-Key -> (request fingerprint, answer)

    # ------------------------------------------------------------------ files

    def allocate_file(self) -> tuple[str, Path]:
        """A new file id and the path its content must be written to."""
        file_id = new_file_id()
        return file_id, self._files_dir / f"{file_id}.jsonl"

    def _add_file(
        self, file_id: str, path: Path, filename: str, purpose: str, size: int, now: float, expires_at: float | None
    ) -> FileRecord:
        self._file_seq += 1
        record = FileRecord(file_id, self._file_seq, filename, purpose, size, now, expires_at, path)
        self._files[file_id] = record
        return record

    def register_upload(
        self,
        file_id: str,
        path: Path,
        *,
        filename: str,
        purpose: str,
        size: int,
        now: float,
        expires_after_s: int | None,
    ) -> FileRecord:
        """Record a file whose content was written to ``path`` (from :meth:`allocate_file`)."""
        if expires_after_s is None and purpose == "batch":
            expires_after_s = INPUT_FILE_TTL_S
        expires_at = None if expires_after_s is None else now + expires_after_s
        self.files_uploaded += 1
        return self._add_file(file_id, path, filename, purpose, size, now, expires_at)

    def get_file(self, file_id: str) -> FileRecord:
        """The file with this id.

        Raises:
            ApiError: 404 if there is none.
        """
        record = self._files.get(file_id)
        if record is None:
            raise not_found(f"No such File object: {file_id}", param="id")
        return record

    def list_files(
        self, *, purpose: str | None, order: str, after: str | None, limit: int
    ) -> tuple[list[FileRecord], bool]:
        """A page of files and whether more follow."""
        records = sorted(self._files.values(), key=lambda r: r.seq, reverse=order == "desc")
        if purpose is not None:
            records = [r for r in records if r.purpose == purpose]
        return _page(records, after, limit, "No such File object")

    def delete_file(self, file_id: str) -> None:
        """Forget a file and remove it from disk once no active batch reads it.

        Raises:
            ApiError: 404 if there is no such file.
        """
        record = self.get_file(file_id)
        del self._files[file_id]
        if any(b.input_path == record.path for b in self._batches.values() if b.status in ACTIVE):
            self._orphans.add(record.path)
        else:
            record.path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ batches

    def batch_json(self, batch: BatchRecord, now: float) -> dict[str, Any]:
        """The ``Batch`` JSON of a batch as seen at ``now``."""
        return batch_object(batch, self.schedule, max(now, self._clock))

    def get_batch(self, batch_id: str) -> BatchRecord:
        """The batch with this id.

        Raises:
            ApiError: 404 if there is none.
        """
        batch = self._batches.get(batch_id)
        if batch is None:
            raise not_found(f"No batch found with id '{batch_id}'.")
        return batch

    def list_batches(self, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        """A page of batches, newest first, and whether more follow."""
        records = sorted(self._batches.values(), key=lambda b: b.ordinal, reverse=True)
        return _page(records, after, limit, "No batch found with id")

    async def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        metadata: dict[str, str] | None,
        output_expires_after_s: int | None,
        now: float,
    ) -> BatchRecord:
        """Create a batch in ``validating``; its input is checked when validation is due.

        Raises:
            ApiError: 400 if the input file is unknown or not a batch file, or the endpoint is not emulated.
        """
        async with self._lock:
            await self._advance_locked(now)
            record = self._files.get(input_file_id)
            if record is None:
                raise invalid_value("input_file_id", f"Invalid 'input_file_id': no such File object: {input_file_id}")
            if record.purpose != "batch":
                raise invalid_value(
                    "input_file_id",
                    f"Invalid 'input_file_id': file {input_file_id} has purpose '{record.purpose}'; "
                    "a batch input file must be uploaded with purpose 'batch'.",
                )
            if endpoint not in SUPPORTED_ENDPOINTS:
                raise invalid_value(
                    "endpoint",
                    f"The emulator does not support the endpoint '{endpoint}'. Emulated endpoints: "
                    + ", ".join(sorted(SUPPORTED_ENDPOINTS))
                    + ".",
                )
            self.batches_created += 1
            batch = BatchRecord(
                id=new_batch_id(),
                ordinal=self.batches_created,
                endpoint=endpoint,
                input_file_id=input_file_id,
                input_path=record.path,
                metadata=metadata,
                created_at=max(now, self._clock),
                output_expires_after_s=output_expires_after_s,
            )
            self._batches[batch.id] = batch
            logger.info("batch %s created (%s, file %s)", batch.id, endpoint, input_file_id)
            return batch

    async def cancel_batch(self, batch_id: str, now: float) -> BatchRecord:
        """Start cancelling a ``validating`` or ``in_progress`` batch; a ``cancelling`` one is returned as is.

        Raises:
            ApiError: 404 for an unknown id, 400 if the batch can no longer be cancelled.
        """
        async with self._lock:
            await self._advance_locked(now)
            batch = self.get_batch(batch_id)
            if batch.status is BatchStatus.CANCELLING:
                return batch
            if batch.status not in CANCELLABLE:
                raise ApiError(400, f"Cannot cancel a batch with status '{batch.status.value}'.")
            at = max(now, self._clock)
            if batch.status is BatchStatus.IN_PROGRESS:
                batch.cancel_progress = self.schedule.progress(batch.created_at, at)
            self._transition(batch, BatchStatus.CANCELLING)
            batch.cancelling_at = at
            logger.info("batch %s cancelling", batch.id)
            return batch

    async def advance(self, now: float) -> None:
        """Carry out every transition due by ``now``."""
        async with self._lock:
            await self._advance_locked(now)

    async def _advance_locked(self, now: float) -> None:
        self._clock = max(self._clock, now)
        while True:
            due: tuple[float, int, BatchRecord] | None = None
            for batch in self._batches.values():
                at = self._next_event(batch)
                if at is not None and at <= self._clock and (due is None or (at, batch.ordinal) < due[:2]):
                    due = (at, batch.ordinal, batch)
            if due is None:
                return
            at, _, batch = due
            try:
                await self._step(batch, at)
            except Exception as exc:  # a bug or a vanished file must not wedge every later call
                logger.exception("batch %s: internal error at %s", batch.id, batch.status.value)
                batch.status = BatchStatus.FAILED
                batch.failed_at = at
                batch.errors = [batch_error("internal_error", f"The emulator failed to process the batch: {exc}")]
                self._release_input(batch)

    def _next_event(self, batch: BatchRecord) -> float | None:
        created = batch.created_at
        if batch.status is BatchStatus.VALIDATING:
            return self.schedule.validated_at(created)
        if batch.status is BatchStatus.IN_PROGRESS:
            return self.schedule.progress_end_at(created)
        if batch.status is BatchStatus.FINALIZING:
            return self.schedule.completed_at(created)
        if batch.status is BatchStatus.CANCELLING and batch.cancelling_at is not None:
            return self.schedule.cancelled_at(batch.cancelling_at)
        return None

    @staticmethod
    def _transition(batch: BatchRecord, target: BatchStatus) -> None:
        if target not in ALLOWED_TRANSITIONS[batch.status]:
            raise RuntimeError(f"batch {batch.id}: illegal transition {batch.status.value} -> {target.value}")
        batch.status = target

    async def _step(self, batch: BatchRecord, at: float) -> None:
        settings = self.settings
        if batch.status is BatchStatus.VALIDATING:
            await self._validate(batch, at)
        elif batch.status is BatchStatus.IN_PROGRESS:
            if is_fated_to_expire(settings.seed, batch.ordinal, settings.expire_rate, settings.expire_ordinals):
                done = expire_done_count(settings.seed, batch.ordinal, batch.total)
                await self._write_results(batch, done, "batch_expired", at)
                self._transition(batch, BatchStatus.EXPIRED)
                batch.expired_at = at
            else:
                self._transition(batch, BatchStatus.FINALIZING)
                batch.finalizing_at = at
        elif batch.status is BatchStatus.FINALIZING:
            await self._write_results(batch, batch.total, "batch_expired", at)
            self._transition(batch, BatchStatus.COMPLETED)
            batch.completed_at = at
        elif batch.status is BatchStatus.CANCELLING:
            if batch.validated:
                done = int(batch.total * batch.cancel_progress)
                await self._write_results(batch, done, "batch_cancelled", at)
            self._transition(batch, BatchStatus.CANCELLED)
            batch.cancelled_at = at
        if batch.status in TERMINAL:
            self._release_input(batch)
            logger.info("batch %s %s", batch.id, batch.status.value)

    async def _validate(self, batch: BatchRecord, at: float) -> None:
        settings = self.settings
        seed, ordinal, error_rate = settings.seed, batch.ordinal, settings.error_rate
        outcome = await asyncio.to_thread(
            validate_input_file,
            batch.input_path,
            batch.endpoint,
            max_requests=settings.max_requests,
            max_bytes=settings.max_bytes,
            fails=lambda custom_id: request_fails(seed, ordinal, custom_id, error_rate),
        )
        batch.model = outcome.model
        if not outcome.errors and outcome.model is not None and settings.token_limit is not None:
            enqueued = sum(
                other.prompt_tokens
                for other in self._batches.values()
                if other is not batch and other.validated and other.status in ACTIVE and other.model == outcome.model
            )
            if enqueued + outcome.prompt_tokens > settings.token_limit:
                outcome.errors.append(
                    batch_error(
                        "token_limit_exceeded",
                        f"Enqueued token limit reached for {outcome.model} in organization {ORGANIZATION}. "
                        f"Limit: {settings.token_limit:,} enqueued tokens. "
                        "Please try again once some in_progress batches have been completed.",
                    )
                )
        if outcome.errors:
            self._transition(batch, BatchStatus.FAILED)
            batch.failed_at = at
            batch.errors = outcome.errors
            return
        self._transition(batch, BatchStatus.IN_PROGRESS)
        batch.validated = True
        batch.in_progress_at = at
        batch.total = outcome.total
        batch.expected_failures = outcome.expected_failures
        batch.prompt_tokens = outcome.prompt_tokens
        self.requests_by_custom_id.update(outcome.custom_ids)

    async def _write_results(self, batch: BatchRecord, done: int, unfinished_code: str, at: float) -> None:
        settings = self.settings
        output_id, output_path = self.allocate_file()
        error_id, error_path = self.allocate_file()
        plan = ResultPlan(
            batch_id=batch.id,
            ordinal=batch.ordinal,
            endpoint=batch.endpoint,
            seed=settings.seed,
            error_rate=settings.error_rate,
            done_count=done,
            unfinished_code=unfinished_code,
            created=int(batch.in_progress_at or at),
            input_path=batch.input_path,
            output_path=output_path,
            error_path=error_path,
            malformed_rate=settings.malformed_rate,
        )
        try:
            summary = await asyncio.to_thread(write_results, plan)
        except BaseException:
            output_path.unlink(missing_ok=True)
            error_path.unlink(missing_ok=True)
            raise
        batch.completed, batch.failed = summary.completed, summary.failed
        batch.usage = summary.usage
        batch.results_written = True
        expires_at = None if batch.output_expires_after_s is None else at + batch.output_expires_after_s
        for file_id, path, lines, kind in (
            (output_id, output_path, summary.completed, "output"),
            (error_id, error_path, summary.errored, "error"),
        ):
            if lines == 0:
                path.unlink(missing_ok=True)
                continue
            size = path.stat().st_size
            self._add_file(file_id, path, f"{batch.id}_{kind}.jsonl", "batch_output", size, at, expires_at)
            if kind == "output":
                batch.output_file_id = file_id
            else:
                batch.error_file_id = file_id

    def _release_input(self, batch: BatchRecord) -> None:
        path = batch.input_path
        if path in self._orphans and not any(
            b.input_path == path for b in self._batches.values() if b.status in ACTIVE
        ):
            self._orphans.discard(path)
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ faults

    def draw_api_fault_kind(self, default_cycle: tuple[str, ...]) -> str | None:
        """Roll the ``api_error_rate`` dice for one HTTP call: the kind of fault to inject, or ``None``.

        Injected faults take turns through ``api_error_kinds`` (``default_cycle``, the API's own, when empty).
        """
        rate = self.settings.api_error_rate
        if rate <= 0 or self._api_rng.random() >= rate:
            return None
        self.api_errors_injected += 1
        cycle = tuple(self.settings.api_error_kinds) or default_cycle
        return cycle[(self.api_errors_injected - 1) % len(cycle)]

    # ------------------------------------------------------------------ real-time answers

    def stored_answer(self, key: str, fingerprint: str) -> bytes | None:
        """The real-time answer kept under an ``Idempotency-Key``, counted as a replay; ``None`` if none is kept.

        Raises:
            ValueError: the key was first sent with another request (``fingerprint`` differs).
        """
        stored = self._answers.get(key)
        if stored is None:
            return None
        if stored[0] != fingerprint:
            raise ValueError(
                f"Idempotency-Key {key!r} was already used with another request; use a new key for a new request."
            )
        self.realtime_replays += 1
        return stored[1]

    def store_answer(self, key: str | None, fingerprint: str, answer: bytes) -> None:
        """Count a real-time answer and keep it under its ``Idempotency-Key``, if it came with one."""
        self.realtime_answers += 1
        if key is None:
            return
        self._answers[key] = (fingerprint, answer)
        if len(self._answers) > MAX_KEPT_ANSWERS:
            del self._answers[next(iter(self._answers))]  # the oldest: dicts keep insertion order

    # ------------------------------------------------------------------ stats, reset

    def stats(self) -> dict[str, Any]:
        """Counters for tests and demos."""
        return {
            "batches_created": self.batches_created,
            "files_uploaded": self.files_uploaded,
            "requests_by_custom_id": dict(self.requests_by_custom_id),
            "api_errors_injected": self.api_errors_injected,
            "realtime_answers": self.realtime_answers,
            "realtime_replays": self.realtime_replays,
        }

    async def reset(self) -> None:
        """Forget every file and batch and delete their data; the fault dice start over."""
        async with self._lock:
            await asyncio.to_thread(shutil.rmtree, self._files_dir, True)
            self._files_dir.mkdir(parents=True, exist_ok=True)
            self._init_registry()
        for hook in self.reset_hooks:
            await hook()
        logger.info("emulator state reset")


_Record = TypeVar("_Record", FileRecord, BatchRecord)


def _page(records: list[_Record], after: str | None, limit: int, missing: str) -> tuple[list[_Record], bool]:
    start = 0
    if after is not None:
        for index, record in enumerate(records):
            if record.id == after:
                start = index + 1
                break
        else:
            raise invalid_value("after", f"Invalid 'after': {missing} '{after}'.")
    page = records[start : start + limit]
    return page, start + limit < len(records)
