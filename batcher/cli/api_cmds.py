"""``batcher api``, ``batcher up``, ``batcher keys …``, ``batcher tenants …``, ``batcher webhooks …``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import typer
from pydantic import SecretStr
from rich.markup import escape

from batcher import tenants, webhooks
from batcher.cli.app import (
    Col,
    app,
    console,
    err_console,
    load_settings,
    print_json,
    print_table,
    run,
    setup_logging,
)
from batcher.config import Settings
from batcher.db import migrate
from batcher.db.engine import Database
from batcher.timeutil import parse_duration, utcnow

T = TypeVar("T")

keys_app = typer.Typer(
    help="API keys of the HTTP API's tenants (only a hash of each key is stored).", no_args_is_help=True
)
tenants_app = typer.Typer(help="Tenants of the HTTP API and their limits.", no_args_is_help=True)
webhooks_app = typer.Typer(help="Webhook deliveries: where each stands, and sending one again.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(tenants_app, name="tenants")
app.add_typer(webhooks_app, name="webhooks")


def _with_db(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    async def _go() -> T:
        db = Database(settings.database_url)
        try:
            await migrate.upgrade(db.engine)
            return await work(db)
        finally:
            await db.aclose()

    return run(_go())


def _limit_int(value: str | None, option: str) -> int | None:
    """``--max-queued``: a number, or ``none`` to remove the limit (the caller handles "not given")."""
    if value is None or value.lower() == "none":
        return None
    try:
        number = int(value.replace("_", "").replace(",", ""))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a whole number (or 'none')", param_hint=option) from None
    if number < 0:
        raise typer.BadParameter("must be >= 0", param_hint=option)
    return number


def _limit_usd(value: str | None, option: str) -> Decimal | None:
    if value is None or value.lower() == "none":
        return None
    try:
        amount = Decimal(value.lstrip("$").replace(",", ""))
    except InvalidOperation:
        raise typer.BadParameter(f"{value!r} is not an amount of dollars (or 'none')", param_hint=option) from None
    if not amount.is_finite() or amount < 0:
        raise typer.BadParameter("must be a number of dollars >= 0", param_hint=option)
    return amount


def _limits(max_queued: str | None, budget: str | None) -> dict[str, Any]:
    given: dict[str, Any] = {}
    if max_queued is not None:
        given["max_queued_jobs"] = _limit_int(max_queued, "--max-queued")
    if budget is not None:
        given["monthly_budget_usd"] = _limit_usd(budget, "--monthly-budget")
    return given


# ------------------------------------------------------------------------------------------------ keys


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., "--tenant", help="The tenant the key belongs to (made if new)."),
    admin: bool = typer.Option(False, "--admin", help="The key may also read /metrics."),
    max_queued: str | None = typer.Option(
        None, "--max-queued", help="Set the tenant's most unsettled jobs at once ('none': no limit)."
    ),
    budget: str | None = typer.Option(
        None, "--monthly-budget", help="Set the tenant's monthly budget in dollars ('none': no budget)."
    ),
    json_out: bool = typer.Option(False, "--json", help='Print {"tenant", "key", "webhook_secret"}.'),
) -> None:
    """Make an API key. It is printed once, here; only its hash is stored."""
    settings = load_settings()
    limits = _limits(max_queued, budget)

    async def _create(db: Database) -> tenants.CreatedKey:
        box = await tenants.prepare_secrets(db, settings)
        assert box is not None
        return await tenants.create_key(db, tenant, box=box, admin=admin, **limits)

    made = _with_db(settings, _create)
    if json_out:
        print_json({"tenant": made.tenant, "key": made.key, "webhook_secret": made.webhook_secret})
        return
    console.print(f"tenant         {made.tenant}")
    console.print(f"key id         {made.id}")
    console.print(f"key            [bold]{made.key}[/]", highlight=False)
    console.print(f"webhook secret {made.webhook_secret}", highlight=False)
    err_console.print("The key is shown only now; store it. Send it as: Authorization: Bearer <key>")


@keys_app.command("list")
def keys_list(
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's keys."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List keys (never the keys themselves: their id and first characters)."""
    settings = load_settings()
    found = _with_db(settings, lambda db: tenants.list_keys(db, tenant=tenant))
    if json_out:
        print_json([k.to_json() for k in found])
        return
    cols = [
        Col("id"),
        Col("tenant", rank=1, cut=True),
        Col("key starts"),
        Col("admin", rank=3),
        Col("created", rank=4),
        Col("revoked", rank=2),
    ]
    print_table(
        cols,
        (
            [
                k.id,
                escape(k.tenant),
                k.prefix + "…",
                "yes" if k.admin else "",
                k.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                "" if k.revoked_at is None else k.revoked_at.strftime("%Y-%m-%d %H:%M:%S"),
            ]
            for k in found
        ),
    )


@keys_app.command("revoke")
def keys_revoke(
    key: str = typer.Argument(..., metavar="KEY", help="The key's id, its first characters as listed, or the key."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Revoke a key: the API refuses it from now on (within BATCHER_API_AUTH_CACHE_S seconds on running APIs).

    Revoking a tenant's last key erases its webhook secrets; its next key gets a new one.
    """
    settings = load_settings()
    revoked = _with_db(settings, lambda db: tenants.revoke_key(db, key))
    if json_out:
        print_json(revoked.to_json() | {"webhook_secret_erased": revoked.secret_erased})
        return
    console.print(f"revoked key {revoked.id} of tenant {revoked.tenant}", highlight=False)
    if revoked.secret_erased:
        console.print(
            f"it was the tenant's last key: its webhook secret is erased and its undelivered webhooks are given up "
            f"(a new key for {revoked.tenant} gets a new secret)",
            highlight=False,
        )


# ------------------------------------------------------------------------------------------------ tenants


@tenants_app.command("list")
def tenants_list(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Tenants and their limits."""
    settings = load_settings()
    found = _with_db(settings, tenants.list_tenants)
    if json_out:
        print_json([t.to_json() for t in found])
        return
    cols = [Col("tenant", cut=True), Col("max queued jobs", justify="right"), Col("monthly budget", justify="right")]
    print_table(
        cols,
        (
            [
                escape(t.name),
                "" if t.max_queued_jobs is None else f"{t.max_queued_jobs:,}",
                "" if t.monthly_budget_usd is None else f"${t.monthly_budget_usd:,.2f}",
            ]
            for t in found
        ),
    )


@tenants_app.command("set")
def tenants_set(
    tenant: str = typer.Argument(..., metavar="TENANT"),
    max_queued: str | None = typer.Option(None, "--max-queued", help="Most unsettled jobs at once ('none': no limit)."),
    budget: str | None = typer.Option(None, "--monthly-budget", help="Dollars per calendar month ('none': no budget)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Change a tenant's limits (limits not given stay as they are)."""
    settings = load_settings()
    limits = _limits(max_queued, budget)
    if not limits:
        raise typer.BadParameter("give --max-queued and/or --monthly-budget")
    found = _with_db(settings, lambda db: tenants.set_limits(db, tenant, **limits))
    if json_out:
        print_json(found.to_json())
        return
    queued = "no limit" if found.max_queued_jobs is None else f"{found.max_queued_jobs:,}"
    budget = "none" if found.monthly_budget_usd is None else f"${found.monthly_budget_usd:,.2f}"
    console.print(f"tenant {found.name}: max queued jobs {queued}, monthly budget {budget}", highlight=False)


def _overlap_s(value: str) -> float:
    try:
        seconds = parse_duration(value).total_seconds()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--overlap") from None
    if seconds > tenants.MAX_OVERLAP_S:
        raise typer.BadParameter("at most 30 days", param_hint="--overlap")
    return seconds


@tenants_app.command("rotate-secret")
def tenants_rotate_secret(
    tenant: str = typer.Argument(..., metavar="TENANT"),
    overlap: str = typer.Option(
        "24h", "--overlap", help="How long the current secret keeps signing next to the new one (0: not at all)."
    ),
    json_out: bool = typer.Option(False, "--json", help='Print {"tenant", "webhook_secret", "previous_valid_until"}.'),
) -> None:
    """Give a tenant a new webhook secret, printed once. Webhooks carry both signatures during the overlap."""
    settings = load_settings()
    overlap_s = _overlap_s(overlap)

    async def _rotate(db: Database) -> tenants.RotatedSecret:
        box = await tenants.prepare_secrets(db, settings)
        assert box is not None
        return await tenants.rotate_secret(db, box, tenant, overlap_s=overlap_s, now=utcnow())

    rotated = _with_db(settings, _rotate)
    if json_out:
        print_json(rotated.to_json())
        return
    console.print(f"tenant         {rotated.tenant}", highlight=False)
    console.print(f"webhook secret {rotated.webhook_secret}", highlight=False)
    if rotated.previous_valid_until is None:
        err_console.print(
            "The previous secret no longer signs. The new one is shown only now; give it to the receiver."
        )
    else:
        until = rotated.previous_valid_until.strftime("%Y-%m-%d %H:%M:%S UTC")
        err_console.print(
            f"The previous secret signs too until {until}; give the receiver the new one before then. "
            "The new one is shown only now.",
            highlight=False,
        )


# ------------------------------------------------------------------------------------------------ webhooks


@webhooks_app.command("list")
def webhooks_list(
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's deliveries."),
    state: str | None = typer.Option(None, "--state", help="pending, delivered or failed."),
    job: str | None = typer.Option(None, "--job", help="Only the delivery of this job."),
    limit: int = typer.Option(50, "--limit", min=1, max=100_000, help="At most this many, newest first."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Webhook deliveries and where each stands: attempts, last answer, next attempt."""
    settings = load_settings()
    found = _with_db(
        settings, lambda db: webhooks.list_deliveries(db, tenant=tenant, state=state, job_id=job, limit=limit)
    )
    if json_out:
        print_json(found)
        return
    cols = [
        Col("id"),
        Col("tenant", rank=3, cut=True),
        Col("event", rank=2),
        Col("job / run", rank=1),
        Col("state"),
        Col("attempts", rank=4, justify="right"),
        Col("last answer", rank=5, cut=True),
        Col("next attempt", rank=6),
        Col("url", rank=7, cut=True),
    ]
    rows = []
    for d in found:
        answer = d["last_error"] or ("" if d["last_status"] is None else f"HTTP {d['last_status']}")
        rows.append(
            [
                d["id"],
                escape(d["tenant"]),
                d["event"],
                escape(d["job_id"] or d["run"] or ""),
                d["state"],
                str(d["attempts"]),
                escape(answer[:60]),
                (d["next_attempt_at"] or "")[:19].replace("T", " "),
                escape(d["url"]),
            ]
        )
    print_table(cols, rows)


@webhooks_app.command("retry")
def webhooks_retry(
    delivery: str = typer.Argument(..., metavar="ID"),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Send a delivery again now (a failed one gets one more attempt; the worker sends it)."""
    settings = load_settings()
    found = _with_db(settings, lambda db: webhooks.retry(db, delivery, utcnow()))
    if json_out:
        print_json(found)
        return
    console.print(f"webhook delivery {found['id']} is {found['state']}: the worker sends it at its next tick")


# ------------------------------------------------------------------------------------------------ serving


@app.command()
def api(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8300, "--port", min=0, max=65535),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step."),
) -> None:
    """Serve the HTTP API for producers (run as many as you like against one database)."""
    from batcher.api.app import freeze_heap, serve_api

    setup_logging(verbose)
    settings = load_settings()

    async def _serve() -> None:
        async with serve_api(settings, host, port) as url:
            freeze_heap()
            console.print(f"batcher API on {url} — make a key with: batcher keys create --tenant NAME")
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        run(_serve(), listen=(host, port))


@contextlib.asynccontextmanager
async def _emulated(settings: Settings, latency_s: float) -> AsyncIterator[Settings]:
    from batcher.emulator import EmulatorSettings, serve_emulator

    async with serve_emulator(EmulatorSettings(latency_s=latency_s)) as base_url:
        yield settings.model_copy(
            update={
                "openai_base_url": base_url,
                "openai_api_key": settings.openai_api_key or SecretStr("emulator"),
                "anthropic_base_url": base_url.removesuffix("/v1"),
                "anthropic_api_key": settings.anthropic_api_key or SecretStr("emulator"),
            }
        )


async def serve_all(settings: Settings, host: str, port: int, *, emulator: bool, emulator_latency_s: float) -> None:
    """The single-machine deployment: the API and a worker in one process (and the emulator, if asked)."""
    from batcher.api.app import freeze_heap, serve_api
    from workers.settings import run_worker

    db = Database(settings.database_url)
    try:
        await migrate.upgrade(db.engine)
    finally:
        await db.aclose()
    async with contextlib.AsyncExitStack() as stack:
        if emulator:
            settings = await stack.enter_async_context(_emulated(settings, emulator_latency_s))
            console.print(
                f"provider emulator at {settings.openai_base_url}; queued jobs are packed after "
                f"{settings.pack_max_wait_s:g} s (BATCHER_PACK_MAX_WAIT)"
            )
        url = await stack.enter_async_context(serve_api(settings, host, port, migrate_db=False))
        freeze_heap()
        console.print(f"batcher API on {url} and a worker — make a key with: batcher keys create --tenant NAME")
        # the worker handles SIGINT/SIGTERM: when it returns, the API stops too
        await run_worker(settings)


#: ``batcher up --emulator``: seconds a queued job waits before it is packed, unless BATCHER_PACK_MAX_WAIT is set
EMULATOR_PACK_MAX_WAIT_S = 3.0


@app.command()
def up(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface the API listens on."),
    port: int = typer.Option(8300, "--port", min=0, max=65535),
    emulator: bool = typer.Option(
        False,
        "--emulator",
        help="Run against the bundled provider emulator, to try batcher out: queued jobs are packed after "
        f"{EMULATOR_PACK_MAX_WAIT_S:g} s instead of BATCHER_PACK_MAX_WAIT's default 300 s (unless it is set).",
    ),
    emulator_latency: float = typer.Option(3.0, "--emulator-latency", min=0, help="Seconds an emulated batch takes."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step."),
) -> None:
    """The API and a worker in one process, on embedded defaults (SQLite, embedded Redis unless configured)."""
    setup_logging(verbose)
    settings = load_settings()
    if emulator and "pack_max_wait_s" not in settings.model_fields_set:
        # a try-it mode: a posted job should not sit for five minutes before anything happens
        settings = settings.model_copy(update={"pack_max_wait_s": EMULATOR_PACK_MAX_WAIT_S})
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        run(
            serve_all(settings, host, port, emulator=emulator, emulator_latency_s=emulator_latency), listen=(host, port)
        )
