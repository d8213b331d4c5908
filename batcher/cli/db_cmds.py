"""``batcher db …``."""

from __future__ import annotations

from batcher.cli.app import console, db_app, load_settings, run
from batcher.db import migrate
from batcher.db.engine import Database


@db_app.command("upgrade")
def upgrade(revision: str = "head") -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    settings = load_settings()

    async def _go() -> str | None:
        db = Database(settings.database_url)
        try:
            await migrate.upgrade(db.engine, revision)
            return await migrate.current(db.engine)
        finally:
            await db.aclose()

    current = run(_go())
    console.print(f"database at revision {current}")


@db_app.command("current")
def current() -> None:
    """Print the revision the database is at."""
    settings = load_settings()

    async def _go() -> str | None:
        db = Database(settings.database_url)
        try:
            return await migrate.current(db.engine)
        finally:
            await db.aclose()

    console.print(run(_go()) or "(empty)")
