"""Alembic environment: runs migrations over batcher's async engine (SQLite or PostgreSQL)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from batcher.config import Settings
from batcher.db.engine import make_engine
from batcher.db.tables import metadata

config = context.config


def _do_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    if connection.dialect.name == "sqlite" and not connection.connection.driver_connection.in_transaction:
        # Python's sqlite3 opens a transaction only before INSERT/UPDATE/DELETE, so DDL would commit statement by
        # statement: a worker killed while migrating would leave tables without their version. SQLite's DDL is
        # transactional once a transaction is open: open it, so a migration run is all or nothing. IMMEDIATE: the
        # write lock is taken first, so a process migrating while another writes waits for it (busy_timeout)
        # instead of failing "database is locked" when its read turns into a write.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = make_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_do_run)
            await connection.commit()
    finally:
        await engine.dispose()


def run() -> None:
    existing = config.attributes.get("connection")
    if existing is not None:
        _do_run(existing)
        return
    url = config.get_main_option("sqlalchemy.url") or Settings().database_url
    asyncio.run(_run_async(url))


if context.is_offline_mode():
    raise SystemExit("batcher's migrations run online only: use `batcher db upgrade`")
run()
