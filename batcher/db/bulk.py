"""Set-based statements over many rows of values (settling a chunk of results, writing its ledger entries).

A statement is written once with SQLAlchemy Core against :class:`RowValues` — a derived table ``v`` of the rows'
values, sent as one or a few parameters — compiled once per dialect, and run with driver-level parameters
(``exec_driver_sql``). One execution per call, whatever the number of rows: SQLAlchemy's own ``executemany``
would run every value of every row through its type's bind processor and build a dict per row (more time than the
database spent on the rows), and a database working through one statement for the whole set needs nothing
from Python meanwhile, so the caller can prepare its next chunk while it runs (the ``sqlite3`` module releases
the GIL while SQLite runs a statement, but takes it back for every row of an ``executemany``). The same bind
processors run here, column by column; values every row shares (the batch id, the time) are processed once per
call.

How the rows travel is what differs by engine:

- PostgreSQL: ``unnest(CAST($1 AS T1[]), …) AS v(…)``, each parameter an array of one column's values.
- SQLite: ``json_each(?)`` over one JSON array of rows, each row an array of its values (already in the
  driver's form, so ``json_extract`` gives back the very text, integer or NULL the column would have got).

Either way the table's rows are meant to be found by key from ``v``; conditions that must only filter what
that finds go through :func:`filter_only`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ["BulkStatement", "RowValues", "filter_only"]

_Processor = Callable[[Any], Any]


class _FilterOnly(sa.sql.expression.ColumnElement[str]):
    inherit_cache = True

    def __init__(self, column: sa.ColumnElement[str]) -> None:
        self.column = column
        self.type = column.type


@compiles(_FilterOnly)
def _compile_filter_only(element: _FilterOnly, compiler: SQLCompiler, **kw: Any) -> str:
    # an expression of the column, not the column: no index on it applies (NULL stays NULL)
    return f"({compiler.process(element.column, **kw)} || '')"


@compiles(_FilterOnly, "sqlite")
def _compile_filter_only_sqlite(element: _FilterOnly, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite's documented way to keep a term from using an index: a unary "+"
    return "+" + compiler.process(element.column, **kw)


def filter_only(column: sa.ColumnElement[str]) -> sa.ColumnElement[str]:
    """A string ``column`` in a condition that must only filter the rows a statement finds through :class:`RowValues`.

    Neither ``v`` nor a table nobody has analyzed yet has statistics. Offered an index on the column, SQLite and
    PostgreSQL would rather read every row the condition matches (every submitted job of the batch) for each
    statement and look it up in ``v``, than look each row of ``v`` up by its key: quadratic over a batch's chunks.
    """
    return _FilterOnly(column)


def _processor(type_: sa.types.TypeEngine[Any], dialect: Dialect) -> _Processor | None:
    processor: _Processor | None = type_.dialect_impl(dialect).bind_processor(dialect)
    return processor


class RowValues:
    """The derived table ``v`` of one statement's per-row values, to write a :class:`BulkStatement` against.

    Args:
        dialect: the database's dialect (it decides how rows travel, see the module docstring).
        columns: each per-row value's name and type, in the order a row gives them.

    Attributes:
        c: the column of ``v`` of each name, to use in statements like a table's column.
    """

    def __init__(self, dialect: Dialect, columns: Mapping[str, sa.types.TypeEngine[Any]]) -> None:
        self.arrays = dialect.name == "postgresql"
        if self.arrays:
            self.param_names = [f"v_{name}" for name in columns]
            arrays = [sa.cast(sa.bindparam(f"v_{name}"), postgresql.ARRAY(type_)) for name, type_ in columns.items()]
            unnest = (
                sa.func.unnest(*arrays)
                .table_valued(*(sa.column(name, type_) for name, type_ in columns.items()))
                .render_derived(name="v")
            )
            self.c: dict[str, sa.ColumnElement[Any]] = {name: unnest.c[name] for name in columns}
        else:
            self.param_names = ["v_rows"]
            rows = sa.func.json_each(sa.bindparam("v_rows", type_=sa.Text())).table_valued("value")
            extract = [
                sa.func.json_extract(rows.c.value, sa.literal_column(f"'$[{i}]'"), type_=type_).label(name)
                for i, (name, type_) in enumerate(columns.items())
            ]
            derived = sa.select(*extract).subquery("v")
            self.c = {name: derived.c[name] for name in columns}
        self.width = len(columns)
        #: (position in a row, processor) of the values that need processing for the driver
        self.processors = [
            (i, processor)
            for i, type_ in enumerate(columns.values())
            if (processor := _processor(type_, dialect)) is not None
        ]

    def params(self, rows: Sequence[tuple[Any, ...]]) -> list[Any]:
        """The parameters that carry ``rows``, in the order of :attr:`param_names`."""
        columns: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [()] * self.width
        if len(columns) != self.width:
            raise TypeError(f"rows of {len(columns)} values given for {self.width} columns")
        for i, processor in self.processors:
            columns[i] = [processor(value) for value in columns[i]]
        if self.arrays:
            return [list(column) for column in columns]
        return [orjson.dumps(list(zip(*columns, strict=True))).decode()]


class BulkStatement:
    """A statement over :class:`RowValues`, compiled once, run once per call for any number of rows.

    Args:
        statement: the statement, written with ``values.c`` for the per-row values and named bind parameters
            (``sa.bindparam("batch_id")``) for the values every row of a call shares.
        values: the per-row values it uses.
        dialect: the database's dialect.
    """

    def __init__(self, statement: sa.ClauseElement, values: RowValues, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        order = list(compiled.positiontup or [])
        self.sql: str = compiled.string
        self._values = values
        #: the values every row shares: name → (default, processor)
        self._shared: dict[str, tuple[Any, _Processor | None]] = {}
        self._required: set[str] = set()
        for name in order:
            if name in values.param_names or name in self._shared:
                continue
            bind = compiled.binds[name]
            self._shared[name] = (bind.value, _processor(bind.type, dialect))
            if bind.required:
                self._required.add(name)
        # a call's parameters are (*the rows' parameters, *shared values), put in the statement's order
        source = [*values.param_names, *self._shared]
        self._positions = [source.index(name) for name in order]

    def params(self, rows: Sequence[tuple[Any, ...]], **shared: Any) -> tuple[Any, ...]:
        """The driver-level parameters of one execution for ``rows``.

        Raises:
            TypeError: a shared value the statement does not take, or one it needs and was not given.
        """
        unknown = shared.keys() - self._shared.keys()
        missing = self._required - shared.keys()
        if unknown or missing:
            raise TypeError(f"bulk statement values: unknown {sorted(unknown)}, missing {sorted(missing)}")
        common = []
        for name, (default, processor) in self._shared.items():
            value = shared.get(name, default)
            common.append(value if processor is None else processor(value))
        source = [*self._values.params(rows), *common]
        return tuple(source[i] for i in self._positions)

    async def execute(self, conn: AsyncConnection, params: tuple[Any, ...]) -> None:
        """Run the statement with parameters from :meth:`params`."""
        await conn.exec_driver_sql(self.sql, params)
