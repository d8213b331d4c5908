"""Build the configured provider accounts from settings."""

from __future__ import annotations

from batcher.config import Settings
from batcher.providers.base import ProviderAdapter
from batcher.providers.openai import OpenAIAdapter


def build_adapters(settings: Settings) -> dict[str, ProviderAdapter]:
    """One adapter per configured account, by account name.

    The ``openai`` account is always there: the SDK reads its key and base URL from the settings (the
    SDK's own ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL`` variables).
    """
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    adapters: dict[str, ProviderAdapter] = {
        "openai": OpenAIAdapter("openai", api_key=key or "missing-key", base_url=settings.openai_base_url),
    }
    return adapters


async def close_adapters(adapters: dict[str, ProviderAdapter]) -> None:
    for adapter in adapters.values():
        await adapter.aclose()
