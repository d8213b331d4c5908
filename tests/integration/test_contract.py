"""One contract, run against every provider adapter over real sockets (saq ``TestQueue`` pattern).

:class:`AdapterContract` holds the test methods; each ``Test…`` subclass says how to build its adapter and
settings, what a request body looks like and what it expects back (limits, discounts, error codes). The same
methods run for OpenAI, Anthropic and an OpenAI-compatible account (``groq``) configured only through
:class:`Settings` and the registry, with its own limits (7 requests per batch) and discount (25%).

Adapter-level methods drive the adapter alone against the emulator; the pipeline method runs the real arq
worker in burst mode on SQLite and PostgreSQL (``db_url``) with real Redis (``redis_url``).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import orjson
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from batcher import Batcher, JobSpec, Provider, Settings
from batcher.config import AccountSettings
from batcher.db import migrate
from batcher.db.engine import Database
from batcher.db.tables import batches, jobs
from batcher.domain import BatchState
from batcher.emulator import EmulatorSettings, serve_emulator
from batcher.errors import ProviderError
from batcher.lifecycle import Pipeline
from batcher.providers import registry
from batcher.providers.anthropic import AnthropicAdapter
from batcher.providers.base import BatchStatus, Limits, Outcome, OutcomeKind, ProviderAdapter
from batcher.providers.limits import ANTHROPIC_LIMITS, OPENAI_LIMITS
from batcher.providers.openai import OpenAIAdapter
from workers.settings import run_worker

API_KEY = "sk-contract-0123456789abcdef"
#: states a batch is in while the provider still works on it
AT_PROVIDER = {BatchState.VALIDATING, BatchState.IN_PROGRESS, BatchState.FINALIZING, BatchState.CANCELLING}
#: jobs run through the pipeline per case: the compatible account (7 per batch) must split them into 5 batches,
#: a count a cap of 6 (6 batches) or 8 (4) would not give
PIPELINE_JOBS = 31


class Emulated:
    """A running emulator: its ``…/v1`` base URL and its stats."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    async def stats(self) -> dict[str, Any]:
        url = self.base_url.removesuffix("/v1") + "/_emulator/stats"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200
            return dict(await resp.json())


EmulatorFactory = Callable[..., AbstractAsyncContextManager[Emulated]]


@pytest.fixture
def emulator(tmp_path: Path) -> EmulatorFactory:
    """``async with emulator(latency_s=…, …) as emu``: an emulator with those knobs, its files under tmp_path."""

    @asynccontextmanager
    async def factory(**knobs: Any) -> AsyncIterator[Emulated]:
        knobs.setdefault("latency_s", 0)
        knobs.setdefault("seed", 7)
        async with serve_emulator(EmulatorSettings(data_dir=tmp_path / "emu", **knobs)) as base_url:
            yield Emulated(base_url)

    return factory


async def wait_done(adapter: ProviderAdapter, provider_batch_id: str, timeout_s: float = 15) -> BatchStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await adapter.retrieve(provider_batch_id)
        if status.state not in AT_PROVIDER:
            return status
        assert time.monotonic() < deadline, f"batch still {status.provider_state}"
        await asyncio.sleep(0.05)


async def collect(adapter: ProviderAdapter, status: BatchStatus) -> dict[str, Outcome]:
    """Every outcome by custom_id; a custom_id that comes back twice fails the test."""
    outcomes: dict[str, Outcome] = {}
    async for outcome in adapter.results(status):
        assert outcome.custom_id not in outcomes, f"{outcome.custom_id} came back twice"
        outcomes[outcome.custom_id] = outcome
    return outcomes


def ids(n: int) -> list[str]:
    return [f"job-{i:04d}" for i in range(n)]


class AdapterContract:
    """What every provider adapter must do. Subclasses fill in the hooks below; pytest collects ``Test…`` ones."""

    #: the account's name (the adapter's ``account``, jobs' ``account``)
    account: ClassVar[str]
    provider: ClassVar[Provider]
    endpoint: ClassVar[str]
    model: ClassVar[str]
    adapter_class: ClassVar[type[ProviderAdapter]]
    expected_limits: ClassVar[Limits]
    #: ``registry.discounts(settings)`` for this account's settings
    expected_discounts: ClassVar[dict[str, Decimal]]
    #: error codes of failed requests that may succeed when sent again, and of those that will not
    retryable_codes: ClassVar[frozenset[str]]
    permanent_codes: ClassVar[frozenset[str]]

    # ------------------------------------------------------------------ hooks

    def account_settings(self, base_url: str) -> dict[str, Any]:
        """The :class:`Settings` fields that configure this account against the emulator at ``base_url``."""
        raise NotImplementedError

    def make_adapter(self, base_url: str, *, max_retries: int = 0) -> ProviderAdapter:
        raise NotImplementedError

    def make_body(self, i: int) -> dict[str, Any]:
        """A provider-native request body (the OpenAI body or the Anthropic params)."""
        raise NotImplementedError

    def expected_line(self, custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """The batch-input line :meth:`ProviderAdapter.encode_line` must produce, parsed."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    def make_settings(self, base_url: str, **over: Any) -> Settings:
        return Settings(**self.account_settings(base_url), **over)

    @asynccontextmanager
    async def adapter_on(
        self, emulator: EmulatorFactory, *, max_retries: int = 0, **knobs: Any
    ) -> AsyncIterator[tuple[ProviderAdapter, Emulated]]:
        async with emulator(**knobs) as emu:
            adapter = self.make_adapter(emu.base_url, max_retries=max_retries)
            try:
                yield adapter, emu
            finally:
                await adapter.aclose()

    async def submit(self, adapter: ProviderAdapter, tmp_path: Path, custom_ids: list[str]) -> BatchStatus:
        path = tmp_path / f"{self.account}-{len(custom_ids)}.jsonl"
        with path.open("wb") as fh:
            for n, cid in enumerate(custom_ids):
                fh.write(adapter.encode_line(cid, self.endpoint, orjson.dumps(self.make_body(n)).decode()))
        file_id = await adapter.upload(path)
        return await adapter.create(
            batch_id=f"ours-{len(custom_ids)}",
            endpoint=self.endpoint,
            model=self.model,
            input_file_id=file_id,
            path=path,
        )

    # ------------------------------------------------------------------ configuration

    async def test_registry_builds_the_account(self) -> None:
        base_url = "http://127.0.0.1:9/v1"  # building makes no call
        settings = self.make_settings(base_url)
        built = registry.build_adapters(settings)
        direct = self.make_adapter(base_url)
        try:
            adapter = built[self.account]
            assert type(adapter) is self.adapter_class
            assert adapter.account == self.account
            assert adapter.limits == self.expected_limits
            assert registry.account_limits(registry.account_settings(settings, self.account)) == self.expected_limits
            assert registry.discounts(settings) == self.expected_discounts
            # the adapter the contract drives is configured like the registry's
            assert type(direct) is type(adapter) and direct.limits == adapter.limits
            assert repr(direct) == repr(adapter)
            if isinstance(adapter, OpenAIAdapter):
                assert isinstance(direct, OpenAIAdapter) and direct.completion_window == adapter.completion_window
        finally:
            await direct.aclose()
            await registry.close_adapters(built)

    # ------------------------------------------------------------------ encode_line

    def test_encode_line_splices_the_body_byte_for_byte(self) -> None:
        adapter = self.make_adapter("http://127.0.0.1:9/v1")  # encoding makes no call
        body = self.make_body(3) | {"temperature": 1.0, "metadata": {"note": 'café ☕ "quoted"\n', "z": [1, 2.50]}}
        # spacing, escapes and number spelling orjson would never produce: any re-serialization would show
        body_json = json.dumps(body, separators=(" , ", " :  "), ensure_ascii=True)
        line = adapter.encode_line("job-x", self.endpoint, body_json)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert line.count(body_json.encode()) == 1, "the stored body must be spliced in as given"
        parsed = orjson.loads(line)
        assert parsed == self.expected_line("job-x", body)
        before, _, after = line.partition(body_json.encode())
        # what surrounds the body is the line's own JSON, nothing else
        assert orjson.loads(before + b"null" + after) == self.expected_line("job-x", None)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ batches

    async def test_results_one_succeeded_outcome_per_custom_id(self, emulator: EmulatorFactory, tmp_path: Path) -> None:
        async with self.adapter_on(emulator, latency_s=0.2) as (adapter, emu):
            created = await self.submit(adapter, tmp_path, ids(12))
            assert created.provider_batch_id
            assert created.state in AT_PROVIDER | {BatchState.ENDED}
            status = await wait_done(adapter, created.provider_batch_id)
            assert status.state is BatchState.ENDED
            assert status.counts.total == 12 and status.counts.succeeded == 12
            outcomes = await collect(adapter, status)
            assert set(outcomes) == set(ids(12))
            for outcome in outcomes.values():
                assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
                assert outcome.body is not None and orjson.loads(outcome.body)["model"] == self.model
                assert outcome.usage, outcome
                assert not outcome.retryable and outcome.error_code is None
            stats = await emu.stats()
            assert stats["batches_created"] == 1
            assert stats["requests_by_custom_id"] == dict.fromkeys(ids(12), 1)

    async def test_failures_are_normalized_with_retryable_set(self, emulator: EmulatorFactory, tmp_path: Path) -> None:
        async with self.adapter_on(emulator, error_rate=1.0) as (adapter, _):
            status = await wait_done(adapter, (await self.submit(adapter, tmp_path, ids(12))).provider_batch_id)
            assert status.state is BatchState.ENDED
            outcomes = await collect(adapter, status)
            assert set(outcomes) == set(ids(12))
            for outcome in outcomes.values():
                assert outcome.kind is OutcomeKind.FAILED, outcome
                assert outcome.error_code and outcome.error_message, outcome
                assert outcome.usage is None
            assert {o.error_code for o in outcomes.values() if o.retryable} == self.retryable_codes
            assert {o.error_code for o in outcomes.values() if not o.retryable} == self.permanent_codes

    async def test_expiry_expires_the_unfinished_part(self, emulator: EmulatorFactory, tmp_path: Path) -> None:
        async with self.adapter_on(emulator, expire_rate=1.0) as (adapter, _):
            status = await wait_done(adapter, (await self.submit(adapter, tmp_path, ids(20))).provider_batch_id)
            # OpenAI ends the batch ``expired``; a Message Batch ends ``ended`` with expired requests
            assert status.state in {BatchState.ENDED, BatchState.EXPIRED}
            outcomes = await collect(adapter, status)
            assert set(outcomes) == set(ids(20))
            assert {o.kind for o in outcomes.values()} == {OutcomeKind.EXPIRED, OutcomeKind.SUCCEEDED}
            for outcome in outcomes.values():
                if outcome.kind is OutcomeKind.EXPIRED:
                    assert outcome.retryable and outcome.body is None and outcome.usage is None
                else:
                    assert outcome.body is not None and outcome.usage

    async def test_cancel(self, emulator: EmulatorFactory, tmp_path: Path) -> None:
        async with self.adapter_on(emulator, latency_s=2.0) as (adapter, _):
            created = await self.submit(adapter, tmp_path, ids(10))
            deadline = time.monotonic() + 10
            while (await adapter.retrieve(created.provider_batch_id)).state is not BatchState.IN_PROGRESS:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            cancelling = await adapter.cancel(created.provider_batch_id)
            assert cancelling.state in {BatchState.CANCELLING, BatchState.CANCELLED}
            status = await wait_done(adapter, created.provider_batch_id)
            assert status.state is BatchState.CANCELLED
            outcomes = await collect(adapter, status)
            # every request is accounted for: cancelled, or the part that had already run
            assert set(outcomes) == set(ids(10))
            assert {o.kind for o in outcomes.values()} <= {OutcomeKind.CANCELLED, OutcomeKind.SUCCEEDED}
            assert any(o.kind is OutcomeKind.CANCELLED for o in outcomes.values())
            assert all(o.usage for o in outcomes.values() if o.kind is OutcomeKind.SUCCEEDED)

    async def test_api_errors_are_retryable_provider_errors(self, emulator: EmulatorFactory, tmp_path: Path) -> None:
        async with self.adapter_on(emulator, api_error_rate=1.0, max_retries=0) as (adapter, emu):
            with pytest.raises(ProviderError) as info:
                await adapter.retrieve("batch_whatever")
            assert info.value.retryable and info.value.provider == self.account
            with pytest.raises(ProviderError) as info:
                await self.submit(adapter, tmp_path, ids(2))
            assert info.value.retryable and info.value.provider == self.account
            assert API_KEY not in str(info.value)
            stats = await emu.stats()
            assert stats["api_errors_injected"] >= 2 and stats["batches_created"] == 0

    async def test_run_realtime(self, emulator: EmulatorFactory) -> None:
        async with self.adapter_on(emulator) as (adapter, _):
            outcome = await adapter.run_realtime("job-rt", self.endpoint, orjson.dumps(self.make_body(1)).decode())
            assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
            assert outcome.custom_id == "job-rt" and outcome.status_code == 200
            assert outcome.body is not None and orjson.loads(outcome.body)["model"] == self.model
            assert outcome.usage

    async def test_run_realtime_is_answered_once_per_attempt(self, emulator: EmulatorFactory) -> None:
        # a worker that died after the answer came sends the same attempt again: the provider must not run it twice
        body = orjson.dumps(self.make_body(1)).decode()
        async with self.adapter_on(emulator, idempotency_keys=True) as (adapter, emu):
            first = await adapter.run_realtime("job-rt", self.endpoint, body, attempt=1)
            again = await adapter.run_realtime("job-rt", self.endpoint, body, attempt=1)
            assert first.kind is OutcomeKind.SUCCEEDED and again == first  # the stored answer, byte for byte
            stats = await emu.stats()
            assert stats["realtime_answers"] == 1 and stats["realtime_replays"] == 1
            # the next attempt is a new call
            third = await adapter.run_realtime("job-rt", self.endpoint, body, attempt=2)
            assert third.kind is OutcomeKind.SUCCEEDED and third.body != first.body
            stats = await emu.stats()
            assert stats["realtime_answers"] == 2 and stats["realtime_replays"] == 1

    async def test_run_realtime_key_is_ignored_like_the_real_apis_by_default(self, emulator: EmulatorFactory) -> None:
        body = orjson.dumps(self.make_body(1)).decode()
        async with self.adapter_on(emulator) as (adapter, emu):
            first = await adapter.run_realtime("job-rt", self.endpoint, body, attempt=1)
            again = await adapter.run_realtime("job-rt", self.endpoint, body, attempt=1)
            assert first.body != again.body
            stats = await emu.stats()
            assert stats["realtime_answers"] == 2 and stats["realtime_replays"] == 0

    # ------------------------------------------------------------------ the pipeline

    async def test_pipeline_burst(self, emulator: EmulatorFactory, db_url: str, redis_url: str, tmp_path: Path) -> None:
        async with emulator(latency_s=0.1) as emu:
            settings = self.make_settings(
                emu.base_url,
                database_url=db_url,
                redis_url=redis_url,
                poll_min_s=0.05,
                poll_max_s=0.2,
                tick_s=1,
            )
            db = Database(db_url)
            await migrate.upgrade(db.engine)
            adapters = registry.build_adapters(settings)
            work_dir = tmp_path / "work"
            work_dir.mkdir()
            pipeline = Pipeline(db, settings, adapters, work_dir=work_dir)
            try:
                specs = [
                    JobSpec(
                        provider=self.provider,
                        account=self.account,
                        endpoint=self.endpoint,
                        model=self.model,
                        custom_id=f"c{i}",
                        body=self.make_body(i),
                    )
                    for i in range(PIPELINE_JOBS)
                ]
                async with Batcher(settings, migrate=False) as b:
                    job_ids = await b.enqueue_many(specs)
                await asyncio.wait_for(run_worker(settings, burst=True, pipeline=pipeline), 45)

                async with db.engine.connect() as conn:
                    job_rows = [dict(r) for r in (await conn.execute(sa.select(jobs))).mappings()]
                    batch_rows = [dict(r) for r in (await conn.execute(sa.select(batches))).mappings()]
            finally:
                await registry.close_adapters(adapters)
                await db.aclose()
            stats = await emu.stats()

        assert sorted(r["id"] for r in job_rows) == sorted(job_ids)
        for row in job_rows:
            assert row["state"] == "succeeded", row
            assert row["account"] == self.account and row["attempts"] == 1
            assert orjson.loads(row["result"])["model"] == self.model
            assert row["usage"]
        expected_batches = math.ceil(PIPELINE_JOBS / self.expected_limits.max_requests)
        assert len(batch_rows) == expected_batches
        for batch in batch_rows:
            assert batch["state"] == "collected" and batch["provider_batch_id"], batch
            assert batch["account"] == self.account
            assert 0 < batch["request_count"] <= self.expected_limits.max_requests
        assert sum(b["succeeded"] for b in batch_rows) == PIPELINE_JOBS
        assert stats["batches_created"] == expected_batches
        # batcher's custom_ids (the job ids) reached the provider once per attempt
        assert stats["requests_by_custom_id"] == {r["id"]: r["attempts"] for r in job_rows}


class TestOpenAI(AdapterContract):
    account = "openai"
    provider = Provider.OPENAI
    endpoint = "/v1/chat/completions"
    model = "gpt-4o-mini"
    adapter_class = OpenAIAdapter
    expected_limits = OPENAI_LIMITS
    expected_discounts: ClassVar[dict[str, Decimal]] = {}
    retryable_codes = frozenset({"server_error", "rate_limit_exceeded"})
    permanent_codes = frozenset({"context_length_exceeded"})

    def account_settings(self, base_url: str) -> dict[str, Any]:
        return {"openai_base_url": base_url, "openai_api_key": SecretStr(API_KEY)}

    def make_adapter(self, base_url: str, *, max_retries: int = 0) -> ProviderAdapter:
        return OpenAIAdapter("openai", api_key=API_KEY, base_url=base_url, max_retries=max_retries)

    def make_body(self, i: int) -> dict[str, Any]:
        return {"model": self.model, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 16}

    def expected_line(self, custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": self.endpoint, "body": body}


class TestAnthropic(AdapterContract):
    account = "anthropic"
    provider = Provider.ANTHROPIC
    endpoint = "/v1/messages"
    model = "claude-emulated-1"
    adapter_class = AnthropicAdapter
    expected_limits = ANTHROPIC_LIMITS
    expected_discounts: ClassVar[dict[str, Decimal]] = {}
    retryable_codes = frozenset({"rate_limit_error", "overloaded_error", "api_error"})
    permanent_codes = frozenset({"invalid_request_error"})

    def account_settings(self, base_url: str) -> dict[str, Any]:
        return {"anthropic_base_url": base_url, "anthropic_api_key": SecretStr(API_KEY)}

    def make_adapter(self, base_url: str, *, max_retries: int = 0) -> ProviderAdapter:
        return AnthropicAdapter("anthropic", api_key=API_KEY, base_url=base_url, max_retries=max_retries)

    def make_body(self, i: int) -> dict[str, Any]:
        return {"model": self.model, "max_tokens": 16, "messages": [{"role": "user", "content": f"question {i}"}]}

    def expected_line(self, custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"custom_id": custom_id, "params": body}


class TestOpenAICompatible(AdapterContract):
    """An OpenAI-compatible host configured only through settings: its own limits and batch discount."""

    account = "groq"
    provider = Provider.OPENAI
    endpoint = "/v1/chat/completions"
    model = "llama-3.1-8b-instant"
    adapter_class = OpenAIAdapter
    expected_limits = replace(OPENAI_LIMITS, max_requests=7)
    expected_discounts: ClassVar[dict[str, Decimal]] = {"groq": Decimal("0.25")}
    retryable_codes = TestOpenAI.retryable_codes
    permanent_codes = TestOpenAI.permanent_codes

    def account_settings(self, base_url: str) -> dict[str, Any]:
        groq = AccountSettings(
            kind=Provider.OPENAI,
            base_url=base_url,
            api_key=SecretStr(API_KEY),
            discount=Decimal("0.25"),
            max_requests=7,
            # the emulator, like OpenAI, takes only 24h (Groq itself takes 24h to 7d)
            completion_window="24h",
        )
        return {"providers": {"groq": groq}}

    def make_adapter(self, base_url: str, *, max_retries: int = 0) -> ProviderAdapter:
        # as registry.build_adapter builds it, with the SDK's retries under the test's control
        account = registry.account_settings(self.make_settings(base_url), self.account)
        assert account.api_key is not None
        return OpenAIAdapter(
            self.account,
            api_key=account.api_key.get_secret_value(),
            base_url=account.base_url,
            limits=registry.account_limits(account),
            completion_window=account.completion_window,
            line_format=account.line_format,
            max_retries=max_retries,
        )

    def make_body(self, i: int) -> dict[str, Any]:
        return {"model": self.model, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 16}

    def expected_line(self, custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": self.endpoint, "body": body}
