"""Deterministic fake models behind the emulated batch endpoints.

A response is derived from a hash of the request body and the emulator seed, so the same body gives
the same answer in every run; ids are derived from a per-request key. Token counts follow one rule
used everywhere (responses, the batch ``usage`` and the enqueued-token limit): a prompt costs
``ceil(characters / 4)`` tokens plus 85 per image part, a token array costs its length.

Supported endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``,
``/v1/embeddings`` and ``/v1/moderations``.
"""

from __future__ import annotations

import base64
import logging
import math
import random
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from batcher.emulator.seeding import stable_hex, stable_int

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EMBEDDING_DIMENSIONS",
    "SUPPORTED_ENDPOINTS",
    "InvalidBody",
    "TokenUsage",
    "check_body",
    "count_embedding_inputs",
    "estimate_prompt_tokens",
    "fake_response",
]

SUPPORTED_ENDPOINTS: frozenset[str] = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/moderations"}
)
DEFAULT_EMBEDDING_DIMENSIONS = 8
_MAX_EMBEDDING_DIMENSIONS = 3072
_IMAGE_TOKENS = 85
_MAX_NATURAL_TOKENS = 40
_MIN_NATURAL_TOKENS = 6
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the legacy completions API defaults max_tokens to 16
_CACHE_MIN_PROMPT_TOKENS = 1024
_REASONING_MODEL = re.compile(r"^(o\d|gpt-5|codex)")
_WORDS = [
    "batch",
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
    "emulated",
    "answer",
    "token",
    "queue",
    "ledger",
    "saving",
    "window",
    "result",
    "request",
    "model",
    "output",
    "input",
    "line",
    "cost",
    "price",
    "cache",
]
_MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token usage of one request, in the batch ``usage`` vocabulary."""

    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens


class InvalidBody(Exception):
    """A request body the real endpoint would answer with HTTP 400.

    Args:
        message: OpenAI-style message.
        param: The body parameter at fault.
        code: OpenAI error code.
    """

    def __init__(self, message: str, param: str | None, code: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


# --------------------------------------------------------------------------- token estimates


def _text_tokens(chars: int) -> int:
    return math.ceil(chars / 4)


def _content_tokens(content: object) -> int:
    """Tokens of a message ``content``: a string or a list of content parts."""
    if isinstance(content, str):
        return _text_tokens(len(content))
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += _text_tokens(len(part))
            elif isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    total += _text_tokens(len(text))
                elif str(part.get("type", "")).endswith("image") or part.get("type") == "image_url":
                    total += _IMAGE_TOKENS
        return total
    return 0


def _prompt_like_tokens(value: object) -> int:
    """Tokens of a completions ``prompt`` or embeddings ``input``: string, strings or token arrays."""
    if isinstance(value, str):
        return _text_tokens(len(value))
    if isinstance(value, list):
        if value and all(isinstance(item, int) for item in value):
            return len(value)
        return sum(_prompt_like_tokens(item) for item in value)
    return 0


def _responses_input_tokens(value: object) -> int:
    if isinstance(value, str):
        return _text_tokens(len(value))
    total = 0
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                total += _text_tokens(len(item))
            elif isinstance(item, Mapping):
                total += _content_tokens(item.get("content"))
                output = item.get("output")
                if isinstance(output, str):
                    total += _text_tokens(len(output))
                arguments = item.get("arguments")
                if isinstance(arguments, str):
                    total += _text_tokens(len(arguments))
    return total


def estimate_prompt_tokens(endpoint: str, body: Mapping[str, Any]) -> int:
    """Estimate the prompt tokens of a request body, as the fake models count them.

    Args:
        endpoint: Batch endpoint, e.g. ``/v1/chat/completions``.
        body: The request body of one input line.

    Returns:
        At least 1 token for a chat, completions or responses request; 0 or more otherwise.
    """
    if endpoint == "/v1/chat/completions":
        messages = body.get("messages")
        total = 0
        if isinstance(messages, list):
            for message in messages:
                if isinstance(message, Mapping):
                    total += _content_tokens(message.get("content"))
        return max(1, total)
    if endpoint == "/v1/completions":
        return max(1, _prompt_like_tokens(body.get("prompt")))
    if endpoint == "/v1/responses":
        total = _responses_input_tokens(body.get("input"))
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            total += _text_tokens(len(instructions))
        return max(1, total)
    if endpoint == "/v1/embeddings":
        return _prompt_like_tokens(body.get("input"))
    if endpoint == "/v1/moderations":
        return _content_tokens(body.get("input"))
    return 0


def count_embedding_inputs(body: Mapping[str, Any]) -> int:
    """Number of embedding inputs in an embeddings request (a token array counts as one)."""
    value = body.get("input")
    if isinstance(value, list) and value and not all(isinstance(item, int) for item in value):
        return len(value)
    return 1 if value not in (None, "", []) else 0


# --------------------------------------------------------------------------- body checks


def _require(body: Mapping[str, Any], param: str) -> object:
    value = body.get(param)
    if value is None:
        raise InvalidBody(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    return value


def _check_positive_int(body: Mapping[str, Any], param: str, maximum: int | None = None) -> None:
    value = body.get(param)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidBody(f"Invalid type for '{param}': expected an integer.", param, "invalid_type")
    if value < 1:
        raise InvalidBody(
            f"Invalid '{param}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
            param,
            "integer_below_min_value",
        )
    if maximum is not None and value > maximum:
        raise InvalidBody(
            f"Invalid '{param}': integer above maximum value. Expected a value <= {maximum}, but got {value} instead.",
            param,
            "integer_above_max_value",
        )


def check_body(endpoint: str, body: Mapping[str, Any]) -> None:
    """Check a request body the way the endpoint would before running it.

    Raises:
        InvalidBody: The endpoint would answer HTTP 400; the batch reports it in the error file.
    """
    if endpoint == "/v1/chat/completions":
        messages = _require(body, "messages")
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise InvalidBody("Invalid type for 'messages': expected an array of objects.", "messages", "invalid_type")
        if not messages:
            raise InvalidBody(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty "
                "array instead.",
                "messages",
                "empty_array",
            )
        _check_positive_int(body, "max_tokens")
        _check_positive_int(body, "max_completion_tokens")
        _check_positive_int(body, "n", 128)
    elif endpoint == "/v1/completions":
        prompt = _require(body, "prompt")
        if not isinstance(prompt, str | list):
            raise InvalidBody("Invalid type for 'prompt': expected a string or an array.", "prompt", "invalid_type")
        _check_positive_int(body, "max_tokens")
        _check_positive_int(body, "n", 128)
    elif endpoint == "/v1/responses":
        value = _require(body, "input")
        if not isinstance(value, str | list):
            raise InvalidBody("Invalid type for 'input': expected a string or an array.", "input", "invalid_type")
        _check_positive_int(body, "max_output_tokens")
    elif endpoint in ("/v1/embeddings", "/v1/moderations"):
        value = _require(body, "input")
        if not isinstance(value, str | list) or value in ("", []):
            raise InvalidBody("'$.input' is invalid. Expected a non-empty string or array.", "input", "invalid_value")
        if endpoint == "/v1/embeddings":
            _check_positive_int(body, "dimensions", _MAX_EMBEDDING_DIMENSIONS)


# --------------------------------------------------------------------------- generation


def _body_draw(seed: int, endpoint: str, body: Mapping[str, Any]) -> tuple[random.Random, str]:
    """A random generator and an 8-hex tag, both derived from the seed and the canonical body."""
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS).hex()
    return random.Random(stable_int(seed, endpoint, canonical)), stable_hex(8, seed, endpoint, canonical)


@dataclass(frozen=True, slots=True)
class _Completion:
    text: str
    visible_tokens: int
    reasoning_tokens: int
    truncated: bool


def _complete(rng: random.Random, model: str, cap: int | None, tag: str) -> _Completion:
    """Draw one completion: visible words (one token each) plus reasoning tokens, within ``cap``."""
    natural = rng.randint(_MIN_NATURAL_TOKENS, _MAX_NATURAL_TOKENS)
    reasoning = rng.randint(16, 64) if _REASONING_MODEL.match(model) else 0
    truncated = False
    if cap is not None:
        if reasoning >= cap:
            reasoning, natural, truncated = cap, 0, True
        elif reasoning + natural > cap:
            natural, truncated = cap - reasoning, True
    words = [tag] + [rng.choice(_WORDS) for _ in range(max(natural - 1, 0))]
    text = " ".join(words[:natural]) + ("." if natural and not truncated else "")
    return _Completion(text=text, visible_tokens=natural, reasoning_tokens=reasoning, truncated=truncated)


def _cached_tokens(rng: random.Random, prompt_tokens: int) -> int:
    """Prompt caching applies from 1024 tokens, in 128-token steps; about half the long prompts hit."""
    if prompt_tokens < _CACHE_MIN_PROMPT_TOKENS or rng.random() < 0.5:
        return 0
    return (prompt_tokens // 2) // 128 * 128


def _cap(body: Mapping[str, Any], *params: str, default: int | None = None) -> int | None:
    for param in params:
        value = body.get(param)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return default


def _chat(body: Mapping[str, Any], model: str, seed: int, key: str, created: int) -> tuple[dict[str, Any], TokenUsage]:
    rng, tag = _body_draw(seed, "/v1/chat/completions", body)
    prompt_tokens = estimate_prompt_tokens("/v1/chat/completions", body)
    cap = _cap(body, "max_completion_tokens", "max_tokens")
    n = _cap(body, "n", default=1) or 1
    choices: list[dict[str, Any]] = []
    visible = reasoning = 0
    for index in range(n):
        completion = _complete(rng, model, cap, tag)
        visible += completion.visible_tokens
        reasoning += completion.reasoning_tokens
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": completion.text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "length" if completion.truncated else "stop",
            }
        )
    cached = _cached_tokens(rng, prompt_tokens)
    completion_tokens = visible + reasoning
    response = {
        "id": f"chatcmpl-{stable_hex(29, key, 'chatcmpl')}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_emulator",
    }
    return response, TokenUsage(prompt_tokens, cached, completion_tokens, reasoning)


def _completions(
    body: Mapping[str, Any], model: str, seed: int, key: str, created: int
) -> tuple[dict[str, Any], TokenUsage]:
    rng, tag = _body_draw(seed, "/v1/completions", body)
    prompt = body.get("prompt")
    prompts = prompt if isinstance(prompt, list) and not all(isinstance(p, int) for p in prompt) else [prompt]
    prompt_tokens = estimate_prompt_tokens("/v1/completions", body)
    cap = _cap(body, "max_tokens", default=_COMPLETIONS_DEFAULT_MAX_TOKENS)
    n = _cap(body, "n", default=1) or 1
    choices: list[dict[str, Any]] = []
    completion_tokens = 0
    for index in range(len(prompts) * n):
        completion = _complete(rng, model, cap, tag)
        completion_tokens += completion.visible_tokens + completion.reasoning_tokens
        choices.append(
            {
                "text": completion.text,
                "index": index,
                "logprobs": None,
                "finish_reason": "length" if completion.truncated else "stop",
            }
        )
    response = {
        "id": f"cmpl-{stable_hex(29, key, 'cmpl')}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": "fp_emulator",
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    return response, TokenUsage(prompt_tokens, 0, completion_tokens, 0)


def _responses(
    body: Mapping[str, Any], model: str, seed: int, key: str, created: int
) -> tuple[dict[str, Any], TokenUsage]:
    rng, tag = _body_draw(seed, "/v1/responses", body)
    input_tokens = estimate_prompt_tokens("/v1/responses", body)
    cap = _cap(body, "max_output_tokens")
    completion = _complete(rng, model, cap, tag)
    cached = _cached_tokens(rng, input_tokens)
    output: list[dict[str, Any]] = []
    if completion.reasoning_tokens:
        output.append({"type": "reasoning", "id": f"rs_{stable_hex(48, key, 'rs')}", "summary": []})
    output.append(
        {
            "type": "message",
            "id": f"msg_{stable_hex(48, key, 'msg')}",
            "status": "incomplete" if completion.truncated else "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": completion.text, "annotations": [], "logprobs": []}],
        }
    )
    output_tokens = completion.visible_tokens + completion.reasoning_tokens
    reasoning = body.get("reasoning")
    response = {
        "id": f"resp_{stable_hex(48, key, 'resp')}",
        "object": "response",
        "created_at": created,
        "status": "incomplete" if completion.truncated else "completed",
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if completion.truncated else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": reasoning if isinstance(reasoning, Mapping) else {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text", {"format": {"type": "text"}}),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": completion.reasoning_tokens},
            "total_tokens": input_tokens + output_tokens,
        },
        "user": body.get("user"),
        "metadata": body.get("metadata", {}),
    }
    return response, TokenUsage(input_tokens, cached, output_tokens, completion.reasoning_tokens)


def _embedding(item: object, seed: int, dimensions: int) -> list[float]:
    rng = random.Random(stable_int(seed, "embedding", orjson.dumps(item).hex(), dimensions))
    vector = [rng.uniform(-1.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [round(x / norm, 6) for x in vector]


def _embeddings(body: Mapping[str, Any], model: str, seed: int) -> tuple[dict[str, Any], TokenUsage]:
    value = body.get("input")
    items = value if isinstance(value, list) and not all(isinstance(i, int) for i in value) else [value]
    dimensions = _cap(body, "dimensions", default=DEFAULT_EMBEDDING_DIMENSIONS) or DEFAULT_EMBEDDING_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        vector = _embedding(item, seed, dimensions)
        embedding: list[float] | str = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode("ascii") if as_base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = estimate_prompt_tokens("/v1/embeddings", body)
    response = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return response, TokenUsage(tokens, 0, 0, 0)


def _moderations(body: Mapping[str, Any], model: str, seed: int, key: str) -> tuple[dict[str, Any], TokenUsage]:
    value = body.get("input")
    items = value if isinstance(value, list) and all(isinstance(i, str) for i in value) else [value]
    results: list[dict[str, Any]] = []
    for item in items:
        rng = random.Random(stable_int(seed, "moderation", orjson.dumps(item).hex()))
        results.append(
            {
                "flagged": False,
                "categories": dict.fromkeys(_MODERATION_CATEGORIES, False),
                "category_scores": {c: round(rng.uniform(0.0, 0.001), 8) for c in _MODERATION_CATEGORIES},
                "category_applied_input_types": {c: ["text"] for c in _MODERATION_CATEGORIES},
            }
        )
    response = {"id": f"modr-{stable_hex(32, key, 'modr')}", "model": model, "results": results}
    return response, TokenUsage()


def fake_response(
    endpoint: str, body: Mapping[str, Any], *, seed: int, request_key: str, created: int
) -> tuple[dict[str, Any], TokenUsage]:
    """Answer one request body the way the endpoint would, deterministically.

    Args:
        endpoint: One of :data:`SUPPORTED_ENDPOINTS`.
        body: The request body; its ``model`` is echoed.
        seed: Emulator seed; the content depends on it and on the body only.
        request_key: Unique key of this request (e.g. batch id and custom_id); ids derive from it.
        created: Unix seconds to put in ``created``/``created_at``.

    Returns:
        The response body and its token usage.

    Raises:
        InvalidBody: The body is invalid for the endpoint (see :func:`check_body`).
        ValueError: ``endpoint`` is not supported.
    """
    check_body(endpoint, body)
    model = body.get("model")
    model_name = model if isinstance(model, str) else "omni-moderation-latest"
    if endpoint == "/v1/chat/completions":
        return _chat(body, model_name, seed, request_key, created)
    if endpoint == "/v1/completions":
        return _completions(body, model_name, seed, request_key, created)
    if endpoint == "/v1/responses":
        return _responses(body, model_name, seed, request_key, created)
    if endpoint == "/v1/embeddings":
        return _embeddings(body, model_name, seed)
    if endpoint == "/v1/moderations":
        return _moderations(body, model_name, seed, request_key)
    raise ValueError(f"unsupported endpoint {endpoint!r}")
