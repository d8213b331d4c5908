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
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from batcher.db.engine import Database
from batcher.db.tables import jobs
from batcher.domain import JobSpec, JobState, Provider
from batcher.errors import InvalidFile, InvalidInput
from batcher.providers.base import Limits
from batcher.providers.limits import ANTHROPIC_ENDPOINT, DEFAULT_LIMITS, EMBEDDINGS_ENDPOINT
from batcher.timeutil import utcnow

logger = logging.getLogger(__name__)

#: at most this many bad lines are listed in an :class:`InvalidFile`
MAX_LISTED_ERRORS = 20
#: the jobs.custom_id column's width
MAX_CUSTOM_ID = 255
#: the most output tokens a request may ask for: far above any model's limit, but a bound the provider, the
#: estimate and the database's integers all take (a bigger value is a mistake, refused at intake)
MAX_OUTPUT_TOKENS = 2**31 - 1
#: OpenAI's output bounds: ``max_tokens`` (chat, completions), ``max_completion_tokens`` (chat),
#: ``max_output_tokens`` (responses); each is checked wherever it is given
OPENAI_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")

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
    #: the HTTP API tenant the jobs belong to (``None``: the CLI and Python doors)
    tenant: str | None = None
    #: where each job's result is POSTed once it settles (see :mod:`batcher.webhooks`)
    callback_url: str | None = None


@dataclass(frozen=True)
class ParsedLine:
    """One valid request, ready to become a row."""

    custom_id: str
    endpoint: str
    model: str
    body_json: str
    #: the body's size in bytes (UTF-8), what provider limits count
    body_bytes: int
    #: embedding inputs (1 for every other endpoint)
    inputs: int = 1

    @classmethod
    def build(cls, custom_id: str, endpoint: str, model: str, body: Any, inputs: int = 1) -> ParsedLine:
        encoded = orjson.dumps(body)
        return cls(custom_id, endpoint, model, encoded.decode(), len(encoded), inputs)


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


def _shown(value: Any) -> str:
    """A wrong value as an error message quotes it (cut short)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "…"


def _check_model(body: Any, where: str) -> str:
    if not isinstance(body, dict):
        raise InvalidInput(f"{where} must be a JSON object", field=where)
    model = body.get("model")
    if isinstance(model, str) and model:
        return model
    if model is None or model == "":
        raise InvalidInput(f"{where}.model is missing: every request needs a model", field=f"{where}.model")
    raise InvalidInput(f"{where}.model must be a string (the model name), not {_shown(model)}", field=f"{where}.model")


def _bad_tokens(value: Any, field: str) -> InvalidInput:
    return InvalidInput(f"{field} must be an integer from 1 to {MAX_OUTPUT_TOKENS:,}, not {_shown(value)}", field=field)


def _other_shape(obj: Any, provider: Provider) -> InvalidInput | None:
    """The error for a file line in the other provider's format (``None``: it is not clearly one).

    Only asked once a check has failed, so valid lines never pay for it; it replaces that first failure.
    """
    if not isinstance(obj, dict):
        return None
    if provider is Provider.OPENAI and "params" in obj and "body" not in obj and "url" not in obj:
        return InvalidInput(
            "this is an Anthropic line (custom_id, params); use --provider anthropic",
            field="provider",
        )
    if provider is Provider.ANTHROPIC and "params" not in obj and ("body" in obj or "url" in obj):
        return InvalidInput(
            "this is an OpenAI line (custom_id, method, url, body); use --provider openai",
            field="provider",
        )
    return None


def embedding_inputs(body: dict[str, Any]) -> int:
    """How many inputs an embeddings request holds: one per item of an ``input`` list (a list of token ids is one
    input), else one."""
    value = body.get("input")
    if isinstance(value, list) and value and not all(isinstance(item, int) for item in value):
        return len(value)
    return 1


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
    assert isinstance(body, dict)
    for name in OPENAI_TOKEN_FIELDS:
        value = body.get(name)
        if value is not None and (type(value) is not int or not 1 <= value <= MAX_OUTPUT_TOKENS):
            raise _bad_tokens(value, f"body.{name}")
    if not _OPENAI_FIELDS.issuperset(obj):
        extra = set(obj) - _OPENAI_FIELDS
        raise InvalidInput(f"unexpected field(s) {', '.join(sorted(extra))}", field=sorted(extra)[0])
    inputs = 1
    if url == EMBEDDINGS_ENDPOINT:
        inputs = embedding_inputs(body)
        if limits.max_inputs is not None and inputs > limits.max_inputs:
            raise InvalidInput(
                f"body.input holds {inputs:,} embedding inputs; a batch takes at most {limits.max_inputs:,}",
                field="body.input",
            )
    return ParsedLine.build(custom_id, url, model, body, inputs)


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
    if type(max_tokens) is not int or not 1 <= max_tokens <= MAX_OUTPUT_TOKENS:
        if max_tokens is None:
            raise InvalidInput(
                f"params.max_tokens is missing: Anthropic requests need one (an integer from 1 to "
                f"{MAX_OUTPUT_TOKENS:,})",
                field="params.max_tokens",
            )
        raise _bad_tokens(max_tokens, "params.max_tokens")
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


def _json_problem(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    """Why a line is not JSON: text that is not UTF-8 (orjson's own words for it point nowhere), or the parser's
    message."""
    try:
        raw.decode()
    except UnicodeDecodeError as bad:
        return (
            f"not UTF-8 text (byte 0x{raw[bad.start]:02x} at position {bad.start} of the line): "
            "batch files must be UTF-8"
        )
    return f"invalid JSON ({exc})"


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
        raise InvalidInput(_json_problem(raw, exc), line=lineno) from exc
    try:
        return PARSERS[provider](obj, limits)
    except InvalidInput as exc:
        problem = _other_shape(obj, provider) or exc
        raise InvalidInput(problem.reason, line=lineno, field=problem.field) from None


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
        # only when set: the CLI's rows keep the INSERT they had
        if defaults.tenant is not None:
            self.base["tenant"] = defaults.tenant
        if defaults.callback_url is not None:
            self.base["callback_url"] = defaults.callback_url


#: the values one row of a file has of its own; every other column is the same for all rows of one call
_PER_ROW_COLUMNS = ("id", "custom_id", "endpoint", "model", "body", "body_bytes", "inputs")


def _new_ids(count: int) -> list[str]:
    """``count`` ids in :func:`batcher.domain.new_id`'s format (48 bits of milliseconds, 80 random bits).

    One clock read and one ``urandom`` call for all of them: the jobs of a chunk share their millisecond, and
    their random parts are handed out in ascending order, so ids still follow the file's line order.
    """
    prefix = f"{int(time.time() * 1000):012x}"
    hexed = os.urandom(10 * count).hex()
    return [prefix + part for part in sorted(hexed[i : i + 20] for i in range(0, 20 * count, 20))]


@dataclass(frozen=True)
class _Insert:
    """The compiled INSERT of :class:`FileRows` for one dialect and one set of shared columns."""

    sql: str
    #: the shared columns in parameter order, each with its bind processor (or ``None``)
    shared: list[tuple[str, Callable[[Any], Any] | None]]
    #: (*per-row values, *shared values) → the statement's parameter order
    assemble: Callable[[tuple[Any, ...]], tuple[Any, ...]]


#: :class:`_Insert` by (dialect, driver, shared columns)
_INSERTS: dict[tuple[str, str, tuple[str, ...]], _Insert] = {}


def _compiled_insert(db: Database, shared: tuple[str, ...]) -> _Insert:
    """The jobs INSERT … ON CONFLICT (run, custom_id) DO NOTHING for these columns, compiled once per process.

    SQLite: one row per parameter tuple (``executemany``). PostgreSQL: every row in one statement, each
    per-row column an array parameter read with ``unnest`` (as fast as asyncpg's ``executemany``), and
    ``RETURNING id``, so the caller learns which rows were new without another query. Parameter names are the
    column names (per-row columns as arrays).

    The HTTP API stores small groups many times a second; compiling anew each time cost more than the insert.
    """
    dialect = db.engine.dialect
    key = (dialect.name, dialect.driver, shared)
    found = _INSERTS.get(key)
    if found is not None:
        return found
    if db.is_sqlite:
        stmt: Any = db.insert(jobs).on_conflict_do_nothing(index_elements=["run", "custom_id"])
        compiled = stmt.compile(dialect=dialect, column_keys=[*_PER_ROW_COLUMNS, *shared])
    else:
        arrays = [sa.bindparam(name, type_=postgresql.ARRAY(jobs.c[name].type)) for name in _PER_ROW_COLUMNS]
        rows = sa.func.unnest(*arrays).table_valued(*_PER_ROW_COLUMNS).render_derived(name="v")
        values = sa.select(*rows.c, *(sa.bindparam(name, type_=jobs.c[name].type) for name in shared))
        stmt = (
            postgresql.insert(jobs)
            .from_select([*_PER_ROW_COLUMNS, *shared], values)
            .on_conflict_do_nothing(index_elements=["run", "custom_id"])
            .returning(jobs.c.id)
        )
        compiled = stmt.compile(dialect=dialect)
    order = list(compiled.positiontup or [])
    for name in _PER_ROW_COLUMNS:
        if jobs.c[name].type.dialect_impl(dialect).bind_processor(dialect) is not None:
            raise RuntimeError(f"jobs.{name} needs per-row type processing")  # pragma: no cover - a schema change
    shared_names = [name for name in order if name not in _PER_ROW_COLUMNS]
    # a row (or, columnar, the tuple of per-row arrays) is built as (*_PER_ROW_COLUMNS, *shared), then put in the
    # statement's parameter order
    source = [*_PER_ROW_COLUMNS, *shared_names]
    found = _INSERTS[key] = _Insert(
        compiled.string,
        [(name, jobs.c[name].type.dialect_impl(dialect).bind_processor(dialect)) for name in shared_names],
        operator.itemgetter(*(source.index(name) for name in order)),
    )
    return found


class FileRows:
    """The rows of one file intake as driver-ready parameters, and the INSERT that takes them.

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
        self._columnar = not db.is_sqlite
        insert = _compiled_insert(db, tuple(builder.base))
        shared: list[Any] = []
        for name, processor in insert.shared:
            if name not in builder.base:
                raise RuntimeError(f"intake has no value for jobs.{name}")  # pragma: no cover - a schema change
            shared.append(builder.base[name] if processor is None else processor(builder.base[name]))
        self._assemble = insert.assemble
        self._shared = tuple(shared)
        self.sql: str = insert.sql

    def rows(self, lines: list[ParsedLine], ids: list[str] | None = None) -> list[tuple[Any, ...]]:
        """One parameter tuple per line, each with a new job id (``ids``, or fresh ones)."""
        assemble = self._assemble
        shared = self._shared
        return [
            assemble((job_id, p.custom_id, p.endpoint, p.model, p.body_json, p.body_bytes, p.inputs, *shared))
            for job_id, p in zip(_new_ids(len(lines)) if ids is None else ids, lines, strict=True)
        ]

    def columns(self, lines: list[ParsedLine], ids: list[str] | None = None) -> tuple[Any, ...]:
        """The parameters of the columnar (PostgreSQL) statement: one array per per-row column."""
        ids = _new_ids(len(lines)) if ids is None else ids
        per_row = (
            ids,
            [p.custom_id for p in lines],
            [p.endpoint for p in lines],
            [p.model for p in lines],
            [p.body_json for p in lines],
            [p.body_bytes for p in lines],
            [p.inputs for p in lines],
        )
        return tuple(self._assemble((*per_row, *self._shared)))

    async def insert(self, conn: AsyncConnection, lines: list[ParsedLine], ids: list[str] | None = None) -> int:
        """Insert ``lines`` as new jobs, skipping any whose (run, custom_id) is already stored; returns how many
        were inserted."""
        if not lines:
            return 0
        if self._columnar:
            result = await conn.exec_driver_sql(self.sql, self.columns(lines, ids))
            return len(result.all())
        result = await conn.exec_driver_sql(self.sql, self.rows(lines, ids))
        return result.rowcount


async def _count_run(conn: Any, run: str) -> int:
    value = await conn.scalar(sa.select(sa.func.count()).select_from(jobs).where(jobs.c.run == run))
    return int(value or 0)


def open_batch_file(path: Path) -> IO[bytes]:
    """``path`` opened for :class:`CheckedLines`.

    Raises:
        InvalidInput: it cannot be read.
    """
    try:
        return path.open("rb")
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from exc


class CheckedLines:
    """The lines of a batch file, each checked as intake checks it: :func:`parse_line`, then a custom_id already
    seen on an earlier line is refused. ``batcher submit`` and its ``--dry-run`` both read a file through this,
    so the dry run refuses exactly what the submit would.

    Iterating yields the valid lines. Each invalid one is counted (``error_count``) and either written to
    ``rejects`` (one JSON object per line: ``line``, ``error``, ``input``) or, without it, listed in ``errors``
    (the first :data:`MAX_LISTED_ERRORS`); :meth:`refusal` is then the file's :class:`InvalidFile`.

    Args:
        fh: the file, opened binary.
        provider: which format the lines are in.
        limits: the provider's limits.
        rejects: where invalid lines go (skip-invalid), or ``None`` (one invalid line refuses the file).
        progress: called with the bytes of each line read.
    """

    def __init__(
        self,
        fh: IO[bytes],
        provider: Provider,
        limits: Limits,
        *,
        rejects: IO[bytes] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._fh = fh
        self._provider = provider
        self._limits = limits
        self._rejects = rejects
        self._progress = progress
        self.errors: list[InvalidInput] = []
        self.error_count = 0

    def __iter__(self) -> Iterator[ParsedLine]:
        provider, limits, rejects, progress = self._provider, self._limits, self._rejects, self._progress
        seen: dict[str, int] = {}
        for lineno, line in enumerate(self._fh, start=1):
            raw = line.strip()
            if not raw:
                continue
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
                self.error_count += 1
                if rejects is not None:
                    rejects.write(
                        orjson.dumps({"line": lineno, "error": exc.reason, "input": raw.decode(errors="replace")})
                    )
                    rejects.write(b"\n")
                elif len(self.errors) < MAX_LISTED_ERRORS:
                    self.errors.append(exc)
                continue
            yield parsed

    def refusal(self, path: Path) -> InvalidFile | None:
        """The file's refusal once read: its invalid lines, when they were not written to rejects."""
        return InvalidFile(str(path), self.errors, self.error_count) if self.errors else None


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
    rejects: IO[bytes] | None = None
    fh = open_batch_file(path)
    try:
        if rejects_path is not None:
            rejects = rejects_path.open("wb")
        lines = CheckedLines(fh, provider, limits, rejects=rejects, progress=progress)
        async with db.engine.begin() as conn:
            before = await _count_run(conn, defaults.run)
            file_rows = FileRows(db, builder)
            chunk: list[ParsedLine] = []
            for parsed in lines:
                if lines.errors:
                    continue  # refused already: keep scanning only to list the problems
                result.received += 1
                chunk.append(parsed)
                if len(chunk) >= chunk_size:
                    await file_rows.insert(conn, chunk)
                    chunk = []
            refusal = lines.refusal(path)
            if refusal is not None:
                # the transaction is rolled back: nothing of this file is stored
                raise refusal
            await file_rows.insert(conn, chunk)
            result.inserted = await _count_run(conn, defaults.run) - before
        result.rejected = lines.error_count
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


class SpecLike(Protocol):
    """What :func:`enqueue` reads of a job: :class:`JobSpec`'s fields (the HTTP API passes a lighter object)."""

    @property
    def provider(self) -> Provider: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def custom_id(self) -> str: ...
    @property
    def body(self) -> dict[str, Any]: ...
    @property
    def run(self) -> str: ...
    @property
    def account(self) -> str | None: ...
    @property
    def tags(self) -> Mapping[str, str]: ...
    @property
    def priority(self) -> int: ...
    @property
    def not_after(self) -> datetime | None: ...


@dataclass(frozen=True)
class Enqueued:
    """What :func:`enqueue` stored.

    Attributes:
        ids: one job id per spec, in order (the stored job's id where the spec's custom_id was already in its run).
        created: for each spec, whether this call stored it.
    """

    ids: list[str]
    created: list[bool]


#: called by :func:`enqueue` inside its transaction once the rows are in (and their ids known); raising refuses
#: the whole call, which is rolled back (the HTTP API checks tenant limits and records idempotency keys here)
AfterInsert = Callable[[AsyncConnection, Enqueued], Awaitable[None]]

#: custom_ids per id lookup: SQLite's ``IN (…)`` list, PostgreSQL's array
_LOOKUP_CHUNK = 500
_PG_LOOKUP_CHUNK = 20_000


def _lookup(db: Database, run: str, custom_ids: list[str]) -> sa.Select[Any]:
    """The ids of ``run``'s jobs with these custom_ids.

    PostgreSQL joins the jobs to ``unnest(:custom_ids)``. An ``IN (…)`` list there goes wrong once asyncpg's
    prepared statement gets a generic plan (from the sixth call on) while the table has no statistics yet: a
    scan of the whole run comparing each row to every listed id, 50 times slower than the join's index probes.
    """
    if db.is_sqlite:
        return sa.select(jobs.c.id, jobs.c.custom_id).where(jobs.c.run == run, jobs.c.custom_id.in_(custom_ids))
    ids = sa.bindparam("custom_ids", custom_ids, type_=postgresql.ARRAY(sa.String()))
    wanted = sa.func.unnest(ids).table_valued("custom_id").render_derived(name="wanted")
    return sa.select(jobs.c.id, jobs.c.custom_id).select_from(
        wanted.join(jobs, sa.and_(jobs.c.run == run, jobs.c.custom_id == wanted.c.custom_id))
    )


async def enqueue_specs(db: Database, specs: Iterable[JobSpec], *, chunk_size: int = 5000) -> list[str]:
    """Store jobs given as :class:`JobSpec`; returns each spec's job id (existing id for a duplicate).

    All or nothing: an invalid spec raises :class:`InvalidInput` (``line`` = its 1-based position) and
    nothing is stored.
    """
    return (await enqueue(db, specs, chunk_size=chunk_size)).ids


async def enqueue(
    db: Database,
    specs: Iterable[SpecLike],
    *,
    chunk_size: int = 5000,
    tenant: str | None = None,
    callback_urls: Sequence[str | None] | None = None,
    after_insert: AfterInsert | None = None,
) -> Enqueued:
    """Store jobs given as :class:`JobSpec`, all or nothing, in one transaction.

    Specs that share their defaults (run, tags, priority, deadline, callback) are inserted together through
    :class:`FileRows`, the file intake's INSERT.

    Args:
        db: the database.
        specs: the jobs.
        chunk_size: rows per INSERT.
        tenant: the HTTP API tenant every job belongs to.
        callback_urls: one callback URL (or ``None``) per spec.
        after_insert: run inside the transaction once the rows are in; raising refuses the whole call.

    Raises:
        InvalidInput: a spec is invalid (``line`` = its 1-based position); nothing is stored.
    """
    now = utcnow()
    keys: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    groups: dict[tuple[Any, ...], tuple[RowBuilder, list[ParsedLine]]] = {}
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
            raise InvalidInput(
                f"duplicate custom_id {spec.custom_id!r} in run {spec.run!r}", line=position, field="custom_id"
            )
        seen.add(key)
        keys.append(key)
        callback_url = None if callback_urls is None else callback_urls[position - 1]
        group_key = (
            spec.provider,
            spec.run,
            spec.account,
            tuple(sorted(spec.tags.items())),
            spec.priority,
            spec.not_after,
            callback_url,
        )
        group = groups.get(group_key)
        if group is None:
            defaults = Defaults(spec.run, spec.account, spec.tags, spec.priority, spec.not_after, tenant, callback_url)
            group = groups[group_key] = (RowBuilder(spec.provider, defaults, now), [])
        group[1].append(parsed)
    new_ids: set[str] = set()
    found: dict[tuple[str, str], str] = {}
    async with db.engine.begin() as conn:
        every_row_new = True
        for builder, lines in groups.values():
            file_rows = FileRows(db, builder)
            run = builder.base["run"]
            for i in range(0, len(lines), chunk_size):
                part = lines[i : i + chunk_size]
                ids = _new_ids(len(part))
                if await file_rows.insert(conn, part, ids) != len(part):
                    every_row_new = False
                new_ids.update(ids)
                found.update(((run, line.custom_id), job_id) for line, job_id in zip(part, ids, strict=True))
        if not every_row_new:
            # some were stored before: every spec's id, looked up per run
            found.clear()
            by_run: dict[str, list[str]] = {}
            for run, custom_id in seen:
                by_run.setdefault(run, []).append(custom_id)
            chunk = _LOOKUP_CHUNK if db.is_sqlite else _PG_LOOKUP_CHUNK
            for run, custom_ids in by_run.items():
                for i in range(0, len(custom_ids), chunk):
                    for job_id, custom_id in await conn.execute(_lookup(db, run, custom_ids[i : i + chunk])):
                        found[(run, custom_id)] = job_id
        ordered = [found[key] for key in keys]
        result = Enqueued(ordered, [job_id in new_ids for job_id in ordered])
        if after_insert is not None:
            await after_insert(conn, result)
    return result
