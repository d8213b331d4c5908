"""Intake: ``Batcher.submit_file`` of an OpenAI batch file against a raw bulk insert of the same rows.

Goal: batcher stores a file at >= 50% of the rate of the raw driver doing the minimum — read the file,
``orjson``-parse each line, build the same row (id, re-serialized body text, defaults, timestamps), insert
it in one transaction into a fresh database with the migrated schema:

- SQLite: stdlib ``sqlite3``, ``executemany`` of a plain INSERT, same pragmas as batcher's engine
  (WAL, ``synchronous=NORMAL``).
- PostgreSQL: ``asyncpg`` ``executemany`` of a plain INSERT (the baseline); ``copy_records_to_table``
  is measured too and printed for context.

Each measurement gets a fresh database. Full mode: 100,000 lines, median of 3; quick: 10,000 lines, once.
"""

from __future__ import annotations

import os
import random
import sqlite3
import string
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    Result,
    Stopwatch,
    asyncpg_dsn,
    fresh_postgres_database,
    info,
    median,
    migrated,
    postgres_url,
    run_async,
)

TARGET = 0.5
RUN = "bench"
MODEL = "gpt-4o-mini"
COLUMNS = (
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
    "not_after",
    "state",
    "attempts",
    "created_at",
    "queued_at",
    "updated_at",
)


def write_batch_file(path: Path, n: int, *, seed: int = 20240601) -> int:
    """Write ``n`` OpenAI chat-completion batch lines of about 1 KB each (deterministic); returns the size."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(2000)]
    corpus = " ".join(rng.choices(words, k=50_000))
    span = len(corpus) - 1000
    with path.open("wb") as fh:
        for i in range(n):
            a = rng.randrange(span)
            b = rng.randrange(span)
            line = {
                "custom_id": f"req-{i:07d}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": MODEL,
                    "messages": [
                        {"role": "system", "content": "You are a careful assistant. " + corpus[a : a + 250]},
                        {"role": "user", "content": f"Question {i}: " + corpus[b : b + 500]},
                    ],
                    "max_tokens": 256,
                    "temperature": 0.2,
                },
            }
            fh.write(orjson.dumps(line) + b"\n")
    return path.stat().st_size


# -- ours -----------------------------------------------------------------------------------------------------------


async def _ours(url: str, path: Path, n: int) -> float:
    from batcher import Batcher, Settings

    async with Batcher(Settings(database_url=url)) as batcher:  # migrates on entry
        with Stopwatch() as sw:
            result = await batcher.submit_file(path, provider="openai", run=RUN)
    if result.inserted != n:
        raise AssertionError(f"submit_file stored {result.inserted} of {n} rows")
    return n / sw.elapsed_s


# -- raw baselines --------------------------------------------------------------------------------------------------


def _raw_rows(path: Path, now: Any) -> Iterator[tuple[Any, ...]]:
    """The rows batcher would store, built the plain way: one tuple per line, in column order."""
    tags = orjson.dumps({}).decode()
    with path.open("rb") as fh:
        for raw in fh:
            obj = orjson.loads(raw)
            body = orjson.dumps(obj["body"]).decode()
            row_id = f"{int(time.time() * 1000):012x}{os.urandom(10).hex()}"
            yield (
                row_id,
                RUN,
                "openai",
                "openai",
                obj["url"],
                obj["body"]["model"],
                obj["custom_id"],
                body,
                len(body),
                tags,
                0,
                None,
                "queued",
                0,
                now,
                now,
                now,
            )


async def _sqlite_baseline(db_path: Path, path: Path, n: int) -> float:
    await migrated(f"sqlite+aiosqlite:///{db_path}")
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=30000"):
            conn.execute(f"PRAGMA {pragma}")
        sql = f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        with Stopwatch() as sw:
            # SQLAlchemy's storage format for DateTime on SQLite
            now = datetime.now(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
            conn.execute("BEGIN")
            conn.executemany(sql, _raw_rows(path, now))
            conn.execute("COMMIT")
        stored = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
    finally:
        conn.close()
    if stored != n:
        raise AssertionError(f"baseline stored {stored} of {n} rows")
    return n / sw.elapsed_s


async def _postgres_baseline(url: str, path: Path, n: int, *, copy: bool) -> float:
    import asyncpg  # type: ignore[import-untyped]

    await migrated(url)
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        with Stopwatch() as sw:
            now = datetime.now(UTC).replace(tzinfo=None)
            async with conn.transaction():
                if copy:
                    await conn.copy_records_to_table("jobs", records=_raw_rows(path, now), columns=COLUMNS)
                else:
                    placeholders = ", ".join(f"${i}" for i in range(1, len(COLUMNS) + 1))
                    sql = f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({placeholders})"
                    await conn.executemany(sql, _raw_rows(path, now))
        stored = await conn.fetchval("SELECT count(*) FROM jobs")
    finally:
        await conn.close()
    if stored != n:
        raise AssertionError(f"baseline stored {stored} of {n} rows")
    return n / sw.elapsed_s


# -- one engine -----------------------------------------------------------------------------------------------------


def _remove_databases(tmp: Path) -> None:
    for f in tmp.glob("*.db*"):
        f.unlink()


async def _sqlite(tmp: Path, path: Path, n: int, runs: int) -> list[Result]:
    ours: list[float] = []
    base: list[float] = []
    for i in range(runs):
        base.append(await _sqlite_baseline(tmp / f"raw-{i}.db", path, n))
        ours.append(await _ours(f"sqlite+aiosqlite:///{tmp / f'ours-{i}.db'}", path, n))
        _remove_databases(tmp)
    return [Result.compare("intake.sqlite.submit_file", median(ours), median(base), "rows/s", TARGET)]


async def _postgres(path: Path, n: int, runs: int) -> list[Result]:
    ours: list[float] = []
    base: list[float] = []
    copy: list[float] = []
    for _ in range(runs):
        async with fresh_postgres_database() as url:
            base.append(await _postgres_baseline(url, path, n, copy=False))
        async with fresh_postgres_database() as url:
            ours.append(await _ours(url, path, n))
        async with fresh_postgres_database() as url:
            copy.append(await _postgres_baseline(url, path, n, copy=True))
    info("intake.postgres.raw_copy", median(copy), "rows/s", "asyncpg copy_records_to_table, for context")
    return [Result.compare("intake.postgres.submit_file", median(ours), median(base), "rows/s", TARGET)]


def run(quick: bool) -> list[Result]:
    n = 10_000 if quick else 100_000
    runs = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="batcher-bench-intake-") as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / "requests.jsonl"
        size = write_batch_file(path, n)
        info("intake.file", size / n, "bytes/line", f"{n:,} lines, {size / 1e6:.1f} MB")
        results = run_async(_sqlite(tmp, path, n, runs))
        if postgres_url() is not None:
            results += run_async(_postgres(path, n, runs))
        else:
            print("intake.postgres: skipped (set BATCHER_BENCH_POSTGRES_URL)", flush=True)
    return list(results)
