"""A Python client for batcher's HTTP API, on aiohttp.

::

    async with BatcherClient("http://127.0.0.1:8300", api_key) as client:
        accepted = await client.enqueue(provider="openai", body={"model": "gpt-4o-mini", "messages": [...]})
        job = await client.wait(accepted.id)
        async for line in client.results("nightly"):
            ...

Every POST carries an ``Idempotency-Key`` (one is made when the caller gives none), so the client can retry a
POST whose answer was lost without making a second job. Connection failures and 502/503/504 answers are
retried with backoff; other failures raise an :class:`ApiError` naming the field at fault.

Errors::

    BatcherError
    └── ApiError                the API answered 4xx/5xx (``status``, ``type``, ``field``, ``line``)
        ├── Unauthorized        401 / 403
        ├── ApiNotFound         404 (also a batcher.errors.NotFound)
        ├── OverBudgetError     402
        └── TooManyQueuedError  429
"""

from __future__ import annotations

import asyncio
import io
import random
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp
import orjson
from pydantic import BaseModel

from batcher.api.models import (
    BulkAccepted,
    CancelledRun,
    JobAccepted,
    JobIn,
    JobOut,
    JobPage,
    ResultLine,
    RunCallbackOut,
    RunOut,
    SavingsOut,
)
from batcher.domain import JOB_TERMINAL, JobState, Provider
from batcher.errors import BatcherError, NotFound

__all__ = [
    "ApiError",
    "ApiNotFound",
    "BatcherClient",
    "OverBudgetError",
    "TooManyQueuedError",
    "Unauthorized",
]

M = TypeVar("M", bound=BaseModel)

#: answers worth trying again: the server or a proxy in front of it was briefly unable
_RETRY_STATUS = frozenset({502, 503, 504})


class ApiError(BatcherError):
    """The API refused or failed a call.

    Attributes:
        status: the HTTP status.
        type: the error's type word (``invalid_request``, ``not_found``, ``over_budget``…).
        field: the field at fault, when one is.
        line: for bulk requests, the 1-based position of the first bad job.
        body: the whole error object.
    """

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        error = body.get("error") if isinstance(body.get("error"), Mapping) else {}
        assert isinstance(error, Mapping)
        self.status = status
        self.type = str(error.get("type", "error"))
        self.message = str(error.get("message", f"HTTP {status}"))
        self.field: str | None = error.get("field")
        self.line: int | None = error.get("line")
        self.body = dict(body)
        super().__init__(f"{status} {self.type}: {self.message}")


class Unauthorized(ApiError):
    """The key is missing, wrong or revoked (401), or may not do this (403)."""


class ApiNotFound(ApiError, NotFound):
    """No such job or run — or it is another tenant's."""


class OverBudgetError(ApiError):
    """The tenant's monthly budget would be exceeded (the message says budget, spend and estimate)."""


class TooManyQueuedError(ApiError):
    """The tenant has as many unsettled jobs as it may."""


_ERRORS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    403: Unauthorized,
    404: ApiNotFound,
    402: OverBudgetError,
    429: TooManyQueuedError,
}


def _job_json(job: JobIn | Mapping[str, Any]) -> bytes:
    if isinstance(job, JobIn):
        return job.model_dump_json(exclude_none=True).encode()
    return orjson.dumps(job)


class BatcherClient:
    """Talks to a batcher API.

    Args:
        base_url: the API's root, e.g. ``http://127.0.0.1:8300``.
        api_key: the tenant's key (``batcher keys create``).
        session: an aiohttp session to use (default: one of its own, closed with the client).
        timeout_s: seconds one call may take.
        retries: attempts after the first for connection failures and 502/503/504.
        backoff_s: the first retry's delay; each later one doubles.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.25,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._session = session
        self._own_session = session is None
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.retries = retries
        self.backoff_s = backoff_s

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    # ------------------------------------------------------------------------------------------------ plumbing

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        idempotency_key: str | None = None,
    ) -> tuple[int, bytes]:
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = content_type
        if method == "POST":
            headers["Idempotency-Key"] = idempotency_key or str(uuid.uuid4())
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            # a big body is sent from a file object, which aiohttp streams (it warns about big bytes)
            payload: Any = io.BytesIO(body) if body is not None and len(body) > 1 << 20 else body
            try:
                async with self.session.request(
                    method, self.base_url + path, data=payload, params=params, headers=headers, timeout=self.timeout
                ) as resp:
                    data = await resp.read()
                    if resp.status in _RETRY_STATUS and not last:
                        pass
                    elif resp.status >= 400:
                        raise _error(resp.status, data)
                    else:
                        return resp.status, data
            except (aiohttp.ClientConnectionError, TimeoutError):
                if last:
                    raise
            await asyncio.sleep(delay * (1 + random.random() * 0.25))
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get(self, path: str, model: type[M], params: Mapping[str, str] | None = None) -> M:
        _, data = await self._call("GET", path, params=params)
        return model.model_validate_json(data)

    # ------------------------------------------------------------------------------------------------ jobs

    async def enqueue(
        self,
        *,
        provider: Provider | str,
        body: Mapping[str, Any],
        url: str | None = None,
        custom_id: str | None = None,
        run: str | None = None,
        tags: Mapping[str, str] | None = None,
        priority: int | None = None,
        not_after: datetime | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> JobAccepted:
        """Enqueue one job; returns once it is committed.

        Args:
            provider: ``openai`` or ``anthropic``.
            body: the provider-native request (an OpenAI body, or Anthropic params).
            url: the OpenAI endpoint (default ``/v1/chat/completions``); not for Anthropic.
            custom_id: your id, unique within the run (a repeat returns the first job).
            run: the run the job joins (default ``default``).
            tags: KEY: VALUE labels.
            priority: higher is packed first.
            not_after: the result is needed by then (timezone-aware).
            callback_url: where the signed result is POSTed once the job settles.
            idempotency_key: the key a retry of this call must carry (default: a new one per call).

        Raises:
            ApiError: the API refused the job (``field`` names what is wrong).
        """
        job: dict[str, Any] = {"provider": Provider(provider).value, "body": dict(body)}
        for name, value in (
            ("url", url),
            ("custom_id", custom_id),
            ("run", run),
            ("tags", None if tags is None else dict(tags)),
            ("priority", priority),
            ("not_after", not_after),
            ("callback_url", callback_url),
        ):
            if value is not None:
                job[name] = value
        _, data = await self._call("POST", "/v1/jobs", body=orjson.dumps(job), idempotency_key=idempotency_key)
        return JobAccepted.model_validate_json(data)

    async def enqueue_many(
        self, jobs: Iterable[JobIn | Mapping[str, Any]], *, idempotency_key: str | None = None
    ) -> BulkAccepted:
        """Enqueue many jobs in one request (JSON Lines), all or none.

        Raises:
            ApiError: a job is invalid (``line`` is its 1-based position, ``field`` what is wrong) or the request
                is over the size limit (413).
        """
        body = b"\n".join(_job_json(j) for j in jobs)
        _, data = await self._call(
            "POST", "/v1/jobs/bulk", body=body, content_type="application/x-ndjson", idempotency_key=idempotency_key
        )
        return BulkAccepted.model_validate_json(data)

    async def get(self, job_id: str) -> JobOut:
        """One job: state, result, error, cost, webhook. Raises :class:`ApiNotFound`."""
        return await self._get(f"/v1/jobs/{job_id}", JobOut)

    async def wait(
        self, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0, max_poll_s: float = 30.0
    ) -> JobOut:
        """Poll a job until it has settled (succeeded, failed or cancelled), backing off up to ``max_poll_s``.

        Raises:
            TimeoutError: not settled within ``timeout_s``.
            ApiNotFound: no such job.
        """
        delay = poll_s
        async with asyncio.timeout(timeout_s):
            while True:
                job = await self.get(job_id)
                if job.state in JOB_TERMINAL:
                    return job
                await asyncio.sleep(delay * (1 + random.random() * 0.1))
                delay = min(delay * 1.5, max_poll_s)

    async def jobs(
        self, *, run: str | None = None, state: JobState | str | None = None, page_size: int = 100
    ) -> AsyncIterator[JobOut]:
        """Every job (of a run, in a state), newest first, page by page."""
        params: dict[str, str] = {"limit": str(page_size)}
        if run is not None:
            params["run"] = run
        if state is not None:
            params["state"] = JobState(state).value
        while True:
            page = await self._get("/v1/jobs", JobPage, params)
            for job in page.jobs:
                yield job
            if page.next_cursor is None:
                return
            params["cursor"] = page.next_cursor

    async def cancel(self, job_id: str) -> JobOut:
        """Cancel a queued job. Raises :class:`ApiError` (409) for a job past cancelling."""
        _, data = await self._call("POST", f"/v1/jobs/{job_id}/cancel")
        return JobOut.model_validate_json(data)

    # ------------------------------------------------------------------------------------------------ runs

    async def run(self, run: str) -> RunOut:
        """A run's job counts, cost and savings."""
        return await self._get(f"/v1/runs/{run}", RunOut)

    async def results(self, run: str, *, state: str = "all") -> AsyncIterator[ResultLine]:
        """The run's settled jobs, streamed; a broken stream is resumed after the last line received."""
        after: str | None = None
        failures = 0
        while True:
            params = {"state": state} | ({} if after is None else {"after": after})
            try:
                async with self.session.get(
                    f"{self.base_url}/v1/runs/{run}/results",
                    params=params,
                    headers=self._headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=self.timeout.total),
                ) as resp:
                    if resp.status >= 400:
                        raise _error(resp.status, await resp.read())
                    async for raw in resp.content:
                        line = raw.strip()
                        if line:
                            item = ResultLine.model_validate_json(line)
                            after = item.id
                            yield item
                return
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
                failures += 1
                if failures > self.retries:
                    raise
                await asyncio.sleep(self.backoff_s * 2 ** (failures - 1))

    async def cancel_run(self, run: str) -> CancelledRun:
        _, data = await self._call("POST", f"/v1/runs/{run}/cancel")
        return CancelledRun.model_validate_json(data)

    async def set_run_callback(self, run: str, url: str) -> RunCallbackOut:
        """POST the run's summary to ``url`` once every job of it has settled."""
        _, data = await self._call("PUT", f"/v1/runs/{run}/callback", body=orjson.dumps({"url": url}))
        return RunCallbackOut.model_validate_json(data)

    async def savings(self, *, by: str | None = None, since: str | None = None, run: str | None = None) -> SavingsOut:
        """What batching saved: the same groupings as ``batcher savings`` (provider, model, run, day, tag:KEY)."""
        params = {k: v for k, v in (("by", by), ("since", since), ("run", run)) if v is not None}
        return await self._get("/v1/savings", SavingsOut, params)


def _error(status: int, data: bytes) -> ApiError:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return _ERRORS.get(status, ApiError)(status, body)
