"""Test doubles: :class:`FakeProvider`, an in-memory :class:`~batcher.providers.base.ProviderAdapter`.

No sockets, no clock. Tests script what happens to each request and when batches move::

    fake = FakeProvider(instant=False)
    fake.script("job-1", FakeResult.FAIL_RETRYABLE, FakeResult.SUCCEED)  # fails once, then succeeds
    fake.fail_next_batch("token_limit_exceeded")  # the next batch created fails as a whole
    fake.fail_next(2, method="retrieve")  # the next two retrieve calls raise ProviderError
    ...
    fake.advance()  # every batch at the provider reaches its final state
    assert fake.received["job-1"] == 2
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import orjson

from batcher.domain import BatchState, Provider
from batcher.errors import ProviderError
from batcher.providers.base import BatchStatus, Limits, Outcome, OutcomeKind, ProviderAdapter, RequestCounts

logger = logging.getLogger(__name__)

__all__ = ["FAKE_LIMITS", "FakeBatch", "FakeProvider", "FakeResult"]

#: limits of a :class:`FakeProvider` unless given others (OpenAI's numbers)
FAKE_LIMITS = Limits(
    max_requests=50_000,
    max_bytes=200 * 1024 * 1024,
    one_model_per_batch=True,
    endpoints=frozenset(
        {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations"}
    ),
)

_AT_PROVIDER = frozenset({BatchState.VALIDATING, BatchState.IN_PROGRESS, BatchState.FINALIZING, BatchState.CANCELLING})


class FakeResult(str, Enum):
    """What happens to one request the next time the fake receives it."""

    #: a 200 answer with a chat-completion body and ``usage``
    SUCCEED = "succeed"
    #: a 500 ``server_error``; ``retryable=True``
    FAIL_RETRYABLE = "fail_retryable"
    #: a 400 ``invalid_request_error``; ``retryable=False``
    FAIL_PERMANENT = "fail_permanent"
    #: ``batch_expired``; the batch ends ``expired``
    EXPIRE = "expire"
    #: ``batch_cancelled`` (also what an unfinished request becomes when its batch is cancelled)
    CANCEL = "cancel"
    #: no result line at all (a provider that lost it)
    MISSING = "missing"


@dataclass
class FakeBatch:
    """A batch held by :class:`FakeProvider`; tests may inspect it."""

    provider_batch_id: str
    batch_id: str
    endpoint: str
    model: str
    #: request custom_ids in file order, and what will happen to each
    results: dict[str, FakeResult]
    state: BatchState = BatchState.VALIDATING
    #: (code, message) of a batch-level failure still to happen
    pending_failure: tuple[str, str] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    cancel_requested: bool = False


@dataclass
class _Injection:
    remaining: int
    method: str | None
    retryable: bool
    retry_after_s: float | None
    after: bool
    message: str


class FakeProvider(ProviderAdapter):
    """An in-memory provider for lifecycle tests.

    Args:
        account: the account's name.
        limits: batch limits (default :data:`FAKE_LIMITS`); upload refuses files past ``max_requests``/``max_bytes``.
        instant: when true, a batch reaches its final state on the first :meth:`retrieve` after create or
            cancel; when false, only :meth:`advance` moves batches.
        kind: which provider API this fake stands for.
        usage: the ``usage`` object of successful results.

    Attributes:
        received: how many times each custom_id arrived in a created batch.
        realtime_received: how many times each custom_id was sent to :meth:`run_realtime`.
        calls: how many times each adapter method was called (including calls that raised).
        batches: every batch created, by provider batch id.
        files: uploaded files (custom_ids in order), by file id.
        deleted_files: file ids passed to :meth:`delete_file`, in order.
        default: the result of a request with no script.
        closed: :meth:`aclose` was called.
    """

    def __init__(
        self,
        account: str = "fake",
        limits: Limits | None = None,
        *,
        instant: bool = True,
        kind: Provider = Provider.OPENAI,
        usage: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(account, limits or FAKE_LIMITS)
        self.kind = kind
        self.instant = instant
        self.usage: dict[str, Any] = (
            usage if usage is not None else {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        )
        self.default = FakeResult.SUCCEED
        self.received: Counter[str] = Counter()
        self.realtime_received: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.batches: dict[str, FakeBatch] = {}
        self.files: dict[str, list[str]] = {}
        self.deleted_files: list[str] = []
        self.closed = False
        self._scripts: dict[str, list[FakeResult]] = {}
        self._batch_failures: list[tuple[str, str]] = []
        self._injections: list[_Injection] = []
        self._ids = itertools.count(1)

    # -- scripting -------------------------------------------------------------------------------------------

    def script(self, custom_id: str, *results: FakeResult) -> None:
        """What happens to ``custom_id`` on its next receipts, in order; the last one repeats."""
        if not results:
            raise ValueError("script() needs at least one FakeResult")
        self._scripts[custom_id] = list(results)

    def fail_next_batch(self, code: str = "token_limit_exceeded", message: str | None = None, count: int = 1) -> None:
        """The next ``count`` batches are created, then fail as a whole with ``code`` (no results)."""
        text = message or f"fake batch failure: {code}"
        self._batch_failures.extend([(code, text)] * count)

    def fail_next(
        self,
        count: int = 1,
        *,
        method: str | None = None,
        retryable: bool = True,
        retry_after_s: float | None = None,
        after: bool = False,
        message: str = "injected provider failure",
    ) -> None:
        """The next ``count`` calls (of ``method``, or of any method) raise :class:`ProviderError`.

        Args:
            count: how many calls fail.
            method: an adapter method name (``"create"``, ``"retrieve"``…); ``None`` matches every call.
            retryable: the error's ``retryable``.
            retry_after_s: the error's ``retry_after_s``.
            after: the call takes effect first, then raises — a response lost on the way back (e.g. a batch
                created at the provider whose id the caller never learns).
            message: the error message.
        """
        self._injections.append(_Injection(count, method, retryable, retry_after_s, after, message))

    def advance(self, provider_batch_id: str | None = None, *, to: BatchState | None = None) -> None:
        """Move one batch (or every batch still at the provider) on.

        Args:
            provider_batch_id: the batch; ``None`` for all batches at the provider.
            to: ``in_progress`` or ``finalizing`` to step; ``None`` for the final state (``cancelled`` if a cancel
                was asked, ``failed`` if a batch failure was scripted, ``expired`` if a request was scripted to
                expire, else ``ended``).
        """
        if to is not None and to not in (BatchState.IN_PROGRESS, BatchState.FINALIZING):
            raise ValueError("advance(to=...) takes in_progress or finalizing; omit it for the final state")
        targets = [self.batches[provider_batch_id]] if provider_batch_id else list(self.batches.values())
        for batch in targets:
            if batch.state not in _AT_PROVIDER:
                continue
            if to is not None:
                if batch.state is not BatchState.CANCELLING:
                    batch.state = to
            else:
                self._finish(batch)

    # -- ProviderAdapter -------------------------------------------------------------------------------------

    def encode_line(self, custom_id: str, endpoint: str, body_json: str) -> bytes:
        """The OpenAI input line shape, ``body_json`` spliced as-is."""
        return orjson.dumps(
            {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": orjson.Fragment(body_json)},
            option=orjson.OPT_APPEND_NEWLINE,
        )

    async def upload(self, path: Path) -> str:
        """Keep the file's custom_ids in memory; refuses files over the limits or with unreadable lines."""
        self._before("upload")
        file_id = self._store_file(path)
        self._after("upload")
        return file_id

    async def create(
        self, *, batch_id: str, endpoint: str, model: str, input_file_id: str | None, path: Path
    ) -> BatchStatus:
        """Create the batch (``validating``); every custom_id in it counts as received once."""
        self._before("create")
        if input_file_id is None:
            input_file_id = self._store_file(path)
        if input_file_id not in self.files:
            raise ProviderError(f"no file {input_file_id}", provider=self.account, retryable=False)
        custom_ids = self.files[input_file_id]
        self.received.update(custom_ids)
        batch = FakeBatch(
            provider_batch_id=f"batch-fake-{next(self._ids)}",
            batch_id=batch_id,
            endpoint=endpoint,
            model=model,
            results={cid: self._next_result(cid) for cid in custom_ids},
            pending_failure=self._batch_failures.pop(0) if self._batch_failures else None,
        )
        self.batches[batch.provider_batch_id] = batch
        self._after("create")
        return self._status(batch)

    async def retrieve(self, provider_batch_id: str) -> BatchStatus:
        """The batch's status; in ``instant`` mode a batch at the provider reaches its final state first."""
        self._before("retrieve")
        batch = self._get(provider_batch_id)
        if self.instant and batch.state in _AT_PROVIDER:
            self._finish(batch)
        self._after("retrieve")
        return self._status(batch)

    async def results(self, status: BatchStatus) -> AsyncIterator[Outcome]:
        """The batch's outcomes as scripted (none for a failed batch, none yet for one still at the provider)."""
        self._before("results")
        batch = self._get(status.provider_batch_id)
        if batch.state in (BatchState.ENDED, BatchState.EXPIRED, BatchState.CANCELLED):
            for custom_id, result in batch.results.items():
                outcome = self._outcome(custom_id, result, batch.model)
                if outcome is not None:
                    yield outcome
        self._after("results")

    async def cancel(self, provider_batch_id: str) -> BatchStatus:
        """Ask to cancel: a batch at the provider goes ``cancelling``; a finished one is left as it is."""
        self._before("cancel")
        batch = self._get(provider_batch_id)
        if batch.state in _AT_PROVIDER:
            batch.cancel_requested = True
            batch.state = BatchState.CANCELLING
        self._after("cancel")
        return self._status(batch)

    async def find_batch(self, batch_id: str) -> BatchStatus | None:
        """The newest batch created for ``batch_id``."""
        self._before("find_batch")
        found = next((b for b in reversed(self.batches.values()) if b.batch_id == batch_id), None)
        self._after("find_batch")
        return self._status(found) if found is not None else None

    async def delete_file(self, file_id: str) -> None:
        """Forget the file; an unknown id is fine."""
        self._before("delete_file")
        self.files.pop(file_id, None)
        self.deleted_files.append(file_id)
        self._after("delete_file")

    async def run_realtime(
        self, custom_id: str, endpoint: str, body_json: str, *, attempt: int | None = None
    ) -> Outcome:
        """Answer from the same script: the ``FAIL_*`` results fail, anything else succeeds."""
        self._before("run_realtime")
        self.realtime_received[custom_id] += 1
        result = self._next_result(custom_id)
        if result not in (FakeResult.FAIL_RETRYABLE, FakeResult.FAIL_PERMANENT):
            result = FakeResult.SUCCEED
        model = "fake-model"
        try:
            body = orjson.loads(body_json)
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                model = body["model"]
        except orjson.JSONDecodeError:
            pass
        outcome = self._outcome(custom_id, result, model)
        self._after("run_realtime")
        if outcome is None:  # pragma: no cover - SUCCEED and FAIL_* always give one
            raise AssertionError(result)
        return outcome

    async def aclose(self) -> None:
        """Mark the fake closed."""
        self.closed = True

    # -- internals -------------------------------------------------------------------------------------------

    def _before(self, method: str) -> None:
        self.calls[method] += 1
        self._maybe_raise(method, after=False)

    def _after(self, method: str) -> None:
        self._maybe_raise(method, after=True)

    def _maybe_raise(self, method: str, *, after: bool) -> None:
        for injection in self._injections:
            if injection.remaining > 0 and injection.after is after and injection.method in (None, method):
                injection.remaining -= 1
                raise ProviderError(
                    f"{self.account}: {method}: {injection.message}",
                    provider=self.account,
                    retryable=injection.retryable,
                    retry_after_s=injection.retry_after_s,
                )

    def _next_result(self, custom_id: str) -> FakeResult:
        scripted = self._scripts.get(custom_id)
        if not scripted:
            return self.default
        return scripted.pop(0) if len(scripted) > 1 else scripted[0]

    def _store_file(self, path: Path) -> str:
        data = path.read_bytes()
        if len(data) > self.limits.max_bytes:
            raise ProviderError(
                f"{path.name}: over {self.limits.max_bytes} bytes", provider=self.account, retryable=False
            )
        custom_ids: list[str] = []
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                custom_ids.append(str(orjson.loads(line)["custom_id"]))
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise ProviderError(
                    f"{path.name} line {number}: not a request line", provider=self.account, retryable=False
                ) from exc
        if len(custom_ids) > self.limits.max_requests:
            raise ProviderError(
                f"{path.name}: {len(custom_ids)} requests, over {self.limits.max_requests}",
                provider=self.account,
                retryable=False,
            )
        file_id = f"file-fake-{next(self._ids)}"
        self.files[file_id] = custom_ids
        return file_id

    def _get(self, provider_batch_id: str) -> FakeBatch:
        try:
            return self.batches[provider_batch_id]
        except KeyError:
            raise ProviderError(f"no batch {provider_batch_id}", provider=self.account, retryable=False) from None

    def _finish(self, batch: FakeBatch) -> None:
        if batch.cancel_requested:
            batch.state = BatchState.CANCELLED
            batch.results = {
                cid: FakeResult.CANCEL if result is FakeResult.SUCCEED else result
                for cid, result in batch.results.items()
            }
        elif batch.pending_failure is not None:
            code, message = batch.pending_failure
            batch.pending_failure = None
            batch.state = BatchState.FAILED
            batch.errors = [{"code": code, "message": message, "line": None, "param": None}]
        elif FakeResult.EXPIRE in batch.results.values():
            batch.state = BatchState.EXPIRED
        else:
            batch.state = BatchState.ENDED

    def _status(self, batch: FakeBatch) -> BatchStatus:
        done = batch.state in (BatchState.ENDED, BatchState.EXPIRED, BatchState.CANCELLED)
        tally = Counter(batch.results.values()) if done else Counter[FakeResult]()
        counts = RequestCounts(
            total=len(batch.results),
            succeeded=tally[FakeResult.SUCCEED],
            failed=tally[FakeResult.FAIL_RETRYABLE] + tally[FakeResult.FAIL_PERMANENT],
            expired=tally[FakeResult.EXPIRE],
            cancelled=tally[FakeResult.CANCEL],
        )
        pid = batch.provider_batch_id
        return BatchStatus(
            provider_batch_id=pid,
            state=batch.state,
            provider_state=batch.state.value,
            counts=counts,
            output_file_id=f"{pid}-output" if done else None,
            error_file_id=f"{pid}-errors" if done else None,
            errors=list(batch.errors),
            token_limit_exceeded=batch.state is BatchState.FAILED
            and any(e["code"] == "token_limit_exceeded" for e in batch.errors),
            raw={"id": pid, "status": batch.state.value, "metadata": {"batcher_batch_id": batch.batch_id}},
        )

    def _outcome(self, custom_id: str, result: FakeResult, model: str) -> Outcome | None:
        if result is FakeResult.SUCCEED:
            body = {
                "id": f"chatcmpl-{custom_id}",
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": self.usage,
            }
            return Outcome(
                custom_id, OutcomeKind.SUCCEEDED, body=orjson.dumps(body).decode(), usage=self.usage, status_code=200
            )
        if result is FakeResult.FAIL_RETRYABLE:
            return Outcome(
                custom_id,
                OutcomeKind.FAILED,
                error_code="server_error",
                error_message="fake server error",
                retryable=True,
                status_code=500,
            )
        if result is FakeResult.FAIL_PERMANENT:
            return Outcome(
                custom_id,
                OutcomeKind.FAILED,
                error_code="invalid_request_error",
                error_message="fake invalid request",
                retryable=False,
                status_code=400,
            )
        if result is FakeResult.EXPIRE:
            return Outcome(
                custom_id,
                OutcomeKind.EXPIRED,
                error_code="batch_expired",
                error_message="the batch expired before this request ran",
                retryable=True,
            )
        if result is FakeResult.CANCEL:
            return Outcome(
                custom_id,
                OutcomeKind.CANCELLED,
                error_code="batch_cancelled",
                error_message="the batch was cancelled before this request ran",
            )
        return None
