"""Each provider API's published batch limits (PROVIDERS.md §1.7, §2.2, §2.5).

Kept apart from the adapters so intake can check input without an SDK client.
"""

from __future__ import annotations

import re

from batcher.domain import Provider
from batcher.providers.base import Limits

#: a provider's "MB", read as the smaller of its two meanings (10^6 bytes, not 2^20): a batch cut to it is under
#: the cap either way, and a refusal for size would only be packed and refused again
MB = 1_000_000

EMBEDDINGS_ENDPOINT = "/v1/embeddings"
MODERATIONS_ENDPOINT = "/v1/moderations"
OPENAI_ENDPOINTS = frozenset(
    {"/v1/chat/completions", "/v1/completions", EMBEDDINGS_ENDPOINT, "/v1/responses", MODERATIONS_ENDPOINT}
)

OPENAI_LIMITS = Limits(
    max_requests=50_000,
    max_bytes=200 * MB,
    one_model_per_batch=True,
    endpoints=OPENAI_ENDPOINTS,
    custom_id_pattern=None,
    max_line_bytes=200 * MB,
    max_inputs=50_000,
)

ANTHROPIC_ENDPOINT = "/v1/messages"

ANTHROPIC_LIMITS = Limits(
    max_requests=100_000,
    max_bytes=256 * MB,
    one_model_per_batch=False,
    endpoints=frozenset({ANTHROPIC_ENDPOINT}),
    custom_id_pattern=re.compile(r"^[a-zA-Z0-9_-]{1,64}$"),
    max_line_bytes=256 * MB,
)

DEFAULT_LIMITS: dict[Provider, Limits] = {Provider.OPENAI: OPENAI_LIMITS, Provider.ANTHROPIC: ANTHROPIC_LIMITS}
