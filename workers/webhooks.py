"""arq wiring of webhook delivery: a cron, every tick, that schedules what has settled and sends what is due.

The task is a thin shell over :mod:`batcher.webhooks`; all state is in the database (``webhook_deliveries``),
so two workers running it at once, or one running it twice, send nothing twice: a delivery is claimed before
it is sent. It also forgets idempotency keys past their time, about once an hour.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from arq import cron

from batcher import webhooks
from batcher.config import Settings
from batcher.lifecycle import Pipeline
from batcher.timeutil import utcnow

logger = logging.getLogger(__name__)

Ctx = dict[str, Any]

#: seconds between sweeps of old idempotency keys
CLEANUP_EVERY_S = 3600.0


async def deliver_webhooks(ctx: Ctx) -> int:
    """Schedule deliveries for what has settled, send the due ones; returns how many were delivered."""
    pipeline: Pipeline = ctx["pipeline"]
    settings: Settings = ctx.get("settings") or pipeline.settings
    now = utcnow()
    scheduled = await webhooks.schedule(pipeline.db, now)
    report = await webhooks.send_due(pipeline.db, settings, now)
    if scheduled.jobs or scheduled.runs or report.outcomes:
        logger.info(
            "webhooks: %d job(s) and %d run(s) scheduled; %d delivered, %d to retry, %d given up",
            scheduled.jobs,
            scheduled.runs,
            report.delivered,
            report.retrying,
            report.failed,
        )
    if time.monotonic() - ctx.get("webhooks_cleaned_at", float("-inf")) > CLEANUP_EVERY_S:
        ctx["webhooks_cleaned_at"] = time.monotonic()
        await webhooks.cleanup(pipeline.db, settings, now)
    return report.delivered


def webhook_crons(settings: Settings) -> list[Any]:
    """The delivery cron, at the tick's rhythm."""
    return [
        cron(
            deliver_webhooks,
            name="deliver_webhooks",
            second=set(range(0, 60, settings.tick_s)),
            run_at_startup=True,
            keep_result=0,
            unique=True,
            timeout=settings.webhook_timeout_s * 4 + 60,
        )
    ]
