"""The HTTP API for producers (aiohttp): enqueue, read, cancel, results, savings, metrics, webhooks.

``create_app(settings)`` builds the application; ``serve_api`` runs it in-process on a port and ``run_api``
until cancelled (``batcher api``). They are imported on first use, so that ``batcher.api.views`` and
``batcher.api.models`` load without the whole application.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "run_api", "serve_api"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from batcher.api import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
