"""The HTTP layer both emulated APIs share: their middleware, fault injection and idempotent real-time answers.

Each API speaks its own dialect (a :class:`Dialect`): which paths need a key, how a key is checked, what an injected
fault or an aiohttp error looks like in its error shape, and which header carries the request id. The middleware
:meth:`Dialect.middleware` does the rest the same way for both: it authenticates, rolls the shared
``api_error_rate`` dice, turns every :class:`~batcher.emulator.errors.HttpError` into the API's JSON error and
stamps the request id on every answer.

Real-time endpoints answer through :func:`answer_once`, which honours an ``Idempotency-Key`` when
``EmulatorSettings.idempotency_keys`` is on.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from batcher.emulator.errors import HttpError
from batcher.emulator.state import EmulatorState

logger = logging.getLogger(__name__)

__all__ = [
    "IDEMPOTENCY_HEADER",
    "REPLAYED_HEADER",
    "STATE_KEY",
    "Dialect",
    "Handler",
    "answer_once",
    "drain",
    "drop_connection",
    "int_query",
    "json_response",
    "state_of",
]

STATE_KEY: web.AppKey[EmulatorState] = web.AppKey("batcher_emulator_state", EmulatorState)

#: the request header whose value makes a real-time call idempotent
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: set on an answer replayed for an ``Idempotency-Key`` already answered
REPLAYED_HEADER = "Idempotent-Replayed"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def state_of(request: web.Request) -> EmulatorState:
    return request.app[STATE_KEY]


def drop_connection(request: web.Request) -> NoReturn:
    """Close the connection with no answer (an injected connection reset)."""
    logger.info("injected connection reset on %s %s", request.method, request.path)
    if request.transport is not None:
        request.transport.abort()
    # aiohttp treats a cancelled handler as a client that went away: nothing more is written
    raise asyncio.CancelledError


async def drain(request: web.Request) -> None:
    """Read and drop the rest of the request body so the client sees the answer rather than a reset connection."""
    while await request.content.readany():
        pass


class Dialect(abc.ABC):
    """How one emulated API speaks over HTTP; :meth:`middleware` does the rest the same way for every API.

    Attributes:
        request_id_header: the answer header that carries the request id (``x-request-id``).
        fault_cycle: the injected faults' kinds in turn when ``api_error_kinds`` is empty.
    """

    request_id_header: str
    fault_cycle: tuple[str, ...]

    @abc.abstractmethod
    def new_request_id(self) -> str:
        """A fresh request id."""

    def guarded(self, path: str) -> bool:
        """Whether a path needs a key and rolls the fault dice (every path, unless the API says otherwise)."""
        return True

    @abc.abstractmethod
    def check_auth(self, request: web.Request) -> None:
        """Raise the API's 401 when the request carries no usable key."""

    @abc.abstractmethod
    def fault_error(self, kind: str, state: EmulatorState) -> HttpError:
        """The error an injected fault of ``kind`` (``"429"``, ``"500"``…) answers with."""

    @abc.abstractmethod
    def http_error(self, exc: web.HTTPException, request: web.Request) -> HttpError:
        """An aiohttp error (404 no route, 405, 413) in the API's shape."""

    @abc.abstractmethod
    def server_error(self) -> HttpError:
        """The answer to an unhandled exception."""

    async def _inject_fault(self, request: web.Request) -> None:
        state = state_of(request)
        kind = state.draw_api_fault_kind(self.fault_cycle)
        if kind is None:
            return
        await drain(request)
        if kind == "reset":
            drop_connection(request)
        fault = self.fault_error(kind, state)
        logger.info("injected HTTP %s on %s %s", fault.status, request.method, request.path)
        raise fault

    def middleware(self) -> Middleware:
        """The API's middleware: authentication, injected faults, errors in its shape, a request id on every
        answer."""

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            request_id = self.new_request_id()
            response: web.StreamResponse
            try:
                if self.guarded(request.path):
                    self.check_auth(request)
                    await self._inject_fault(request)
                response = await handler(request)
            except HttpError as exc:
                response = json_response(exc.body(request_id), exc.status)
                response.headers.update(exc.headers)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                error = self.http_error(exc, request)
                response = json_response(error.body(request_id), error.status)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("unhandled error on %s %s", request.method, request.path)
                error = self.server_error()
                response = json_response(error.body(request_id), error.status)
            response.headers[self.request_id_header] = request_id
            return response

        return middleware


def int_query(request: web.Request, name: str, default: int, not_an_integer: Callable[[str], HttpError]) -> int:
    """The integer query parameter ``name`` (``default`` when absent).

    Raises:
        HttpError: ``not_an_integer(raw)`` when it is not an integer.
    """
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise not_an_integer(raw) from None


def answer_once(
    request: web.Request,
    body: Mapping[str, Any],
    answer: Callable[[], Any],
    key_reused: Callable[[str], HttpError],
) -> web.Response:
    """Answer a real-time call with ``answer()``, or replay the answer given to an earlier call with its key.

    With ``idempotency_keys`` on and an ``Idempotency-Key`` header, the answer is kept under the key; the same
    request sent again with it gets that answer back, byte for byte, with ``Idempotent-Replayed: true``, and is
    not counted as a new real-time answer. Only answers are kept: a call that failed (a refused body, an injected
    fault) may be sent again with its key and is then run.

    Args:
        request: the real-time call.
        body: its parsed JSON body (the key must come with the same endpoint and body every time).
        answer: makes the JSON answer; may raise the API's error.
        key_reused: the API's 400 for a key sent with another request.
    """
    state = state_of(request)
    key = request.headers.get(IDEMPOTENCY_HEADER) if state.settings.idempotency_keys else None
    fingerprint = request.path + " " + hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    if key:
        try:
            stored = state.stored_answer(key, fingerprint)
        except ValueError as exc:
            raise key_reused(str(exc)) from None
        if stored is not None:
            logger.info("replayed the real-time answer for Idempotency-Key %r", key)
            return web.Response(body=stored, content_type="application/json", headers={REPLAYED_HEADER: "true"})
    data = orjson.dumps(answer())
    state.store_answer(key or None, fingerprint, data)
    return web.Response(body=data, content_type="application/json")
