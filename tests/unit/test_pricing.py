"""Price arithmetic against hand-computed values (genai-prices 0.2.x data)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher.errors import ConfigError
from batcher.pricing import (
    PriceBook,
    TokenUsage,
    load_overrides,
    normalize_usage,
    usage_from_anthropic,
    usage_from_openai,
)

D = Decimal


def test_gpt_4o_mini_batch_and_realtime() -> None:
    usage = usage_from_openai(
        {"prompt_tokens": 2000, "completion_tokens": 300, "prompt_tokens_details": {"cached_tokens": 500}}
    )
    cost = PriceBook().cost("openai", "gpt-4o-mini", usage, mode="batch")
    # real time: 1500 x $0.15/M + 500 cached x $0.075/M + 300 x $0.60/M
    assert cost.realtime_usd == D("0.0004425")
    # batch (published batch prices): 1500 x $0.075/M + 500 x $0.075/M + 300 x $0.30/M
    assert cost.actual_usd == D("0.00024")
    assert not cost.batch_price_derived
    assert cost.price_source == "genai-prices"
    assert cost.price_version is not None and cost.price_version.startswith("genai-prices ")


def test_embeddings_batch_price_is_derived() -> None:
    usage = usage_from_openai({"prompt_tokens": 12345, "total_tokens": 12345})
    cost = PriceBook().cost("openai", "text-embedding-3-small", usage, mode="batch")
    assert cost.realtime_usd == D("0.0002469")  # 12345 x $0.02/M
    # genai-prices has no batch variant for it: half the real-time price, flagged
    assert cost.actual_usd == D("0.00012345")
    assert cost.batch_price_derived


def test_claude_haiku_with_cache_tokens() -> None:
    usage = usage_from_anthropic(
        {
            "input_tokens": 1000,
            "cache_read_input_tokens": 20000,
            "cache_creation_input_tokens": 4000,
            "output_tokens": 500,
        }
    )
    assert usage == TokenUsage(
        input_tokens=25000, cached_input_tokens=20000, cache_creation_tokens=4000, output_tokens=500
    )
    cost = PriceBook().cost("anthropic", "claude-haiku-4-5", usage, mode="batch")
    # real time: 1000 x $1/M + 20000 x $0.10/M + 4000 x $1.25/M + 500 x $5/M
    assert cost.realtime_usd == D("0.0105")
    # batch: every kind at half
    assert cost.actual_usd == D("0.00525")
    assert not cost.batch_price_derived


def test_claude_sonnet_4_5_one_hour_cache_writes_at_the_one_hour_rate() -> None:
    hour_only = usage_from_anthropic(
        {
            "input_tokens": 0,
            "cache_creation_input_tokens": 100_000,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 100_000},
            "output_tokens": 0,
        }
    )
    assert hour_only == TokenUsage(
        input_tokens=100_000, cache_creation_tokens=100_000, cache_creation_1h_tokens=100_000
    )
    book = PriceBook()
    cost = book.cost("anthropic", "claude-sonnet-4-5", hour_only, mode="batch")
    # real time: 100,000 x $6/M (1-hour writes), not $3.75/M (5-minute writes); batch: half
    assert (cost.realtime_usd, cost.actual_usd) == (D("0.6"), D("0.3"))
    assert not cost.batch_price_derived
    realtime = book.cost("anthropic", "claude-sonnet-4-5", hour_only, mode="realtime")
    assert realtime.actual_usd == realtime.realtime_usd == D("0.6")

    mixed = usage_from_anthropic(
        {
            "input_tokens": 2000,
            "cache_read_input_tokens": 10_000,
            "cache_creation_input_tokens": 140_000,
            "cache_creation": {"ephemeral_5m_input_tokens": 40_000, "ephemeral_1h_input_tokens": 100_000},
            "output_tokens": 1000,
        }
    )
    assert (mixed.input_tokens, mixed.cache_creation_tokens, mixed.cache_creation_1h_tokens) == (
        152_000,
        140_000,
        100_000,
    )
    cost = book.cost("anthropic", "claude-sonnet-4-5", mixed, mode="batch")
    # 2000 x $3 + 10,000 x $0.30 + 40,000 x $3.75 + 100,000 x $6 + 1000 x $15, per M; batch at half
    assert (cost.realtime_usd, cost.actual_usd) == (D("0.774"), D("0.387"))
    assert book.cost("anthropic", "claude-sonnet-4-5", mixed, mode="realtime").actual_usd == D("0.774")


def test_one_hour_cache_writes_on_the_integer_path() -> None:
    """claude-haiku-4-5 has flat prices: priced in picodollars, the 1-hour write price in the tuple."""
    book = PriceBook()
    plans = book._lookup("anthropic", "claude-haiku-4-5")
    assert plans is not None and plans.batch is not None
    assert plans.realtime.pico == (1_000_000, 100_000, 1_250_000, 2_000_000, 5_000_000)
    assert plans.batch.pico == (500_000, 50_000, 625_000, 1_000_000, 2_500_000)
    usage = TokenUsage(
        input_tokens=160_000, cached_input_tokens=0, cache_creation_tokens=150_000, cache_creation_1h_tokens=100_000
    )
    cost = book.cost("anthropic", "claude-haiku-4-5", usage, mode="batch")
    # 10,000 x $1 + 50,000 x $1.25 + 100,000 x $2, per M; batch at half
    assert (cost.realtime_usd, cost.actual_usd) == (D("0.2725"), D("0.13625"))


def test_anthropic_one_hour_usage_shapes() -> None:
    base = {"input_tokens": 5, "cache_creation_input_tokens": 30, "output_tokens": 1}
    assert usage_from_anthropic(base).cache_creation_1h_tokens == 0
    for junk in (None, "x", [], {"ephemeral_1h_input_tokens": None}, {"ephemeral_1h_input_tokens": "9"}):
        assert usage_from_anthropic({**base, "cache_creation": junk}).cache_creation_1h_tokens == 0
    assert (
        usage_from_anthropic({**base, "cache_creation": {"ephemeral_1h_input_tokens": -4}}).cache_creation_1h_tokens
        == 0
    )
    # never more than every write
    over = usage_from_anthropic({**base, "cache_creation": {"ephemeral_1h_input_tokens": 99}})
    assert (over.cache_creation_tokens, over.cache_creation_1h_tokens) == (30, 30)
    part = usage_from_anthropic(
        {**base, "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 20}}
    )
    assert part == TokenUsage(35, 0, 30, 1, 0, 20)
    # positional construction keeps its meaning: the 1-hour part is the last field
    assert TokenUsage(35, 0, 30, 1) == TokenUsage(35, 0, 30, 1, 0, 0)


def test_a_linear_table_mispricing_one_hour_writes_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    from genai_prices.types import ModelPrice

    from batcher import pricing

    price = ModelPrice(input_mtok=D(3), cache_read_mtok=D("0.3"), cache_write_mtok=D("3.75"), cache_write_1h_mtok=D(6))
    assert pricing._plan(price).linear is not None

    linear_cost = pricing._linear_cost

    def five_minute_rate(table: Mapping[str, D], u: TokenUsage) -> D:
        """The old bug: every cache write at the 5-minute rate."""
        return linear_cost(table, replace(u, cache_creation_1h_tokens=0))

    monkeypatch.setattr(pricing, "_linear_cost", five_minute_rate)
    # the 1-hour probe disagrees with genai-prices: no linear plan, genai-prices prices each request
    plan = pricing._plan(price)
    assert plan.linear is None and plan.pico is None


def test_discount_setting_drives_derived_prices() -> None:
    usage = TokenUsage(input_tokens=1_000_000)
    cost = PriceBook(discounts={"openai": D("0.25")}).cost("openai", "text-embedding-3-small", usage, mode="batch")
    assert (cost.realtime_usd, cost.actual_usd) == (D("0.02"), D("0.015"))


def test_unpriced_model_is_unknown_not_zero() -> None:
    cost = PriceBook().cost("openai", "ft:my-own-model-xyz", TokenUsage(10, 0, 0, 10), mode="batch")
    assert cost.actual_usd is None and cost.realtime_usd is None
    assert not cost.priced


def test_realtime_mode_pays_realtime_on_both_sides() -> None:
    cost = PriceBook().cost("openai", "gpt-4o-mini", TokenUsage(1_000_000, 0, 0, 1_000_000), mode="realtime")
    assert cost.actual_usd == cost.realtime_usd == D("0.75")


def test_override_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"openai/gpt-4o-mini": {"realtime": {"input_mtok": "0.10", "output_mtok": "0.40"}}}))
    book = PriceBook(overrides=load_overrides(path))
    cost = book.cost("openai", "gpt-4o-mini", TokenUsage(1_000_000, 0, 0, 1_000_000), mode="batch")
    assert (cost.realtime_usd, cost.actual_usd) == (D("0.5"), D("0.25"))
    assert cost.price_source == "override" and cost.batch_price_derived


def test_override_file_with_one_hour_cache_writes(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    rates = {"input_mtok": "2", "cache_read_mtok": "0.2", "cache_write_mtok": "2.5", "cache_write_1h_mtok": "4"}
    path.write_text(json.dumps({"anthropic/claude-negotiated": {"realtime": {**rates, "output_mtok": "10"}}}))
    book = PriceBook(overrides=load_overrides(path))
    usage = TokenUsage(
        input_tokens=1_000_000,
        cached_input_tokens=100_000,
        cache_creation_tokens=500_000,
        output_tokens=10_000,
        cache_creation_1h_tokens=200_000,
    )
    cost = book.cost("anthropic", "claude-negotiated", usage, mode="batch")
    # 400,000 x $2 + 100,000 x $0.20 + 300,000 x $2.50 + 200,000 x $4 + 10,000 x $10, per M
    assert cost.realtime_usd == D("2.47")
    assert cost.actual_usd == D("1.235") and cost.batch_price_derived and cost.price_source == "override"
    plan = book._lookup("anthropic", "claude-negotiated")
    assert plan is not None and plan.realtime.pico == (2_000_000, 200_000, 2_500_000, 4_000_000, 10_000_000)


def test_override_without_one_hour_price_falls_back_like_genai_prices() -> None:
    """No 1-hour price: 1-hour writes at the cache-write price; no cache-write price either: at input."""
    from genai_prices.types import ModelPrice

    usage = TokenUsage(
        input_tokens=1_000_000, cache_creation_tokens=300_000, output_tokens=0, cache_creation_1h_tokens=100_000
    )
    overrides = {
        "anthropic/writes": {"realtime": {"input_mtok": "1", "cache_write_mtok": "2"}},
        "anthropic/plain": {"realtime": {"input_mtok": "1"}},
    }
    book = PriceBook(overrides=overrides)
    assert book.cost("anthropic", "writes", usage, mode="realtime").actual_usd == D("1.3")
    assert book.cost("anthropic", "plain", usage, mode="realtime").actual_usd == D("1")
    for name, entry in overrides.items():
        theirs = ModelPrice(**{k: D(v) for k, v in entry["realtime"].items()}).calc_price(usage.to_genai())
        assert book.cost("anthropic", name.split("/")[1], usage, mode="realtime").actual_usd == theirs["total_price"]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("[1]", "expected an object"),
        ('{"gpt-4o": {"realtime": {}}}', "provider/model"),
        ('{"openai/x": {"realtime": {"input_usd": 1}}}', "input_usd is not one of"),
        ('{"openai/x": {"realtime": {"input_mtok": "abc"}}}', "not a number"),
        ('{"anthropic/x": {"realtime": {"input_mtok": 1, "cache_write_1h_mtok": 2}}}', "needs cache_write_mtok"),
        ('{"anthropic/x": {"realtime": {"input_mtok": 1}, "batch": [1]}}', "must be an object"),
        ("{not json", "price overrides"),
    ],
)
def test_override_file_errors(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "prices.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=words):
        load_overrides(path)


def test_usage_shapes() -> None:
    responses = usage_from_openai(
        {
            "input_tokens": 100,
            "input_tokens_details": {"cached_tokens": 40},
            "output_tokens": 50,
            "output_tokens_details": {"reasoning_tokens": 30},
        }
    )
    assert responses == TokenUsage(100, 40, 0, 50, 30)
    chat = usage_from_openai(
        {"prompt_tokens": 7, "completion_tokens": 9, "completion_tokens_details": {"reasoning_tokens": 4}}
    )
    assert chat == TokenUsage(7, 0, 0, 9, 4)
    assert usage_from_openai(None) == TokenUsage()
    assert normalize_usage("anthropic", {"input_tokens": 3, "output_tokens": 4}) == TokenUsage(3, 0, 0, 4)
    # junk values never become negative or non-integer token counts
    assert usage_from_openai({"prompt_tokens": -5, "completion_tokens": "9"}) == TokenUsage()


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(
        [
            ("openai", "gpt-4o-mini"),
            ("openai", "gpt-4o"),
            ("anthropic", "claude-haiku-4-5"),
            ("anthropic", "claude-opus-4-5"),
            ("anthropic", "claude-sonnet-4-5"),  # tiered: genai-prices prices each request
            ("openai", "gpt-4.1"),
        ]
    ),
    uncached=st.integers(0, 300_000),
    cached=st.integers(0, 100_000),
    written=st.integers(0, 50_000),
    written_1h=st.integers(0, 50_000),
    output=st.integers(0, 100_000),
    mode=st.sampled_from(["batch", "realtime"]),
)
def test_fast_path_equals_genai_prices(
    model: tuple[str, str], uncached: int, cached: int, written: int, written_1h: int, output: int, mode: str
) -> None:
    from genai_prices import calc_price

    from batcher.pricing import money

    provider, name = model
    # ``written`` 5-minute and ``written_1h`` 1-hour cache writes
    writes = written + written_1h
    usage = TokenUsage(uncached + cached + writes, cached, writes, output, cache_creation_1h_tokens=written_1h)
    ours = PriceBook().cost(provider, name, usage, mode=mode)
    context = {"processing": "batch"} if mode == "batch" else None
    theirs = calc_price(usage.to_genai(), name, provider_id=provider, price_context=context).total_price
    assert ours.actual_usd == money(theirs)
    # the same Decimal, exponent included: what is stored and printed does not depend on the path taken
    assert ours.actual_usd is not None and ours.actual_usd.as_tuple() == money(theirs).as_tuple()


def test_whole_picodollar_prices_are_priced_in_integers_and_others_in_decimal() -> None:
    book = PriceBook(
        overrides={
            "openai/whole": {"realtime": {"input_mtok": "0.15", "output_mtok": "0.6"}},
            # 0.1234567 USD/Mtok is 123,456.7 picodollars a token: not a whole number of them
            "openai/fraction": {"realtime": {"input_mtok": "0.1234567", "output_mtok": "0.6"}},
        }
    )
    usage = TokenUsage(input_tokens=3, output_tokens=1)
    whole = book._lookup("openai", "whole")
    fraction = book._lookup("openai", "fraction")
    assert whole is not None and whole.realtime.pico == (150_000, 150_000, 150_000, 150_000, 600_000)
    assert fraction is not None and fraction.realtime.pico is None
    assert book.cost("openai", "whole", usage, mode="realtime").actual_usd == D("0.000001050000")
    # 3 * 0.1234567e-6 + 0.6e-6 = 0.0000009703701, rounded half-even to the picodollar
    assert book.cost("openai", "fraction", usage, mode="realtime").actual_usd == D("0.000000970370")
