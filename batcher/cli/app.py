"""The typer app and what every command shares: running async code, errors as messages, JSON output."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar

import orjson
import typer
from pydantic import ValidationError
from rich.cells import cell_len
from rich.console import Console, ConsoleDimensions, JustifyMethod
from rich.table import Table
from rich.text import Text

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

#: width tables and messages are laid out at when stdout is not a terminal (a pipe, a file) and COLUMNS is unset:
#: whole rows for ``grep`` and ``less -S`` rather than rows folded to fit the terminal the pipe happens to start in
PIPED_WIDTH = 200


class _Console(Console):
    """A rich Console that, writing to a pipe or file with COLUMNS unset, lays out at :data:`PIPED_WIDTH`.

    (rich would take the width of the terminal the pipe was started in, from stdin or stderr, or 80.)
    """

    piped_width = PIPED_WIDTH

    @property
    def piped(self) -> bool:
        """Writing to a pipe or file, with no width asked for (COLUMNS unset): tables get whole rows."""
        return self._width is None and not self.is_terminal and not os.environ.get("COLUMNS", "").isdigit()

    @property
    def size(self) -> ConsoleDimensions:
        if self.piped:
            return ConsoleDimensions(self.piped_width, super().size.height)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


console = _Console()
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


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr; return the Exit to raise (``raise fail(…)``)."""
    err_console.print(f"error: {message}", style="red", highlight=False, markup=False, soft_wrap=True)
    return typer.Exit(code)


def run(coro: Coroutine[Any, Any, T], *, listen: tuple[str, int] | None = None) -> T:
    """Run a coroutine for a command, turning batcher's errors into a message and exit code 1.

    ``listen``: the (host, port) a server command binds; failing to bind it is a message too, not a traceback.
    """
    try:
        return asyncio.run(coro)
    except BatcherError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except OSError as exc:
        if listen is None or "bind" not in str(exc):
            raise
        raise fail(_bind_error(exc, *listen)) from None


def _bind_error(exc: OSError, host: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use (give another with --port)"
    if exc.errno == errno.EACCES:
        return f"no permission to listen on port {port} on {host}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}: not an address of this machine (see --host)"
    return f"cannot listen on port {port} on {host}: {exc.strerror or exc}"


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode() + "\n")


def print_json_line(value: Any) -> None:
    """One JSON document on one line (JSON Lines), flushed at once for a reader following the stream."""
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")
    sys.stdout.flush()


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def command(func: Callable[P, T]) -> Callable[P, T]:
    """Register ``func`` on the app (name from the function, ``_`` → ``-``)."""
    return app.command(name=func.__name__.rstrip("_").replace("_", "-"))(functools.wraps(func)(func))


@dataclasses.dataclass(frozen=True)
class Col:
    """A column of a listing.

    Attributes:
        header: its heading.
        rank: how much it matters, 0 (always shown) and up; a terminal too narrow for every column drops the
            columns with nothing in them, then those of highest rank, until the rest fit.
        justify: ``left`` or ``right`` (numbers).
        cut: its values may be shortened with "…" (names) when even the columns kept do not fit; other columns
            (ids, states, counts) are never cut or wrapped.
    """

    header: str
    rank: int = 0
    justify: JustifyMethod = "left"
    cut: bool = False


def print_table(cols: Sequence[Col], rows: Iterable[Sequence[str]], *, title: str | None = None) -> None:
    """Print a listing (cells may hold rich markup) with each value on one line.

    To a terminal, columns that do not fit its width are left out, least important first, and named under the
    table. To a pipe or file, every column, however wide the rows.
    """
    rows = list(rows)
    natural = [
        max([cell_len(c.header), *(Text.from_markup(row[i]).cell_len for row in rows)]) for i, c in enumerate(cols)
    ]

    def width(kept: Sequence[int]) -> int:  # rich's default box: "│ " before each column, " │" after the last
        return sum(natural[i] for i in kept) + 3 * len(kept) + 1

    # a column with nothing in it (blank or 0 in every row) is the first to go
    empty = [all(Text.from_markup(row[i]).plain.strip() in ("", "0") for row in rows) for i in range(len(cols))]
    kept: list[int] = []
    budget = None if console.piped else console.width
    for i in sorted(range(len(cols)), key=lambda i: (cols[i].rank > 0 and empty[i], cols[i].rank)):
        if cols[i].rank == 0 or budget is None or width([*kept, i]) <= budget:
            kept.append(i)
    kept.sort()
    table = Table(title=title)
    for i in kept:
        col = cols[i]
        if col.cut:
            table.add_column(
                col.header, justify=col.justify, no_wrap=True, overflow="ellipsis", min_width=min(8, natural[i])
            )
        else:
            table.add_column(col.header, justify=col.justify, no_wrap=True, min_width=natural[i])
    for row in rows:
        table.add_row(*(row[i] for i in kept))
    dropped = [c.header for i, c in enumerate(cols) if i not in kept]
    if dropped and rows:
        table.caption = f"not shown (narrow terminal; --json has all): {', '.join(dropped)}"
    if budget is None:
        # every row whole, even wider than PIPED_WIDTH
        console.piped_width = max(PIPED_WIDTH, width(kept))
    try:
        console.print(table)
    finally:
        console.piped_width = PIPED_WIDTH
