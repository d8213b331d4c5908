"""jobs.inputs (embedding inputs per request), ledger.cache_creation_1h_tokens (1-hour cache writes), and a
learned per-model batch cap on pauses (a batch alone over the enqueued-token limit)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 03:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("inputs", sa.Integer(), server_default=sa.text("1"), nullable=False))
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cache_creation_1h_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
        )
    with op.batch_alter_table("pauses", schema=None) as batch_op:
        batch_op.add_column(sa.Column("batch_cap", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("batch_cap_until", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pauses", schema=None) as batch_op:
        batch_op.drop_column("batch_cap_until")
        batch_op.drop_column("batch_cap")
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.drop_column("cache_creation_1h_tokens")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("inputs")
