"""The HTTP API's request and response models. ``/openapi.json`` is generated from these same classes.

Requests are validated by them (unknown fields refused, every error naming its field). Responses are built as
plain dicts for speed and documented by the response models; the tests hold the two together.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from batcher.api.errors import PROVIDER_MISMATCH
from batcher.domain import JobState, Provider
from batcher.providers.limits import ANTHROPIC_ENDPOINT, OPENAI_ENDPOINTS
from batcher.webhooks import check_callback_url

#: what a run name may hold over HTTP: printable text, no control characters, no "/" (it is a path segment)
RUN_PATTERN = r"^[^\x00-\x1f\x7f/]+$"
DEFAULT_OPENAI_URL = "/v1/chat/completions"

TagKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
TagValue = Annotated[str, StringConstraints(max_length=512)]
RunName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=RUN_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _allow_private(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("allow_private"))


class JobIn(_Strict):
    """One job: a provider-native request and how batcher should treat it."""

    provider: Provider = Field(description="which provider API runs the request")
    url: str | None = Field(
        default=None,
        max_length=64,
        description=f"the OpenAI batch endpoint ({', '.join(sorted(OPENAI_ENDPOINTS))}); default "
        f"{DEFAULT_OPENAI_URL}. Absent for Anthropic.",
    )
    body: dict[str, Any] = Field(
        description="the provider-native request: an OpenAI request body, or Anthropic Message Batches params"
    )
    custom_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="your id, unique within the run (a second job with it returns the first); default: generated",
    )
    run: RunName = Field(default="default", description="the run (a named group of jobs) the job joins")
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=64, description="KEY: VALUE labels")
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000, description="higher is packed first")
    not_after: AwareDatetime | None = Field(
        default=None, description="the result is needed by then (ISO 8601 with a timezone)"
    )
    callback_url: str | None = Field(
        default=None, max_length=2048, description="http(s) URL the signed result is POSTed to once the job settles"
    )

    @field_validator("url")
    @classmethod
    def _known_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        provider = info.data.get("provider")
        if value is None:
            return value
        if provider is Provider.ANTHROPIC and value in OPENAI_ENDPOINTS:
            # an OpenAI job sent as Anthropic: named at its provider (see batcher.api.errors.from_validation)
            raise PydanticCustomError(
                PROVIDER_MISMATCH,
                'this is an OpenAI job (url {url}): set provider to "openai" (Anthropic jobs take no url)',
                {"url": value},
            )
        if provider is Provider.ANTHROPIC and value != ANTHROPIC_ENDPOINT:
            raise ValueError(f"Anthropic jobs take no url (their endpoint is {ANTHROPIC_ENDPOINT}); leave it out")
        if provider is Provider.OPENAI and value not in OPENAI_ENDPOINTS:
            allowed = ", ".join(sorted(OPENAI_ENDPOINTS))
            raise ValueError(f"{value!r} is not an OpenAI batch endpoint; use one of {allowed}")
        return value

    @field_validator("callback_url")
    @classmethod
    def _callback(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else check_callback_url(value, allow_private=_allow_private(info))

    def endpoint(self) -> str:
        """The endpoint the job is stored with (intake refuses one that does not fit the provider)."""
        if self.provider is Provider.ANTHROPIC:
            return self.url or ANTHROPIC_ENDPOINT
        return self.url or DEFAULT_OPENAI_URL


class JobAccepted(BaseModel):
    """A job stored (``created``) or found already stored under its run and custom_id."""

    id: str
    custom_id: str
    run: str
    state: JobState
    created: bool = Field(description="false: the run already held this custom_id; this is that job")


class BulkAccepted(BaseModel):
    """Every job of a bulk POST stored, or found already stored."""

    jobs: int = Field(description="jobs in the request")
    created: int = Field(description="jobs stored by this request")
    duplicates: int = Field(description="jobs whose run already held their custom_id")
    ids: list[str] = Field(description="the job id of each job, in request order")


class Cost(BaseModel):
    """Dollars as decimal strings; ``null`` until priced (a model with no price stays unknown, never zero)."""

    actual_usd: str | None
    realtime_usd: str | None
    saved_usd: str | None


class WebhookOut(BaseModel):
    """A webhook delivery and where it stands."""

    id: str
    event: Literal["job.settled", "run.settled"]
    job_id: str | None
    run: str | None
    url: str
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class WebhookPage(BaseModel):
    webhooks: list[WebhookOut]
    next_cursor: str | None


class JobOut(BaseModel):
    """A job: its state, and once settled its result or error and what it cost."""

    id: str
    custom_id: str
    run: str
    provider: Provider
    url: str | None = Field(description="the OpenAI endpoint; null for Anthropic")
    model: str
    state: JobState
    attempts: int
    priority: int
    tags: dict[str, str]
    not_after: datetime | None
    created_at: datetime
    updated_at: datetime
    settled_at: datetime | None
    result: Any = Field(default=None, description="the provider's response body, once succeeded")
    error_code: str | None
    error: Any = Field(description="why the job failed, or why its last attempt did")
    usage: Any = Field(description="the token usage the provider reported")
    cost: Cost | None = Field(description="from the ledger; null before the job is settled")
    callback_url: str | None
    webhook: WebhookOut | None


class JobPage(BaseModel):
    """A page of jobs, newest first; pass ``next_cursor`` as ``cursor`` for the next page."""

    jobs: list[JobOut]
    next_cursor: str | None


class CancelledRun(BaseModel):
    run: str
    jobs_cancelled: int
    batches_cancelled: int
    batches_shared: int = Field(description="provider batches left running because they hold other runs' jobs")


class RunCost(BaseModel):
    jobs: int = Field(description="ledger entries (settled provider requests)")
    actual_usd: str
    realtime_usd: str
    saved_usd: str
    saved_pct: float
    unpriced_jobs: int


class RunCallbackIn(_Strict):
    url: str = Field(max_length=2048, description="http(s) URL the run's summary is POSTed to once every job settled")

    @field_validator("url")
    @classmethod
    def _callback(cls, value: str, info: ValidationInfo) -> str:
        return check_callback_url(value, allow_private=_allow_private(info))


class RunCallbackOut(BaseModel):
    run: str
    url: str | None
    armed: bool = Field(description="fires once every job of the run has settled")
    notified_jobs: int = Field(description="jobs the run held when its callback last fired")


class RunOut(BaseModel):
    """A run: job counts by state, what it cost and saved, its callback."""

    run: str
    jobs: dict[str, int]
    total: int
    settled: int
    oldest_queued_at: datetime | None
    batches_in_flight: int
    cost: RunCost
    callback: RunCallbackOut | None


class ResultLine(BaseModel):
    """One line of ``GET /v1/runs/{run}/results`` (JSON Lines): a settled job."""

    id: str
    custom_id: str
    state: JobState
    result: Any
    error_code: str | None
    error: Any
    usage: Any
    cost: Cost | None


class SavingsRow(BaseModel):
    key: str | None = None
    jobs: int
    actual_usd: str
    realtime_usd: str
    saved_usd: str
    saved_pct: float
    input_tokens: int
    output_tokens: int
    unpriced_jobs: int


class SavingsOut(BaseModel):
    by: str | None
    totals: SavingsRow
    groups: list[SavingsRow]
    unpriced_models: list[str]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: Literal["ok", "unavailable"]


class ErrorItem(BaseModel):
    field: str | None
    message: str
    line: int | None = Field(default=None, description="bulk requests: the job's 1-based position (JSONL: line)")


class ErrorBody(BaseModel):
    type: str = Field(
        description="invalid_request, unauthorized, forbidden, not_found, conflict, too_large, "
        "too_many_queued, over_budget, unavailable"
    )
    message: str
    field: str | None = Field(default=None, description="the first field at fault, dotted (body.messages.0)")
    line: int | None = Field(default=None, description="bulk requests: the first bad job's 1-based position")
    errors: list[ErrorItem] = Field(default_factory=list)


class ErrorOut(BaseModel):
    error: ErrorBody
