"""Database layer: tables, engines, migrations."""

from __future__ import annotations

from batcher.db.engine import Database, make_engine, make_sessionmaker
from batcher.db.tables import Base, Batch, Job, LedgerEntry, Pause, batches, jobs, ledger, metadata, pauses

__all__ = [
    "Base",
    "Batch",
    "Database",
    "Job",
    "LedgerEntry",
    "Pause",
    "batches",
    "jobs",
    "ledger",
    "make_engine",
    "make_sessionmaker",
    "metadata",
    "pauses",
]
