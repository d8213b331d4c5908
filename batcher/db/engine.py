"""Engines and sessions. SQLite runs in WAL with foreign keys on; PostgreSQL through asyncpg."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Table, event
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession
from sqlalchemy.pool import ConnectionPoolEntry


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for ``url`` with batcher's connection settings.

    SQLite: WAL journal, ``synchronous=NORMAL``, foreign keys, a busy timeout so a reader never fails
    on a writer's lock. Sync URLs (``sqlite:///``, ``postgresql://``) are mapped to their async drivers.
    """
    if url.startswith("sqlite:"):
        url = "sqlite+aiosqlite:" + url[len("sqlite:") :]
    elif url.startswith(("postgresql:", "postgres:")):
        url = "postgresql+asyncpg:" + url.split(":", 1)[1]
    engine = create_async_engine(url, json_serializer=_json_dumps, json_deserializer=orjson.loads, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    return engine


def _sqlite_on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


class Database:
    """One engine and its sessionmaker, plus what differs between SQLite and PostgreSQL.

    Args:
        url: SQLAlchemy URL (async drivers are chosen for plain ``sqlite:`` / ``postgresql:`` URLs).
    """

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self.sessions = make_sessionmaker(self.engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def insert(self, table: Table) -> SqliteInsert | PgInsert:
        """A dialect insert (``ON CONFLICT`` available as ``.on_conflict_do_nothing``)."""
        if self.is_sqlite:
            return sqlite_insert(table)
        return pg_insert(table)

    async def aclose(self) -> None:
        await self.engine.dispose()
