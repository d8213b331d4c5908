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
        kind: which batch API it speaks (``openai`` for every OpenAI-compatible host).
        base_url: the API root (``…/v1`` for OpenAI-compatible hosts).
        api_key: its key (never logged).
        discount: fraction off the real-time price for a batch, when a model has no published batch price.
        max_requests: requests per batch (the provider's cap).
        max_bytes: bytes per batch input.
        completion_window: the window asked for at create (OpenAI-compatible; Groq takes 24h to 7d).
        line_format: ``openai`` lines carry method and url; ``mistral`` lines are ``{custom_id, body}`` only.
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
    line_format: Literal["openai", "mistral"] = "openai"
    price_provider: str | None = None
    expected_turnaround_s: float | None = Field(default=None, gt=0)


class Settings(BaseSettings):
    """All of batcher's configuration.

    Attributes:
        database_url: SQLAlchemy async URL. SQLite (default, single worker) or PostgreSQL.
        redis_url: Redis for the arq worker; ``None`` starts a private embedded redis-server.
        pack_max_wait_s: flush a group once its oldest queued job has waited this long.
        max_attempts: how many times a job is sent to a provider before it fails for good.
    """

    model_config = SettingsConfigDict(
        env_prefix="BATCHER_", extra="ignore", populate_by_name=True, env_nested_delimiter="__"
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
    settle_chunk: int = Field(default=1000, ge=1)
    provider_concurrency: int = Field(default=4, ge=1)
    intake_chunk: int = Field(default=5000, ge=1)
    #: extra provider accounts by name (OpenAI-compatible hosts, second organisations…)
    providers: dict[str, AccountSettings] = Field(default_factory=dict)
    #: fraction off the real-time price per provider where a model has no published batch price
    batch_discounts: dict[str, Decimal] = Field(default_factory=dict)
    #: JSON file of per-model prices (negotiated rates); see ``batcher.pricing.load_overrides``
    price_overrides_file: Path | None = None

    @field_validator("providers")
    @classmethod
    def _account_names(cls, value: dict[str, AccountSettings]) -> dict[str, AccountSettings]:
        for name in value:
            if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"account name {name!r}: use letters, digits, - and _ (at most 64)")
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
