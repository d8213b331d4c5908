"""``arq workers.main.WorkerSettings``: batcher's worker under arq's own CLI (needs ``BATCHER_REDIS_URL``).

``batcher worker`` is the usual way to start one; it also starts an embedded Redis when none is configured.
"""

from __future__ import annotations

import math

from arq.connections import RedisSettings

from batcher.config import Settings
from workers import tasks
from workers.settings import FUNCTIONS, cron_jobs

_settings = Settings()


class WorkerSettings:
    """For ``arq workers.main.WorkerSettings`` (needs ``BATCHER_REDIS_URL``)."""

    functions = FUNCTIONS
    cron_jobs = cron_jobs(_settings)
    on_startup = tasks.startup
    on_shutdown = tasks.shutdown
    redis_settings = RedisSettings.from_dsn(_settings.redis_url or "redis://127.0.0.1:6379")
    max_jobs = 16
    # as ``batcher worker``: on SIGTERM/SIGINT stop picking tasks, let running ones finish this long, then cancel
    job_completion_wait = max(1, math.floor(_settings.shutdown_grace_s))
    keep_result = 0
    job_timeout = 3600
