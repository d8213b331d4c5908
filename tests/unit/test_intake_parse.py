"""Line validation: each bad input is refused with the field (and line) that is wrong."""

from __future__ import annotations

import json

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
        (oa(body={"model": "", "messages": []}), "body.model", "body.model is missing"),
        (oa(body={"model": 42, "messages": []}), "body.model", "body.model must be a string (the model name), not 42"),
        (oa(body={"model": ["m"], "messages": []}), "body.model", "body.model must be a string"),
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


def test_anthropic_model_not_a_string() -> None:
    raw = an(params={"model": 42, "max_tokens": 5, "messages": []})
    with pytest.raises(InvalidInput) as info:
        parse_line(raw, Provider.ANTHROPIC, ANTHROPIC_LIMITS, 2)
    assert info.value.field == "params.model"
    assert str(info.value) == "line 2: params.model must be a string (the model name), not 42"


CHAT = {"model": "gpt-4o-mini", "messages": []}


@pytest.mark.parametrize(
    ("url", "name", "value"),
    [
        ("/v1/chat/completions", "max_tokens", "lots"),
        ("/v1/chat/completions", "max_tokens", -5),
        ("/v1/chat/completions", "max_tokens", 0),
        ("/v1/chat/completions", "max_tokens", 10**30),  # orjson reads it as a float
        ("/v1/chat/completions", "max_tokens", 2**31),
        ("/v1/chat/completions", "max_tokens", 16.0),
        ("/v1/chat/completions", "max_completion_tokens", True),
        ("/v1/completions", "max_tokens", [5]),
        ("/v1/responses", "max_output_tokens", -1),
    ],
)
def test_openai_output_bounds_refused(url: str, name: str, value: object) -> None:
    # stdlib json: it writes 10**30 as the integer a user's file holds (orjson refuses to)
    raw = json.dumps({"custom_id": "a", "url": url, "body": CHAT | {name: value}}).encode()
    with pytest.raises(InvalidInput) as info:
        parse_line(raw, Provider.OPENAI, OPENAI_LIMITS, 4)
    assert info.value.field == f"body.{name}"
    assert str(info.value).startswith(f"line 4: body.{name} must be an integer from 1 to 2,147,483,647, not ")


@pytest.mark.parametrize(
    ("url", "name", "value"),
    [
        ("/v1/chat/completions", "max_tokens", 1),
        ("/v1/chat/completions", "max_completion_tokens", 2**31 - 1),
        ("/v1/completions", "max_tokens", 100),
        ("/v1/responses", "max_output_tokens", 4096),
    ],
)
def test_openai_output_bounds_accepted(url: str, name: str, value: int) -> None:
    parsed = parse_line(oa(url=url, body=CHAT | {name: value}), Provider.OPENAI, OPENAI_LIMITS, 1)
    assert orjson.loads(parsed.body_json)[name] == value


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (None, "params.max_tokens is missing"),
        (0, "params.max_tokens must be an integer from 1 to 2,147,483,647, not 0"),
        (2**31, "params.max_tokens must be an integer from 1 to 2,147,483,647, not 2147483648"),
        (10**30, "not 1e+30"),
        ("10", "not '10'"),
        (False, "not False"),
    ],
)
def test_anthropic_max_tokens_bounds(value: object, words: str) -> None:
    params: dict[str, object] = {"model": "m", "messages": []}
    if value is not None:
        params["max_tokens"] = value
    with pytest.raises(InvalidInput) as info:
        parse_line(json.dumps({"custom_id": "a", "params": params}).encode(), Provider.ANTHROPIC, ANTHROPIC_LIMITS, 3)
    assert info.value.field == "params.max_tokens"
    assert words in str(info.value)
    params["max_tokens"] = 2**31 - 1
    assert parse_line(an(params=params), Provider.ANTHROPIC, ANTHROPIC_LIMITS, 3).model == "m"


def test_anthropic_line_given_as_openai_says_so() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_line(an(), Provider.OPENAI, OPENAI_LIMITS, 1)
    assert str(info.value) == "line 1: this is an Anthropic line (custom_id, params); use --provider anthropic"
    assert info.value.field == "provider"


@pytest.mark.parametrize("line", [oa(), oa(custom_id="has a space.1"), oa(method=None)])
def test_openai_line_given_as_anthropic_says_so(line: bytes) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_line(line, Provider.ANTHROPIC, ANTHROPIC_LIMITS, 1)
    assert str(info.value) == "line 1: this is an OpenAI line (custom_id, method, url, body); use --provider openai"
    assert info.value.field == "provider"


def test_a_line_of_the_right_shape_keeps_its_own_error() -> None:
    # a field named like the other provider's is not enough: the line's own first problem is reported
    with pytest.raises(InvalidInput, match="url None is not a supported batch endpoint"):
        parse_line(orjson.dumps({"custom_id": "a", "body": CHAT}), Provider.OPENAI, OPENAI_LIMITS, 1)
    with pytest.raises(InvalidInput, match="params must be a JSON object"):
        parse_line(orjson.dumps({"custom_id": "a"}), Provider.ANTHROPIC, ANTHROPIC_LIMITS, 1)


def test_non_utf8_line_names_the_byte() -> None:
    raw = oa(body={"model": "m", "messages": [{"content": "caf\u00e9"}]}).replace("é".encode(), b"\xe9")
    at = raw.index(b"\xe9")
    with pytest.raises(InvalidInput) as info:
        parse_line(raw, Provider.OPENAI, OPENAI_LIMITS, 8)
    assert str(info.value) == (
        f"line 8: not UTF-8 text (byte 0xe9 at position {at} of the line): batch files must be UTF-8"
    )
    # a UTF-8 line that is not JSON keeps the parser's message
    with pytest.raises(InvalidInput, match=r"^line 8: invalid JSON \("):
        parse_line('{"café": '.encode(), Provider.OPENAI, OPENAI_LIMITS, 8)


@pytest.mark.parametrize(
    ("endpoint", "body", "tokens"),
    [
        ("/v1/chat/completions", {}, 4096),  # no bound: the model's longest reply
        ("/v1/chat/completions", {"max_tokens": 10}, 10),
        ("/v1/chat/completions", {"max_tokens": 10, "max_completion_tokens": 50}, 50),
        ("/v1/chat/completions", {"max_completion_tokens": 50, "max_tokens": 70}, 70),
        ("/v1/chat/completions", {"max_completion_tokens": 50, "n": 3}, 150),
        ("/v1/completions", {"max_tokens": 20, "n": 2, "best_of": 5}, 100),
        ("/v1/responses", {"max_output_tokens": 2**31 - 1}, 2**31 - 1),
        ("/v1/messages", {"max_tokens": 64}, 64),
        ("/v1/embeddings", {"max_tokens": 64}, 0),
    ],
)
def test_estimate_output_is_an_upper_bound(endpoint: str, body: dict[str, object], tokens: int) -> None:
    from batcher.estimate import max_output_tokens

    assert max_output_tokens(endpoint, body, 4096) == tokens
