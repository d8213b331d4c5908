"""What the OpenAI and Anthropic adapters share: both drive an official SDK generated from one template.

The two SDKs differ in their class names and in a few wordings, which :class:`Sdk` records; the rest is here once:
translating SDK and transport errors into :class:`~batcher.errors.ProviderError` where they enter
(:meth:`Sdk.translate`), ``Retry-After`` parsing (:func:`parse_retry_after`), and the client's life cycle, result
streaming and the real-time call of :class:`SdkAdapter`.

A real-time call carries an ``Idempotency-Key`` derived from the job id and its attempt
(:func:`realtime_idempotency_key`). Neither SDK sends one by itself (both leave ``_idempotency_header`` unset), and
neither OpenAI nor Anthropic documents honouring it on ``/v1/chat/completions`` or ``/v1/messages``: it is harmless
where ignored, and honoured by the emulator (``EmulatorSettings.idempotency_keys``) and any host that implements it.
"""

from __future__ import annotations

import abc
import email.utils
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import httpx2
import orjson

from batcher.errors import ProviderError
from batcher.providers.base import Limits, Outcome, OutcomeKind, ProviderAdapter

logger = logging.getLogger(__name__)

__all__ = [
    "IDEMPOTENCY_HEADER",
    "SNIPPET_CHARS",
    "Sdk",
    "SdkAdapter",
    "StatusError",
    "is_retryable_status",
    "parse_retry_after",
    "realtime_idempotency_key",
    "realtime_success_outcome",
    "redact",
    "refused_outcome",
    "str_or_none",
]

#: the request header a real-time call's idempotency key travels in
IDEMPOTENCY_HEADER = "Idempotency-Key"

#: how much of an unreadable result line a log message quotes
SNIPPET_CHARS = 200

# Provider messages may echo a (masked) key; never let one reach a log or an error message.
_KEY_RE = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{4})[A-Za-z0-9_\-*]+")


def redact(text: str) -> str:
    """``text`` with any API key it quotes cut to its first four characters."""
    return _KEY_RE.sub(r"\1…", text)


def str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def is_retryable_status(status_code: int) -> bool:
    """Whether a call answered with this HTTP status may succeed later: 408, 409, 429 and 5xx (529 included)."""
    return status_code in (408, 409, 429) or status_code >= 500


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


def realtime_idempotency_key(custom_id: str, attempt: int) -> str:
    """The ``Idempotency-Key`` of a job's real-time call: the same for every send of one attempt (the SDK's own
    retries included), new per attempt. A job taken over from a worker that died mid-call is claimed with the next
    attempt, so its call is a new one."""
    return f"batcher-{custom_id}-{attempt}"


class StatusError(Protocol):
    """What both SDKs' ``APIStatusError`` carry."""

    status_code: int
    response: httpx2.Response


class _Client(Protocol):
    async def close(self) -> None: ...


class _LineStream(Protocol):
    def iter_lines(self) -> AsyncIterator[str]: ...


ClientT = TypeVar("ClientT", bound=_Client)
StatusT = TypeVar("StatusT", bound=StatusError)


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


def refused_outcome(
    custom_id: str, exc: StatusError, *, error_code: str | None, error_message: str, retryable: bool
) -> Outcome:
    """The FAILED outcome of a real-time request the provider refused, its error body kept when it was read."""
    try:
        error_text: str | None = exc.response.text
    except httpx2.ResponseNotRead:
        error_text = None
    return Outcome(
        custom_id=custom_id,
        kind=OutcomeKind.FAILED,
        body=error_text or None,
        error_code=error_code,
        error_message=error_message,
        retryable=retryable,
        status_code=exc.status_code,
    )


@dataclass(frozen=True)
class Sdk(Generic[ClientT, StatusT]):
    """One official SDK, as far as the adapters need to tell the two apart.

    Attributes:
        name: the provider's name in messages (``OpenAI``).
        client: the async client class (``AsyncOpenAI``).
        http_client: the SDK's default aiohttp-backed ``httpx2.AsyncClient`` class.
        base_error: the root of the SDK's exceptions.
        status_error: raised for a 4xx or 5xx answer.
        connection_error: raised when no answer came (its timeout subclass included).
        timeout_error: raised when the answer took too long.
        status_detail: what a message says after ``HTTP 429`` for a status error.
        account_statuses: refusals of a real-time request that are about the account, not the request: they raise
            rather than fail the job.
        refused_outcome: the FAILED outcome of a real-time request refused for its own content.
    """

    name: str
    client: Callable[..., ClientT]
    http_client: Callable[[], httpx2.AsyncClient]
    base_error: type[Exception]
    status_error: type[StatusT]
    connection_error: type[Exception]
    timeout_error: type[Exception]
    status_detail: Callable[[StatusT], str]
    account_statuses: frozenset[int]
    refused_outcome: Callable[[str, StatusT], Outcome]

    @property
    def foreign_errors(self) -> tuple[type[Exception], ...]:
        """What a call through the SDK may raise that must be translated."""
        return (self.base_error, httpx2.HTTPError, httpx2.StreamError)

    def translate(self, exc: Exception, *, provider: str, action: str) -> ProviderError:
        """Turn an SDK or transport error into :class:`ProviderError` (the caller raises it ``from exc``).

        Retryable: connection errors, timeouts, 408, 409, 429 and 5xx (529, overloaded, included). Other 4xx and
        anything else are not. ``retry_after_s`` comes from ``retry-after-ms`` / ``retry-after`` when sent.

        Args:
            exc: what the SDK or httpx2 raised.
            provider: the account name.
            action: what was being done (``"create batch"``), for the message.
        """
        if isinstance(exc, self.status_error):
            status = exc.status_code
            return ProviderError(
                redact(f"{provider}: {action} failed: HTTP {status}{self.status_detail(exc)}"),
                provider=provider,
                retryable=is_retryable_status(status),
                retry_after_s=parse_retry_after(exc.response.headers),
            )
        if isinstance(exc, self.connection_error | httpx2.TransportError):
            # The aiohttp transport reports some failures (a refused connection among them) through a cause.
            cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ is not None else ""
            what = "timed out" if isinstance(exc, self.timeout_error | httpx2.TimeoutException) else "connection error"
            return ProviderError(
                redact(f"{provider}: {action} failed: {what}{cause}"), provider=provider, retryable=True
            )
        return ProviderError(
            redact(f"{provider}: {action} failed: {type(exc).__name__}: {exc}"), provider=provider, retryable=False
        )


class SdkAdapter(ProviderAdapter, Generic[ClientT, StatusT]):
    """An account driven through an official SDK over aiohttp; the client is created on first use.

    Args:
        account: the account's name.
        limits: the account's batch limits.
        sdk: which SDK.
        api_key: the API key (``None`` lets the SDK read its environment variable). Never logged.
        base_url: the API root as the SDK takes it (``None``: the SDK's default).
        max_retries: the SDK's own retries of 408/409/429/5xx and connection errors per call.
        timeout_s: the SDK's per-request timeout in seconds.
        http_client: the ``httpx2.AsyncClient`` to use instead of the SDK's default (tests pass one with an
            ``httpx2.MockTransport``); the adapter closes it in :meth:`aclose`.

    Attributes:
        malformed_lines: result lines skipped because they could not be read.
    """

    def __init__(
        self,
        account: str,
        limits: Limits,
        *,
        sdk: Sdk[ClientT, StatusT],
        api_key: str | None,
        base_url: str | None,
        max_retries: int,
        timeout_s: float,
        http_client: httpx2.AsyncClient | None,
    ) -> None:
        super().__init__(account, limits)
        self._sdk = sdk
        self._http_client = http_client
        self._api_key = api_key
        self._base_url = base_url
        self._max_retries = max_retries
        self._timeout_s = timeout_s
        self._client_: ClientT | None = None
        self.malformed_lines = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(account={self.account!r}, base_url={self._base_url!r})"

    def _client(self) -> ClientT:
        if self._client_ is None:
            try:
                self._client_ = self._sdk.client(
                    api_key=self._api_key,
                    base_url=self._base_url,
                    http_client=self._http_client or self._sdk.http_client(),
                    max_retries=self._max_retries,
                    timeout=self._timeout_s,
                )
            except self._sdk.base_error as exc:
                raise ProviderError(
                    f"{self.account}: cannot configure the {self._sdk.name} client: {redact(str(exc))}",
                    provider=self.account,
                    retryable=False,
                ) from exc
        return self._client_

    async def aclose(self) -> None:
        """Close the SDK client and its aiohttp session (or the ``http_client`` given, if no client was made)."""
        client, self._client_ = self._client_, None
        http_client, self._http_client = self._http_client, None
        if client is not None:
            await client.close()
        elif http_client is not None:
            await http_client.aclose()

    def _translate(self, exc: Exception, action: str) -> ProviderError:
        return self._sdk.translate(exc, provider=self.account, action=action)

    @asynccontextmanager
    async def _translating(self, action: str) -> AsyncIterator[None]:
        """Raise what the SDK raises in the block as :class:`ProviderError`, ``from`` the original."""
        try:
            yield
        except self._sdk.foreign_errors as exc:
            raise self._translate(exc, action) from exc

    async def _outcomes(
        self,
        open_response: Callable[[], AbstractAsyncContextManager[_LineStream]],
        parse: Callable[[str], Outcome | None],
        action: str,
    ) -> AsyncGenerator[Outcome, None]:
        """The outcomes of a streamed JSONL results response, line by line; unreadable lines are counted in
        :attr:`malformed_lines` and skipped. Close the iterator if you stop early, so the response is released."""
        async with self._translating(action), open_response() as response:
            async for line in response.iter_lines():
                if not line.strip():
                    continue
                outcome = parse(line)
                if outcome is None:
                    self.malformed_lines += 1
                    continue
                yield outcome

    @abc.abstractmethod
    async def _send_realtime(self, endpoint: str, content: bytes, headers: dict[str, str]) -> bytes:
        """POST ``content`` to the real-time ``endpoint`` through the SDK, with ``headers``; the answer's body."""

    async def run_realtime(
        self, custom_id: str, endpoint: str, body_json: str, *, attempt: int | None = None
    ) -> Outcome:
        """POST ``body_json`` (as-is, not re-parsed) to the real-time ``endpoint``.

        The body must not ask for streaming. A request the provider refuses for its own content (400, 404, 413,
        422…) comes back as a FAILED outcome; anything about the account or the moment rather than the request —
        401/403 (and the SDK's other :attr:`Sdk.account_statuses`), 408/409/429, 5xx, transport errors — raises.
        With ``attempt``, the call carries the ``Idempotency-Key`` :func:`realtime_idempotency_key` gives.

        Raises:
            ProviderError: see above; ``retryable`` and ``retry_after_s`` are set where they apply.
        """
        headers = {} if attempt is None else {IDEMPOTENCY_HEADER: realtime_idempotency_key(custom_id, attempt)}
        try:
            content = await self._send_realtime(endpoint, body_json.encode(), headers)
        except self._sdk.foreign_errors as exc:
            if isinstance(exc, self._sdk.status_error) and not (
                is_retryable_status(exc.status_code) or exc.status_code in self._sdk.account_statuses
            ):
                return self._sdk.refused_outcome(custom_id, exc)
            raise self._translate(exc, f"POST {endpoint}") from exc
        try:
            return realtime_success_outcome(custom_id, content)
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            raise ProviderError(
                f"{self.account}: POST {endpoint} answered something that is not a JSON object",
                provider=self.account,
                retryable=True,
            ) from exc
