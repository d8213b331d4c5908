"""tenants, API keys, idempotency keys, tenant runs, webhook deliveries; jobs.tenant, callback_url, estimate_usd

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 11:44:54.040173
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# batcher.db.tables.Money: NUMERIC(24, 12) on PostgreSQL, integer picodollars on SQLite
MONEY = sa.Numeric(precision=24, scale=12).with_variant(sa.BigInteger(), "sqlite")
TENANT_WHERE = "tenant IS NOT NULL"
CALLBACK_DUE_WHERE = "callback_url IS NOT NULL AND settled_at IS NOT NULL"


def _where(condition: str) -> dict[str, sa.TextClause]:
    return {"sqlite_where": sa.text(condition), "postgresql_where": sa.text(condition)}


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("webhook_secret", sa.String(length=128), nullable=False),
        sa.Column("max_queued_jobs", sa.Integer(), nullable=True),
        sa.Column("monthly_budget_usd", MONEY, nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("max_queued_jobs IS NULL OR max_queued_jobs >= 0", name=op.f("ck_tenants_max_queued_jobs")),
        sa.CheckConstraint(
            "monthly_budget_usd IS NULL OR monthly_budget_usd >= 0", name=op.f("ck_tenants_monthly_budget_usd")
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tenants")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"], name=op.f("fk_api_keys_tenant_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_tenant"), ["tenant"], unique=False)

    op.create_table(
        "idempotency_keys",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "key", name=op.f("pk_idempotency_keys")),
    )
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_idempotency_keys_created_at"), ["created_at"], unique=False)

    op.create_table(
        "tenant_runs",
        sa.Column("run", sa.String(length=200), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("callback_url", sa.String(length=2048), nullable=True),
        sa.Column("armed", sa.Boolean(), nullable=False),
        sa.Column("arm_seq", sa.Integer(), nullable=False),
        sa.Column("notified_jobs", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"], name=op.f("fk_tenant_runs_tenant_tenants")),
        sa.PrimaryKeyConstraint("run", name=op.f("pk_tenant_runs")),
    )
    with op.batch_alter_table("tenant_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tenant_runs_armed"), ["armed"], unique=False)
        batch_op.create_index(batch_op.f("ix_tenant_runs_tenant_run"), ["tenant", "run"], unique=False)

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("run", sa.String(length=200), nullable=True),
        sa.Column("run_jobs", sa.Integer(), nullable=True),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("last_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("event IN ('job.settled', 'run.settled')", name=op.f("ck_webhook_deliveries_event")),
        sa.CheckConstraint("state IN ('delivered', 'failed', 'pending')", name=op.f("ck_webhook_deliveries_state")),
        sa.CheckConstraint("(job_id IS NULL) <> (run IS NULL)", name=op.f("ck_webhook_deliveries_job_or_run")),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_webhook_deliveries_attempts")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_webhook_deliveries_job_id_jobs")),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"], name=op.f("fk_webhook_deliveries_tenant_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("job_id", name=op.f("uq_webhook_deliveries_job_id")),
        sa.UniqueConstraint("run", "run_jobs", name=op.f("uq_webhook_deliveries_run_run_jobs")),
    )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_webhook_deliveries_state_next_attempt_at"), ["state", "next_attempt_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_webhook_deliveries_tenant_created_at"), ["tenant", "created_at"], unique=False
        )

    # new nullable columns only: SQLite adds them in place (no table copy), PostgreSQL without a rewrite
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tenant", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("callback_url", sa.String(length=2048), nullable=True))
        batch_op.add_column(sa.Column("estimate_usd", MONEY, nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_tenant_state"), ["tenant", "state"], **_where(TENANT_WHERE))
        batch_op.create_index("ix_jobs_callback_due", ["settled_at"], **_where(CALLBACK_DUE_WHERE))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_callback_due")
        batch_op.drop_index(batch_op.f("ix_jobs_tenant_state"))
        batch_op.drop_column("estimate_usd")
        batch_op.drop_column("callback_url")
        batch_op.drop_column("tenant")

    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_deliveries_tenant_created_at"))
        batch_op.drop_index(batch_op.f("ix_webhook_deliveries_state_next_attempt_at"))
    op.drop_table("webhook_deliveries")

    with op.batch_alter_table("tenant_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tenant_runs_tenant_run"))
        batch_op.drop_index(batch_op.f("ix_tenant_runs_armed"))
    op.drop_table("tenant_runs")

    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idempotency_keys_created_at"))
    op.drop_table("idempotency_keys")

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_tenant"))
    op.drop_table("api_keys")
    op.drop_table("tenants")
