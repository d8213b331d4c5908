"""The OpenAI Batch API adapter (and any OpenAI-compatible host reached through ``base_url``).

Upload a JSONL file (``purpose=batch``), create a batch with our id in its metadata, poll it, then stream the
output and error files line by line. The pure pieces — :func:`parse_result_line`, :func:`batch_status_from_openai`,
:func:`translate_error` — carry the normalization and are tested without sockets.

Result lines fail in two shapes (openai/openai-openapi #302): a top-level ``error`` with ``response: null``
(non-HTTP failures, e.g. ``batch_expired``), or ``error: null`` with a non-200 ``response.status_code`` and the
real error in ``response.body.error``. Both are read.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx2
import openai
import orjson
from openai import AsyncOpenAI, DefaultAioHttpClient
from openai.types import Batch

from batcher.domain import BatchState, Provider
from batcher.errors import ProviderError
from batcher.providers.base import (
    BatchStatus,
    Limits,
    Outcome,
    OutcomeKind,
    ProviderAdapter,
    RequestCounts,
    UploadedFile,
)
from batcher.providers.limits import OPENAI_LIMITS

logger = logging.getLogger(__name__)

__all__ = [
    "FIND_BATCH_SCAN_LIMIT",
    "METADATA_KEY",
    "OPENAI_LIMITS",
    "UPLOAD_SCAN_LIMIT",
    "OpenAIAdapter",
    "batch_status_from_openai",
    "parse_result_line",
    "parse_retry_after",
    "realtime_error_outcome",
    "realtime_success_outcome",
    "translate_error",
]

#: the metadata key that carries batcher's batch id to the provider (recovery finds batches by it)
METADATA_KEY = "batcher_batch_id"

#: :meth:`OpenAIAdapter.find_batch` looks at this many of the most recent batches, no more
FIND_BATCH_SCAN_LIMIT = 1000

#: :meth:`OpenAIAdapter.list_uploads` lists at most this many files
UPLOAD_SCAN_LIMIT = 10_000

_STATUS_MAP: dict[str, BatchState] = {
    "validating": BatchState.VALIDATING,
    "in_progress": BatchState.IN_PROGRESS,
    "finalizing": BatchState.FINALIZING,
    "completed": BatchState.ENDED,
    "failed": BatchState.FAILED,
    "expired": BatchState.EXPIRED,
    "cancelling": BatchState.CANCELLING,
    "cancelled": BatchState.CANCELLED,
}

#: error codes or types of a request that may succeed when sent again
_RETRYABLE_CODES = frozenset(
    {
        "rate_limit_exceeded",
        "server_error",
        "timeout",
        "internal_error",
        "service_unavailable",
        "overloaded",
        "engine_overloaded",
    }
)
_EXPIRED_CODES = frozenset({"batch_expired"})
_CANCELLED_CODES = frozenset({"batch_cancelled", "cancelled"})
_TOKEN_LIMIT_CODE = "token_limit_exceeded"

# Provider messages may echo a (masked) key; never let one reach a log or an error message.
_KEY_RE = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{4})[A-Za-z0-9_\-*]+")

_SNIPPET_CHARS = 200


def _redact(text: str) -> str:
    return _KEY_RE.sub(r"\1…", text)


def _is_retryable(status_code: int | None, *codes: str | None) -> bool:
    if status_code is not None and (status_code in (408, 409, 429) or status_code >= 500):
        return True
    return any(code in _RETRYABLE_CODES for code in codes if code)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def parse_result_line(raw: bytes | str) -> Outcome | None:
    """Normalize one line of an OpenAI batch output or error file.

    Args:
        raw: the line, with or without its newline.

    Returns:
        The outcome, or ``None`` when the line is not a result (not JSON, not an object, no ``custom_id``, or
        neither a response nor an error). Such lines are logged; the caller skips them and the job, having no
        result, is treated as missing.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        obj = None
    custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or not isinstance(custom_id, str) or not custom_id:
        logger.warning("skipping malformed batch result line: %.*r", _SNIPPET_CHARS, raw)
        return None

    response = obj.get("response")
    response = response if isinstance(response, dict) else None
    error = obj.get("error")
    error = error if isinstance(error, dict) else None
    status_code = response.get("status_code") if response is not None else None
    status_code = status_code if isinstance(status_code, int) and not isinstance(status_code, bool) else None
    body = response.get("body") if response is not None else None

    if error is None and status_code is not None and 200 <= status_code < 300:
        usage = body.get("usage") if isinstance(body, dict) else None
        return Outcome(
            custom_id=custom_id,
            kind=OutcomeKind.SUCCEEDED,
            body=orjson.dumps(body).decode(),
            usage=usage if isinstance(usage, dict) else None,
            status_code=status_code,
        )

    if error is not None:
        # Non-HTTP failure: expiry, cancellation, or an error the batch runner recorded itself.
        code = _str_or_none(error.get("code"))
        message = _str_or_none(error.get("message"))
        if code in _EXPIRED_CODES:
            return Outcome(custom_id, OutcomeKind.EXPIRED, error_code=code, error_message=message, retryable=True)
        if code in _CANCELLED_CODES:
            return Outcome(custom_id, OutcomeKind.CANCELLED, error_code=code, error_message=message)
        return Outcome(
            custom_id=custom_id,
            kind=OutcomeKind.FAILED,
            body=orjson.dumps(body).decode() if body is not None else None,
            error_code=code,
            error_message=message,
            retryable=_is_retryable(status_code, code),
            status_code=status_code,
        )

    if status_code is None:
        logger.warning("skipping batch result line with neither response nor error: %.*r", _SNIPPET_CHARS, raw)
        return None

    # HTTP-level failure: error is null, the real error is inside the response body.
    inner = body.get("error") if isinstance(body, dict) else None
    inner = inner if isinstance(inner, dict) else {}
    code = _str_or_none(inner.get("code"))
    type_ = _str_or_none(inner.get("type"))
    return Outcome(
        custom_id=custom_id,
        kind=OutcomeKind.FAILED,
        body=orjson.dumps(body).decode() if body is not None else None,
        error_code=code or type_,
        error_message=_str_or_none(inner.get("message")),
        retryable=_is_retryable(status_code, code, type_),
        status_code=status_code,
    )


def batch_status_from_openai(batch: Batch) -> BatchStatus:
    """Map the SDK's :class:`openai.types.Batch` onto :class:`BatchStatus`.

    An unknown status (a newer API than this code) maps to ``in_progress`` so the batch keeps being polled.
    """
    state = _STATUS_MAP.get(batch.status)
    if state is None:
        logger.warning("unknown OpenAI batch status %r for %s; treating it as in_progress", batch.status, batch.id)
        state = BatchState.IN_PROGRESS
    rc = batch.request_counts
    counts = (
        RequestCounts(total=rc.total, succeeded=rc.completed, failed=rc.failed) if rc is not None else RequestCounts()
    )
    errors = [
        {"code": e.code, "message": e.message, "line": e.line, "param": e.param}
        for e in ((batch.errors.data or []) if batch.errors is not None else [])
    ]
    return BatchStatus(
        provider_batch_id=batch.id,
        state=state,
        provider_state=batch.status,
        counts=counts,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        errors=errors,
        token_limit_exceeded=state is BatchState.FAILED and any(e["code"] == _TOKEN_LIMIT_CODE for e in errors),
        raw=batch.model_dump(mode="json"),
    )


def parse_retry_after(headers: Mapping[str, str], *, now_s: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date), if present.

    Args:
        headers: response headers (case-insensitive mapping such as ``httpx2.Headers``).
        now_s: the current unix time, for the HTTP-date form (``time.time()`` when omitted).
    """
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            if name == "retry-after-ms":
                continue
            parsed = email.utils.parsedate_tz(value)
            if parsed is None:
                continue
            now = time.time() if now_s is None else now_s
            return max(0.0, float(email.utils.mktime_tz(parsed)) - now)
        if seconds >= 0 and seconds != float("inf"):
            return seconds
    return None


def translate_error(exc: Exception, *, provider: str, action: str) -> ProviderError:
    """Turn an SDK or transport error into :class:`ProviderError` (the caller raises it ``from exc``).

    Retryable: connection errors, timeouts, 408, 409, 429 and 5xx. Other 4xx and anything else are not.

    Args:
        exc: what the SDK or httpx2 raised.
        provider: the account name.
        action: what was being done (``"create batch"``), for the message.
    """
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        return ProviderError(
            _redact(f"{provider}: {action} failed: HTTP {status}: {exc.message}"),
            provider=provider,
            retryable=_is_retryable(status),
            retry_after_s=parse_retry_after(exc.response.headers),
        )
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        # The aiohttp transport reports a refused connection as a connect timeout; say what lies underneath.
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ is not None else ""
        what = "timed out" if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException) else "connection error"
        return ProviderError(_redact(f"{provider}: {action} failed: {what}{cause}"), provider=provider, retryable=True)
    return ProviderError(
        _redact(f"{provider}: {action} failed: {type(exc).__name__}: {exc}"), provider=provider, retryable=False
    )


_FOREIGN_ERRORS = (openai.OpenAIError, httpx2.HTTPError, httpx2.StreamError)


def realtime_success_outcome(custom_id: str, content: bytes) -> Outcome:
    """The outcome of a 2xx real-time answer; the body is kept as the provider sent it.

    Raises:
        ValueError: the answer is not a JSON object.
    """
    data = orjson.loads(content)
    if not isinstance(data, dict):
        raise ValueError("real-time answer is not a JSON object")
    usage = data.get("usage")
    return Outcome(
        custom_id=custom_id,
        kind=OutcomeKind.SUCCEEDED,
        body=content.decode(),
        usage=usage if isinstance(usage, dict) else None,
        status_code=200,
    )


def realtime_error_outcome(custom_id: str, exc: openai.APIStatusError) -> Outcome:
    """The FAILED outcome of a real-time request the provider refused (a non-retryable 4xx)."""
    try:
        error_text: str | None = exc.response.text
    except httpx2.ResponseNotRead:
        error_text = None
    code = exc.code or exc.type
    message = None
    if isinstance(exc.body, dict):
        message = _str_or_none(exc.body.get("message"))
    return Outcome(
        custom_id=custom_id,
        kind=OutcomeKind.FAILED,
        body=error_text or None,
        error_code=code,
        error_message=message or exc.message,
        retryable=_is_retryable(exc.status_code, exc.code, exc.type),
        status_code=exc.status_code,
    )


class OpenAIAdapter(ProviderAdapter):
    """An OpenAI (or OpenAI-compatible) account, driven through the official SDK over aiohttp.

    The SDK client is created on first use and released by :meth:`aclose`.

    Args:
        account: the account's name.
        api_key: the API key (``None`` lets the SDK fall back to ``OPENAI_API_KEY``). Never logged.
        base_url: the API root ending in ``/v1`` (``None``: the SDK's default, ``https://api.openai.com/v1``).
        limits: the account's batch limits (default :data:`OPENAI_LIMITS`).
        max_retries: the SDK's own retries of 408/409/429/5xx and connection errors per call.
        timeout_s: the SDK's per-request timeout in seconds.
        http_client: the ``httpx2.AsyncClient`` to use instead of ``DefaultAioHttpClient()`` (tests pass one
            with an ``httpx2.MockTransport``); the adapter closes it in :meth:`aclose`.
        completion_window: asked for at create; OpenAI takes only ``24h``, Groq up to ``7d``.
        line_format: ``openai`` (``custom_id, method, url, body``) or ``mistral`` (``custom_id, body``).

    Attributes:
        malformed_lines: result lines skipped because they could not be read (see :func:`parse_result_line`).
    """

    kind = Provider.OPENAI

    def __init__(
        self,
        account: str = "openai",
        *,
        api_key: str | None,
        base_url: str | None,
        limits: Limits | None = None,
        max_retries: int = 2,
        timeout_s: float = 60,
        http_client: httpx2.AsyncClient | None = None,
        completion_window: str = "24h",
        line_format: str = "openai",
    ) -> None:
        super().__init__(account, limits or OPENAI_LIMITS)
        self.completion_window = completion_window
        # OpenAI-compatible hosts that take ``{custom_id, body}`` lines (Mistral, Together) drop method/url
        self._with_method_url = line_format == "openai"
        self._http_client = http_client
        self._api_key = api_key
        self._base_url = base_url
        self._max_retries = max_retries
        self._timeout_s = timeout_s
        self._client_: AsyncOpenAI | None = None
        self.malformed_lines = 0

    def __repr__(self) -> str:
        return f"OpenAIAdapter(account={self.account!r}, base_url={self._base_url!r})"

    def _client(self) -> AsyncOpenAI:
        if self._client_ is None:
            try:
                self._client_ = AsyncOpenAI(
                    api_key=self._api_key,
                    base_url=self._base_url,
                    http_client=self._http_client or DefaultAioHttpClient(),
                    max_retries=self._max_retries,
                    timeout=self._timeout_s,
                )
            except openai.OpenAIError as exc:
                raise ProviderError(
                    f"{self.account}: cannot configure the OpenAI client: {_redact(str(exc))}",
                    provider=self.account,
                    retryable=False,
                ) from exc
        return self._client_

    async def aclose(self) -> None:
        """Close the SDK client and its aiohttp session."""
        client, self._client_ = self._client_, None
        self._http_client = None
        if client is not None:
            await client.close()

    def encode_line(self, custom_id: str, endpoint: str, body_json: str) -> bytes:
        """``{"custom_id", "method": "POST", "url", "body"}`` and a newline; ``body_json`` is spliced as-is."""
        if not self._with_method_url:
            return orjson.dumps(
                {"custom_id": custom_id, "body": orjson.Fragment(body_json)}, option=orjson.OPT_APPEND_NEWLINE
            )
        return orjson.dumps(
            {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": orjson.Fragment(body_json)},
            option=orjson.OPT_APPEND_NEWLINE,
        )

    async def upload(self, path: Path) -> str:
        """Upload ``path`` with ``purpose=batch``, streamed from disk in chunks; the file id.

        Raises:
            ProviderError: the upload failed.
        """
        client = self._client()
        fh = await asyncio.to_thread(path.open, "rb")
        try:
            created = await client.files.create(file=(path.name, fh, "application/jsonl"), purpose="batch")
        except _FOREIGN_ERRORS as exc:
            raise translate_error(exc, provider=self.account, action=f"upload {path.name}") from exc
        finally:
            fh.close()
        logger.info("%s: uploaded %s as %s", self.account, path.name, created.id)
        return created.id

    async def create(
        self, *, batch_id: str, endpoint: str, model: str, input_file_id: str | None, path: Path
    ) -> BatchStatus:
        """Create a ``24h`` batch over ``input_file_id`` (uploading ``path`` first if there is none).

        Raises:
            ProviderError: the provider refused or could not be reached.
        """
        if input_file_id is None:
            input_file_id = await self.upload(path)
        try:
            batch = await self._client().batches.create(
                input_file_id=input_file_id,
                endpoint=cast(Any, endpoint),
                completion_window=self.completion_window,  # type: ignore[arg-type]  # compatible hosts take more
                metadata={METADATA_KEY: batch_id},
            )
        except _FOREIGN_ERRORS as exc:
            raise translate_error(exc, provider=self.account, action=f"create batch {batch_id}") from exc
        logger.info("%s: created provider batch %s for %s (%s)", self.account, batch.id, batch_id, model)
        return batch_status_from_openai(batch)

    async def retrieve(self, provider_batch_id: str) -> BatchStatus:
        """The batch's status now.

        Raises:
            ProviderError: the call failed (404 is not retryable).
        """
        try:
            batch = await self._client().batches.retrieve(provider_batch_id)
        except _FOREIGN_ERRORS as exc:
            raise translate_error(exc, provider=self.account, action=f"retrieve {provider_batch_id}") from exc
        return batch_status_from_openai(batch)

    async def cancel(self, provider_batch_id: str) -> BatchStatus:
        """Ask for cancellation; OpenAI answers ``cancelling`` and gets to ``cancelled`` within minutes.

        Raises:
            ProviderError: the call failed.
        """
        try:
            batch = await self._client().batches.cancel(provider_batch_id)
        except _FOREIGN_ERRORS as exc:
            raise translate_error(exc, provider=self.account, action=f"cancel {provider_batch_id}") from exc
        return batch_status_from_openai(batch)

    async def results(self, status: BatchStatus) -> AsyncIterator[Outcome]:
        """Stream the outcomes in the output file, then in the error file, one line at a time.

        Unreadable lines are logged, counted in :attr:`malformed_lines` and skipped. Close the iterator
        (``contextlib.aclosing``) if you stop early, so the HTTP response is released.

        Raises:
            ProviderError: a file could not be fetched or the stream broke.
        """
        for file_id in (status.output_file_id, status.error_file_id):
            if not file_id:
                continue
            async for outcome in self._stream_file(file_id):
                yield outcome

    async def _stream_file(self, file_id: str) -> AsyncIterator[Outcome]:
        client = self._client()
        try:
            async with client.files.with_streaming_response.content(file_id) as response:
                async for line in response.iter_lines():
                    if not line.strip():
                        continue
                    outcome = parse_result_line(line)
                    if outcome is None:
                        self.malformed_lines += 1
                        continue
                    yield outcome
        except _FOREIGN_ERRORS as exc:
            raise translate_error(exc, provider=self.account, action=f"download {file_id}") from exc

    async def find_batch(self, batch_id: str) -> BatchStatus | None:
        """The provider batch whose metadata carries ``batch_id``, among the most recent
        :data:`FIND_BATCH_SCAN_LIMIT` batches (listed newest first); ``None`` if there is none.

        Raises:
            ProviderError: listing failed.
        """
        seen = 0
        try:
            async for batch in self._client().batches.list(limit=100):
                if batch.metadata and batch.metadata.get(METADATA_KEY) == batch_id:
                    return batch_status_from_openai(batch)
                seen += 1
                if seen >= FIND_BATCH_SCAN_LIMIT:
                    break
        except _FOREIGN_ERRORS as exc:
            raise translate_error(exc, provider=self.account, action=f"find batch {batch_id}") from exc
        return None

    async def recent_batches(self, *, scan_limit: int = FIND_BATCH_SCAN_LIMIT) -> list[tuple[str | None, BatchStatus]]:
        """The most recent ``scan_limit`` batches (newest first), each with the batcher batch id in its metadata.

        Raises:
            ProviderError: listing failed.
        """
        found: list[tuple[str | None, BatchStatus]] = []
        try:
            async for batch in self._client().batches.list(limit=100):
                ours = batch.metadata.get(METADATA_KEY) if batch.metadata else None
                found.append((ours, batch_status_from_openai(batch)))
                if len(found) >= scan_limit:
                    break
        except _FOREIGN_ERRORS as exc:
            raise translate_error(exc, provider=self.account, action="list batches") from exc
        return found

    async def list_uploads(self, *, scan_limit: int = UPLOAD_SCAN_LIMIT) -> list[UploadedFile]:
        """Files uploaded with ``purpose=batch`` (at most ``scan_limit``).

        Raises:
            ProviderError: listing failed.
        """
        found: list[UploadedFile] = []
        try:
            async for item in self._client().files.list(purpose="batch"):
                found.append(UploadedFile(item.id, item.filename, datetime.fromtimestamp(item.created_at, UTC)))
                if len(found) >= scan_limit:
                    break
        except _FOREIGN_ERRORS as exc:
            raise translate_error(exc, provider=self.account, action="list files") from exc
        return found

    async def delete_file(self, file_id: str) -> None:
        """Delete an uploaded file; a file that is already gone is fine.

        Raises:
            ProviderError: the call failed for another reason.
        """
        try:
            await self._client().files.delete(file_id)
        except openai.NotFoundError:
            logger.debug("%s: file %s already gone", self.account, file_id)
        except _FOREIGN_ERRORS as exc:
            raise translate_error(exc, provider=self.account, action=f"delete file {file_id}") from exc

    def _realtime_path(self, endpoint: str) -> str:
        base_path = self._client().base_url.path.rstrip("/")
        if base_path.endswith("/v1") and endpoint.startswith("/v1/"):
            return endpoint[len("/v1") :]
        return endpoint

    async def run_realtime(self, custom_id: str, endpoint: str, body_json: str) -> Outcome:
        """POST ``body_json`` (as-is, not re-parsed) to the real-time ``endpoint``.

        The body must not ask for streaming. A request the provider refuses for its own content (400, 404,
        413, 422…) comes back as a FAILED outcome; anything that is about the account or the moment rather
        than the request — 401/403, 408/409/429, 5xx, transport errors — raises instead.

        Raises:
            ProviderError: see above; ``retryable`` and ``retry_after_s`` are set where they apply.
        """
        try:
            content = await self._client().post(
                self._realtime_path(endpoint), cast_to=bytes, content=body_json.encode()
            )
        except openai.APIStatusError as exc:
            if _is_retryable(exc.status_code) or exc.status_code in (401, 403):
                raise translate_error(exc, provider=self.account, action=f"POST {endpoint}") from exc
            return realtime_error_outcome(custom_id, exc)
        except _FOREIGN_ERRORS as exc:
            raise translate_error(exc, provider=self.account, action=f"POST {endpoint}") from exc
        try:
            return realtime_success_outcome(custom_id, content)
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            raise ProviderError(
                f"{self.account}: POST {endpoint} answered something that is not a JSON object",
                provider=self.account,
                retryable=True,
            ) from exc
