"""OpenAIAdapter without sockets: pure normalization functions, then the adapter over an httpx2.MockTransport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest
from openai.types import Batch
from pydantic import ValidationError

from batcher.config import AccountSettings
from batcher.domain import BatchState, Provider
from batcher.errors import ProviderError
from batcher.providers.base import BatchStatus, OutcomeKind, RequestCounts
from batcher.providers.openai import (
    FIND_BATCH_SCAN_LIMIT,
    OPENAI_LIMITS,
    OpenAIAdapter,
    batch_status_from_openai,
    parse_result_line,
    translate_error,
)
from batcher.providers.sdk import parse_retry_after

# -- encode_line -----------------------------------------------------------------------------------------------


def adapter_for(handler: Callable[[httpx2.Request], httpx2.Response] | None = None, **kw: Any) -> OpenAIAdapter:
    transport = httpx2.MockTransport(handler or (lambda request: httpx2.Response(500)))
    return OpenAIAdapter(
        "acct",
        api_key="sk-test",
        base_url="http://emu.test/v1",
        http_client=httpx2.AsyncClient(transport=transport),
        **kw,
    )


@pytest.fixture
async def make_adapter() -> AsyncIterator[Callable[..., OpenAIAdapter]]:
    made: list[OpenAIAdapter] = []

    def make(handler: Callable[[httpx2.Request], httpx2.Response], **kw: Any) -> OpenAIAdapter:
        adapter = adapter_for(handler, **kw)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        await adapter.aclose()


def test_defaults() -> None:
    adapter = OpenAIAdapter(api_key="sk-x", base_url=None)
    assert adapter.account == "openai"
    assert adapter.kind is Provider.OPENAI
    assert adapter.limits is OPENAI_LIMITS
    assert OPENAI_LIMITS.max_requests == 50_000
    assert OPENAI_LIMITS.max_bytes == 200_000_000  # "200 MB" read as the smaller 10^6-byte MB
    assert OPENAI_LIMITS.one_model_per_batch
    assert OPENAI_LIMITS.custom_id_pattern is None
    assert OPENAI_LIMITS.endpoints == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/moderations",
    }
    assert "sk-x" not in repr(adapter)


@pytest.mark.parametrize(
    "body_json",
    [
        '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
        '{ "model" : "m",  "input": "spaced   out", "n": 1.50 }',
        '{"model":"m","messages":[{"role":"user","content":"h\\u00e9llo \\"q\\" \u2603 \\n"}]}',
    ],
)
def test_encode_line_splices_body_byte_for_byte(body_json: str) -> None:
    line = adapter_for().encode_line("job-1", "/v1/chat/completions", body_json)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    parsed = json.loads(line)
    assert parsed == {
        "custom_id": "job-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": json.loads(body_json),
    }
    assert body_json.encode() in line  # not re-serialized: spacing, escapes and number forms survive
    assert line.endswith(b',"body":' + body_json.encode() + b"}\n")


def test_encode_line_escapes_custom_id() -> None:
    line = adapter_for().encode_line('we"ird\\id', "/v1/embeddings", '{"input":"x"}')
    assert json.loads(line)["custom_id"] == 'we"ird\\id'


def test_body_only_line_format_drops_method_and_url() -> None:
    adapter = OpenAIAdapter("together", api_key="k", base_url="http://x/v1", line_format="body_only")
    line = adapter.encode_line("c1", "/v1/chat/completions", '{"model":"m"}')
    assert json.loads(line) == {"custom_id": "c1", "body": {"model": "m"}}


def test_the_line_format_setting_names_body_only_not_a_provider() -> None:
    assert AccountSettings(line_format="body_only").line_format == "body_only"
    with pytest.raises(ValidationError):
        AccountSettings(line_format="mistral")  # Mistral's batch API is another one; not supported


# -- status mapping --------------------------------------------------------------------------------------------


def make_batch(status: str, **extra: Any) -> Batch:
    data: dict[str, Any] = {
        "id": "batch_abc",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-in",
        "completion_window": "24h",
        "status": status,
        "created_at": 1_700_000_000,
    }
    data.update(extra)
    return Batch.model_validate(data)


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("validating", BatchState.VALIDATING),
        ("in_progress", BatchState.IN_PROGRESS),
        ("finalizing", BatchState.FINALIZING),
        ("completed", BatchState.ENDED),
        ("failed", BatchState.FAILED),
        ("expired", BatchState.EXPIRED),
        ("cancelling", BatchState.CANCELLING),
        ("cancelled", BatchState.CANCELLED),
    ],
)
def test_status_mapping(status: str, state: BatchState) -> None:
    result = batch_status_from_openai(make_batch(status))
    assert result.state is state
    assert result.provider_state == status
    assert result.provider_batch_id == "batch_abc"
    assert not result.token_limit_exceeded


@pytest.mark.parametrize(
    ("status", "state"), [("COMPLETED", BatchState.ENDED), ("In_Progress", BatchState.IN_PROGRESS)]
)
def test_status_of_a_compatible_host_in_another_case(status: str, state: BatchState) -> None:
    batch = Batch.model_construct(**make_batch("in_progress").model_dump())
    batch.status = status  # type: ignore[assignment]
    result = batch_status_from_openai(batch)
    assert result.state is state
    assert result.provider_state == status


def test_unknown_status_keeps_polling() -> None:
    batch = Batch.model_construct(**make_batch("in_progress").model_dump())
    batch.status = "paused"  # type: ignore[assignment]
    assert batch_status_from_openai(batch).state is BatchState.IN_PROGRESS


def test_status_fields() -> None:
    batch = make_batch(
        "completed",
        output_file_id="file-out",
        error_file_id="file-err",
        request_counts={"total": 10, "completed": 7, "failed": 3},
        metadata={"batcher_batch_id": "b1"},
    )
    result = batch_status_from_openai(batch)
    assert result.counts == RequestCounts(total=10, succeeded=7, failed=3)
    assert (result.output_file_id, result.error_file_id) == ("file-out", "file-err")
    assert result.raw["metadata"] == {"batcher_batch_id": "b1"}
    assert result.raw["request_counts"] == {"total": 10, "completed": 7, "failed": 3}
    json.dumps(result.raw)  # JSON-able


def test_token_limit_exceeded() -> None:
    errors = {
        "object": "list",
        "data": [
            {"code": "token_limit_exceeded", "message": "Enqueued token limit reached", "line": None, "param": None}
        ],
    }
    result = batch_status_from_openai(make_batch("failed", errors=errors))
    assert result.state is BatchState.FAILED
    assert result.token_limit_exceeded
    assert result.errors == [
        {"code": "token_limit_exceeded", "message": "Enqueued token limit reached", "line": None, "param": None}
    ]


def test_validation_failure_is_not_token_limit() -> None:
    errors = {"data": [{"code": "invalid_json_line", "message": "bad", "line": 3, "param": "body"}]}
    result = batch_status_from_openai(make_batch("failed", errors=errors))
    assert not result.token_limit_exceeded
    assert result.errors == [{"code": "invalid_json_line", "message": "bad", "line": 3, "param": "body"}]


def test_token_limit_only_counts_when_failed() -> None:
    errors = {"data": [{"code": "token_limit_exceeded", "message": "x"}]}
    assert not batch_status_from_openai(make_batch("in_progress", errors=errors)).token_limit_exceeded


# -- result lines ----------------------------------------------------------------------------------------------


def line(custom_id: str | None = "job-1", response: Any = None, error: Any = None) -> bytes:
    obj: dict[str, Any] = {"id": "batch_req_1", "response": response, "error": error}
    if custom_id is not None:
        obj["custom_id"] = custom_id
    return orjson.dumps(obj)


def test_success_line() -> None:
    body = {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    outcome = parse_result_line(line(response={"status_code": 200, "request_id": "r", "body": body}))
    assert outcome is not None
    assert outcome.kind is OutcomeKind.SUCCEEDED
    assert outcome.custom_id == "job-1"
    assert outcome.body is not None and json.loads(outcome.body) == body
    assert outcome.usage == {"prompt_tokens": 3, "completion_tokens": 2}
    assert outcome.status_code == 200
    assert outcome.error_code is None


def test_success_line_from_text() -> None:
    text = line(response={"status_code": 200, "body": {"data": []}}).decode()
    outcome = parse_result_line(text)
    assert outcome is not None and outcome.kind is OutcomeKind.SUCCEEDED and outcome.usage is None


@pytest.mark.parametrize(
    ("status", "code", "type_", "retryable"),
    [
        (400, "context_length_exceeded", "invalid_request_error", False),
        (404, None, "invalid_request_error", False),
        (429, "rate_limit_exceeded", "requests", True),
        (500, None, "server_error", True),
        (503, None, None, True),
    ],
)
def test_http_level_failure_inside_response(status: int, code: str | None, type_: str | None, retryable: bool) -> None:
    body = {"error": {"message": "it broke", "type": type_, "param": None, "code": code}}
    outcome = parse_result_line(line(response={"status_code": status, "body": body}, error=None))
    assert outcome is not None
    assert outcome.kind is OutcomeKind.FAILED
    assert outcome.status_code == status
    assert outcome.error_code == (code or type_)
    assert outcome.error_message == "it broke"
    assert outcome.retryable is retryable
    assert outcome.body is not None and json.loads(outcome.body) == body


@pytest.mark.parametrize(
    ("code", "retryable"),
    [("server_error", True), ("rate_limit_exceeded", True), ("timeout", True), ("invalid_request", False)],
)
def test_top_level_error(code: str, retryable: bool) -> None:
    outcome = parse_result_line(line(response=None, error={"code": code, "message": "nope"}))
    assert outcome is not None
    assert outcome.kind is OutcomeKind.FAILED
    assert (outcome.error_code, outcome.error_message) == (code, "nope")
    assert outcome.retryable is retryable
    assert outcome.status_code is None


def test_expired_line() -> None:
    outcome = parse_result_line(line(error={"code": "batch_expired", "message": "expired"}))
    assert outcome is not None
    assert outcome.kind is OutcomeKind.EXPIRED
    assert outcome.error_code == "batch_expired"


@pytest.mark.parametrize("code", ["batch_cancelled", "cancelled"])
def test_cancelled_line(code: str) -> None:
    outcome = parse_result_line(line(error={"code": code, "message": "cancelled"}))
    assert outcome is not None and outcome.kind is OutcomeKind.CANCELLED


def test_top_level_error_wins_over_200() -> None:
    outcome = parse_result_line(line(response={"status_code": 200, "body": {}}, error={"code": "x", "message": "m"}))
    assert outcome is not None and outcome.kind is OutcomeKind.FAILED


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b'{"custom_id": "a", "response": {"status_code": 2',
        b"[1, 2]",
        b'"string"',
        line(custom_id=None, response={"status_code": 200, "body": {}}),
        b'{"custom_id": 5, "response": {"status_code": 200, "body": {}}}',
        b'{"custom_id": "", "response": {"status_code": 200, "body": {}}}',
        line(response=None, error=None),
    ],
)
def test_malformed_lines_are_skipped(raw: bytes, caplog: pytest.LogCaptureFixture) -> None:
    assert parse_result_line(raw) is None
    assert "skipping" in caplog.text


# -- retry-after and error translation ------------------------------------------------------------------------

REQUEST = httpx2.Request("POST", "https://api.example/v1/batches")


def status_error(
    status: int, headers: dict[str, str] | None = None, cls: type[openai.APIStatusError] | None = None
) -> openai.APIStatusError:
    response = httpx2.Response(status, headers=headers, request=REQUEST, json={"error": {"message": "m"}})
    return (cls or openai.APIStatusError)(f"Error code: {status}", response=response, body={"message": "m"})


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, 30.0),
        ({"retry-after": "soon"}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    now_s = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after(httpx2.Headers(headers), now_s=now_s) == expected


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (408, True),
        (409, True),
        (422, False),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
    ],
)
def test_translate_status_errors(status: int, retryable: bool) -> None:
    exc = status_error(status, {"retry-after": "3"})
    err = translate_error(exc, provider="acct", action="create batch b1")
    assert isinstance(err, ProviderError)
    assert err.provider == "acct"
    assert err.retryable is retryable
    assert err.retry_after_s == 3.0
    assert "create batch b1" in str(err) and str(status) in str(err)


def test_translate_rate_limit_error() -> None:
    err = translate_error(status_error(429, {"retry-after": "20"}, openai.RateLimitError), provider="a", action="x")
    assert err.retryable and err.retry_after_s == 20.0


@pytest.mark.parametrize(
    "exc",
    [
        openai.APIConnectionError(request=REQUEST),
        openai.APITimeoutError(request=REQUEST),
        httpx2.ReadError("reset"),
        httpx2.ReadTimeout("slow"),
    ],
)
def test_translate_transport_errors(exc: Exception) -> None:
    err = translate_error(exc, provider="a", action="x")
    assert err.retryable and err.retry_after_s is None


def test_translate_other_errors_not_retryable() -> None:
    assert not translate_error(openai.OpenAIError("weird"), provider="a", action="x").retryable


def test_translate_redacts_keys() -> None:
    exc = status_error(401)
    exc.message = "Incorrect API key provided: sk-proj-abcdefghijklmnop1234"
    err = translate_error(exc, provider="a", action="x")
    assert "abcdefghijklmnop1234" not in str(err)


# -- the adapter over a mock transport -------------------------------------------------------------------------


def batch_json(status: str = "validating", **extra: Any) -> dict[str, Any]:
    return make_batch(status, **extra).model_dump(mode="json")


async def test_upload_streams_file_and_create(tmp_path: Path, make_adapter: Callable[..., OpenAIAdapter]) -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        request.read()
        seen.append(request)
        if request.url.path == "/v1/files":
            return httpx2.Response(
                200,
                json={
                    "id": "file-1",
                    "object": "file",
                    "bytes": 3,
                    "created_at": 1,
                    "filename": "in.jsonl",
                    "purpose": "batch",
                    "status": "processed",
                },
            )
        assert request.url.path == "/v1/batches"
        return httpx2.Response(200, json=batch_json(metadata=json.loads(request.content)["metadata"]))

    adapter = make_adapter(handler)
    path = tmp_path / "in.jsonl"
    path.write_bytes(adapter.encode_line("j1", "/v1/chat/completions", '{"model":"m"}'))
    file_id = await adapter.upload(path)
    assert file_id == "file-1"
    assert b'name="purpose"' in seen[0].content and b"batch" in seen[0].content
    assert b'filename="in.jsonl"' in seen[0].content
    assert path.read_bytes() in seen[0].content
    status = await adapter.create(
        batch_id="b1", endpoint="/v1/chat/completions", model="m", input_file_id=file_id, path=path
    )
    assert json.loads(seen[1].content) == {
        "input_file_id": "file-1",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"batcher_batch_id": "b1"},
    }
    assert status.state is BatchState.VALIDATING
    assert seen[1].headers["authorization"] == "Bearer sk-test"


async def test_results_stream_output_then_error_and_skip_malformed(make_adapter: Callable[..., OpenAIAdapter]) -> None:
    files = {
        "file-out": line("a", response={"status_code": 200, "body": {"usage": {"total_tokens": 1}}})
        + b"\n"
        + b"garbage line\n\n"
        + line("b", response={"status_code": 200, "body": {}})
        + b"\n",
        "file-err": line("c", error={"code": "batch_expired", "message": "x"})
        + b"\n"
        + line("d", response={"status_code": 400, "body": {"error": {"code": "bad", "message": "m"}}}),
    }

    def handler(request: httpx2.Request) -> httpx2.Response:
        file_id = request.url.path.split("/")[-2]
        return httpx2.Response(200, content=files[file_id])

    adapter = make_adapter(handler)
    status = BatchStatus("batch_1", BatchState.ENDED, "completed", output_file_id="file-out", error_file_id="file-err")
    outcomes = [o async for o in adapter.results(status)]
    assert [(o.custom_id, o.kind) for o in outcomes] == [
        ("a", OutcomeKind.SUCCEEDED),
        ("b", OutcomeKind.SUCCEEDED),
        ("c", OutcomeKind.EXPIRED),
        ("d", OutcomeKind.FAILED),
    ]
    assert adapter.malformed_lines == 1


async def test_results_without_files(make_adapter: Callable[..., OpenAIAdapter]) -> None:
    adapter = make_adapter(lambda request: httpx2.Response(500))
    assert [o async for o in adapter.results(BatchStatus("b", BatchState.FAILED, "failed"))] == []


async def test_results_download_error_is_translated(make_adapter: Callable[..., OpenAIAdapter]) -> None:
    adapter = make_adapter(lambda request: httpx2.Response(404, json={"error": {"message": "No such File"}}))
    status = BatchStatus("b", BatchState.ENDED, "completed", output_file_id="file-gone")
    with pytest.raises(ProviderError) as info:
        async for _ in adapter.results(status):
            pass
    assert not info.value.retryable
    assert isinstance(info.value.__cause__, openai.NotFoundError)


async def test_find_batch_pages_and_stops(make_adapter: Callable[..., OpenAIAdapter]) -> None:
    pages: list[str | None] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        after = request.url.params.get("after")
        pages.append(after)
        start = int(after.removeprefix("batch_")) + 1 if after else 0
        data = [
            {**batch_json(), "id": f"batch_{i}", "metadata": {"batcher_batch_id": f"ours-{i}"}}
            for i in range(start, start + 100)
        ]
        return httpx2.Response(
            200,
            json={
                "object": "list",
                "data": data,
                "first_id": data[0]["id"],
                "last_id": data[-1]["id"],
                "has_more": True,
            },
        )

    adapter = make_adapter(handler)
    found = await adapter.find_batch("ours-150")
    assert found is not None and found.provider_batch_id == "batch_150"
    assert pages == [None, "batch_99"]
    pages.clear()
    assert await adapter.find_batch("never") is None
    assert len(pages) == FIND_BATCH_SCAN_LIMIT // 100


async def test_delete_file_tolerates_not_found(make_adapter: Callable[..., OpenAIAdapter]) -> None:
    adapter = make_adapter(lambda request: httpx2.Response(404, json={"error": {"message": "No such File"}}))
    await adapter.delete_file("file-gone")


async def test_delete_file_other_errors_raise(make_adapter: Callable[..., OpenAIAdapter]) -> None:
    adapter = make_adapter(lambda request: httpx2.Response(403, json={"error": {"message": "no"}}), max_retries=0)
    with pytest.raises(ProviderError) as info:
        await adapter.delete_file("file-1")
    assert not info.value.retryable


async def test_rate_limit_becomes_provider_error(make_adapter: Callable[..., OpenAIAdapter]) -> None:
    adapter = make_adapter(
        lambda request: httpx2.Response(429, headers={"retry-after": "2"}, json={"error": {"message": "slow down"}}),
        max_retries=0,
    )
    with pytest.raises(ProviderError) as info:
        await adapter.retrieve("batch_1")
    assert info.value.retryable and info.value.retry_after_s == 2.0
    assert isinstance(info.value.__cause__, openai.RateLimitError)


async def test_connection_error_becomes_provider_error(make_adapter: Callable[..., OpenAIAdapter]) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("refused", request=request)

    adapter = make_adapter(handler, max_retries=0)
    with pytest.raises(ProviderError) as info:
        await adapter.cancel("batch_1")
    assert info.value.retryable


async def test_cancel_maps_status(make_adapter: Callable[..., OpenAIAdapter]) -> None:
    adapter = make_adapter(lambda request: httpx2.Response(200, json=batch_json("cancelling")))
    status = await adapter.cancel("batch_abc")
    assert status.state is BatchState.CANCELLING


async def test_run_realtime_success(make_adapter: Callable[..., OpenAIAdapter]) -> None:
    sent: list[httpx2.Request] = []
    answer = b'{"id":"chatcmpl-1","usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}'

    def handler(request: httpx2.Request) -> httpx2.Response:
        request.read()
        sent.append(request)
        return httpx2.Response(200, content=answer, headers={"content-type": "application/json"})

    adapter = make_adapter(handler)
    body = '{"model": "m",  "messages": []}'
    outcome = await adapter.run_realtime("j1", "/v1/chat/completions", body)
    assert sent[0].url.path == "/v1/chat/completions"
    assert sent[0].content == body.encode()
    assert outcome.kind is OutcomeKind.SUCCEEDED
    assert outcome.body == answer.decode()
    assert outcome.usage == {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}


async def test_run_realtime_sends_one_idempotency_key_per_attempt(make_adapter: Callable[..., OpenAIAdapter]) -> None:
    keys: list[str | None] = []
    answers = iter([httpx2.Response(500, headers={"retry-after-ms": "1"}), httpx2.Response(200, json={"id": "x"})])

    def handler(request: httpx2.Request) -> httpx2.Response:
        keys.append(request.headers.get("Idempotency-Key"))
        return next(answers, httpx2.Response(200, json={"id": "y"}))

    adapter = make_adapter(handler, max_retries=1)
    await adapter.run_realtime("j1", "/v1/chat/completions", "{}", attempt=3)
    assert keys == ["batcher-j1-3", "batcher-j1-3"]  # the SDK's own retry sends the same key
    await adapter.run_realtime("j1", "/v1/chat/completions", "{}")
    assert keys[2] is None  # the SDK sends none of its own


@pytest.mark.parametrize("endpoint", ["/v1/embeddings", "/v1/responses", "/v1/completions"])
async def test_run_realtime_paths(endpoint: str, make_adapter: Callable[..., OpenAIAdapter]) -> None:
    paths: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        paths.append(request.url.path)
        return httpx2.Response(200, json={"object": "x"})

    adapter = make_adapter(handler)
    assert (await adapter.run_realtime("j", endpoint, "{}")).kind is OutcomeKind.SUCCEEDED
    assert paths == [endpoint]


async def test_run_realtime_request_refused_is_failed_outcome(make_adapter: Callable[..., OpenAIAdapter]) -> None:
    error = {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    adapter = make_adapter(lambda request: httpx2.Response(400, json=error))
    outcome = await adapter.run_realtime("j1", "/v1/chat/completions", "{}")
    assert outcome.kind is OutcomeKind.FAILED
    assert outcome.error_code == "context_length_exceeded"
    assert outcome.error_message == "too long"
    assert outcome.status_code == 400
    assert not outcome.retryable
    assert outcome.body is not None and json.loads(outcome.body) == error


@pytest.mark.parametrize("status", [401, 429, 500])
async def test_run_realtime_account_or_transient_errors_raise(
    status: int, make_adapter: Callable[..., OpenAIAdapter]
) -> None:
    adapter = make_adapter(lambda request: httpx2.Response(status, json={"error": {"message": "m"}}), max_retries=0)
    with pytest.raises(ProviderError) as info:
        await adapter.run_realtime("j1", "/v1/chat/completions", "{}")
    assert info.value.retryable is (status != 401)


async def test_run_realtime_non_json_answer(make_adapter: Callable[..., OpenAIAdapter]) -> None:
    adapter = make_adapter(lambda request: httpx2.Response(200, content=b"<html>"))
    with pytest.raises(ProviderError):
        await adapter.run_realtime("j1", "/v1/chat/completions", "{}")


async def test_aclose_without_use_and_twice() -> None:
    adapter = OpenAIAdapter(api_key="sk-x", base_url="http://emu.test/v1")
    await adapter.aclose()
    await adapter.aclose()


async def test_missing_api_key_is_provider_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    adapter = OpenAIAdapter(api_key=None, base_url="http://emu.test/v1")
    with pytest.raises(ProviderError) as info:
        await adapter.retrieve("batch_1")
    assert not info.value.retryable
    await adapter.aclose()
