"""The HTTP API: single-job POST throughput, and a bulk POST of 10,000 jobs.

1. ``http.<engine>.single_post``: ``POST /v1/jobs`` requests per second answered 202 by ``batcher api`` (bearer
   auth, validation, group commit to the database — 202 means committed) against a bare aiohttp app that
   validates the same pydantic model and answers 202 without storing anything. Both servers run in a process
   of their own; the same aiohttp client, in this process, sends the same requests at the same concurrency.
   Goal: >= 60%.
2. ``http.<engine>.bulk_post``: jobs per second of one ``POST /v1/jobs/bulk`` of 10,000 jobs (JSON Lines) to
   ``batcher api``, from sending the body to the 202, against the CLI's intake of the same 10,000 requests as a
   provider batch file (``Batcher.submit_file``, what ``batcher submit`` runs, without the process start-up),
   each into a fresh database. Goal: >= 50%.

Quick: 3 turns of 2,000 single POSTs, 2 bulk POSTs. Full: 5 turns of 5,000 single POSTs, 3 bulk POSTs. Medians.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    Result,
    Stopwatch,
    fresh_postgres_database,
    info,
    median,
    migrated,
    postgres_url,
    run_async,
)

SINGLE_TARGET = 0.6
BULK_TARGET = 0.5
CONCURRENCY = 64
BULK_JOBS = 10_000
MODEL = "gpt-4o-mini"
ROOT = Path(__file__).resolve().parents[1]
#: seals the bench tenant's webhook secret (the server and the key maker share it; the databases are throwaway)
BENCH_SECRET_KEY = base64.b64encode(os.urandom(32)).decode()


def _body(i: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": f"Question {i}: summarise the attached release notes in two sentences."},
        ],
        "max_tokens": 128,
    }


def job(i: int, run: str = "bench") -> dict[str, Any]:
    """One job as the API takes it."""
    return {
        "provider": "openai",
        "url": "/v1/chat/completions",
        "body": _body(i),
        "custom_id": f"req-{i:07d}",
        "run": run,
    }


def batch_line(i: int) -> dict[str, Any]:
    """The same request as a line of an OpenAI batch file (what ``batcher submit`` reads)."""
    return {"custom_id": f"req-{i:07d}", "method": "POST", "url": "/v1/chat/completions", "body": _body(i)}


# -- the servers ----------------------------------------------------------------------------------------------------


def _serve_bare(port: int) -> None:
    """The baseline: aiohttp + the same pydantic model, 202 with an id, nothing stored."""
    from aiohttp import web
    from pydantic import ValidationError

    from batcher.api.models import JobIn
    from batcher.domain import new_id

    async def post_job(request: web.Request) -> web.Response:
        try:
            item = JobIn.model_validate_json(await request.read())
        except ValidationError as exc:
            return web.Response(status=422, text=str(exc))
        body = {"id": new_id(), "custom_id": item.custom_id, "run": item.run, "state": "queued", "created": True}
        return web.Response(status=202, body=orjson.dumps(body), content_type="application/json")

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/jobs", post_job)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    import aiohttp

    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"server at {url} did not start")
            await asyncio.sleep(0.05)


@asynccontextmanager
async def server(kind: str, database_url: str | None = None) -> AsyncIterator[str]:
    """A server process: ``bare`` (the baseline) or ``ours`` (``batcher api`` on ``database_url``)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHER_")}
    if kind == "bare":
        cmd = [sys.executable, "-m", "bench.http", "bare", str(port)]
    else:
        assert database_url is not None
        env["BATCHER_DATABASE_URL"] = database_url
        env["BATCHER_SECRET_KEY"] = BENCH_SECRET_KEY
        cmd = [str(Path(sys.executable).with_name("batcher")), "api", "--port", str(port)]
    proc = _spawn(cmd, env)
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(url, proc)
        yield url
    finally:
        _stop(proc)


def _spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def _key(database_url: str) -> str:
    from batcher import tenants
    from batcher.config import Settings
    from batcher.db.engine import Database
    from batcher.secretbox import secret_box

    db = Database(database_url)
    box = secret_box(Settings(database_url=database_url, secret_key=BENCH_SECRET_KEY))
    try:
        return (await tenants.create_key(db, "bench", box=box)).key
    finally:
        await db.aclose()


# -- the client -----------------------------------------------------------------------------------------------------


async def _post_many(url: str, key: str, bodies: list[bytes], concurrency: int) -> float:
    """POST every body to ``/v1/jobs`` from ``concurrency`` workers; returns requests per second."""
    import aiohttp

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        feed: Iterator[bytes] = iter(bodies)
        failures: list[int] = []

        async def worker() -> None:
            for body in feed:
                async with http.post(url + "/v1/jobs", data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 202:
                        failures.append(resp.status)

        with Stopwatch() as sw:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    if failures:
        raise AssertionError(f"{len(failures)} requests failed, e.g. HTTP {failures[0]}")
    return len(bodies) / sw.elapsed_s


async def _single(database_url: str, n: int, warmup: int, rounds: int) -> tuple[float, float]:
    """(ours, baseline) requests per second: the medians of ``rounds`` turns taken in alternation.

    Both servers run throughout; the client measures one, then the other, so a machine whose load drifts weighs
    on both alike.
    """
    bodies = [orjson.dumps(job(i)) for i in range(warmup + n * rounds)]
    await migrated(database_url)
    key = await _key(database_url)
    ours: list[float] = []
    base: list[float] = []
    async with server("bare") as bare_url, server("ours", database_url) as our_url:
        await _post_many(bare_url, "none", bodies[:warmup], CONCURRENCY)
        await _post_many(our_url, key, bodies[:warmup], CONCURRENCY)
        for turn in range(rounds):
            part = bodies[warmup + turn * n : warmup + (turn + 1) * n]
            base.append(await _post_many(bare_url, "none", part, CONCURRENCY))
            ours.append(await _post_many(our_url, key, part, CONCURRENCY))
    return median(ours), median(base)


async def _bulk_ours(database_url: str, body: bytes) -> float:
    import io

    import aiohttp

    await migrated(database_url)
    key = await _key(database_url)
    async with server("ours", database_url) as url, aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"}
        with Stopwatch() as sw:
            async with http.post(url + "/v1/jobs/bulk", data=io.BytesIO(body), headers=headers) as resp:
                answer = await resp.read()
        if resp.status != 202 or orjson.loads(answer)["created"] != BULK_JOBS:
            raise AssertionError(f"bulk POST answered {resp.status}: {answer[:300]!r}")
    return BULK_JOBS / sw.elapsed_s


async def _bulk_cli(database_url: str, path: Path) -> float:
    from batcher import Batcher, Settings

    async with Batcher(Settings(database_url=database_url)) as batcher:  # migrates on entry, outside the timing
        with Stopwatch() as sw:
            result = await batcher.submit_file(path, provider="openai", run="bench")
    if result.inserted != BULK_JOBS:
        raise AssertionError(f"submit_file stored {result.inserted} of {BULK_JOBS}")
    return BULK_JOBS / sw.elapsed_s


# -- per engine -----------------------------------------------------------------------------------------------------


async def _engine(engine: str, tmp: Path, quick: bool) -> list[Result]:
    n, warmup, rounds, runs = (2_000, 300, 3, 2) if quick else (5_000, 500, 5, 3)
    counter = iter(range(10**6))

    @asynccontextmanager
    async def fresh() -> AsyncIterator[str]:
        if engine == "postgres":
            async with fresh_postgres_database() as url:
                yield url
        else:
            path = tmp / f"db-{next(counter)}.db"
            yield f"sqlite+aiosqlite:///{path}"
            _remove_sqlite(path)

    async with fresh() as url:
        ours, base = await _single(url, n, warmup, rounds)
    results = [Result.compare(f"http.{engine}.single_post", ours, base, "req/s", SINGLE_TARGET)]

    path = tmp / "requests.jsonl"
    path.write_bytes(b"".join(orjson.dumps(batch_line(i)) + b"\n" for i in range(BULK_JOBS)))
    body = b"\n".join(orjson.dumps(job(i)) for i in range(BULK_JOBS))
    info(f"http.{engine}.bulk_body", len(body) / 1e6, "MB", f"{BULK_JOBS:,} jobs as JSON Lines")
    bulk: list[float] = []
    cli: list[float] = []
    for _ in range(runs):
        async with fresh() as url:
            cli.append(await _bulk_cli(url, path))
        async with fresh() as url:
            bulk.append(await _bulk_ours(url, body))
    results.append(Result.compare(f"http.{engine}.bulk_post", median(bulk), median(cli), "jobs/s", BULK_TARGET))
    return results


def run(quick: bool) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="batcher-bench-http-") as name:
        tmp = Path(name)
        results = run_async(_engine("sqlite", tmp, quick))
        if postgres_url() is not None:
            results += run_async(_engine("postgres", tmp, quick))
        else:
            print("http.postgres: skipped (set BATCHER_BENCH_POSTGRES_URL)", flush=True)
    return list(results)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "bare":
        _serve_bare(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m bench.http bare PORT (the baseline server; the benchmark starts it)")
