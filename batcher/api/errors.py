"""Errors as the HTTP API answers them: ``{"error": {"type", "message", "field", "line", "errors"}}``.

Every failure a caller can cause is a 4xx that says what was wrong and names the field; batcher's own errors are
translated here (``InvalidInput`` → 422, ``NotFound`` → 404, ``StateConflict`` → 409, tenant limits → 429 and
402). A 5xx means batcher itself failed (503 while the database is unreachable).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from batcher.errors import InvalidInput

JSON = "application/json"
#: problems listed in one answer
MAX_LISTED = 50


class ApiError(Exception):
    """An answer other than success, raised anywhere in a handler.

    Args:
        status: the HTTP status.
        type_: a short machine-readable word (``invalid_request``, ``not_found``…).
        message: what was wrong and how to fix it.
        field: the first field at fault.
        line: for bulk requests, the first bad job's 1-based position.
        errors: every problem found, each ``{"field", "message", "line"?}``.
        headers: extra response headers.
        extra: more members of the error object (an over-budget answer's amounts).
    """

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        field: str | None = None,
        line: int | None = None,
        errors: Sequence[Mapping[str, Any]] = (),
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.field = field
        self.line = line
        self.errors = list(errors)
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message, "field": self.field}
        if self.line is not None:
            error["line"] = self.line
        error["errors"] = self.errors or [
            {"field": self.field, "message": self.message} | ({} if self.line is None else {"line": self.line})
        ]
        error.update(self.extra)
        return {"error": error}

    def response(self) -> web.Response:
        response = web.Response(
            status=self.status, body=orjson.dumps(self.body()), content_type=JSON, headers=self.headers or None
        )
        if self.headers.get("Connection") == "close":
            response.force_close()  # the rest of the body is not waited for
        return response


def invalid(message: str, *, field: str | None = None, line: int | None = None) -> ApiError:
    return ApiError(422, "invalid_request", message, field=field, line=line)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"no {what}")


def _dotted(loc: Sequence[int | str]) -> str | None:
    parts = [str(p) for p in loc]
    return ".".join(parts) if parts else None


def _message(error: Mapping[str, Any]) -> str:
    msg = str(error.get("msg", "invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if error.get("type") == "extra_forbidden":
        msg = "unknown field: not part of this request (check its spelling)"
    return msg


#: the error type of a job in the other provider's shape (:class:`batcher.api.models.JobIn`): located at the job's
#: ``provider``, whichever field gave it away
PROVIDER_MISMATCH = "provider_mismatch"


def _located(error: Mapping[str, Any]) -> tuple[list[int | str], str]:
    """An error's location and message; a job in the other provider's shape is named at its ``provider``."""
    loc = list(error["loc"])
    if error["type"] == PROVIDER_MISMATCH:
        return [*loc[:-1], "provider"], _message(error)
    job = error.get("input")
    if (
        error["type"] == "missing"
        and loc[-1:] == ["body"]
        and isinstance(job, dict)
        and "params" in job
        and job.get("provider") == "openai"
    ):
        # an Anthropic batch line ({custom_id, params}) sent as an OpenAI job
        message = 'this is an Anthropic request (params): set provider to "anthropic" and send its params as body'
        return [*loc[:-1], "provider"], message
    return loc, _message(error)


def from_validation(
    exc: ValidationError, *, prefix: str = "", line: int | None = None, items: bool = False
) -> ApiError:
    """A pydantic error → 422 naming every field at fault.

    Args:
        exc: the validation error.
        prefix: put before every field name.
        line: the bulk position the whole error belongs to (JSONL lines are validated one by one).
        items: the model was a list of jobs: the first part of each location is the 0-based position.
    """
    found: list[dict[str, Any]] = []
    for e in exc.errors(include_url=False)[:MAX_LISTED]:
        loc, message = _located(e)
        where = line
        if items and loc and isinstance(loc[0], int):
            where = int(loc.pop(0)) + 1
        field = _dotted([prefix, *loc] if prefix else loc)
        item: dict[str, Any] = {"field": field, "message": message}
        if where is not None:
            item["line"] = where
        found.append(item)
    first: dict[str, Any] = found[0] if found else {"field": None, "message": "invalid request"}
    where_text = f"job {first['line']}: " if first.get("line") is not None else ""
    field_text = f"{first['field']}: " if first["field"] else ""
    total = exc.error_count()
    more = f" (and {total - 1} more problem(s), listed in errors)" if total > 1 else ""
    return ApiError(
        422,
        "invalid_request",
        f"{where_text}{field_text}{first['message']}{more}",
        field=first["field"],
        line=first.get("line"),
        errors=found,
    )


def from_intake(exc: InvalidInput, *, bulk: bool = False) -> ApiError:
    """A job intake refused → 422 in the API's words.

    Intake names an Anthropic request's fields ``params.…``; over HTTP they are the job's ``body.…``, in the field
    and in the message. In a bulk request the message starts with the job's position (``job 2: …``), as a
    validation error's does.
    """
    field, reason = exc.field, exc.reason
    if field is not None and (field == "params" or field.startswith("params.")):
        field = "body" + field[len("params") :]
        if reason.startswith("params"):
            reason = "body" + reason[len("params") :]
    line = exc.line
    item: dict[str, Any] = {"field": field, "message": reason}
    if line is not None:
        item["line"] = line
    message = f"job {line}: {reason}" if bulk and line is not None else reason
    return ApiError(422, "invalid_request", message, field=field, line=line, errors=[item])
