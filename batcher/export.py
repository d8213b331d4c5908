"""A run's results written back in the provider's own batch output format, under the user's custom_ids.

A line per settled job, as the provider would have written it had the user sent the batch themselves:
OpenAI output/error-file lines, or Anthropic ``results`` lines. Rows are streamed from the database and the
stored response body is spliced in unparsed (:class:`orjson.Fragment`), so memory does not grow with the run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, BinaryIO

import orjson
import sqlalchemy as sa

from batcher.db.engine import Database
from batcher.db.tables import jobs
from batcher.domain import JOB_ACTIVE, JobState, Provider, state_values
from batcher.errors import NotFound

logger = logging.getLogger(__name__)

__all__ = ["ExportReport", "ExportState", "anthropic_line", "export_run", "openai_line"]

#: rows fetched per round trip while streaming
EXPORT_CHUNK = 1000
_EXPIRED = "expired"


class ExportState(str, Enum):
    """Which settled jobs to export."""

    #: jobs with a result
    SUCCEEDED = "succeeded"
    #: jobs that failed for good
    FAILED = "failed"
    #: every settled job: succeeded, failed and cancelled
    ALL = "all"


_STATES: dict[ExportState, frozenset[JobState]] = {
    ExportState.SUCCEEDED: frozenset({JobState.SUCCEEDED}),
    ExportState.FAILED: frozenset({JobState.FAILED}),
    ExportState.ALL: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
}


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote.

    Attributes:
        written: lines written (one per exported job).
        unsettled: jobs of the run not settled yet (queued, in a batch, or in fallback), hence skipped.
    """

    written: int
    unsettled: int


def _message(error: Any) -> str | None:
    if isinstance(error, Mapping):
        message = error.get("message")
        return None if message is None else str(message)
    return None


def _body(result: str | None) -> orjson.Fragment | None:
    return None if result is None else orjson.Fragment(result)


def openai_line(
    job_id: str, custom_id: str, state: str, result: str | None, error_code: str | None, error: Any
) -> bytes:
    """One line of an OpenAI batch output (succeeded) or error file (failed, cancelled), ``\\n``-terminated.

    ``request_id`` is ``null``: the provider's request id is not kept, only the response body.
    """
    line: dict[str, Any] = {"id": f"batch_req_{job_id}", "custom_id": custom_id}
    if state == JobState.SUCCEEDED.value:
        line["response"] = {"status_code": 200, "request_id": None, "body": _body(result)}
        line["error"] = None
    elif state == JobState.CANCELLED.value:
        line["response"] = None
        line["error"] = {"code": "batch_cancelled", "message": "This request was cancelled."}
    else:
        code = "batch_expired" if error_code == _EXPIRED else error_code
        line["response"] = None
        line["error"] = {"code": code, "message": _message(error)}
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


def anthropic_line(
    job_id: str, custom_id: str, state: str, result: str | None, error_code: str | None, error: Any
) -> bytes:
    """One line of an Anthropic Message Batch's results, ``\\n``-terminated."""
    outcome: dict[str, Any]
    if state == JobState.SUCCEEDED.value:
        outcome = {"type": "succeeded", "message": _body(result)}
    elif state == JobState.CANCELLED.value:
        outcome = {"type": "canceled"}
    elif error_code == _EXPIRED:
        outcome = {"type": "expired"}
    else:
        inner = {"type": error_code or "api_error", "message": _message(error)}
        outcome = {"type": "errored", "error": {"type": "error", "error": inner}}
    return orjson.dumps({"custom_id": custom_id, "result": outcome}, option=orjson.OPT_APPEND_NEWLINE)


_LINES = {Provider.OPENAI.value: openai_line, Provider.ANTHROPIC.value: anthropic_line}


async def export_run(
    db: Database, run: str, out: BinaryIO, *, state: ExportState = ExportState.ALL, chunk: int = EXPORT_CHUNK
) -> ExportReport:
    """Write the run's settled jobs to ``out``, one provider-format line each, in job order.

    Args:
        db: the database.
        run: the run to export.
        out: a binary stream; written in chunks of ``chunk`` lines.
        state: which settled jobs.
        chunk: rows per fetch.

    Raises:
        NotFound: the run has no jobs.
    """
    async with db.engine.connect() as conn:
        counts = {
            s: n
            for s, n in await conn.execute(
                sa.select(jobs.c.state, sa.func.count()).where(jobs.c.run == run).group_by(jobs.c.state)
            )
        }
        if not counts:
            raise NotFound(f"no run {run!r} (no jobs in it)")
        unsettled = sum(counts.get(s, 0) for s in state_values(JOB_ACTIVE))
        query = (
            sa.select(
                jobs.c.provider,
                jobs.c.id,
                jobs.c.custom_id,
                jobs.c.state,
                jobs.c.result,
                jobs.c.error_code,
                jobs.c.error,
            )
            .where(jobs.c.run == run, jobs.c.state.in_(state_values(_STATES[state])))
            .order_by(jobs.c.id)
            .execution_options(yield_per=chunk)
        )
        written = 0
        result = await conn.stream(query)
        async for partition in result.partitions():
            out.write(b"".join(_LINES[row[0]](*row[1:]) for row in partition))
            written += len(partition)
    out.flush()
    logger.info("exported %d line(s) of run %s (%d unsettled skipped)", written, run, unsettled)
    return ExportReport(written=written, unsettled=unsettled)
