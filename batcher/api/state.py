"""What the API's handlers share: settings, database, key cache, committer, counters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from aiohttp import web

from batcher.api.auth import KeyCache
from batcher.api.enqueue import Enqueuer
from batcher.config import Settings
from batcher.db.engine import Database
from batcher.lifecycle import Pipeline
from batcher.providers import registry


@dataclass
class ApiState:
    settings: Settings
    db: Database
    keys: KeyCache
    enqueuer: Enqueuer
    #: requests answered, by (method, route, status)
    http_counts: Counter[tuple[str, str, int]]
    #: ``/openapi.json``, rendered once
    openapi: bytes
    #: made on first use (cancelling a run talks to providers)
    pipeline: Pipeline | None = None

    def run_pipeline(self) -> Pipeline:
        """The pipeline the API cancels runs with (its provider clients made on first use)."""
        if self.pipeline is None:
            self.pipeline = Pipeline(self.db, self.settings, registry.build_adapters(self.settings))
        return self.pipeline


STATE = web.AppKey("batcher_state", ApiState)


def state_of(request: web.Request) -> ApiState:
    return request.app[STATE]
