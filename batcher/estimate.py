"""Estimate a batch file's cost before spending anything (``batcher submit --dry-run``).

Input tokens of OpenAI requests are counted with OpenAI's own BPE vocabularies (``bpe-openai``, a
tiktoken-compatible tokenizer that ships them; tiktoken itself downloads them at run time), plus the
chat format's per-message overhead. Other providers' input is approximated as one token per four
characters of text. Output is bounded by the request's ``max_tokens`` / ``max_completion_tokens`` /
``max_output_tokens`` (the largest, if it gives several), times the completions it asks for (``n``,
``best_of``); a request with no bound is counted at :data:`DEFAULT_OUTPUT_TOKENS`. Embeddings and
moderations produce no output tokens. The estimate is therefore an upper bound on output and close on input.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import orjson

from batcher.domain import Provider
from batcher.intake import OPENAI_TOKEN_FIELDS, CheckedLines, open_batch_file
from batcher.packer import split
from batcher.pricing import PriceBook, TokenUsage
from batcher.providers.base import Limits
from batcher.providers.limits import DEFAULT_LIMITS

logger = logging.getLogger(__name__)

#: output tokens assumed for a request that sets no output bound
DEFAULT_OUTPUT_TOKENS = 256
#: tokens the chat format adds per message and per reply (OpenAI's published rule of thumb)
PER_MESSAGE_TOKENS = 3
PER_REPLY_TOKENS = 3


@functools.lru_cache(maxsize=32)
def _encoding(model: str) -> Any:
    # bpe-openai reads its bundled vocabularies through importlib.resources' deprecated open_binary
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai

        try:
            return bpe_openai.encoding_for_model(model)
        except Exception:  # unknown model names: the current default vocabulary
            return bpe_openai.get_encoding("o200k_base")


def _texts(value: Any) -> Iterator[str]:
    """Every piece of text inside a request field (strings, content parts, nested lists)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        for key in ("text", "content", "input", "prompt"):
            if key in value:
                yield from _texts(value[key])


def count_input_tokens(provider: Provider, endpoint: str, body: Mapping[str, Any]) -> int:
    """Input tokens of one request (exact BPE counts for OpenAI text, an approximation otherwise)."""
    if provider is Provider.OPENAI:
        enc = _encoding(str(body.get("model", "")))

        def count(text: str) -> int:
            return len(enc.encode(text))
    else:

        def count(text: str) -> int:
            return (len(text) + 3) // 4

    if "messages" in body:
        messages = body["messages"] if isinstance(body["messages"], list) else []
        total = sum(PER_MESSAGE_TOKENS + sum(count(t) for t in _texts(m)) for m in messages) + PER_REPLY_TOKENS
        if "system" in body:  # Anthropic's system prompt sits beside the messages
            total += sum(count(t) for t in _texts(body["system"]))
        return total
    for key in ("input", "prompt"):
        if key in body:
            return sum(count(t) for t in _texts(body[key]))
    return 0


def _count(value: Any) -> int | None:
    """A whole number of tokens or choices as intake takes them (an integer, not a bool), else ``None``."""
    return value if type(value) is int else None


def max_output_tokens(endpoint: str, body: Mapping[str, Any]) -> int:
    """The most output tokens a request can produce: its bound (the largest, where it gives several), or the
    documented default, times the completions it asks for (``n``; ``best_of`` on ``/v1/completions``, which
    are all generated and billed)."""
    if endpoint in ("/v1/embeddings", "/v1/moderations"):
        return 0
    bounds = [n for key in OPENAI_TOKEN_FIELDS if (n := _count(body.get(key))) is not None and n >= 1]
    bound = max(bounds) if bounds else DEFAULT_OUTPUT_TOKENS
    choices = max((n for key in ("n", "best_of") if (n := _count(body.get(key))) is not None), default=1)
    return bound * max(choices, 1)


@dataclass
class ModelEstimate:
    endpoint: str
    model: str
    jobs: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    batches: int = 0
    batch_usd: Decimal | None = Decimal(0)
    realtime_usd: Decimal | None = Decimal(0)
    sizes: list[tuple[str, int, int]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "model": self.model,
            "jobs": self.jobs,
            "batches": self.batches,
            "input_tokens": self.input_tokens,
            "max_output_tokens": self.output_tokens,
            "batch_usd": None if self.batch_usd is None else str(self.batch_usd),
            "realtime_usd": None if self.realtime_usd is None else str(self.realtime_usd),
        }


@dataclass
class Estimate:
    """What a file would make: jobs, batches, tokens and cost at batch and real-time prices."""

    groups: list[ModelEstimate]
    #: invalid lines skipped (written to the rejects file)
    rejected: int = 0

    @property
    def jobs(self) -> int:
        return sum(g.jobs for g in self.groups)

    @property
    def batches(self) -> int:
        return sum(g.batches for g in self.groups)

    @property
    def unpriced_models(self) -> list[str]:
        return sorted({g.model for g in self.groups if g.batch_usd is None})

    def total(self, attr: str) -> Decimal:
        return sum((getattr(g, attr) for g in self.groups if getattr(g, attr) is not None), Decimal(0))

    def to_json(self) -> dict[str, Any]:
        batch, realtime = self.total("batch_usd"), self.total("realtime_usd")
        return {
            "jobs": self.jobs,
            "batches": self.batches,
            "batch_usd": str(batch),
            "realtime_usd": str(realtime),
            "saved_usd": str(realtime - batch),
            "rejected": self.rejected,
            "unpriced_models": self.unpriced_models,
            "groups": [g.to_json() for g in self.groups],
        }


def estimate_file(
    path: Path,
    provider: Provider,
    prices: PriceBook,
    *,
    limits: Limits | None = None,
    price_provider: str | None = None,
    rejects_path: Path | None = None,
) -> Estimate:
    """Read a batch file as intake would (same checks, same errors) and estimate it; stores nothing.

    Args:
        rejects_path: as intake's skip-invalid: estimate the valid lines and write each invalid one, with its
            reason, to this JSONL file (``Estimate.rejected`` counts them).

    Raises:
        InvalidFile: invalid lines, each named (without ``rejects_path``).
        InvalidInput: the file cannot be read.
    """
    limits = limits or DEFAULT_LIMITS[provider]
    groups: dict[tuple[str, str], ModelEstimate] = {}
    rejects: IO[bytes] | None = None
    fh = open_batch_file(path)
    try:
        if rejects_path is not None:
            rejects = rejects_path.open("wb")
        lines = CheckedLines(fh, provider, limits, rejects=rejects)
        for parsed in lines:
            if lines.errors:
                continue  # refused already: keep reading only to list the problems
            body = orjson.loads(parsed.body_json)
            group = groups.setdefault((parsed.endpoint, parsed.model), ModelEstimate(parsed.endpoint, parsed.model))
            usage = TokenUsage(
                input_tokens=count_input_tokens(provider, parsed.endpoint, body),
                output_tokens=max_output_tokens(parsed.endpoint, body),
            )
            group.jobs += 1
            group.input_tokens += usage.input_tokens
            group.output_tokens += usage.output_tokens
            group.sizes.append((parsed.custom_id, parsed.body_bytes, parsed.inputs))
    finally:
        fh.close()
        if rejects is not None:
            rejects.close()
    refusal = lines.refusal(path)
    if refusal is not None:
        raise refusal
    for group in groups.values():
        group.batches = len(split(group.sizes, limits, keep_partial=True))
        group.sizes = []
        cost = prices.cost(
            price_provider or provider.value,
            group.model,
            TokenUsage(input_tokens=group.input_tokens, output_tokens=group.output_tokens),
            mode="batch",
        )
        group.batch_usd, group.realtime_usd = cost.actual_usd, cost.realtime_usd
    return Estimate(sorted(groups.values(), key=lambda g: (g.endpoint, g.model)), rejected=lines.error_count)
