"""Writing a batch's output and error files, streaming.

Synchronous (callers run it in a thread). The input file is read line by line and each result line
is written as soon as its chunk is full, so memory does not grow with the batch. Lines are shuffled
inside each chunk (deterministically), so clients have to join on ``custom_id``.

Per request, in this order:

1. beyond the requests the batch got to (expiry, cancellation): error file, top-level
   ``error: {"code": "batch_expired" | "batch_cancelled"}``, not counted as failed;
2. a body the endpoint rejects: error file, ``response.status_code`` 400;
3. fated to fail (``error_rate``): error file, cycling through HTTP 500 ``server_error``, HTTP 429
   ``rate_limit_exceeded``, HTTP 400 ``context_length_exceeded`` (all with ``error: null``) and a
   top-level ``error`` with ``response: null``;
4. otherwise: output file, status 200 and a fake model response.

A line fated to be malformed (``malformed_rate``, by custom_id) is written cut in half: unreadable JSON.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from batcher.emulator.fake_models import InvalidBody, TokenUsage, fake_response
from batcher.emulator.seeding import stable_hex, stable_int, stable_unit

logger = logging.getLogger(__name__)

__all__ = [
    "CHUNK_LINES",
    "FAILURE_KINDS",
    "ResultPlan",
    "ResultSummary",
    "ShuffledWriter",
    "line_malformed",
    "malform",
    "request_fails",
    "write_results",
]

CHUNK_LINES = 128
_CONTEXT_WINDOW = 128_000
FAILURE_KINDS = ("http_500", "http_429", "http_400", "error")
UNFINISHED_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}


def request_fails(seed: int, ordinal: int, custom_id: str, error_rate: float) -> bool:
    """Whether a request is fated to fail (deterministic for a seed, batch ordinal and custom_id)."""
    return error_rate > 0 and stable_unit(seed, "error", ordinal, custom_id) < error_rate


def line_malformed(seed: int, ordinal: int, custom_id: str, malformed_rate: float) -> bool:
    """Whether a request's result line is fated to be written unreadable."""
    return malformed_rate > 0 and stable_unit(seed, "malformed", ordinal, custom_id) < malformed_rate


def malform(line: bytes) -> bytes:
    """A result line cut in half (still newline-terminated): not JSON any more."""
    body = line.rstrip(b"\n")
    return body[: max(1, len(body) // 2)] + b"\n"


@dataclass(frozen=True, slots=True)
class ResultPlan:
    """Everything :func:`write_results` needs.

    Attributes:
        batch_id: Batch id; result and request ids derive from it.
        ordinal: Creation number of the batch in this run (drives fates and shuffling).
        endpoint: Batch endpoint.
        seed: Emulator seed.
        error_rate: Fraction of requests fated to fail.
        done_count: Requests (in input order) that ran; the rest are unfinished.
        unfinished_code: ``batch_expired`` or ``batch_cancelled`` for requests that did not run.
        created: Unix seconds stamped into response bodies.
        input_path: The validated input file.
        output_path: Where to write successes.
        error_path: Where to write failures and unfinished requests.
        malformed_rate: Fraction of result lines written unreadable.
    """

    batch_id: str
    ordinal: int
    endpoint: str
    seed: int
    error_rate: float
    done_count: int
    unfinished_code: str
    created: int
    input_path: Path
    output_path: Path
    error_path: Path
    malformed_rate: float = 0.0


@dataclass(slots=True)
class ResultSummary:
    """Counts and usage of a written batch.

    Attributes:
        completed: Lines in the output file.
        failed: Requests that ran and failed.
        unfinished: Requests that never ran (expired or cancelled).
        usage: Sum of the successful requests' usage.
    """

    completed: int = 0
    failed: int = 0
    unfinished: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def usage(self) -> TokenUsage:
        """Summed usage of the successful requests."""
        return TokenUsage(self.input_tokens, self.cached_tokens, self.output_tokens, self.reasoning_tokens)

    @property
    def errored(self) -> int:
        """Lines in the error file."""
        return self.failed + self.unfinished

    def add(self, usage: TokenUsage) -> None:
        """Count one success."""
        self.completed += 1
        self.input_tokens += usage.input_tokens
        self.cached_tokens += usage.cached_tokens
        self.output_tokens += usage.output_tokens
        self.reasoning_tokens += usage.reasoning_tokens


@dataclass(slots=True)
class ShuffledWriter:
    """Buffers up to :data:`CHUNK_LINES` lines and writes them out in a shuffled order, never the input order
    (neither provider keeps it: results are matched by custom_id)."""

    fh: IO[bytes]
    rng: random.Random
    malformed: Callable[[str], bool] = lambda _custom_id: False
    chunk: list[bytes] = field(default_factory=list)

    def write(self, line: Mapping[str, Any]) -> None:
        data = orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)
        self.chunk.append(malform(data) if self.malformed(str(line["custom_id"])) else data)
        if len(self.chunk) >= CHUNK_LINES:
            self.flush()

    def flush(self) -> None:
        order = list(range(len(self.chunk)))
        self.rng.shuffle(order)
        if len(order) > 1 and order == sorted(order):
            order = order[1:] + order[:1]  # a shuffle may keep the input order
        self.fh.write(b"".join(self.chunk[i] for i in order))
        self.chunk.clear()


def _http_failure(kind: str, model: str, prompt_tokens: int, endpoint: str) -> tuple[int, dict[str, Any]]:
    if kind == "http_500":
        error: dict[str, Any] = {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        return 500, {"error": error}
    if kind == "http_429":
        error = {
            "message": f"Rate limit reached for {model} in organization org-emulator on requests per min (RPM): "
            "Limit 500, Used 500, Requested 1. Please try again in 120ms.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        return 429, {"error": error}
    param = "messages" if endpoint == "/v1/chat/completions" else "input"
    error = {
        "message": f"This model's maximum context length is {_CONTEXT_WINDOW} tokens. However, your request "
        f"resulted in {_CONTEXT_WINDOW + prompt_tokens} tokens. Please reduce the length of the input.",
        "type": "invalid_request_error",
        "param": param,
        "code": "context_length_exceeded",
    }
    return 400, {"error": error}


def _result_line(
    plan: ResultPlan, custom_id: str, status: int | None, body: dict[str, Any] | None, error: dict[str, str] | None
) -> dict[str, Any]:
    key = f"{plan.batch_id}:{custom_id}"
    response = (
        None if status is None else {"status_code": status, "request_id": f"req_{stable_hex(32, key)}", "body": body}
    )
    return {
        "id": f"batch_req_{stable_hex(32, key, 'line')}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


def write_results(plan: ResultPlan) -> ResultSummary:
    """Run every request of a validated input file and write the result files.

    Both files are always created (possibly empty); the caller drops empty ones.

    Returns:
        Counts and summed usage.
    """
    summary = ResultSummary()
    failures = 0
    index = 0
    with (
        plan.input_path.open("rb") as source,
        plan.output_path.open("wb") as out_fh,
        plan.error_path.open("wb") as err_fh,
    ):

        def malformed(custom_id: str) -> bool:
            return line_malformed(plan.seed, plan.ordinal, custom_id, plan.malformed_rate)

        out = ShuffledWriter(out_fh, random.Random(stable_int(plan.seed, plan.ordinal, "shuffle-output")), malformed)
        err = ShuffledWriter(err_fh, random.Random(stable_int(plan.seed, plan.ordinal, "shuffle-error")), malformed)
        for raw in source:
            if not raw.strip():
                continue
            request = orjson.loads(raw)
            custom_id: str = request["custom_id"]
            body: dict[str, Any] = request["body"]
            index += 1
            if index > plan.done_count:
                summary.unfinished += 1
                message = UNFINISHED_MESSAGES[plan.unfinished_code]
                err.write(_result_line(plan, custom_id, None, None, {"code": plan.unfinished_code, "message": message}))
                continue
            key = f"{plan.batch_id}:{custom_id}"
            try:
                response, usage = fake_response(
                    plan.endpoint, body, seed=plan.seed, request_key=key, created=plan.created
                )
            except InvalidBody as exc:
                summary.failed += 1
                error_body = {"error": {"message": exc.message, "type": "invalid_request_error", "param": exc.param}}
                error_body["error"]["code"] = exc.code
                err.write(_result_line(plan, custom_id, 400, error_body, None))
                continue
            if request_fails(plan.seed, plan.ordinal, custom_id, plan.error_rate):
                summary.failed += 1
                kind = FAILURE_KINDS[failures % len(FAILURE_KINDS)]
                failures += 1
                if kind == "error":
                    error = {"code": "server_error", "message": "The request failed because of an internal error."}
                    err.write(_result_line(plan, custom_id, None, None, error))
                else:
                    model = str(body.get("model", ""))
                    status, error_body = _http_failure(kind, model, usage.input_tokens, plan.endpoint)
                    err.write(_result_line(plan, custom_id, status, error_body, None))
                continue
            summary.add(usage)
            out.write(_result_line(plan, custom_id, 200, response, None))
        out.flush()
        err.flush()
    return summary
