"""The emulator's Anthropic Message Batches API, driven by the official ``anthropic`` SDK over real HTTP.

Every MessageBatch and results line fetched raw is also checked against the shapes in the SDK's types (the API's
published schema): field names, types, RFC 3339 timestamps, counts that stay 0 until the batch ends.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
from anthropic import AsyncAnthropic, DefaultAioHttpClient
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse

from batcher.emulator import EmulatorSettings, serve_emulator

MODEL = "claude-emulated-1"  # a name the SDK does not warn about as deprecated
BATCH_KEYS = {
    "id",
    "type",
    "processing_status",
    "request_counts",
    "ended_at",
    "created_at",
    "expires_at",
    "archived_at",
    "cancel_initiated_at",
    "results_url",
}
COUNT_KEYS = {"processing", "succeeded", "errored", "canceled", "expired"}
USAGE_KEYS = {"input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"}


# ------------------------------------------------------------------------------------------- harness


@dataclass
class Emulator:
    """A running emulator with an Anthropic SDK client and a raw HTTP session (sending ``x-api-key``)."""

    root: str
    client: AsyncAnthropic
    http: aiohttp.ClientSession

    async def raw(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
        """Call ``{root}{path}``; return status, headers and the JSON body (``None`` if not JSON)."""
        async with self.http.request(method, self.root + path, **kwargs) as response:
            text = await response.text()
            try:
                body = json.loads(text) if text else None
            except json.JSONDecodeError:
                body = text
            return response.status, response.headers, body

    async def stats(self) -> dict[str, Any]:
        status, _, body = await self.raw("GET", "/_emulator/stats")
        assert status == 200
        return dict(body)


EmulatorFactory = Callable[..., AbstractAsyncContextManager[Emulator]]


@pytest.fixture
def emulator(tmp_path: Path) -> EmulatorFactory:
    """``async with emulator(latency_s=0, ...) as emu``: a fresh emulator under ``tmp_path``."""
    counter = itertools.count()

    @asynccontextmanager
    async def factory(*, max_retries: int = 0, **settings: Any) -> AsyncIterator[Emulator]:
        settings.setdefault("latency_s", 0)
        settings.setdefault("seed", 3)
        settings.setdefault("data_dir", tmp_path / "emu" / str(next(counter)))
        async with serve_emulator(EmulatorSettings(**settings)) as url:
            root = url.removesuffix("/v1")
            client = AsyncAnthropic(
                api_key="sk-ant-test", base_url=root, http_client=DefaultAioHttpClient(), max_retries=max_retries
            )
            http = aiohttp.ClientSession(headers={"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"})
            try:
                yield Emulator(root, client, http)
            finally:
                await http.close()
                await client.close()

    return factory


def params(n: int | str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": f"hello {n}"}], **extra}


def requests_for(custom_ids: list[str], **extra: Any) -> list[dict[str, Any]]:
    return [{"custom_id": cid, "params": params(cid, **extra)} for cid in custom_ids]


def ids(n: int, prefix: str = "req") -> list[str]:
    return [f"{prefix}-{i:03d}" for i in range(n)]


def rfc3339(value: object) -> datetime:
    assert isinstance(value, str) and value.endswith("Z"), value
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None
    return parsed


def check_batch(body: dict[str, Any]) -> None:
    """Fail unless ``body`` is a MessageBatch as the API documents it."""
    assert set(body) == BATCH_KEYS, set(body) ^ BATCH_KEYS
    assert body["type"] == "message_batch" and body["id"].startswith("msgbatch_")
    assert body["processing_status"] in ("in_progress", "canceling", "ended")
    counts = body["request_counts"]
    assert set(counts) == COUNT_KEYS and all(isinstance(v, int) and v >= 0 for v in counts.values())
    created = rfc3339(body["created_at"])
    assert rfc3339(body["expires_at"]) - created == timedelta(hours=24)
    assert body["archived_at"] is None
    if body["cancel_initiated_at"] is not None:
        rfc3339(body["cancel_initiated_at"])
    if body["processing_status"] == "ended":
        assert rfc3339(body["ended_at"]) >= created
        assert counts["processing"] == 0
        assert isinstance(body["results_url"], str) and body["results_url"].endswith(f"/{body['id']}/results")
    else:
        assert body["ended_at"] is None and body["results_url"] is None
        assert counts["processing"] > 0 and sum(counts.values()) == counts["processing"]
    MessageBatch.model_validate(body)


def check_message(message: dict[str, Any]) -> None:
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["id"].startswith("msg_")
    assert message["content"] and message["content"][0]["type"] == "text" and message["content"][0]["text"]
    assert message["stop_reason"] in ("end_turn", "max_tokens", "stop_sequence")
    assert set(message["usage"]) >= USAGE_KEYS
    assert message["usage"]["output_tokens"] >= 1


async def create_raw(emu: Emulator, requests: list[dict[str, Any]]) -> dict[str, Any]:
    status, headers, body = await emu.raw("POST", "/v1/messages/batches", json={"requests": requests})
    assert status == 200, body
    assert headers["request-id"].startswith("req_")
    check_batch(body)
    return dict(body)


async def wait_ended(emu: Emulator, batch_id: str, timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        status, _, body = await emu.raw("GET", f"/v1/messages/batches/{batch_id}")
        assert status == 200, body
        check_batch(body)
        if body["processing_status"] == "ended":
            return dict(body)
        assert asyncio.get_running_loop().time() < deadline, f"batch stuck in {body['processing_status']}"
        await asyncio.sleep(0.02)


async def raw_results(emu: Emulator, batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The results file, fetched from ``results_url`` as the SDK does; every line is shape-checked."""
    async with emu.http.get(batch["results_url"], headers={"Accept": "application/binary"}) as response:
        assert response.status == 200
        text = await response.text()
    lines = [json.loads(line) for line in text.splitlines() if line]
    for line in lines:
        MessageBatchIndividualResponse.model_validate(line)
        result = line["result"]
        if result["type"] == "succeeded":
            check_message(result["message"])
        elif result["type"] == "errored":
            assert result["error"]["type"] == "error"
            assert set(result["error"]["error"]) == {"type", "message"}
        else:
            assert result == {"type": result["type"]} and result["type"] in ("canceled", "expired")
    return lines


async def sdk_results(emu: Emulator, batch_id: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async for line in await emu.client.messages.batches.results(batch_id):
        assert line.custom_id not in results
        results[line.custom_id] = line.result
    return results


# ------------------------------------------------------------------------------------------- happy path


async def test_round_trip_through_the_sdk(emulator: EmulatorFactory) -> None:
    custom_ids = ids(30)
    async with emulator() as emu:
        created = await emu.client.messages.batches.create(requests=requests_for(custom_ids))  # type: ignore[arg-type]
        assert created.processing_status == "in_progress"
        assert created.request_counts.processing == 30 and created.results_url is None
        assert created.expires_at - created.created_at == timedelta(hours=24)

        ended = await wait_ended(emu, created.id)
        assert ended["request_counts"] == {"processing": 0, "succeeded": 30, "errored": 0, "canceled": 0, "expired": 0}
        assert ended["results_url"] == f"{emu.root}/v1/messages/batches/{created.id}/results"

        retrieved = await emu.client.messages.batches.retrieve(created.id)
        assert retrieved.processing_status == "ended" and retrieved.ended_at is not None

        results = await sdk_results(emu, created.id)
        assert set(results) == set(custom_ids)
        for result in results.values():
            assert result.type == "succeeded"
            assert result.message.model == MODEL and result.message.usage.service_tier == "batch"

        lines = await raw_results(emu, ended)
        order = [line["custom_id"] for line in lines]
        assert sorted(order) == sorted(custom_ids) and order != custom_ids  # results come out of order


async def test_results_header_and_request_id(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        batch = await wait_ended(emu, (await create_raw(emu, requests_for(ids(2))))["id"])
        async with emu.http.get(batch["results_url"]) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/binary"
            assert response.headers["request-id"].startswith("req_")


async def test_counts_stay_zero_until_the_batch_ends(emulator: EmulatorFactory) -> None:
    async with emulator(latency_s=1.0, error_rate=0.5) as emu:
        created = await create_raw(emu, requests_for(ids(12)))
        status, _, body = await emu.raw("GET", f"/v1/messages/batches/{created['id']}")
        assert status == 200 and body["processing_status"] == "in_progress"
        assert body["request_counts"] == {"processing": 12, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        assert body["results_url"] is None and body["ended_at"] is None

        with pytest.raises(anthropic.AnthropicError, match="results_url"):
            await emu.client.messages.batches.results(created["id"])
        status, _, body = await emu.raw("GET", f"/v1/messages/batches/{created['id']}/results")
        assert status == 400 and body["error"]["type"] == "invalid_request_error"

        ended = await wait_ended(emu, created["id"])
        counts = ended["request_counts"]
        assert counts["processing"] == 0 and counts["succeeded"] + counts["errored"] == 12
        assert counts["succeeded"] and counts["errored"]


async def test_same_seed_same_answers(emulator: EmulatorFactory) -> None:
    texts: list[dict[str, str]] = []
    for _ in range(2):
        async with emulator(seed=11) as emu:
            batch = await wait_ended(emu, (await create_raw(emu, requests_for(ids(5))))["id"])
            lines = await raw_results(emu, batch)
            texts.append({line["custom_id"]: line["result"]["message"]["content"][0]["text"] for line in lines})
    assert texts[0] == texts[1]


# ------------------------------------------------------------------------------------------- cancel, delete


async def test_cancel_then_canceling_then_ended_with_canceled_results(emulator: EmulatorFactory) -> None:
    async with emulator(latency_s=3.0) as emu:
        created = await create_raw(emu, requests_for(ids(10)))
        canceling = await emu.client.messages.batches.cancel(created["id"])
        assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None
        assert canceling.request_counts.processing == 10 and canceling.results_url is None

        again = await emu.client.messages.batches.cancel(created["id"])  # still canceling: answered as is
        assert again.processing_status == "canceling" and again.cancel_initiated_at == canceling.cancel_initiated_at

        ended = await wait_ended(emu, created["id"])
        assert ended["cancel_initiated_at"] is not None
        assert ended["request_counts"]["canceled"] > 0
        assert ended["request_counts"]["canceled"] + ended["request_counts"]["succeeded"] == 10
        results = await raw_results(emu, ended)
        assert {line["custom_id"] for line in results} == set(ids(10))
        assert sum(line["result"]["type"] == "canceled" for line in results) == ended["request_counts"]["canceled"]

        with pytest.raises(anthropic.BadRequestError, match="already ended"):
            await emu.client.messages.batches.cancel(created["id"])


async def test_delete_only_once_ended(emulator: EmulatorFactory) -> None:
    async with emulator(latency_s=0.5) as emu:
        created = await create_raw(emu, requests_for(ids(3)))
        with pytest.raises(anthropic.BadRequestError, match="can be deleted once it has ended"):
            await emu.client.messages.batches.delete(created["id"])
        await wait_ended(emu, created["id"])
        deleted = await emu.client.messages.batches.delete(created["id"])
        assert deleted.id == created["id"] and deleted.type == "message_batch_deleted"
        with pytest.raises(anthropic.NotFoundError):
            await emu.client.messages.batches.retrieve(created["id"])
        status, _, body = await emu.raw("GET", f"/v1/messages/batches/{created['id']}/results")
        assert status == 404 and body["error"]["type"] == "not_found_error"


# ------------------------------------------------------------------------------------------- create-time validation


def _body_with(index: int, request: Any, count: int = 5) -> dict[str, Any]:
    requests: list[Any] = requests_for(ids(count))
    requests[index] = request
    return {"requests": requests}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_body_with(3, {"custom_id": "has space", "params": params(1)}), "requests.3.custom_id: String should match"),
        (
            _body_with(3, {"custom_id": "x" * 65, "params": params(1)}),
            "requests.3.custom_id: String should have at most",
        ),
        (_body_with(2, {"custom_id": "", "params": params(1)}), "requests.2.custom_id: String should have at least"),
        (_body_with(3, {"custom_id": 7, "params": params(1)}), "requests.3.custom_id: Input should be a valid string"),
        (_body_with(4, {"custom_id": "req-001", "params": params(1)}), "requests.4.custom_id: Duplicate custom_id"),
        (_body_with(1, {"params": params(1)}), "requests.1.custom_id: Field required"),
        (_body_with(3, {"custom_id": "ok"}), "requests.3.params: Field required"),
        (_body_with(3, {"custom_id": "ok", "params": "text"}), "requests.3.params: Input should be a valid dictionary"),
        (_body_with(0, {"custom_id": "ok", "params": {}, "x": 1}), "requests.0.x: Extra inputs are not permitted"),
        (_body_with(2, "not an object"), "requests.2: Input should be a valid dictionary"),
        ({"requests": []}, "requests: List should have at least 1 item"),
        ({}, "requests: Field required"),
        ({"requests": {"custom_id": "a"}}, "requests: Input should be a valid list"),
        ({"requests": 5}, "requests: Input should be a valid list"),
        ({"requests": requests_for(ids(1)), "metadata": {}}, "metadata: Extra inputs are not permitted"),
        ([1, 2], "must be a JSON object"),
    ],
)
async def test_create_time_errors_name_the_field(emulator: EmulatorFactory, body: Any, message: str) -> None:
    async with emulator() as emu:
        status, headers, answer = await emu.raw("POST", "/v1/messages/batches", json=body)
        assert status == 400, answer
        assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
        assert answer["error"]["message"].startswith(message) or message in answer["error"]["message"], answer
        assert answer["request_id"] == headers["request-id"]
        assert (await emu.stats())["batches_created"] == 0
        _, _, listing = await emu.raw("GET", "/v1/messages/batches")
        assert listing["data"] == []


async def test_sdk_sees_create_time_errors_as_bad_request(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        with pytest.raises(anthropic.BadRequestError) as info:
            await emu.client.messages.batches.create(
                requests=[{"custom_id": "a/b", "params": params(1)}]  # type: ignore[list-item]
            )
        assert info.value.type == "invalid_request_error"
        assert info.value.api_message is not None and info.value.api_message.startswith("requests.0.custom_id")


async def test_bad_json_and_limits(emulator: EmulatorFactory) -> None:
    async with emulator(anthropic_max_requests=3, anthropic_max_bytes=4096) as emu:
        status, _, body = await emu.raw("POST", "/v1/messages/batches", data=b'{"requests": [{"custom_id": "a",')
        assert status == 400 and "not valid JSON" in body["error"]["message"]

        status, _, body = await emu.raw("POST", "/v1/messages/batches", json={"requests": requests_for(ids(5))})
        assert status == 400
        assert body["error"]["message"] == "requests: List should have at most 3 items after validation, not 5"

        big = requests_for(ids(3), system="x" * 5000)
        status, _, body = await emu.raw("POST", "/v1/messages/batches", json={"requests": big})
        assert status == 413 and body["error"]["type"] == "request_too_large"

        ok = await create_raw(emu, requests_for(ids(3)))
        assert ok["request_counts"]["processing"] == 3
        assert (await emu.stats())["batches_created"] == 1


async def test_pretty_printed_and_escaped_bodies_are_read(emulator: EmulatorFactory) -> None:
    tricky = [
        {"custom_id": "a", "params": params('brackets ] } [ { and , : in "quotes" \\ and \u00e9')},
        {"custom_id": "b", "params": params("line\nbreak")},
    ]
    async with emulator() as emu:
        payload = json.dumps({"requests": tricky}, indent=2).encode()
        status, _, body = await emu.raw(
            "POST", "/v1/messages/batches", data=payload, headers={"Content-Type": "application/json"}
        )
        assert status == 200, body
        results = await raw_results(emu, await wait_ended(emu, body["id"]))
        assert {line["custom_id"]: line["result"]["type"] for line in results} == {"a": "succeeded", "b": "succeeded"}


# ------------------------------------------------------------------------------------------- asynchronous params checks


async def test_bad_params_become_errored_results(emulator: EmulatorFactory) -> None:
    good = params("ok")
    bad = {
        "no-model": {k: v for k, v in good.items() if k != "model"},
        "zero-max-tokens": {**good, "max_tokens": 0},
        "no-messages": {k: v for k, v in good.items() if k != "messages"},
        "streaming": {**good, "stream": True},
    }
    expected = {
        "no-model": "model: Field required",
        "zero-max-tokens": "max_tokens: Input should be greater than or equal to 1",
        "no-messages": "messages: Field required",
        "streaming": "stream:",
    }
    async with emulator() as emu:
        requests = [{"custom_id": "ok", "params": good}] + [{"custom_id": k, "params": v} for k, v in bad.items()]
        created = await create_raw(emu, requests)  # params are not checked at create time
        ended = await wait_ended(emu, created["id"])
        assert ended["request_counts"]["errored"] == 4 and ended["request_counts"]["succeeded"] == 1
        results = {line["custom_id"]: line["result"] for line in await raw_results(emu, ended)}
        assert results["ok"]["type"] == "succeeded"
        for custom_id, message in expected.items():
            error = results[custom_id]["error"]["error"]
            assert results[custom_id]["type"] == "errored"
            assert error["type"] == "invalid_request_error" and error["message"].startswith(message), error


# ------------------------------------------------------------------------------------------- prompt caching


async def test_cache_control_reports_cache_tokens(emulator: EmulatorFactory) -> None:
    system = [{"type": "text", "text": "You are a careful assistant. " * 40, "cache_control": {"type": "ephemeral"}}]
    long_ttl = {
        "model": MODEL,
        "max_tokens": 16,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "shared document " * 50,
                        "cache_control": {"type": "ephemeral", "ttl": "1h"},
                    },
                    {"type": "text", "text": "question"},
                ],
            }
        ],
    }
    requests = [{"custom_id": f"cached-{i}", "params": params(i, system=system)} for i in range(3)]
    requests += [{"custom_id": "plain", "params": params("plain")}, {"custom_id": "hour", "params": long_ttl}]
    async with emulator() as emu:
        batch = await wait_ended(emu, (await create_raw(emu, requests))["id"])
        usage = {line["custom_id"]: line["result"]["message"]["usage"] for line in await raw_results(emu, batch)}

    assert usage["plain"]["cache_creation_input_tokens"] == usage["plain"]["cache_read_input_tokens"] == 0
    prefix = usage["cached-0"]["cache_creation_input_tokens"]
    assert prefix > 0 and usage["cached-0"]["cache_read_input_tokens"] == 0  # the first request writes the cache
    assert usage["cached-0"]["cache_creation"] == {"ephemeral_5m_input_tokens": prefix, "ephemeral_1h_input_tokens": 0}
    for later in ("cached-1", "cached-2"):  # the others read it
        assert usage[later]["cache_read_input_tokens"] == prefix and usage[later]["cache_creation_input_tokens"] == 0
        assert usage[later]["input_tokens"] < prefix  # input_tokens counts only what follows the prefix
    assert usage["hour"]["cache_creation"]["ephemeral_1h_input_tokens"] == usage["hour"]["cache_creation_input_tokens"]
    assert usage["hour"]["cache_creation_input_tokens"] > 0


# ------------------------------------------------------------------------------------------- fault knobs


async def test_error_rate_mixes_retryable_and_permanent_errors(emulator: EmulatorFactory) -> None:
    async with emulator(error_rate=1.0) as emu:
        batch = await wait_ended(emu, (await create_raw(emu, requests_for(ids(8))))["id"])
        assert batch["request_counts"]["errored"] == 8
        lines = await raw_results(emu, batch)
        types = {line["result"]["error"]["error"]["type"] for line in lines}
        assert types == {"rate_limit_error", "overloaded_error", "api_error", "invalid_request_error"}
        assert all(line["result"]["error"]["request_id"].startswith("req_") for line in lines)


async def test_expire_rate_ends_with_part_expired(emulator: EmulatorFactory) -> None:
    async with emulator(expire_rate=1.0) as emu:
        batch = await wait_ended(emu, (await create_raw(emu, requests_for(ids(20))))["id"])
        counts = batch["request_counts"]
        assert 0 < counts["expired"] < 20 and counts["succeeded"] == 20 - counts["expired"]
        assert batch["cancel_initiated_at"] is None
        lines = await raw_results(emu, batch)
        assert sum(line["result"]["type"] == "expired" for line in lines) == counts["expired"]


async def test_api_error_rate_injects_anthropic_errors(emulator: EmulatorFactory) -> None:
    async with emulator(api_error_rate=1.0) as emu:
        seen: dict[int, dict[str, Any]] = {}
        for _ in range(3):
            status, headers, body = await emu.raw("GET", "/v1/messages/batches")
            seen[status] = {"headers": headers, "body": body}
        assert set(seen) == {429, 529, 500}
        assert seen[429]["body"]["error"]["type"] == "rate_limit_error"
        assert seen[429]["headers"]["retry-after"] == "1"
        assert seen[529]["body"]["error"]["type"] == "overloaded_error"
        assert seen[500]["body"]["error"]["type"] == "api_error"
        for answer in seen.values():
            assert answer["body"]["type"] == "error"
        with pytest.raises(anthropic.RateLimitError):
            await emu.client.messages.batches.list()
        assert (await emu.stats())["api_errors_injected"] == 4


async def test_sdk_retries_through_injected_faults(emulator: EmulatorFactory) -> None:
    # seed 1 faults the 1st call (the create: a 429, retried after its retry-after) and the 4th (a 529)
    async with emulator(api_error_rate=0.3, seed=1, max_retries=3) as emu:
        created = await emu.client.messages.batches.create(requests=requests_for(ids(4)))  # type: ignore[arg-type]
        for _ in range(3):
            assert (await emu.client.messages.batches.retrieve(created.id)).id == created.id
        stats = await emu.stats()
        assert stats["api_errors_injected"] == 2 and stats["batches_created"] == 1


# ------------------------------------------------------------------------------------------- auth, routes


async def test_requests_without_api_key_get_401(emulator: EmulatorFactory) -> None:
    async with emulator() as emu, aiohttp.ClientSession() as bare:
        for method, path in (("GET", "/v1/messages/batches"), ("POST", "/v1/messages"), ("GET", "/v1/messages/x")):
            async with bare.request(method, emu.root + path) as response:
                assert response.status == 401
                body = await response.json()
                assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
        async with bare.get(emu.root + "/v1/messages/batches", headers={"x-api-key": "k"}) as response:
            assert response.status == 200
        async with bare.get(emu.root + "/v1/messages/batches", headers={"Authorization": "Bearer k"}) as response:
            assert response.status == 200  # what the anthropic 2.x SDK sends


async def test_unknown_ids_and_routes_are_404_and_openai_is_untouched(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        with pytest.raises(anthropic.NotFoundError):
            await emu.client.messages.batches.retrieve("msgbatch_nope")
        status, _, body = await emu.raw("GET", "/v1/messages/count_tokens")
        assert status == 404 and body["error"]["type"] == "not_found_error"
        status, _, body = await emu.raw("PUT", "/v1/messages/batches")
        assert status == 405 and body["type"] == "error"
        # the OpenAI side keeps its own auth and error format
        status, _, body = await emu.raw("GET", "/v1/batches")
        assert status == 401 and "error" in body and "type" not in body
        status, _, body = await emu.raw("GET", "/v1/batches", headers={"Authorization": "Bearer k"})
        assert status == 200 and body["object"] == "list"


# ------------------------------------------------------------------------------------------- listing, stats


async def test_list_pagination_newest_first(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        made = [(await create_raw(emu, requests_for(ids(1, f"b{n}"))))["id"] for n in range(5)]
        newest_first = made[::-1]

        status, _, page = await emu.raw("GET", "/v1/messages/batches", params={"limit": "2"})
        assert status == 200 and set(page) == {"data", "has_more", "first_id", "last_id"}
        assert [b["id"] for b in page["data"]] == newest_first[:2] and page["has_more"] is True
        assert page["first_id"] == newest_first[0] and page["last_id"] == newest_first[1]
        for batch in page["data"]:
            check_batch(batch)

        _, _, page = await emu.raw("GET", "/v1/messages/batches", params={"limit": "2", "after_id": newest_first[1]})
        assert [b["id"] for b in page["data"]] == newest_first[2:4] and page["has_more"] is True
        _, _, page = await emu.raw("GET", "/v1/messages/batches", params={"limit": "2", "after_id": newest_first[3]})
        assert [b["id"] for b in page["data"]] == newest_first[4:] and page["has_more"] is False
        _, _, page = await emu.raw("GET", "/v1/messages/batches", params={"limit": "2", "before_id": newest_first[4]})
        assert [b["id"] for b in page["data"]] == newest_first[2:4] and page["has_more"] is True
        _, _, page = await emu.raw("GET", "/v1/messages/batches", params={"limit": "5", "before_id": newest_first[1]})
        assert [b["id"] for b in page["data"]] == newest_first[:1] and page["has_more"] is False

        listed = [b.id async for b in emu.client.messages.batches.list(limit=2)]  # the SDK follows after_id
        assert listed == newest_first
        backwards = emu.client.messages.batches.list(limit=1, before_id=newest_first[3])
        assert [b.id async for b in backwards] == newest_first[:3][::-1]

        for query, message in (
            ({"limit": "0"}, "limit: Input should be greater than or equal to 1"),
            ({"limit": "1001"}, "limit: Input should be less than or equal to 1000"),
            ({"after_id": "msgbatch_nope"}, "after_id"),
        ):
            status, _, body = await emu.raw("GET", "/v1/messages/batches", params=query)
            assert status == 400 and body["error"]["message"].startswith(message), body


async def test_stats_count_both_apis_and_reset_forgets_anthropic_batches(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        first = await create_raw(emu, requests_for(["shared", "only-anthropic"]))
        await create_raw(emu, requests_for(["shared"]))
        openai_line = {
            "custom_id": "shared",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        }
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", (json.dumps(openai_line) + "\n").encode(), filename="in.jsonl")
        bearer = {"Authorization": "Bearer k"}
        status, _, uploaded = await emu.raw("POST", "/v1/files", data=form, headers=bearer)
        assert status == 200, uploaded
        status, _, _ = await emu.raw(
            "POST",
            "/v1/batches",
            json={"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
            headers=bearer,
        )
        assert status == 200

        stats = await emu.stats()
        assert stats["batches_created"] == 3
        assert stats["requests_by_custom_id"] == {"shared": 3, "only-anthropic": 1}

        status, _, _ = await emu.raw("POST", "/_emulator/reset")
        assert status == 200
        stats = await emu.stats()
        assert stats["batches_created"] == 0 and stats["requests_by_custom_id"] == {}
        _, _, listing = await emu.raw("GET", "/v1/messages/batches")
        assert listing["data"] == []
        status, _, _ = await emu.raw("GET", f"/v1/messages/batches/{first['id']}")
        assert status == 404
        again = await create_raw(emu, requests_for(ids(1)))
        assert (await wait_ended(emu, again["id"]))["request_counts"]["succeeded"] == 1


# ------------------------------------------------------------------------------------------- real-time and size


async def test_real_time_messages_use_the_same_fake_model(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        message = await emu.client.messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hello"}]
        )
        assert message.type == "message" and message.role == "assistant" and message.model == MODEL
        assert message.usage.output_tokens <= 5 and message.usage.service_tier == "standard"
        assert message.id.startswith("msg_")

        with pytest.raises(anthropic.BadRequestError) as info:
            await emu.client.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "x"}])
        assert info.value.api_message == "max_tokens: Input should be greater than or equal to 1"
        status, _, body = await emu.raw("POST", "/v1/messages", json={**params(1), "stream": True})
        assert status == 400 and body["error"]["message"].startswith("stream:")
        status, _, body = await emu.raw("POST", "/v1/messages", data=b"{nope")
        assert status == 400 and body["error"]["type"] == "invalid_request_error"


async def test_real_time_message_with_an_idempotency_key_is_answered_once(emulator: EmulatorFactory) -> None:
    key = {"Idempotency-Key": "batcher-job-1-1"}
    async with emulator(idempotency_keys=True) as emu:
        first = await emu.client.messages.with_raw_response.create(**params(1), extra_headers=key)
        again = await emu.client.messages.with_raw_response.create(**params(1), extra_headers=key)
        assert await again.read() == await first.read() and again.headers["Idempotent-Replayed"] == "true"
        other = await emu.client.messages.create(**params(1), extra_headers={"Idempotency-Key": "batcher-job-1-2"})
        assert other.id != (await first.parse()).id
        stats = await emu.stats()
        assert stats["realtime_answers"] == 2 and stats["realtime_replays"] == 1

        # the key with another request: refused in Anthropic's shape, nothing answered
        status, headers, body = await emu.raw("POST", "/v1/messages", json=params(2), headers=key)
        assert status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert body["request_id"] == headers["request-id"] and "Idempotency-Key" in body["error"]["message"]
        assert (await emu.stats())["realtime_answers"] == 2


# The SDK serializes ``requests`` into one bytes body, and aiohttp warns about sending a large one (the batcher adapter
# streams its body from disk instead, see test_anthropic_adapter_emulator.py).
@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
async def test_a_large_batch_through_the_sdk(emulator: EmulatorFactory) -> None:
    custom_ids = ids(20_000)
    async with emulator() as emu:
        created = await emu.client.messages.batches.create(requests=requests_for(custom_ids))  # type: ignore[arg-type]
        assert created.request_counts.processing == 20_000
        await wait_ended(emu, created.id, timeout_s=60)
        seen = 0
        async for line in await emu.client.messages.batches.results(created.id):
            assert line.result.type == "succeeded"
            seen += 1
        assert seen == 20_000
        stats = await emu.stats()
        assert len(stats["requests_by_custom_id"]) == 20_000
