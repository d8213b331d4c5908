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
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, cast

import httpx2
import openai
import orjson
from openai import AsyncOpenAI, DefaultAioHttpClient
from openai.types import Batch

from batcher.domain import BatchState, Provider
from batcher.errors import ProviderError
from batcher.providers.base import BatchStatus, Limits, Outcome, OutcomeKind, RequestCounts, UploadedFile
from batcher.providers.limits import OPENAI_LIMITS
from batcher.providers.sdk import SNIPPET_CHARS, Sdk, SdkAdapter, is_retryable_status, refused_outcome, str_or_none

logger = logging.getLogger(__name__)

__all__ = [
    "FIND_BATCH_SCAN_LIMIT",
    "METADATA_KEY",
    "OPENAI_LIMITS",
    "UPLOAD_SCAN_LIMIT",
    "OpenAIAdapter",
    "batch_status_from_openai",
    "parse_result_line",
    "realtime_error_outcome",
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


def _is_retryable(status_code: int | None, *codes: str | None) -> bool:
    if status_code is not None and is_retryable_status(status_code):
        return True
    return any(code in _RETRYABLE_CODES for code in codes if code)


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
        logger.warning("skipping malformed batch result line: %.*r", SNIPPET_CHARS, raw)
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
        code = str_or_none(error.get("code"))
        message = str_or_none(error.get("message"))
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
        logger.warning("skipping batch result line with neither response nor error: %.*r", SNIPPET_CHARS, raw)
        return None

    # HTTP-level failure: error is null, the real error is inside the response body.
    inner = body.get("error") if isinstance(body, dict) else None
    inner = inner if isinstance(inner, dict) else {}
    code = str_or_none(inner.get("code"))
    type_ = str_or_none(inner.get("type"))
    return Outcome(
        custom_id=custom_id,
        kind=OutcomeKind.FAILED,
        body=orjson.dumps(body).decode() if body is not None else None,
        error_code=code or type_,
        error_message=str_or_none(inner.get("message")),
        retryable=_is_retryable(status_code, code, type_),
        status_code=status_code,
    )


def batch_status_from_openai(batch: Batch) -> BatchStatus:
    """Map the SDK's :class:`openai.types.Batch` onto :class:`BatchStatus`.

    An unknown status (a newer API than this code) maps to ``in_progress`` so the batch keeps being polled.
    Case is ignored: some OpenAI-compatible hosts answer ``COMPLETED``.
    """
    state = _STATUS_MAP.get(str(batch.status).lower())
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


def realtime_error_outcome(custom_id: str, exc: openai.APIStatusError) -> Outcome:
    """The FAILED outcome of a real-time request the provider refused (a non-retryable 4xx)."""
    message = str_or_none(exc.body.get("message")) if isinstance(exc.body, dict) else None
    return refused_outcome(
        custom_id,
        exc,
        error_code=exc.code or exc.type,
        error_message=message or exc.message,
        retryable=_is_retryable(exc.status_code, exc.code, exc.type),
    )


def _status_detail(exc: openai.APIStatusError) -> str:
    return f": {exc.message}"


OPENAI_SDK: Sdk[AsyncOpenAI, openai.APIStatusError] = Sdk(
    name="OpenAI",
    client=AsyncOpenAI,
    http_client=DefaultAioHttpClient,
    base_error=openai.OpenAIError,
    status_error=openai.APIStatusError,
    connection_error=openai.APIConnectionError,
    timeout_error=openai.APITimeoutError,
    status_detail=_status_detail,
    account_statuses=frozenset({401, 403}),
    refused_outcome=realtime_error_outcome,
)


def translate_error(exc: Exception, *, provider: str, action: str) -> ProviderError:
    """Turn an OpenAI SDK or transport error into :class:`ProviderError` (see :meth:`Sdk.translate`)."""
    return OPENAI_SDK.translate(exc, provider=provider, action=action)


class OpenAIAdapter(SdkAdapter[AsyncOpenAI, openai.APIStatusError]):
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
        line_format: ``openai`` (``custom_id, method, url, body``) or ``body_only`` (``custom_id, body``, as Together
            takes).

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
        super().__init__(
            account,
            limits or OPENAI_LIMITS,
            sdk=OPENAI_SDK,
            api_key=api_key,
            base_url=base_url,
            max_retries=max_retries,
            timeout_s=timeout_s,
            http_client=http_client,
        )
        self.completion_window = completion_window
        # hosts that take ``{custom_id, body}`` lines (Together) drop method/url
        self._with_method_url = line_format == "openai"

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
            async with self._translating(f"upload {path.name}"):
                created = await client.files.create(file=(path.name, fh, "application/jsonl"), purpose="batch")
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
        async with self._translating(f"create batch {batch_id}"):
            batch = await self._client().batches.create(
                input_file_id=input_file_id,
                endpoint=cast(Any, endpoint),
                completion_window=self.completion_window,  # type: ignore[arg-type]  # compatible hosts take more
                metadata={METADATA_KEY: batch_id},
            )
        logger.info("%s: created provider batch %s for %s (%s)", self.account, batch.id, batch_id, model)
        return batch_status_from_openai(batch)

    async def retrieve(self, provider_batch_id: str) -> BatchStatus:
        """The batch's status now.

        Raises:
            ProviderError: the call failed (404 is not retryable).
        """
        async with self._translating(f"retrieve {provider_batch_id}"):
            batch = await self._client().batches.retrieve(provider_batch_id)
        return batch_status_from_openai(batch)

    async def cancel(self, provider_batch_id: str) -> BatchStatus:
        """Ask for cancellation; OpenAI answers ``cancelling`` and gets to ``cancelled`` within minutes.

        Raises:
            ProviderError: the call failed.
        """
        async with self._translating(f"cancel {provider_batch_id}"):
            batch = await self._client().batches.cancel(provider_batch_id)
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
            download = partial(self._client().files.with_streaming_response.content, file_id)
            async with aclosing(self._outcomes(download, parse_result_line, f"download {file_id}")) as outcomes:
                async for outcome in outcomes:
                    yield outcome

    async def find_batch(self, batch_id: str) -> BatchStatus | None:
        """The provider batch whose metadata carries ``batch_id``, among the most recent
        :data:`FIND_BATCH_SCAN_LIMIT` batches (listed newest first); ``None`` if there is none.

        Raises:
            ProviderError: listing failed.
        """
        seen = 0
        async with self._translating(f"find batch {batch_id}"):
            async for batch in self._client().batches.list(limit=100):
                if batch.metadata and batch.metadata.get(METADATA_KEY) == batch_id:
                    return batch_status_from_openai(batch)
                seen += 1
                if seen >= FIND_BATCH_SCAN_LIMIT:
                    break
        return None

    async def recent_batches(self, *, scan_limit: int = FIND_BATCH_SCAN_LIMIT) -> list[tuple[str | None, BatchStatus]]:
        """The most recent ``scan_limit`` batches (newest first), each with the batcher batch id in its metadata.

        Raises:
            ProviderError: listing failed.
        """
        found: list[tuple[str | None, BatchStatus]] = []
        async with self._translating("list batches"):
            async for batch in self._client().batches.list(limit=100):
                ours = batch.metadata.get(METADATA_KEY) if batch.metadata else None
                found.append((ours, batch_status_from_openai(batch)))
                if len(found) >= scan_limit:
                    break
        return found

    async def list_uploads(self, *, scan_limit: int = UPLOAD_SCAN_LIMIT) -> list[UploadedFile]:
        """Files uploaded with ``purpose=batch`` (at most ``scan_limit``).

        Raises:
            ProviderError: listing failed.
        """
        found: list[UploadedFile] = []
        async with self._translating("list files"):
            async for item in self._client().files.list(purpose="batch"):
                found.append(UploadedFile(item.id, item.filename, datetime.fromtimestamp(item.created_at, UTC)))
                if len(found) >= scan_limit:
                    break
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
        except OPENAI_SDK.foreign_errors as exc:
            raise self._translate(exc, f"delete file {file_id}") from exc

    def _realtime_path(self, endpoint: str) -> str:
        base_path = self._client().base_url.path.rstrip("/")
        if base_path.endswith("/v1") and endpoint.startswith("/v1/"):
            return endpoint[len("/v1") :]
        return endpoint

    async def _send_realtime(self, endpoint: str, content: bytes, headers: dict[str, str]) -> bytes:
        return await self._client().post(
            self._realtime_path(endpoint), cast_to=bytes, content=content, options={"headers": headers}
        )
