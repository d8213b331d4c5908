"""Provider adapters behind one protocol (:mod:`batcher.providers.base`)."""

from __future__ import annotations

from batcher.providers.base import (
    BatchStatus,
    Limits,
    Outcome,
    OutcomeKind,
    ProviderAdapter,
    RequestCounts,
    UploadedFile,
)

__all__ = ["BatchStatus", "Limits", "Outcome", "OutcomeKind", "ProviderAdapter", "RequestCounts", "UploadedFile"]
