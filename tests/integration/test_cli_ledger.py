"""The money commands: ``submit --dry-run``, ``savings``, cost in ``status``, and an Anthropic file priced at
Anthropic's batch rates, cache tokens included — on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from click.testing import Result
from pydantic import SecretStr
from typer.testing import CliRunner

from batcher import Settings
from batcher.cli import app
from batcher.db.engine import Database
from batcher.db.tables import jobs, ledger
from batcher.emulator import EmulatorSettings, serve_emulator
from batcher.pricing import PriceBook, usage_from_anthropic
from workers.settings import run_worker

SYSTEM = [{"type": "text", "text": "Shared instructions. " * 200, "cache_control": {"type": "ephemeral"}}]


def invoke(env: dict[str, str], *args: str | Path, code: int = 0) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


async def cli_json(env: dict[str, str], *args: str | Path) -> Any:
    result = await asyncio.to_thread(invoke, env, *args, "--json")
    return orjson.loads(result.stdout)


def openai_file(path: Path, n: int, *, broken: int | None = None) -> Path:
    lines = []
    for i in range(1, n + 1):
        if i == broken:
            lines.append(b"{oops")
            continue
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10}
        lines.append(
            orjson.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


async def test_dry_run_estimates_and_stores_nothing(db_url: str, tmp_path: Path) -> None:
    env = {"BATCHER_DATABASE_URL": db_url, "COLUMNS": "200"}
    path = openai_file(tmp_path / "in.jsonl", 30)
    estimate = await cli_json(env, "submit", path, "--provider", "openai", "--dry-run")
    assert (estimate["jobs"], estimate["batches"]) == (30, 1)
    [group] = estimate["groups"]
    assert group["model"] == "gpt-4o-mini"
    assert group["max_output_tokens"] == 300  # bounded by max_tokens
    # "hello there" is 2 tokens in o200k_base, plus 3 per message and 3 for the reply
    assert group["input_tokens"] == 30 * (2 + 3 + 3)
    batch, realtime = Decimal(estimate["batch_usd"]), Decimal(estimate["realtime_usd"])
    # gpt-4o-mini: $0.15/$0.60 per M in real time, $0.075/$0.30 in batches
    assert realtime == Decimal(240) * Decimal("0.15") / 10**6 + Decimal(300) * Decimal("0.6") / 10**6
    assert batch * 2 == realtime
    status = await cli_json(env, "status")
    assert sum(status["totals"].values()) == 0
    # the same checks as intake: a broken line is named and nothing is estimated
    broken = openai_file(tmp_path / "bad.jsonl", 10, broken=4)
    result = await asyncio.to_thread(invoke, env, "submit", broken, "--provider", "openai", "--dry-run", code=1)
    assert "line 4" in result.stderr


async def test_anthropic_file_priced_at_batch_rates(db_url: str, redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "anthropic.jsonl"
    lines = [
        {
            "custom_id": f"a{i}",
            "params": {
                "model": "claude-haiku-4-5",
                "max_tokens": 50,
                "system": SYSTEM,
                "messages": [{"role": "user", "content": f"question {i}"}],
            },
        }
        for i in range(12)
    ]
    path.write_bytes(b"\n".join(orjson.dumps(x) for x in lines) + b"\n")
    emu = EmulatorSettings(latency_s=0.1, data_dir=tmp_path / "emu")
    async with serve_emulator(emu) as base_url:
        env = {
            "BATCHER_DATABASE_URL": db_url,
            "ANTHROPIC_BASE_URL": base_url,
            "ANTHROPIC_API_KEY": "k",
            "COLUMNS": "200",
        }
        submitted = await cli_json(env, "submit", path, "--provider", "anthropic", "--run", "claude")
        assert submitted["inserted"] == 12
        settings = Settings(
            database_url=db_url,
            redis_url=redis_url,
            anthropic_base_url=base_url,
            anthropic_api_key=SecretStr("k"),
            poll_min_s=0.05,
            poll_max_s=0.2,
        )
        await asyncio.wait_for(run_worker(settings, burst=True), 60)
        status = await cli_json(env, "status", "--run", "claude")
        savings = await cli_json(env, "savings", "--run", "claude", "--by", "model")
    assert status["totals"]["succeeded"] == 12
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(jobs.c.usage, ledger.c.actual_usd, ledger.c.realtime_usd, ledger.c.cached_input_tokens)
                    .join(ledger, ledger.c.job_id == jobs.c.id)
                    .where(jobs.c.run == "claude")
                )
            ).all()
    finally:
        await db.aclose()
    assert len(rows) == 12
    book = PriceBook()
    cached = 0
    for usage, actual, realtime, cache_read in rows:
        u = usage_from_anthropic(usage)
        assert u.cache_creation_tokens + u.cached_input_tokens > 0, "cache_control must produce cache tokens"
        cached += cache_read
        expected = book.cost("anthropic", "claude-haiku-4-5", u, mode="batch")
        assert (actual, realtime) == (expected.actual_usd, expected.realtime_usd)
        # Anthropic bills every kind of token at half in batches
        assert actual * 2 == realtime
    assert cached > 0, "later requests read the cache the first one wrote"
    [run] = status["runs"]
    assert Decimal(run["actual_usd"]) == sum(r[1] for r in rows)
    assert Decimal(run["saved_usd"]) == sum(r[2] - r[1] for r in rows)
    [group] = savings["groups"]
    assert group["key"] == "claude-haiku-4-5"
    assert savings["totals"]["saved_pct"] == 50.0
    assert savings["totals"]["jobs"] == 12


async def test_dry_run_of_a_million_character_request_without_max_tokens(db_url: str, tmp_path: Path) -> None:
    env = {"BATCHER_DATABASE_URL": db_url, "COLUMNS": "200"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "word " * 200_000}]}
    line = {"custom_id": "long", "method": "POST", "url": "/v1/chat/completions", "body": body}
    path = tmp_path / "long.jsonl"
    path.write_bytes(orjson.dumps(line) + b"\n")
    estimate = await cli_json(env, "submit", path, "--provider", "openai", "--dry-run")
    [group] = estimate["groups"]
    assert group["input_tokens"] >= 200_000
    assert group["max_output_tokens"] == 16_384  # gpt-4o-mini's longest reply, as no max_tokens is set
    human = await asyncio.to_thread(invoke, env, "submit", path, "--provider", "openai", "--dry-run")
    assert "Traceback" not in human.stdout + human.stderr
