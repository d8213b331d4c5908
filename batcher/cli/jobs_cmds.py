"""``batcher submit``, ``batcher status``, ``batcher jobs``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from batcher.cli.app import app, console, err_console, load_settings, print_json, run
from batcher.domain import JobState, Provider
from batcher.intake import IntakeResult
from batcher.service import Batcher
from batcher.timeutil import parse_duration, utcnow


def parse_tags(values: list[str] | None) -> dict[str, str]:
    """``["team=search", "env=prod"]`` → ``{"team": "search", "env": "prod"}``."""
    tags: dict[str, str] = {}
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--tag")
        tags[key] = val
    return tags


@app.command()
def submit(
    file: Path = typer.Argument(..., help="A batch input file in the provider's own JSONL format."),
    provider: Provider = typer.Option(..., "--provider", "-p", help="Which format FILE is in."),
    run_name: str = typer.Option("default", "--run", help="The run (named group) the jobs join."),
    tag: list[str] | None = typer.Option(None, "--tag", help="KEY=VALUE tag on every job; repeatable."),
    deadline: str | None = typer.Option(None, "--deadline", help="Results needed within this long, e.g. 36h."),
    priority: int = typer.Option(0, "--priority", help="Higher is packed first."),
    account: str | None = typer.Option(None, "--account", help="Provider account (default: the provider's name)."),
    skip_invalid: Path | None = typer.Option(
        None, "--skip-invalid", help="Store the valid lines and write each invalid one, with its reason, here."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Queue every request of a provider batch file. All lines or none, unless --skip-invalid."""
    settings = load_settings()
    tags = parse_tags(tag)
    try:
        not_after = None if deadline is None else utcnow() + parse_duration(deadline)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--deadline") from None
    if not file.is_file():
        raise typer.BadParameter(f"{file} is not a file", param_hint="FILE")

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


@app.command()
def status(
    run_name: str | None = typer.Option(None, "--run", help="Only this run."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Job counts by state, overall and per run, and batches by state."""
    settings = load_settings()

    async def _go() -> dict[str, object]:
        async with Batcher(settings) as batcher:
            return (await batcher.status(run=run_name)).to_json()

    report = run(_go())
    if json_out:
        print_json(report)
        return
    states = [s.value for s in JobState]
    table = Table(title="jobs by run")
    table.add_column("run")
    for s in states:
        table.add_column(s, justify="right")
    table.add_column("batches in flight", justify="right")
    table.add_column("oldest queued")
    runs = report["runs"]
    assert isinstance(runs, list)
    for r in runs:
        table.add_row(
            r["run"],
            *(str(r["jobs"].get(s, 0)) for s in states),
            str(r["batches_in_flight"]),
            r["oldest_queued_at"] or "",
        )
    totals = report["totals"]
    assert isinstance(totals, dict)
    table.add_row("[bold]total[/]", *(f"[bold]{totals.get(s, 0)}[/]" for s in states), "", "")
    console.print(table)
    batches = report["batches"]
    assert isinstance(batches, dict)
    busy = {k: v for k, v in batches.items() if v}
    console.print("batches: " + (", ".join(f"{k} {v}" for k, v in busy.items()) or "none"))


@app.command()
def jobs(
    run_name: str | None = typer.Option(None, "--run", help="Only this run."),
    state: JobState | None = typer.Option(None, "--state", help="Only jobs in this state."),
    batch: str | None = typer.Option(None, "--batch", help="Only jobs of this batch."),
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
    table = Table()
    for col in ("id", "run", "custom_id", "model", "state", "attempts", "batch", "error"):
        table.add_column(col)
    for j in found:
        table.add_row(
            str(j["id"]),
            str(j["run"]),
            str(j["custom_id"]),
            str(j["model"]),
            str(j["state"]),
            str(j["attempts"]),
            str(j["batch_id"] or ""),
            str(j["error_code"] or ""),
        )
    console.print(table)
