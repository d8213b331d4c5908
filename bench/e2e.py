"""End to end: 20,000 jobs through the real worker and the provider emulator; CPU and wall time per 1,000 jobs.

Goal: batcher spends less CPU per job than its peers. ``CEILINGS.md`` measured batchata, the persistent peer,
at ~32 s of CPU for 20,000 chat jobs through an OpenAI-compatible batch endpoint: ~1.5 ms per job, i.e.
**1.5 CPU seconds per 1,000 jobs**. That is the baseline (a constant from that measurement, not re-measured
here: batchata is not installed). The number compared is CPU seconds per 1,000 jobs, lower is better, so
the ratio is ``baseline / ours`` and PASS (ratio >= 1) means batcher used less CPU per job than batchata.

- The emulator (``batcher emulator --latency 0``) runs in a child process, so its CPU is not counted in ours;
  it is printed apart, as is the embedded redis-server's.
- Ours: this process's CPU (``time.process_time``) for intake (``Batcher.submit_file`` of the 20,000-line
  file, into a database migrated beforehand) plus ``workers.settings.run_worker(settings, burst=True)``, which
  packs, writes and uploads the batch file, creates the batch, polls it (``poll_min_s`` 0.05 s), downloads
  the output file and settles every job.
  Wall time per 1,000 jobs is printed for context.

Full mode: 20,000 jobs, median of 3 (a fresh database each time; the first pass also pays the one-off imports this
process had not done yet — provider SDKs — and is printed apart); quick: 2,000 jobs, once, so it includes them.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from pydantic import SecretStr

from batcher import Batcher, Settings
from batcher.db.engine import Database
from batcher.db.tables import jobs
from batcher.domain import JobState
from bench.common import (
    Result,
    fresh_postgres_database,
    info,
    median,
    migrated,
    postgres_url,
    remove_sqlite,
    run_async,
)
from bench.intake import write_batch_file
from workers.settings import run_worker

#: batchata's CPU seconds per 1,000 jobs (``CEILINGS.md``: ~32 s for 20,000 jobs)
PEER_CPU_S_PER_1000 = 1.5
TARGET = 1.0
RUN = "e2e"
_TICKS_S = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_S


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def emulator(log: Path) -> Iterator[tuple[str, int]]:
    """``batcher emulator --latency 0`` in a child process: ``(its /v1 base URL, its pid)``."""
    port = _free_port()
    cli = Path(sys.executable).with_name("batcher")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(cli), "emulator", "--port", str(port), "--latency", "0"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        root = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{root}/_emulator/stats", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the emulator did not start; see {log}") from None
                time.sleep(0.1)
        yield f"{root}/v1", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Run:
    """One pass of ``n`` jobs: seconds of this process's CPU and of wall clock, by phase."""

    n: int
    intake_cpu_s: float
    worker_cpu_s: float
    wall_s: float
    emulator_cpu_s: float
    redis_cpu_s: float

    @property
    def cpu_per_1000(self) -> float:
        return (self.intake_cpu_s + self.worker_cpu_s) / self.n * 1000


async def one_run(url: str, requests: Path, n: int, base_url: str, emulator_pid: int) -> Run:
    settings = Settings(
        database_url=url,
        redis_url=None,
        openai_api_key=SecretStr("bench"),
        openai_base_url=base_url,
        poll_min_s=0.05,
        poll_max_s=0.2,
        tick_s=1,
    )
    await migrated(url)  # once per database, not per batch: outside the timing
    emulator_cpu = _process_cpu_s(emulator_pid)
    wall = time.perf_counter()
    cpu = time.process_time()
    async with Batcher(settings, migrate=False) as batcher:
        stored = await batcher.submit_file(requests, provider="openai", run=RUN)
    intake_cpu = time.process_time() - cpu
    if stored.inserted != n:
        raise AssertionError(f"intake stored {stored.inserted} of {n} jobs")
    children = _children_cpu_s()
    cpu = time.process_time()
    await run_worker(settings, burst=True)
    worker_cpu = time.process_time() - cpu
    wall_s = time.perf_counter() - wall
    redis_cpu = _children_cpu_s() - children  # the embedded redis-server, started and reaped by run_worker
    emulator_cpu = _process_cpu_s(emulator_pid) - emulator_cpu

    db = Database(url)
    try:
        async with db.engine.connect() as conn:
            query = sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)
            counts: dict[str, int] = {state: count for state, count in await conn.execute(query)}
    finally:
        await db.aclose()
    if counts.get(JobState.SUCCEEDED.value) != n:
        raise AssertionError(f"after the worker: {counts}, expected {n} succeeded")
    return Run(n, intake_cpu, worker_cpu, wall_s, emulator_cpu, redis_cpu)


def _report(engine: str, runs: list[Run]) -> list[Result]:
    n = runs[0].n
    per = 1000 / n
    info(
        f"e2e.{engine}.wall_per_1000_jobs",
        median([r.wall_s for r in runs]) * per,
        "s",
        f"{n:,} jobs, intake to settled",
    )
    intake, worker = median([r.intake_cpu_s for r in runs]), median([r.worker_cpu_s for r in runs])
    info(
        f"e2e.{engine}.cpu_breakdown",
        median([(r.intake_cpu_s + r.worker_cpu_s) for r in runs]),
        "CPU s",
        f"intake {intake:.2f} s + worker {worker:.2f} s in this process; outside it: "
        f"emulator {median([r.emulator_cpu_s for r in runs]):.2f} s, "
        f"redis-server {median([r.redis_cpu_s for r in runs]):.2f} s",
    )
    if engine == "sqlite" and len(runs) > 1:  # SQLite runs first
        info(
            f"e2e.{engine}.first_run_cpu_per_1000_jobs",
            runs[0].cpu_per_1000,
            "CPU s/1000 jobs",
            "the first pass, which also pays the one-off imports this process had not done yet (e.g. provider SDKs)",
        )
    ours = median([r.cpu_per_1000 for r in runs])
    return [
        Result.compare(
            f"e2e.{engine}.cpu_per_1000_jobs",
            ours,
            PEER_CPU_S_PER_1000,
            "CPU s/1000 jobs",
            TARGET,
            higher_is_better=False,
        )
    ]


async def _sqlite(tmp: Path, requests: Path, n: int, repeats: int, base_url: str, pid: int) -> list[Result]:
    runs = []
    for i in range(repeats):
        db_path = tmp / f"e2e-{i}.db"
        runs.append(await one_run(f"sqlite+aiosqlite:///{db_path}", requests, n, base_url, pid))
        remove_sqlite(db_path)
    return _report("sqlite", runs)


async def _postgres(requests: Path, n: int, repeats: int, base_url: str, pid: int) -> list[Result]:
    runs = []
    for _ in range(repeats):
        async with fresh_postgres_database() as url:
            runs.append(await one_run(url, requests, n, base_url, pid))
    return _report("postgres", runs)


def run(quick: bool) -> list[Result]:
    n = 2_000 if quick else 20_000
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="batcher-bench-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        requests = tmp / "requests.jsonl"
        write_batch_file(requests, n)
        with emulator(tmp / "emulator.log") as (base_url, pid):
            results: list[Result] = run_async(_sqlite(tmp, requests, n, repeats, base_url, pid))
            if postgres_url() is not None:
                results += run_async(_postgres(requests, n, repeats, base_url, pid))
            else:
                print("e2e.postgres: skipped (set BATCHER_BENCH_POSTGRES_URL)", flush=True)
    return results
