"""What every benchmark shares: results as ratios against a raw baseline, timing, fresh databases, the report.

A benchmark module ``bench/<name>.py`` exposes ``run(quick: bool) -> list[Result]``. Each result compares
batcher ("ours") with the raw driver or library doing the same work ("baseline"), measured in the same run
on the same machine, so the ratio means something on any machine; ``target`` is the ratio the issue asks for.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

BENCH_DIR = Path(__file__).resolve().parent
#: where a quick or partial run writes its results (ignored by git): only a full run of every benchmark
#: replaces the committed ``bench/results.json`` and ``bench/RESULTS.md``
PARTIAL_DIR = BENCH_DIR / "out"

#: where PostgreSQL benchmarks run; unset: they are skipped
POSTGRES_ENV = ("BATCHER_BENCH_POSTGRES_URL", "BATCHER_TEST_POSTGRES_URL")


@dataclass(frozen=True)
class Result:
    """One comparison.

    Attributes:
        name: dotted name, ``<bench>.<engine>.<what>``.
        ours: batcher's number, in ``unit``.
        baseline: the raw number, in ``unit``.
        unit: e.g. ``rows/s``, ``s``, ``MB``.
        ratio: how batcher compares, higher is better (``ours / baseline`` for throughput,
            ``baseline / ours`` for times and sizes).
        target: the ratio the goal asks for.
        passed: ``ratio >= target``.
        limit: for a goal stated as an absolute bound (``ours <= limit``, see :meth:`within`), the bound in
            ``unit``; ``target`` is then ``baseline / limit``, so ``ratio >= target`` is the same test.
    """

    name: str
    ours: float
    baseline: float
    unit: str
    ratio: float
    target: float
    passed: bool
    limit: float | None = None

    @classmethod
    def compare(
        cls, name: str, ours: float, baseline: float, unit: str, target: float, *, higher_is_better: bool = True
    ) -> Result:
        """A result whose ratio is computed so that higher is better whatever the unit."""
        better, worse = (ours, baseline) if higher_is_better else (baseline, ours)
        ratio = better / worse if worse else 0.0
        return cls(name, ours, baseline, unit, ratio, target, ratio >= target)

    @classmethod
    def within(cls, name: str, ours: float, baseline: float, unit: str, limit: float) -> Result:
        """A result whose goal is an absolute bound, ``ours <= limit`` (a time, a size), lower being better.

        The ratio is ``baseline / ours`` as for any lower-is-better number and the target ``baseline / limit``,
        so the pass test is the framework's usual ``ratio >= target`` and means exactly ``ours <= limit``.
        """
        ratio = baseline / ours if ours else 0.0
        target = baseline / limit if limit else 0.0
        return cls(name, ours, baseline, unit, ratio, target, ours <= limit, limit)

    def target_text(self) -> str:
        if self.limit is not None:
            return f"ours <= {fmt(self.limit)} {self.unit}"
        return f">= {self.target:g}"

    def line(self) -> str:
        verdict = "PASS" if self.passed else "MISS"
        return (
            f"{self.name}: ours {fmt(self.ours)} {self.unit}, baseline {fmt(self.baseline)} {self.unit}, "
            f"ratio {self.ratio:.2f} (target {self.target_text()}) {verdict}"
        )

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "ours": round(self.ours, 4),
            "baseline": round(self.baseline, 4),
            "unit": self.unit,
            "ratio": round(self.ratio, 4),
            "target": round(self.target, 4),
            "pass": self.passed,
        }
        if self.limit is not None:
            out["limit"] = self.limit
        return out


@dataclass(frozen=True)
class Info:
    """A number reported for context, not compared against a target (e.g. another raw method)."""

    name: str
    value: float
    unit: str
    note: str = ""

    def line(self) -> str:
        return f"{self.name}: {fmt(self.value)} {self.unit}" + (f" ({self.note})" if self.note else "")


_INFOS: list[Info] = []
_POSTGRES_VERSION: str | None = None


def info(name: str, value: float, unit: str, note: str = "") -> Info:
    """Print a context number now and keep it for the report."""
    item = Info(name, value, unit, note)
    _INFOS.append(item)
    print(item.line(), flush=True)
    return item


def fmt(value: float) -> str:
    """``123456.7`` → ``123,457``; small numbers keep three significant digits."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


# -- timing ---------------------------------------------------------------------------------------------------------


class Stopwatch:
    """``with Stopwatch() as sw: …`` then ``sw.elapsed_s`` (wall clock, ``perf_counter``)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.elapsed_s = 0.0

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed_s = time.perf_counter() - self.start


def repeat(n: int, measure: Callable[[], float]) -> list[float]:
    """Call ``measure`` ``n`` times (it sets up, measures and returns one number each time)."""
    return [measure() for _ in range(n)]


async def arepeat(n: int, measure: Callable[[], Awaitable[float]]) -> list[float]:
    """:func:`repeat` for coroutines."""
    return [await measure() for _ in range(n)]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def best(values: Sequence[float], *, higher_is_better: bool = True) -> float:
    return float(max(values) if higher_is_better else min(values))


def run_peak_rss(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, float, float]:
    """Run ``cmd`` to completion; returns ``(exit code, peak RSS in MB, wall seconds)`` of that process.

    The RSS is the child's own high-water mark (``wait4``), not this process's.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    return proc.returncode, usage.ru_maxrss / 1024, elapsed  # Linux reports kilobytes


#: the line a child started by :func:`run_child_peak_rss` prints last (see :func:`print_peak_rss`)
PEAK_RSS_PREFIX = "bench-peak-rss-mb="


def peak_rss_mb() -> float:
    """This process's own RSS high-water mark in MB (``VmHWM``), which an ``exec`` starts afresh.

    Unlike ``ru_maxrss`` it does not carry over from the parent: Linux keeps ``ru_maxrss`` across ``execve``,
    and Python's ``subprocess`` starts children with ``vfork``, so a child's ``ru_maxrss`` (and hence
    :func:`run_peak_rss` and ``RUSAGE_CHILDREN``) is at least the RSS of the process that started it.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")  # pragma: no cover - Linux only


def print_peak_rss() -> None:
    """What a child run by :func:`run_child_peak_rss` calls last: its peak RSS on stdout."""
    print(f"{PEAK_RSS_PREFIX}{peak_rss_mb():.3f}", flush=True)


def run_child_peak_rss(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[float, float]:
    """Run ``cmd`` (a child that ends with :func:`print_peak_rss`); returns ``(its peak RSS in MB, wall seconds)``.

    Raises:
        RuntimeError: the child failed or did not report its peak.
    """
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, text=True, check=False)
    elapsed = time.perf_counter() - start
    reported = [line for line in proc.stdout.splitlines() if line.startswith(PEAK_RSS_PREFIX)]
    if proc.returncode != 0 or not reported:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} without reporting its peak RSS")
    return float(reported[-1][len(PEAK_RSS_PREFIX) :]), elapsed


# -- databases ------------------------------------------------------------------------------------------------------


def postgres_url() -> str | None:
    """The PostgreSQL server to benchmark on (``BATCHER_BENCH_POSTGRES_URL``, else ``BATCHER_TEST_POSTGRES_URL``)."""
    for name in POSTGRES_ENV:
        value = os.environ.get(name)
        if value:
            return value
    return None


def asyncpg_dsn(url: str) -> str:
    """A SQLAlchemy or libpq URL → what ``asyncpg.connect`` takes."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@asynccontextmanager
async def fresh_postgres_database(template: str | None = None) -> AsyncIterator[str]:
    """A new PostgreSQL database on the benchmark server (its SQLAlchemy URL); dropped on exit.

    Args:
        template: the URL of a database (on the same server, with no open connections) to copy; by default
            the new database is empty. Copying a prepared database is much cheaper than preparing it again.
    """
    global _POSTGRES_VERSION
    import asyncpg  # type: ignore[import-untyped]

    server = postgres_url()
    if server is None:
        raise RuntimeError(f"set {POSTGRES_ENV[0]} to benchmark PostgreSQL")
    admin = asyncpg_dsn(server)
    name = f"batcher_bench_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin, timeout=10)
    try:
        if _POSTGRES_VERSION is None:
            _POSTGRES_VERSION = str(await conn.fetchval("SHOW server_version"))
        if template is None:
            await conn.execute(f'CREATE DATABASE "{name}"')
        else:
            source = urlsplit(asyncpg_dsn(template)).path.lstrip("/")
            for attempt in range(40):
                try:
                    await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
                    break
                except asyncpg.ObjectInUseError:
                    # an autovacuum worker may be visiting the template for a moment
                    if attempt == 39:
                        raise
                    await asyncio.sleep(0.25)
    finally:
        await conn.close()
    try:
        parts = urlsplit(admin)
        yield urlunsplit(parts._replace(path=f"/{name}")).replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        conn = await asyncpg.connect(admin, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


#: the pragmas batcher's engine sets on every SQLite connection (``batcher.db.engine``)
SQLITE_PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=30000")


def sqlite_path(url: str) -> Path:
    """``sqlite+aiosqlite:////tmp/x.db`` → ``/tmp/x.db``."""
    return Path(url.split(":///", 1)[1])


def raw_sqlite(path: Path) -> sqlite3.Connection:
    """A stdlib ``sqlite3`` connection in autocommit mode with batcher's pragmas (for raw baselines)."""
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in SQLITE_PRAGMAS:
        conn.execute(f"PRAGMA {pragma}")
    return conn


def copy_sqlite(source: Path, dest: Path) -> None:
    """Copy a SQLite database file (its WAL checkpointed into it first); no connection may be open on it."""
    conn = sqlite3.connect(source)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    shutil.copyfile(source, dest)


def remove_sqlite(path: Path) -> None:
    """Delete a SQLite database file and its ``-wal``/``-shm`` companions."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def migrated(url: str) -> None:
    """Bring the database at ``url`` to the current schema (outside any timing)."""
    from batcher.db import migrate
    from batcher.db.engine import Database

    db = Database(url)
    try:
        await migrate.upgrade(db.engine)
    finally:
        await db.aclose()


def run_async(coro: Awaitable[Any]) -> Any:
    """``asyncio.run`` for an awaitable (benchmarks are sync at the top)."""

    async def _wrap() -> Any:
        return await coro

    return asyncio.run(_wrap())


# -- the report -----------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_mb": _memory_mb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgres": _POSTGRES_VERSION,
    }


def write_results(results: Sequence[Result], quick: bool, folder: Path = BENCH_DIR) -> Path:
    """Write ``results.json`` and ``RESULTS.md`` for this run into ``folder``; returns the Markdown file."""
    folder.mkdir(parents=True, exist_ok=True)
    mach = machine()
    doc = {
        "machine": mach,
        "quick": quick,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": [r.to_json() for r in results],
        "info": [{"name": i.name, "value": round(i.value, 4), "unit": i.unit, "note": i.note} for i in _INFOS],
    }
    (folder / "results.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")

    lines = [
        "# Benchmark results",
        "",
        f"{'Quick' if quick else 'Full'} run of `bench/run.py`, {doc['measured_at']}. "
        "Ratios are against a raw baseline measured in the same run; higher is better.",
        "",
        "| benchmark | ours | baseline | unit | ratio | target | |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {fmt(r.ours)} | {fmt(r.baseline)} | {r.unit} | {r.ratio:.2f} | {r.target_text()} | "
            f"{'PASS' if r.passed else 'MISS'} |"
        )
    if _INFOS:
        lines += ["", "For context:", ""]
        lines += [f"- {i.line()}" for i in _INFOS]
    memory = f"{mach['memory_mb']:,} MB" if mach["memory_mb"] else "unknown"
    lines += [
        "",
        "## Machine",
        "",
        f"- CPU: {mach['cpu_model']}, {mach['cpu_count']} logical CPUs",
        f"- memory: {memory}",
        f"- {mach['platform']}",
        f"- Python {mach['python']} ({sys.implementation.name}), SQLite {mach['sqlite']}"
        + (f", PostgreSQL {mach['postgres']}" if mach["postgres"] else ", PostgreSQL not measured"),
        "",
    ]
    markdown = folder / "RESULTS.md"
    markdown.write_text("\n".join(lines))
    return markdown
