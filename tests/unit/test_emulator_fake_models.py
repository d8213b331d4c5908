"""Deterministic fake model responses of the emulator."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest

from batcher.emulator.fake_models import (
    InvalidBody,
    check_body,
    count_embedding_inputs,
    estimate_prompt_tokens,
    fake_response,
)

CHAT = "/v1/chat/completions"


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 41}], **extra}


@pytest.mark.parametrize(
    ("endpoint", "body", "tokens"),
    [
        (CHAT, _chat(), 11),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]}]},
            86,
        ),
        ("/v1/completions", {"prompt": "abcdefgh"}, 2),
        ("/v1/completions", {"prompt": [1, 2, 3]}, 3),
        ("/v1/responses", {"input": "abcd", "instructions": "abcdefgh"}, 3),
        ("/v1/embeddings", {"input": ["abcd", "abcdefgh"]}, 3),
        ("/v1/embeddings", {"input": [[1, 2], [3, 4, 5]]}, 5),
    ],
)
def test_prompt_tokens_are_a_quarter_of_the_characters(endpoint: str, body: dict[str, Any], tokens: int) -> None:
    assert estimate_prompt_tokens(endpoint, body) == tokens


def test_chat_is_deterministic_and_echoes_the_model() -> None:
    first, usage = fake_response(CHAT, _chat(), seed=1, request_key="b:1", created=5)
    again, _ = fake_response(CHAT, _chat(), seed=1, request_key="b:1", created=5)
    other_seed, _ = fake_response(CHAT, _chat(), seed=2, request_key="b:1", created=5)
    assert first == again
    assert first["choices"][0]["message"]["content"] != other_seed["choices"][0]["message"]["content"]
    assert first["model"] == "gpt-4o-mini" and first["created"] == 5
    assert first["usage"]["prompt_tokens"] == usage.input_tokens == 11
    assert first["usage"]["completion_tokens"] == usage.output_tokens


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("cap", [1, 3, 7])
def test_completion_tokens_respect_the_cap(param: str, cap: int) -> None:
    for model in ("gpt-4o-mini", "o3-mini"):
        body = _chat(**{param: cap}, model=model, n=2)
        response, usage = fake_response(CHAT, body, seed=0, request_key="k", created=0)
        assert usage.output_tokens <= 2 * cap
        assert {choice["finish_reason"] for choice in response["choices"]} <= {"stop", "length"}


def test_reasoning_models_report_reasoning_tokens() -> None:
    response, usage = fake_response(CHAT, _chat(model="o4-mini"), seed=0, request_key="k", created=0)
    details = response["usage"]["completion_tokens_details"]
    assert details["reasoning_tokens"] == usage.reasoning_tokens > 0
    assert response["usage"]["completion_tokens"] >= details["reasoning_tokens"]


def test_long_prompts_may_hit_the_cache_in_128_token_steps() -> None:
    cached = set()
    for i in range(20):
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": f"{i}" + "y" * 8000}]}
        _, usage = fake_response(CHAT, body, seed=0, request_key="k", created=0)
        cached.add(usage.cached_tokens)
        assert usage.cached_tokens % 128 == 0 and usage.cached_tokens < usage.input_tokens
    assert 0 in cached and len(cached) > 1


def test_embeddings_are_small_unit_vectors_and_support_base64() -> None:
    body = {"model": "text-embedding-3-small", "input": ["a", "b"]}
    response, usage = fake_response("/v1/embeddings", body, seed=0, request_key="k", created=0)
    vectors = [item["embedding"] for item in response["data"]]
    assert [len(v) for v in vectors] == [8, 8] and vectors[0] != vectors[1]
    assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-4
    assert response["usage"] == {"prompt_tokens": usage.input_tokens, "total_tokens": usage.input_tokens}
    encoded, _ = fake_response(
        "/v1/embeddings", {**body, "encoding_format": "base64", "dimensions": 4}, seed=0, request_key="k", created=0
    )
    assert len(struct.unpack("<4f", base64.b64decode(encoded["data"][0]["embedding"]))) == 4
    assert count_embedding_inputs(body) == 2
    assert count_embedding_inputs({"input": [1, 2, 3]}) == 1


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        (CHAT, {"model": "m"}, "messages"),
        (CHAT, {"model": "m", "messages": []}, "messages"),
        (CHAT, _chat(max_tokens=0), "max_tokens"),
        ("/v1/completions", {"model": "m"}, "prompt"),
        ("/v1/responses", {"model": "m", "input": 3}, "input"),
        ("/v1/embeddings", {"model": "m", "input": ""}, "input"),
    ],
)
def test_invalid_bodies_are_rejected_naming_the_param(endpoint: str, body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidBody) as rejected:
        check_body(endpoint, body)
    assert rejected.value.param == param
