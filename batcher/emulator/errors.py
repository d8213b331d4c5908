"""Errors the emulator answers with, in OpenAI's wire format.

:class:`HttpError` is the root both emulated APIs share; the middleware of :mod:`batcher.emulator.http` turns one
into a JSON answer with :meth:`HttpError.body`. :class:`ApiError` (OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``) is raised anywhere below the OpenAI routes, and
:class:`~batcher.emulator.anthropic_errors.AnthropicApiError` below the Anthropic ones. The helpers build the
common cases with OpenAI's wording.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "ApiError",
    "HttpError",
    "invalid_type",
    "invalid_value",
    "missing_parameter",
    "not_found",
]


class HttpError(Exception):
    """An HTTP error answer of one of the emulated APIs.

    Attributes:
        status: HTTP status code.
        headers: Extra response headers (e.g. ``Retry-After``).
    """

    status: int
    headers: dict[str, str]

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        """The JSON body of the answer, in the API's own shape; ``request_id`` is the answer's request id."""
        raise NotImplementedError


class ApiError(HttpError):
    """An HTTP error answer in OpenAI's format.

    Args:
        status: HTTP status code.
        message: Human-readable message.
        type: OpenAI error ``type`` (``invalid_request_error``, ``server_error``, ``requests``...).
        param: The request parameter at fault, if any.
        code: Machine-readable OpenAI error ``code``, if any.
        headers: Extra response headers (e.g. ``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        """Return the JSON body OpenAI sends for this error (the request id is only in ``x-request-id``)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def missing_parameter(param: str) -> ApiError:
    """A 400 for a required parameter that is absent."""
    return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def invalid_type(param: str, expected: str, value: object) -> ApiError:
    """A 400 for a parameter of the wrong JSON type."""
    return ApiError(
        400,
        f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead.",
        param=param,
        code="invalid_type",
    )


def invalid_value(param: str, message: str) -> ApiError:
    """A 400 for a parameter whose value is not allowed."""
    return ApiError(400, message, param=param, code="invalid_value")


def not_found(message: str, param: str | None = None) -> ApiError:
    """A 404 for an unknown object id."""
    return ApiError(404, message, param=param)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
