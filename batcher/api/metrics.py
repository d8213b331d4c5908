"""``/metrics``: Prometheus text, read from the database at each scrape (so every API process reports the same).

Jobs by state, batches by provider and state, the oldest queued job's age, provider turnaround of batches
that ended in the last 24 h (a summary per provider), settled cost and savings from the ledger, webhook
deliveries by state, and this process's HTTP answers.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from decimal import Decimal

import sqlalchemy as sa

from batcher.db.engine import Database
from batcher.db.tables import batches, jobs, ledger, webhook_deliveries
from batcher.domain import BatchState, JobState

#: batches whose turnaround one scrape looks at
TURNAROUND_SAMPLE = 10_000
TURNAROUND_WINDOW = timedelta(hours=24)
QUANTILES = (0.5, 0.9, 0.99)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float | int | Decimal) -> str:
    return repr(float(value)) if isinstance(value, (float, Decimal)) else str(value)


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[str, dict[str, str], float | int | Decimal]]
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            self.lines.append(f"{name}{suffix}{_labels(labels)} {_number(value)}")

    def render(self) -> str:
        return "\n".join(self.lines) + "\n"


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[round(q * 100) - 1]


async def render(db: Database, http_counts: Counter[tuple[str, str, int]], now: datetime) -> str:
    """The metrics text (Prometheus exposition format 0.0.4)."""
    out = _Text()
    async with db.engine.connect() as conn:
        by_state = {s.value: 0 for s in JobState}
        for state, count in await conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)):
            by_state[state] = count
        out.family("batcher_jobs", "gauge", "Jobs by state.", (("", {"state": s}, n) for s, n in by_state.items()))

        batch_counts: dict[tuple[str, str], int] = {}
        query = sa.select(batches.c.provider, batches.c.state, sa.func.count()).group_by(
            batches.c.provider, batches.c.state
        )
        for provider, state, count in await conn.execute(query):
            batch_counts[(provider, state)] = count
        providers = sorted({p for p, _ in batch_counts}) or []
        out.family(
            "batcher_batches",
            "gauge",
            "Provider batches by provider and state.",
            (
                ("", {"provider": p, "state": s.value}, batch_counts.get((p, s.value), 0))
                for p in providers
                for s in BatchState
            ),
        )

        oldest = await conn.scalar(
            sa.select(sa.func.min(jobs.c.queued_at)).where(jobs.c.state == JobState.QUEUED.value)
        )
        age = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
        out.family(
            "batcher_oldest_queued_age_seconds", "gauge", "Age of the oldest queued job (0: none).", [("", {}, age)]
        )

        turnaround: dict[str, list[float]] = defaultdict(list)
        query = (
            sa.select(batches.c.provider, batches.c.created_at, batches.c.submitted_at, batches.c.ended_at)
            .where(batches.c.ended_at >= now - TURNAROUND_WINDOW)
            .order_by(batches.c.ended_at.desc())
            .limit(TURNAROUND_SAMPLE)
        )
        for provider, created, submitted, ended in await conn.execute(query):
            turnaround[provider].append((ended - (submitted or created)).total_seconds())
        samples: list[tuple[str, dict[str, str], float | int]] = []
        for provider, values in sorted(turnaround.items()):
            values.sort()
            samples += [("", {"provider": provider, "quantile": str(q)}, _quantile(values, q)) for q in QUANTILES]
            samples.append(("_sum", {"provider": provider}, sum(values)))
            samples.append(("_count", {"provider": provider}, len(values)))
        out.family(
            "batcher_batch_turnaround_seconds",
            "summary",
            "Provider turnaround (submission to end) of batches that ended in the last 24 h.",
            samples,
        )

        query = sa.select(
            ledger.c.provider,
            sa.func.count(),
            sa.func.count(ledger.c.actual_usd),
            sa.func.sum(ledger.c.actual_usd),
            sa.func.sum(ledger.c.realtime_usd),
        ).group_by(ledger.c.provider)
        money = [
            (p, int(n), int(priced), a or Decimal(0), r or Decimal(0))
            for p, n, priced, a, r in await conn.execute(query)
        ]
        out.family(
            "batcher_settled_requests_total",
            "counter",
            "Provider requests settled in the ledger.",
            (("", {"provider": p}, n) for p, n, _, _, _ in money),
        )
        out.family(
            "batcher_unpriced_requests_total",
            "counter",
            "Settled requests whose model has no price (cost unknown).",
            (("", {"provider": p}, n - priced) for p, n, priced, _, _ in money),
        )
        out.family(
            "batcher_settled_cost_usd_total",
            "counter",
            "What settled requests cost (priced ones).",
            (("", {"provider": p}, a) for p, _, _, a, _ in money),
        )
        out.family(
            "batcher_realtime_cost_usd_total",
            "counter",
            "What the same requests would have cost in real time.",
            (("", {"provider": p}, r) for p, _, _, _, r in money),
        )
        out.family(
            "batcher_saved_usd_total",
            "counter",
            "Real-time cost minus actual cost.",
            (("", {"provider": p}, r - a) for p, _, _, a, r in money),
        )

        hooks = {"pending": 0, "delivered": 0, "failed": 0}
        query = sa.select(webhook_deliveries.c.state, sa.func.count()).group_by(webhook_deliveries.c.state)
        for state, count in await conn.execute(query):
            hooks[state] = count
        out.family(
            "batcher_webhook_deliveries",
            "gauge",
            "Webhook deliveries by state.",
            (("", {"state": s}, n) for s, n in hooks.items()),
        )

    out.family(
        "batcher_http_requests_total",
        "counter",
        "HTTP answers of this API process, by method, route and status.",
        (("", {"method": m, "route": r, "status": str(s)}, n) for (m, r, s), n in sorted(http_counts.items())),
    )
    return out.render()
