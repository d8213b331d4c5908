"""``batcher savings``: what batching saved, from the ledger."""

from __future__ import annotations

from decimal import Decimal

import typer
from rich.markup import escape

from batcher.cli.app import Col, app, console, load_settings, print_json, print_table, run
from batcher.ledger import GROUPINGS, SavingsReport
from batcher.service import Batcher
from batcher.timeutil import parse_duration, utcnow


def usd(value: Decimal) -> str:
    """Dollars for people: cents for large amounts, more digits for tiny ones."""
    if value == 0:
        return "$0.00"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    return f"${value:.6f}".rstrip("0").rstrip(".") if abs(value) < Decimal("0.01") else f"${value:.4f}"


@app.command()
def savings(
    run_name: str | None = typer.Option(None, "--run", help="Only this run (an error if it has no jobs)."),
    since: str | None = typer.Option(None, "--since", help="Only entries settled within this long, e.g. 7d."),
    by: str | None = typer.Option(
        None, "--by", help=f"Group by {', '.join(GROUPINGS)} or tag:KEY.", show_default=False
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (amounts as strings)."),
) -> None:
    """Actual cost next to the real-time equivalent, and what batching saved."""
    settings = load_settings()
    try:
        since_at = None if since is None else utcnow() - parse_duration(since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    if by is not None and by not in GROUPINGS and not (by.startswith("tag:") and len(by) > 4):
        raise typer.BadParameter(f"use one of {', '.join(GROUPINGS)} or tag:KEY", param_hint="--by")

    async def _go() -> tuple[SavingsReport, SavingsReport | None]:
        async with Batcher(settings) as batcher:
            report = await batcher.savings(run=run_name, since=since_at, by=by)
            daily = None
            if not json_out and console.is_terminal and by != "day":
                daily = await batcher.savings(run=run_name, since=since_at, by="day")
            return report, daily

    report, daily = run(_go())
    if json_out:
        print_json(report.to_json())
        return
    _print(report, daily)


def _print(report: SavingsReport, daily: SavingsReport | None) -> None:
    cols = [Col(report.by, cut=True)] if report.by else []
    cols += [
        Col("jobs", justify="right"),
        Col("actual", justify="right"),
        Col("real-time", rank=2, justify="right"),
        Col("saved", justify="right"),
        Col("saved %", rank=1, justify="right"),
        Col("tokens in", rank=3, justify="right"),
        Col("tokens out", rank=3, justify="right"),
    ]
    rows = []
    for r in [*report.groups, report.totals] if report.by else [report.totals]:
        cells = [
            str(r.jobs),
            usd(r.actual_usd),
            usd(r.realtime_usd),
            usd(r.saved_usd),
            f"{r.saved_pct:.1f}%",
            f"{r.input_tokens:,}",
            f"{r.output_tokens:,}",
        ]
        if report.by:
            cells = [("[bold]total[/]" if r is report.totals else escape(str(r.key))), *cells]
        rows.append(cells)
    print_table(cols, rows, title="savings" + (f" by {report.by}" if report.by else ""))
    if report.totals.unpriced_jobs:
        console.print(
            f"[yellow]{report.totals.unpriced_jobs} job(s) have no price[/] (models: "
            f"{', '.join(report.unpriced_models)}); their cost is unknown and left out of the amounts."
        )
    source = daily if daily is not None else (report if report.by == "day" else None)
    if source is not None and source.groups:
        peak = max((g.saved_usd for g in source.groups), default=Decimal(0))
        console.print("\nsaved per day")
        for g in source.groups[-14:]:
            width = 0 if peak <= 0 else int(40 * g.saved_usd / peak)
            console.print(f"{g.key}  {'█' * width} {usd(g.saved_usd)}")
