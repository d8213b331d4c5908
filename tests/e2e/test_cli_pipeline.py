"""A run from file to exported results, as a user drives it: the emulator, ``submit``, ``worker --burst`` (with
its embedded Redis), ``status``, ``batches``, ``batch``, ``jobs --batch`` and ``export``, each a subprocess, on
SQLite and PostgreSQL. Also ``demo``, and ``status --watch`` stopped with Ctrl-C.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

BATCHER = Path(sys.executable).parent / "batcher"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHER_", "OPENAI_", "ANTHROPIC_"))}
    env.update(COLUMNS="200", NO_COLOR="1", TERM="dumb", **extra)
    return env


@dataclass
class Cli:
    env: dict[str, str]
    cwd: Path

    def __call__(self, *args: str | Path, code: int = 0, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(BATCHER), *map(str, args)],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def json(self, *args: str | Path) -> Any:
        return orjson.loads(self(*args, "--json").stdout)


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[str]:
    """``batcher emulator`` as a subprocess; yields its ``/v1`` base URL once it answers."""
    port = free_port()
    log = (tmp_path / "emulator.log").open("wb")
    proc = subprocess.Popen(
        [str(BATCHER), "emulator", "--port", str(port), "--latency", "0.2"],
        env=clean_env(BATCHER_EMULATOR_DATA_DIR=str(tmp_path / "emu")),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "emulator.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_emulator/stats", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the emulator did not answer within 30 s"
                time.sleep(0.1)
        yield base_url
    finally:
        stop(proc)
        log.close()


def write_requests(path: Path, n: int) -> Path:
    models = ("gpt-4o-mini", "gpt-4.1-mini")
    with path.open("wb") as fh:
        for i in range(n):
            line = {
                "custom_id": f"user-{i:03d}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": models[i % 2], "messages": [{"role": "user", "content": f"q {i}"}], "max_tokens": 9},
            }
            fh.write(orjson.dumps(line) + b"\n")
    return path


def test_submit_worker_status_batches_export(db_url: str, tmp_path: Path, emulator: str) -> None:
    cli = Cli(
        clean_env(
            BATCHER_DATABASE_URL=db_url,
            OPENAI_BASE_URL=emulator,
            OPENAI_API_KEY="e2e-key",
            BATCHER_POLL_MIN_S="0.1",
            BATCHER_POLL_MAX_S="0.5",
            BATCHER_TICK_S="1",
        ),
        tmp_path,
    )
    n = 25
    submitted = cli.json("submit", write_requests(tmp_path / "in.jsonl", n), "--provider", "openai", "--run", "e2e")
    assert submitted["inserted"] == n
    cli("worker", "--burst")  # no BATCHER_REDIS_URL: the worker starts its own redis-server

    status = cli.json("status")
    assert status["totals"]["succeeded"] == n
    assert sum(status["totals"].values()) == n
    [run] = status["runs"]
    assert (run["run"], run["settled"], run["batches_in_flight"]) == ("e2e", n, 0)
    assert status["batches"]["collected"] == 2 and sum(status["batches"].values()) == 2

    out = tmp_path / "out.jsonl"
    message = cli("export", "--run", "e2e", "-o", out).stdout
    assert f"wrote {n} line(s) of run e2e" in message
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == [f"user-{i:03d}" for i in range(n)]
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in lines)
    assert all(x["response"]["body"]["object"] == "chat.completion" for x in lines)
    jobs = {j["id"]: j for j in cli.json("jobs", "--run", "e2e", "--limit", "1000")}
    assert {x["id"].removeprefix("batch_req_") for x in lines} == set(jobs)

    batches = cli.json("batches", "--run", "e2e")
    assert len(batches) == 2
    assert {b["state"] for b in batches} == {"collected"}
    assert {b["provider_state"] for b in batches} == {"completed"}
    assert sum(b["requests"]["succeeded"] for b in batches) == n
    assert all(b["provider_batch_id"] and b["collected_at"] and b["turnaround_s"] is not None for b in batches)
    assert {b["model"] for b in batches} == {"gpt-4o-mini", "gpt-4.1-mini"}
    first = batches[0]
    detail = cli.json("batch", first["provider_batch_id"])
    assert detail["id"] == first["id"] and detail["errors"] is None and detail["failed_jobs"] == []
    in_batch = cli.json("jobs", "--batch", first["provider_batch_id"], "--limit", "1000")
    assert len(in_batch) == first["requests"]["total"] == detail["jobs"]["succeeded"]
    assert {j["batch_id"] for j in in_batch} == {first["id"]}
    assert first["id"] in cli("batches").stdout


def test_a_worker_serves_only_accounts_with_a_key(db_url: str, tmp_path: Path, emulator: str) -> None:
    """Regression: a worker without OPENAI_API_KEY failed every OpenAI job at submit (attempts used up) and a
    burst run never ended."""
    base = {"BATCHER_DATABASE_URL": db_url, "OPENAI_BASE_URL": emulator, "BATCHER_POLL_MIN_S": "0.1"}
    cli = Cli(clean_env(**base), tmp_path)
    cli("submit", write_requests(tmp_path / "in.jsonl", 5), "--provider", "openai", "--run", "keys")
    refused = cli("worker", "--burst", code=1)
    assert "error: no provider account has an API key: set ANTHROPIC_API_KEY or OPENAI_API_KEY" in refused.stderr
    # the Anthropic account has a key, the OpenAI one has none: its jobs wait, untouched, and the burst ends
    cli.env["ANTHROPIC_API_KEY"] = "e2e-key"
    served = cli("worker", "--burst", timeout_s=60)
    assert "account openai has no API key (OPENAI_API_KEY): this worker leaves its jobs queued" in served.stderr
    jobs = cli.json("jobs", "--run", "keys")
    assert {(j["state"], j["attempts"]) for j in jobs} == {("queued", 0)}
    cli.env["OPENAI_API_KEY"] = "e2e-key"
    cli("worker", "--burst", timeout_s=60)
    assert {j["state"] for j in cli.json("jobs", "--run", "keys")} == {"succeeded"}


def test_demo(tmp_path: Path) -> None:
    cli = Cli(clean_env(BATCHER_EMULATOR_DATA_DIR=str(tmp_path / "emu")), tmp_path)
    summary = cli.json("demo", "--jobs", "200", "--latency", "0.5")
    assert summary["jobs"]["succeeded"] == 200
    assert summary["batches"]["collected"] >= 1
    assert (tmp_path / "batcher-demo.db").exists()
    # OpenAI and Anthropic jobs both ran, and batching saved about half
    providers = {g["key"] for g in summary["savings"]["groups"]}
    assert providers == {"openai", "anthropic"}
    after = Cli(clean_env(BATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'batcher-demo.db'}"), tmp_path)
    savings = after.json("savings")
    assert savings["totals"]["jobs"] == 200
    assert savings["totals"]["unpriced_jobs"] == 0
    assert 49.0 <= savings["totals"]["saved_pct"] <= 50.0


def test_demo_prints_a_readable_summary(tmp_path: Path) -> None:
    cli = Cli(clean_env(BATCHER_EMULATOR_DATA_DIR=str(tmp_path / "emu")), tmp_path)
    out = cli("demo", "--jobs", "20", "--latency", "0.2").stdout
    lines = out.splitlines()
    # each fact whole on one line (a title wider than the table used to be wrapped: "… 9.23" / "s")
    assert any(re.fullmatch(r"demo finished in [0-9.]+ s", line.strip()) for line in lines), out
    assert any(re.search(r"│ succeeded +│ +20 │", line) for line in lines), out
    assert any(line.startswith("cost $") and "saved $" in line for line in lines), out


def test_status_watch_stops_cleanly_on_ctrl_c(db_url: str, tmp_path: Path) -> None:
    cli = Cli(clean_env(BATCHER_DATABASE_URL=db_url), tmp_path)
    cli("submit", write_requests(tmp_path / "in.jsonl", 3), "--provider", "openai", "--run", "waiting")
    proc = subprocess.Popen(
        [str(BATCHER), "status", "--watch", "--interval", "0.2"],
        env=cli.env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # no worker: the run never settles, so the watch goes on until interrupted
        time.sleep(3)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        stop(proc)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "waiting" in stdout and "0/3" in stdout
