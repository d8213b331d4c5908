"""The HTTP server under the API: aiohttp's, with slow clients shed, a connection cap, and parse errors that
echo nothing the client sent.

aiohttp answers a request it cannot parse (a control character in a header, a bare CR, an obs-fold) with a
``400`` whose text quotes the offending line, and logs it with the parser's exception at ERROR — both carry
the header, and so an ``Authorization`` key, verbatim. :class:`_Handler` answers such a request with a fixed
JSON error and logs only the status and the exception's class.

A connection that opens and never finishes its request head is closed ``api_header_timeout_s`` after it
opened (or after its last answer): aiohttp's keep-alive timer closes any connection that waits for a request
head, so that timer is the header timeout. Bodies have their own deadline (:func:`batcher.api.io.read_body`).
Past ``api_max_connections`` open connections, a new one gets ``503`` and is closed before any of it is read.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from batcher.api.errors import JSON
from batcher.config import Settings

logger = logging.getLogger(__name__)

__all__ = ["ApiRunner"]

#: seconds an unread request body is drained after an early answer before the connection is closed
LINGER_S = 2.0

_MALFORMED = orjson.dumps(
    {
        "error": {
            "type": "bad_request",
            "message": "malformed HTTP request: a request line or header breaks HTTP's syntax (a control "
            "character, a bare CR or LF, a folded or oversized header)",
            "field": None,
        }
    }
)
_BUSY_BODY = orjson.dumps({"error": {"type": "unavailable", "message": "too many connections; retry", "field": None}})
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Handler(RequestHandler):
    """aiohttp's connection handler, with error answers that quote nothing from the request."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            # an error of batcher's own (the API's middleware answers everything else): aiohttp's generic text
            return super().handle_error(request, status, exc, None)
        # the parser's message quotes the offending line: keep it out of the answer and the log
        logger.info("refused a malformed request from %s: HTTP %d (%s)", request.remote, status, type(exc).__name__)
        response = web.Response(status=status, body=_MALFORMED, content_type=JSON)
        response.force_close()
        return response


class _Shed(asyncio.Protocol):
    """A connection over the cap: one 503, then closed, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()


class _Server(web.Server):
    """aiohttp's server, making :class:`_Handler` connections up to a cap."""

    def __init__(
        self,
        handler: Any,
        *,
        request_factory: Any,
        handler_cancellation: bool,
        max_connections: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, request_factory=request_factory, handler_cancellation=handler_cancellation, **kwargs)
        self._handler_kwargs = kwargs  # RequestHandler's own options
        self._max_connections = max_connections
        self._shed = 0

    def __call__(self) -> RequestHandler:
        if len(self.connections) >= self._max_connections:
            self._shed += 1
            if self._shed == 1 or self._shed % 1000 == 0:
                logger.warning(
                    "%d connections open, the most allowed (BATCHER_API_MAX_CONNECTIONS): shedding new ones "
                    "(%d so far)",
                    self._max_connections,
                    self._shed,
                )
            return _Shed()  # type: ignore[return-value]
        return _Handler(self, loop=asyncio.get_running_loop(), **self._handler_kwargs)


class ApiRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose server applies the API's connection settings."""

    def __init__(self, app: web.Application, settings: Settings, **kwargs: Any) -> None:
        self._connection_kwargs: dict[str, Any] = {
            "keepalive_timeout": settings.api_header_timeout_s,
            # a body left unread (an early answer: 413, 408, 401) is drained this long, so the client reads the
            # answer rather than a reset, then the connection closes
            "lingering_time": LINGER_S,
            "access_log": None,
            **kwargs,
        }
        self._max_connections = settings.api_max_connections
        super().__init__(app, **self._connection_kwargs)

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # runs the app's start-up; its handler and factory are reused
        handler_kwargs = {k: v for k, v in self._connection_kwargs.items() if k != "handler_cancellation"}
        return _Server(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            max_connections=self._max_connections,
            **handler_kwargs,
        )
