"""ledger: a partial index of the unpriced entries, for the savings report's list of unpriced models

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 17:25:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNPRICED_WHERE = "actual_usd IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.create_index(
            "ix_ledger_unpriced",
            ["model"],
            sqlite_where=sa.text(UNPRICED_WHERE),
            postgresql_where=sa.text(UNPRICED_WHERE),
        )


def downgrade() -> None:
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_unpriced")
