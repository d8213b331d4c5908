"""What every benchmark shares: results as ratios against a raw baseline, timing, fresh databases, the report.

A benchmark module ``bench/<name>.py`` exposes ``run(quick: bool) -> list[Result]``. Each result compares
batcher ("ours") with the raw driver or library doing the same work ("baseline"), measured in the same run
on the same machine, so the ratio means something on any machine; ``target`` is the ratio the issue asks for.
"""

from __future__ import annotations

import asyncio
import os
import platform
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
RESULTS_JSON = BENCH_DIR / "results.json"
RESULTS_MD = BENCH_DIR / "RESULTS.md"

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
    """

    name: str
    ours: float
    baseline: float
    unit: str
    ratio: float
    target: float
    passed: bool

    @classmethod
    def compare(
        cls, name: str, ours: float, baseline: float, unit: str, target: float, *, higher_is_better: bool = True
    ) -> Result:
        """A result whose ratio is computed so that higher is better whatever the unit."""
        better, worse = (ours, baseline) if higher_is_better else (baseline, ours)
        ratio = better / worse if worse else 0.0
        return cls(name, ours, baseline, unit, ratio, target, ratio >= target)

    def line(self) -> str:
        verdict = "PASS" if self.passed else "MISS"
        return (
            f"{self.name}: ours {fmt(self.ours)} {self.unit}, baseline {fmt(self.baseline)} {self.unit}, "
            f"ratio {self.ratio:.2f} (target >= {self.target:g}) {verdict}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ours": round(self.ours, 4),
            "baseline": round(self.baseline, 4),
            "unit": self.unit,
            "ratio": round(self.ratio, 4),
            "target": self.target,
            "pass": self.passed,
        }


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
async def fresh_postgres_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database on the benchmark server (its SQLAlchemy URL); dropped on exit."""
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
        await conn.execute(f'CREATE DATABASE "{name}"')
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


def write_results(results: Sequence[Result], quick: bool) -> None:
    """Write ``bench/results.json`` and ``bench/RESULTS.md`` for this run."""
    mach = machine()
    doc = {
        "machine": mach,
        "quick": quick,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": [r.to_json() for r in results],
        "info": [{"name": i.name, "value": round(i.value, 4), "unit": i.unit, "note": i.note} for i in _INFOS],
    }
    RESULTS_JSON.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")

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
            f"| {r.name} | {fmt(r.ours)} | {fmt(r.baseline)} | {r.unit} | {r.ratio:.2f} | >= {r.target:g} | "
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
    RESULTS_MD.write_text("\n".join(lines))
