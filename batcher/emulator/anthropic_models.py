"""Deterministic fake Claude behind the emulated Messages and Message Batches API.

The answer to a request is derived from a hash of its params and the emulator seed, so the same params give the
same text in every run; the message id is derived from a per-request key. Tokens follow the rule the OpenAI fakes
use (:mod:`batcher.emulator.fake_models`): ``ceil(characters / 4)`` per text, 85 per image, and the JSON length
for other blocks (tool definitions, tool use and results, documents).

Prompt caching: the prompt is read in Anthropic's cache order — ``tools``, then ``system``, then each message's
content — and the prefix up to the last block carrying ``cache_control`` is the cacheable part. The first request
with a given (model, prefix) writes it (``cache_creation_input_tokens``); later ones read it
(``cache_read_input_tokens``); ``input_tokens`` counts only what follows the prefix, as Anthropic reports it.
Unlike the real API there is no minimum cacheable length, so short test prompts show cache tokens too.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import string
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from batcher.emulator.seeding import stable_int

logger = logging.getLogger(__name__)

__all__ = [
    "InvalidParams",
    "MessageUsage",
    "PromptCache",
    "PromptTokens",
    "check_params",
    "fake_message",
    "new_id",
    "prompt_tokens",
    "stable_id",
]

_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
_ID_CHARS = 22
_IMAGE_TOKENS = 85
_MIN_WORDS, _MAX_WORDS = 6, 40
_ROLES = ("user", "assistant")
_CACHE_TTLS = ("5m", "1h")
_WORDS = (
    "claude",
    "batch",
    "message",
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
    "emulated",
    "answer",
    "token",
    "queue",
    "ledger",
    "saving",
    "window",
    "result",
    "request",
    "cache",
    "prefix",
    "output",
    "input",
)


def _base62(number: int, length: int) -> str:
    chars = []
    for _ in range(length):
        number, digit = divmod(number, 62)
        chars.append(_BASE62[digit])
    return "".join(chars)


def stable_id(prefix: str, *parts: object) -> str:
    """An Anthropic-shaped id (``msg_01`` and 22 base62 characters) derived from ``parts``."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=24).digest()
    return f"{prefix}01{_base62(int.from_bytes(digest, 'big'), _ID_CHARS)}"


def new_id(prefix: str) -> str:
    """A fresh random Anthropic-shaped id, e.g. ``new_id("msgbatch_")``."""
    return f"{prefix}01{_base62(random.SystemRandom().getrandbits(136), _ID_CHARS)}"


# --------------------------------------------------------------------------- validation


class InvalidParams(Exception):
    """Params the Messages API would refuse with ``invalid_request_error``.

    Args:
        message: Anthropic-style message, starting with the field's path (``max_tokens: …``).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _check_int(params: Mapping[str, Any], name: str) -> None:
    value = params.get(name)
    if name not in params:
        raise InvalidParams(f"{name}: Field required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParams(f"{name}: Input should be a valid integer")
    if value < 1:
        raise InvalidParams(f"{name}: Input should be greater than or equal to 1")


def _check_messages(messages: object) -> None:
    if messages is None:
        raise InvalidParams("messages: Field required")
    if not isinstance(messages, list):
        raise InvalidParams("messages: Input should be a valid list")
    if not messages:
        raise InvalidParams("messages: at least one message is required")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidParams(f"messages.{index}: Input should be a valid dictionary")
        if message.get("role") not in _ROLES:
            raise InvalidParams(f"messages.{index}.role: Input should be 'user' or 'assistant'")
        if "content" not in message:
            raise InvalidParams(f"messages.{index}.content: Field required")
        content = message["content"]
        if not isinstance(content, str | list):
            raise InvalidParams(f"messages.{index}.content: Input should be a valid string or list")
        if isinstance(content, list):
            for block_index, block in enumerate(content):
                if not isinstance(block, Mapping) or not isinstance(block.get("type"), str):
                    raise InvalidParams(
                        f"messages.{index}.content.{block_index}: Input should be a content block with a 'type'"
                    )


def check_params(params: Mapping[str, Any], *, in_batch: bool) -> None:
    """Check Messages create params the way the API would before running them.

    Args:
        params: The request's params (a Message Batches request's ``params``, or a ``POST /v1/messages`` body).
        in_batch: The params come from a batch, where streaming is refused with a batch-specific message.

    Raises:
        InvalidParams: The API would answer ``invalid_request_error``; in a batch this becomes an ``errored``
            result.
    """
    model = params.get("model")
    if "model" not in params:
        raise InvalidParams("model: Field required")
    if not isinstance(model, str) or not model:
        raise InvalidParams("model: Input should be a non-empty string")
    _check_int(params, "max_tokens")
    _check_messages(params.get("messages"))
    system = params.get("system")
    if system is not None and not isinstance(system, str | list):
        raise InvalidParams("system: Input should be a valid string or list")
    if params.get("stream"):
        if in_batch:
            raise InvalidParams("stream: streaming is not supported for requests in a Message Batch")
        raise InvalidParams("stream: the emulator does not stream responses; omit 'stream' or set it to false")


# --------------------------------------------------------------------------- tokens and caching


def _text_tokens(chars: int) -> int:
    return math.ceil(chars / 4)


def _block_tokens(block: object) -> int:
    if isinstance(block, str):
        return _text_tokens(len(block))
    if not isinstance(block, Mapping):
        return 0
    text = block.get("text")
    if isinstance(text, str):
        return _text_tokens(len(text))
    if block.get("type") == "image":
        return _IMAGE_TOKENS
    if block.get("type") == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return sum(_block_tokens(item) for item in content)
        return _block_tokens(content)
    return _text_tokens(len(orjson.dumps(block)))


def _prompt_blocks(params: Mapping[str, Any]) -> list[object]:
    """Every part of the prompt in Anthropic's cache order: tools, system, then each message's content."""
    blocks: list[object] = []
    tools = params.get("tools")
    if isinstance(tools, list):
        blocks.extend(tools)
    system = params.get("system")
    if isinstance(system, str | Mapping):
        blocks.append(system)
    elif isinstance(system, list):
        blocks.extend(system)
    messages = params.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, list):
                blocks.extend(content)
            elif content is not None:
                blocks.append(content)
    return blocks


@dataclass(frozen=True, slots=True)
class PromptTokens:
    """The prompt's size and its cacheable prefix.

    Attributes:
        total: Tokens of the whole prompt (at least 1).
        cached_prefix: Tokens up to and including the last ``cache_control`` block (0: no breakpoint).
        cache_ttl: The last breakpoint's ``ttl`` (``5m`` or ``1h``).
        prefix_key: Identifies the prefix (model and blocks), for :class:`PromptCache`; empty without a prefix.
    """

    total: int
    cached_prefix: int = 0
    cache_ttl: str = "5m"
    prefix_key: bytes = b""


def prompt_tokens(params: Mapping[str, Any]) -> PromptTokens:
    """Count the prompt tokens of Messages params and find the cacheable prefix."""
    model = params.get("model")
    hasher = hashlib.blake2b(str(model).encode(), digest_size=16)
    total = 0
    prefix, ttl, key = 0, "5m", b""
    for block in _prompt_blocks(params):
        total += _block_tokens(block)
        hasher.update(orjson.dumps(block, option=orjson.OPT_SORT_KEYS))
        control = block.get("cache_control") if isinstance(block, Mapping) else None
        if isinstance(control, Mapping):
            prefix = total
            requested = control.get("ttl")
            ttl = requested if isinstance(requested, str) and requested in _CACHE_TTLS else "5m"
            key = hasher.copy().digest()
    return PromptTokens(total=max(1, total), cached_prefix=prefix, cache_ttl=ttl, prefix_key=key)


class PromptCache:
    """Which prompt prefixes were written already; bounded, least recently used out first. Thread-safe.

    Args:
        max_entries: Prefixes remembered at most.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def hit(self, key: bytes) -> bool:
        """Whether ``key`` was cached already; remembers it either way."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            self._entries[key] = None
            if len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
            return False

    def clear(self) -> None:
        """Forget every prefix."""
        with self._lock:
            self._entries.clear()


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True, slots=True)
class MessageUsage:
    """Token usage of one Message, as Anthropic splits it."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_ttl: str = "5m"

    def as_json(self, service_tier: str) -> dict[str, Any]:
        """The ``usage`` object of a Message."""
        created = self.cache_creation_input_tokens
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": created,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": created if self.cache_ttl == "5m" else 0,
                "ephemeral_1h_input_tokens": created if self.cache_ttl == "1h" else 0,
            },
            "output_tokens": self.output_tokens,
            "service_tier": service_tier,
        }


def _usage(tokens: PromptTokens, output_tokens: int, cache: PromptCache | None) -> MessageUsage:
    if not tokens.cached_prefix or cache is None:
        return MessageUsage(input_tokens=tokens.total, output_tokens=output_tokens)
    hit = cache.hit(tokens.prefix_key)
    return MessageUsage(
        input_tokens=tokens.total - tokens.cached_prefix,
        output_tokens=output_tokens,
        cache_creation_input_tokens=0 if hit else tokens.cached_prefix,
        cache_read_input_tokens=tokens.cached_prefix if hit else 0,
        cache_ttl=tokens.cache_ttl,
    )


def _stop_sequences(params: Mapping[str, Any]) -> Sequence[str]:
    value = params.get("stop_sequences")
    return [s for s in value if isinstance(s, str)] if isinstance(value, list) else []


def fake_message(
    params: Mapping[str, Any], *, seed: int, request_key: str, cache: PromptCache | None, service_tier: str
) -> tuple[dict[str, Any], MessageUsage]:
    """Answer Messages params with a deterministic Message.

    Args:
        params: Checked params (see :func:`check_params`); ``model`` is echoed.
        seed: Emulator seed; the text depends on it and on the params only.
        request_key: Unique key of this request (batch id and custom_id); the message id derives from it.
        cache: Prompt prefixes seen so far (``None``: no caching).
        service_tier: ``batch`` for Message Batches results, ``standard`` for real-time calls.

    Returns:
        The Message JSON and its usage.
    """
    canonical = orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.blake2b(canonical, digest_size=16).hexdigest()
    rng = random.Random(stable_int(seed, "anthropic", digest))
    natural = rng.randint(_MIN_WORDS, _MAX_WORDS)
    cap = params.get("max_tokens")
    cap = cap if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1 else natural
    truncated = natural > cap
    count = min(natural, cap)
    words = [digest[:8], *(rng.choice(_WORDS) for _ in range(count - 1))][:count]
    stop_reason = "max_tokens" if truncated else "end_turn"
    stop_sequence = None
    stops = _stop_sequences(params)
    if stops and not truncated and rng.random() < 0.25:
        stop_reason, stop_sequence = "stop_sequence", stops[0]
    text = " ".join(words) + ("" if truncated or stop_sequence else ".")
    usage = _usage(prompt_tokens(params), count, cache)
    message = {
        "id": stable_id("msg_", request_key),
        "type": "message",
        "role": "assistant",
        "model": params.get("model"),
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage.as_json(service_tier),
    }
    return message, usage
