"""Processes for the end-to-end crash tests: ``batcher emulator``, a private ``redis-server`` and ``batcher worker``
subprocesses that a test can SIGKILL, SIGTERM and start again, each with its own log file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from batcher.embedded import redis_server_path

BATCHER = Path(sys.executable).parent / "batcher"
#: the worker under arq's own CLI
ARQ_WORKER = (str(Path(sys.executable).parent / "arq"), "workers.main.WorkerSettings")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHER_", "OPENAI_", "ANTHROPIC_"))}
    env.update(COLUMNS="200", NO_COLOR="1", TERM="dumb", **extra)
    return env


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"{what} exited at start"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{what} did not start within {timeout_s} s"
            time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def emulator(tmp_path: Path, **knobs: Any) -> Iterator[str]:
    """``batcher emulator`` as a subprocess (knobs as ``BATCHER_EMULATOR_*``); yields its ``/v1`` base URL."""
    port = free_port()
    env = clean_env(BATCHER_EMULATOR_DATA_DIR=str(tmp_path / "emu"))
    for name, value in knobs.items():
        env[f"BATCHER_EMULATOR_{name.upper()}"] = value if isinstance(value, str) else orjson.dumps(value).decode()
    log = (tmp_path / "emulator.log").open("wb")
    proc = subprocess.Popen(
        [str(BATCHER), "emulator", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        _wait_port(port, proc, "the emulator")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)
        log.close()


def emulator_stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/_emulator/stats", timeout=30) as resp:
        data: dict[str, Any] = orjson.loads(resp.read())
        return data


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free TCP port (so FLUSHALL touches nobody else's data); yields its URL."""
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="batcher-e2e-redis-"))
    proc = subprocess.Popen(
        [redis_server_path(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class WorkerProcess:
    """One ``batcher worker`` slot: started, killed and started again; every run logs to its own file."""

    name: str
    env: dict[str, str]
    logs: Path
    args: tuple[str, ...] = ()
    #: the program and its arguments before ``args``: ``batcher worker``, or arq's own CLI (:data:`ARQ_WORKER`)
    command: tuple[str, ...] = (str(BATCHER), "worker", "--verbose")
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
    kills: int = 0
    started_at: float = 0.0
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.runs += 1
        self._close_log()
        self._log = (self.logs / f"{self.name}-{self.runs}.log").open("wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [*self.command, *self.args], env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def terminate(self, timeout_s: float = 30) -> float:
        """SIGTERM and wait; returns how long it took to exit."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout_s)
        return time.monotonic() - started

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at if self.alive else 0.0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_count(self, text: str) -> int:
        """How many lines of all this slot's runs contain ``text``."""
        return sum(
            line.count(text)
            for p in self.logs.glob(f"{self.name}-*.log")
            for line in p.read_text(errors="replace").splitlines()
        )

    def log_text(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-4000:] for p in sorted(self.logs.glob(f"{self.name}-*"))
        )

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()


def worker_env(database_url: str, redis_url: str, base_url: str, **settings: str) -> dict[str, str]:
    """The environment of a worker: the database, Redis, the emulator as the ``openai`` account, and settings
    (``poll_min_s="0.3"`` → ``BATCHER_POLL_MIN_S=0.3``)."""
    env = clean_env(
        BATCHER_DATABASE_URL=database_url,
        BATCHER_REDIS_URL=redis_url,
        OPENAI_BASE_URL=base_url,
        OPENAI_API_KEY="e2e-key",
    )
    for name, value in settings.items():
        env[f"BATCHER_{name.upper()}"] = value
    return env
