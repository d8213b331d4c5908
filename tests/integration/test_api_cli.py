"""``batcher keys``, ``batcher tenants`` and ``batcher up --emulator`` as subprocesses."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import sqlalchemy as sa

from batcher.client import BatcherClient
from batcher.db import migrate
from batcher.db.engine import Database
from batcher.db.tables import api_keys
from batcher.domain import JobState

BATCHER = str(Path(sys.executable).with_name("batcher"))


def _file_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def free_port_number() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def cli(db_url: str, *args: str, code: int = 0, **env: str) -> tuple[str, str]:
    proc = await asyncio.create_subprocess_exec(
        BATCHER,
        *args,
        env={**os.environ, "BATCHER_DATABASE_URL": db_url, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == code, f"exit {proc.returncode}\n{out.decode()}\n{err.decode()}"
    return out.decode(), err.decode()


async def cli_json(db_url: str, *args: str) -> Any:
    out, _ = await cli(db_url, *args, "--json")
    return orjson.loads(out)


async def test_keys_create_list_revoke(db_url: str, tmp_path: Path) -> None:
    made = await cli_json(db_url, "keys", "create", "--tenant", "acme")
    assert set(made) == {"tenant", "key", "webhook_secret"}
    assert made["tenant"] == "acme"
    assert made["key"].startswith("bk_") and len(made["key"]) == 43
    assert made["webhook_secret"].startswith("whsec_")
    second = await cli_json(db_url, "keys", "create", "--tenant", "acme", "--admin")
    assert second["key"] != made["key"]
    assert second["webhook_secret"] == made["webhook_secret"]  # one secret per tenant

    # only the hash is stored
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            rows = [dict(r) for r in (await conn.execute(sa.select(api_keys))).mappings()]
    finally:
        await db.aclose()
    assert {r["key_hash"] for r in rows} == {
        hashlib.sha256(k.encode()).hexdigest() for k in (made["key"], second["key"])
    }
    assert all(made["key"] not in str(v) and second["key"] not in str(v) for r in rows for v in r.values())
    if db_url.startswith("sqlite"):
        assert made["key"].encode() not in _file_bytes(db_url.split(":///", 1)[1])

    listed = await cli_json(db_url, "keys", "list")
    assert [(k["tenant"], k["admin"], k["revoked_at"]) for k in listed] == [("acme", False, None), ("acme", True, None)]
    assert listed[0]["prefix"] == made["key"][:12]
    revoked = await cli_json(db_url, "keys", "revoke", listed[0]["id"])
    assert revoked["revoked_at"] is not None
    listed = await cli_json(db_url, "keys", "list", "--tenant", "acme")
    assert listed[0]["revoked_at"] is not None and listed[1]["revoked_at"] is None
    # by the key itself, too
    await cli_json(db_url, "keys", "revoke", second["key"])

    _, err = await cli(db_url, "keys", "revoke", "nope", code=1)
    assert "no API key 'nope'" in err
    _, err = await cli(db_url, "keys", "create", "--tenant", "a/b", code=1)
    assert "tenant name" in err
    out, err = await cli(db_url, "keys", "create", "--tenant", "globex")
    assert "bk_" in out and "shown only now" in err


async def test_tenant_limits(db_url: str) -> None:
    await cli_json(db_url, "keys", "create", "--tenant", "acme", "--max-queued", "1000")
    assert await cli_json(db_url, "tenants", "set", "acme", "--monthly-budget", "$250.50") == {
        "tenant": "acme",
        "max_queued_jobs": 1000,
        "monthly_budget_usd": "250.500000000000",
    }
    assert await cli_json(db_url, "tenants", "set", "acme", "--max-queued", "none") == {
        "tenant": "acme",
        "max_queued_jobs": None,
        "monthly_budget_usd": "250.500000000000",
    }
    assert [t["tenant"] for t in await cli_json(db_url, "tenants", "list")] == ["acme"]
    # without --json: a line for people, not a Python dict
    out, _ = await cli(db_url, "tenants", "set", "acme", "--max-queued", "1", "--monthly-budget", "500")
    assert out == "tenant acme: max queued jobs 1, monthly budget $500.00\n"
    out, _ = await cli(db_url, "tenants", "set", "acme", "--max-queued", "none", "--monthly-budget", "none")
    assert out == "tenant acme: max queued jobs no limit, monthly budget none\n"
    _, err = await cli(db_url, "tenants", "set", "nobody", "--max-queued", "3", code=1)
    assert "no tenant 'nobody'" in err
    _, err = await cli(db_url, "tenants", "set", "acme", "--max-queued", "lots", code=2)
    assert "whole number" in err


async def test_up_with_the_emulator_serves_the_api_and_settles_jobs(sqlite_url: str, tmp_path: Path) -> None:
    """The single-machine deployment: one command, SQLite, embedded Redis, the bundled emulator."""
    db = Database(sqlite_url)
    await migrate.upgrade(db.engine)
    await db.aclose()
    port = free_port_number()
    env = {
        **{k: v for k, v in os.environ.items() if k != "BATCHER_PACK_MAX_WAIT"},
        # no BATCHER_PACK_MAX_WAIT: --emulator packs after a few seconds, not the default 300
        "BATCHER_DATABASE_URL": sqlite_url,
        "BATCHER_POLL_MIN_S": "0.1",
        "BATCHER_POLL_MAX_S": "0.5",
        "BATCHER_TICK_S": "1",
        "BATCHER_EMULATOR_DATA_DIR": str(tmp_path / "emu"),
    }
    proc = await asyncio.create_subprocess_exec(
        BATCHER,
        "up",
        "--emulator",
        "--emulator-latency",
        "0.2",
        "--port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(url + "/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert proc.returncode is None, "batcher up exited"
                await asyncio.sleep(0.1)
            else:
                pytest.fail("batcher up did not start")
        made = await cli_json(sqlite_url, "keys", "create", "--tenant", "acme")
        async with BatcherClient(url, made["key"]) as client:
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
            accepted = await client.enqueue(provider="openai", body=body, run="up")
            job = await client.wait(accepted.id, poll_s=0.2, max_poll_s=1.0, timeout_s=60)
            assert job.state is JobState.SUCCEEDED
            assert job.result["object"] == "chat.completion"
            assert [line.id async for line in client.results("up")] == [accepted.id]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert f"batcher API on {url}" in out.decode()
    assert "queued jobs are packed after 3 s (BATCHER_PACK_MAX_WAIT)" in out.decode()


def test_up_emulator_help_names_the_short_pack_wait() -> None:
    proc = subprocess.run(
        [BATCHER, "up", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}
    )
    text = " ".join(proc.stdout.replace("│", " ").split())
    assert "packed after 3 s instead of BATCHER_PACK_MAX_WAIT's default 300 s (unless it is set)" in text


@pytest.mark.parametrize("command", [["api"], ["up"], ["up", "--emulator"], ["emulator"]])
async def test_a_port_in_use_is_a_one_line_error(sqlite_url: str, tmp_path: Path, command: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out, err = await cli(
            sqlite_url,
            *command,
            "--port",
            str(port),
            code=1,
            BATCHER_EMULATOR_DATA_DIR=str(tmp_path / "emu"),
        )
    assert err == f"error: port {port} on 127.0.0.1 is already in use (give another with --port)\n"
    assert "Traceback" not in out + err
