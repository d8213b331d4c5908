"""Price arithmetic against hand-computed values (genai-prices 0.2.x data)."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("[1]", "expected an object"),
        ('{"gpt-4o": {"realtime": {}}}', "provider/model"),
        ('{"openai/x": {"realtime": {"input_usd": 1}}}', "input_usd is not one of"),
        ('{"openai/x": {"realtime": {"input_mtok": "abc"}}}', "not a number"),
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


@settings(max_examples=200, deadline=None)
@given(
    model=st.sampled_from(
        [("openai", "gpt-4o-mini"), ("openai", "gpt-4o"), ("anthropic", "claude-haiku-4-5"), ("openai", "gpt-4.1")]
    ),
    uncached=st.integers(0, 300_000),
    cached=st.integers(0, 100_000),
    written=st.integers(0, 50_000),
    output=st.integers(0, 100_000),
    mode=st.sampled_from(["batch", "realtime"]),
)
def test_fast_path_equals_genai_prices(
    model: tuple[str, str], uncached: int, cached: int, written: int, output: int, mode: str
) -> None:
    from genai_prices import calc_price

    from batcher.pricing import money

    provider, name = model
    usage = TokenUsage(uncached + cached + written, cached, written, output)
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
    assert whole is not None and whole.realtime.pico == (150_000, 150_000, 150_000, 600_000)
    assert fraction is not None and fraction.realtime.pico is None
    assert book.cost("openai", "whole", usage, mode="realtime").actual_usd == D("0.000001050000")
    # 3 * 0.1234567e-6 + 0.6e-6 = 0.0000009703701, rounded half-even to the picodollar
    assert book.cost("openai", "fraction", usage, mode="realtime").actual_usd == D("0.000000970370")
