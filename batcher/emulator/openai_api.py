"""HTTP layer of the emulator: OpenAI's Files and Batches API under ``/v1`` plus ``/_emulator``.

Routes::

    POST   /v1/files                    multipart upload (file, purpose, expires_after[...])
    GET    /v1/files                    list (after, limit 1..10000, order, purpose)
    GET    /v1/files/{file_id}          retrieve
    GET    /v1/files/{file_id}/content  download, streamed from disk
    DELETE /v1/files/{file_id}          delete
    POST   /v1/batches                  create
    GET    /v1/batches                  list (after, limit 1..100), newest first
    GET    /v1/batches/{batch_id}       retrieve
    POST   /v1/batches/{batch_id}/cancel
    POST   /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings, /v1/moderations
                                        real-time calls answered by the same fake models
    GET    /_emulator/stats             counters (no auth, no injected faults)
    POST   /_emulator/reset             forget everything

Every ``/v1`` call needs ``Authorization: Bearer <any key>``. Errors always have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; bad input is a 400 naming the field. The real-time calls
honour an ``Idempotency-Key`` when ``idempotency_keys`` is on (:func:`batcher.emulator.http.answer_once`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import IO, Any

import orjson
from aiohttp import BodyPartReader, web

from batcher.emulator.errors import ApiError, invalid_type, invalid_value, missing_parameter
from batcher.emulator.fake_models import SUPPORTED_ENDPOINTS, InvalidBody, fake_response
from batcher.emulator.http import Dialect, answer_once, int_query, json_response, state_of
from batcher.emulator.objects import file_object
from batcher.emulator.state import ORGANIZATION, EmulatorState

logger = logging.getLogger(__name__)

__all__ = ["BATCH_ENDPOINTS", "FILE_PURPOSES", "OpenAIDialect", "add_routes", "openai_middleware"]

BATCH_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # OpenAI's general per-file upload limit
_EXPIRES_MIN_S, _EXPIRES_MAX_S = 3600, 2_592_000
_METADATA_MAX_PAIRS, _METADATA_MAX_KEY, _METADATA_MAX_VALUE = 16, 64, 512
_READ_CHUNK = 64 * 1024
_WRITE_CHUNK = 1024 * 1024
_SMALL_FIELD_MAX = 64 * 1024
_CREATE_BATCH_FIELDS = frozenset({"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"})

# ---------------------------------------------------------------------------- middleware


def _server_error() -> ApiError:
    return ApiError(
        500, "The server had an error while processing your request. Sorry about that!", type="server_error"
    )


class OpenAIDialect(Dialect):
    """OpenAI's side of the HTTP layer: ``Authorization: Bearer`` on ``/v1``, faults cycling 429/500,
    ``x-request-id``."""

    request_id_header = "x-request-id"
    fault_cycle = ("429", "500")

    def new_request_id(self) -> str:
        return f"req_{uuid.uuid4().hex}"

    def guarded(self, path: str) -> bool:
        return path.startswith("/v1/") or path == "/v1"

    def check_auth(self, request: web.Request) -> None:
        header = request.headers.get("Authorization")
        if not header:
            raise ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header using "
                "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401, "Incorrect API key provided. Use 'Authorization: Bearer YOUR_KEY'.", code="invalid_api_key"
            )

    def fault_error(self, kind: str, state: EmulatorState) -> ApiError:
        """An injected fault: 429 (with ``Retry-After``), 503, 529 or 500."""
        if kind == "429":
            retry_after = state.settings.retry_after_s
            return ApiError(
                429,
                f"Rate limit reached for requests in organization {ORGANIZATION}. Please try again in {retry_after}s.",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry_after)},
            )
        if kind == "503":
            return ApiError(503, "The engine is currently overloaded, please try again later.", type="server_error")
        if kind == "529":
            return ApiError(529, "The server is overloaded.", type="server_error")
        return _server_error()

    def http_error(self, exc: web.HTTPException, request: web.Request) -> ApiError:
        if exc.status == 404:
            return ApiError(404, f"Invalid URL ({request.method} {request.path})")
        if exc.status == 405:
            return ApiError(405, f"Invalid method for URL ({request.method} {request.path})")
        if exc.status == 413:
            return ApiError(413, "Request body too large.")
        return ApiError(exc.status, exc.reason or "Bad request.")

    def server_error(self) -> ApiError:
        return _server_error()


#: authentication, injected faults, OpenAI-shaped errors and ``x-request-id`` on every answer
openai_middleware = OpenAIDialect().middleware()


# ---------------------------------------------------------------------------- query helpers


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    value = int_query(request, name, default, lambda raw: invalid_type(name, "an integer", raw))
    if not low <= value <= high:
        raise invalid_value(
            name, f"Invalid '{name}': expected an integer between {low} and {high}, but got {value} instead."
        )
    return value


def _list_body(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


# ---------------------------------------------------------------------------- files


async def _read_small(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(_READ_CHUNK):
        data += chunk
        if len(data) > _SMALL_FIELD_MAX:
            raise invalid_value(part.name or "form", f"Invalid '{part.name}': value too long.")
    return data.decode("utf-8", "replace").strip()


async def _stream_to_disk(part: BodyPartReader, path: Path, max_bytes: int) -> int:
    """Copy a multipart part to ``path`` in chunks; return its size."""
    fh: IO[bytes] = await asyncio.to_thread(path.open, "wb")
    size = 0
    buffer = bytearray()
    try:
        while chunk := await part.read_chunk(_READ_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"File is too large: the maximum upload size is {max_bytes} bytes.", param="file")
            buffer += chunk
            if len(buffer) >= _WRITE_CHUNK:
                await asyncio.to_thread(fh.write, bytes(buffer))
                buffer.clear()
        if buffer:
            await asyncio.to_thread(fh.write, bytes(buffer))
    finally:
        await asyncio.to_thread(fh.close)
    return size


def _parse_seconds(param: str, raw: str) -> int:
    try:
        seconds = int(raw)
    except ValueError:
        raise invalid_type(param, "an integer", raw) from None
    if not _EXPIRES_MIN_S <= seconds <= _EXPIRES_MAX_S:
        raise invalid_value(
            param,
            f"Invalid '{param}': expected a value between {_EXPIRES_MIN_S} and {_EXPIRES_MAX_S}, "
            f"but got {seconds} instead.",
        )
    return seconds


async def create_file(request: web.Request) -> web.Response:
    """``POST /v1/files``: store the uploaded file on disk, streaming."""
    state = state_of(request)
    if not request.content_type.startswith("multipart/"):
        raise invalid_value("file", "Invalid request: expected a multipart/form-data body with 'file' and 'purpose'.")
    fields: dict[str, str] = {}
    upload: tuple[str, Path, str, int] | None = None
    try:
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                raise invalid_value("file", "Invalid request: nested multipart bodies are not supported.")
            if part.name == "file" and part.filename is not None:
                if upload is not None:
                    raise invalid_value("file", "Invalid request: more than one file was sent.")
                file_id, path = state.allocate_file()
                upload = (file_id, path, part.filename, 0)
                size = await _stream_to_disk(part, path, max(MAX_UPLOAD_BYTES, state.settings.max_bytes))
                upload = (file_id, path, part.filename, size)
            elif part.name:
                fields[part.name] = await _read_small(part)
        if upload is None:
            raise missing_parameter("file")
        purpose = fields.get("purpose")
        if not purpose:
            raise missing_parameter("purpose")
        if purpose not in FILE_PURPOSES:
            raise invalid_value(
                "purpose",
                f"Invalid value for 'purpose': '{purpose}'. Supported values are: "
                + ", ".join(f"'{p}'" for p in FILE_PURPOSES)
                + ".",
            )
        file_id, path, filename, size = upload
        if purpose == "batch" and not filename.lower().endswith(".jsonl"):
            raise invalid_value("file", "Invalid file format for Batch API. Must be .jsonl")
        expires_after_s: int | None = None
        anchor = fields.get("expires_after[anchor]")
        seconds = fields.get("expires_after[seconds]")
        if anchor is not None or seconds is not None:
            if anchor != "created_at":
                raise invalid_value("expires_after.anchor", "Invalid 'expires_after.anchor': expected 'created_at'.")
            if seconds is None:
                raise missing_parameter("expires_after.seconds")
            expires_after_s = _parse_seconds("expires_after.seconds", seconds)
    except BaseException:
        if upload is not None:
            upload[1].unlink(missing_ok=True)
        raise
    record = state.register_upload(
        file_id, path, filename=filename, purpose=purpose, size=size, now=time.time(), expires_after_s=expires_after_s
    )
    logger.info("file %s uploaded (%s, %d bytes)", record.id, purpose, size)
    return json_response(file_object(record))


async def list_files(request: web.Request) -> web.Response:
    """``GET /v1/files``."""
    limit = _int_query(request, "limit", 10_000, 1, 10_000)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid_value("order", f"Invalid value for 'order': '{order}'. Supported values are: 'asc', 'desc'.")
    records, has_more = state_of(request).list_files(
        purpose=request.query.get("purpose"), order=order, after=request.query.get("after"), limit=limit
    )
    return json_response(_list_body([file_object(r) for r in records], has_more))


async def retrieve_file(request: web.Request) -> web.Response:
    """``GET /v1/files/{file_id}``."""
    return json_response(file_object(state_of(request).get_file(request.match_info["file_id"])))


async def file_content(request: web.Request) -> web.StreamResponse:
    """``GET /v1/files/{file_id}/content``: the file, streamed from disk."""
    record = state_of(request).get_file(request.match_info["file_id"])
    return web.FileResponse(record.path, headers={"Content-Type": "application/octet-stream"})


async def delete_file(request: web.Request) -> web.Response:
    """``DELETE /v1/files/{file_id}``."""
    file_id = request.match_info["file_id"]
    state_of(request).delete_file(file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})


# ---------------------------------------------------------------------------- batches


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)",
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return data


def _required_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise missing_parameter(name)
    if not isinstance(value, str):
        raise invalid_type(name, "a string", value)
    return value


def _metadata(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_type("metadata", "an object", value)
    if len(value) > _METADATA_MAX_PAIRS:
        raise ApiError(
            400,
            f"Invalid 'metadata': too many properties. Expected an object with at most {_METADATA_MAX_PAIRS} "
            f"properties, but got an object with {len(value)} properties instead.",
            param="metadata",
            code="object_above_max_properties",
        )
    for key, item in value.items():
        if len(key) > _METADATA_MAX_KEY:
            raise ApiError(
                400,
                f"Invalid 'metadata': string too long. Expected a key with maximum length {_METADATA_MAX_KEY}, "
                f"but got a key with length {len(key)} instead.",
                param="metadata",
                code="string_above_max_length",
            )
        if not isinstance(item, str):
            raise invalid_type(f"metadata.{key}", "a string", item)
        if len(item) > _METADATA_MAX_VALUE:
            raise ApiError(
                400,
                f"Invalid 'metadata.{key}': string too long. Expected a string with maximum length "
                f"{_METADATA_MAX_VALUE}, but got a string with length {len(item)} instead.",
                param=f"metadata.{key}",
                code="string_above_max_length",
            )
    return dict(value)


def _output_expires_after(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_type("output_expires_after", "an object", value)
    if value.get("anchor") != "created_at":
        raise invalid_value(
            "output_expires_after.anchor", "Invalid 'output_expires_after.anchor': expected 'created_at'."
        )
    seconds = value.get("seconds")
    if seconds is None:
        raise missing_parameter("output_expires_after.seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise invalid_type("output_expires_after.seconds", "an integer", seconds)
    return _parse_seconds("output_expires_after.seconds", str(seconds))


async def create_batch(request: web.Request) -> web.Response:
    """``POST /v1/batches``."""
    body = await _json_body(request)
    for name in body:
        if name not in _CREATE_BATCH_FIELDS:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
    input_file_id = _required_str(body, "input_file_id")
    endpoint = _required_str(body, "endpoint")
    if endpoint not in BATCH_ENDPOINTS:
        raise invalid_value(
            "endpoint",
            f"Invalid value: '{endpoint}'. Supported values are: " + ", ".join(f"'{e}'" for e in BATCH_ENDPOINTS) + ".",
        )
    window = _required_str(body, "completion_window")
    if window != "24h":
        raise invalid_value("completion_window", f"Invalid value: '{window}'. Supported values are: '24h'.")
    metadata = _metadata(body.get("metadata"))
    output_expires_after_s = _output_expires_after(body.get("output_expires_after"))
    state = state_of(request)
    now = time.time()
    batch = await state.create_batch(
        input_file_id=input_file_id,
        endpoint=endpoint,
        metadata=metadata,
        output_expires_after_s=output_expires_after_s,
        now=now,
    )
    return json_response(state.batch_json(batch, now))


async def list_batches(request: web.Request) -> web.Response:
    """``GET /v1/batches``: newest first."""
    limit = _int_query(request, "limit", 20, 1, 100)
    state = state_of(request)
    now = time.time()
    await state.advance(now)
    batches, has_more = state.list_batches(after=request.query.get("after"), limit=limit)
    return json_response(_list_body([state.batch_json(b, now) for b in batches], has_more))


async def retrieve_batch(request: web.Request) -> web.Response:
    """``GET /v1/batches/{batch_id}``."""
    state = state_of(request)
    now = time.time()
    await state.advance(now)
    return json_response(state.batch_json(state.get_batch(request.match_info["batch_id"]), now))


async def cancel_batch(request: web.Request) -> web.Response:
    """``POST /v1/batches/{batch_id}/cancel``."""
    state = state_of(request)
    now = time.time()
    batch = await state.cancel_batch(request.match_info["batch_id"], now)
    return json_response(state.batch_json(batch, now))


# ---------------------------------------------------------------------------- real-time endpoints


async def realtime(request: web.Request) -> web.Response:
    """``POST /v1/chat/completions`` and friends: one synchronous fake answer (no streaming), once per
    ``Idempotency-Key``."""
    body = await _json_body(request)
    endpoint = request.path
    if endpoint != "/v1/moderations":
        model = body.get("model")
        if model is None:
            raise missing_parameter("model")
        if not isinstance(model, str):
            raise invalid_type("model", "a string", model)
    if body.get("stream"):
        raise invalid_value("stream", "The emulator does not support streaming responses; omit 'stream'.")

    def answer() -> dict[str, Any]:
        try:
            response, _ = fake_response(
                endpoint,
                body,
                seed=state_of(request).settings.seed,
                request_key=f"realtime:{uuid.uuid4().hex}",
                created=int(time.time()),
            )
        except InvalidBody as exc:
            raise ApiError(400, exc.message, param=exc.param, code=exc.code) from None
        return response

    return answer_once(request, body, answer, lambda message: ApiError(400, message))


# ---------------------------------------------------------------------------- emulator control


async def emulator_stats(request: web.Request) -> web.Response:
    """``GET /_emulator/stats``."""
    state = state_of(request)
    await state.advance(time.time())
    return json_response(state.stats())


async def emulator_reset(request: web.Request) -> web.Response:
    """``POST /_emulator/reset``."""
    await state_of(request).reset()
    return json_response({"reset": True})


def add_routes(app: web.Application) -> None:
    """Register every route of the emulator on ``app``."""
    app.router.add_post("/v1/files", create_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", retrieve_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", retrieve_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
    for endpoint in sorted(SUPPORTED_ENDPOINTS):
        app.router.add_post(endpoint, realtime)
    app.router.add_get("/_emulator/stats", emulator_stats)
    app.router.add_post("/_emulator/reset", emulator_reset)
