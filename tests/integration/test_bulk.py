"""Set-based statements (``batcher.db.bulk``): values stored as SQLAlchemy would store them, plans led by the key."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from batcher.db.bulk import BulkStatement, RowValues, filter_only
from batcher.db.engine import Database
from batcher.db.tables import Money, UTCDateTime, batches, jobs
from batcher.domain import JobState
from batcher.settle import _statements
from batcher.timeutil import utcnow

ROWS: list[tuple[Any, ...]] = [
    ("a", "plain", Decimal("0.000000000001"), True, {"k": [1, 2.5, None, "x"]}, 0),
    ("b", 'quotes " and \\ backslash\nnewline\ttab', Decimal("9000000.123456789012"), False, None, 2**62),
    ("c", "unicode é 漢字 🎉 \u2028 \x01", None, None, {"nested": {"a": '"q"'}}, None),
    ("d", None, Decimal(0), True, [], -5),
    ("e", "", Decimal("-1.5"), False, "a JSON string", 1),
]
COLUMNS = ("id", "text", "money", "flag", "doc", "n")


def probe_table(metadata: sa.MetaData, name: str) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.String(8), primary_key=True),
        sa.Column("text", sa.Text),
        sa.Column("money", Money()),
        sa.Column("flag", sa.Boolean),
        sa.Column("doc", sa.JSON),
        sa.Column("n", sa.BigInteger),
    )


async def stored(db: Database, table: sa.Table) -> list[tuple[Any, ...]]:
    """The rows as the database holds them (JSON as text: a JSON null and an SQL NULL differ)."""
    doc = "doc::text" if db.dialect == "postgresql" else "doc"
    async with db.engine.connect() as conn:
        result = await conn.exec_driver_sql(f"SELECT id, text, money, flag, {doc}, n FROM {table.name} ORDER BY id")
        return [tuple(row) for row in result]


async def test_rows_are_stored_as_sqlalchemy_stores_them(db: Database) -> None:
    metadata = sa.MetaData()
    bulk, expected = probe_table(metadata, "bulk_probe"), probe_table(metadata, "bulk_expected")
    dialect = db.engine.dialect
    values = RowValues(dialect, {name: bulk.c[name].type for name in COLUMNS})
    insert = BulkStatement(sa.insert(bulk).from_select(COLUMNS, sa.select(*values.c.values())), values, dialect)
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        await insert.execute(conn, insert.params(ROWS))
        await conn.execute(sa.insert(expected), [dict(zip(COLUMNS, row, strict=True)) for row in ROWS])
    assert await stored(db, bulk) == await stored(db, expected)
    async with db.engine.connect() as conn:
        back = [tuple(row) for row in await conn.execute(sa.select(bulk).order_by(bulk.c.id))]
    # money is exact, to the picodollar, on both engines
    assert [row[2] for row in back] == [row[2] for row in ROWS]


async def test_shared_values_are_checked() -> None:
    db = Database("sqlite+aiosqlite://")
    try:
        dialect = db.engine.dialect
        values = RowValues(dialect, {"id": jobs.c.id.type})
        update = BulkStatement(
            sa.update(jobs)
            .where(jobs.c.id == values.c["id"], jobs.c.batch_id == sa.bindparam("batch_id"))
            .values(updated_at=sa.bindparam("now", type_=UTCDateTime())),
            values,
            dialect,
        )
        with pytest.raises(TypeError, match=r"unknown \['nope'\], missing \['now'\]"):
            update.params([("j",)], batch_id="b", nope=1)
        with pytest.raises(TypeError, match="rows of 2 values given for 1 columns"):
            update.params([("j", "k")], batch_id="b", now=utcnow())
    finally:
        await db.aclose()


async def submitted_batch(db: Database, n: int) -> tuple[str, list[str]]:
    """A batch of ``n`` submitted jobs, inserted directly; nobody has run ANALYZE."""
    now = utcnow()
    batch_id = "b" * 32
    ids = [f"{i:032d}" for i in range(n)]
    common = {"provider": "openai", "account": "openai", "endpoint": "/v1/chat/completions", "model": "m"}
    async with db.engine.begin() as conn:
        await conn.execute(sa.insert(batches).values(id=batch_id, created_at=now, updated_at=now, **common))
        await conn.execute(
            sa.insert(jobs),
            [
                {
                    "id": job_id,
                    "run": "r",
                    "custom_id": job_id,
                    "body": "{}",
                    "body_bytes": 2,
                    "state": JobState.SUBMITTED.value,
                    "attempts": 1,
                    "batch_id": batch_id,
                    "created_at": now,
                    "queued_at": now,
                    "updated_at": now,
                    **common,
                }
                for job_id in ids
            ],
        )
    return batch_id, ids


async def plan(db: Database, statement: BulkStatement, params: tuple[Any, ...]) -> str:
    explain = "EXPLAIN QUERY PLAN " if db.is_sqlite else "EXPLAIN "
    async with db.engine.connect() as conn:
        rows = await conn.exec_driver_sql(explain + statement.sql, params)
        return "\n".join(str(row[-1]) for row in rows)


async def test_settling_finds_jobs_by_key_on_a_table_without_statistics(db: Database) -> None:
    """Regression: led by ``ix_jobs_batch_id_state``, every chunk scanned the whole batch (quadratic)."""
    batch_id, ids = await submitted_batch(db, 3000)
    s = _statements(db)
    rows = [(job_id, None, None) for job_id in ids[:1000]]
    error_rows = [(job_id, "x", {}) for job_id in ids[:1000]]
    entry_rows = [(job_id, 1, 0, 0, 0, 1, 0, Decimal(1), Decimal(2), False, "s", "v") for job_id in ids[:1000]]
    shared = {"batch_id": batch_id, "now": utcnow()}
    plans = {
        "entries": await plan(db, s.entries, s.entries.params(entry_rows, mode="batch", **shared)),
        "succeeded": await plan(db, s.succeeded, s.succeeded.params(rows, **shared)),
        "requeued": await plan(db, s.requeued, s.requeued.params(error_rows, max_attempts=3, **shared)),
        "cancelled": await plan(db, s.cancelled, s.cancelled.params([(j,) for j in ids[:1000]], **shared)),
    }
    for name, text in plans.items():
        assert "ix_jobs" not in text, f"{name}:\n{text}"


def test_filter_only_renders_per_dialect() -> None:
    condition = filter_only(jobs.c.state) == "submitted"
    assert str(condition.compile(dialect=sqlite.dialect())) == "+jobs.state = ?"
    assert str(condition.compile(dialect=postgresql.dialect())).startswith("(jobs.state || '') = ")
