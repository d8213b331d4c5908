"""``batcher batches``, ``batcher batch``, ``batcher cancel``, ``batcher export``."""

from __future__ import annotations

import contextlib
import os
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from batcher.cli.app import Col, app, console, err_console, load_settings, print_json, print_table, run
from batcher.cli.jobs_cmds import span, when
from batcher.cli.ledger_cmds import usd
from batcher.db.queries import BatchDetail, BatchInfo
from batcher.domain import BatchState, Provider
from batcher.export import ExportReport, ExportState
from batcher.lifecycle import CancelReport
from batcher.service import Batcher
from batcher.timeutil import parse_duration, utcnow


def _cost(b: dict[str, Any]) -> str:
    if b["actual_usd"] is None:
        return ""
    return f"{usd(Decimal(b['actual_usd']))} (vs {usd(Decimal(b['realtime_usd']))})"


def _requests(r: dict[str, int]) -> str:
    return f"{r['total']} / {r['succeeded']} / {r['failed']} / {r['expired']} / {r['cancelled']}"


def _age(b: dict[str, Any]) -> str:
    return span(b["turnaround_s"]) if b["turnaround_s"] is not None else f"{span(b['age_s'])} old"


@app.command()
def batches(
    run_name: str | None = typer.Option(None, "--run", help="Only batches holding jobs of this run."),
    provider: Provider | None = typer.Option(None, "--provider", "-p", help="Only this provider's batches."),
    state: BatchState | None = typer.Option(
        None, "--state", help="Only batches in this state (ours, not the provider's)."
    ),
    since: str | None = typer.Option(None, "--since", help="Only batches made within this long, e.g. 24h, 90m, 7d."),
    limit: int = typer.Option(50, "--limit", min=1, max=100_000, help="At most this many (newest first)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (a list of objects)."),
) -> None:
    """List provider batches, newest first: state (ours and the provider's word), requests, times, cost.

    Requests are total / succeeded / failed / expired / cancelled, counted when the batch is collected.

    Cost sums the batch's ledger entries: actual_usd, and realtime_usd (the same calls at real-time prices).

    Both are null until the batch's results are priced; money is a string in JSON.
    """
    settings = load_settings()
    try:
        after = None if since is None else utcnow() - parse_duration(since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None

    async def _go() -> list[BatchInfo]:
        async with Batcher(settings) as batcher:
            return await batcher.batches(run=run_name, provider=provider, state=state, since=after, limit=limit)

    found = run(_go())
    now = utcnow()
    rows = [b.to_json(now) for b in found]
    if json_out:
        print_json(rows)
        return
    # ids are what people copy out of this table: never cut (Col's default)
    cols = [
        Col("id"),
        Col("account", rank=9, cut=True),
        Col("provider id", rank=4),
        Col("model", rank=3, cut=True),
        Col("state"),
        Col("provider", rank=6),
        Col("requests t/s/f/e/c", rank=2),
        Col("created", rank=8),
        Col("turnaround", rank=7, justify="right"),
        Col("cost", rank=5, justify="right"),
    ]
    print_table(
        cols,
        (
            [
                b["id"],
                escape(b["account"]),
                escape(b["provider_batch_id"] or ""),
                escape(b["model"]),
                b["state"],
                b["provider_state"] or "",
                _requests(b["requests"]),
                when(b["created_at"]),
                _age(b),
                _cost(b),
            ]
            for b in rows
        ),
    )


@app.command()
def batch(
    batch_id: str = typer.Argument(..., metavar="ID", help="Our batch id or the provider's batch id."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Everything about one batch, by our id or the provider's.

    States, request counts, times, cost, the provider's errors, polling, lease, files and up to 10 failed jobs.
    """
    settings = load_settings()

    async def _go() -> BatchDetail:
        async with Batcher(settings) as batcher:
            return await batcher.batch(batch_id)

    detail = run(_go()).to_json(utcnow())
    if json_out:
        print_json(detail)
        return
    _print_batch(detail)


def _print_batch(b: dict[str, Any]) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    rows: list[tuple[str, str]] = [
        ("batch", b["id"]),
        ("provider", f"{b['provider']} (account {b['account']}) {b['provider_batch_id'] or ''}"),
        ("model", f"{b['model']} {b['endpoint']}"),
        ("state", f"{b['state']} (provider: {b['provider_state'] or '-'})"),
        ("requests", f"{_requests(b['requests'])}  (total / succeeded / failed / expired / cancelled)"),
        ("jobs now", ", ".join(f"{k} {v}" for k, v in b["jobs"].items() if v) or "none"),
        ("created", when(b["created_at"])),
        ("submitted", when(b["submitted_at"])),
        ("ended", when(b["ended_at"])),
        ("collected", when(b["collected_at"])),
        ("turnaround", _age(b)),
        ("cost", _cost(b) or "not priced yet"),
        ("polls", f"last {when(b['last_polled_at']) or '-'}, next {when(b['next_poll_at']) or '-'}"),
        ("poll interval", f"{b['poll_interval_s']}s"),
        ("lease", f"{b['lease_owner']} until {when(b['lease_expires_at'])}" if b["lease_owner"] else "free"),
        (
            "files",
            f"input {b['input_file_id'] or '-'}, output {b['output_file_id'] or '-'}, "
            f"errors {b['error_file_id'] or '-'}",
        ),
    ]
    for key, value in rows:
        grid.add_row(key, value)
    console.print(grid, highlight=False)
    if b["errors"]:
        errors = Table(title="provider errors")
        for col in ("code", "line", "message"):
            errors.add_column(col)
        for e in b["errors"]:
            e = e if isinstance(e, dict) else {"message": str(e)}
            errors.add_row(str(e.get("code") or ""), str(e.get("line") or ""), str(e.get("message") or ""))
        console.print(errors)
    if b["failed_jobs"]:
        failed = Table(title="failed jobs (sample)")
        failed.add_column("job", no_wrap=True)
        for col in ("run", "custom_id", "error"):
            failed.add_column(col)
        for j in b["failed_jobs"]:
            message = (j["error"] or {}).get("message") if isinstance(j["error"], dict) else j["error"]
            failed.add_row(j["id"], j["run"], j["custom_id"], f"{j['error_code']}: {message or ''}")
        console.print(failed)


@app.command()
def cancel(
    run_name: str = typer.Option(..., "--run", help="The run to cancel."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Cancel a run: its queued jobs now, and the provider batches that hold only its jobs.

    Batches shared with other runs keep running.

    Jobs in cancelled batches settle when a worker next collects them (cancelled, or succeeded if already done).
    """
    settings = load_settings()

    async def _go() -> CancelReport:
        async with Batcher(settings) as batcher:
            return await batcher.cancel_run(run_name)

    report = run(_go())
    if json_out:
        print_json(
            {
                "run": run_name,
                "jobs_cancelled": report.jobs_cancelled,
                "batches_cancelled": report.batches_cancelled,
                "batches_shared": report.batches_shared,
            }
        )
        return
    console.print(
        f"run [bold]{run_name}[/]: {report.jobs_cancelled} job(s) not yet sent cancelled, "
        f"{report.batches_cancelled} provider batch(es) asked to cancel, "
        f"{report.batches_shared} left running (shared with other runs)."
    )
    if report.batches_cancelled or report.batches_shared:
        console.print("Their jobs settle when a worker next collects them.")


@app.command()
def export(
    run_name: str = typer.Option(..., "--run", help="The run to export."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write here (default: stdout)."),
    state: ExportState = typer.Option(ExportState.ALL, "--state", help="Which settled jobs."),
) -> None:
    """Write a run's results in the provider's batch output format, under your custom_ids.

    One line per settled job: OpenAI output-file lines (failed and cancelled jobs as error lines), or Anthropic results.

    Jobs not settled yet are skipped and counted.
    """
    settings = load_settings()
    if output is not None and output.is_dir():
        raise typer.BadParameter(f"{output} is a directory", param_hint="--output")

    async def _go() -> ExportReport:
        async with Batcher(settings) as batcher:
            if output is None:
                return await batcher.export(run_name, sys.stdout.buffer, state=state)
            # written beside, then renamed: a failed export never leaves a partial file under the name asked for
            part = output.with_name(output.name + ".part")
            try:
                with part.open("wb") as fh:
                    report = await batcher.export(run_name, fh, state=state)
                os.replace(part, output)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
            return report

    if output is None:
        sys.stdout.flush()
    try:
        report = run(_go())
    except BrokenPipeError:
        # the reader went away (``| head``): stop quietly, and keep Python from failing to flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(1) from None
    where = "stdout" if output is None else str(output)
    skipped = f"; {report.unsettled} job(s) not settled yet were skipped" if report.unsettled else ""
    (err_console if output is None else console).print(
        f"wrote {report.written} line(s) of run {run_name} to {where}{skipped}", highlight=False, markup=False
    )
