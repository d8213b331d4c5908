"""Prices: what a request's usage costs at the batch price and at the real-time price.

Prices come from genai-prices' bundled data (no network at run time). A model with a batch price variant
(``processing: batch``) is priced from it; otherwise — genai-prices would quietly answer the standard
price — the batch price is derived from the real-time one with the provider's discount from settings, and
the entry says so (``batch_price_derived``). A settings file may override a model's prices (negotiated
rates). A model with no price at all is *unpriced*: its cost is ``None`` (unknown), never zero.

Amounts are Decimal, quantized to the picodollar (1e-12 USD) — far below any provider's billing
resolution — so that sums are exact in both databases.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import genai_prices
from genai_prices import Usage, data_snapshot
from genai_prices.types import ModelPrice

from batcher.errors import ConfigError

logger = logging.getLogger(__name__)

PICO = Decimal("1e-12")
MILLION = Decimal(1_000_000)
PRICE_SOURCE = "genai-prices"
PRICE_VERSION = f"genai-prices {genai_prices.__version__}"
OVERRIDE_SOURCE = "override"

#: the batch discount per provider when a model has no batch price of its own (fraction off real-time)
DEFAULT_DISCOUNTS: dict[str, Decimal] = {
    "openai": Decimal("0.5"),
    "azure": Decimal("0.5"),
    "anthropic": Decimal("0.5"),
    "google": Decimal("0.5"),
    "gemini": Decimal("0.5"),
    "aws": Decimal("0.5"),
    "bedrock": Decimal("0.5"),
    "mistral": Decimal("0.5"),
    "together": Decimal("0.5"),
    "groq": Decimal("0.25"),
}

#: the per-token price keys batcher's usage carries; other units (searches, audio…) never occur in its usage,
#: and a plan is only used once probes prove it equals genai-prices' own answer. ``cache_write_1h_mtok`` prices
#: the 1-hour part of the cache writes; ``cache_write_mtok`` the rest (and the 1-hour part where a model has no
#: 1-hour price, as genai-prices does)
_LINEAR_KEYS = frozenset({"input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok", "cache_write_1h_mtok"})


def money(value: Decimal) -> Decimal:
    """Quantize an amount to the picodollar."""
    return value.quantize(PICO, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True)
class TokenUsage:
    """Usage normalized across providers.

    Attributes:
        input_tokens: every input token, cache reads and cache writes included.
        cached_input_tokens: input tokens read from the prompt cache.
        cache_creation_tokens: input tokens written to the prompt cache (every lifetime).
        output_tokens: every output token, reasoning included.
        reasoning_tokens: the reasoning part of ``output_tokens`` (informational; billed as output).
        cache_creation_1h_tokens: the part of ``cache_creation_tokens`` written with a 1-hour lifetime
            (Anthropic), priced at the model's 1-hour cache-write price; never more than ``cache_creation_tokens``.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_creation_1h_tokens: int = 0

    def to_genai(self) -> Usage:
        hour = {"cache_write_1h_tokens": self.cache_creation_1h_tokens} if self.cache_creation_1h_tokens else {}
        return Usage(
            input_tokens=self.input_tokens,
            cache_read_tokens=self.cached_input_tokens,
            cache_write_tokens=self.cache_creation_tokens,
            output_tokens=self.output_tokens,
            **hour,
        )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from_openai(usage: Mapping[str, Any] | None) -> TokenUsage:
    """Chat/completions (``prompt_tokens``…), responses (``input_tokens``…) and embeddings usage.

    OpenAI's prompt/input count already includes cached tokens; completion/output includes reasoning.
    """
    if not usage:
        return TokenUsage()
    if "prompt_tokens" in usage:
        details = usage.get("prompt_tokens_details") or {}
        out_details = usage.get("completion_tokens_details") or {}
        return TokenUsage(
            input_tokens=_int(usage.get("prompt_tokens")),
            cached_input_tokens=_int(details.get("cached_tokens")),
            output_tokens=_int(usage.get("completion_tokens")),
            reasoning_tokens=_int(out_details.get("reasoning_tokens")),
        )
    details = usage.get("input_tokens_details") or {}
    out_details = usage.get("output_tokens_details") or {}
    return TokenUsage(
        input_tokens=_int(usage.get("input_tokens")),
        cached_input_tokens=_int(details.get("cached_tokens")),
        output_tokens=_int(usage.get("output_tokens")),
        reasoning_tokens=_int(out_details.get("reasoning_tokens")),
    )


def usage_from_anthropic(usage: Mapping[str, Any] | None) -> TokenUsage:
    """Anthropic usage: ``input_tokens`` excludes cache reads and writes, which come separately.

    ``cache_creation_input_tokens`` counts every cache write; ``cache_creation.ephemeral_1h_input_tokens`` the
    1-hour part of them (clamped to the writes: it can never be more).
    """
    if not usage:
        return TokenUsage()
    read = _int(usage.get("cache_read_input_tokens"))
    write = _int(usage.get("cache_creation_input_tokens"))
    creation = usage.get("cache_creation")
    hour = _int(creation.get("ephemeral_1h_input_tokens")) if isinstance(creation, Mapping) else 0
    return TokenUsage(
        input_tokens=_int(usage.get("input_tokens")) + read + write,
        cached_input_tokens=read,
        cache_creation_tokens=write,
        output_tokens=_int(usage.get("output_tokens")),
        cache_creation_1h_tokens=min(hour, write),
    )


def normalize_usage(provider: str, usage: Mapping[str, Any] | None) -> TokenUsage:
    """Usage as a provider reported it → :class:`TokenUsage`."""
    if provider == "anthropic":
        return usage_from_anthropic(usage)
    return usage_from_openai(usage)


@dataclass(frozen=True)
class Cost:
    """What one request cost.

    Attributes:
        actual_usd: what was paid (batch price, or real-time price for a real-time call); ``None``: unpriced.
        realtime_usd: what the same usage costs in real time; ``None``: unpriced.
        batch_price_derived: the batch price came from the provider's discount, not a published batch price.
        price_source: ``genai-prices`` or ``override``; ``None`` when unpriced.
        price_version: the price data's version.
    """

    actual_usd: Decimal | None
    realtime_usd: Decimal | None
    batch_price_derived: bool = False
    price_source: str | None = None
    price_version: str | None = None

    @property
    def priced(self) -> bool:
        return self.actual_usd is not None


ZERO_COST = Cost(Decimal(0), Decimal(0), price_source=PRICE_SOURCE, price_version=PRICE_VERSION)
#: a request that was billed but whose usage the provider did not report: unknown, never zero
UNKNOWN_COST = Cost(None, None)


@dataclass(frozen=True)
class _Plan:
    """How to price one model in one mode: a linear table, or genai-prices itself (tiers, odd units)."""

    linear: dict[str, Decimal] | None
    model_price: ModelPrice | None
    #: the linear table in whole picodollars per token (input, cache read, cache write, 1-hour cache write,
    #: output), when every price is a whole number of them (all published ones are): integer arithmetic, exact,
    #: several times faster
    pico: tuple[int, int, int, int, int] | None = None


def _linear_table(price: ModelPrice) -> dict[str, Decimal] | None:
    values = {k: getattr(price, k, None) for k in _LINEAR_KEYS}
    if any(v is not None and not isinstance(v, Decimal) for v in values.values()):
        return None  # tiered (long-context) prices: genai-prices prices each request
    return {k: v for k, v in values.items() if isinstance(v, Decimal)}


def _mtok_prices(table: Mapping[str, Decimal]) -> tuple[Decimal, Decimal, Decimal, Decimal, Decimal]:
    """(input, cache read, cache write, 1-hour cache write, output) per Mtok, with genai-prices' fallbacks: a
    missing cache price is the input price, a missing 1-hour write price the (5-minute) cache write price."""
    input_mtok = table.get("input_mtok", Decimal(0))
    write_mtok = table.get("cache_write_mtok", input_mtok)
    return (
        input_mtok,
        table.get("cache_read_mtok", input_mtok),
        write_mtok,
        table.get("cache_write_1h_mtok", write_mtok),
        table.get("output_mtok", Decimal(0)),
    )


def _linear_cost(table: Mapping[str, Decimal], u: TokenUsage) -> Decimal:
    input_mtok, read_mtok, write_mtok, hour_mtok, output_mtok = _mtok_prices(table)
    read, write, hour = u.cached_input_tokens, u.cache_creation_tokens, u.cache_creation_1h_tokens
    total = (
        (u.input_tokens - read - write) * input_mtok
        + read * read_mtok
        + (write - hour) * write_mtok
        + hour * hour_mtok
        + u.output_tokens * output_mtok
    )
    return total / MILLION


_PROBES = (
    TokenUsage(1000, 0, 0, 100),
    TokenUsage(123_457, 45_678, 0, 9_876),
    TokenUsage(50_000, 20_000, 10_000, 3),
    # 1-hour cache writes next to 5-minute ones: a table pricing them at the 5-minute rate is caught
    TokenUsage(80_001, 10_000, 30_000, 11, cache_creation_1h_tokens=12_345),
)


def _plan(price: ModelPrice) -> _Plan:
    """Price linearly where that provably equals genai-prices' answer, else defer to it for each request."""
    table = _linear_table(price)
    if table is not None:
        for probe in _PROBES:
            if _linear_cost(table, probe) != price.calc_price(probe.to_genai())["total_price"]:
                table = None
                break
    return _Plan(table, price, None if table is None else _pico_prices(table))


def _pico_prices(table: Mapping[str, Decimal]) -> tuple[int, int, int, int, int] | None:
    """A linear table's prices per token in picodollars (1 USD/Mtok = 10^6 pico-USD/token), if all are whole."""
    pico = [price.scaleb(6) for price in _mtok_prices(table)]
    if any(price != price.to_integral_value() for price in pico):
        return None
    input_pico, read_pico, write_pico, hour_pico, output_pico = (int(price) for price in pico)
    return input_pico, read_pico, write_pico, hour_pico, output_pico


def _cost(plan: _Plan, usage: TokenUsage) -> Decimal:
    if plan.pico is not None:
        input_pico, read_pico, write_pico, hour_pico, output_pico = plan.pico
        read, write, hour = usage.cached_input_tokens, usage.cache_creation_tokens, usage.cache_creation_1h_tokens
        total = (
            (usage.input_tokens - read - write) * input_pico
            + read * read_pico
            + (write - hour) * write_pico
            + hour * hour_pico
            + usage.output_tokens * output_pico
        )
        return Decimal(total).scaleb(-12)
    if plan.linear is not None:
        return money(_linear_cost(plan.linear, usage))
    assert plan.model_price is not None
    return money(plan.model_price.calc_price(usage.to_genai())["total_price"])


@dataclass(frozen=True)
class _ModelPrices:
    realtime: _Plan
    batch: _Plan | None  # None: no published batch price, derive with the discount
    source: str


class PriceBook:
    """Looks up and caches prices per (provider, model).

    Args:
        discounts: fraction off the real-time price for a batch, per provider (``0.5`` = half price).
        overrides: per-model prices, ``{"provider/model": {"realtime": {...mtok prices}, "batch": {...}?}}``.
        at: the time whose prices apply (default: now).
    """

    def __init__(
        self,
        discounts: Mapping[str, Decimal] | None = None,
        overrides: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
        *,
        at: datetime | None = None,
    ) -> None:
        self.discounts = {**DEFAULT_DISCOUNTS, **(discounts or {})}
        self.overrides = {k.lower(): v for k, v in (overrides or {}).items()}
        self.at = at or datetime.now(UTC)
        self._cache: dict[tuple[str, str], _ModelPrices | None] = {}
        self._windows: dict[tuple[str, str], int | None] = {}

    def _lookup(self, provider: str, model: str) -> _ModelPrices | None:
        key = (provider, model)
        if key in self._cache:
            return self._cache[key]
        found = self._override(provider, model) or self._genai(provider, model)
        if found is None:
            logger.warning("no price for %s/%s: its costs are recorded as unknown", provider, model)
        self._cache[key] = found
        return found

    def _override(self, provider: str, model: str) -> _ModelPrices | None:
        entry = self.overrides.get(f"{provider}/{model}".lower())
        if entry is None:
            return None
        realtime = ModelPrice(**{k: Decimal(str(v)) for k, v in entry["realtime"].items()})
        batch = entry.get("batch")
        batch_plan = _plan(ModelPrice(**{k: Decimal(str(v)) for k, v in batch.items()})) if batch else None
        return _ModelPrices(_plan(realtime), batch_plan, OVERRIDE_SOURCE)

    def _genai(self, provider: str, model: str) -> _ModelPrices | None:
        snapshot = data_snapshot.get_snapshot()
        try:
            gp, info = snapshot.find_provider_model(model, None, provider, None)
        except LookupError:
            return None
        realtime = info.get_prices(self.at)
        has_batch = any(v.when == {"processing": "batch"} for v in info.price_variants or ())
        batch = _plan(info.get_prices(self.at, {"processing": "batch"})) if has_batch else None
        _ = gp
        return _ModelPrices(_plan(realtime), batch, PRICE_SOURCE)

    def output_cap(self, provider: str, model: str) -> int | None:
        """The most output tokens the operator or the price source says ``model`` can produce, or ``None``.

        An override entry's ``max_output_tokens`` comes first; else the model's context window in genai-prices
        (input and output share it, so no reply is longer).
        """
        key = (provider, model)
        if key not in self._windows:
            entry: Mapping[str, Any] = self.overrides.get(f"{provider}/{model}".lower()) or {}
            cap: Any = entry.get("max_output_tokens")
            if cap is None:
                try:
                    _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)
                except LookupError:
                    info = None
                cap = None if info is None else info.context_window
            self._windows[key] = None if cap is None else int(cap)
        return self._windows[key]

    def cost(self, provider: str, model: str, usage: TokenUsage, *, mode: str) -> Cost:
        """What ``usage`` of ``model`` cost.

        Args:
            provider: the price provider (``openai``, ``anthropic``, ``groq``…).
            model: the model as sent in the request.
            usage: normalized usage.
            mode: ``batch`` (paid the batch price) or ``realtime`` (paid the real-time price).
        """
        prices = self._lookup(provider, model)
        if prices is None:
            return Cost(None, None)
        version = PRICE_VERSION if prices.source == PRICE_SOURCE else OVERRIDE_SOURCE
        realtime = _cost(prices.realtime, usage)
        if mode == "realtime":
            return Cost(realtime, realtime, False, prices.source, version)
        if prices.batch is not None:
            return Cost(_cost(prices.batch, usage), realtime, False, prices.source, version)
        discount = self.discounts.get(provider, Decimal("0.5"))
        return Cost(money(realtime * (1 - discount)), realtime, True, prices.source, version)


def load_overrides(path: Path | None) -> dict[str, dict[str, dict[str, Any]]]:
    """Read a price overrides file (JSON): ``{"openai/gpt-4o-mini": {"realtime": {"input_mtok": "0.1", …}}}``.

    Keys (USD per million tokens): ``input_mtok``, ``output_mtok``, ``cache_read_mtok``, ``cache_write_mtok``
    and ``cache_write_1h_mtok`` (1-hour cache writes; needs ``cache_write_mtok`` beside it, as in genai-prices).
    An entry may also give ``max_output_tokens``: the model's longest reply, which bounds estimates of requests
    that set no output limit.

    Raises:
        ConfigError: the file cannot be read or has the wrong shape (says which entry).
    """
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"price overrides {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"price overrides {path}: expected an object of 'provider/model' entries")
    for name, entry in data.items():
        if "/" not in name or not isinstance(entry, dict) or not isinstance(entry.get("realtime"), dict):
            raise ConfigError(f"price overrides {path}: entry {name!r} needs 'provider/model' and a 'realtime' object")
        cap = entry.get("max_output_tokens")
        if cap is not None and (type(cap) is not int or cap < 1):
            raise ConfigError(f"price overrides {path}: {name}.max_output_tokens must be a whole number >= 1")
        for mode in ("realtime", "batch"):
            prices = entry.get(mode) or {}
            if not isinstance(prices, dict):
                raise ConfigError(f"price overrides {path}: {name}.{mode} must be an object of prices")
            if "cache_write_1h_mtok" in prices and "cache_write_mtok" not in prices:
                raise ConfigError(
                    f"price overrides {path}: {name}.{mode}.cache_write_1h_mtok needs cache_write_mtok beside it"
                )
            for key, value in prices.items():
                if key not in _LINEAR_KEYS:
                    raise ConfigError(
                        f"price overrides {path}: {name}.{mode}.{key} is not one of {sorted(_LINEAR_KEYS)}"
                    )
                try:
                    Decimal(str(value))
                except ArithmeticError as exc:
                    raise ConfigError(f"price overrides {path}: {name}.{mode}.{key} is not a number") from exc
    return data
