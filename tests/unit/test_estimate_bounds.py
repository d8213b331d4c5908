"""The cost estimate stays an upper bound: long texts counted in pieces, output at the model's longest reply."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from batcher.domain import Provider
from batcher.estimate import (
    FALLBACK_MAX_OUTPUT_TOKENS,
    _encoding,
    count_input_tokens,
    count_text_tokens,
    max_output_tokens,
    model_max_output,
)
from batcher.pricing import PriceBook
from batcher.tenants import OverBudget


def _texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = [
        "hello",
        "world",
        "tokenizer",
        " ",
        "  ",
        "\n",
        "\n\n",
        "12345",
        "ünïcödé",
        "日本語のテキスト",
        "🙂",
        "—",
        ".",
        ",",
    ]
    texts = []
    for _ in range(40):
        texts.append("".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(50, 400))))
    texts.append("a" * 3_000)  # no space to cut before
    texts.append("日本語" * 800)
    texts.append(" " * 500 + "x" + "  " * 300)
    return texts


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4"])
def test_counting_in_pieces_never_undercounts(model: str) -> None:
    enc = _encoding(model)
    for text in _texts(7):
        exact = len(enc.encode(text))
        for piece_chars in (37, 200, 1_000):
            assert count_text_tokens(enc, text, piece_chars) >= exact, (model, piece_chars, text[:60])
        assert count_text_tokens(enc, text) == exact  # short texts are counted exactly


def test_a_million_characters_and_five_megabytes_are_counted() -> None:
    enc = _encoding("gpt-4o-mini")
    million = "word " * 200_000  # exactly 1,000,000 characters: bpe-openai refuses it whole
    with pytest.raises(ValueError):
        enc.encode(million)
    counted = count_text_tokens(enc, million)
    assert counted >= 200_000
    five_mb = "x" * 5_000_000  # no spaces: cut anywhere; also over o200k's 200,000-token chunk limit
    assert count_text_tokens(enc, five_mb) >= len(enc.encode("x" * 90_000)) * 55
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": million}]}
    assert count_input_tokens(Provider.OPENAI, "/v1/chat/completions", body) >= counted


def test_more_tokens_than_the_chunk_limit_are_counted() -> None:
    enc = _encoding("gpt-4o-mini")  # o200k_base refuses more than 200,000 tokens at once
    text = "a b " * 225_000  # 900,000 characters (under the length limit), 450,000 tokens
    with pytest.raises(ValueError):
        enc.encode(text)
    assert count_text_tokens(enc, text) >= 450_000


def test_no_output_bound_counts_the_models_longest_reply() -> None:
    prices = PriceBook()
    assert model_max_output(prices, "openai", "gpt-4o-mini") == 16_384
    assert model_max_output(prices, "openai", "gpt-4o-mini-2024-07-18") == 16_384
    assert model_max_output(prices, "openai", "gpt-4.1") == 32_768
    assert model_max_output(prices, "openai", "o3-mini") == 100_000
    # not in batcher's table: the context window genai-prices knows bounds any reply
    window = prices.output_cap("anthropic", "claude-haiku-4-5")
    assert window is not None and window >= 64_000
    assert model_max_output(prices, "anthropic", "claude-haiku-4-5") == window
    # a variant is not assumed to share its family's limit
    assert model_max_output(prices, "openai", "gpt-4o-long-output") != 16_384
    assert model_max_output(prices, "openai", "no-such-model") == FALLBACK_MAX_OUTPUT_TOKENS
    # an override names the model's longest reply
    custom = PriceBook(overrides={"openai/in-house": {"realtime": {"input_mtok": "1"}, "max_output_tokens": 2_048}})
    assert model_max_output(custom, "openai", "in-house") == 2_048
    assert max_output_tokens("/v1/chat/completions", {"n": 2}, 16_384) == 32_768


def test_budget_messages_keep_every_digit() -> None:
    exc = OverBudget(
        tenant="t",
        budget_usd=Decimal("0.01"),
        spent_usd=Decimal("0.0132"),
        queued_usd=Decimal("0.0000001234"),
        request_usd=Decimal("1250"),
    )
    message = str(exc)
    assert "budget of $0.01:" in message
    assert "spent $0.0132 this month" in message
    assert "estimated $0.0000001234 for its unsettled jobs" in message
    assert "estimated $1,250.00 for this request" in message
    assert "= $1,250.0132001234" in message
