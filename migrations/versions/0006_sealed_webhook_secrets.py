"""tenants: the webhook secret sealed (secret_sealed), the previous one during a rotation's overlap
(previous_secret_sealed until previous_secret_until), and when it was last rotated

Only columns are added (SQLite would rebuild the table, with its foreign keys, for anything more). The secrets
kept in the clear in ``webhook_secret`` stay there until a process that has the key starts (API, worker, the
``batcher keys``/``tenants`` commands): it seals each into ``secret_sealed`` in ``whsec_`` form — the same bytes,
so receivers keep their secret — and empties ``webhook_secret`` (``batcher.tenants.prepare_secrets``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("secret_sealed", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("previous_secret_sealed", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("previous_secret_until", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("secret_rotated_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    # the sealed secrets cannot be put back in the clear without the key, which migrations do not have
    sealed = op.get_bind().scalar(sa.text("SELECT count(*) FROM tenants WHERE secret_sealed IS NOT NULL"))
    if sealed:
        raise RuntimeError(
            f"{sealed} tenant(s) have a sealed webhook secret, which revision 0005 cannot hold: downgrading would "
            "lose them (receivers would need new secrets). Restore a backup from before the upgrade instead."
        )
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("secret_rotated_at")
        batch_op.drop_column("previous_secret_until")
        batch_op.drop_column("previous_secret_sealed")
        batch_op.drop_column("secret_sealed")
