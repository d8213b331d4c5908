"""``/openapi.json``: generated from the route table and the same pydantic models that validate requests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

import batcher
from batcher.api.models import ErrorOut, JobIn

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_ERROR_TEXT = {
    400: "malformed request",
    401: "missing, invalid or revoked API key",
    402: "the tenant's monthly budget would be exceeded",
    403: "the key may not do this",
    404: "not found (or another tenant's)",
    409: "conflict (an idempotency key reused, a job past cancelling)",
    413: "the body is over the size limit",
    422: "invalid request: the error names the field",
    429: "the tenant has as many unsettled jobs as it may",
    503: "the database is unavailable",
}


@dataclass(frozen=True)
class Param:
    """A query, path or header parameter."""

    name: str
    where: Literal["query", "path", "header"]
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": self.where,
            "description": self.description,
            "required": self.required or self.where == "path",
            "schema": self.schema,
        }


IDEMPOTENCY = Param(
    "Idempotency-Key",
    "header",
    "a retried POST with the same key returns the first answer and never makes a second job",
    {"type": "string", "maxLength": 255},
)


@dataclass(frozen=True)
class Route:
    """One endpoint: how it is served and how ``/openapi.json`` describes it."""

    method: str
    path: str
    handler: Handler
    summary: str
    operation_id: str
    request: type[BaseModel] | None = None
    #: the body is a JSON array of ``request`` or JSON Lines of it
    bulk: bool = False
    response: type[BaseModel] | None = None
    status: int = 200
    params: tuple[Param, ...] = ()
    #: ``application/x-ndjson`` for streamed results
    media_type: str = "application/json"
    errors: tuple[int, ...] = (401, 422)
    #: a text body (Prometheus)
    text: bool = False


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _models(routes: Iterable[Route]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    found: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(ErrorOut, "serialization"): None}
    for r in routes:
        if r.request is not None:
            found[(r.request, "validation")] = None
        if r.response is not None:
            found[(r.response, "serialization")] = None
    return list(found)


def _operation(route: Route, public: bool) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": route.summary, "operationId": route.operation_id}
    if route.params:
        op["parameters"] = [p.to_json() for p in route.params]
    if route.request is not None:
        schema = _ref(route.request)
        if route.bulk:
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"type": "array", "items": schema, "minItems": 1}},
                    "application/x-ndjson": {"schema": {"type": "string", "description": "one job (JSON) per line"}},
                },
            }
        else:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    ok: dict[str, Any] = {"description": "OK" if route.status == 200 else "accepted: committed to the database"}
    if route.status == 204:
        ok = {"description": "done"}
    elif route.text:
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
    elif route.response is not None:
        schema = _ref(route.response)
        if route.media_type != "application/json":
            schema = {"type": "string", "description": f"one {route.response.__name__} (JSON) per line"}
        ok["content"] = {route.media_type: {"schema": schema}}
    responses: dict[str, Any] = {str(route.status): ok}
    codes = set(route.errors) - ({401} if public else set())
    for code in sorted(codes):
        responses[str(code)] = {
            "description": _ERROR_TEXT.get(code, "error"),
            "content": {"application/json": {"schema": _ref(ErrorOut)}},
        }
    op["responses"] = responses
    if public:
        op["security"] = []
    return op


def build_openapi(routes: Sequence[Route], *, public_paths: frozenset[str]) -> bytes:
    """The OpenAPI 3.1 document for ``routes``, as JSON bytes."""
    _, schemas = models_json_schema(_models(routes), ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, route.path in public_paths)
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "batcher",
            "version": batcher.__version__,
            "description": "Queue latency-tolerant LLM requests into provider batch APIs; read results, costs and "
            "savings. Every call but /healthz and /openapi.json needs Authorization: Bearer <key>. "
            f"A job is a {JobIn.__name__}.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
    return orjson.dumps(doc)
