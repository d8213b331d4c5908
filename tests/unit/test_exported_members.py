"""The public API is what ``batcher.__all__`` says, and every name in it exists."""

from __future__ import annotations

import batcher


def test_exported_members() -> None:
    assert sorted(batcher.__all__) == [
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
    for name in batcher.__all__:
        assert hasattr(batcher, name), name
