"""``batcher db …``."""

from __future__ import annotations

import typer
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from batcher.cli.app import console, db_app, load_settings, run
from batcher.db import migrate
from batcher.db.engine import Database
from batcher.errors import InvalidInput


def _known_revisions() -> str:
    """``head (0005_x), 0004_y, …, base``: what ``--revision`` accepts, newest first."""
    script = ScriptDirectory.from_config(migrate.alembic_config())
    heads = set(script.get_heads())
    names = [f"{r.revision} (head)" if r.revision in heads else r.revision for r in script.walk_revisions()]
    return ", ".join(["head", *names, "base"])


@db_app.command("upgrade")
def upgrade(
    revision: str = typer.Option(
        "head", "--revision", help="Apply migrations up to this revision (an id, or head for the newest)."
    ),
) -> None:
    """Apply migrations up to --revision (default: the newest)."""
    settings = load_settings()

    async def _go() -> str | None:
        db = Database(settings.database_url)
        try:
            try:
                await migrate.upgrade(db.engine, revision)
            except CommandError as exc:
                raise InvalidInput(
                    f"cannot upgrade to revision {revision!r} ({exc}); known revisions: {_known_revisions()}"
                ) from None
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
