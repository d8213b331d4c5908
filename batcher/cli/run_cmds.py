"""``batcher worker``, ``batcher emulator``, ``batcher demo``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer
from pydantic import SecretStr, ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from batcher.cli.app import app, console, err_console, load_settings, print_json, run, setup_logging
from batcher.cli.ledger_cmds import usd
from batcher.config import Settings
from batcher.db import migrate, queries
from batcher.db.engine import Database
from batcher.demo import sample_specs
from batcher.domain import JobState
from batcher.emulator import EmulatorSettings, serve_emulator
from batcher.ledger import savings as ledger_savings
from batcher.lifecycle import Pipeline
from batcher.providers.registry import build_adapters, close_adapters
from batcher.service import Batcher


@app.command()
def worker(
    burst: bool = typer.Option(False, "--burst", help="Pack everything queued now and exit when no work is left."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step."),
) -> None:
    """Run the worker: pack, submit, poll and collect batches (arq; embedded Redis if BATCHER_REDIS_URL is unset)."""
    from workers.settings import run_worker

    setup_logging(verbose)
    settings = load_settings()
    with contextlib.suppress(KeyboardInterrupt):
        run(run_worker(settings, burst=burst))


def _emulator_settings(**overrides: Any) -> EmulatorSettings:
    try:
        return EmulatorSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [f"  --{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()]
        err_console.print("error: invalid emulator settings\n" + "\n".join(lines), style="red", markup=False)
        raise typer.Exit(2) from None


@app.command()
def emulator(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8400, "--port", min=0, max=65535),
    latency: float | None = typer.Option(None, "--latency", help="Seconds a batch takes [BATCHER_EMULATOR_LATENCY_S]."),
    error_rate: float | None = typer.Option(None, "--error-rate", help="Fraction of requests that fail."),
    api_error_rate: float | None = typer.Option(
        None, "--api-error-rate", help="Fraction of HTTP calls answered 429/500."
    ),
    expire_rate: float | None = typer.Option(None, "--expire-rate", help="Fraction of batches that expire part-done."),
    token_limit: int | None = typer.Option(None, "--token-limit", help="Enqueued tokens per model."),
    seed: int | None = typer.Option(None, "--seed"),
) -> None:
    """Serve the provider emulator for local runs and CI: the OpenAI Files + Batches API and the Anthropic Message
    Batches API, well enough that both official SDKs work against it unchanged.
    """
    emu = _emulator_settings(
        latency_s=latency,
        error_rate=error_rate,
        api_error_rate=api_error_rate,
        expire_rate=expire_rate,
        token_limit=token_limit,
        seed=seed,
    )
    setup_logging(True)

    async def _serve() -> None:
        async with serve_emulator(emu, host, port) as url:
            console.print(
                f"emulator on {url} — set OPENAI_BASE_URL to it and ANTHROPIC_BASE_URL to "
                f"{url.removesuffix('/v1')} (any API key works)",
                highlight=False,
            )
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        run(_serve(), listen=(host, port))


@app.command()
def demo(
    jobs: int = typer.Option(1000, "--jobs", min=1, max=1_000_000, help="How many sample jobs."),
    latency: float = typer.Option(3.0, "--latency", min=0, help="Seconds the emulator takes per batch."),
    database: Path = typer.Option(Path("batcher-demo.db"), "--db", help="SQLite file for the demo (recreated)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
) -> None:
    """Run a mixed sample end to end: SQLite, embedded Redis and the provider emulator, all local."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{database}",
        redis_url=None,
        openai_api_key=SecretStr("demo"),
        anthropic_api_key=SecretStr("demo"),
        poll_min_s=1.0,
        poll_max_s=5.0,
        tick_s=1,
    )
    summary = run(_demo(settings, jobs, EmulatorSettings(latency_s=latency), show=console.is_terminal and not json_out))
    if json_out:
        print_json(summary)
        return
    _print_summary(summary, database)


async def _demo(settings: Settings, n: int, emu: EmulatorSettings, *, show: bool) -> dict[str, Any]:
    from workers.settings import run_worker

    started = time.monotonic()
    async with serve_emulator(emu) as base_url:
        settings = settings.model_copy(update={"openai_base_url": base_url, "anthropic_base_url": base_url})
        async with Batcher(settings) as batcher:
            await batcher.enqueue_many(sample_specs(n))
        db = Database(settings.database_url)
        await migrate.upgrade(db.engine)
        adapters = build_adapters(settings)
        pipeline = Pipeline(db, settings, adapters)
        try:
            with Progress(
                TextColumn("[bold]{task.description:<10}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err_console,
                disable=not show,
            ) as bar:
                settled = bar.add_task("settled", total=n)
                submitted = bar.add_task("submitted", total=n)
                work = asyncio.create_task(run_worker(settings, burst=True, pipeline=pipeline))
                while not work.done():
                    await asyncio.wait({work}, timeout=0.5)
                    async with db.engine.connect() as conn:
                        report = await queries.status(conn)
                    done = sum(
                        report.totals[s.value] for s in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
                    )
                    bar.update(settled, completed=done)
                    bar.update(submitted, completed=done + report.totals[JobState.SUBMITTED.value])
                await work
            async with db.engine.connect() as conn:
                report = await queries.status(conn)
                saved = await ledger_savings(conn, by="provider")
        finally:
            await close_adapters(adapters)
            await db.aclose()
    return {
        "run": "demo",
        "jobs": report.totals,
        "batches": report.batches,
        "savings": saved.to_json(),
        "elapsed_s": round(time.monotonic() - started, 2),
    }


def _print_summary(summary: dict[str, Any], database: Path) -> None:
    # a line of its own: as the title of this narrow table rich would wrap it
    console.print(f"demo finished in {summary['elapsed_s']} s")
    table = Table()
    table.add_column("jobs")
    table.add_column("count", justify="right")
    for state, count in summary["jobs"].items():
        if count:
            table.add_row(state, str(count))
    console.print(table)
    batches = {k: v for k, v in summary["batches"].items() if v}
    console.print("batches: " + ", ".join(f"{k} {v}" for k, v in batches.items()))
    totals = summary["savings"]["totals"]
    console.print(
        f"tokens: {totals['input_tokens']:,} in, {totals['output_tokens']:,} out over {totals['jobs']} results"
    )
    console.print(
        f"[bold]cost {usd(Decimal(totals['actual_usd']))}[/] in batches vs {usd(Decimal(totals['realtime_usd']))} "
        f"in real time: [bold green]saved {usd(Decimal(totals['saved_usd']))} ({totals['saved_pct']}%)[/]"
    )
    console.print(f"look around: BATCHER_DATABASE_URL=sqlite:///{database} batcher status")
