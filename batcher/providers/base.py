"""What every provider adapter provides, and the normalized shapes it answers with.

The lifecycle (``batcher.lifecycle``) drives adapters only through :class:`ProviderAdapter`; the batch
file is written by the packer as a stream of lines produced by :meth:`ProviderAdapter.encode_line`.
Adapters translate SDK and HTTP errors into :class:`batcher.errors.ProviderError` where they enter.
"""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from batcher.domain import BatchState, Provider


@dataclass(frozen=True)
class Limits:
    """A provider's batch limits.

    Attributes:
        max_requests: requests per batch.
        max_bytes: bytes of the batch input (file or inline body) per batch.
        one_model_per_batch: the provider refuses a batch that mixes models.
        endpoints: the request urls (``/v1/chat/completions``…) the batch API accepts.
        custom_id_pattern: what a custom_id must match at the provider (``None``: anything).
        max_line_bytes: the largest single request line the provider accepts.
        max_inputs: embedding inputs per batch, summed over its requests (``None``: no such cap).
    """

    max_requests: int
    max_bytes: int
    one_model_per_batch: bool
    endpoints: frozenset[str]
    custom_id_pattern: re.Pattern[str] | None = None
    max_line_bytes: int | None = None
    max_inputs: int | None = None


class OutcomeKind(str, Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Outcome:
    """The normalized result of one request, keyed by the custom_id batcher sent (the job id).

    Attributes:
        custom_id: batcher's custom_id (the job id), never the user's.
        kind: what happened.
        body: the provider's response body as JSON text (succeeded; also kept for HTTP-level failures).
        usage: the usage object as the provider reported it (``None`` when it reported none).
        error_code: the provider's error code or type (failed).
        error_message: the provider's message (failed).
        retryable: whether sending it again may succeed (rate limit, server error, overload, timeout).
        status_code: the HTTP status the provider recorded for the request, when it has one.
    """

    custom_id: str
    kind: OutcomeKind
    body: str | None = None
    usage: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    retryable: bool = False
    status_code: int | None = None


@dataclass(frozen=True)
class RequestCounts:
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    expired: int = 0
    cancelled: int = 0


@dataclass(frozen=True)
class UploadedFile:
    """A batch input file held by the provider (recovery deletes the ones no batch uses).

    Attributes:
        file_id: the provider's id.
        filename: the name it was uploaded under (batcher's are ``batcher-<batch id>.jsonl``).
        created_at: when it was uploaded (aware, UTC).
    """

    file_id: str
    filename: str
    created_at: datetime


@dataclass(frozen=True)
class BatchStatus:
    """A provider batch as last seen, normalized.

    Attributes:
        provider_batch_id: the provider's id.
        state: the provider status mapped onto :class:`BatchState` (``ended`` for a normal finish).
        provider_state: the provider's own word.
        counts: request counts as the provider reports them.
        output_file_id: where successful results are (OpenAI-style providers).
        error_file_id: where failed results are.
        results_ref: an opaque handle results are streamed from (e.g. Anthropic's results_url).
        errors: the provider's batch-level errors (each ``{"code", "message", "line", "param"}``).
        token_limit_exceeded: the batch failed because the provider's enqueued-token cap was hit; its
            jobs are not at fault and go back to the queue.
        raw: the provider's object, JSON-able, for ``batcher batch ID``.
    """

    provider_batch_id: str
    state: BatchState
    provider_state: str
    counts: RequestCounts = field(default_factory=RequestCounts)
    output_file_id: str | None = None
    error_file_id: str | None = None
    results_ref: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    token_limit_exceeded: bool = False
    raw: dict[str, Any] = field(default_factory=dict)


class ProviderAdapter(abc.ABC):
    """One configured provider account.

    Args:
        account: the account's name (``openai``, ``groq``, ``openai-org2``…); the packer groups by it.
    """

    kind: Provider

    def __init__(self, account: str, limits: Limits) -> None:
        self.account = account
        self.limits = limits

    @abc.abstractmethod
    def encode_line(self, custom_id: str, endpoint: str, body_json: str) -> bytes:
        """One request as a line of the provider's batch input, ``\\n``-terminated.

        ``body_json`` is the stored provider-native body, spliced in as given (never re-parsed).
        """

    @abc.abstractmethod
    async def upload(self, path: Path) -> str | None:
        """Upload the batch input file at ``path``; the file id, or ``None`` where the API takes inline input."""

    @abc.abstractmethod
    async def create(
        self, *, batch_id: str, endpoint: str, model: str, input_file_id: str | None, path: Path
    ) -> BatchStatus:
        """Create the provider batch. ``batch_id`` (ours) travels in its metadata where the API allows."""

    @abc.abstractmethod
    async def retrieve(self, provider_batch_id: str) -> BatchStatus:
        """The batch's current status."""

    @abc.abstractmethod
    def results(self, status: BatchStatus) -> AsyncIterator[Outcome]:
        """Stream every per-request outcome of an ended batch (output and error files), line by line."""

    @abc.abstractmethod
    async def cancel(self, provider_batch_id: str) -> BatchStatus:
        """Ask the provider to cancel; returns the status right after."""

    @abc.abstractmethod
    async def find_batch(self, batch_id: str) -> BatchStatus | None:
        """Recovery: the provider batch created for our ``batch_id`` whose id was never recorded, if any."""

    async def find_batch_candidates(self, created_after: datetime, request_count: int) -> list[BatchStatus]:
        """Recovery where batches carry no metadata: batches created at or after ``created_after`` holding exactly
        ``request_count`` requests, newest first.

        The default answers none: an API whose batches carry our id is asked :meth:`find_batch` instead.
        """
        return []

    async def recent_batches(self) -> list[tuple[str | None, BatchStatus]]:
        """Recovery: the account's most recent provider batches, each with the batcher batch id its metadata
        carries (``None`` when it carries none). The default answers none (batches without metadata).
        """
        return []

    async def list_uploads(self) -> list[UploadedFile]:
        """Recovery: batch input files uploaded to the account. The default answers none (inline input)."""
        return []

    @abc.abstractmethod
    async def delete_file(self, file_id: str) -> None:
        """Delete an uploaded file (unused input after a crash). Missing files are not an error."""

    @abc.abstractmethod
    async def run_realtime(
        self, custom_id: str, endpoint: str, body_json: str, *, attempt: int | None = None
    ) -> Outcome:
        """Send one request to the real-time API (deadline fallback).

        ``attempt`` (the job's attempt number) makes the call idempotent where the API honours an
        ``Idempotency-Key``: every send of one attempt carries the same key.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release the adapter's HTTP client."""
