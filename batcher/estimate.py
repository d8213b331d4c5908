"""Estimate a batch file's cost before spending anything (``batcher submit --dry-run``).

Input tokens of OpenAI requests are counted with OpenAI's own BPE vocabularies (``bpe-openai``, a
tiktoken-compatible tokenizer that ships them; tiktoken itself downloads them at run time), plus the
chat format's per-message overhead; a text longer than the tokenizer takes at once is counted in pieces (see
:func:`count_text_tokens`). Other providers' input is approximated as one token per four characters of text.
Output is bounded by the request's ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` (the
largest, if it gives several), times the completions it asks for (``n``, ``best_of``); a request with no bound
is counted at the model's longest reply (:func:`model_max_output`). Embeddings and moderations produce no output
tokens. The estimate is therefore an upper bound on output and close on input.
"""

from __future__ import annotations

import functools
import logging
import re
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

#: the longest reply of OpenAI models whose documented maximum output is below their context window (OpenAI's
#: model pages). Whole names, optionally dated: a new variant (``gpt-4o-long-output``) is not assumed to share it.
KNOWN_MAX_OUTPUT: tuple[tuple[re.Pattern[str], int], ...] = tuple(
    (re.compile(rf"(?:{pattern})(?:-\d{{4}}-\d{{2}}-\d{{2}}|-\d{{4}})?"), tokens)
    for pattern, tokens in (
        (r"gpt-5(?:-mini|-nano)?", 128_000),
        (r"gpt-4\.1(?:-mini|-nano)?", 32_768),
        (r"gpt-4\.5-preview", 16_384),
        (r"gpt-4o(?:-mini)?|chatgpt-4o-latest", 16_384),
        (r"gpt-4-turbo(?:-preview)?|gpt-4-\d{4}-preview", 4_096),
        (r"gpt-4", 8_192),
        (r"gpt-3\.5-turbo", 4_096),
        (r"o1-mini", 65_536),
        (r"o1(?:-pro)?|o3(?:-mini|-pro)?|o4-mini", 100_000),
    )
)
#: the longest reply assumed of a model neither that table, the price overrides nor genai-prices know
FALLBACK_MAX_OUTPUT_TOKENS = 128_000
#: characters handed to the tokenizer at once (bpe-openai refuses a text of 1,000,000 characters or more, and
#: more tokens than its vocabulary's chunk limit: 200,000 for o200k, 4,096 for the oldest)
PIECE_CHARS = 100_000
#: tokens added per cut between two pieces, for a token the cut may have split in two or a merge it prevented
TOKENS_PER_CUT = 2
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


def _pieces(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of at most ``size`` characters, cut before a space where one is near the end."""
    start = 0
    while len(text) - start > size:
        end = start + size
        space = text.rfind(" ", start + size // 2, end)
        end = space if space > start else end
        yield text[start:end]
        start = end
    yield text[start:]


def count_text_tokens(enc: Any, text: str, piece_chars: int = PIECE_CHARS) -> int:
    """BPE tokens of ``text``: exact when the tokenizer takes it whole, an upper bound when it must be cut.

    A long text is cut into pieces (before a space, where OpenAI's pre-tokenizer starts a new word anyway) and each
    piece is counted with :data:`TOKENS_PER_CUT` added per cut. A piece the tokenizer still refuses (too many
    tokens for an old vocabulary's chunk limit) is halved until it is taken; a single character is at most its
    UTF-8 bytes in tokens.
    """
    if len(text) < piece_chars:
        try:
            return len(enc.encode(text))
        except ValueError:  # bpe_openai's chunk-limit error is a ValueError too
            if len(text) <= 1:
                return len(text.encode("utf-8", "surrogatepass"))
            piece_chars = max(len(text) // 2, 1)
    pieces = list(_pieces(text, piece_chars))
    if len(pieces) == 1:  # no cut made: a piece as long as the limit is halved
        pieces = list(_pieces(text, max(len(text) // 2, 1)))
    return sum(count_text_tokens(enc, p, piece_chars) for p in pieces) + TOKENS_PER_CUT * (len(pieces) - 1)


def count_input_tokens(provider: Provider, endpoint: str, body: Mapping[str, Any]) -> int:
    """Input tokens of one request (exact BPE counts for OpenAI text, an approximation otherwise)."""
    if provider is Provider.OPENAI:
        enc = _encoding(str(body.get("model", "")))

        def count(text: str) -> int:
            return count_text_tokens(enc, text)
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


def model_max_output(prices: PriceBook, provider: str, model: str) -> int:
    """The longest reply ``model`` can give: :data:`KNOWN_MAX_OUTPUT`, else the price overrides' or genai-prices'
    figure (:meth:`PriceBook.output_cap`: a context window bounds any reply), else
    :data:`FALLBACK_MAX_OUTPUT_TOKENS`."""
    for pattern, tokens in KNOWN_MAX_OUTPUT:
        if pattern.fullmatch(model):
            return tokens
    cap = prices.output_cap(provider, model)
    return cap if cap is not None else FALLBACK_MAX_OUTPUT_TOKENS


def max_output_tokens(endpoint: str, body: Mapping[str, Any], model_max: int) -> int:
    """The most output tokens a request can produce: its bound (the largest, where it gives several), or
    ``model_max`` (:func:`model_max_output`) where it sets none, times the completions it asks for (``n``;
    ``best_of`` on ``/v1/completions``, which are all generated and billed)."""
    if endpoint in ("/v1/embeddings", "/v1/moderations"):
        return 0
    bounds = [n for key in OPENAI_TOKEN_FIELDS if (n := _count(body.get(key))) is not None and n >= 1]
    bound = max(bounds) if bounds else model_max
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
            model_max = model_max_output(prices, price_provider or provider.value, parsed.model)
            usage = TokenUsage(
                input_tokens=count_input_tokens(provider, parsed.endpoint, body),
                output_tokens=max_output_tokens(parsed.endpoint, body, model_max),
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
