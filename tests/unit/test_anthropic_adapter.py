"""AnthropicAdapter without sockets: pure normalization functions, then the adapter over an httpx2.MockTransport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from anthropic.types.messages import MessageBatch

from batcher.domain import BatchState, Provider
from batcher.errors import ProviderError
from batcher.providers.anthropic import (
    ANTHROPIC_LIMITS,
    NON_RETRYABLE_ERROR_TYPES,
    RETRYABLE_ERROR_TYPES,
    AnthropicAdapter,
    JsonlRequestsBody,
    batch_status_from_anthropic,
    is_retryable_error_type,
    measure_requests_body,
    parse_result_line,
    realtime_error_outcome,
    translate_error,
)
from batcher.providers.base import OutcomeKind, RequestCounts
from batcher.providers.limits import ANTHROPIC_ENDPOINT
from batcher.providers.sdk import realtime_success_outcome

PARAMS = {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
CREATED = "2026-08-20T18:37:24.100435Z"


def batch_json(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "msgbatch_01abc",
        "type": "message_batch",
        "processing_status": "in_progress",
        "request_counts": {"processing": 5, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0},
        "created_at": CREATED,
        "expires_at": "2026-08-21T18:37:24.100435Z",
        "ended_at": None,
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": None,
    }
    body.update(overrides)
    return body


ENDED_COUNTS = {"processing": 0, "succeeded": 5, "errored": 2, "canceled": 1, "expired": 3}


# -- encode_line -----------------------------------------------------------------------------------------------


def test_defaults_and_encode_line() -> None:
    adapter = AnthropicAdapter(api_key="sk-ant-x", base_url=None)
    assert adapter.account == "anthropic" and adapter.kind is Provider.ANTHROPIC
    assert adapter.limits is ANTHROPIC_LIMITS
    body = '{"model":"claude-x","max_tokens":16,"messages":[{"role":"user","content":"h\\u00e9"}]}'
    line = adapter.encode_line("job-1", ANTHROPIC_ENDPOINT, body)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line == b'{"custom_id":"job-1","params":' + body.encode() + b"}\n"  # spliced, never re-serialized
    assert orjson.loads(line)["params"]["messages"][0]["content"] == "hé"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://emu.test", "http://emu.test"),
        ("http://emu.test/", "http://emu.test"),
        ("http://emu.test/v1", "http://emu.test"),
        ("http://emu.test/v1/", "http://emu.test"),
        ("https://proxy.test/anthropic", "https://proxy.test/anthropic"),
        (None, None),
    ],
)
def test_base_url_drops_a_trailing_v1(given: str | None, expected: str | None) -> None:
    assert (
        repr(AnthropicAdapter(api_key="k", base_url=given))
        == f"AnthropicAdapter(account='anthropic', base_url={expected!r})"
    )


# -- result lines ----------------------------------------------------------------------------------------------


def succeeded_line(custom_id: str = "job-1") -> dict[str, Any]:
    message = {
        "id": "msg_01x",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 3,
            "output_tokens": 2,
            "cache_creation_input_tokens": 7,
            "cache_read_input_tokens": 0,
        },
    }
    return {"custom_id": custom_id, "result": {"type": "succeeded", "message": message}}


def errored_line(error_type: str, custom_id: str = "job-1") -> dict[str, Any]:
    error = {"type": "error", "error": {"type": error_type, "message": f"{error_type} happened"}, "request_id": "req_1"}
    return {"custom_id": custom_id, "result": {"type": "errored", "error": error}}


def test_succeeded_line() -> None:
    line = succeeded_line()
    outcome = parse_result_line(orjson.dumps(line) + b"\n")
    assert outcome is not None and outcome.kind is OutcomeKind.SUCCEEDED and outcome.custom_id == "job-1"
    assert outcome.body is not None and json.loads(outcome.body) == line["result"]["message"]
    assert outcome.usage == line["result"]["message"]["usage"]
    assert outcome.error_code is None and not outcome.retryable


@pytest.mark.parametrize("error_type", sorted(RETRYABLE_ERROR_TYPES | NON_RETRYABLE_ERROR_TYPES))
def test_errored_lines_are_classified(error_type: str) -> None:
    outcome = parse_result_line(json.dumps(errored_line(error_type)))
    assert outcome is not None and outcome.kind is OutcomeKind.FAILED
    assert outcome.error_code == error_type and outcome.error_message == f"{error_type} happened"
    assert outcome.retryable is (error_type in RETRYABLE_ERROR_TYPES)
    assert outcome.body is not None and json.loads(outcome.body)["request_id"] == "req_1"


@pytest.mark.parametrize(
    ("error_type", "retryable"),
    [
        ("rate_limit_error", True),
        ("overloaded_error", True),
        ("api_error", True),
        ("timeout_error", True),
        ("invalid_request_error", False),
        ("authentication_error", False),
        ("permission_error", False),
        ("billing_error", False),
        ("not_found_error", False),
        ("some_future_error", False),
        (None, False),
    ],
)
def test_is_retryable_error_type(error_type: str | None, retryable: bool) -> None:
    assert is_retryable_error_type(error_type) is retryable


def test_canceled_and_expired_lines() -> None:
    canceled = parse_result_line('{"custom_id": "a", "result": {"type": "canceled"}}')
    expired = parse_result_line('{"custom_id": "b", "result": {"type": "expired"}}')
    assert canceled is not None and canceled.kind is OutcomeKind.CANCELLED and not canceled.retryable
    assert expired is not None and expired.kind is OutcomeKind.EXPIRED and expired.retryable


def test_errored_line_without_details_still_fails() -> None:
    outcome = parse_result_line('{"custom_id": "a", "result": {"type": "errored"}}')
    assert outcome is not None and outcome.kind is OutcomeKind.FAILED
    assert outcome.error_code is None and not outcome.retryable


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'{"result": {"type": "succeeded"}}',
        b'{"custom_id": "", "result": {"type": "canceled"}}',
        b'{"custom_id": "a"}',
        b'{"custom_id": "a", "result": "succeeded"}',
        b'{"custom_id": "a", "result": {"type": "succeeded"}}',
        b'{"custom_id": "a", "result": {"type": "something_new"}}',
    ],
)
def test_malformed_lines_are_none(raw: bytes) -> None:
    assert parse_result_line(raw) is None


# -- batch status ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "state"),
    [
        ({}, BatchState.IN_PROGRESS),
        ({"processing_status": "canceling", "cancel_initiated_at": CREATED}, BatchState.CANCELLING),
        ({"processing_status": "ended", "request_counts": ENDED_COUNTS, "ended_at": CREATED}, BatchState.ENDED),
        (
            {
                "processing_status": "ended",
                "request_counts": ENDED_COUNTS,
                "ended_at": CREATED,
                "cancel_initiated_at": CREATED,
            },
            BatchState.CANCELLED,
        ),
    ],
)
def test_status_mapping(overrides: dict[str, Any], state: BatchState) -> None:
    status = batch_status_from_anthropic(MessageBatch.model_validate(batch_json(**overrides)))
    assert status.state is state
    assert status.provider_state == overrides.get("processing_status", "in_progress")
    assert status.provider_batch_id == "msgbatch_01abc"
    assert status.raw["id"] == "msgbatch_01abc" and isinstance(status.raw["created_at"], str)
    assert status.output_file_id is None and status.error_file_id is None and not status.token_limit_exceeded


def test_counts_and_results_ref() -> None:
    running = batch_status_from_anthropic(MessageBatch.model_validate(batch_json()))
    assert running.counts == RequestCounts(total=5)
    assert running.results_ref is None
    url = "https://api.anthropic.com/v1/messages/batches/msgbatch_01abc/results"
    ended = batch_status_from_anthropic(
        MessageBatch.model_validate(
            batch_json(processing_status="ended", request_counts=ENDED_COUNTS, ended_at=CREATED, results_url=url)
        )
    )
    assert ended.counts == RequestCounts(total=11, succeeded=5, failed=2, expired=3, cancelled=1)
    assert ended.results_ref == "msgbatch_01abc" and ended.raw["results_url"] == url


def test_unknown_status_keeps_polling() -> None:
    batch = MessageBatch.model_construct(**{**batch_json(), "processing_status": "paused"})
    assert batch_status_from_anthropic(batch).state is BatchState.IN_PROGRESS


# -- errors ----------------------------------------------------------------------------------------------------


def status_error(status: int, error_type: str, headers: dict[str, str] | None = None) -> anthropic.APIStatusError:
    body = {"type": "error", "error": {"type": error_type, "message": f"{error_type}!"}}
    response = httpx2.Response(
        status, headers=headers, json=body, request=httpx2.Request("POST", "http://emu.test/v1/messages")
    )
    return anthropic.APIStatusError(f"Error code: {status}", response=response, body=body)


@pytest.mark.parametrize(
    ("status", "error_type", "retryable"),
    [
        (400, "invalid_request_error", False),
        (401, "authentication_error", False),
        (403, "permission_error", False),
        (404, "not_found_error", False),
        (413, "request_too_large", False),
        (408, "timeout_error", True),
        (409, "api_error", True),
        (429, "rate_limit_error", True),
        (500, "api_error", True),
        (504, "timeout_error", True),
        (529, "overloaded_error", True),
    ],
)
def test_translate_status_errors(status: int, error_type: str, retryable: bool) -> None:
    error = translate_error(status_error(status, error_type), provider="acct", action="create batch b1")
    assert isinstance(error, ProviderError)
    assert error.retryable is retryable and error.provider == "acct"
    assert f"HTTP {status}" in str(error) and error_type in str(error) and "create batch b1" in str(error)


def test_translate_keeps_retry_after_and_redacts_keys() -> None:
    exc = status_error(429, "rate_limit_error", {"retry-after": "7"})
    assert translate_error(exc, provider="acct", action="x").retry_after_s == 7.0
    exc = status_error(429, "rate_limit_error", {"retry-after-ms": "1500"})
    assert translate_error(exc, provider="acct", action="x").retry_after_s == 1.5
    leaky = RuntimeError("bad key sk-ant-api03-abcdefghijklmnop")
    message = str(translate_error(leaky, provider="acct", action="x"))
    assert "abcdefghijklmnop" not in message and "sk-ant-…" in message


def test_translate_connection_errors() -> None:
    request = httpx2.Request("GET", "http://emu.test")
    connect = translate_error(anthropic.APIConnectionError(request=request), provider="a", action="x")
    timeout = translate_error(anthropic.APITimeoutError(request=request), provider="a", action="x")
    transport = translate_error(httpx2.ConnectError("refused"), provider="a", action="x")
    assert connect.retryable and timeout.retryable and transport.retryable
    assert "timed out" in str(timeout) and "connection error" in str(connect)
    other = translate_error(anthropic.AnthropicError("No `results_url`"), provider="a", action="x")
    assert not other.retryable


def test_realtime_outcomes() -> None:
    content = orjson.dumps(succeeded_line()["result"]["message"])
    ok = realtime_success_outcome("job-1", content)
    assert ok.kind is OutcomeKind.SUCCEEDED and ok.body == content.decode() and ok.status_code == 200
    assert ok.usage is not None and ok.usage["input_tokens"] == 3
    with pytest.raises(ValueError):
        realtime_success_outcome("job-1", b"[]")
    failed = realtime_error_outcome("job-1", status_error(400, "invalid_request_error"))
    assert failed.kind is OutcomeKind.FAILED and failed.error_code == "invalid_request_error"
    assert failed.error_message == "invalid_request_error!" and failed.status_code == 400 and not failed.retryable


# -- the streamed create body ----------------------------------------------------------------------------------


async def collect_body(body: JsonlRequestsBody) -> bytes:
    return b"".join([chunk async for chunk in body])


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
async def test_body_is_the_lines_joined_and_sized_exactly(tmp_path: Path, chunk_bytes: int) -> None:
    adapter = AnthropicAdapter(api_key="k", base_url=None)
    path = tmp_path / "batch.jsonl"
    lines = [adapter.encode_line(f"job-{i}", ANTHROPIC_ENDPOINT, orjson.dumps(PARAMS).decode()) for i in range(5)]
    # blank lines, CRLF and a missing final newline are tolerated
    path.write_bytes(lines[0] + b"\n" + lines[1].replace(b"\n", b"\r\n") + b"".join(lines[2:]).rstrip(b"\n"))
    body = JsonlRequestsBody(path, chunk_bytes=chunk_bytes)
    sent = await collect_body(body)
    parsed = orjson.loads(sent)
    assert [r["custom_id"] for r in parsed["requests"]] == [f"job-{i}" for i in range(5)]
    assert all(r["params"] == PARAMS for r in parsed["requests"])
    assert measure_requests_body(path) == (5, len(sent))
    assert await collect_body(body) == sent  # iterable again, for the SDK's retries


async def test_body_of_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"\n\n")
    assert measure_requests_body(path) == (0, len(b'{"requests":[]}'))
    assert await collect_body(JsonlRequestsBody(path)) == b'{"requests":[]}'


# -- the adapter over a mock transport -------------------------------------------------------------------------


Handler = Callable[[httpx2.Request], httpx2.Response]


@pytest.fixture
async def make_adapter() -> AsyncIterator[Callable[..., AnthropicAdapter]]:
    made: list[AnthropicAdapter] = []

    def make(handler: Handler, **kw: Any) -> AnthropicAdapter:
        kw.setdefault("max_retries", 0)
        adapter = AnthropicAdapter(
            "acct",
            api_key="sk-ant-test",
            base_url="http://emu.test/v1",
            http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
            **kw,
        )
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        await adapter.aclose()


def write_batch(adapter: AnthropicAdapter, path: Path, n: int) -> Path:
    with path.open("wb") as fh:
        for i in range(n):
            fh.write(adapter.encode_line(f"job-{i}", ANTHROPIC_ENDPOINT, orjson.dumps(PARAMS).decode()))
    return path


async def test_create_streams_the_file_with_a_content_length(
    make_adapter: Callable[..., AnthropicAdapter], tmp_path: Path
) -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        if len(seen) == 1:
            error = {"type": "error", "error": {"type": "overloaded_error", "message": "x"}}
            return httpx2.Response(529, headers={"retry-after-ms": "1"}, json=error)
        return httpx2.Response(200, json=batch_json(request_counts={**ENDED_COUNTS, "processing": 3}))

    adapter = make_adapter(handler, max_retries=1)
    path = write_batch(adapter, tmp_path / "b.jsonl", 3)
    assert await adapter.upload(path) is None
    status = await adapter.create(
        batch_id="b1", endpoint=ANTHROPIC_ENDPOINT, model="claude-x", input_file_id=None, path=path
    )
    assert status.provider_batch_id == "msgbatch_01abc" and status.state is BatchState.IN_PROGRESS
    assert len(seen) == 2  # the 529 was retried by the SDK, with the body streamed again
    for request in seen:
        assert request.method == "POST" and request.url.path == "/v1/messages/batches"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["authorization"] == "Bearer sk-ant-test"
        assert int(request.headers["content-length"]) == len(request.content)
        assert "transfer-encoding" not in request.headers
        sent = orjson.loads(request.content)
        assert [r["custom_id"] for r in sent["requests"]] == ["job-0", "job-1", "job-2"]


@pytest.mark.parametrize(
    ("count", "limits", "reason"),
    [(0, None, "no requests"), (3, {"max_requests": 2}, "exceed the limit of 2"), (3, {"max_bytes": 50}, "bytes")],
)
async def test_create_refuses_files_it_cannot_send(
    make_adapter: Callable[..., AnthropicAdapter],
    tmp_path: Path,
    count: int,
    limits: dict[str, int] | None,
    reason: str,
) -> None:
    from dataclasses import replace

    def handler(request: httpx2.Request) -> httpx2.Response:
        raise AssertionError("nothing must be sent")

    kw = {"limits": replace(ANTHROPIC_LIMITS, **limits)} if limits else {}
    adapter = make_adapter(handler, **kw)
    path = write_batch(adapter, tmp_path / "b.jsonl", count)
    with pytest.raises(ProviderError, match=reason) as info:
        await adapter.create(batch_id="b1", endpoint=ANTHROPIC_ENDPOINT, model="m", input_file_id=None, path=path)
    assert not info.value.retryable
    with pytest.raises(ProviderError, match="only"):
        await adapter.create(batch_id="b1", endpoint="/v1/chat/completions", model="m", input_file_id=None, path=path)


async def test_create_error_is_translated(make_adapter: Callable[..., AnthropicAdapter], tmp_path: Path) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        body = {"type": "error", "error": {"type": "invalid_request_error", "message": "requests.0.custom_id: bad"}}
        return httpx2.Response(400, json=body)

    adapter = make_adapter(handler)
    path = write_batch(adapter, tmp_path / "b.jsonl", 1)
    with pytest.raises(ProviderError, match=r"requests\.0\.custom_id") as info:
        await adapter.create(batch_id="b1", endpoint=ANTHROPIC_ENDPOINT, model="m", input_file_id=None, path=path)
    assert not info.value.retryable and isinstance(info.value.__cause__, anthropic.BadRequestError)


async def test_results_skip_malformed_lines(make_adapter: Callable[..., AnthropicAdapter]) -> None:
    url = "http://emu.test/v1/messages/batches/msgbatch_01abc/results"
    lines = [
        orjson.dumps(succeeded_line("a")),
        b"{this is not json",
        orjson.dumps(errored_line("overloaded_error", "b")),
        b"",
        b'{"custom_id": "c", "result": {"type": "expired"}}',
    ]

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/results"):
            assert request.headers["accept"] == "application/binary"
            return httpx2.Response(200, content=b"\n".join(lines) + b"\n")
        return httpx2.Response(
            200,
            json=batch_json(processing_status="ended", request_counts=ENDED_COUNTS, ended_at=CREATED, results_url=url),
        )

    adapter = make_adapter(handler)
    status = await adapter.retrieve("msgbatch_01abc")
    outcomes = [o async for o in adapter.results(status)]
    assert [(o.custom_id, o.kind) for o in outcomes] == [
        ("a", OutcomeKind.SUCCEEDED),
        ("b", OutcomeKind.FAILED),
        ("c", OutcomeKind.EXPIRED),
    ]
    assert outcomes[1].retryable and adapter.malformed_lines == 1


async def test_results_before_the_end_is_an_error(make_adapter: Callable[..., AnthropicAdapter]) -> None:
    adapter = make_adapter(lambda request: httpx2.Response(200, json=batch_json()))
    status = await adapter.retrieve("msgbatch_01abc")
    with pytest.raises(ProviderError, match="results_url") as info:
        [o async for o in adapter.results(status)]
    assert not info.value.retryable


async def test_find_batch_and_candidates(make_adapter: Callable[..., AnthropicAdapter]) -> None:
    now = datetime(2026, 8, 20, 12, 0, tzinfo=UTC)

    def at(minutes: int, n: int, batch_id: str) -> dict[str, Any]:
        ts = (now + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")
        return batch_json(
            id=batch_id, created_at=ts, request_counts={**batch_json()["request_counts"], "processing": n}
        )

    listing = [at(5, 3, "newest"), at(3, 2, "other-size"), at(1, 3, "match-2"), at(-10, 3, "too-old")]

    def handler(request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/v1/messages/batches"
        return httpx2.Response(
            200, json={"data": listing, "has_more": False, "first_id": "newest", "last_id": "too-old"}
        )

    adapter = make_adapter(handler)
    assert await adapter.find_batch("ours-1") is None
    found = await adapter.find_batch_candidates(now, 3)
    assert [s.provider_batch_id for s in found] == ["newest", "match-2"]
    assert [s.provider_batch_id for s in await adapter.find_batch_candidates(now, 3, scan_limit=1)] == ["newest"]


async def test_cancel_and_no_op_file_calls(make_adapter: Callable[..., AnthropicAdapter]) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        assert request.method == "POST" and request.url.path == "/v1/messages/batches/msgbatch_01abc/cancel"
        return httpx2.Response(200, json=batch_json(processing_status="canceling", cancel_initiated_at=CREATED))

    adapter = make_adapter(handler)
    status = await adapter.cancel("msgbatch_01abc")
    assert status.state is BatchState.CANCELLING
    await adapter.delete_file("anything")


async def test_run_realtime_sends_one_idempotency_key_per_attempt(
    make_adapter: Callable[..., AnthropicAdapter],
) -> None:
    keys: list[str | None] = []
    message = succeeded_line()["result"]["message"]
    answers = iter([httpx2.Response(529, headers={"retry-after-ms": "1"}), httpx2.Response(200, json=message)])

    def handler(request: httpx2.Request) -> httpx2.Response:
        keys.append(request.headers.get("Idempotency-Key"))
        return next(answers, httpx2.Response(200, json=message))

    adapter = make_adapter(handler, max_retries=1)
    body = orjson.dumps(PARAMS).decode()
    await adapter.run_realtime("job-1", ANTHROPIC_ENDPOINT, body, attempt=2)
    assert keys == ["batcher-job-1-2", "batcher-job-1-2"]  # the SDK's own retry sends the same key
    await adapter.run_realtime("job-1", ANTHROPIC_ENDPOINT, body)
    assert keys[2] is None  # the SDK sends none of its own


async def test_run_realtime(make_adapter: Callable[..., AnthropicAdapter]) -> None:
    answers = iter(
        [
            httpx2.Response(200, json=succeeded_line()["result"]["message"]),
            httpx2.Response(400, json={"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}),
            httpx2.Response(
                429,
                headers={"retry-after": "2"},
                json={"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
            ),
            httpx2.Response(401, json={"type": "error", "error": {"type": "authentication_error", "message": "no"}}),
        ]
    )
    bodies: list[bytes] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/v1/messages"
        bodies.append(request.content)
        return next(answers)

    adapter = make_adapter(handler)
    body = orjson.dumps(PARAMS).decode()
    ok = await adapter.run_realtime("job-1", ANTHROPIC_ENDPOINT, body)
    assert ok.kind is OutcomeKind.SUCCEEDED and ok.usage is not None
    assert bodies[0] == body.encode()  # sent as given
    refused = await adapter.run_realtime("job-1", ANTHROPIC_ENDPOINT, body)
    assert refused.kind is OutcomeKind.FAILED and refused.error_code == "invalid_request_error"
    with pytest.raises(ProviderError) as info:
        await adapter.run_realtime("job-1", ANTHROPIC_ENDPOINT, body)
    assert info.value.retryable and info.value.retry_after_s == 2.0
    with pytest.raises(ProviderError) as info:
        await adapter.run_realtime("job-1", ANTHROPIC_ENDPOINT, body)
    assert not info.value.retryable
