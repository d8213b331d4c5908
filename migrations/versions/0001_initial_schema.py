"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-26 10:39:13.185735
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("account", sa.String(length=64), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("provider_state", sa.String(length=32), nullable=True),
        sa.Column("provider_batch_id", sa.String(length=128), nullable=True),
        sa.Column("input_file_id", sa.String(length=128), nullable=True),
        sa.Column("output_file_id", sa.String(length=128), nullable=True),
        sa.Column("error_file_id", sa.String(length=128), nullable=True),
        sa.Column("request_count", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("succeeded", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("expired", sa.Integer(), nullable=False),
        sa.Column("cancelled", sa.Integer(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("submit_attempts", sa.Integer(), nullable=False),
        sa.Column("next_poll_at", sa.DateTime(), nullable=True),
        sa.Column("poll_interval_s", sa.Float(), nullable=False),
        sa.Column("last_polled_at", sa.DateTime(), nullable=True),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("submitted_at", sa.DateTime(), nullable=True),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("collected_at", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(
            "state IN ('cancelled', 'cancelling', 'collected', 'ended', 'expired', 'failed', 'finalizing', 'in_progress', 'open', 'submitting', 'validating')",
            name=op.f("ck_batches_state"),
        ),
        sa.CheckConstraint("request_count >= 0 AND bytes >= 0", name=op.f("ck_batches_sizes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
        sa.UniqueConstraint("account", "provider_batch_id", name=op.f("uq_batches_account_provider_batch_id")),
    )
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_batches_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_batches_state_next_poll_at"), ["state", "next_poll_at"], unique=False)

    op.create_table(
        "pauses",
        sa.Column("account", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("until", sa.DateTime(), nullable=False),
        sa.Column("backoff_s", sa.Float(), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("account", "model", name=op.f("pk_pauses")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("run", sa.String(length=200), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("account", sa.String(length=64), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("custom_id", sa.String(length=255), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("body_bytes", sa.Integer(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("not_after", sa.DateTime(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.String(length=32), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("usage", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("queued_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("settled_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint(
            "(settled_at IS NOT NULL) = (state IN ('succeeded', 'failed', 'cancelled'))",
            name=op.f("ck_jobs_settled_when_terminal"),
        ),
        sa.CheckConstraint(
            "batch_id IS NOT NULL OR NOT (state IN ('packed', 'submitted'))", name=op.f("ck_jobs_batch_when_in_batch")
        ),
        sa.CheckConstraint(
            "state IN ('cancelled', 'failed', 'fallback', 'packed', 'queued', 'submitted', 'succeeded')",
            name=op.f("ck_jobs_state"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_jobs_attempts")),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name=op.f("fk_jobs_batch_id_batches")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("run", "custom_id", name=op.f("uq_jobs_run_custom_id")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_batch_id_state"), ["batch_id", "state"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_run_state"), ["run", "state"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_jobs_state_account_endpoint_model"), ["state", "account", "endpoint", "model"], unique=False
        )

    op.create_table(
        "ledger",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.String(length=32), nullable=True),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("account", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("run", sa.String(length=200), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_creation_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column(
            "actual_usd", sa.Numeric(precision=24, scale=12).with_variant(sa.BigInteger(), "sqlite"), nullable=True
        ),
        sa.Column(
            "realtime_usd", sa.Numeric(precision=24, scale=12).with_variant(sa.BigInteger(), "sqlite"), nullable=True
        ),
        sa.Column("batch_price_derived", sa.Boolean(), nullable=False),
        sa.Column("price_source", sa.String(length=64), nullable=True),
        sa.Column("price_version", sa.String(length=64), nullable=True),
        sa.Column("settled_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("mode IN ('batch', 'realtime')", name=op.f("ck_ledger_mode")),
        sa.CheckConstraint(
            "(actual_usd IS NULL) = (realtime_usd IS NULL)", name=op.f("ck_ledger_priced_both_or_neither")
        ),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_ledger_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger")),
        sa.UniqueConstraint("job_id", "attempt", name=op.f("uq_ledger_job_id_attempt")),
    )
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ledger_run_settled_at"), ["run", "settled_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_ledger_settled_at"), ["settled_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_settled_at"))
        batch_op.drop_index(batch_op.f("ix_ledger_run_settled_at"))

    op.drop_table("ledger")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_state_account_endpoint_model"))
        batch_op.drop_index(batch_op.f("ix_jobs_run_state"))
        batch_op.drop_index(batch_op.f("ix_jobs_batch_id_state"))

    op.drop_table("jobs")
    op.drop_table("pauses")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_batches_state_next_poll_at"))
        batch_op.drop_index(batch_op.f("ix_batches_created_at"))

    op.drop_table("batches")
