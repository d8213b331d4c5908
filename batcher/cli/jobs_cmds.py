"""``batcher submit``, ``batcher status`` (and ``--watch``), ``batcher jobs``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.progress_bar import ProgressBar
from rich.table import Table

from batcher.cli.app import (
    Col,
    app,
    console,
    err_console,
    load_settings,
    print_json,
    print_json_line,
    print_table,
    run,
)
from batcher.cli.ledger_cmds import usd
from batcher.config import Settings
from batcher.db.queries import StatusReport
from batcher.domain import JOB_TERMINAL, JobState, Provider
from batcher.errors import InvalidInput
from batcher.estimate import Estimate
from batcher.intake import IntakeResult
from batcher.service import Batcher
from batcher.timeutil import parse_duration, utcnow


def when(value: str | None) -> str:
    """An ISO timestamp as ``YYYY-MM-DD HH:MM:SS`` (UTC), or empty."""
    return "" if value is None else value[:19].replace("T", " ")


def span(seconds: float | None) -> str:
    """``3725.0`` → ``1h 2m``; empty for ``None``."""
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def parse_tags(values: list[str] | None) -> dict[str, str]:
    """``["team=search", "env=prod"]`` → ``{"team": "search", "env": "prod"}``."""
    tags: dict[str, str] = {}
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--tag")
        tags[key] = val
    return tags


def input_file(file: Path) -> None:
    """Refuse a FILE argument that is not a readable file, saying why (usage error, exit code 2)."""
    if not file.exists():
        raise typer.BadParameter(f"{file} does not exist", param_hint="FILE")
    if file.is_dir():
        raise typer.BadParameter(f"{file} is a directory", param_hint="FILE")
    if not file.is_file():
        raise typer.BadParameter(f"{file} is not a regular file", param_hint="FILE")


@app.command()
def submit(
    file: Path = typer.Argument(..., metavar="FILE", help="A batch input file in the provider's own JSONL format."),
    provider: Provider = typer.Option(..., "--provider", "-p", help="Which format FILE is in."),
    run_name: str = typer.Option("default", "--run", help="The run (named group) the jobs join."),
    tag: list[str] | None = typer.Option(None, "--tag", help="KEY=VALUE tag on every job; repeatable."),
    deadline: str | None = typer.Option(None, "--deadline", help="Results needed within this long, e.g. 36h."),
    priority: int = typer.Option(0, "--priority", help="Higher is packed first."),
    account: str | None = typer.Option(None, "--account", help="Provider account (default: the provider's name)."),
    skip_invalid: Path | None = typer.Option(
        None, "--skip-invalid", help="Store the valid lines and write each invalid one, with its reason, here."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Store nothing: print the batches it would make and their estimated cost."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Queue every request of a provider batch file. All lines or none, unless --skip-invalid."""
    settings = load_settings()
    tags = parse_tags(tag)
    if dry_run:
        _dry_run(settings, file, provider, account, json_out, skip_invalid)
        return
    try:
        not_after = None if deadline is None else utcnow() + parse_duration(deadline)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--deadline") from None
    input_file(file)
    size = file.stat().st_size

    async def _go() -> IntakeResult:
        async with Batcher(settings) as batcher:
            show = console.is_terminal and not json_out
            with Progress(
                TextColumn("[bold]queueing[/] {task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=err_console,
                disable=not show,
            ) as bar:
                task = bar.add_task(file.name, total=size)
                return await batcher.submit_file(
                    file,
                    provider=provider,
                    run=run_name,
                    account=account,
                    tags=tags,
                    priority=priority,
                    not_after=not_after,
                    rejects_path=skip_invalid,
                    progress=lambda n: bar.advance(task, n),
                )

    result = run(_go())
    if result.received == 0 and result.rejected == 0:
        err_console.print(f"warning: {file} holds no requests; nothing was queued", style="yellow", markup=False)
    if json_out:
        print_json(
            {
                "run": result.run,
                "received": result.received,
                "inserted": result.inserted,
                "duplicates": result.duplicates,
                "rejected": result.rejected,
            }
        )
        return
    console.print(
        f"run [bold]{result.run}[/]: {result.inserted} queued, {result.duplicates} already there"
        + (f", {result.rejected} rejected (see {skip_invalid})" if result.rejected else "")
    )


def _dry_run(
    settings: Settings, file: Path, provider: Provider, account: str | None, json_out: bool, rejects: Path | None
) -> None:
    """Estimate FILE as ``submit`` would read it (same checks, same errors; with ``--skip-invalid`` the good lines
    are estimated and the rejects written, as the submit would)."""
    from batcher.estimate import estimate_file
    from batcher.pricing import PriceBook, load_overrides
    from batcher.providers import registry

    input_file(file)
    name = account or provider.value

    async def _go() -> Estimate:
        acct = registry.account_settings(settings, name)
        if acct.kind is not provider:
            raise InvalidInput(f"account {name!r} speaks the {acct.kind.value} API, not {provider.value}")
        prices = PriceBook(registry.discounts(settings), load_overrides(settings.price_overrides_file))
        with (
            err_console.status(f"estimating {file.name}…")
            if console.is_terminal and not json_out
            else contextlib.nullcontext()
        ):
            return await asyncio.to_thread(
                estimate_file,
                file,
                provider,
                prices,
                limits=registry.account_limits(acct),
                price_provider=registry.price_provider(name, acct),
                rejects_path=rejects,
            )

    estimate = run(_go())
    if estimate.jobs == 0:
        err_console.print(f"warning: {file} holds no requests", style="yellow", markup=False)
    if json_out:
        print_json(estimate.to_json())
        return
    table = Table(title=f"dry run: {file.name} (nothing stored)")
    for col in ("endpoint", "model", "jobs", "batches", "input tokens", "max output tokens", "batch", "real-time"):
        table.add_column(col, justify="left" if col in ("endpoint", "model") else "right")
    for g in estimate.groups:
        table.add_row(
            g.endpoint,
            g.model,
            str(g.jobs),
            str(g.batches),
            f"{g.input_tokens:,}",
            f"{g.output_tokens:,}",
            "unpriced" if g.batch_usd is None else usd(g.batch_usd),
            "unpriced" if g.realtime_usd is None else usd(g.realtime_usd),
        )
    batch, realtime = estimate.total("batch_usd"), estimate.total("realtime_usd")
    table.add_row("[bold]total[/]", "", str(estimate.jobs), str(estimate.batches), "", "", usd(batch), usd(realtime))
    console.print(table)
    console.print(
        f"estimated saving {usd(realtime - batch)}; output counted at each request's max_tokens (an upper bound)"
        + (f"; no price for {', '.join(estimate.unpriced_models)}" if estimate.unpriced_models else "")
        + (f"; {estimate.rejected} invalid line(s) left out (see {rejects})" if estimate.rejected else "")
    )


@app.command()
def status(
    run_name: str | None = typer.Option(None, "--run", help="Only this run (an error if it has no jobs)."),
    json_out: bool = typer.Option(
        False, "--json", help="Print JSON; with --watch, one JSON document per refresh, one per line (JSON Lines)."
    ),
    watch: bool = typer.Option(
        False, "--watch", "-w", help="Show each run's progress live until every run has settled (Ctrl-C stops)."
    ),
    interval: float = typer.Option(1.0, "--interval", min=0.05, max=3600, help="Seconds between refreshes (--watch)."),
) -> None:
    """Job counts by state, overall and per run (with batches in flight), and batches by state.

    With --run, the batch counts are of the batches holding that run's jobs.

    --watch --json prints the --json document on one line at each refresh (JSON Lines) until the runs settle.
    """
    settings = load_settings()
    if watch:
        _watch(settings, run_name, interval, json_out=json_out)
        return

    async def _go() -> dict[str, object]:
        async with Batcher(settings) as batcher:
            return (await batcher.status(run=run_name)).to_json()

    report = run(_go())
    if json_out:
        print_json(report)
        return
    _print_status(report)
    batches = report["batches"]
    assert isinstance(batches, dict)
    busy = {k: v for k, v in batches.items() if v}
    console.print("batches: " + (", ".join(f"{k} {v}" for k, v in busy.items()) or "none"))


#: how much each job state's column matters in a narrow terminal (0: always shown)
_STATE_RANK = {"queued": 0, "packed": 6, "submitted": 2, "fallback": 7, "succeeded": 0, "failed": 1, "cancelled": 5}


def _print_status(report: dict[str, Any]) -> None:
    states = [s.value for s in JobState]
    totals = report["totals"]
    cols = [
        Col("run", cut=True),
        *(Col(s, rank=_STATE_RANK.get(s, 5), justify="right") for s in states),
        Col("batches in flight", rank=3, justify="right"),
        Col("oldest queued", rank=4, justify="right"),
        Col("cost (real-time)", rank=8, justify="right"),
        Col("saved", rank=4, justify="right"),
    ]
    now = utcnow()
    rows = [
        [
            escape(r["run"]),
            *(str(r["jobs"].get(s, 0)) for s in states),
            str(r["batches_in_flight"]),
            _ago(r["oldest_queued_at"], now),
            _money_pair(r["actual_usd"], r["realtime_usd"]),
            "" if r["saved_usd"] is None else usd(Decimal(r["saved_usd"])),
        ]
        for r in report["runs"]
    ]
    rows.append(["[bold]total[/]", *(f"[bold]{totals.get(s, 0)}[/]" for s in states), "", "", "", ""])
    print_table(cols, rows, title="jobs by run")


def _money_pair(actual: str | None, realtime: str | None) -> str:
    if actual is None or realtime is None:
        return ""
    return f"{usd(Decimal(actual))} ({usd(Decimal(realtime))})"


def _ago(iso: str | None, now: datetime) -> str:
    return "" if iso is None else span((now - datetime.fromisoformat(iso)).total_seconds())


#: job states that mean a run is still going
_ACTIVE = [s.value for s in JobState if s not in JOB_TERMINAL]


def active(report: StatusReport) -> bool:
    """Whether any job of the report is not settled yet (queued, packed, submitted or in fallback)."""
    return any(report.totals.get(s, 0) for s in _ACTIVE)


def watch_view(report: StatusReport, now: datetime) -> Table:
    """Each run's progress (settled / total), its batches in flight and the age of its oldest queued job."""
    table = Table(title=f"batcher status — {now:%H:%M:%S} UTC")
    table.add_column("run")
    table.add_column("progress")
    table.add_column("settled", justify="right")
    table.add_column("succeeded", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("cancelled", justify="right")
    table.add_column("queued", justify="right")
    table.add_column("batches in flight", justify="right")
    table.add_column("oldest queued", justify="right")
    for r in report.runs:
        oldest = "" if r.oldest_queued_at is None else span((now - r.oldest_queued_at).total_seconds())
        table.add_row(
            r.run,
            ProgressBar(total=max(r.total, 1), completed=r.settled, width=30),
            f"{r.settled}/{r.total}",
            str(r.jobs.get(JobState.SUCCEEDED.value, 0)),
            str(r.jobs.get(JobState.FAILED.value, 0)),
            str(r.jobs.get(JobState.CANCELLED.value, 0)),
            str(r.jobs.get(JobState.QUEUED.value, 0)),
            str(r.batches_in_flight),
            oldest,
        )
    if not report.runs:
        table.caption = "no jobs"
    return table


def _watch(settings: Settings, run_name: str | None, interval: float, *, json_out: bool) -> None:
    """Refresh until no job is active or Ctrl-C. A terminal gets a live view; anything else the final table.

    With ``json_out``, each refresh is one line of JSON (JSON Lines), the last one once nothing is active.
    """
    live = console.is_terminal and not json_out

    async def _go() -> StatusReport | None:
        last: StatusReport | None = None
        async with Batcher(settings) as batcher:
            with Live(console=console, auto_refresh=False) if live else contextlib.nullcontext() as view:
                try:
                    while True:
                        last = await batcher.status(run=run_name)
                        if json_out:
                            print_json_line(last.to_json())
                        if isinstance(view, Live):
                            view.update(watch_view(last, utcnow()), refresh=True)
                        if not active(last):
                            return last
                        await asyncio.sleep(interval)
                finally:
                    # interrupted: still show where things were
                    if not live and not json_out and last is not None and active(last):
                        console.print(watch_view(last, utcnow()))
        return last

    try:
        final = run(_go())
    except typer.Exit as exc:
        if exc.exit_code == 130:  # Ctrl-C: the user stopped watching, nothing failed
            return
        raise
    except BrokenPipeError:
        # the reader went away (``| head -1``): it stopped watching; keep Python from failing to flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if final is not None and not live and not json_out:
        console.print(watch_view(final, utcnow()))


@app.command()
def jobs(
    run_name: str | None = typer.Option(None, "--run", help="Only this run."),
    state: JobState | None = typer.Option(None, "--state", help="Only jobs in this state."),
    batch: str | None = typer.Option(None, "--batch", help="Only jobs of this batch (our id or the provider's)."),
    limit: int = typer.Option(50, "--limit", min=1, max=100_000, help="At most this many (newest first)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (a list of objects)."),
) -> None:
    """List jobs, newest first."""
    settings = load_settings()

    async def _go() -> list[dict[str, object]]:
        async with Batcher(settings) as batcher:
            found = await batcher.jobs(run=run_name, state=state, batch_id=batch, limit=limit)
            return [j.to_json() for j in found]

    found = run(_go())
    if json_out:
        print_json(found)
        return
    cols = [
        Col("id"),
        Col("run", rank=2, cut=True),
        Col("custom_id", rank=1, cut=True),
        Col("model", rank=4, cut=True),
        Col("state"),
        Col("attempts", rank=6, justify="right"),
        Col("batch", rank=5),
        Col("error", rank=3, cut=True),
    ]
    print_table(
        cols,
        (
            [
                str(j["id"]),
                escape(str(j["run"])),
                escape(str(j["custom_id"])),
                escape(str(j["model"])),
                str(j["state"]),
                str(j["attempts"]),
                str(j["batch_id"] or ""),
                escape(str(j["error_code"] or "")),
            ]
            for j in found
        ),
    )
