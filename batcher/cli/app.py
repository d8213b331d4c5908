"""The typer app and what every command shares: running async code, errors as messages, JSON output."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console

from batcher.config import Settings
from batcher.errors import BatcherError

app = typer.Typer(
    name="batcher",
    help="Queue latency-tolerant LLM requests into provider batch APIs and keep a ledger of what they saved.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

console = Console()
err_console = Console(stderr=True)

P = ParamSpec("P")
T = TypeVar("T")


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        err_console.print("[red]error:[/] invalid settings\n" + "\n".join(lines))
        raise typer.Exit(2) from None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine for a command, turning batcher's errors into a message and exit code 1."""
    try:
        return asyncio.run(coro)
    except BatcherError as exc:
        err_console.print(f"error: {exc}", style="red", highlight=False, markup=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode() + "\n")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def command(func: Callable[P, T]) -> Callable[P, T]:
    """Register ``func`` on the app (name from the function, ``_`` → ``-``)."""
    return app.command(name=func.__name__.rstrip("_").replace("_", "-"))(functools.wraps(func)(func))
