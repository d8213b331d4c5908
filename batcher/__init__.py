"""batcher: queue latency-tolerant LLM requests into provider batch APIs and keep a ledger of what they saved."""

from __future__ import annotations

from batcher.client import BatcherClient
from batcher.config import Settings
from batcher.domain import BatchState, JobSpec, JobState, Provider
from batcher.errors import (
    BatcherError,
    ConfigError,
    InvalidFile,
    InvalidInput,
    NotFound,
    ProviderError,
    StateConflict,
)
from batcher.intake import IntakeResult
from batcher.service import Batcher

__version__ = "0.1.0"

__all__ = [
    "BatchState",
    "Batcher",
    "BatcherClient",
    "BatcherError",
    "ConfigError",
    "IntakeResult",
    "InvalidFile",
    "InvalidInput",
    "JobSpec",
    "JobState",
    "NotFound",
    "Provider",
    "ProviderError",
    "Settings",
    "StateConflict",
    "__version__",
]
