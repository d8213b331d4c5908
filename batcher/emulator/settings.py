"""Settings of the provider emulator.

Built at the edge (CLI, test fixture, demo) and passed to :func:`batcher.emulator.create_app`.
Every knob can also come from the environment with the ``BATCHER_EMULATOR_`` prefix, e.g.
``BATCHER_EMULATOR_ERROR_RATE=0.1``; pydantic-settings reads it, library code never does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)

__all__ = ["EmulatorSettings"]


class EmulatorSettings(BaseSettings):
    """Behaviour and fault knobs of the emulated OpenAI Files + Batches and Anthropic Message Batches APIs.

    The knobs below apply to both APIs unless they name one (``token_limit`` is OpenAI's only). On the
    Anthropic side a batch is ``in_progress`` for ``latency_s`` and then ``ended``, failures are ``errored``
    results, injected HTTP errors are 429, 529 or 500 in Anthropic's format, and an expiring batch ends with
    part of its requests ``expired``.

    Attributes:
        latency_s: Seconds from batch creation to ``completed``. Validation takes the first 20%,
            ``in_progress`` the next 60% and ``finalizing`` the last 20%; a cancellation takes 10%.
            ``0`` means every transition is due at once and shows on the next read.
        error_rate: Fraction of requests (0..1) that fail. Failures alternate between HTTP-level
            errors inside ``response`` (500, 429, 400) and a top-level ``error`` with
            ``response: null``.
        api_error_rate: Fraction of HTTP calls to ``/v1/*`` (0..1) answered with 429 (with
            ``Retry-After``) or 500 before doing any work.
        expire_rate: Fraction of batches (0..1) that run out of time and end ``expired`` with part
            of their requests done.
        token_limit: Enqueued prompt tokens allowed per model across non-terminal batches; a batch
            that would go over fails with ``token_limit_exceeded``. ``None`` means unlimited.
        api_error_kinds: What injected HTTP faults are, in turn: ``"429"`` (with ``Retry-After``),
            ``"500"``, ``"503"``, ``"529"`` (Anthropic's overloaded) or ``"reset"`` (the connection is
            closed with no answer). Empty: each API's own cycle (OpenAI 429/500, Anthropic 429/529/500).
        retry_after_s: The ``Retry-After`` seconds an injected 429 carries.
        expire_ordinals: Batches (by creation number, 1-based) that expire part-done, on top of
            ``expire_rate``, e.g. ``[3]`` for exactly one expired batch in a run.
        malformed_rate: Fraction of result lines (0..1) written truncated, as unreadable JSON.
        idempotency_keys: Honour an ``Idempotency-Key`` header on the real-time endpoints: a request sent again
            with a key already answered gets the same answer back and is not counted again. Off by default,
            like the APIs it emulates: neither OpenAI nor Anthropic documents honouring the header there.
        seed: Seed of every random decision; the same seed and the same calls give the same run.
        max_requests: Most request lines in one batch input file.
        max_bytes: Largest batch input file in bytes.
        anthropic_max_requests: Most requests in one Message Batch (Anthropic's limit: 100,000).
        anthropic_max_bytes: Largest Message Batches create body in bytes (Anthropic's limit: 256 MB).
        data_dir: Directory where uploaded and generated files are kept. ``None`` means a fresh
            temporary directory that is removed when the app shuts down.
    """

    model_config = SettingsConfigDict(env_prefix="BATCHER_EMULATOR_", extra="ignore")

    latency_s: float = Field(default=3.0, ge=0.0, le=86_400.0)
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    api_error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    expire_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    token_limit: int | None = Field(default=None, gt=0)
    api_error_kinds: list[Literal["429", "500", "503", "529", "reset"]] = Field(default_factory=list)
    retry_after_s: int = Field(default=1, ge=0, le=3600)
    expire_ordinals: frozenset[int] = frozenset()
    malformed_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    idempotency_keys: bool = False
    seed: int = 0
    max_requests: int = Field(default=50_000, gt=0)
    max_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    anthropic_max_requests: int = Field(default=100_000, gt=0)
    anthropic_max_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    data_dir: Path | None = None
