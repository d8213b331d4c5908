"""Validation of a batch input file, the way OpenAI reports it at ``validating`` time.

Synchronous and streaming: the file is read line by line (callers run it in a thread), so memory
grows only with the set of ``custom_id`` values, which duplicate detection needs anyway.

Error codes follow what OpenAI reports in ``errors.data`` (``invalid_json_line``,
``duplicate_custom_id``, ``url_mismatch``, ``model_mismatch``, ``empty_file``, ``too_many_tasks``);
line numbers are 1-based physical lines. Blank lines are skipped but still counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from batcher.emulator.fake_models import InvalidBody, check_body, count_embedding_inputs, estimate_prompt_tokens

logger = logging.getLogger(__name__)

__all__ = ["MAX_EMBEDDING_INPUTS", "MAX_REPORTED_ERRORS", "ValidationOutcome", "batch_error", "validate_input_file"]

MAX_REPORTED_ERRORS = 100
MAX_EMBEDDING_INPUTS = 50_000
_REQUIRED_FIELDS = ("custom_id", "method", "url", "body")
_MODEL_OPTIONAL = frozenset({"/v1/moderations"})


def batch_error(code: str, message: str, *, param: str | None = None, line: int | None = None) -> dict[str, Any]:
    """One entry of a batch's ``errors.data``."""
    return {"code": code, "message": message, "param": param, "line": line}


@dataclass(slots=True)
class ValidationOutcome:
    """What validation learned about an input file.

    Attributes:
        errors: ``errors.data`` entries; empty when the file is valid. At most
            :data:`MAX_REPORTED_ERRORS` are kept.
        total: Number of requests.
        model: The single model of the file (``None`` if none was found).
        prompt_tokens: Estimated prompt tokens of all requests (for the enqueued-token limit).
        expected_failures: Requests that will fail (invalid bodies plus fated failures).
        custom_ids: Every ``custom_id``, in input order.
    """

    errors: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    model: str | None = None
    prompt_tokens: int = 0
    expected_failures: int = 0
    custom_ids: list[str] = field(default_factory=list)

    def add_error(self, error: dict[str, Any]) -> None:
        """Record an error, keeping at most :data:`MAX_REPORTED_ERRORS`."""
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error)


def _check_line(
    request: Mapping[str, Any], line: int, endpoint: str, seen: set[str], outcome: ValidationOutcome
) -> tuple[str, Mapping[str, Any]] | None:
    """Check one parsed line; record an error and return ``None`` if it is invalid."""
    for name in _REQUIRED_FIELDS:
        if name not in request or request[name] is None:
            outcome.add_error(
                batch_error(
                    "missing_required_parameter", f"Missing required parameter: '{name}'.", param=name, line=line
                )
            )
            return None
    custom_id, method, url, body = (request[name] for name in _REQUIRED_FIELDS)
    if not isinstance(custom_id, str) or not custom_id:
        outcome.add_error(
            batch_error("invalid_type", "The custom_id must be a non-empty string.", param="custom_id", line=line)
        )
        return None
    if method != "POST":
        outcome.add_error(
            batch_error(
                "invalid_value",
                f"Invalid value for 'method': {method!r}. Only 'POST' is supported.",
                param="method",
                line=line,
            )
        )
        return None
    if url != endpoint:
        outcome.add_error(
            batch_error(
                "url_mismatch",
                f"The URL provided for this request ({url!r}) does not match the batch endpoint ({endpoint!r}).",
                param="url",
                line=line,
            )
        )
        return None
    if not isinstance(body, Mapping):
        outcome.add_error(batch_error("invalid_type", "The body must be a JSON object.", param="body", line=line))
        return None
    if custom_id in seen:
        outcome.add_error(
            batch_error(
                "duplicate_custom_id",
                "The custom_id for this request is a duplicate of another request. "
                "The custom_id parameter must be unique for each request in a batch.",
                param="custom_id",
                line=line,
            )
        )
        return None
    return custom_id, body


def _check_model(body: Mapping[str, Any], line: int, endpoint: str, outcome: ValidationOutcome) -> bool:
    model = body.get("model")
    if model is None and endpoint in _MODEL_OPTIONAL:
        model = "omni-moderation-latest"
    if model is None:
        outcome.add_error(
            batch_error(
                "missing_required_parameter", "Missing required parameter: 'model'.", param="body.model", line=line
            )
        )
        return False
    if not isinstance(model, str) or not model:
        outcome.add_error(
            batch_error("invalid_type", "The model must be a non-empty string.", param="body.model", line=line)
        )
        return False
    if outcome.model is None:
        outcome.model = model
    elif model != outcome.model:
        outcome.add_error(
            batch_error(
                "model_mismatch",
                f"The model {model!r} of this request does not match the model {outcome.model!r} of the other "
                "requests. A batch input file may contain requests for only one model.",
                param="body.model",
                line=line,
            )
        )
        return False
    return True


def validate_input_file(
    path: Path,
    endpoint: str,
    *,
    max_requests: int,
    max_bytes: int,
    fails: Callable[[str], bool],
) -> ValidationOutcome:
    """Validate a batch input file line by line.

    Args:
        path: The JSONL file.
        endpoint: The batch's endpoint; every line's ``url`` must equal it.
        max_requests: Most requests allowed.
        max_bytes: Largest file allowed, in bytes.
        fails: Whether the request with this ``custom_id`` is fated to fail (to count expected failures).

    Returns:
        The outcome; ``outcome.errors`` is empty when the file is valid.
    """
    outcome = ValidationOutcome()
    size = path.stat().st_size
    if size > max_bytes:
        outcome.add_error(
            batch_error(
                "file_too_large",
                f"The input file is {size} bytes, larger than the maximum of {max_bytes} bytes for a batch.",
            )
        )
        return outcome
    seen: set[str] = set()
    embedding_inputs = 0
    lines = 0
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            lines += 1
            if lines > max_requests:
                outcome.add_error(
                    batch_error(
                        "too_many_tasks",
                        f"The batch input file contains more than the maximum of {max_requests} requests.",
                        line=line_no,
                    )
                )
                break
            try:
                request = orjson.loads(raw)
            except orjson.JSONDecodeError:
                outcome.add_error(
                    batch_error("invalid_json_line", "This line is not parseable as valid JSON.", line=line_no)
                )
                continue
            if not isinstance(request, dict):
                outcome.add_error(batch_error("invalid_json_line", "This line is not a JSON object.", line=line_no))
                continue
            checked = _check_line(request, line_no, endpoint, seen, outcome)
            if checked is None:
                continue
            custom_id, body = checked
            seen.add(custom_id)
            if not _check_model(body, line_no, endpoint, outcome):
                continue
            if endpoint == "/v1/embeddings":
                embedding_inputs += count_embedding_inputs(body)
                if embedding_inputs > MAX_EMBEDDING_INPUTS:
                    outcome.add_error(
                        batch_error(
                            "too_many_tasks",
                            f"The batch contains more than the maximum of {MAX_EMBEDDING_INPUTS} embedding inputs.",
                            line=line_no,
                        )
                    )
                    break
            outcome.total += 1
            outcome.custom_ids.append(custom_id)
            outcome.prompt_tokens += estimate_prompt_tokens(endpoint, body)
            try:
                check_body(endpoint, body)
            except InvalidBody:
                outcome.expected_failures += 1
            else:
                if fails(custom_id):
                    outcome.expected_failures += 1
    if outcome.total == 0 and not outcome.errors:
        outcome.add_error(batch_error("empty_file", "The batch input file is empty."))
    return outcome
