"""Errors the Anthropic side of the emulator answers with, in Anthropic's wire format.

:class:`AnthropicApiError` is raised anywhere below the HTTP layer and turned into
``{"type": "error", "error": {"type", "message"}, "request_id"}`` by the middleware of
:mod:`batcher.emulator.http`. The HTTP status follows the error type as Anthropic documents it.
"""

from __future__ import annotations

import logging
from typing import Any

from batcher.emulator.errors import HttpError

logger = logging.getLogger(__name__)

__all__ = ["STATUS_BY_TYPE", "AnthropicApiError", "invalid_request", "not_found"]

#: Anthropic's error types and the HTTP status each comes with.
STATUS_BY_TYPE: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


class AnthropicApiError(HttpError):
    """An HTTP error answer in Anthropic's format.

    Args:
        type: Anthropic error ``type``; the HTTP status is derived from it unless ``status`` is given.
        message: Human-readable message; field errors start with the field's path (``requests.3.custom_id: …``).
        status: HTTP status, when it differs from the type's usual one.
        headers: Extra response headers (e.g. ``retry-after``).
    """

    def __init__(
        self, type: str, message: str, *, status: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.status = status if status is not None else STATUS_BY_TYPE.get(type, 400)
        self.headers = dict(headers or {})

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        """The JSON body Anthropic sends for this error."""
        return {"type": "error", "error": {"type": self.type, "message": self.message}, "request_id": request_id}


def invalid_request(message: str) -> AnthropicApiError:
    """A 400 ``invalid_request_error``."""
    return AnthropicApiError("invalid_request_error", message)


def not_found(message: str) -> AnthropicApiError:
    """A 404 ``not_found_error``."""
    return AnthropicApiError("not_found_error", message)
