"""Savings: ``batcher savings`` (:func:`batcher.ledger.savings`) over a 1,000,000-entry cost ledger.

Goal: the report in total and ``by="model"`` comes back in under 300 ms on PostgreSQL and under 2 s on SQLite
(p50 of 5). The baseline column is the raw driver running just the aggregate the report needs
(``SELECT count(*), sum(actual_usd), sum(realtime_usd), sum(input_tokens), sum(output_tokens), sum(unpriced)
FROM ledger``, and the same ``GROUP BY model``); the ratio (``baseline / ours``) shows batcher's overhead on
top of it, the target is the absolute bound.

The ledger is generated with the raw driver (``sqlite3`` ``executemany`` / ``asyncpg`` COPY) into a migrated
database, outside the timing: one job row per entry (the ledger's foreign key; tiny bodies, since no report
reads them), entries spread evenly over 30 days in settling order, 10 models with skewed shares (one of them
unpriced: NULL amounts, ~2% of entries), 50 runs, 5 tag values, 2% real-time fallbacks at full price.
Amounts are in the ledger's Money format: integer picodollars on SQLite, ``NUMERIC(24, 12)`` on PostgreSQL.
PostgreSQL gets ``VACUUM ANALYZE`` after the load, as autovacuum would give a ledger at rest.

Full mode: 1,000,000 entries; quick: 100,000.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from batcher.db.engine import Database
from batcher.ledger import SavingsReport, savings
from bench.common import (
    Result,
    Stopwatch,
    asyncpg_dsn,
    fresh_postgres_database,
    info,
    median,
    migrated,
    postgres_url,
    raw_sqlite,
    remove_sqlite,
    run_async,
    sqlite_path,
)

LIMIT_MS = {"sqlite": 2000.0, "postgres": 300.0}
REPEATS = 5
DAYS = 30
SEED = 20240601


@dataclass(frozen=True)
class Model:
    provider: str
    name: str
    #: picodollars per token (``$/Mtok * 1e6``); ``None``: unpriced
    input_pico: int | None
    cached_pico: int | None
    output_pico: int | None
    share: int
    embeddings: bool = False


MODELS = (
    Model("openai", "gpt-4o-mini", 150_000, 75_000, 600_000, 30),
    Model("openai", "gpt-4.1-mini", 400_000, 100_000, 1_600_000, 15),
    Model("openai", "gpt-4o", 2_500_000, 1_250_000, 10_000_000, 10),
    Model("openai", "gpt-4.1-nano", 100_000, 25_000, 400_000, 10),
    Model("openai", "gpt-4.1", 2_000_000, 500_000, 8_000_000, 8),
    Model("openai", "text-embedding-3-small", 20_000, 20_000, 0, 8, embeddings=True),
    Model("openai", "o4-mini", 1_100_000, 275_000, 4_400_000, 6),
    Model("anthropic", "claude-3-5-haiku-latest", 800_000, 80_000, 4_000_000, 6),
    Model("anthropic", "claude-sonnet-4-0", 3_000_000, 300_000, 15_000_000, 5),
    Model("openai", "ft:gpt-4o-mini:acme::b3nch", None, None, None, 2),
)
TEAMS = ("search", "support", "eval", "ingest", "research")
RUNS = tuple(f"run-{i:02d}" for i in range(50))

JOB_COLUMNS = (
    "id",
    "run",
    "provider",
    "account",
    "endpoint",
    "model",
    "custom_id",
    "body",
    "body_bytes",
    "tags",
    "priority",
    "state",
    "attempts",
    "created_at",
    "queued_at",
    "updated_at",
    "settled_at",
)
LEDGER_COLUMNS = (
    "job_id",
    "attempt",
    "batch_id",
    "provider",
    "account",
    "model",
    "run",
    "tags",
    "mode",
    "input_tokens",
    "cached_input_tokens",
    "cache_creation_tokens",
    "cache_creation_1h_tokens",
    "output_tokens",
    "reasoning_tokens",
    "actual_usd",
    "realtime_usd",
    "batch_price_derived",
    "price_source",
    "price_version",
    "settled_at",
)


def generate(n: int, *, sqlite: bool) -> Iterator[tuple[tuple[Any, ...], tuple[Any, ...]]]:
    """``n`` (job row, ledger row) pairs in column order, deterministic, in settling order.

    SQLite gets timestamps as SQLAlchemy stores them (naive UTC text) and integer picodollars; PostgreSQL
    naive datetimes and Decimals.
    """
    rng = random.Random(SEED)
    end = datetime(2026, 6, 1, tzinfo=UTC).replace(tzinfo=None)
    start = end - timedelta(days=DAYS)
    step_us = DAYS * 86_400 * 1_000_000 / n
    models = rng.choices(MODELS, weights=[m.share for m in MODELS], k=n)
    runs = rng.choices(RUNS, weights=[1 / (i + 1) for i in range(len(RUNS))], k=n)
    tags = [orjson.dumps({"team": t}).decode() for t in TEAMS]
    bodies = {m.name: orjson.dumps({"model": m.name}).decode() for m in MODELS}
    epoch = datetime(1970, 1, 1)
    batch_id = ""
    for i in range(n):
        model = models[i]
        settled = start + timedelta(microseconds=int(i * step_us) + rng.randrange(1000))
        millis = (settled - epoch) // timedelta(milliseconds=1)
        job_id = f"{millis:012x}{rng.getrandbits(80):020x}"
        if i % 5000 == 0:
            batch_id = f"{millis:012x}{rng.getrandbits(80):020x}"
        realtime_mode = rng.random() < 0.02
        input_tokens = rng.randint(50, 4000)
        cached = input_tokens // 2 if rng.random() < 0.2 else 0
        output_tokens = 0 if model.embeddings else rng.randint(5, 800)
        reasoning = output_tokens // 2 if model.name.startswith("o4") else 0
        if model.input_pico is None or model.cached_pico is None or model.output_pico is None:
            actual: Any = None
            realtime: Any = None
            source = version = None
        else:
            realtime = (
                (input_tokens - cached) * model.input_pico
                + cached * model.cached_pico
                + output_tokens * model.output_pico
            )
            actual = realtime if realtime_mode else realtime // 2
            source, version = "genai-prices", "genai-prices 0.0.40"
            if not sqlite:
                actual, realtime = Decimal(actual).scaleb(-12), Decimal(realtime).scaleb(-12)
        when: Any = settled.isoformat(" ", "microseconds") if sqlite else settled
        tag = tags[i % len(TEAMS)]
        body = bodies[model.name]
        endpoint = "/v1/embeddings" if model.embeddings else "/v1/chat/completions"
        run = runs[i]
        job = (
            job_id,
            run,
            model.provider,
            model.provider,
            endpoint,
            model.name,
            f"req-{i:08d}",
            body,
            len(body),
            tag,
            0,
            "succeeded",
            1,
            when,
            when,
            when,
            when,
        )
        entry = (
            job_id,
            1,
            None if realtime_mode else batch_id,
            model.provider,
            model.provider,
            model.name,
            run,
            tag,
            "realtime" if realtime_mode else "batch",
            input_tokens,
            cached,
            0,
            0,
            output_tokens,
            reasoning,
            actual,
            realtime,
            False,
            source,
            version,
            when,
        )
        yield job, entry


def _chunks(pairs: Iterator[tuple[tuple[Any, ...], tuple[Any, ...]]], size: int = 50_000) -> Iterator[list[Any]]:
    """Rows a chunk at a time, so a million of them never sit in memory at once."""
    chunk: list[Any] = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def load_sqlite(db_path: Path, n: int) -> float:
    """Fill the ledger (and its jobs) with the raw driver; returns seconds."""
    conn = raw_sqlite(db_path)
    try:
        with Stopwatch() as sw:
            conn.execute("BEGIN")
            for rows in _chunks(generate(n, sqlite=True)):
                conn.executemany(_insert_sql("jobs", JOB_COLUMNS), [job for job, _ in rows])
                conn.executemany(_insert_sql("ledger", LEDGER_COLUMNS), [entry for _, entry in rows])
            conn.execute("COMMIT")
    finally:
        conn.close()
    return sw.elapsed_s


async def load_postgres(url: str, n: int) -> float:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        with Stopwatch() as sw:
            async with conn.transaction():
                for rows in _chunks(generate(n, sqlite=False)):
                    await conn.copy_records_to_table("jobs", records=[job for job, _ in rows], columns=JOB_COLUMNS)
                    await conn.copy_records_to_table("ledger", records=[e for _, e in rows], columns=LEDGER_COLUMNS)
            await conn.execute("VACUUM ANALYZE jobs")
            await conn.execute("VACUUM ANALYZE ledger")
    finally:
        await conn.close()
    return sw.elapsed_s


# -- the measurements -----------------------------------------------------------------------------------------------

_MEASURES = (
    "count(*), sum(actual_usd), sum(realtime_usd), sum(input_tokens), sum(output_tokens), "
    "sum(CASE WHEN actual_usd IS NULL THEN 1 ELSE 0 END)"
)
RAW_TOTAL = f"SELECT {_MEASURES} FROM ledger"
RAW_BY_MODEL = f"SELECT model, {_MEASURES} FROM ledger GROUP BY model ORDER BY model"


@dataclass
class Timings:
    ours_total_ms: list[float]
    ours_model_ms: list[float]
    raw_total_ms: list[float]
    raw_model_ms: list[float]

    def results(self, engine: str) -> list[Result]:
        limit = LIMIT_MS[engine]
        return [
            Result.within(
                f"savings.{engine}.total", median(self.ours_total_ms), median(self.raw_total_ms), "ms", limit
            ),
            Result.within(
                f"savings.{engine}.by_model", median(self.ours_model_ms), median(self.raw_model_ms), "ms", limit
            ),
        ]


async def _ours(db: Database, by: str | None) -> tuple[float, SavingsReport]:
    async with db.engine.connect() as conn:
        with Stopwatch() as sw:
            report = await savings(conn, by=by)
    return sw.elapsed_s * 1000, report


def _check(report: SavingsReport, n: int, raw_total: tuple[Any, ...], *, sqlite: bool) -> None:
    actual = Decimal(raw_total[1]).scaleb(-12) if sqlite else raw_total[1]
    if report.totals.jobs != n or report.totals.actual_usd != actual:
        raise AssertionError(f"savings: {report.totals} differs from the raw sums {raw_total} over {n} entries")


async def _sqlite(tmp: Path, n: int) -> list[Result]:
    db_path = tmp / "ledger.db"
    url = f"sqlite+aiosqlite:///{db_path}"
    await migrated(url)
    load_s = load_sqlite(sqlite_path(url), n)
    info("savings.sqlite.load", n / load_s, "entries/s", f"{n:,} ledger entries and their jobs, sqlite3 executemany")
    timings = Timings([], [], [], [])
    db = Database(url)
    conn = raw_sqlite(db_path)
    try:
        async with db.engine.connect() as warm:
            await warm.exec_driver_sql("SELECT 1")
        for _ in range(REPEATS):
            ms, report = await _ours(db, None)
            timings.ours_total_ms.append(ms)
            with Stopwatch() as sw:
                raw_total = conn.execute(RAW_TOTAL).fetchone()
            timings.raw_total_ms.append(sw.elapsed_s * 1000)
            _check(report, n, raw_total, sqlite=True)
            ms, report = await _ours(db, "model")
            timings.ours_model_ms.append(ms)
            with Stopwatch() as sw:
                groups = conn.execute(RAW_BY_MODEL).fetchall()
            timings.raw_model_ms.append(sw.elapsed_s * 1000)
            if len(report.groups) != len(groups):
                raise AssertionError(f"savings by model: {len(report.groups)} groups, raw {len(groups)}")
    finally:
        conn.close()
        await db.aclose()
    remove_sqlite(db_path)
    return timings.results("sqlite")


async def _postgres(n: int) -> list[Result]:
    import asyncpg

    timings = Timings([], [], [], [])
    async with fresh_postgres_database() as url:
        await migrated(url)
        load_s = await load_postgres(url, n)
        info("savings.postgres.load", n / load_s, "entries/s", f"{n:,} ledger entries and their jobs, asyncpg COPY")
        db = Database(url)
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            async with db.engine.connect() as warm:
                await warm.exec_driver_sql("SELECT 1")
            for _ in range(REPEATS):
                ms, report = await _ours(db, None)
                timings.ours_total_ms.append(ms)
                with Stopwatch() as sw:
                    raw_total = tuple(await conn.fetchrow(RAW_TOTAL))
                timings.raw_total_ms.append(sw.elapsed_s * 1000)
                _check(report, n, raw_total, sqlite=False)
                ms, report = await _ours(db, "model")
                timings.ours_model_ms.append(ms)
                with Stopwatch() as sw:
                    groups = await conn.fetch(RAW_BY_MODEL)
                timings.raw_model_ms.append(sw.elapsed_s * 1000)
                if len(report.groups) != len(groups):
                    raise AssertionError(f"savings by model: {len(report.groups)} groups, raw {len(groups)}")
        finally:
            await conn.close()
            await db.aclose()
    return timings.results("postgres")


def run(quick: bool) -> list[Result]:
    n = 100_000 if quick else 1_000_000
    with tempfile.TemporaryDirectory(prefix="batcher-bench-savings-") as tmp_name:
        results: list[Result] = run_async(_sqlite(Path(tmp_name), n))
    if postgres_url() is not None:
        results += run_async(_postgres(n))
    else:
        print("savings.postgres: skipped (set BATCHER_BENCH_POSTGRES_URL)", flush=True)
    return results
