"""Records the emulator keeps for files and batches, and their OpenAI JSON form.

Absent values are sent as explicit ``null`` as OpenAI does (its API reference types them
"optional ... or null", and its own examples show ``"output_file_id": null``).
"""

from __future__ import annotations

import logging
import math
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batcher.emulator.fake_models import TokenUsage
from batcher.emulator.lifecycle import BatchStatus, Schedule

logger = logging.getLogger(__name__)

__all__ = ["BatchRecord", "FileRecord", "batch_object", "file_object", "new_batch_id", "new_file_id"]

_ALPHABET = string.ascii_letters + string.digits
COMPLETION_WINDOW_S = 24 * 3600


def new_file_id() -> str:
    """A fresh id shaped like OpenAI's (``file-`` and 22 alphanumerics)."""
    return "file-" + "".join(secrets.choice(_ALPHABET) for _ in range(22))


def new_batch_id() -> str:
    """A fresh id shaped like OpenAI's (``batch_`` and 32 hex digits)."""
    return "batch_" + secrets.token_hex(16)


@dataclass(slots=True)
class FileRecord:
    """An uploaded or generated file, kept on disk at ``path``."""

    id: str
    seq: int
    filename: str
    purpose: str
    bytes: int
    created_at: float
    expires_at: float | None
    path: Path


@dataclass(slots=True)
class BatchRecord:
    """A batch and everything needed to move it along its schedule."""

    id: str
    ordinal: int
    endpoint: str
    input_file_id: str
    input_path: Path
    metadata: dict[str, str] | None
    created_at: float
    output_expires_after_s: int | None = None
    status: BatchStatus = BatchStatus.VALIDATING
    validated: bool = False
    model: str | None = None
    errors: list[dict[str, Any]] | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    cancel_progress: float = 0.0
    total: int = 0
    completed: int = 0
    failed: int = 0
    expected_failures: int = 0
    prompt_tokens: int = 0
    usage: TokenUsage = field(default_factory=TokenUsage)
    results_written: bool = False
    output_file_id: str | None = None
    error_file_id: str | None = None


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


def file_object(record: FileRecord) -> dict[str, Any]:
    """The ``OpenAIFile`` JSON of a file."""
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": int(record.created_at),
        "expires_at": _ts(record.expires_at),
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
    }


def _request_counts(batch: BatchRecord, schedule: Schedule, now: float) -> dict[str, int]:
    """Counts as a client would see them; running batches show progress pro rata."""
    if batch.results_written or not batch.validated:
        return {"total": batch.total, "completed": batch.completed, "failed": batch.failed}
    if batch.status is BatchStatus.IN_PROGRESS:
        progress = schedule.progress(batch.created_at, now)
    elif batch.status is BatchStatus.CANCELLING:
        progress = batch.cancel_progress
    else:
        progress = 1.0
    expected_ok = batch.total - batch.expected_failures
    return {
        "total": batch.total,
        "completed": math.floor(expected_ok * progress),
        "failed": math.floor(batch.expected_failures * progress),
    }


def batch_object(batch: BatchRecord, schedule: Schedule, now: float) -> dict[str, Any]:
    """The ``Batch`` JSON of a batch as seen at ``now``."""
    usage = batch.usage
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": None if batch.errors is None else {"object": "list", "data": batch.errors},
        "input_file_id": batch.input_file_id,
        "completion_window": "24h",
        "status": batch.status.value,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": int(batch.created_at),
        "in_progress_at": _ts(batch.in_progress_at),
        "expires_at": int(batch.created_at) + COMPLETION_WINDOW_S,
        "finalizing_at": _ts(batch.finalizing_at),
        "completed_at": _ts(batch.completed_at),
        "failed_at": _ts(batch.failed_at),
        "expired_at": _ts(batch.expired_at),
        "cancelling_at": _ts(batch.cancelling_at),
        "cancelled_at": _ts(batch.cancelled_at),
        "request_counts": _request_counts(batch, schedule, now),
        "usage": {
            "input_tokens": usage.input_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.total_tokens,
        },
        "metadata": batch.metadata,
    }
