"""Writing a Message Batch's results file, streaming.

Synchronous (callers run it in a thread). The stored requests are read line by line and each result line is
written as soon as its chunk is full, so memory does not grow with the batch. Lines are shuffled inside each chunk
(deterministically, and never left in input order), so clients have to join on ``custom_id``.

Per request, in input order:

1. beyond the requests the batch got to (cancellation, expiry): ``{"type": "canceled"}`` / ``{"type": "expired"}``;
2. params the Messages API refuses: ``errored`` with ``invalid_request_error`` (params are checked only now, as
   the real API checks them asynchronously);
3. fated to fail (``error_rate``): ``errored``, cycling through ``rate_limit_error``, ``overloaded_error``,
   ``api_error`` (retryable) and ``invalid_request_error`` (not);
4. otherwise ``succeeded`` with a fake Message.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batcher.emulator.anthropic_models import InvalidParams, PromptCache, check_params, fake_message, stable_id
from batcher.emulator.results import ShuffledWriter, line_malformed, request_fails
from batcher.emulator.seeding import stable_int

logger = logging.getLogger(__name__)

__all__ = ["FAILURE_TYPES", "ResultCounts", "ResultsPlan", "write_results"]

#: error types of fated failures, in the order they are handed out
FAILURE_TYPES = ("rate_limit_error", "overloaded_error", "api_error", "invalid_request_error")
_FAILURE_MESSAGES = {
    "rate_limit_error": "This request would exceed the rate limit for your organization. Please try again later.",
    "overloaded_error": "Overloaded",
    "api_error": "Internal server error",
    "invalid_request_error": "prompt is too long: 210345 tokens > 200000 maximum",
}


@dataclass(frozen=True, slots=True)
class ResultsPlan:
    """Everything :func:`write_results` needs.

    Attributes:
        batch_id: The batch's id; message and request ids derive from it.
        ordinal: Creation number of the batch in this emulator run (drives fates and shuffling).
        seed: Emulator seed.
        error_rate: Fraction of requests fated to fail.
        done_count: Requests (in input order) that ran; the rest get ``unfinished``.
        unfinished: ``canceled`` or ``expired``, the result type of requests that did not run.
        requests_path: The stored ``{"custom_id", "params"}`` lines.
        results_path: Where to write the results.
        cache: Prompt prefixes seen so far, shared with the real-time endpoint.
        malformed_rate: Fraction of result lines written unreadable.
    """

    batch_id: str
    ordinal: int
    seed: int
    error_rate: float
    done_count: int
    unfinished: str
    requests_path: Path
    results_path: Path
    cache: PromptCache
    malformed_rate: float = 0.0


@dataclass(slots=True)
class ResultCounts:
    """Results by type; they make the batch's ``request_counts`` once it has ended."""

    succeeded: int = 0
    errored: int = 0
    canceled: int = 0
    expired: int = 0

    def as_json(self) -> dict[str, int]:
        """The ended batch's ``request_counts``."""
        return {
            "processing": 0,
            "succeeded": self.succeeded,
            "errored": self.errored,
            "canceled": self.canceled,
            "expired": self.expired,
        }


def _errored(batch_id: str, custom_id: str, error_type: str, message: str) -> dict[str, Any]:
    return {
        "type": "errored",
        "error": {
            "type": "error",
            "error": {"type": error_type, "message": message},
            "request_id": stable_id("req_", batch_id, custom_id),
        },
    }


def write_results(plan: ResultsPlan) -> ResultCounts:
    """Run every stored request of a batch and write its results file.

    Returns:
        The results by type.
    """
    counts = ResultCounts()
    failures = 0
    index = 0
    with plan.requests_path.open("rb") as source, plan.results_path.open("wb") as out_fh:
        out = ShuffledWriter(
            out_fh,
            random.Random(stable_int(plan.seed, plan.ordinal, "anthropic-shuffle")),
            lambda custom_id: line_malformed(plan.seed, plan.ordinal, custom_id, plan.malformed_rate),
        )
        for raw in source:
            if not raw.strip():
                continue
            request = orjson.loads(raw)
            custom_id: str = request["custom_id"]
            params: dict[str, Any] = request["params"]
            index += 1
            result: dict[str, Any]
            if index > plan.done_count:
                result = {"type": plan.unfinished}
                if plan.unfinished == "canceled":
                    counts.canceled += 1
                else:
                    counts.expired += 1
                out.write({"custom_id": custom_id, "result": result})
                continue
            try:
                check_params(params, in_batch=True)
            except InvalidParams as exc:
                counts.errored += 1
                out.write(
                    {
                        "custom_id": custom_id,
                        "result": _errored(plan.batch_id, custom_id, "invalid_request_error", exc.message),
                    }
                )
                continue
            if request_fails(plan.seed, plan.ordinal, custom_id, plan.error_rate):
                error_type = FAILURE_TYPES[failures % len(FAILURE_TYPES)]
                failures += 1
                counts.errored += 1
                result = _errored(plan.batch_id, custom_id, error_type, _FAILURE_MESSAGES[error_type])
                out.write({"custom_id": custom_id, "result": result})
                continue
            message, _ = fake_message(
                params,
                seed=plan.seed,
                request_key=f"{plan.batch_id}:{custom_id}",
                cache=plan.cache,
                service_tier="batch",
            )
            counts.succeeded += 1
            out.write({"custom_id": custom_id, "result": {"type": "succeeded", "message": message}})
        out.flush()
    return counts
