"""The Anthropic side of the emulator without sockets: the streaming create-body reader, params checks, the fake
model's tokens and caching, and the results writer."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from batcher.emulator.anthropic_errors import AnthropicApiError
from batcher.emulator.anthropic_models import (
    InvalidParams,
    PromptCache,
    check_params,
    fake_message,
    prompt_tokens,
)
from batcher.emulator.anthropic_requests import RequestsBodyParser
from batcher.emulator.anthropic_results import ResultsPlan, write_results

PARAMS = {"model": "claude-x", "max_tokens": 32, "messages": [{"role": "user", "content": "hello"}]}


def parse(body: bytes, *, step: int | None = None, max_requests: int = 100, max_bytes: int = 1 << 20) -> list[Any]:
    """Feed ``body`` in pieces of ``step`` bytes (whole when ``None``); the lines written, parsed."""
    out = io.BytesIO()
    parser = RequestsBodyParser(out, max_requests=max_requests, max_bytes=max_bytes)
    step = step or len(body) or 1
    for start in range(0, len(body), step):
        parser.feed(body[start : start + step])
    result = parser.finish()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert result.count == len(lines) and result.custom_ids == {line["custom_id"] for line in lines}
    assert result.bytes == len(body)
    return lines


def request(custom_id: str, **params: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "params": {**PARAMS, **params}}


TRICKY = [
    request("a", system='quotes " and \\ backslashes, ] } [ { : , inside strings'),
    request("b", messages=[{"role": "user", "content": [{"type": "text", "text": "nested [[{{}}]]"}]}]),
    request("c", metadata={"user_id": "\u00e9\u4e2d\U0001f600"}, temperature=0.5, stop_sequences=[]),
]


@pytest.mark.parametrize("step", [None, 1, 2, 3, 17])
@pytest.mark.parametrize("indent", [None, 2])
def test_reads_any_chunking_and_layout(step: int | None, indent: int | None) -> None:
    body = json.dumps({"requests": TRICKY}, indent=indent, ensure_ascii=indent is None).encode()
    lines = parse(body, step=step)
    assert lines == TRICKY


def test_keeps_memory_to_one_element() -> None:
    out = io.BytesIO()
    parser = RequestsBodyParser(out, max_requests=1000, max_bytes=1 << 24)
    body = json.dumps({"requests": [request(f"r{i}") for i in range(500)]}).encode()
    biggest = 0
    for start in range(0, len(body), 4096):
        parser.feed(body[start : start + 4096])
        biggest = max(biggest, len(parser._buf))
    assert parser.finish().count == 500
    assert biggest < 4096 + 200  # a chunk plus at most one unfinished element


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "requests: Field required"),
        (b"{}", "requests: Field required"),
        (b"[]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b"42", "must be a JSON object"),
        (b'{"requests": []}', "requests: List should have at least 1 item after validation, not 0"),
        (b'{"requests": null}', "requests: Input should be a valid list"),
        (b'{"requests": {}}', "requests: Input should be a valid list"),
        (b'{"other": 1}', "other: Extra inputs are not permitted"),
        (b'{"requests": [1]}', "requests.0: Input should be a valid dictionary"),
        (b'{"requests": [{"custom_id": "a", "params": {}},]}', "not valid JSON"),
        (b'{"requests": [{"custom_id": "a", "params": {}}', "not valid JSON"),
        (b'{"requests": [{"custom_id": "a", "params": {}}]} x', "not valid JSON"),
        (b'{"requests": [{"custom_id": "a", "params": {}}],}', "not valid JSON"),
        (b'{"requests": [{"custom_id": "a", "par', "not valid JSON"),
        (b'{"requests": [{"custom_id": "a", "params": {}}], "requests": []}', "requests: given more than once"),
        (b'{"requests": [{"custom_id": "a b", "params": {}}]}', "requests.0.custom_id: String should match pattern"),
        (
            b'{"requests": [{"custom_id": "a", "params": {}}, {"custom_id": "a", "params": {}}]}',
            "requests.1.custom_id: Duplicate custom_id 'a'",
        ),
    ],
)
@pytest.mark.parametrize("step", [None, 1])
def test_refusals_name_the_field(body: bytes, message: str, step: int | None) -> None:
    with pytest.raises(AnthropicApiError) as info:
        parse(body, step=step)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    assert message in info.value.message


def test_too_many_requests_reports_the_count() -> None:
    body = json.dumps({"requests": [request(f"r{i}") for i in range(5)]}).encode()
    with pytest.raises(AnthropicApiError, match="at most 3 items after validation, not 5"):
        parse(body, max_requests=3)
    assert len(parse(body, max_requests=5)) == 5


def test_too_many_bytes_is_413() -> None:
    body = json.dumps({"requests": [request("a")]}).encode()
    with pytest.raises(AnthropicApiError) as info:
        parse(body, step=8, max_bytes=len(body) - 1)
    assert info.value.status == 413 and info.value.type == "request_too_large"


# -- params checks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({k: v for k, v in PARAMS.items() if k != "model"}, "model: Field required"),
        ({**PARAMS, "model": ""}, "model: Input should be a non-empty string"),
        ({k: v for k, v in PARAMS.items() if k != "max_tokens"}, "max_tokens: Field required"),
        ({**PARAMS, "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        ({**PARAMS, "max_tokens": True}, "max_tokens: Input should be a valid integer"),
        ({**PARAMS, "max_tokens": "5"}, "max_tokens: Input should be a valid integer"),
        ({k: v for k, v in PARAMS.items() if k != "messages"}, "messages: Field required"),
        ({**PARAMS, "messages": []}, "messages: at least one message is required"),
        ({**PARAMS, "messages": "hi"}, "messages: Input should be a valid list"),
        ({**PARAMS, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({**PARAMS, "messages": [{"role": "user"}]}, "messages.0.content: Field required"),
        ({**PARAMS, "messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages.0.content.0"),
        ({**PARAMS, "system": 5}, "system: Input should be a valid string or list"),
        ({**PARAMS, "stream": True}, "stream: streaming is not supported for requests in a Message Batch"),
    ],
)
def test_check_params(params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParams) as info:
        check_params(params, in_batch=True)
    assert info.value.message.startswith(message)


def test_check_params_accepts_a_full_request() -> None:
    check_params(
        {
            **PARAMS,
            "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
            "stream": False,
            "tools": [{"name": "t", "input_schema": {"type": "object"}}],
        },
        in_batch=True,
    )
    with pytest.raises(InvalidParams, match="does not stream"):
        check_params({**PARAMS, "stream": True}, in_batch=False)


# -- tokens, caching, answers -----------------------------------------------------------------------------------


def test_prompt_tokens_and_cache_prefix() -> None:
    assert prompt_tokens(PARAMS).total == 2 and prompt_tokens(PARAMS).cached_prefix == 0
    cached = {
        **PARAMS,
        "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
        "system": [{"type": "text", "text": "s" * 400, "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "q" * 40}]}],
    }
    tokens = prompt_tokens(cached)
    assert tokens.cache_ttl == "1h" and tokens.prefix_key
    assert tokens.cached_prefix == tokens.total - 10  # everything but the 40-character question
    other_model = prompt_tokens({**cached, "model": "claude-y"})
    assert other_model.prefix_key != tokens.prefix_key  # caches are per model


def test_fake_message_is_deterministic_and_respects_max_tokens() -> None:
    first, usage = fake_message(PARAMS, seed=1, request_key="b:a", cache=None, service_tier="batch")
    again, _ = fake_message(PARAMS, seed=1, request_key="b:a", cache=None, service_tier="batch")
    other_seed, _ = fake_message(PARAMS, seed=2, request_key="b:a", cache=None, service_tier="batch")
    assert first == again and first["content"] != other_seed["content"]
    assert first["usage"]["output_tokens"] == usage.output_tokens and first["usage"]["service_tier"] == "batch"
    short, usage = fake_message({**PARAMS, "max_tokens": 2}, seed=1, request_key="k", cache=None, service_tier="x")
    assert usage.output_tokens == 2 and short["stop_reason"] == "max_tokens"
    assert len(short["content"][0]["text"].split()) == 2


def test_prompt_cache_writes_then_reads() -> None:
    cache = PromptCache(max_entries=2)
    params = {**PARAMS, "system": [{"type": "text", "text": "x" * 80, "cache_control": {"type": "ephemeral"}}]}
    _, write = fake_message(params, seed=0, request_key="1", cache=cache, service_tier="batch")
    _, read = fake_message(params, seed=0, request_key="2", cache=cache, service_tier="batch")
    assert write.cache_creation_input_tokens == 20 and write.cache_read_input_tokens == 0
    assert read.cache_read_input_tokens == 20 and read.cache_creation_input_tokens == 0
    assert write.input_tokens == read.input_tokens == 2
    assert not cache.hit(b"k1") and not cache.hit(b"k2")  # the prefix above is evicted (2 entries at most)
    _, again = fake_message(params, seed=0, request_key="3", cache=cache, service_tier="batch")
    assert again.cache_creation_input_tokens == 20


# -- results writer ---------------------------------------------------------------------------------------------


def write_requests(path: Path, n: int) -> Path:
    with path.open("wb") as fh:
        for i in range(n):
            fh.write(orjson.dumps(request(f"r{i:03d}")) + b"\n")
    return path


def plan(tmp_path: Path, n: int, **overrides: Any) -> ResultsPlan:
    fields: dict[str, Any] = {
        "batch_id": "msgbatch_1",
        "ordinal": 1,
        "seed": 0,
        "error_rate": 0.0,
        "done_count": n,
        "unfinished": "expired",
        "requests_path": write_requests(tmp_path / "requests.jsonl", n),
        "results_path": tmp_path / "results.jsonl",
        "cache": PromptCache(),
    }
    fields.update(overrides)
    return ResultsPlan(**fields)


@pytest.mark.parametrize("n", [2, 3, 128, 300])
def test_results_come_back_out_of_order(tmp_path: Path, n: int) -> None:
    the_plan = plan(tmp_path, n)
    counts = write_results(the_plan)
    assert counts.succeeded == n
    order = [orjson.loads(line)["custom_id"] for line in the_plan.results_path.read_bytes().splitlines()]
    assert sorted(order) == [f"r{i:03d}" for i in range(n)] and order != sorted(order)


def test_unfinished_requests(tmp_path: Path) -> None:
    the_plan = plan(tmp_path, 10, done_count=4, unfinished="canceled", error_rate=1.0)
    counts = write_results(the_plan)
    assert (counts.errored, counts.canceled, counts.succeeded, counts.expired) == (4, 6, 0, 0)
    results = {
        line["custom_id"]: line["result"] for line in map(orjson.loads, the_plan.results_path.read_bytes().splitlines())
    }
    assert all(results[f"r{i:03d}"] == {"type": "canceled"} for i in range(4, 10))
    assert [results[f"r{i:03d}"]["error"]["error"]["type"] for i in range(4)] == [
        "rate_limit_error",
        "overloaded_error",
        "api_error",
        "invalid_request_error",
    ]
    assert counts.as_json() == {"processing": 0, "succeeded": 0, "errored": 4, "canceled": 6, "expired": 0}
