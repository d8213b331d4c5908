"""Intake: validate requests and store them as queued jobs. Every door (Python, CLI, HTTP) comes through here.

A batch file is the provider's own input format, unchanged: OpenAI lines ``{custom_id, method, url, body}``,
Anthropic lines ``{custom_id, params}``. A file is stored whole or not at all (one transaction, rolled
back at the first bad line, which is named), unless the caller asks to skip invalid lines, in which case
each reject is written out with its reason. Inserting is ``ON CONFLICT (run, custom_id) DO NOTHING``, so
handing in the same file twice adds nothing.
"""

from __future__ import annotations

import logging
import operator
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from batcher.db.engine import Database
from batcher.db.tables import jobs
from batcher.domain import JobSpec, JobState, Provider, new_id
from batcher.errors import InvalidFile, InvalidInput
from batcher.providers.base import Limits
from batcher.providers.limits import ANTHROPIC_ENDPOINT, DEFAULT_LIMITS
from batcher.timeutil import utcnow

logger = logging.getLogger(__name__)

#: at most this many bad lines are listed in an :class:`InvalidFile`
MAX_LISTED_ERRORS = 20
#: the jobs.custom_id column's width
MAX_CUSTOM_ID = 255

_OPENAI_FIELDS = frozenset({"custom_id", "method", "url", "body"})
_ANTHROPIC_FIELDS = frozenset({"custom_id", "params"})


@dataclass(frozen=True)
class Defaults:
    """What every job of one intake call shares."""

    run: str = "default"
    account: str | None = None
    tags: Mapping[str, str] | None = None
    priority: int = 0
    not_after: datetime | None = None


@dataclass(frozen=True)
class ParsedLine:
    """One valid request, ready to become a row."""

    custom_id: str
    endpoint: str
    model: str
    body_json: str
    #: the body's size in bytes (UTF-8), what provider limits count
    body_bytes: int

    @classmethod
    def build(cls, custom_id: str, endpoint: str, model: str, body: Any) -> ParsedLine:
        encoded = orjson.dumps(body)
        return cls(custom_id, endpoint, model, encoded.decode(), len(encoded))


@dataclass
class IntakeResult:
    """What an intake call did.

    Attributes:
        run: the run the jobs joined.
        received: valid requests seen.
        inserted: new jobs stored (``received - inserted`` were already in the run).
        rejected: invalid lines skipped (only with skip-invalid).
        job_ids: ids of new jobs, for single enqueues (empty for files).
    """

    run: str
    received: int = 0
    inserted: int = 0
    rejected: int = 0

    @property
    def duplicates(self) -> int:
        return self.received - self.inserted


def _check_custom_id(value: Any, limits: Limits) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput("custom_id is missing or not a non-empty string", field="custom_id")
    if len(value) > MAX_CUSTOM_ID:
        raise InvalidInput(f"custom_id is longer than {MAX_CUSTOM_ID} characters", field="custom_id")
    if limits.custom_id_pattern is not None and not limits.custom_id_pattern.match(value):
        raise InvalidInput(
            f"custom_id {value!r} would be rejected by the provider: it must match {limits.custom_id_pattern.pattern}",
            field="custom_id",
        )
    return value


def _check_model(body: Any, where: str) -> str:
    if not isinstance(body, dict):
        raise InvalidInput(f"{where} must be a JSON object", field=where)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidInput(f"{where}.model is missing: every request needs a model", field=f"{where}.model")
    return model


def parse_openai_request(obj: Any, limits: Limits) -> ParsedLine:
    """Check one OpenAI batch line (``{custom_id, method, url, body}``).

    Raises:
        InvalidInput: naming the field that is wrong.
    """
    if not isinstance(obj, dict):
        raise InvalidInput("a line must be a JSON object")
    custom_id = _check_custom_id(obj.get("custom_id"), limits)
    method = obj.get("method", "POST")
    if method != "POST":
        raise InvalidInput(f"method must be POST, not {method!r}", field="method")
    url = obj.get("url")
    if not isinstance(url, str) or url not in limits.endpoints:
        allowed = ", ".join(sorted(limits.endpoints))
        raise InvalidInput(f"url {url!r} is not a supported batch endpoint (use one of {allowed})", field="url")
    body = obj.get("body")
    model = _check_model(body, "body")
    if not _OPENAI_FIELDS.issuperset(obj):
        extra = set(obj) - _OPENAI_FIELDS
        raise InvalidInput(f"unexpected field(s) {', '.join(sorted(extra))}", field=sorted(extra)[0])
    return ParsedLine.build(custom_id, url, model, body)


def parse_anthropic_request(obj: Any, limits: Limits) -> ParsedLine:
    """Check one Anthropic Message Batches request (``{custom_id, params}``).

    Raises:
        InvalidInput: naming the field that is wrong.
    """
    if not isinstance(obj, dict):
        raise InvalidInput("a line must be a JSON object")
    custom_id = _check_custom_id(obj.get("custom_id"), limits)
    params = obj.get("params")
    model = _check_model(params, "params")
    assert isinstance(params, dict)
    max_tokens = params.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidInput("params.max_tokens must be an integer >= 1", field="params.max_tokens")
    if not isinstance(params.get("messages"), list):
        raise InvalidInput("params.messages must be a list", field="params.messages")
    if params.get("stream"):
        raise InvalidInput("params.stream is not allowed in a batch", field="params.stream")
    if not _ANTHROPIC_FIELDS.issuperset(obj):
        extra = set(obj) - _ANTHROPIC_FIELDS
        raise InvalidInput(f"unexpected field(s) {', '.join(sorted(extra))}", field=sorted(extra)[0])
    return ParsedLine.build(custom_id, ANTHROPIC_ENDPOINT, model, params)


PARSERS: dict[Provider, Callable[[Any, Limits], ParsedLine]] = {
    Provider.OPENAI: parse_openai_request,
    Provider.ANTHROPIC: parse_anthropic_request,
}


def parse_line(raw: bytes, provider: Provider, limits: Limits, lineno: int | None = None) -> ParsedLine:
    """Parse and check one line of a provider batch file.

    Raises:
        InvalidInput: with ``line`` set to ``lineno``.
    """
    if limits.max_line_bytes is not None and len(raw) > limits.max_line_bytes:
        raise InvalidInput(
            f"line is {len(raw)} bytes; the provider accepts at most {limits.max_line_bytes}", line=lineno
        )
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"invalid JSON ({exc})", line=lineno) from exc
    try:
        return PARSERS[provider](obj, limits)
    except InvalidInput as exc:
        raise InvalidInput(exc.reason, line=lineno, field=exc.field) from None


class RowBuilder:
    """Turns parsed lines into ``jobs`` rows sharing one intake call's defaults and timestamp."""

    def __init__(self, provider: Provider, defaults: Defaults, now: datetime) -> None:
        self.base: dict[str, Any] = {
            "run": defaults.run,
            "provider": provider.value,
            "account": defaults.account or provider.value,
            "tags": dict(defaults.tags or {}),
            "priority": defaults.priority,
            "not_after": defaults.not_after,
            "state": JobState.QUEUED.value,
            "attempts": 0,
            "created_at": now,
            "queued_at": now,
            "updated_at": now,
        }

    def row(self, line: ParsedLine) -> dict[str, Any]:
        row = dict(self.base)
        row["id"] = new_id()
        row["custom_id"] = line.custom_id
        row["endpoint"] = line.endpoint
        row["model"] = line.model
        row["body"] = line.body_json
        row["body_bytes"] = line.body_bytes
        return row


#: the values one row of a file has of its own; every other column is the same for all rows of one call
_PER_ROW_COLUMNS = ("id", "custom_id", "endpoint", "model", "body", "body_bytes")


def _new_ids(count: int) -> list[str]:
    """``count`` ids in :func:`batcher.domain.new_id`'s format (48 bits of milliseconds, 80 random bits).

    One clock read and one ``urandom`` call for all of them: the jobs of a chunk share their millisecond, and
    their random parts are handed out in ascending order, so ids still follow the file's line order.
    """
    prefix = f"{int(time.time() * 1000):012x}"
    hexed = os.urandom(10 * count).hex()
    return [prefix + part for part in sorted(hexed[i : i + 20] for i in range(0, 20 * count, 20))]


class FileRows:
    """The rows of one file intake as driver-ready parameter tuples, and the INSERT that takes them.

    SQLAlchemy would run every value of every row dict through its column type's bind processor (UTC
    datetimes, JSON tags) and then turn the dict into a tuple: more time than reading and checking the
    file. All rows of one call share those values, so they are processed here once, by the same
    processors, and each row only adds its id, custom_id, endpoint, model and body. The statement is
    SQLAlchemy's own dialect INSERT … ON CONFLICT (run, custom_id) DO NOTHING, compiled once.

    Args:
        db: the database (its dialect decides the SQL and the value processing).
        builder: the values shared by every row (its ``base``).
    """

    def __init__(self, db: Database, builder: RowBuilder) -> None:
        dialect = db.engine.dialect
        stmt = db.insert(jobs).on_conflict_do_nothing(index_elements=["run", "custom_id"])
        compiled = stmt.compile(dialect=dialect, column_keys=[*_PER_ROW_COLUMNS, *builder.base])
        order: list[str] = list(compiled.positiontup or [])
        shared_names = [name for name in order if name not in _PER_ROW_COLUMNS]
        shared: list[Any] = []
        for name in shared_names:
            if name not in builder.base:
                raise RuntimeError(f"intake has no value for jobs.{name}")  # pragma: no cover - a schema change
            processor = jobs.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            shared.append(builder.base[name] if processor is None else processor(builder.base[name]))
        for name in _PER_ROW_COLUMNS:
            if jobs.c[name].type.dialect_impl(dialect).bind_processor(dialect) is not None:
                raise RuntimeError(f"jobs.{name} needs per-row type processing")  # pragma: no cover
        # a row is built as (*_PER_ROW_COLUMNS, *shared), then put in the statement's parameter order
        source = [*_PER_ROW_COLUMNS, *shared_names]
        self._assemble = operator.itemgetter(*(source.index(name) for name in order))
        self._shared = tuple(shared)
        self.sql: str = compiled.string

    def rows(self, lines: list[ParsedLine]) -> list[tuple[Any, ...]]:
        """One parameter tuple per line, each with a new job id."""
        assemble = self._assemble
        shared = self._shared
        return [
            assemble((job_id, p.custom_id, p.endpoint, p.model, p.body_json, p.body_bytes, *shared))
            for job_id, p in zip(_new_ids(len(lines)), lines, strict=True)
        ]

    async def insert(self, conn: AsyncConnection, lines: list[ParsedLine]) -> None:
        """Insert ``lines`` as new jobs, skipping any whose (run, custom_id) is already stored."""
        if lines:
            await conn.exec_driver_sql(self.sql, self.rows(lines))


async def _insert_chunks(db: Database, conn: Any, chunks: Iterable[list[dict[str, Any]]]) -> None:
    stmt = db.insert(jobs).on_conflict_do_nothing(index_elements=["run", "custom_id"])
    for chunk in chunks:
        if chunk:
            await conn.execute(stmt, chunk)


async def _count_run(conn: Any, run: str) -> int:
    value = await conn.scalar(sa.select(sa.func.count()).select_from(jobs).where(jobs.c.run == run))
    return int(value or 0)


def _iter_lines(fh: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    for lineno, raw in enumerate(fh, start=1):
        stripped = raw.strip()
        if stripped:
            yield lineno, stripped


async def submit_file(
    db: Database,
    path: Path,
    provider: Provider,
    defaults: Defaults,
    *,
    limits: Limits | None = None,
    rejects_path: Path | None = None,
    chunk_size: int = 5000,
    progress: Callable[[int], None] | None = None,
) -> IntakeResult:
    """Store every request of a provider batch file as a queued job, streaming the file.

    Args:
        db: the database.
        path: the batch file (JSONL in the provider's input format).
        provider: which format the lines are in.
        defaults: run, tags, priority and deadline for every job.
        limits: the provider's limits (default: its published ones).
        rejects_path: skip invalid lines and write each, with its reason, to this JSONL file.
            Without it one invalid line refuses the whole file.
        chunk_size: rows per INSERT.
        progress: called with the number of bytes read since the last call.

    Raises:
        InvalidFile: the file has invalid lines (each named) and ``rejects_path`` was not given.
        InvalidInput: the file cannot be read.
    """
    limits = limits or DEFAULT_LIMITS[provider]
    builder = RowBuilder(provider, defaults, utcnow())
    result = IntakeResult(run=defaults.run)
    errors: list[InvalidInput] = []
    error_count = 0
    seen: dict[str, int] = {}
    rejects: IO[bytes] | None = None
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from exc
    try:
        if rejects_path is not None:
            rejects = rejects_path.open("wb")
        async with db.engine.begin() as conn:
            before = await _count_run(conn, defaults.run)
            file_rows = FileRows(db, builder)
            chunk: list[ParsedLine] = []
            for lineno, raw in _iter_lines(fh):
                if progress is not None:
                    progress(len(raw) + 1)
                try:
                    parsed = parse_line(raw, provider, limits, lineno)
                    first = seen.setdefault(parsed.custom_id, lineno)
                    if first != lineno:
                        raise InvalidInput(
                            f"duplicate custom_id {parsed.custom_id!r} (first on line {first})",
                            line=lineno,
                            field="custom_id",
                        )
                except InvalidInput as exc:
                    error_count += 1
                    if rejects is not None:
                        rejects.write(
                            orjson.dumps({"line": lineno, "error": exc.reason, "input": raw.decode(errors="replace")})
                        )
                        rejects.write(b"\n")
                        continue
                    if len(errors) < MAX_LISTED_ERRORS:
                        errors.append(exc)
                    continue
                if errors:
                    continue  # refused already: keep scanning only to list the problems
                result.received += 1
                chunk.append(parsed)
                if len(chunk) >= chunk_size:
                    await file_rows.insert(conn, chunk)
                    chunk = []
            if errors:
                # the transaction is rolled back: nothing of this file is stored
                raise InvalidFile(str(path), errors, error_count)
            await file_rows.insert(conn, chunk)
            result.inserted = await _count_run(conn, defaults.run) - before
        result.rejected = error_count
    finally:
        fh.close()
        if rejects is not None:
            rejects.close()
    logger.info(
        "intake %s: %d received, %d new, %d rejected (run %s)",
        path,
        result.received,
        result.inserted,
        result.rejected,
        defaults.run,
    )
    return result


async def enqueue_specs(db: Database, specs: Iterable[JobSpec], *, chunk_size: int = 5000) -> list[str]:
    """Store jobs given as :class:`JobSpec`; returns each spec's job id (existing id for a duplicate).

    All or nothing: an invalid spec raises :class:`InvalidInput` (``line`` = its 1-based position) and
    nothing is stored.
    """
    now = utcnow()
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for position, spec in enumerate(specs, start=1):
        limits = DEFAULT_LIMITS[spec.provider]
        if spec.provider is Provider.OPENAI:
            obj: dict[str, Any] = {"custom_id": spec.custom_id, "url": spec.endpoint, "body": spec.body}
        else:
            obj = {"custom_id": spec.custom_id, "params": spec.body}
        try:
            parsed = PARSERS[spec.provider](obj, limits)
        except InvalidInput as exc:
            raise InvalidInput(exc.reason, line=position, field=exc.field) from None
        if parsed.model != spec.model:
            raise InvalidInput(
                f"model {spec.model!r} differs from the body's model {parsed.model!r}", line=position, field="model"
            )
        key = (spec.run, spec.custom_id)
        if key in seen:
            raise InvalidInput(f"duplicate custom_id {spec.custom_id!r} in run {spec.run!r}", line=position)
        seen.add(key)
        defaults = Defaults(spec.run, spec.account, spec.tags, spec.priority, spec.not_after)
        rows.append(RowBuilder(spec.provider, defaults, now).row(parsed))
    async with db.engine.begin() as conn:
        await _insert_chunks(db, conn, (rows[i : i + chunk_size] for i in range(0, len(rows), chunk_size)))
        ids: list[str] = []
        for i in range(0, len(rows), 500):
            part = rows[i : i + 500]
            lookup = {
                (r.run, r.custom_id): r.id
                for r in await conn.execute(
                    sa.select(jobs.c.id, jobs.c.run, jobs.c.custom_id).where(
                        sa.tuple_(jobs.c.run, jobs.c.custom_id).in_([(r["run"], r["custom_id"]) for r in part])
                    )
                )
            }
            ids.extend(lookup[(r["run"], r["custom_id"])] for r in part)
    return ids
