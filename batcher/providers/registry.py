"""Build the configured provider accounts from settings.

Two accounts always exist: ``openai`` (``OPENAI_API_KEY`` / ``OPENAI_BASE_URL``) and ``anthropic``
(``ANTHROPIC_API_KEY`` / ``ANTHROPIC_BASE_URL``). More come from ``BATCHER_PROVIDERS__<name>__…``: any
host with OpenAI's ``/files`` + ``/batches`` API (Azure OpenAI's v1 API, Groq, Together) or a second key of either
provider. (Mistral's batch API, ``/v1/batch/jobs``, is a different one, not supported yet.)
"""

from __future__ import annotations

import os
from dataclasses import replace
from decimal import Decimal

from genai_prices import data_snapshot

from batcher.config import AccountSettings, Settings
from batcher.domain import Provider
from batcher.errors import ConfigError
from batcher.providers.base import Limits, ProviderAdapter
from batcher.providers.limits import DEFAULT_LIMITS


def accounts(settings: Settings) -> dict[str, AccountSettings]:
    """Every account by name, the two defaults included (a configured one of the same name wins)."""
    found = {
        "openai": AccountSettings(
            kind=Provider.OPENAI, base_url=settings.openai_base_url, api_key=settings.openai_api_key
        ),
        "anthropic": AccountSettings(
            kind=Provider.ANTHROPIC, base_url=settings.anthropic_base_url, api_key=settings.anthropic_api_key
        ),
    }
    found.update(settings.providers)
    return found


def account_settings(settings: Settings, account: str) -> AccountSettings:
    """One account's settings.

    Raises:
        ConfigError: no such account (the message lists the configured ones).
    """
    found = accounts(settings)
    if account not in found:
        raise ConfigError(f"no provider account {account!r}; configured: {', '.join(sorted(found))}")
    return found[account]


def account_limits(account: AccountSettings) -> Limits:
    """The provider's published limits, narrowed by the account's own settings."""
    limits = DEFAULT_LIMITS[account.kind]
    if account.max_requests is not None:
        limits = replace(limits, max_requests=account.max_requests)
    if account.max_bytes is not None:
        limits = replace(limits, max_bytes=account.max_bytes, max_line_bytes=account.max_bytes)
    return limits


def price_provider(name: str, account: AccountSettings) -> str:
    """Whose price list an account's usage is priced from."""
    if account.price_provider:
        return account.price_provider
    known = {p.id for p in data_snapshot.get_snapshot().providers}
    return name if name in known else account.kind.value


def discounts(settings: Settings) -> dict[str, Decimal]:
    """Batch discounts by price provider: settings first, then each account's own."""
    out = dict(settings.batch_discounts)
    for name, account in accounts(settings).items():
        if account.discount is not None:
            out[price_provider(name, account)] = account.discount
    return out


def build_adapter(name: str, account: AccountSettings) -> ProviderAdapter:
    # the SDKs take a second to import: only commands that talk to providers pay for it
    from batcher.providers.anthropic import AnthropicAdapter
    from batcher.providers.openai import OpenAIAdapter

    key = account.api_key.get_secret_value() if account.api_key else None
    if account.kind is Provider.ANTHROPIC:
        return AnthropicAdapter(name, api_key=key, base_url=account.base_url, limits=account_limits(account))
    return OpenAIAdapter(
        name,
        api_key=key,
        base_url=account.base_url,
        limits=account_limits(account),
        completion_window=account.completion_window,
        line_format=account.line_format,
    )


def build_adapters(settings: Settings) -> dict[str, ProviderAdapter]:
    """One adapter per account, by account name. Clients are created lazily, on first use."""
    return {name: build_adapter(name, account) for name, account in accounts(settings).items()}


#: where each SDK looks for a key when none is configured
KEY_VARIABLES = {Provider.OPENAI: "OPENAI_API_KEY", Provider.ANTHROPIC: "ANTHROPIC_API_KEY"}


def has_api_key(account: AccountSettings) -> bool:
    """Whether the account has a key: its own, or the one its SDK reads from the environment."""
    if account.api_key is not None:
        return bool(account.api_key.get_secret_value())
    return bool(os.environ.get(KEY_VARIABLES[account.kind]))


def keyless_accounts(settings: Settings) -> dict[str, str]:
    """The accounts without an API key, each with where its key would come from."""
    return {
        name: KEY_VARIABLES[account.kind] if name in ("openai", "anthropic") else f"BATCHER_PROVIDERS__{name}__API_KEY"
        for name, account in accounts(settings).items()
        if not has_api_key(account)
    }


async def close_adapters(adapters: dict[str, ProviderAdapter]) -> None:
    for adapter in adapters.values():
        await adapter.aclose()
