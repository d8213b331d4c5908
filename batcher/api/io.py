"""Reading requests and writing answers: size-limited bodies, query parameters, JSON responses."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from enum import Enum
from typing import Any, TypeVar

import orjson
from aiohttp import web

from batcher.api.enqueue import Answer, IdempotencyKey
from batcher.api.errors import JSON, ApiError, invalid
from batcher.api.state import STATE

E = TypeVar("E", bound=Enum)

#: what an Idempotency-Key may be: printable ASCII, at most 255 characters
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
#: a job (or delivery) id, as cursors carry them
ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


def json_response(value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(value), content_type=JSON, headers=headers)


def answer_response(answer: Answer) -> web.Response:
    headers = {"Idempotent-Replayed": "true"} if answer.replayed else None
    return web.Response(status=answer.status, body=answer.body, content_type=JSON, headers=headers)


async def read_body(request: web.Request, limit: int, setting: str) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes and with 408 past the body deadline.

    The limit applies to the body as decoded (``Content-Encoding: gzip``, ``deflate``, ``br`` are inflated by
    aiohttp on the way in) and is checked while it is read, so a small compressed body that inflates past it
    stops there; a declared ``Content-Length`` over the limit is refused before anything is read.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(declared, limit, setting)
    timeout_s = request.app[STATE].settings.api_body_timeout_s
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_chunked(1 << 16):
                size += len(chunk)
                if size > limit:
                    raise _too_large(size, limit, setting)
                chunks.append(chunk)
    except web.RequestPayloadError:
        # a body that ends early, or whose Content-Encoding does not decode
        raise ApiError(
            400,
            "invalid_body",
            "the body could not be read: it ended early or does not decode as its Content-Encoding says",
            field="body",
            headers={"Connection": "close"},
        ) from None
    except TimeoutError:
        raise ApiError(
            408,
            "timeout",
            f"the body did not arrive within {timeout_s:g} s (BATCHER_API_BODY_TIMEOUT_S)",
            field="body",
            headers={"Connection": "close"},
        ) from None
    return b"".join(chunks)


def _too_large(size: int, limit: int, setting: str) -> ApiError:
    return ApiError(
        413,
        "too_large",
        f"the body is {'at least ' if size == limit + 1 else ''}{size:,} bytes; the limit is {limit:,} ({setting})",
        field="body",
    )


def idempotency_key(request: web.Request, body: bytes) -> IdempotencyKey | None:
    """The request's ``Idempotency-Key`` with the hash of what it asks, or ``None``.

    Raises:
        ApiError: 422 for a key that is empty, too long or not printable ASCII.
    """
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _KEY.match(key):
        raise invalid("Idempotency-Key must be 1 to 255 printable ASCII characters", field="Idempotency-Key")
    return IdempotencyKey.of(key, request.method, request.path, body)


def query_enum(request: web.Request, name: str, enum: type[E]) -> E | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in enum)
        raise invalid(f"{name} {value!r} is not one of {allowed}", field=name) from None


def query_int(request: web.Request, name: str, default: int, *, low: int, high: int) -> int:
    value = request.query.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise invalid(f"{name} must be a whole number", field=name) from None
    if not low <= number <= high:
        raise invalid(f"{name} must be between {low} and {high}", field=name)
    return number


def query_id(request: web.Request, name: str) -> str | None:
    """A cursor (a job or delivery id)."""
    value = request.query.get(name)
    if value is None or value == "":
        return None
    if not ID_PATTERN.match(value):
        raise invalid(f"{name} must be an id from a previous page (32 hex digits)", field=name)
    return value


def query_text(request: web.Request, name: str, *, max_length: int = 200) -> str | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    if len(value) > max_length or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise invalid(f"{name} must be at most {max_length} printable characters", field=name)
    return value


def check_query(request: web.Request, allowed: frozenset[str]) -> None:
    """Refuse unknown query parameters (a misspelt filter must not silently list everything)."""
    for name in request.query:
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise invalid(f"unknown query parameter {name!r} (this endpoint takes: {known})", field=name)
