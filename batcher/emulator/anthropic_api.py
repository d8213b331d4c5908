"""HTTP layer of the emulator's Anthropic side: the Message Batches API and real-time Messages.

Routes (on the same app as the OpenAI side; the Anthropic SDK's ``base_url`` is the server root, without
``/v1``)::

    POST   /v1/messages/batches                       create (body streamed to disk, checked as it arrives)
    GET    /v1/messages/batches                       list (limit 1..1000, after_id, before_id), newest first
    GET    /v1/messages/batches/{id}                  retrieve
    POST   /v1/messages/batches/{id}/cancel           cancel
    DELETE /v1/messages/batches/{id}                  delete (once ended)
    GET    /v1/messages/batches/{id}/results          results JSONL, streamed from disk (once ended)
    POST   /v1/messages                               one real-time Message from the same fake model

Every call needs an API key: ``x-api-key: <any key>`` as the API documents, or ``Authorization: Bearer <key>``,
which is what the anthropic 2.x SDK sends for ``api_key``. ``anthropic-version`` is accepted, not required.
Errors have Anthropic's shape ``{"type": "error", "error": {"type", "message"}, "request_id"}`` and every answer
carries a ``request-id`` header. Real-time Messages honour an ``Idempotency-Key`` when ``idempotency_keys`` is on
(:func:`batcher.emulator.http.answer_once`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import IO, Any

import orjson
from aiohttp import web

from batcher.emulator.anthropic_batches import AnthropicBatches, message_batch_object
from batcher.emulator.anthropic_errors import AnthropicApiError, invalid_request
from batcher.emulator.anthropic_models import InvalidParams, check_params, fake_message, new_id
from batcher.emulator.anthropic_requests import ParsedRequests, RequestsBodyParser
from batcher.emulator.http import STATE_KEY, Dialect, answer_once, drain, int_query, json_response
from batcher.emulator.state import EmulatorState

logger = logging.getLogger(__name__)

__all__ = [
    "ANTHROPIC_KEY",
    "MAX_MESSAGE_BYTES",
    "AnthropicDialect",
    "add_anthropic_routes",
    "anthropic_middleware",
    "is_anthropic_path",
]

ANTHROPIC_KEY: web.AppKey[AnthropicBatches] = web.AppKey("batcher_emulator_anthropic", AnthropicBatches)

#: largest real-time Messages body (Anthropic's documented limit for the Messages API)
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
_FEED_BYTES = 1024 * 1024
_LIST_MAX = 1000
_API_PREFIX = "/v1/messages"


def is_anthropic_path(path: str) -> bool:
    """Whether a request path belongs to the Anthropic side."""
    return path == _API_PREFIX or path.startswith(_API_PREFIX + "/")


def _batches(request: web.Request) -> AnthropicBatches:
    return request.app[ANTHROPIC_KEY]


def _origin(request: web.Request) -> str:
    return str(request.url.origin())


# ---------------------------------------------------------------------------- middleware


class AnthropicDialect(Dialect):
    """Anthropic's side of the HTTP layer: a key on every call, faults cycling 429/529/500 (the shared
    ``api_error_rate`` dice), ``request-id``."""

    request_id_header = "request-id"
    fault_cycle = ("429", "529", "500")

    def new_request_id(self) -> str:
        return new_id("req_")

    def check_auth(self, request: web.Request) -> None:
        if request.headers.get("x-api-key", "").strip():
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return
        raise AnthropicApiError("authentication_error", "x-api-key header is required")

    def fault_error(self, kind: str, state: EmulatorState) -> AnthropicApiError:
        """An injected fault: 429 (with ``retry-after``), 529 or 503 (overloaded), or 500."""
        if kind == "429":
            retry_after = state.settings.retry_after_s
            return AnthropicApiError(
                "rate_limit_error",
                f"This request would exceed the rate limit for your organization. Please try again in {retry_after} "
                "second(s).",
                headers={"retry-after": str(retry_after)},
            )
        if kind in ("529", "503"):
            return AnthropicApiError("overloaded_error", "Overloaded")
        return self.server_error()

    def http_error(self, exc: web.HTTPException, request: web.Request) -> AnthropicApiError:
        if exc.status == 404:
            return AnthropicApiError("not_found_error", f"Not found: {request.method} {request.path}")
        if exc.status == 405:
            return AnthropicApiError(
                "invalid_request_error", f"Method {request.method} is not allowed on {request.path}", status=405
            )
        if exc.status == 413:
            return AnthropicApiError("request_too_large", "Request exceeds the maximum allowed number of bytes.")
        return AnthropicApiError("invalid_request_error", exc.reason or "Bad request.", status=exc.status)

    def server_error(self) -> AnthropicApiError:
        return AnthropicApiError("api_error", "Internal server error")


#: authentication, injected faults, Anthropic-shaped errors and ``request-id`` on every answer
anthropic_middleware = AnthropicDialect().middleware()


# ---------------------------------------------------------------------------- helpers


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    value = int_query(request, name, default, lambda raw: invalid_request(f"{name}: Input should be a valid integer"))
    if value < low:
        raise invalid_request(f"{name}: Input should be greater than or equal to {low}")
    if value > high:
        raise invalid_request(f"{name}: Input should be less than or equal to {high}")
    return value


async def _read_json(request: web.Request, max_bytes: int) -> Any:
    declared = request.content_length
    data = bytearray()
    if declared is None or declared <= max_bytes:
        async for chunk in request.content.iter_chunked(64 * 1024):
            data += chunk
            if len(data) > max_bytes:
                break
    if (declared is not None and declared > max_bytes) or len(data) > max_bytes:
        await drain(request)
        raise AnthropicApiError(
            "request_too_large", f"Request exceeds the maximum allowed number of bytes ({max_bytes})."
        )
    try:
        return orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        raise invalid_request("The request body is not valid JSON.") from None


# ---------------------------------------------------------------------------- message batches


async def _parse_create_body(request: web.Request, path: Path, batches: AnthropicBatches) -> ParsedRequests:
    settings = batches.settings
    max_bytes = settings.anthropic_max_bytes
    if request.content_length is not None and request.content_length > max_bytes:
        raise AnthropicApiError(
            "request_too_large",
            f"Request exceeds the maximum allowed number of bytes ({max_bytes}) for a Message Batch.",
        )
    fh: IO[bytes] = await asyncio.to_thread(path.open, "wb")
    try:
        parser = RequestsBodyParser(fh, max_requests=settings.anthropic_max_requests, max_bytes=max_bytes)
        pending = bytearray()
        # Parse in the worker thread in pieces of about _FEED_BYTES: few thread hops, the loop stays free.
        async for data in request.content.iter_chunked(64 * 1024):
            pending += data
            if len(pending) >= _FEED_BYTES:
                await asyncio.to_thread(parser.feed, bytes(pending))
                pending.clear()
        if pending:
            await asyncio.to_thread(parser.feed, bytes(pending))
        return await asyncio.to_thread(parser.finish)
    finally:
        await asyncio.to_thread(fh.close)


async def create_batch(request: web.Request) -> web.Response:
    """``POST /v1/messages/batches``: check the body as it streams in, store the requests, start the batch."""
    batches = _batches(request)
    batch_id, path = batches.allocate()
    try:
        parsed = await _parse_create_body(request, path, batches)
    except BaseException as exc:
        path.unlink(missing_ok=True)
        if isinstance(exc, AnthropicApiError):
            await drain(request)
        raise
    now = time.time()
    batch = await batches.register(batch_id, path, parsed, now)
    return json_response(message_batch_object(batch, _origin(request)))


async def list_batches(request: web.Request) -> web.Response:
    """``GET /v1/messages/batches``: newest first."""
    limit = _int_query(request, "limit", 20, 1, _LIST_MAX)
    batches = _batches(request)
    await batches.advance(time.time())
    page, has_more = batches.page(
        after_id=request.query.get("after_id"), before_id=request.query.get("before_id"), limit=limit
    )
    origin = _origin(request)
    data = [message_batch_object(b, origin) for b in page]
    return json_response(
        {
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )


async def retrieve_batch(request: web.Request) -> web.Response:
    """``GET /v1/messages/batches/{id}``."""
    batches = _batches(request)
    await batches.advance(time.time())
    return json_response(message_batch_object(batches.get(request.match_info["batch_id"]), _origin(request)))


async def cancel_batch(request: web.Request) -> web.Response:
    """``POST /v1/messages/batches/{id}/cancel``."""
    batch = await _batches(request).cancel(request.match_info["batch_id"], time.time())
    return json_response(message_batch_object(batch, _origin(request)))


async def delete_batch(request: web.Request) -> web.Response:
    """``DELETE /v1/messages/batches/{id}``."""
    batch_id = request.match_info["batch_id"]
    await _batches(request).delete(batch_id, time.time())
    return json_response({"id": batch_id, "type": "message_batch_deleted"})


async def batch_results(request: web.Request) -> web.StreamResponse:
    """``GET /v1/messages/batches/{id}/results``: the results JSONL, streamed from disk."""
    path = await _batches(request).results_path(request.match_info["batch_id"], time.time())
    return web.FileResponse(path, headers={"Content-Type": "application/binary"})


# ---------------------------------------------------------------------------- real-time messages


async def create_message(request: web.Request) -> web.Response:
    """``POST /v1/messages``: one Message from the fake model (no streaming), once per ``Idempotency-Key``."""
    body = await _read_json(request, MAX_MESSAGE_BYTES)
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    try:
        check_params(body, in_batch=False)
    except InvalidParams as exc:
        raise invalid_request(exc.message) from None
    batches = _batches(request)

    def answer() -> dict[str, Any]:
        message, _ = fake_message(
            body,
            seed=batches.settings.seed,
            request_key=f"realtime:{new_id('')}",
            cache=batches.prompt_cache,
            service_tier="standard",
        )
        return message

    return answer_once(request, body, answer, invalid_request)


def add_anthropic_routes(app: web.Application) -> None:
    """Register the Anthropic routes and their state on an app built by :func:`~batcher.emulator.create_app`.

    ``app[STATE_KEY]`` must be set already; the Anthropic batches share its settings, data directory, counters
    and fault dice. Requests to these paths must go through :func:`anthropic_middleware`, not the OpenAI one.
    """
    app[ANTHROPIC_KEY] = AnthropicBatches(app[STATE_KEY])
    app.router.add_post("/v1/messages", create_message)
    app.router.add_post("/v1/messages/batches", create_batch)
    app.router.add_get("/v1/messages/batches", list_batches)
    app.router.add_get("/v1/messages/batches/{batch_id}", retrieve_batch)
    app.router.add_delete("/v1/messages/batches/{batch_id}", delete_batch)
    app.router.add_post("/v1/messages/batches/{batch_id}/cancel", cancel_batch)
    app.router.add_get("/v1/messages/batches/{batch_id}/results", batch_results)
