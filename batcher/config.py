"""Settings, read once at the edges (CLI, API app, worker start-up) and passed down.

Provider keys and base URLs use the SDKs' own variables (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``,
``ANTHROPIC_API_KEY``, ``ANTHROPIC_BASE_URL``); everything else is prefixed ``BATCHER_``.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from batcher.domain import Provider

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./batcher.db"


class AccountSettings(BaseModel):
    """One configured provider account, e.g. ``BATCHER_PROVIDERS__groq__KIND=openai``.

    Attributes:
        kind: which batch API it speaks (``openai`` for every host with OpenAI's ``/files`` + ``/batches`` API).
        base_url: the API root (``…/v1`` for OpenAI-compatible hosts).
        api_key: its key (never logged).
        discount: fraction off the real-time price for a batch, when a model has no published batch price.
        max_requests: requests per batch (the provider's cap).
        max_bytes: bytes per batch input.
        completion_window: the window asked for at create (OpenAI-compatible; Groq takes 24h to 7d).
        line_format: ``openai`` lines carry method and url; ``body_only`` lines are ``{custom_id, body}`` only
            (Together).
        price_provider: the provider whose price list applies (``groq``, ``together``, ``mistral``, ``azure``…);
            default: the account's name if genai-prices knows it, else its kind.
        expected_turnaround_s: how long a batch usually takes there (deadline planning).
    """

    kind: Provider = Provider.OPENAI
    base_url: str | None = None
    api_key: SecretStr | None = None
    discount: Decimal | None = Field(default=None, ge=0, le=1)
    max_requests: int | None = Field(default=None, gt=0)
    max_bytes: int | None = Field(default=None, gt=0)
    completion_window: str = "24h"
    line_format: Literal["openai", "body_only"] = "openai"
    price_provider: str | None = None
    expected_turnaround_s: float | None = Field(default=None, gt=0)


class Settings(BaseSettings):
    """All of batcher's configuration.

    Attributes:
        database_url: SQLAlchemy async URL. SQLite (default, single worker) or PostgreSQL.
        redis_url: Redis for the arq worker; ``None`` starts a private embedded redis-server.
        pack_max_wait_s: flush a group once its oldest queued job has waited this long.
        max_attempts: how many times a job is sent to a provider before it fails for good.
        expected_turnaround_s: how long a batch is expected to take, unless an account or provider says
            otherwise (``provider_turnaround_s``, an account's ``expected_turnaround_s``).
        provider_turnaround_s: expected batch turnaround by account name or provider kind, e.g.
            ``{"anthropic": 3600}``; deadline planning uses it.
        deadline_lead_s: a job with a deadline is packed this long before the last moment a batch could still
            meet it, so the pack, submit and tick latencies do not push it past that moment.
        fallback_enabled: a job whose deadline a batch can no longer meet is sent to the provider's real-time
            API (``True``) or fails with ``deadline_missed`` (``False``).
        fallback_concurrency: real-time requests in flight at once per worker.
        fallback_batch: jobs one fallback task claims at a time.
        retry_jitter: fraction of random extra delay added to retries of failed provider calls (0 disables).
        poll_give_up_s: a batch whose status cannot be read (a non-retryable error) for this long is given up:
            cancelled where possible and failed, its jobs requeued.
        recovery_interval_s: how often a worker sweeps each account for provider batches nobody recorded and
            uploaded files no batch uses.
        recovery_clock_skew_s: allowance between our clock and the provider's when a batch is matched by its
            creation time (providers whose batches carry no metadata).
        shutdown_grace_s: on SIGTERM, how long a worker lets running steps finish before it cancels them and
            releases what they held.
    """

    model_config = SettingsConfigDict(
        env_prefix="BATCHER_",
        extra="ignore",
        populate_by_name=True,
        env_nested_delimiter="__",
        # an error about a setting never repeats its value (keys, the secret key)
        hide_input_in_errors=True,
    )

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None

    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY", "BATCHER_OPENAI_API_KEY")
    )
    openai_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_BASE_URL", "BATCHER_OPENAI_BASE_URL")
    )
    anthropic_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_API_KEY", "BATCHER_ANTHROPIC_API_KEY")
    )
    anthropic_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_BASE_URL", "BATCHER_ANTHROPIC_BASE_URL")
    )

    pack_max_wait_s: float = Field(default=300.0, ge=0, validation_alias=AliasChoices("BATCHER_PACK_MAX_WAIT"))
    max_attempts: int = Field(default=3, ge=1)
    poll_min_s: float = Field(default=15.0, gt=0)
    poll_max_s: float = Field(default=300.0, gt=0)
    lease_s: float = Field(default=120.0, gt=0)
    tick_s: int = Field(default=5, ge=1, le=60)
    token_limit_pause_s: float = Field(default=600.0, ge=0)
    #: how long a batch is expected to take; a job whose deadline is nearer is packed at once
    expected_turnaround_s: float = Field(default=6 * 3600.0, ge=0)
    provider_turnaround_s: dict[str, float] = Field(default_factory=dict)
    deadline_lead_s: float = Field(default=60.0, ge=0)
    fallback_enabled: bool = True
    fallback_concurrency: int = Field(default=4, ge=1)
    fallback_batch: int = Field(default=100, ge=1)
    retry_jitter: float = Field(default=0.5, ge=0, le=1)
    poll_give_up_s: float = Field(default=3600.0, gt=0)
    recovery_interval_s: float = Field(default=300.0, gt=0)
    recovery_clock_skew_s: float = Field(default=120.0, ge=0)
    shutdown_grace_s: float = Field(default=7.0, ge=0, le=60)
    settle_chunk: int = Field(default=1000, ge=1)
    provider_concurrency: int = Field(default=4, ge=1)
    intake_chunk: int = Field(default=5000, ge=1)
    #: extra provider accounts by name (OpenAI-compatible hosts, second organisations…)
    providers: dict[str, AccountSettings] = Field(default_factory=dict)
    #: fraction off the real-time price per provider where a model has no published batch price
    batch_discounts: dict[str, Decimal] = Field(default_factory=dict)
    #: JSON file of per-model prices (negotiated rates); see ``batcher.pricing.load_overrides``
    price_overrides_file: Path | None = None

    # -- the HTTP API and its webhooks (batcher.api, batcher.webhooks) --
    #: largest body of a single-job POST, in bytes (413 above it)
    api_max_job_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    #: largest body of a bulk POST, in bytes (413 above it)
    api_max_bulk_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    #: most jobs in one bulk POST (413 above it)
    api_max_bulk_jobs: int = Field(default=100_000, gt=0)
    #: seconds a connection has to send a whole request head (line and headers) after it opens or after its last
    #: answer; a connection that has not is closed (slow or idle clients). Idle keep-alive connections close then too
    api_header_timeout_s: float = Field(default=15.0, gt=0)
    #: seconds a request has to send its whole body once its head has arrived (408 past it)
    api_body_timeout_s: float = Field(default=120.0, gt=0)
    #: most client connections an API process holds open; one past it is answered 503 and closed at once
    api_max_connections: int = Field(default=1024, ge=1)
    #: how long a verified API key and its tenant's limits are trusted before they are read again: a revoked key
    #: stops working within this many seconds
    api_auth_cache_s: float = Field(default=5.0, ge=0)
    #: how long the first answer to a POST with an ``Idempotency-Key`` is kept
    api_idempotency_ttl_s: float = Field(default=86400.0, gt=0)
    #: serve ``/metrics`` without a key (a scraper on a private network); otherwise it needs an admin key
    api_metrics_public: bool = False
    #: group commits of single-job POSTs in flight at once per API process (PostgreSQL; SQLite has one writer)
    api_commit_concurrency: int = Field(default=4, ge=1, le=64)
    #: callback URLs may name private, loopback and link-local addresses (tests, single-machine setups)
    webhook_allow_private: bool = False
    #: seconds a receiver has to answer one delivery
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    #: delay before the first retry of a failed delivery; each later one doubles, up to ``webhook_retry_max_s``
    webhook_retry_base_s: float = Field(default=10.0, gt=0)
    webhook_retry_max_s: float = Field(default=3600.0, gt=0)
    #: a delivery still failing this long after it was scheduled is given up (``failed``)
    webhook_give_up_s: float = Field(default=86400.0, gt=0)
    #: deliveries in flight at once per worker
    webhook_concurrency: int = Field(default=16, ge=1)
    #: deliveries one sender claims at a time
    webhook_batch: int = Field(default=200, ge=1)
    #: seals the tenants' webhook secrets at rest (AES-256-GCM): 32 random bytes, base64. Unset: a SQLite database
    #: file gets a key file next to it (``<database>.key``, mode 0600); PostgreSQL needs it (``batcher.secretbox``)
    secret_key: SecretStr | None = None

    @field_validator("secret_key")
    @classmethod
    def _secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from batcher.secretbox import decode_key

            decode_key(value.get_secret_value())
        return value

    @field_validator("providers")
    @classmethod
    def _account_names(cls, value: dict[str, AccountSettings]) -> dict[str, AccountSettings]:
        for name in value:
            if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"account name {name!r}: use letters, digits, - and _ (at most 64)")
        return value

    def turnaround_s(self, account: str, provider: str) -> float:
        """How long a batch of ``account`` (a ``provider`` account) is expected to take, in seconds.

        The account's own ``expected_turnaround_s`` first, then ``provider_turnaround_s`` by account name, then
        by provider kind, then ``expected_turnaround_s``.
        """
        configured = self.providers.get(account)
        if configured is not None and configured.expected_turnaround_s is not None:
            return configured.expected_turnaround_s
        for key in (account, provider):
            if key in self.provider_turnaround_s:
                return self.provider_turnaround_s[key]
        return self.expected_turnaround_s

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
