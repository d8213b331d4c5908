"""Line validation: each bad input is refused with the field (and line) that is wrong."""

from __future__ import annotations

import orjson
import pytest

from batcher.domain import Provider
from batcher.errors import InvalidInput
from batcher.intake import parse_line
from batcher.providers.limits import ANTHROPIC_LIMITS, OPENAI_LIMITS


def oa(**over: object) -> bytes:
    line: dict[str, object] = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    }
    line.update(over)
    return orjson.dumps({k: v for k, v in line.items() if v is not None})


def an(**over: object) -> bytes:
    params = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    line: dict[str, object] = {"custom_id": "a", "params": params}
    line.update(over)
    return orjson.dumps({k: v for k, v in line.items() if v is not None})


def test_openai_line_ok_keeps_body() -> None:
    parsed = parse_line(oa(), Provider.OPENAI, OPENAI_LIMITS, 1)
    assert parsed.custom_id == "a"
    assert parsed.model == "gpt-4o-mini"
    assert parsed.endpoint == "/v1/chat/completions"
    assert orjson.loads(parsed.body_json)["messages"][0]["content"] == "hi"


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        (b"{not json", None, "invalid JSON"),
        (b"[1,2]", None, "JSON object"),
        (oa(custom_id=None), "custom_id", "custom_id is missing"),
        (oa(custom_id=""), "custom_id", "custom_id is missing"),
        (oa(custom_id=5), "custom_id", "custom_id is missing"),
        (oa(custom_id="x" * 300), "custom_id", "longer than"),
        (oa(method="GET"), "method", "method must be POST"),
        (oa(url="/v1/images/generations"), "url", "not a supported batch endpoint"),
        (oa(body={"messages": []}), "body.model", "model is missing"),
        (oa(body="text"), "body", "must be a JSON object"),
        (oa(extra=1), "extra", "unexpected field"),
    ],
)
def test_openai_line_errors(raw: bytes, field: str | None, words: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_line(raw, Provider.OPENAI, OPENAI_LIMITS, 57)
    assert info.value.line == 57
    assert info.value.field == field
    assert words in str(info.value)
    assert str(info.value).startswith("line 57: ")


def test_anthropic_line_ok() -> None:
    parsed = parse_line(an(), Provider.ANTHROPIC, ANTHROPIC_LIMITS, 1)
    assert parsed.endpoint == "/v1/messages"
    assert parsed.model == "claude-sonnet-4-5"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (an(custom_id="has space"), "custom_id"),
        (an(custom_id="x" * 65), "custom_id"),
        (an(params={"model": "m", "max_tokens": 0, "messages": []}), "params.max_tokens"),
        (an(params={"model": "m", "max_tokens": 5}), "params.messages"),
        (an(params={"model": "m", "max_tokens": 5, "messages": [], "stream": True}), "params.stream"),
        (an(params={"max_tokens": 5, "messages": []}), "params.model"),
    ],
)
def test_anthropic_line_errors(raw: bytes, field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_line(raw, Provider.ANTHROPIC, ANTHROPIC_LIMITS, 3)
    assert info.value.field == field


def test_line_over_provider_size_refused() -> None:
    from dataclasses import replace

    small = replace(OPENAI_LIMITS, max_line_bytes=100)
    with pytest.raises(InvalidInput, match="bytes; the provider accepts at most 100"):
        parse_line(oa(body={"model": "m", "messages": [{"content": "x" * 200}]}), Provider.OPENAI, small, 9)


@pytest.mark.parametrize(
    ("url", "body_input", "inputs"),
    [
        ("/v1/embeddings", "one text", 1),
        ("/v1/embeddings", ["a", "b", "c"], 3),
        ("/v1/embeddings", [1, 2, 3, 4], 1),  # one input given as token ids
        ("/v1/embeddings", [[1, 2], [3], [4, 5]], 3),
        ("/v1/embeddings", ["x"] * 50_000, 50_000),
        ("/v1/moderations", ["a", "b"], 1),  # only embedding inputs are counted
    ],
)
def test_embedding_inputs_are_counted(url: str, body_input: object, inputs: int) -> None:
    raw = oa(url=url, body={"model": "text-embedding-3-small", "input": body_input})
    assert parse_line(raw, Provider.OPENAI, OPENAI_LIMITS, 1).inputs == inputs


def test_embeddings_request_over_the_batch_input_cap_refused() -> None:
    raw = oa(url="/v1/embeddings", body={"model": "text-embedding-3-small", "input": ["x"] * 50_001})
    with pytest.raises(InvalidInput) as info:
        parse_line(raw, Provider.OPENAI, OPENAI_LIMITS, 7)
    assert info.value.line == 7 and info.value.field == "body.input"
    assert "50,001 embedding inputs; a batch takes at most 50,000" in str(info.value)
