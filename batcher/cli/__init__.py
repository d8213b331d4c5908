"""The ``batcher`` command."""

from __future__ import annotations

from batcher.cli import api_cmds, batch_cmds, db_cmds, jobs_cmds, ledger_cmds, run_cmds
from batcher.cli.app import app

__all__ = ["app", "main"]
_COMMANDS = (api_cmds, batch_cmds, db_cmds, jobs_cmds, ledger_cmds, run_cmds)


def main() -> None:
    app()
