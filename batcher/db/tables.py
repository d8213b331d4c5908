"""The schema: jobs, batches, ledger entries, provider pauses, and the HTTP API's tenants, keys and webhooks.

The ORM metadata is the source of truth; migrations are checked against it. States are enforced twice:
in code (``batcher.domain`` transition tables) and here (CHECK constraints, unique keys).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from batcher.domain import BatchState, JobState, state_values

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Money(TypeDecorator[Decimal]):
    """Dollars, exact to the picodollar (1e-12).

    PostgreSQL keeps ``NUMERIC(24, 12)``. SQLite has no exact decimal type (its NUMERIC is a float), so
    there the column holds integer picodollars: sums stay exact up to about $9.2 million per sum.
    """

    impl = sa.Numeric(24, 12)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.BigInteger())
        return dialect.type_descriptor(sa.Numeric(24, 12, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return int(value.scaleb(12).to_integral_value())
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return Decimal(int(value)).scaleb(-12).quantize(_PICO)
        return Decimal(value).quantize(_PICO)


_PICO = Decimal("1e-12")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python; naive UTC in the column, so SQLite compares strings of one format."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def _in(column: str, values: list[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _where(condition: str) -> dict[str, Any]:
    """Keyword arguments that make an index partial on both engines."""
    return {"sqlite_where": sa.text(condition), "postgresql_where": sa.text(condition)}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON(), Decimal: Money()}


class Batch(Base):
    """One provider batch: our row is written before the provider is called."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    provider: Mapped[str] = mapped_column(sa.String(32))
    account: Mapped[str] = mapped_column(sa.String(64))
    endpoint: Mapped[str] = mapped_column(sa.String(64))
    model: Mapped[str] = mapped_column(sa.String(200))
    state: Mapped[str] = mapped_column(sa.String(16), default=BatchState.OPEN.value)
    #: the provider's own word for its status, as last seen
    provider_state: Mapped[str | None] = mapped_column(sa.String(32))
    provider_batch_id: Mapped[str | None] = mapped_column(sa.String(128))
    input_file_id: Mapped[str | None] = mapped_column(sa.String(128))
    output_file_id: Mapped[str | None] = mapped_column(sa.String(128))
    error_file_id: Mapped[str | None] = mapped_column(sa.String(128))
    request_count: Mapped[int] = mapped_column(sa.Integer, default=0)
    bytes: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    succeeded: Mapped[int] = mapped_column(sa.Integer, default=0)
    failed: Mapped[int] = mapped_column(sa.Integer, default=0)
    expired: Mapped[int] = mapped_column(sa.Integer, default=0)
    cancelled: Mapped[int] = mapped_column(sa.Integer, default=0)
    #: the provider's error list when the batch failed as a whole
    errors: Mapped[Any | None] = mapped_column(sa.JSON)
    submit_attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    next_poll_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    poll_interval_s: Mapped[float] = mapped_column(sa.Float, default=15.0)
    last_polled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_owner: Mapped[str | None] = mapped_column(sa.String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    collected_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        sa.CheckConstraint(_in("state", state_values(BatchState)), name="state"),
        sa.CheckConstraint("request_count >= 0 AND bytes >= 0", name="sizes"),
        sa.UniqueConstraint("account", "provider_batch_id"),
        sa.Index(None, "state", "next_poll_at"),
        sa.Index(None, "created_at"),
    )


class Job(Base):
    """One request. ``body`` is the provider-native JSON text, stored as given."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    run: Mapped[str] = mapped_column(sa.String(200))
    provider: Mapped[str] = mapped_column(sa.String(32))
    account: Mapped[str] = mapped_column(sa.String(64))
    endpoint: Mapped[str] = mapped_column(sa.String(64))
    model: Mapped[str] = mapped_column(sa.String(200))
    custom_id: Mapped[str] = mapped_column(sa.String(255))
    body: Mapped[str] = mapped_column(sa.Text)
    body_bytes: Mapped[int] = mapped_column(sa.Integer)
    #: embedding inputs in the request (1 for every other endpoint): OpenAI caps them per batch
    inputs: Mapped[int] = mapped_column(sa.Integer, default=1, server_default=sa.text("1"))
    tags: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    priority: Mapped[int] = mapped_column(sa.Integer, default=0)
    not_after: Mapped[datetime | None] = mapped_column(UTCDateTime())
    state: Mapped[str] = mapped_column(sa.String(16), default=JobState.QUEUED.value)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    batch_id: Mapped[str | None] = mapped_column(sa.ForeignKey("batches.id"))
    #: the provider's response body (JSON text) once succeeded
    result: Mapped[str | None] = mapped_column(sa.Text)
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    error: Mapped[Any | None] = mapped_column(sa.JSON)
    usage: Mapped[Any | None] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: when the job last entered ``queued`` (the packer's max-wait clock)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    settled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: the HTTP API tenant that enqueued the job; ``None`` for the CLI and Python doors. (No foreign key:
    #: tenants are never deleted, and intake stays one INSERT without a lookup per row.)
    tenant: Mapped[str | None] = mapped_column(sa.String(64))
    #: where the result is POSTed when the job settles; cleared once that delivery is scheduled (the delivery
    #: row keeps the URL), so the partial index below holds exactly the settled jobs whose webhook is due
    callback_url: Mapped[str | None] = mapped_column(sa.String(2048))
    #: the job's expected cost at the batch price, for tenants with a monthly budget (``batcher.tenants``)
    estimate_usd: Mapped[Decimal | None] = mapped_column(Money())

    __table_args__ = (
        sa.CheckConstraint(_in("state", state_values(JobState)), name="state"),
        sa.CheckConstraint("attempts >= 0", name="attempts"),
        sa.CheckConstraint(
            f"batch_id IS NOT NULL OR NOT ({_in('state', ['packed', 'submitted'])})", name="batch_when_in_batch"
        ),
        sa.CheckConstraint(
            f"(settled_at IS NOT NULL) = ({_in('state', ['succeeded', 'failed', 'cancelled'])})",
            name="settled_when_terminal",
        ),
        # a user's custom_id is unique within their run: resubmitting a file adds nothing
        sa.UniqueConstraint("run", "custom_id"),
        sa.Index(None, "state", "account", "endpoint", "model"),
        sa.Index(None, "batch_id", "state"),
        sa.Index(None, "run", "state"),
        # partial: jobs of the CLI and Python doors (no tenant) cost these indexes nothing
        sa.Index(None, "tenant", "state", **_where("tenant IS NOT NULL")),
        sa.Index("ix_jobs_callback_due", "settled_at", **_where("callback_url IS NOT NULL AND settled_at IS NOT NULL")),
        # partial: the deadline sweep reads only jobs with a deadline, which most jobs have not
        sa.Index("ix_jobs_deadline", "state", "account", "not_after", **_where("not_after IS NOT NULL")),
    )


class LedgerEntry(Base):
    """What one settled provider request cost, next to what it would have cost in real time.

    Append-only. ``(job_id, attempt)`` is unique, so a result settled twice writes nothing the second time.
    ``actual_usd``/``realtime_usd`` are NULL when the model has no price (unknown, never zero).
    """

    __tablename__ = "ledger"

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id"))
    attempt: Mapped[int] = mapped_column(sa.Integer)
    batch_id: Mapped[str | None] = mapped_column(sa.String(32))
    provider: Mapped[str] = mapped_column(sa.String(32))
    account: Mapped[str] = mapped_column(sa.String(64))
    model: Mapped[str] = mapped_column(sa.String(200))
    run: Mapped[str] = mapped_column(sa.String(200))
    tags: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    #: ``batch`` or ``realtime`` (deadline fallback)
    mode: Mapped[str] = mapped_column(sa.String(16))
    input_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    cached_input_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    cache_creation_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    #: the part of ``cache_creation_tokens`` written with a 1-hour lifetime (Anthropic), priced higher
    cache_creation_1h_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default=sa.text("0"))
    output_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    actual_usd: Mapped[Decimal | None] = mapped_column(Money())
    realtime_usd: Mapped[Decimal | None] = mapped_column(Money())
    batch_price_derived: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    price_source: Mapped[str | None] = mapped_column(sa.String(64))
    price_version: Mapped[str | None] = mapped_column(sa.String(64))
    settled_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        sa.UniqueConstraint("job_id", "attempt"),
        sa.CheckConstraint(_in("mode", ["batch", "realtime"]), name="mode"),
        sa.CheckConstraint("(actual_usd IS NULL) = (realtime_usd IS NULL)", name="priced_both_or_neither"),
        sa.Index(None, "run", "settled_at"),
        sa.Index(None, "settled_at"),
        # the few unpriced entries, for the savings report's list of unpriced models
        sa.Index("ix_ledger_unpriced", "model", **_where("actual_usd IS NULL")),
    )


class Pause(Base):
    """A provider account + model that must not get new batches until ``until`` (e.g. token limit hit).

    ``batch_cap``, while ``batch_cap_until`` has not passed, is the most jobs one batch of the model may hold:
    learned when a batch alone was over the provider's enqueued-token limit.
    """

    __tablename__ = "pauses"

    account: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    until: Mapped[datetime] = mapped_column(UTCDateTime())
    backoff_s: Mapped[float] = mapped_column(sa.Float)
    reason: Mapped[str] = mapped_column(sa.String(200))
    batch_cap: Mapped[int | None] = mapped_column(sa.Integer)
    batch_cap_until: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Tenant(Base):
    """A producer of the HTTP API: its webhook secret and its limits."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    #: the webhook secret in the clear, as revisions before 0006 kept it; emptied (``''``) once sealed into
    #: ``secret_sealed`` (at the first start with the key after upgrading), never read otherwise
    webhook_secret: Mapped[str] = mapped_column(sa.String(128), default="")
    #: the webhook secret (``whsec_…``) that signs its webhooks, sealed (``batcher.secretbox``); ``None`` once its
    #: last API key is revoked
    secret_sealed: Mapped[str | None] = mapped_column(sa.String(512))
    #: the secret before the last rotation, sealed: it signs too until ``previous_secret_until``
    previous_secret_sealed: Mapped[str | None] = mapped_column(sa.String(512))
    previous_secret_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    secret_rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: most jobs not yet settled at once; ``None``: no limit
    max_queued_jobs: Mapped[int | None] = mapped_column(sa.Integer)
    #: dollars per calendar month (UTC), ledger spend plus the estimate of unsettled jobs; ``None``: no budget
    monthly_budget_usd: Mapped[Decimal | None] = mapped_column(Money())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        sa.CheckConstraint("max_queued_jobs IS NULL OR max_queued_jobs >= 0", name="max_queued_jobs"),
        sa.CheckConstraint("monthly_budget_usd IS NULL OR monthly_budget_usd >= 0", name="monthly_budget_usd"),
    )


class ApiKey(Base):
    """An API key of a tenant. Only the key's SHA-256 is stored; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.ForeignKey("tenants.name"))
    key_hash: Mapped[str] = mapped_column(sa.String(64))
    #: the key's first characters, to tell keys apart in listings
    prefix: Mapped[str] = mapped_column(sa.String(16))
    #: may read the operator's ``/metrics``
    admin: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (sa.UniqueConstraint("key_hash"), sa.Index(None, "tenant"))


class IdempotencyKey(Base):
    """The first answer to a POST that carried an ``Idempotency-Key``; a retry gets it again."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    #: SHA-256 of method, path and body: the same key with another request is refused
    request_hash: Mapped[str] = mapped_column(sa.String(64))
    status: Mapped[int] = mapped_column(sa.Integer)
    #: the response body (JSON text)
    response: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (sa.Index(None, "created_at"),)


class TenantRun(Base):
    """A run of an API tenant (``run`` is the stored, tenant-prefixed name) and its optional callback.

    The run callback fires when every job of the run has settled. Intake bumps ``arm_seq`` (and sets ``armed``)
    in the same transaction that adds jobs to a run with a callback; the scheduler clears ``armed`` only with
    ``WHERE arm_seq = :seen``, so jobs added while it looked are never missed.
    """

    __tablename__ = "tenant_runs"

    run: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.ForeignKey("tenants.name"))
    callback_url: Mapped[str | None] = mapped_column(sa.String(2048))
    armed: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    arm_seq: Mapped[int] = mapped_column(sa.Integer, default=0)
    #: how many jobs the run held when its callback last fired
    notified_jobs: Mapped[int] = mapped_column(sa.Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (sa.Index(None, "tenant", "run"), sa.Index(None, "armed"))


class WebhookDelivery(Base):
    """One webhook: a settled job's result or a settled run's summary, POSTed (signed) until it lands or 24 h pass.

    ``job_id`` is unique (one delivery per job) and so is ``(run, run_jobs)`` (one per time a run settles), so
    a scheduler that runs twice schedules nothing twice. ``attempts`` is bumped when a sender claims the row and
    the outcome is written ``WHERE attempts = :claimed``, so a sender that lost its claim records nothing.
    """

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.ForeignKey("tenants.name"))
    #: ``job.settled`` or ``run.settled``
    event: Mapped[str] = mapped_column(sa.String(32))
    job_id: Mapped[str | None] = mapped_column(sa.ForeignKey("jobs.id"))
    run: Mapped[str | None] = mapped_column(sa.String(200))
    run_jobs: Mapped[int | None] = mapped_column(sa.Integer)
    url: Mapped[str] = mapped_column(sa.String(2048))
    #: the JSON body, fixed at scheduling so every attempt sends the same bytes
    payload: Mapped[str] = mapped_column(sa.Text)
    state: Mapped[str] = mapped_column(sa.String(16))
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: the receiver's HTTP status on the last attempt (``None``: no answer)
    last_status: Mapped[int | None] = mapped_column(sa.Integer)
    last_error: Mapped[str | None] = mapped_column(sa.String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        sa.CheckConstraint(_in("state", ["delivered", "failed", "pending"]), name="state"),
        sa.CheckConstraint(_in("event", ["job.settled", "run.settled"]), name="event"),
        sa.CheckConstraint("(job_id IS NULL) <> (run IS NULL)", name="job_or_run"),
        sa.CheckConstraint("attempts >= 0", name="attempts"),
        sa.UniqueConstraint("job_id"),
        sa.UniqueConstraint("run", "run_jobs"),
        sa.Index(None, "state", "next_attempt_at"),
        sa.Index(None, "tenant", "created_at"),
    )


jobs = cast(sa.Table, Job.__table__)
batches = cast(sa.Table, Batch.__table__)
ledger = cast(sa.Table, LedgerEntry.__table__)
pauses = cast(sa.Table, Pause.__table__)
tenants = cast(sa.Table, Tenant.__table__)
api_keys = cast(sa.Table, ApiKey.__table__)
idempotency_keys = cast(sa.Table, IdempotencyKey.__table__)
tenant_runs = cast(sa.Table, TenantRun.__table__)
webhook_deliveries = cast(sa.Table, WebhookDelivery.__table__)
metadata = Base.metadata
