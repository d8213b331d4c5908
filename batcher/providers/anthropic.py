"""The Anthropic Message Batches adapter.

Message Batches take their requests inline: there is no upload. The packer still writes the batch as a JSONL file
of ``{"custom_id", "params"}`` lines (:meth:`AnthropicAdapter.encode_line`); :meth:`AnthropicAdapter.create` streams
that file as the create body ``{"requests": [line, line, …]}`` with a known ``Content-Length``, so 100,000 requests
are never parsed into Python objects. Results are a JSONL stream read line by line.

The pure pieces — :func:`batch_status_from_anthropic`, :func:`parse_result_line`, :func:`is_retryable_error_type`,
:func:`translate_error`, :func:`measure_requests_body` — carry the normalization and are tested without sockets.

Recovery: Message Batches carry no metadata, so a batch cannot be found by our batch id. The lifecycle records
the provider id as soon as create returns; :meth:`AnthropicAdapter.find_batch` only answers ``None``, and
:meth:`AnthropicAdapter.find_batch_candidates` lists batches created after a time with a given request count for
matching by creation time and size.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import anthropic
import httpx2
import orjson
from anthropic import AsyncAnthropic, DefaultAioHttpClient
from anthropic.types.messages import MessageBatch

from batcher.domain import BatchState, Provider
from batcher.errors import ProviderError
from batcher.providers.base import BatchStatus, Limits, Outcome, OutcomeKind, RequestCounts
from batcher.providers.limits import ANTHROPIC_ENDPOINT, ANTHROPIC_LIMITS
from batcher.providers.sdk import SNIPPET_CHARS, Sdk, SdkAdapter, is_retryable_status, refused_outcome, str_or_none

logger = logging.getLogger(__name__)

__all__ = [
    "ANTHROPIC_LIMITS",
    "FIND_BATCH_SCAN_LIMIT",
    "NON_RETRYABLE_ERROR_TYPES",
    "RETRYABLE_ERROR_TYPES",
    "AnthropicAdapter",
    "JsonlRequestsBody",
    "batch_status_from_anthropic",
    "is_retryable_error_type",
    "measure_requests_body",
    "parse_result_line",
    "realtime_error_outcome",
    "translate_error",
]

#: :meth:`AnthropicAdapter.find_batch_candidates` looks at this many of the most recent batches, no more
FIND_BATCH_SCAN_LIMIT = 1000

#: error types of a request that may succeed when sent again
RETRYABLE_ERROR_TYPES = frozenset({"rate_limit_error", "overloaded_error", "api_error", "timeout_error"})
#: error types that will fail again: the request or the account is at fault
NON_RETRYABLE_ERROR_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "billing_error",
        "not_found_error",
        "request_too_large",
    }
)

_STATUS_MAP: dict[str, BatchState] = {
    "in_progress": BatchState.IN_PROGRESS,
    "canceling": BatchState.CANCELLING,
    "ended": BatchState.ENDED,
}

_BODY_PREFIX = b'{"requests":['
_BODY_SUFFIX = b"]}"
_READ_BYTES = 1024 * 1024


def is_retryable_error_type(error_type: str | None) -> bool:
    """Whether a request that failed with this Anthropic error type may succeed when sent again.

    ``rate_limit_error``, ``overloaded_error``, ``api_error`` and ``timeout_error`` are; every other type
    (:data:`NON_RETRYABLE_ERROR_TYPES`, and types this code does not know) is not.
    """
    return error_type in RETRYABLE_ERROR_TYPES


# ---------------------------------------------------------------------------- result lines


def parse_result_line(raw: bytes | str) -> Outcome | None:
    """Normalize one line of a Message Batch's results.

    ``succeeded`` → SUCCEEDED with the Message as ``body`` and its ``usage``; ``errored`` → FAILED with the error
    type as ``error_code`` (retryable per :func:`is_retryable_error_type`) and the error response as ``body``;
    ``canceled`` → CANCELLED; ``expired`` → EXPIRED (retryable).

    Args:
        raw: the line, with or without its newline.

    Returns:
        The outcome, or ``None`` when the line is not a result (not JSON, no ``custom_id``, or a ``result`` of
        unknown type). Such lines are logged; the caller skips them and the job, having no result, is missing.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        obj = None
    custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
    result = obj.get("result") if isinstance(obj, dict) else None
    kind = result.get("type") if isinstance(result, dict) else None
    if not isinstance(custom_id, str) or not custom_id or not isinstance(result, dict):
        logger.warning("skipping malformed batch result line: %.*r", SNIPPET_CHARS, raw)
        return None

    if kind == "succeeded":
        message = result.get("message")
        if not isinstance(message, dict):
            logger.warning("skipping succeeded result without a message: %.*r", SNIPPET_CHARS, raw)
            return None
        usage = message.get("usage")
        return Outcome(
            custom_id=custom_id,
            kind=OutcomeKind.SUCCEEDED,
            body=orjson.dumps(message).decode(),
            usage=usage if isinstance(usage, dict) else None,
        )
    if kind == "errored":
        response = result.get("error")
        inner = response.get("error") if isinstance(response, dict) else None
        inner = inner if isinstance(inner, dict) else {}
        error_type = str_or_none(inner.get("type"))
        return Outcome(
            custom_id=custom_id,
            kind=OutcomeKind.FAILED,
            body=orjson.dumps(response).decode() if response is not None else None,
            error_code=error_type,
            error_message=str_or_none(inner.get("message")),
            retryable=is_retryable_error_type(error_type),
        )
    if kind == "canceled":
        return Outcome(custom_id, OutcomeKind.CANCELLED, error_code="canceled")
    if kind == "expired":
        return Outcome(custom_id, OutcomeKind.EXPIRED, error_code="expired", retryable=True)
    logger.warning("skipping batch result line of unknown type %r: %.*r", kind, SNIPPET_CHARS, raw)
    return None


# ---------------------------------------------------------------------------- batch status


def batch_status_from_anthropic(batch: MessageBatch) -> BatchStatus:
    """Map the SDK's :class:`MessageBatch` onto :class:`BatchStatus`.

    ``in_progress`` → IN_PROGRESS, ``canceling`` → CANCELLING, ``ended`` → ENDED, or CANCELLED when a cancel was
    initiated before it ended. An unknown status (a newer API than this code) maps to IN_PROGRESS so the batch
    keeps being polled. ``results_ref`` is the batch id once results can be fetched (``results_url`` is in
    ``raw``; results are streamed by id).
    """
    status = batch.processing_status
    state = _STATUS_MAP.get(status)
    if state is None:
        logger.warning("unknown Anthropic processing_status %r for %s; treating it as in_progress", status, batch.id)
        state = BatchState.IN_PROGRESS
    if state is BatchState.ENDED and batch.cancel_initiated_at is not None:
        state = BatchState.CANCELLED
    rc = batch.request_counts
    counts = RequestCounts(
        total=rc.processing + rc.succeeded + rc.errored + rc.canceled + rc.expired,
        succeeded=rc.succeeded,
        failed=rc.errored,
        expired=rc.expired,
        cancelled=rc.canceled,
    )
    return BatchStatus(
        provider_batch_id=batch.id,
        state=state,
        provider_state=status,
        counts=counts,
        results_ref=batch.id if batch.results_url else None,
        raw=batch.model_dump(mode="json"),
    )


# ---------------------------------------------------------------------------- errors


def realtime_error_outcome(custom_id: str, exc: anthropic.APIStatusError) -> Outcome:
    """The FAILED outcome of a real-time request the API refused for its content (a non-retryable 4xx)."""
    return refused_outcome(
        custom_id,
        exc,
        error_code=exc.type,
        error_message=exc.api_message or exc.message,
        retryable=is_retryable_status(exc.status_code) or is_retryable_error_type(exc.type),
    )


def _status_detail(exc: anthropic.APIStatusError) -> str:
    kind = f" {exc.type}" if exc.type else ""
    return f"{kind}: {exc.api_message or exc.message}"


ANTHROPIC_SDK: Sdk[AsyncAnthropic, anthropic.APIStatusError] = Sdk(
    name="Anthropic",
    client=AsyncAnthropic,
    http_client=DefaultAioHttpClient,
    base_error=anthropic.AnthropicError,
    status_error=anthropic.APIStatusError,
    connection_error=anthropic.APIConnectionError,
    timeout_error=anthropic.APITimeoutError,
    status_detail=_status_detail,
    account_statuses=frozenset({401, 402, 403}),
    refused_outcome=realtime_error_outcome,
)


def translate_error(exc: Exception, *, provider: str, action: str) -> ProviderError:
    """Turn an Anthropic SDK or transport error into :class:`ProviderError` (see :meth:`Sdk.translate`)."""
    return ANTHROPIC_SDK.translate(exc, provider=provider, action=action)


# ---------------------------------------------------------------------------- the create body


def _body_lines(data: bytes) -> list[bytes]:
    return [stripped for line in data.split(b"\n") if (stripped := line.strip())]


def measure_requests_body(path: Path) -> tuple[int, int]:
    """Requests in a JSONL batch file and the size in bytes of the create body built from it.

    The body is ``{"requests":[`` + the non-blank lines, stripped, joined by ``,`` + ``]}``, exactly what
    :class:`JsonlRequestsBody` sends. Synchronous: run it in a thread.
    """
    count = size = 0
    with path.open("rb") as fh:
        for line in fh:
            stripped = line.strip()
            if stripped:
                count += 1
                size += len(stripped)
    return count, len(_BODY_PREFIX) + size + max(count - 1, 0) + len(_BODY_SUFFIX)


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(size)


class JsonlRequestsBody:
    """The create body ``{"requests": [...]}`` streamed from a JSONL file of request lines.

    An async iterable of bytes that can be iterated more than once, so the SDK can send it again on a retry. The
    file is read in pieces of ``chunk_bytes`` in a worker thread and never held whole; no file stays open between
    pieces, so an abandoned send leaks nothing.

    Args:
        path: The JSONL file, one ``{"custom_id", "params"}`` object per line.
        chunk_bytes: How much of the file to read at a time.
    """

    def __init__(self, path: Path, chunk_bytes: int = _READ_BYTES) -> None:
        self.path = path
        self.chunk_bytes = chunk_bytes

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield _BODY_PREFIX
        offset = 0
        carry = b""
        first = True
        while True:
            chunk = await asyncio.to_thread(_read_at, self.path, offset, self.chunk_bytes)
            if not chunk:
                break
            offset += len(chunk)
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            lines = _body_lines(data[:cut])
            if lines:
                yield (b"" if first else b",") + b",".join(lines)
                first = False
        lines = _body_lines(carry)
        if lines:
            yield (b"" if first else b",") + b",".join(lines)
        yield _BODY_SUFFIX


# ---------------------------------------------------------------------------- the adapter


class AnthropicAdapter(SdkAdapter[AsyncAnthropic, anthropic.APIStatusError]):
    """An Anthropic account, driven through the official SDK over aiohttp.

    The SDK client is created on first use and released by :meth:`aclose`.

    Args:
        account: the account's name.
        api_key: the API key (``None`` lets the SDK fall back to ``ANTHROPIC_API_KEY``). Never logged.
        base_url: the API root, e.g. ``https://api.anthropic.com`` (``None``: the SDK's default). The SDK's
            paths start with ``/v1``, so a trailing ``/v1`` here (an OpenAI-style base URL, as the emulator
            hands out) is dropped.
        limits: the account's batch limits (default :data:`ANTHROPIC_LIMITS`).
        max_retries: the SDK's own retries of 408/409/429/5xx and connection errors per call.
        timeout_s: the SDK's per-request timeout in seconds.
        http_client: the ``httpx2.AsyncClient`` to use instead of ``DefaultAioHttpClient()`` (tests pass one
            with an ``httpx2.MockTransport``); the adapter closes it in :meth:`aclose`.

    Attributes:
        malformed_lines: result lines skipped because they could not be read (see :func:`parse_result_line`).
    """

    kind = Provider.ANTHROPIC

    def __init__(
        self,
        account: str = "anthropic",
        *,
        api_key: str | None,
        base_url: str | None,
        limits: Limits | None = None,
        max_retries: int = 2,
        timeout_s: float = 60,
        http_client: httpx2.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            account,
            limits or ANTHROPIC_LIMITS,
            sdk=ANTHROPIC_SDK,
            api_key=api_key,
            base_url=base_url.rstrip("/").removesuffix("/v1") if base_url else base_url,
            max_retries=max_retries,
            timeout_s=timeout_s,
            http_client=http_client,
        )

    def encode_line(self, custom_id: str, endpoint: str, body_json: str) -> bytes:
        """``{"custom_id", "params"}`` and a newline; ``body_json`` (the Messages params) is spliced as-is.

        ``endpoint`` is not part of the line: Message Batches only run ``/v1/messages``.
        """
        return orjson.dumps(
            {"custom_id": custom_id, "params": orjson.Fragment(body_json)}, option=orjson.OPT_APPEND_NEWLINE
        )

    async def upload(self, path: Path) -> None:
        """Nothing to do: Message Batches take their requests inline (see :meth:`create`)."""
        return None

    async def create(
        self, *, batch_id: str, endpoint: str, model: str, input_file_id: str | None, path: Path
    ) -> BatchStatus:
        """Create a Message Batch from the JSONL file at ``path``, streamed as the request body.

        The batch carries no trace of ``batch_id`` (the API has no metadata); record the returned id at once.

        Raises:
            ProviderError: the file has no requests or exceeds the account's limits (not retryable), or the
                provider refused or could not be reached.
        """
        if endpoint != ANTHROPIC_ENDPOINT:
            raise ProviderError(
                f"{self.account}: Message Batches run {ANTHROPIC_ENDPOINT} only, not {endpoint}",
                provider=self.account,
                retryable=False,
            )
        count, size = await asyncio.to_thread(measure_requests_body, path)
        problem = None
        if count == 0:
            problem = "it holds no requests"
        elif count > self.limits.max_requests:
            problem = f"{count} requests exceed the limit of {self.limits.max_requests}"
        elif size > self.limits.max_bytes:
            problem = f"its {size} bytes exceed the limit of {self.limits.max_bytes}"
        if problem is not None:
            raise ProviderError(
                f"{self.account}: cannot create a batch for {batch_id} from {path.name}: {problem}",
                provider=self.account,
                retryable=False,
            )
        async with self._translating(f"create batch {batch_id}"):
            batch = await self._client().post(
                "/v1/messages/batches",
                cast_to=MessageBatch,
                content=JsonlRequestsBody(path),
                options={"headers": {"Content-Type": "application/json", "Content-Length": str(size)}},
            )
        logger.info(
            "%s: created provider batch %s for %s (%d requests, %d bytes, %s)",
            self.account,
            batch.id,
            batch_id,
            count,
            size,
            model,
        )
        return batch_status_from_anthropic(batch)

    async def retrieve(self, provider_batch_id: str) -> BatchStatus:
        """The batch's status now.

        Raises:
            ProviderError: the call failed (404 is not retryable).
        """
        async with self._translating(f"retrieve {provider_batch_id}"):
            batch = await self._client().messages.batches.retrieve(provider_batch_id)
        return batch_status_from_anthropic(batch)

    async def cancel(self, provider_batch_id: str) -> BatchStatus:
        """Ask for cancellation; the batch answers ``canceling`` and ends with its unfinished requests canceled.

        Raises:
            ProviderError: the call failed.
        """
        async with self._translating(f"cancel {provider_batch_id}"):
            batch = await self._client().messages.batches.cancel(provider_batch_id)
        return batch_status_from_anthropic(batch)

    def results(self, status: BatchStatus) -> AsyncIterator[Outcome]:
        """Stream the outcomes of an ended batch, one results line at a time.

        The lines are read raw rather than through the SDK's JSONL decoder, which stops at the first line it
        cannot parse: unreadable lines are logged, counted in :attr:`malformed_lines` and skipped. Close the
        iterator (``contextlib.aclosing``) if you stop early, so the HTTP response is released.

        Raises:
            ProviderError: the results could not be fetched (e.g. the batch has not ended) or the stream broke.
        """
        batch_id = status.provider_batch_id
        return self._outcomes(
            lambda: self._client().messages.batches.with_streaming_response.results(batch_id),
            parse_result_line,
            f"download results of {batch_id}",
        )

    async def find_batch(self, batch_id: str) -> BatchStatus | None:
        """Always ``None``: Message Batches carry no metadata, so none can be tied to ``batch_id``.

        The lifecycle records the provider id right after :meth:`create`; a crash in between is recovered by
        matching creation time and request count (:meth:`find_batch_candidates`), which needs more than an id.
        """
        logger.debug(
            "%s: Message Batches carry no metadata; cannot find the provider batch of %s", self.account, batch_id
        )
        return None

    async def find_batch_candidates(
        self, created_after: datetime, request_count: int, *, scan_limit: int = FIND_BATCH_SCAN_LIMIT
    ) -> list[BatchStatus]:
        """Batches created at or after ``created_after`` that hold exactly ``request_count`` requests.

        Batches are listed newest first, so the scan stops at the first older one (or after ``scan_limit``).

        Args:
            created_after: an aware datetime, e.g. just before our create call.
            request_count: the number of requests our batch file held.
            scan_limit: the most batches to look at.

        Raises:
            ProviderError: listing failed.
        """
        found: list[BatchStatus] = []
        seen = 0
        async with self._translating("list batches"):
            async for batch in self._client().messages.batches.list(limit=100):
                if batch.created_at < created_after or seen >= scan_limit:
                    break
                seen += 1
                status = batch_status_from_anthropic(batch)
                if status.counts.total == request_count:
                    found.append(status)
        return found

    async def delete_file(self, file_id: str) -> None:
        """Nothing to do: no files are uploaded."""
        return None

    async def _send_realtime(self, endpoint: str, content: bytes, headers: dict[str, str]) -> bytes:
        return await self._client().post(endpoint, cast_to=bytes, content=content, options={"headers": headers})
