"""The OpenAI batch emulator, driven by the official ``openai`` SDK over real HTTP on 127.0.0.1.

Every Batch, File and list answer and every output/error line is also fetched raw and validated
against OpenAI's published schemas (tests/data/openai-batch-schemas.json).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import jsonschema
import openai
import pytest
from openai import AsyncOpenAI, DefaultAioHttpClient

from batcher.emulator import EmulatorSettings, run_emulator, serve_emulator

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "data" / "openai-batch-schemas.json"
TERMINAL = {"completed", "failed", "expired", "cancelled"}
CHAT: Final = "/v1/chat/completions"


# ------------------------------------------------------------------------------------------- schemas


def _openapi_to_json_schema(node: Any) -> Any:
    """Translate OpenAI's OpenAPI dialect into plain JSON Schema.

    Two OpenAPI conventions have no JSON Schema equivalent and would reject the live API's own answers:
    ``nullable: true`` (OpenAPI 3.0, used by BatchRequestOutput's ``response`` and ``error``), and
    optional properties sent as explicit ``null`` when they have no value (the API reference types them
    "optional ... or null"; the spec's own Batch example has ``"errors": null``, ``"failed_at": null``).
    So a property that is optional or ``nullable`` also accepts ``null``; required properties and every
    non-null value are checked as published.
    """
    if isinstance(node, list):
        return [_openapi_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _openapi_to_json_schema(value) for key, value in node.items() if key != "nullable"}
    if isinstance(node.get("properties"), dict):
        required = set(node.get("required", []))
        properties = {}
        for name, sub in node["properties"].items():
            converted = _openapi_to_json_schema(sub)
            if name not in required or sub.get("nullable") is True:
                converted = {"anyOf": [converted, {"type": "null"}]}
            properties[name] = converted
        out["properties"] = properties
    return out


def _validators() -> dict[str, jsonschema.Draft202012Validator]:
    raw = json.loads(SCHEMA_FILE.read_text())
    defs = _openapi_to_json_schema(raw["$defs"])
    validators = {}
    for name in ("Batch", "OpenAIFile", "ListBatchesResponse", "BatchRequestOutput", "BatchError"):
        schema = {"$schema": raw["$schema"], "$defs": defs, "$ref": f"#/$defs/{name}"}
        jsonschema.Draft202012Validator.check_schema(schema)
        validators[name] = jsonschema.Draft202012Validator(schema)
    return validators


VALIDATORS = _validators()


def check(schema: str, instance: Any) -> None:
    """Fail with every violation if ``instance`` does not match OpenAI's schema ``schema``."""
    errors = sorted(VALIDATORS[schema].iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, f"{schema} violations: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_translation_keeps_the_published_constraints() -> None:
    good = {
        "id": "batch_1",
        "object": "batch",
        "endpoint": CHAT,
        "input_file_id": "file-1",
        "completion_window": "24h",
        "status": "completed",
        "created_at": 1,
        "errors": None,
        "failed_at": None,
    }
    check("Batch", good)
    assert list(VALIDATORS["Batch"].iter_errors({**good, "status": "done"}))
    assert list(VALIDATORS["Batch"].iter_errors({**good, "created_at": None}))
    assert list(VALIDATORS["Batch"].iter_errors({**good, "output_file_id": 3}))
    missing = dict(good)
    del missing["input_file_id"]
    assert list(VALIDATORS["Batch"].iter_errors(missing))


# ------------------------------------------------------------------------------------------- harness


@dataclass
class Emulator:
    """A running emulator with an SDK client and a raw HTTP session."""

    url: str
    client: AsyncOpenAI
    http: aiohttp.ClientSession

    async def raw(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
        """Call ``/v1{path}`` (or ``/_emulator...`` if ``path`` starts with ``/_``); return status, headers, JSON."""
        base = self.url.removesuffix("/v1")
        full = base + path if path.startswith("/_") else self.url + path
        async with self.http.request(method, full, **kwargs) as response:
            return response.status, response.headers, await response.json(content_type=None)

    async def stats(self) -> dict[str, Any]:
        status, _, body = await self.raw("GET", "/_emulator/stats")
        assert status == 200
        return dict(body)


@asynccontextmanager
async def emulator(max_retries: int = 2, **settings: Any) -> AsyncIterator[Emulator]:
    settings.setdefault("latency_s", 0)
    async with serve_emulator(EmulatorSettings(**settings)) as url:
        client = AsyncOpenAI(api_key="test", base_url=url, http_client=DefaultAioHttpClient(), max_retries=max_retries)
        http = aiohttp.ClientSession(headers={"Authorization": "Bearer test"})
        try:
            yield Emulator(url, client, http)
        finally:
            await http.close()
            await client.close()


def chat_line(custom_id: str, model: str = "gpt-4o-mini", text: str = "hello", **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"{text} {custom_id}"}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": messages, **body},
    }


def jsonl(lines: Iterable[dict[str, Any] | str]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


async def upload(emu: Emulator, lines: Iterable[dict[str, Any] | str], name: str = "input.jsonl") -> str:
    created = await emu.client.files.create(file=(name, jsonl(lines)), purpose="batch")
    return created.id


async def submit(emu: Emulator, lines: Iterable[dict[str, Any] | str], endpoint: str = CHAT, **kwargs: Any) -> str:
    file_id = await upload(emu, lines)
    batch = await emu.client.batches.create(
        input_file_id=file_id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        **kwargs,
    )
    assert batch.status == "validating"
    return batch.id


async def wait_for(emu: Emulator, batch_id: str, statuses: set[str] = TERMINAL, timeout_s: float = 20.0) -> Any:
    """Poll the raw batch until its status is in ``statuses``; return its (schema-checked) JSON."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        status, _, body = await emu.raw("GET", f"/batches/{batch_id}")
        assert status == 200
        check("Batch", body)
        if body["status"] in statuses:
            return body
        assert asyncio.get_running_loop().time() < deadline, f"batch stuck in {body['status']}"
        await asyncio.sleep(0.02)


async def read_lines(emu: Emulator, file_id: str | None) -> list[dict[str, Any]]:
    """Download a result file through the SDK's streaming API; every line is schema-checked."""
    if file_id is None:
        return []
    lines = []
    async with emu.client.files.with_streaming_response.content(file_id) as response:
        async for line in response.iter_lines():
            if line:
                parsed = json.loads(line)
                check("BatchRequestOutput", parsed)
                lines.append(parsed)
    return lines


# ------------------------------------------------------------------------------------------- happy path


async def test_round_trip_through_the_sdk() -> None:
    inputs = [chat_line(f"req-{i}", max_tokens=12) for i in range(40)]
    async with emulator() as emu:
        file_id = await upload(emu, inputs)
        status, _, file_json = await emu.raw("GET", f"/files/{file_id}")
        assert status == 200
        check("OpenAIFile", file_json)
        assert file_json["purpose"] == "batch" and file_json["bytes"] == len(jsonl(inputs))

        status, _, created = await emu.raw(
            "POST",
            "/batches",
            json={
                "input_file_id": file_id,
                "endpoint": CHAT,
                "completion_window": "24h",
                "metadata": {"run": "nightly", "owner": "tests"},
            },
        )
        assert status == 200
        check("Batch", created)
        assert created["status"] == "validating"
        assert created["expires_at"] == created["created_at"] + 24 * 3600
        assert created["output_file_id"] is None and created["errors"] is None

        done = await wait_for(emu, created["id"])
        assert done["status"] == "completed"
        assert done["metadata"] == {"run": "nightly", "owner": "tests"}
        assert done["model"] == "gpt-4o-mini"
        assert done["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
        for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
            assert done[stamp] >= done["created_at"]
        assert done["failed_at"] is None and done["cancelled_at"] is None
        assert done["error_file_id"] is None, "OpenAI sets error_file_id only when some request failed"

        batch = await emu.client.batches.retrieve(created["id"])
        assert batch.output_file_id == done["output_file_id"]
        assert batch.usage is not None and batch.usage.total_tokens > 0

        out = await read_lines(emu, done["output_file_id"])
        ids = [line["custom_id"] for line in out]
        assert sorted(ids) == sorted(line["custom_id"] for line in inputs)
        assert ids != [line["custom_id"] for line in inputs], "output order must not mirror input order"
        for line in out:
            assert line["error"] is None and line["id"].startswith("batch_req_")
            assert line["response"]["status_code"] == 200
            body = line["response"]["body"]
            assert body["object"] == "chat.completion" and body["model"] == "gpt-4o-mini"
            usage = body["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert 1 <= usage["completion_tokens"] <= 12
            assert usage["prompt_tokens_details"]["cached_tokens"] == 0
            assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
            assert body["choices"][0]["message"]["role"] == "assistant"

        usage = done["usage"]
        assert usage["input_tokens"] == sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in out)
        assert usage["output_tokens"] == sum(line["response"]["body"]["usage"]["completion_tokens"] for line in out)
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

        status, _, out_file = await emu.raw("GET", f"/files/{done['output_file_id']}")
        check("OpenAIFile", out_file)
        assert out_file["purpose"] == "batch_output"
        status, _, listing = await emu.raw("GET", "/files")
        assert status == 200 and listing["object"] == "list"
        for item in listing["data"]:
            check("OpenAIFile", item)
        assert [item["id"] for item in listing["data"]] == [done["output_file_id"], file_id]


async def test_same_seed_same_answers() -> None:
    inputs = [chat_line(f"r{i}") for i in range(5)]
    async with emulator(seed=7) as first, emulator(seed=7) as second, emulator(seed=8) as third:
        bodies = []
        for emu in (first, second, third):
            done = await wait_for(emu, await submit(emu, inputs))
            by_id = {
                line["custom_id"]: line["response"]["body"] for line in await read_lines(emu, done["output_file_id"])
            }
            bodies.append({cid: body["choices"][0]["message"]["content"] for cid, body in by_id.items()})
        assert bodies[0] == bodies[1]
        assert bodies[0] != bodies[2]


@pytest.mark.parametrize(
    ("endpoint", "body", "expect_object"),
    [
        ("/v1/responses", {"model": "gpt-5-mini", "input": "Say hi", "max_output_tokens": 200}, "response"),
        ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "b"]}, "text_completion"),
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["one", "two", "three"]}, "list"),
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "just one"}, "list"),
        ("/v1/moderations", {"input": "hello"}, None),
    ],
)
async def test_every_emulated_endpoint(endpoint: str, body: dict[str, Any], expect_object: str | None) -> None:
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": endpoint, "body": body} for i in range(3)]
    async with emulator() as emu:
        done = await wait_for(emu, await submit(emu, lines, endpoint=endpoint))
        assert done["status"] == "completed", done
        out = await read_lines(emu, done["output_file_id"])
        assert sorted(line["custom_id"] for line in out) == ["c0", "c1", "c2"]
        response = out[0]["response"]["body"]
        assert response.get("object") == expect_object
        assert response["model"] == body.get("model", "omni-moderation-latest")
        if endpoint == "/v1/embeddings":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            assert [item["index"] for item in response["data"]] == list(range(len(inputs)))
            assert all(len(item["embedding"]) == 8 for item in response["data"])
            assert set(response["usage"]) == {"prompt_tokens", "total_tokens"}
        if endpoint == "/v1/responses":
            usage = response["usage"]
            assert usage["output_tokens_details"]["reasoning_tokens"] > 0  # gpt-5 reasons
            assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
            assert usage["output_tokens"] <= 200
            assert response["output"][-1]["content"][0]["type"] == "output_text"
            assert (
                done["usage"]["output_tokens_details"]["reasoning_tokens"]
                == 3 * (usage["output_tokens_details"]["reasoning_tokens"])
            )
        if endpoint == "/v1/completions":
            assert len(response["choices"]) == 2  # one per prompt
            assert response["usage"]["completion_tokens"] <= 2 * 16  # legacy default max_tokens


# ------------------------------------------------------------------------------------------- validation


def _line(custom_id: str, **overrides: Any) -> dict[str, Any]:
    line = chat_line(custom_id)
    line.update(overrides)
    return line


@pytest.mark.parametrize(
    ("lines", "settings", "code", "line_no", "param"),
    [
        pytest.param(
            [_line("a"), _line("b"), '{"custom_id": "c", "method": "POST",', _line("d")],
            {},
            "invalid_json_line",
            3,
            None,
            id="bad-json-line-3",
        ),
        pytest.param(
            [_line("a"), chat_line("b", model="gpt-4o")], {}, "model_mismatch", 2, "body.model", id="mixed-models"
        ),
        pytest.param([_line("a"), _line("b", url="/v1/embeddings")], {}, "url_mismatch", 2, "url", id="url-mismatch"),
        pytest.param(
            [_line("a"), _line("b"), _line("a")], {}, "duplicate_custom_id", 3, "custom_id", id="duplicate-custom-id"
        ),
        pytest.param(
            [_line(f"r{i}") for i in range(5)], {"max_requests": 3}, "too_many_tasks", 4, None, id="too-many-lines"
        ),
        pytest.param([_line("a", method="GET")], {}, "invalid_value", 1, "method", id="method-not-post"),
        pytest.param(
            [_line("a"), {"method": "POST", "url": CHAT, "body": {}}],
            {},
            "missing_required_parameter",
            2,
            "custom_id",
            id="missing-custom-id",
        ),
        pytest.param(
            [_line("a"), _line("b", body={"messages": []})],
            {},
            "missing_required_parameter",
            2,
            "body.model",
            id="missing-model",
        ),
        pytest.param([_line("a")], {"max_bytes": 10}, "file_too_large", None, None, id="too-many-bytes"),
        pytest.param([], {}, "empty_file", None, None, id="empty-file"),
    ],
)
async def test_invalid_input_fails_the_batch(
    lines: list[Any], settings: dict[str, Any], code: str, line_no: int | None, param: str | None
) -> None:
    async with emulator(**settings) as emu:
        done = await wait_for(emu, await submit(emu, lines))
        assert done["status"] == "failed"
        assert done["failed_at"] is not None and done["in_progress_at"] is None
        assert done["output_file_id"] is None and done["error_file_id"] is None
        assert done["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
        assert done["errors"]["object"] == "list"
        first = done["errors"]["data"][0]
        check("BatchError", first)
        assert (first["code"], first["line"], first["param"]) == (code, line_no, param)
        assert first["message"]
        batch = await emu.client.batches.retrieve(done["id"])
        assert batch.errors is not None and batch.errors.data is not None
        assert batch.errors.data[0].code == code
        assert (await emu.stats())["requests_by_custom_id"] == {}


async def test_invalid_body_fails_only_that_request() -> None:
    lines = [_line("ok"), _line("bad", body={"model": "gpt-4o-mini", "messages": "not a list"})]
    async with emulator() as emu:
        done = await wait_for(emu, await submit(emu, lines))
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
        (bad,) = await read_lines(emu, done["error_file_id"])
        assert bad["custom_id"] == "bad" and bad["error"] is None
        assert bad["response"]["status_code"] == 400
        assert bad["response"]["body"]["error"]["param"] == "messages"


# ------------------------------------------------------------------------------------------- faults


async def test_error_rate_produces_both_failure_forms() -> None:
    inputs = [chat_line(f"e{i}") for i in range(12)]
    async with emulator(error_rate=1.0) as emu:
        done = await wait_for(emu, await submit(emu, inputs))
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": 12, "completed": 0, "failed": 12}
        assert done["output_file_id"] is None, "no success, so no output file"
        assert done["usage"]["total_tokens"] == 0
        errors = await read_lines(emu, done["error_file_id"])
        assert sorted(line["custom_id"] for line in errors) == sorted(line["custom_id"] for line in inputs)
        http = [line for line in errors if line["response"] is not None]
        top_level = [line for line in errors if line["response"] is None]
        assert http and top_level
        assert {line["response"]["status_code"] for line in http} == {400, 429, 500}
        for line in http:
            assert line["error"] is None
            error = line["response"]["body"]["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert line["response"]["request_id"].startswith("req_")
        codes = {line["response"]["status_code"]: line["response"]["body"]["error"] for line in http}
        assert codes[429]["code"] == "rate_limit_exceeded"
        assert codes[500]["type"] == "server_error"
        assert codes[400]["type"] == "invalid_request_error"
        for line in top_level:
            assert set(line["error"]) == {"code", "message"}


async def test_partial_error_rate_is_reproducible() -> None:
    inputs = [chat_line(f"p{i}") for i in range(60)]
    failed_sets = []
    async with emulator(error_rate=0.3, seed=3) as emu:
        for _ in range(2):
            done = await wait_for(emu, await submit(emu, inputs))
            assert done["request_counts"]["completed"] + done["request_counts"]["failed"] == 60
            assert 0 < done["request_counts"]["failed"] < 60
            failed_sets.append({line["custom_id"] for line in await read_lines(emu, done["error_file_id"])})
            status, _, _ = await emu.raw("POST", "/_emulator/reset")
            assert status == 200
    assert failed_sets[0] == failed_sets[1]


async def test_expired_batch_keeps_finished_work() -> None:
    inputs = [chat_line(f"x{i}") for i in range(20)]
    async with emulator(expire_rate=1.0) as emu:
        done = await wait_for(emu, await submit(emu, inputs))
        assert done["status"] == "expired"
        assert done["expired_at"] is not None and done["completed_at"] is None
        out = await read_lines(emu, done["output_file_id"])
        err = await read_lines(emu, done["error_file_id"])
        assert out and err
        assert sorted(line["custom_id"] for line in out + err) == sorted(line["custom_id"] for line in inputs)
        for line in err:
            assert line["response"] is None
            assert line["error"]["code"] == "batch_expired"
        counts = done["request_counts"]
        assert counts == {"total": 20, "completed": len(out), "failed": 0}
        assert done["usage"]["input_tokens"] == sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in out)


async def test_cancel_while_validating() -> None:
    async with emulator(latency_s=1.0) as emu:
        batch_id = await submit(emu, [chat_line("a"), chat_line("b")])
        cancelling = await emu.client.batches.cancel(batch_id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        again = await emu.client.batches.cancel(batch_id)
        assert again.status == "cancelling"
        done = await wait_for(emu, batch_id)
        assert done["status"] == "cancelled" and done["cancelled_at"] >= done["cancelling_at"]
        assert done["in_progress_at"] is None
        assert done["output_file_id"] is None and done["error_file_id"] is None
        with pytest.raises(openai.BadRequestError, match="Cannot cancel a batch with status 'cancelled'"):
            await emu.client.batches.cancel(batch_id)


async def test_cancel_in_progress_returns_partial_results() -> None:
    inputs = [chat_line(f"k{i}") for i in range(50)]
    async with emulator(latency_s=3.0) as emu:
        batch_id = await submit(emu, inputs)
        await wait_for(emu, batch_id, {"in_progress"})
        await asyncio.sleep(0.5)  # in_progress runs from 0.6 s to 2.4 s after creation
        status, _, cancelling = await emu.raw("POST", f"/batches/{batch_id}/cancel")
        assert status == 200
        check("Batch", cancelling)
        assert cancelling["status"] == "cancelling"
        done = await wait_for(emu, batch_id)
        assert done["status"] == "cancelled"
        out = await read_lines(emu, done["output_file_id"])
        err = await read_lines(emu, done["error_file_id"])
        assert out and err
        assert sorted(line["custom_id"] for line in out + err) == sorted(line["custom_id"] for line in inputs)
        assert {line["error"]["code"] for line in err} == {"batch_cancelled"}
        assert done["request_counts"] == {"total": 50, "completed": len(out), "failed": 0}


async def test_cannot_cancel_a_completed_batch() -> None:
    async with emulator() as emu:
        done = await wait_for(emu, await submit(emu, [chat_line("a")]))
        status, _, body = await emu.raw("POST", f"/batches/{done['id']}/cancel")
        assert status == 400
        assert body["error"]["type"] == "invalid_request_error"


async def test_token_limit_counts_other_active_batches() -> None:
    big = [chat_line(f"t{i}", text="x" * 40) for i in range(5)]  # 5 x ceil(len("xx..x t0") / 4) = 55 tokens
    async with emulator(token_limit=100, latency_s=1.0) as emu:
        first = await submit(emu, big)
        second = await submit(emu, [dict(line, custom_id=line["custom_id"] + "-2") for line in big])
        failed = await wait_for(emu, second)
        assert failed["status"] == "failed"
        (error,) = failed["errors"]["data"]
        assert error == {
            "code": "token_limit_exceeded",
            "message": "Enqueued token limit reached for gpt-4o-mini in organization org-emulator. "
            "Limit: 100 enqueued tokens. Please try again once some in_progress batches have been completed.",
            "param": None,
            "line": None,
        }
        assert (await wait_for(emu, first))["status"] == "completed"
        third = await submit(emu, big)
        assert (await wait_for(emu, third))["status"] == "completed"


async def test_token_limit_rejects_a_batch_too_big_on_its_own() -> None:
    async with emulator(token_limit=10) as emu:
        done = await wait_for(emu, await submit(emu, [chat_line("a", text="y" * 100)]))
        assert done["status"] == "failed"
        assert done["errors"]["data"][0]["code"] == "token_limit_exceeded"


async def test_api_error_rate_injects_429_then_500() -> None:
    async with emulator(api_error_rate=1.0, max_retries=0) as emu:
        with pytest.raises(openai.RateLimitError) as rate_limited:
            await emu.client.batches.list()
        assert rate_limited.value.response.headers["retry-after"] == "1"
        assert rate_limited.value.code == "rate_limit_exceeded"
        with pytest.raises(openai.InternalServerError) as server_error:
            await emu.client.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
        assert server_error.value.type == "server_error"
        status, headers, body = await emu.raw("GET", "/batches")
        assert status == 429 and headers["Retry-After"] == "1"
        assert body["error"]["code"] == "rate_limit_exceeded"
        stats = await emu.stats()
        assert stats["api_errors_injected"] == 3
        assert stats["files_uploaded"] == 0, "an injected failure must have no effect"


async def test_sdk_retries_through_injected_faults() -> None:
    async with emulator(api_error_rate=0.3, seed=1, max_retries=6) as emu:
        batch_id = await submit(emu, [chat_line("a")])
        batch = await emu.client.batches.retrieve(batch_id)
        while batch.status not in TERMINAL:
            batch = await emu.client.batches.retrieve(batch_id)
        assert batch.status == "completed"
        assert batch.output_file_id is not None
        assert len((await emu.client.files.content(batch.output_file_id)).text.splitlines()) == 1
        assert (await emu.stats())["api_errors_injected"] > 0


# ------------------------------------------------------------------------------------------- HTTP surface


async def test_requests_without_key_get_401() -> None:
    async with emulator() as emu, aiohttp.ClientSession() as anonymous:
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Basic abc"}):
            async with anonymous.get(emu.url + "/batches", headers=headers) as response:
                assert response.status == 401
                body = await response.json()
                assert set(body["error"]) == {"message", "type", "param", "code"}
                assert body["error"]["type"] == "invalid_request_error"
        async with anonymous.get(emu.url.removesuffix("/v1") + "/_emulator/stats") as response:
            assert response.status == 200


async def test_unknown_ids_and_routes_are_404() -> None:
    async with emulator() as emu:
        with pytest.raises(openai.NotFoundError):
            await emu.client.batches.retrieve("batch_nope")
        with pytest.raises(openai.NotFoundError):
            await emu.client.batches.cancel("batch_nope")
        with pytest.raises(openai.NotFoundError):
            await emu.client.files.retrieve("file-nope")
        with pytest.raises(openai.NotFoundError):
            await emu.client.files.delete("file-nope")
        for path in ("/files/file-nope/content", "/nothing-here"):
            status, headers, body = await emu.raw("GET", path)
            assert status == 404
            assert body["error"]["type"] == "invalid_request_error"
            assert headers["x-request-id"].startswith("req_")


async def test_list_pagination_newest_first() -> None:
    async with emulator() as emu:
        file_id = await upload(emu, [chat_line("a")])
        created = []
        for _ in range(5):
            batch = await emu.client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
            created.append(batch.id)
        newest_first = created[::-1]

        status, _, page = await emu.raw("GET", "/batches", params={"limit": "2"})
        assert status == 200
        check("ListBatchesResponse", page)
        assert [b["id"] for b in page["data"]] == newest_first[:2]
        assert (page["first_id"], page["last_id"], page["has_more"]) == (newest_first[0], newest_first[1], True)
        status, _, page = await emu.raw("GET", "/batches", params={"limit": "2", "after": page["last_id"]})
        assert [b["id"] for b in page["data"]] == newest_first[2:4] and page["has_more"] is True
        status, _, page = await emu.raw("GET", "/batches", params={"limit": "2", "after": page["last_id"]})
        check("ListBatchesResponse", page)
        assert [b["id"] for b in page["data"]] == newest_first[4:] and page["has_more"] is False

        status, _, page = await emu.raw("GET", "/batches")
        assert len(page["data"]) == 5 and page["has_more"] is False
        assert [b.id async for b in emu.client.batches.list(limit=2)] == newest_first
        for bad in ("0", "101", "ten"):
            status, _, body = await emu.raw("GET", "/batches", params={"limit": bad})
            assert status == 400 and body["error"]["param"] == "limit"


@pytest.mark.parametrize(
    ("override", "param"),
    [
        ({"input_file_id": None}, "input_file_id"),
        ({"input_file_id": 12}, "input_file_id"),
        ({"input_file_id": "file-unknown"}, "input_file_id"),
        ({"endpoint": "/v1/nope"}, "endpoint"),
        ({"endpoint": "/v1/videos"}, "endpoint"),
        ({"completion_window": "48h"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"metadata": {"k": 5}}, "metadata.k"),
        ({"metadata": ["x"]}, "metadata"),
        ({"output_expires_after": {"anchor": "created_at", "seconds": 60}}, "output_expires_after.seconds"),
        ({"surprise": True}, "surprise"),
    ],
)
async def test_bad_create_bodies_are_400_naming_the_field(override: dict[str, Any], param: str) -> None:
    async with emulator() as emu:
        file_id = await upload(emu, [chat_line("a")])
        body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", **override}
        body = {key: value for key, value in body.items() if value is not None}
        status, _, answer = await emu.raw("POST", "/batches", json=body)
        assert status == 400, answer
        assert answer["error"]["param"] == param
        assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]
        assert (await emu.stats())["batches_created"] == 0


async def test_bad_json_and_bad_uploads_are_400() -> None:
    async with emulator() as emu:
        status, _, answer = await emu.raw(
            "POST", "/batches", data=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert status == 400 and "parse the JSON body" in answer["error"]["message"]
        status, _, answer = await emu.raw("POST", "/batches", json=["a list"])
        assert status == 400

        with pytest.raises(openai.BadRequestError, match=r"Must be \.jsonl"):
            await emu.client.files.create(file=("input.txt", b"{}\n"), purpose="batch")
        with pytest.raises(openai.BadRequestError) as bad_purpose:
            await emu.client.files.create(file=("input.jsonl", b"{}\n"), purpose="nonsense")  # type: ignore[arg-type]
        assert bad_purpose.value.param == "purpose"
        form = aiohttp.FormData()
        form.add_field("file", b"{}\n", filename="input.jsonl")
        status, _, answer = await emu.raw("POST", "/files", data=form)
        assert status == 400 and answer["error"]["param"] == "purpose"
        status, _, answer = await emu.raw("POST", "/files", json={"purpose": "batch"})
        assert status == 400

        user_file = await emu.client.files.create(file=("notes.jsonl", b"{}\n"), purpose="user_data")
        status, _, answer = await emu.raw(
            "POST", "/batches", json={"input_file_id": user_file.id, "endpoint": CHAT, "completion_window": "24h"}
        )
        assert status == 400 and answer["error"]["param"] == "input_file_id"
        assert (await emu.stats())["files_uploaded"] == 1


async def test_file_content_delete_and_listing_filters() -> None:
    payload = jsonl([chat_line(f"f{i}") for i in range(3)])
    async with emulator() as emu:
        uploaded = await emu.client.files.create(
            file=("in.jsonl", payload), purpose="batch", expires_after={"anchor": "created_at", "seconds": 7200}
        )
        assert uploaded.expires_at == uploaded.created_at + 7200
        content = await emu.client.files.content(uploaded.id)
        assert content.read() == payload
        other = await emu.client.files.create(file=("x.jsonl", b"{}\n"), purpose="user_data")
        assert [f.id async for f in emu.client.files.list(purpose="batch")] == [uploaded.id]
        assert [f.id async for f in emu.client.files.list(order="asc")] == [uploaded.id, other.id]
        deleted = await emu.client.files.delete(uploaded.id)
        assert deleted.deleted is True and deleted.id == uploaded.id
        with pytest.raises(openai.NotFoundError):
            await emu.client.files.retrieve(uploaded.id)


async def test_deleting_the_input_of_a_running_batch_does_not_break_it() -> None:
    async with emulator(latency_s=0.3) as emu:
        file_id = await upload(emu, [chat_line("a"), chat_line("b")])
        batch = await emu.client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        await emu.client.files.delete(file_id)
        done = await wait_for(emu, batch.id)
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 2


async def test_stats_and_reset() -> None:
    async with emulator() as emu:
        first = await submit(emu, [chat_line("a"), chat_line("b")])
        await wait_for(emu, first)
        second = await submit(emu, [chat_line("a")])
        await wait_for(emu, second)
        stats = await emu.stats()
        assert stats == {
            "batches_created": 2,
            "files_uploaded": 2,
            "requests_by_custom_id": {"a": 2, "b": 1},
            "api_errors_injected": 0,
            "realtime_answers": 0,
            "realtime_replays": 0,
        }
        status, _, _ = await emu.raw("POST", "/_emulator/reset")
        assert status == 200
        assert (await emu.stats())["batches_created"] == 0
        with pytest.raises(openai.NotFoundError):
            await emu.client.batches.retrieve(first)


@pytest.mark.slow
async def test_fifty_thousand_requests() -> None:
    count = 50_000
    lines = (chat_line(f"bulk-{i:05d}", max_tokens=4) for i in range(count))
    async with emulator() as emu:
        batch_id = await submit(emu, lines)
        done = await wait_for(emu, batch_id, timeout_s=100)
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": count, "completed": count, "failed": 0}
        seen: set[str] = set()
        order: list[int] = []
        async with emu.client.files.with_streaming_response.content(done["output_file_id"]) as response:
            async for line in response.iter_lines():
                if line:
                    custom_id = json.loads(line)["custom_id"]
                    seen.add(custom_id)
                    if len(order) < 300:
                        order.append(int(custom_id.split("-")[1]))
        assert len(seen) == count
        assert order != sorted(order)


async def test_real_time_endpoints_use_the_same_fake_models() -> None:
    async with emulator(seed=4) as emu:
        chat = await emu.client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}], max_completion_tokens=5
        )
        assert chat.model == "gpt-4o-mini" and chat.usage is not None
        assert chat.usage.prompt_tokens == 3 and chat.usage.completion_tokens <= 5
        embedding = await emu.client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        assert [len(item.embedding) for item in embedding.data] == [8, 8]
        response = await emu.client.responses.create(model="gpt-4.1-mini", input="hi")
        assert response.output_text and response.usage is not None
        with pytest.raises(openai.BadRequestError) as missing:
            await emu.client.chat.completions.create(model="gpt-4o-mini", messages=[])
        assert missing.value.param == "messages"


async def test_real_time_call_with_an_idempotency_key_is_answered_once() -> None:
    messages = [{"role": "user", "content": "hello there"}]
    key = {"Idempotency-Key": "batcher-job-1-1"}
    async with emulator(idempotency_keys=True) as emu:
        first = await emu.client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=messages, extra_headers=key
        )
        again = await emu.client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=messages, extra_headers=key
        )
        assert again.content == first.content and again.headers["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first.headers
        other = await emu.client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, extra_headers={"Idempotency-Key": "batcher-job-1-2"}
        )
        assert other.id != first.parse().id
        stats = await emu.stats()
        assert stats["realtime_answers"] == 2 and stats["realtime_replays"] == 1

        # the key with another request: refused in OpenAI's shape, nothing answered
        status, _, body = await emu.raw(
            "POST", "/chat/completions", json={"model": "gpt-4o-mini", "messages": []}, headers=key
        )
        assert status == 400 and set(body) == {"error"} and "Idempotency-Key" in body["error"]["message"]
        # a refused call keeps nothing: the key can be sent again, with a body that works
        refused = {"Idempotency-Key": "batcher-job-2-1"}
        status, _, _ = await emu.raw("POST", "/chat/completions", json={"model": "gpt-4o-mini"}, headers=refused)
        assert status == 400
        status, _, _ = await emu.raw(
            "POST", "/chat/completions", json={"model": "gpt-4o-mini", "messages": messages}, headers=refused
        )
        assert status == 200
        stats = await emu.stats()
        assert stats["realtime_answers"] == 3 and stats["realtime_replays"] == 1


async def test_run_emulator_serves_until_cancelled(unused_tcp_port: int) -> None:
    task = asyncio.create_task(run_emulator("127.0.0.1", unused_tcp_port, EmulatorSettings(latency_s=0)))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(f"http://127.0.0.1:{unused_tcp_port}/_emulator/stats") as response:
                        assert response.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.01)
            else:
                pytest.fail("run_emulator never started listening")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
