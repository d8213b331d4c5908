"""jobs: a partial index of the jobs that have a deadline, for the deadline sweep

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 13:55:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEADLINE_WHERE = "not_after IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_jobs_deadline",
            ["state", "account", "not_after"],
            sqlite_where=sa.text(DEADLINE_WHERE),
            postgresql_where=sa.text(DEADLINE_WHERE),
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_deadline")
