"""Settings, read once at the edges (CLI, API app, worker start-up) and passed down.

Provider keys and base URLs use the SDKs' own variables (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``,
``ANTHROPIC_API_KEY``, ``ANTHROPIC_BASE_URL``); everything else is prefixed ``BATCHER_``.
"""

from __future__ import annotations

from decimal import Decimal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./batcher.db"


class Settings(BaseSettings):
    """All of batcher's configuration.

    Attributes:
        database_url: SQLAlchemy async URL. SQLite (default, single worker) or PostgreSQL.
        redis_url: Redis for the arq worker; ``None`` starts a private embedded redis-server.
        pack_max_wait_s: flush a group once its oldest queued job has waited this long.
        max_attempts: how many times a job is sent to a provider before it fails for good.
    """

    model_config = SettingsConfigDict(env_prefix="BATCHER_", extra="ignore", populate_by_name=True)

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
    settle_chunk: int = Field(default=1000, ge=1)
    provider_concurrency: int = Field(default=4, ge=1)
    intake_chunk: int = Field(default=5000, ge=1)
    openai_discount: Decimal = Decimal("0.5")
    anthropic_discount: Decimal = Decimal("0.5")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
