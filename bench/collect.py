"""Collect: ``Pipeline.collect`` of a 50,000-line OpenAI output file against a raw parse + bulk UPDATE.

Goal: batcher settles results at >= 70% of the rate (lines/s) of the raw driver doing the minimum, and
collecting a ~200 MB output file peaks under 200 MB of RSS.

- Setup (untimed): 50,000 ~1 KB chat jobs stored by batcher's intake, packed into one batch by
  ``Pipeline.pack``, their input file written by ``Pipeline._write_file``; then the batch is set ``ended`` and
  its jobs ``submitted`` directly in the database, and the emulator's own result writer
  (:func:`batcher.emulator.results.write_results`) answers the input file: 50,000 chat.completion lines with
  usage, shuffled in chunks as the emulator serves them. PostgreSQL gets ``ANALYZE jobs`` (a batch ends hours
  after intake, by when autovacuum has done it; ``bench/e2e.py`` shows the case where it has not). The
  database is copied for every measurement.
- Ours: ``Pipeline.collect(batch_id, now)`` with an adapter whose ``results()`` reads the file from disk line
  by line through the OpenAI adapter's :func:`~batcher.providers.openai.parse_result_line` (no HTTP). It
  settles the jobs and writes their ledger entries (priced).
- Baseline: read the file, ``orjson``-parse each line, re-serialize the body and usage, and UPDATE each job
  (state, result, usage, timestamps, with the same ``id``/``batch_id``/``state`` guard) with the raw driver's
  ``executemany`` in chunks of 1,000, one transaction. Both end with the same job rows, which is checked.
  The same baseline plus one ledger entry per line (``INSERT … SELECT`` from the job row, as batcher writes
  it, costs computed with integer picodollar prices) is printed for context: it is the like-for-like work.
- Memory: the same collect in a child process over an output file padded to ~4 KB lines (~200 MB; 20 MB in
  quick mode); the child's peak RSS against the same child that only imports everything and exits.

Full mode: median of 3; quick: 5,000 lines, once.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import orjson
import sqlalchemy as sa

from batcher.config import Settings
from batcher.db.engine import Database
from batcher.db.tables import batches, jobs, ledger
from batcher.domain import BatchState, JobState
from batcher.emulator.results import ResultPlan, write_results
from batcher.lifecycle import Pipeline
from batcher.providers.base import BatchStatus, Outcome
from batcher.providers.openai import parse_result_line
from batcher.testing import FakeProvider
from batcher.timeutil import utcnow
from bench import pack
from bench.common import (
    BENCH_DIR,
    Result,
    Stopwatch,
    asyncpg_dsn,
    copy_sqlite,
    fresh_postgres_database,
    info,
    median,
    postgres_url,
    print_peak_rss,
    raw_sqlite,
    remove_sqlite,
    run_async,
    run_child_peak_rss,
    sqlite_path,
)
from bench.intake import write_batch_file

TARGET = 0.7
RSS_LIMIT_MB = 200.0
#: rows per executemany in the baseline (batcher's default ``settle_chunk``)
CHUNK = 1000
#: line size of the memory case: 50,000 of them make a ~200 MB file
BIG_LINE_BYTES = 4200
PROVIDER_BATCH_ID = "batch_bench"
OUTPUT_FILE_ID = "file-bench-output"


class FileResults(FakeProvider):
    """A provider whose result files are local: ``results()`` streams them through the OpenAI line parser.

    Args:
        files: the output (and error) files by file id.
    """

    def __init__(self, files: Mapping[str, Path], account: str = "openai") -> None:
        super().__init__(account)
        self.paths = dict(files)
        self.malformed_lines = 0

    async def results(self, status: BatchStatus) -> AsyncIterator[Outcome]:
        for file_id in (status.output_file_id, status.error_file_id):
            if not file_id:
                continue
            with self.paths[file_id].open("rb") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    outcome = parse_result_line(line)
                    if outcome is None:
                        self.malformed_lines += 1
                        continue
                    yield outcome


# -- setup ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A database holding one ended batch of ``n`` submitted jobs, and its output file."""

    url: str
    batch_id: str
    output: Path
    n: int


async def prepare(url: str, requests: Path, n: int, work: Path) -> Prepared:
    """Intake, pack and write the input file with batcher; mark the batch ended; answer it with the emulator."""
    await pack.prepare(url, requests, n)
    db = Database(url)
    adapter = pack.bench_adapter()
    pipeline = Pipeline(db, Settings(database_url=url), {"openai": adapter})
    input_path = work / "input.jsonl"
    try:
        now = utcnow()
        (batch_id,) = await pipeline.pack(now, force=True)
        count, size = await pipeline._write_file(batch_id, adapter, input_path)
        async with db.engine.begin() as conn:
            await conn.execute(
                sa.update(batches)
                .where(batches.c.id == batch_id)
                .values(
                    state=BatchState.ENDED.value,
                    provider_state="completed",
                    provider_batch_id=PROVIDER_BATCH_ID,
                    input_file_id="file-bench-input",
                    output_file_id=OUTPUT_FILE_ID,
                    bytes=size,
                    request_count=count,
                    submit_attempts=1,
                    submitted_at=now,
                    ended_at=now,
                    next_poll_at=now,
                    updated_at=now,
                )
            )
            await conn.execute(
                sa.update(jobs)
                .where(jobs.c.batch_id == batch_id)
                .values(state=JobState.SUBMITTED.value, attempts=jobs.c.attempts + 1, updated_at=now)
            )
            if not db.is_sqlite:
                await conn.exec_driver_sql("ANALYZE jobs")
    finally:
        await adapter.aclose()
        await db.aclose()
    output = work / "output.jsonl"
    plan = ResultPlan(
        batch_id=PROVIDER_BATCH_ID,
        ordinal=1,
        endpoint="/v1/chat/completions",
        seed=0,
        error_rate=0.0,
        done_count=count,
        unfinished_code="batch_expired",
        created=int(time.time()),
        input_path=input_path,
        output_path=output,
        error_path=work / "errors.jsonl",
    )
    summary = write_results(plan)
    if summary.completed != n:
        raise AssertionError(f"the emulator answered {summary.completed} of {n} requests")
    input_path.unlink()
    return Prepared(url, batch_id, output, n)


_FILLER = " ".join(["the", "batch", "result", "arrives", "with", "its", "usage", "and", "a", "longer", "answer"])


def pad_output(source: Path, dest: Path, line_bytes: int) -> int:
    """Copy an output file, lengthening each answer's text (and its token counts) to ~``line_bytes`` per line."""
    with source.open("rb") as src, dest.open("wb") as out:
        for raw in src:
            missing = line_bytes - len(raw)
            if missing > 0:
                obj = orjson.loads(raw)
                body = obj["response"]["body"]
                extra = (_FILLER * (missing // len(_FILLER) + 2))[:missing]
                body["choices"][0]["message"]["content"] += extra
                tokens = math.ceil(missing / 4)
                body["usage"]["completion_tokens"] += tokens
                body["usage"]["total_tokens"] += tokens
                raw = orjson.dumps(obj) + b"\n"
            out.write(raw)
    return dest.stat().st_size


# -- ours -----------------------------------------------------------------------------------------------------------


async def collect(url: str, batch_id: str, output: Path, n: int) -> float:
    """``Pipeline.collect`` of the batch over ``output``; seconds. The engine has connected once beforehand."""
    adapter = FileResults({OUTPUT_FILE_ID: output})
    db = Database(url)
    try:
        async with db.engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")
        pipeline = Pipeline(db, Settings(database_url=url), {"openai": adapter})
        with Stopwatch() as sw:
            report = await pipeline.collect(batch_id, utcnow())
    finally:
        await db.aclose()
    if report is None or report.succeeded != n or adapter.malformed_lines:
        raise AssertionError(f"collect settled {report} of {n} lines ({adapter.malformed_lines} malformed)")
    return sw.elapsed_s


# -- raw baselines --------------------------------------------------------------------------------------------------

_UPDATE = (
    "UPDATE jobs SET state = 'succeeded', result = {p[0]}, usage = {p[1]}, error = NULL, error_code = NULL, "
    "settled_at = {p[2]}, updated_at = {p[2]} WHERE id = {p[3]} AND batch_id = {p[4]} AND state = 'submitted'"
)
# the ledger entry of a settled job, as batcher writes it: from the job row while it is still ``submitted``
_LEDGER = (
    "INSERT INTO ledger (job_id, attempt, batch_id, provider, account, model, run, tags, mode, input_tokens, "
    "cached_input_tokens, cache_creation_tokens, cache_creation_1h_tokens, output_tokens, reasoning_tokens, "
    "actual_usd, realtime_usd, batch_price_derived, price_source, price_version, settled_at) "
    "SELECT id, attempts, batch_id, provider, account, model, run, tags, 'batch', {p[1]}, {p[2]}, 0, 0, {p[3]}, "
    "{p[4]}, {p[5]}, {p[6]}, false, 'bench', 'bench', {p[7]} "
    "FROM jobs WHERE id = {p[0]} AND batch_id = {p[8]} AND state = 'submitted' "
    "ON CONFLICT (job_id, attempt) DO NOTHING"
)
#: gpt-4o-mini at the batch price, picodollars per token: input, cached input, output (real time is twice)
_PRICE_PICO = (75_000, 37_500, 300_000)


def _raw_rows(
    raw: bytes, now: object, batch_id: str, *, sqlite: bool, ledger: bool
) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """One output line → (UPDATE parameters, ledger INSERT parameters or ``()``), the plain way."""
    obj = orjson.loads(raw)
    body = obj["response"]["body"]
    usage = body["usage"]
    job_id = obj["custom_id"]
    update = (orjson.dumps(body).decode(), orjson.dumps(usage).decode(), now, job_id, batch_id)
    if not ledger:
        return update, ()
    tokens_in, tokens_out = usage["prompt_tokens"], usage["completion_tokens"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    actual_pico = (tokens_in - cached) * _PRICE_PICO[0] + cached * _PRICE_PICO[1] + tokens_out * _PRICE_PICO[2]
    actual: object = actual_pico if sqlite else Decimal(actual_pico).scaleb(-12)
    realtime: object = 2 * actual_pico if sqlite else Decimal(2 * actual_pico).scaleb(-12)
    entry = (job_id, tokens_in, cached, tokens_out, reasoning, actual, realtime, now, batch_id)
    return update, entry


def _sqlite_baseline(db_path: Path, batch_id: str, output: Path, n: int, *, ledger: bool = False) -> float:
    update_sql = _UPDATE.format(p=[f"?{i}" for i in range(1, 6)])
    ledger_sql = _LEDGER.format(p=[f"?{i}" for i in range(1, 10)])
    conn = raw_sqlite(db_path)
    try:
        with Stopwatch() as sw:
            now = utcnow().replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
            conn.execute("BEGIN")
            with output.open("rb") as fh:
                updates: list[tuple[object, ...]] = []
                entries: list[tuple[object, ...]] = []
                for raw in fh:
                    update, entry = _raw_rows(raw, now, batch_id, sqlite=True, ledger=ledger)
                    updates.append(update)
                    entries.append(entry)
                    if len(updates) >= CHUNK:
                        if ledger:
                            conn.executemany(ledger_sql, entries)
                        conn.executemany(update_sql, updates)
                        updates, entries = [], []
                if ledger:
                    conn.executemany(ledger_sql, entries)
                conn.executemany(update_sql, updates)
            conn.execute("COMMIT")
        settled = conn.execute("SELECT count(*) FROM jobs WHERE state = 'succeeded'").fetchone()[0]
    finally:
        conn.close()
    if settled != n:
        raise AssertionError(f"baseline settled {settled} of {n} jobs")
    return sw.elapsed_s


async def _postgres_baseline(url: str, batch_id: str, output: Path, n: int, *, ledger: bool = False) -> float:
    import asyncpg  # type: ignore[import-untyped]

    update_sql = _UPDATE.format(p=[f"${i}" for i in range(1, 6)])
    ledger_sql = _LEDGER.format(p=[f"${i}" for i in range(1, 10)])
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        with Stopwatch() as sw:
            now = utcnow().replace(tzinfo=None)
            async with conn.transaction():
                with output.open("rb") as fh:
                    updates: list[tuple[object, ...]] = []
                    entries: list[tuple[object, ...]] = []
                    for raw in fh:
                        update, entry = _raw_rows(raw, now, batch_id, sqlite=False, ledger=ledger)
                        updates.append(update)
                        entries.append(entry)
                        if len(updates) >= CHUNK:
                            if ledger:
                                await conn.executemany(ledger_sql, entries)
                            await conn.executemany(update_sql, updates)
                            updates, entries = [], []
                    if updates:
                        if ledger:
                            await conn.executemany(ledger_sql, entries)
                        await conn.executemany(update_sql, updates)
        settled = await conn.fetchval("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
    finally:
        await conn.close()
    if settled != n:
        raise AssertionError(f"baseline settled {settled} of {n} jobs")
    return sw.elapsed_s


async def _digest(url: str) -> str:
    """A hash of every job's id, state, result and usage: ours and the baseline must end the same."""
    db = Database(url)
    digest = hashlib.sha256()
    try:
        async with db.engine.connect() as conn:
            query = sa.select(jobs.c.id, jobs.c.state, jobs.c.result, sa.cast(jobs.c.usage, sa.Text)).order_by(
                jobs.c.id
            )
            for row in await conn.execute(query):
                digest.update(orjson.dumps(list(row)))
    finally:
        await db.aclose()
    return digest.hexdigest()


# -- memory ---------------------------------------------------------------------------------------------------------


def _child(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.collect", *args]


def peak_rss(url: str, batch_id: str, output: Path, n: int) -> tuple[float, float, float]:
    """``(peak RSS MB of a child collecting output, peak RSS MB of an idle child after imports, collect seconds)``."""
    idle_mb, _ = run_child_peak_rss(_child("--idle"), cwd=BENCH_DIR.parent)
    peak_mb, wall_s = run_child_peak_rss(_child(url, batch_id, str(output), str(n)), cwd=BENCH_DIR.parent)
    return peak_mb, idle_mb, wall_s


# -- one engine -----------------------------------------------------------------------------------------------------


@dataclass
class _Engine:
    name: str
    n: int
    ours_s: list[float]
    base_s: list[float]
    ledger_s: list[float]

    def results(self) -> list[Result]:
        ours = median([self.n / s for s in self.ours_s])
        with_ledger = median([self.n / s for s in self.ledger_s])
        info(
            f"collect.{self.name}.raw_with_ledger",
            with_ledger,
            "lines/s",
            f"the baseline plus each line's ledger entry (INSERT … SELECT from the job, as batcher writes it); "
            f"ours is {ours / with_ledger:.2f} of it",
        )
        base = median([self.n / s for s in self.base_s])
        return [Result.compare(f"collect.{self.name}.collect", ours, base, "lines/s", TARGET)]


async def _ledger_count(url: str) -> int:
    db = Database(url)
    try:
        async with db.engine.connect() as conn:
            return int(await conn.scalar(sa.select(sa.func.count()).select_from(ledger)) or 0)
    finally:
        await db.aclose()


async def _measure(engine: _Engine, i: int, prepared: Prepared, urls: tuple[str, str, str]) -> None:
    """One run on three copies of the prepared database: ours, the baseline, the baseline with the ledger."""
    ours_url, raw_url, ledger_url = urls
    n, batch_id, output = prepared.n, prepared.batch_id, prepared.output

    async def baseline(url: str, *, with_ledger: bool) -> float:
        if engine.name == "sqlite":
            return _sqlite_baseline(sqlite_path(url), batch_id, output, n, ledger=with_ledger)
        return await _postgres_baseline(url, batch_id, output, n, ledger=with_ledger)

    # alternate who goes first, so neither always meets the colder cache
    if i % 2:
        engine.base_s.append(await baseline(raw_url, with_ledger=False))
        engine.ours_s.append(await collect(ours_url, batch_id, output, n))
    else:
        engine.ours_s.append(await collect(ours_url, batch_id, output, n))
        engine.base_s.append(await baseline(raw_url, with_ledger=False))
    engine.ledger_s.append(await baseline(ledger_url, with_ledger=True))
    digests = {await _digest(url) for url in urls}
    if len(digests) != 1:
        raise AssertionError("batcher's collect and the raw baselines left different job rows")
    for url in (ours_url, ledger_url):
        if (entries := await _ledger_count(url)) != n:
            raise AssertionError(f"{entries} ledger entries for {n} settled jobs")


def _memory(engine: str, url: str, prepared: Prepared, work: Path) -> Result:
    big = work / "output-big.jsonl"
    size = pad_output(prepared.output, big, BIG_LINE_BYTES)
    try:
        peak_mb, idle_mb, wall_s = peak_rss(url, prepared.batch_id, big, prepared.n)
    finally:
        big.unlink()
    info(
        f"collect.{engine}.big_file",
        size / 1e6,
        "MB",
        f"{prepared.n:,} lines of ~{BIG_LINE_BYTES:,} bytes collected in {wall_s:.1f} s by the child process",
    )
    return Result.within(f"collect.{engine}.peak_rss", peak_mb, idle_mb, "MB", RSS_LIMIT_MB)


async def _sqlite(tmp: Path, requests: Path, n: int, runs: int) -> list[Result]:
    template = tmp / "template.db"
    prepared = await prepare(f"sqlite+aiosqlite:///{template}", requests, n, tmp)
    engine = _Engine("sqlite", n, [], [], [])
    for i in range(runs):
        paths = tuple(tmp / f"{who}-{i}.db" for who in ("ours", "raw", "ledger"))
        for path in paths:
            copy_sqlite(template, path)
        urls = tuple(f"sqlite+aiosqlite:///{path}" for path in paths)
        await _measure(engine, i, prepared, (urls[0], urls[1], urls[2]))
        for path in paths:
            remove_sqlite(path)
    results = engine.results()
    mem_db = tmp / "memory.db"
    copy_sqlite(template, mem_db)
    results.append(_memory("sqlite", f"sqlite+aiosqlite:///{mem_db}", prepared, tmp))
    remove_sqlite(mem_db)
    remove_sqlite(template)
    return results


async def _postgres(tmp: Path, requests: Path, n: int, runs: int) -> list[Result]:
    engine = _Engine("postgres", n, [], [], [])
    async with fresh_postgres_database() as template:
        prepared = await prepare(template, requests, n, tmp)
        for i in range(runs):
            async with (
                fresh_postgres_database(template=template) as ours_url,
                fresh_postgres_database(template=template) as raw_url,
                fresh_postgres_database(template=template) as ledger_url,
            ):
                await _measure(engine, i, prepared, (ours_url, raw_url, ledger_url))
        results = engine.results()
        async with fresh_postgres_database(template=template) as mem_url:
            results.append(_memory("postgres", mem_url, prepared, tmp))
    return results


def run(quick: bool) -> list[Result]:
    n = 5_000 if quick else 50_000
    runs = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="batcher-bench-collect-") as tmp_name:
        tmp = Path(tmp_name)
        requests = tmp / "requests.jsonl"
        write_batch_file(requests, n)
        results: list[Result] = run_async(_sqlite(tmp, requests, n, runs))
        if postgres_url() is not None:
            results += run_async(_postgres(tmp, requests, n, runs))
        else:
            print("collect.postgres: skipped (set BATCHER_BENCH_POSTGRES_URL)", flush=True)
    return results


def _main(argv: list[str]) -> int:
    """The child of the memory case: ``python -m bench.collect URL BATCH_ID OUTPUT N`` or ``--idle``."""
    parser = argparse.ArgumentParser(prog="python -m bench.collect")
    parser.add_argument("--idle", action="store_true", help="import everything and exit (the RSS baseline)")
    parser.add_argument("args", nargs="*", metavar="URL BATCH_ID OUTPUT N")
    ns = parser.parse_args(argv)
    if not ns.idle:
        url, batch_id, output, n = ns.args
        asyncio.run(collect(url, batch_id, Path(output), int(n)))
    print_peak_rss()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
