"""``batcher batches / batch / status / jobs --batch / export / cancel``, in-process, against runs driven
through the emulator, on SQLite and PostgreSQL.

Each command's JSON is checked against what the database holds. The CLI runs in a worker thread (it calls
``asyncio.run`` itself) through typer's ``CliRunner``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from click.testing import Result
from pydantic import SecretStr
from typer.testing import CliRunner

from batcher import Batcher, JobSpec, Provider, Settings
from batcher.cli import app
from batcher.db import migrate
from batcher.db.engine import Database
from batcher.db.tables import batches, jobs, ledger
from batcher.emulator import EmulatorSettings, serve_emulator
from batcher.export import anthropic_line, openai_line
from batcher.lifecycle import Pipeline
from batcher.providers.openai import OpenAIAdapter
from batcher.timeutil import utcnow
from workers.settings import run_worker

BATCH_STATES = (
    "open",
    "submitting",
    "validating",
    "in_progress",
    "finalizing",
    "ended",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
    "collected",
)


def specs(run: str, n: int, model: str) -> list[JobSpec]:
    return [
        JobSpec(
            provider=Provider.OPENAI,
            endpoint="/v1/chat/completions",
            model=model,
            custom_id=f"{run}-{i}",
            body={"model": model, "messages": [{"role": "user", "content": f"{run} question {i}"}], "max_tokens": 16},
            run=run,
        )
        for i in range(n)
    ]


@dataclass
class Env:
    """One emulator, a pipeline speaking to it, and the CLI pointed at the same database and emulator."""

    db: Database
    settings: Settings
    pipeline: Pipeline
    base_url: str

    async def enqueue(self, items: list[JobSpec]) -> list[str]:
        async with Batcher(self.settings, migrate=False) as b:
            return await b.enqueue_many(items)

    async def burst(self, timeout_s: float = 90) -> None:
        await asyncio.wait_for(run_worker(self.settings, burst=True, pipeline=self.pipeline), timeout_s)

    async def rows(self, table: sa.Table, *where: Any) -> list[dict[str, Any]]:
        async with self.db.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(sa.select(table).where(*where))).mappings()]

    async def execute(self, statement: Any) -> None:
        async with self.db.engine.begin() as conn:
            await conn.execute(statement)

    def cli_env(self) -> dict[str, str | None]:
        return {
            "BATCHER_DATABASE_URL": self.settings.database_url,
            "OPENAI_BASE_URL": self.base_url,
            "OPENAI_API_KEY": "test-key",
            # cancel sets the batch's next poll this far ahead, for the worker
            "BATCHER_POLL_MIN_S": str(self.settings.poll_min_s),
            "COLUMNS": "250",
        }

    async def cli(self, *args: str | Path, code: int = 0, **env: str | None) -> Result:
        return await asyncio.to_thread(invoke, self.cli_env() | env, *args, code=code)

    async def json(self, *args: str | Path) -> Any:
        return orjson.loads((await self.cli(*args, "--json")).stdout)


def invoke(env: dict[str, str | None], *args: str | Path, code: int = 0) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture
def make_env(db_url: str, redis_url: str, tmp_path: Path) -> Callable[..., Any]:
    @asynccontextmanager
    async def factory(emulator: EmulatorSettings, **over: Any) -> AsyncIterator[Env]:
        async with serve_emulator(emulator) as base_url:
            settings = Settings(
                database_url=db_url,
                redis_url=redis_url,
                openai_base_url=base_url,
                openai_api_key=SecretStr("test-key"),
                poll_min_s=0.05,
                poll_max_s=0.2,
                tick_s=1,
                **over,
            )
            db = Database(db_url)
            await migrate.upgrade(db.engine)
            adapter = OpenAIAdapter("openai", api_key="test-key", base_url=base_url, max_retries=2)
            try:
                yield Env(db, settings, Pipeline(db, settings, {"openai": adapter}, work_dir=tmp_path), base_url)
            finally:
                await adapter.aclose()
                await db.aclose()

    return factory


@pytest.fixture
async def scenario(make_env: Callable[..., Any], tmp_path: Path) -> AsyncIterator[Env]:
    """Four runs in one database.

    ``alpha`` (12 jobs) succeeds in one batch. ``beta`` (8 jobs) has a line the provider refuses: its first batch
    fails validation (``model_mismatch`` on line 3), that job fails, the other seven succeed in a second batch.
    ``gamma`` (30 jobs, a second emulator where every batch expires, two attempts) ends part succeeded, part
    failed ``expired``. ``delta`` (5 jobs) is packed into an ``open`` batch and never sent.
    """
    async with make_env(EmulatorSettings(latency_s=0.1, data_dir=tmp_path / "emu-a"), max_attempts=2) as env:
        await env.enqueue(specs("alpha", 12, "gpt-4o-mini"))
        beta = sorted(await env.enqueue(specs("beta", 8, "gpt-4.1-mini")))
        # intake refuses a body whose model differs from the job's; the provider must see one to fail the batch
        bad_body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}).decode()
        await env.execute(sa.update(jobs).where(jobs.c.id == beta[2]).values(body=bad_body))
        await env.burst()
    emu_b = EmulatorSettings(latency_s=0.1, expire_rate=1.0, seed=5, data_dir=tmp_path / "emu-b")
    async with make_env(emu_b, max_attempts=2) as env:
        await env.enqueue(specs("gamma", 30, "gpt-4o-mini"))
        await env.burst()
        await env.enqueue(specs("delta", 5, "gpt-4.1-mini"))
        assert len(await env.pipeline.pack(utcnow(), force=True)) == 1
        yield env


async def test_batches_batch_and_jobs_match_the_database(scenario: Env) -> None:
    env = scenario
    db_batches = {b["id"]: b for b in await env.rows(batches)}
    db_jobs = await env.rows(jobs)
    # cost so far: the batch's ledger entries summed (none is written yet, so null; money as a string)
    cost: dict[str, dict[str, Decimal | None]] = {i: {"actual_usd": None, "realtime_usd": None} for i in db_batches}
    for e in await env.rows(ledger, ledger.c.actual_usd.is_not(None)):
        for key in ("actual_usd", "realtime_usd"):
            cost[e["batch_id"]][key] = (cost[e["batch_id"]][key] or Decimal(0)) + e[key]
    listed = await env.json("batches", "--limit", "1000")
    assert {b["id"] for b in listed} == set(db_batches)
    # newest first
    assert [b["created_at"] for b in listed] == sorted((b["created_at"] for b in listed), reverse=True)
    for b in listed:
        row = db_batches[b["id"]]
        for key in ("provider", "account", "provider_batch_id", "model", "endpoint", "state", "provider_state"):
            assert b[key] == row[key], key
        assert b["requests"] == {
            "total": row["request_count"],
            "succeeded": row["succeeded"],
            "failed": row["failed"],
            "expired": row["expired"],
            "cancelled": row["cancelled"],
        }
        for key in ("created_at", "submitted_at", "ended_at", "collected_at"):
            assert b[key] == (row[key].isoformat() if row[key] else None), key
        for key in ("actual_usd", "realtime_usd"):
            assert b[key] is None or isinstance(b[key], str)
            assert (None if b[key] is None else Decimal(b[key])) == cost[b["id"]][key], key
        if row["ended_at"] is None:
            assert b["age_s"] >= 0 and b["turnaround_s"] is None
        else:
            assert b["age_s"] is None and b["turnaround_s"] >= 0

    def of_run(run: str) -> set[str]:
        return {j["batch_id"] for j in db_jobs if j["run"] == run and j["batch_id"]}

    # what the runs went through
    failed_batch = next(b for b in db_batches.values() if b["provider_state"] == "failed")
    expired = [b for b in db_batches.values() if b["provider_state"] == "expired"]
    [open_batch] = [b for b in db_batches.values() if b["state"] == "open"]
    assert failed_batch["id"] in of_run("beta") and len(of_run("beta")) == 2
    assert {b["id"] for b in expired} <= of_run("gamma") and expired
    assert sum(b["expired"] for b in expired) > 0

    # filters
    for run in ("alpha", "beta", "gamma", "delta"):
        assert {b["id"] for b in await env.json("batches", "--run", run)} == of_run(run), run
    assert await env.json("batches", "--run", "nobody") == []
    assert [b["id"] for b in await env.json("batches", "--state", "open")] == [open_batch["id"]]
    collected = {i for i, b in db_batches.items() if b["state"] == "collected"}
    assert {b["id"] for b in await env.json("batches", "--state", "collected")} == collected
    assert await env.json("batches", "--state", "cancelling") == []
    assert len(await env.json("batches", "--provider", "openai")) == len(db_batches)
    assert await env.json("batches", "--provider", "anthropic") == []
    assert [b["id"] for b in await env.json("batches", "--limit", "2")] == [b["id"] for b in listed[:2]]
    # one batch made three days ago: outside 24h, inside 7d
    old = failed_batch["id"]
    await env.execute(sa.update(batches).where(batches.c.id == old).values(created_at=utcnow() - timedelta(days=3)))
    assert old not in {b["id"] for b in await env.json("batches", "--since", "24h")}
    assert len(await env.json("batches", "--since", "24h")) == len(db_batches) - 1
    assert old in {b["id"] for b in await env.json("batches", "--since", "7d")}
    for args, words in (
        (["--since", "yesterday"], ["--since", "'yesterday' is not a duration"]),
        (["--state", "done"], ["--state", "'done' is not one of"]),
        (["--provider", "acme"], ["--provider", "acme"]),
        (["--limit", "0"], ["--limit"]),
    ):
        err = (await env.cli("batches", *args, code=2)).stderr
        for word in words:
            assert word in err, err

    # one batch: by our id and by the provider's; the failed one carries the provider's errors
    detail = await env.json("batch", old)
    assert detail["id"] == old and detail["state"] == "collected" and detail["provider_state"] == "failed"
    by_provider_id = await env.json("batch", failed_batch["provider_batch_id"])
    assert {k: v for k, v in by_provider_id.items() if k != "age_s"} == {
        k: v for k, v in detail.items() if k != "age_s"
    }
    assert [(e["code"], e["line"]) for e in detail["errors"]] == [("model_mismatch", 3)]
    [bad_job] = [j for j in db_jobs if j["batch_id"] == old and j["state"] == "failed"]
    assert detail["failed_jobs"] == [
        {
            "id": bad_job["id"],
            "run": "beta",
            "custom_id": bad_job["custom_id"],
            "error_code": "model_mismatch",
            "error": bad_job["error"],
        }
    ]
    assert detail["input_file_id"] == failed_batch["input_file_id"] and detail["input_file_id"]
    assert detail["lease_owner"] is None and detail["lease_expires_at"] is None
    assert detail["poll_interval_s"] == failed_batch["poll_interval_s"]
    assert detail["jobs"]["failed"] == 1
    assert {k: v for k, v in detail["jobs"].items() if v} == dict(
        Counter(j["state"] for j in db_jobs if j["batch_id"] == old)
    )
    first_expired = min(expired, key=lambda b: b["created_at"])
    exp = await env.json("batch", first_expired["id"])
    assert exp["provider_state"] == "expired" and exp["errors"] is None
    assert exp["output_file_id"] == first_expired["output_file_id"]
    assert exp["requests"]["expired"] == first_expired["expired"] > 0
    err = (await env.cli("batch", "nope", code=1)).stderr
    assert "no batch nope" in err
    # the human views
    assert failed_batch["provider_batch_id"] in (await env.cli("batches")).stdout
    text = (await env.cli("batch", old)).stdout
    assert "model_mismatch" in text and bad_job["custom_id"] in text

    # jobs --batch, by our id and the provider's
    for batch_id, row in db_batches.items():
        expected = {j["id"] for j in db_jobs if j["batch_id"] == batch_id}
        assert {j["id"] for j in await env.json("jobs", "--batch", batch_id, "--limit", "1000")} == expected
        if row["provider_batch_id"]:
            listed_jobs = await env.json("jobs", "--batch", row["provider_batch_id"], "--limit", "1000")
            assert {j["id"] for j in listed_jobs} == expected
            assert {j["batch_id"] for j in listed_jobs} <= {batch_id}
    # a batch nobody made is an error, as with `batch`, not an empty list
    result = await env.cli("jobs", "--batch", "nope", code=1)
    assert result.stderr == "error: no batch nope\n" and result.stdout == ""
    await env.cli("jobs", "--batch", "nope", "--json", code=1)


async def test_listings_fit_a_narrow_terminal_and_pipe_whole_rows(scenario: Env) -> None:
    env = scenario
    db_batches = await env.rows(batches)
    db_jobs = await env.rows(jobs)
    # 80 columns: every line fits, ids whole, no cell folded into fragments; what is left out is named
    for args in (["batches"], ["jobs", "--limit", "1000"], ["status"], ["savings", "--by", "run"]):
        out = (await env.cli(*args, COLUMNS="80")).stdout
        lines = out.splitlines()
        assert all(len(line) <= 80 for line in lines), out
        assert "…" not in "".join(line for line in lines if line.startswith("┃")), out  # headers whole
        if args[0] == "batches":
            for b in db_batches:
                assert sum(b["id"] in line for line in lines) == 1, out
            assert "not shown (narrow terminal; --json has all): " in " ".join(out.split())
            rows = [line for line in lines if line.startswith("│")]
            assert len(rows) == len(db_batches), out  # one line per batch
        if args[0] == "jobs":
            assert {j["id"] for j in db_jobs} <= set(out.split())
            rows = [line for line in lines if line.startswith("│")]
            assert len(rows) == len(db_jobs), out
        if args[0] == "status":
            for word in ("run", "queued", "succeeded", "alpha", "delta"):
                assert f" {word} " in out, out
    # piped (not a terminal, COLUMNS unset): every column, one line per row, however wide
    out = (await env.cli("batches", COLUMNS=None)).stdout
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == len(db_batches), out
    for b in db_batches:
        [row] = [line for line in rows if b["id"] in line]
        assert b["provider_batch_id"] is None or b["provider_batch_id"] in row
        assert b["model"] in row and b["state"] in row
    assert "not shown" not in out
    out = (await env.cli("status", COLUMNS=None)).stdout
    header = next(line for line in out.splitlines() if line.startswith("┃"))
    for col in ("queued", "packed", "submitted", "fallback", "succeeded", "failed", "cancelled", "batches in flight"):
        assert f" {col} " in header, header


async def test_cost_comes_from_the_ledger(scenario: Env) -> None:
    env = scenario
    # whatever collect wrote, this test prices two jobs itself
    await env.execute(sa.delete(ledger))
    [alpha_batch] = {j["batch_id"] for j in await env.rows(jobs, jobs.c.run == "alpha")}
    two = [j for j in await env.rows(jobs, jobs.c.run == "alpha")][:2]
    for job, (actual, realtime) in zip(two, [("0.000125", "0.00025"), ("0.0000015", "0.000003")], strict=True):
        entry = {
            "job_id": job["id"],
            "attempt": 1,
            "batch_id": alpha_batch,
            "provider": "openai",
            "account": "openai",
            "model": job["model"],
            "run": "alpha",
            "tags": {},
            "mode": "batch",
            "actual_usd": Decimal(actual),
            "realtime_usd": Decimal(realtime),
            "settled_at": utcnow(),
        }
        await env.execute(ledger.insert().values(**entry))
    listed = {b["id"]: b for b in await env.json("batches")}
    assert Decimal(listed[alpha_batch]["actual_usd"]) == Decimal("0.0001265")
    assert Decimal(listed[alpha_batch]["realtime_usd"]) == Decimal("0.000253")
    assert isinstance(listed[alpha_batch]["actual_usd"], str)
    assert all(b["actual_usd"] is None for i, b in listed.items() if i != alpha_batch)
    assert Decimal((await env.json("batch", alpha_batch))["actual_usd"]) == Decimal("0.0001265")


async def test_status_and_export(scenario: Env, tmp_path: Path) -> None:
    env = scenario
    db_jobs = await env.rows(jobs)
    db_batches = await env.rows(batches)
    report = await env.json("status")
    assert report["totals"] == {s: n for s, n in Counter(j["state"] for j in db_jobs).items()} | {
        s: 0 for s in ("queued", "submitted", "fallback", "cancelled")
    }
    assert report["batches"] == {s: 0 for s in BATCH_STATES} | dict(Counter(b["state"] for b in db_batches))
    runs = {r["run"]: r for r in report["runs"]}
    assert sorted(runs) == ["alpha", "beta", "delta", "gamma"]
    for name, r in runs.items():
        mine = [j for j in db_jobs if j["run"] == name]
        assert r["total"] == len(mine)
        assert {s: n for s, n in r["jobs"].items() if n} == dict(Counter(j["state"] for j in mine))
    assert runs["delta"]["batches_in_flight"] == 1
    assert runs["delta"]["settled"] == 0
    assert all(runs[n]["batches_in_flight"] == 0 for n in ("alpha", "beta", "gamma"))
    assert "batches in flight" in (await env.cli("status")).stdout

    # --run: that run's jobs, and only the batches holding them
    for name in ("alpha", "beta", "gamma", "delta"):
        mine = await env.json("status", "--run", name)
        assert [r["run"] for r in mine["runs"]] == [name]
        held = {j["batch_id"] for j in db_jobs if j["run"] == name and j["batch_id"]} | {
            e["batch_id"] for e in await env.rows(ledger, ledger.c.run == name) if e["batch_id"]
        }
        counts = Counter(b["state"] for b in db_batches if b["id"] in held)
        assert mine["batches"] == {s: 0 for s in BATCH_STATES} | dict(counts), name
    delta = await env.json("status", "--run", "delta")
    assert delta["batches"]["open"] == 1 and sum(delta["batches"].values()) == 1
    assert "batches: open 1\n" in (await env.cli("status", "--run", "delta")).stdout
    # a run with no jobs is an error; one with jobs but nothing settled reports zeros
    for args in (["status", "--run", "nobody"], ["savings", "--run", "nobody"]):
        for extra in ([], ["--json"]):
            result = await env.cli(*args, *extra, code=1)
            assert result.stderr == "error: no run 'nobody' (no jobs in it)\n" and result.stdout == ""
    nothing = await env.json("savings", "--run", "delta")
    assert nothing["totals"]["jobs"] == 0 and Decimal(nothing["totals"]["actual_usd"]) == 0
    assert (await env.json("savings", "--run", "alpha"))["totals"]["jobs"] == 12

    # export: OpenAI output lines, the user's custom_ids, stored bodies spliced in
    by_custom_id = {(j["run"], j["custom_id"]): j for j in db_jobs}
    out = tmp_path / "alpha.jsonl"
    message = (await env.cli("export", "--run", "alpha", "-o", out)).stdout
    assert f"wrote 12 line(s) of run alpha to {out}" in " ".join(message.split())
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(f"alpha-{i}" for i in range(12))
    for line in lines:
        job = by_custom_id[("alpha", line["custom_id"])]
        assert line["id"] == f"batch_req_{job['id']}"
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"] == orjson.loads(job["result"])
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob("*.part")))

    # to stdout, the message on stderr; only the failed job of beta
    result = await env.cli("export", "--run", "beta", "--state", "failed")
    [failed] = [orjson.loads(line) for line in result.stdout.splitlines()]
    [bad_job] = [j for j in db_jobs if j["run"] == "beta" and j["state"] == "failed"]
    assert failed["custom_id"] == bad_job["custom_id"] and failed["response"] is None
    assert failed["id"] == f"batch_req_{bad_job['id']}"
    assert failed["error"]["code"] == "model_mismatch" and failed["error"]["message"]
    assert "wrote 1 line(s) of run beta to stdout" in result.stderr
    succeeded = (await env.cli("export", "--run", "beta", "--state", "succeeded")).stdout.splitlines()
    assert len(succeeded) == 7

    # every settled job of gamma, the expired ones as OpenAI writes them
    result = await env.cli("export", "--run", "gamma")
    gamma = [orjson.loads(line) for line in result.stdout.splitlines()]
    settled = [j for j in db_jobs if j["run"] == "gamma" and j["state"] in ("succeeded", "failed", "cancelled")]
    assert len(gamma) == len(settled) == 30
    assert {x["custom_id"] for x in gamma} == {j["custom_id"] for j in settled}
    expired = [x for x in gamma if x["error"]]
    assert expired and {x["error"]["code"] for x in expired} == {"batch_expired"}
    assert len(expired) == sum(j["state"] == "failed" for j in settled)

    # nothing of delta is settled: no lines, and the message says why
    result = await env.cli("export", "--run", "delta")
    assert result.stdout == ""
    assert "wrote 0 line(s) of run delta to stdout; 5 job(s) not settled yet were skipped" in result.stderr
    assert "no run 'nobody'" in (await env.cli("export", "--run", "nobody", code=1)).stderr
    assert "--state" in (await env.cli("export", "--run", "alpha", "--state", "maybe", code=2)).stderr


async def test_cancel_run_and_watch(make_env: Callable[..., Any], tmp_path: Path) -> None:
    async with make_env(EmulatorSettings(latency_s=5, data_dir=tmp_path / "emu")) as env:
        await env.enqueue(specs("doomed", 6, "gpt-4o-mini"))
        await env.enqueue(specs("keep", 3, "gpt-4.1-mini"))
        p = env.pipeline
        now = utcnow()
        assert len(await p.pack(now, force=True)) == 2
        [doomed_batch] = [b["id"] for b in await env.rows(batches, batches.c.model == "gpt-4o-mini")]
        await p.submit(doomed_batch, now)
        # two more jobs of the run, still queued when it is cancelled
        await env.enqueue(specs("doomed", 8, "gpt-4o-mini")[6:])

        report = await env.json("status")
        runs = {r["run"]: r for r in report["runs"]}
        assert (runs["doomed"]["batches_in_flight"], runs["keep"]["batches_in_flight"]) == (1, 1)
        assert report["batches"]["validating"] == 1 and report["batches"]["open"] == 1

        done = await env.json("cancel", "--run", "doomed")
        assert done == {"run": "doomed", "jobs_cancelled": 2, "batches_cancelled": 1, "batches_shared": 0}
        [b] = await env.json("batches", "--run", "doomed")
        assert b["id"] == doomed_batch and b["state"] in ("cancelling", "cancelled")
        assert b["provider_state"] in ("cancelling", "cancelled")
        text = (await env.cli("cancel", "--run", "doomed")).stdout
        assert "0 job(s) not yet sent cancelled" in text
        assert "no run 'ghost'" in (await env.cli("cancel", "--run", "ghost", code=1)).stderr

        # a watcher started now returns once the worker has settled everything
        watcher = asyncio.create_task(env.cli("status", "--watch", "--interval", "0.1"))
        # --json: one status document per refresh, one per line (JSON Lines), until the run settles (a subprocess:
        # CliRunner swaps the process's stdout, so two at once would mix their output)
        json_watcher = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("batcher")),
            *("status", "--watch", "--json", "--run", "keep", "--interval", "0.1"),
            env={k: v for k, v in (os.environ | env.cli_env()).items() if v is not None},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert json_watcher.stdout is not None
        first = await asyncio.wait_for(json_watcher.stdout.readline(), 60)  # its first look, before the burst
        assert not watcher.done() and json_watcher.returncode is None
        await env.burst()
        watched = (await asyncio.wait_for(watcher, 30)).stdout
        assert "doomed" in watched and "8/8" in watched and "3/3" in watched
        out, err = await asyncio.wait_for(json_watcher.communicate(), 30)
        assert json_watcher.returncode == 0, err.decode()
        lines = (first + out).decode().splitlines()
        assert len(lines) >= 2
        docs = [orjson.loads(line) for line in lines]
        assert all(set(d) == {"totals", "runs", "batches"} for d in docs)
        assert all([r["run"] for r in d["runs"]] == ["keep"] for d in docs)
        assert docs[0]["totals"]["succeeded"] < 3
        assert docs[-1]["totals"]["succeeded"] == 3 and docs[-1]["runs"][0]["settled"] == 3
        assert all(d["runs"][0]["settled"] < 3 for d in docs[:-1])

        rows = await env.rows(jobs)
        assert {r["state"] for r in rows if r["run"] == "doomed"} == {"cancelled"}
        assert {r["state"] for r in rows if r["run"] == "keep"} == {"succeeded"}
        detail = await env.json("batch", doomed_batch)
        assert (detail["state"], detail["provider_state"]) == ("collected", "cancelled")
        assert detail["requests"]["cancelled"] == 6
        assert detail["jobs"]["cancelled"] == 6
        # nothing active: one look, then the final view (and --json prints the report)
        assert "doomed" in (await env.cli("status", "--watch", "--run", "doomed")).stdout
        [final] = [orjson.loads(line) for line in (await env.cli("status", "--watch", "--json")).stdout.splitlines()]
        assert final["totals"]["cancelled"] == 8 and final["totals"]["succeeded"] == 3
        assert "no run 'ghost'" in (await env.cli("status", "--watch", "--run", "ghost", code=1)).stderr


def test_export_lines_in_each_providers_format() -> None:
    body = '{"id":"msg_1","type":"message","content":[{"type":"text","text":"hi"}]}'
    error = {"code": "invalid_request_error", "message": "bad max_tokens", "batch_id": "b1"}
    assert orjson.loads(anthropic_line("j1", "mine", "succeeded", body, None, None)) == {
        "custom_id": "mine",
        "result": {"type": "succeeded", "message": orjson.loads(body)},
    }
    assert orjson.loads(anthropic_line("j1", "mine", "failed", None, "invalid_request_error", error)) == {
        "custom_id": "mine",
        "result": {
            "type": "errored",
            "error": {"type": "error", "error": {"type": "invalid_request_error", "message": "bad max_tokens"}},
        },
    }
    assert orjson.loads(anthropic_line("j1", "mine", "failed", None, "expired", {}))["result"] == {"type": "expired"}
    assert orjson.loads(anthropic_line("j1", "mine", "cancelled", None, None, None))["result"] == {"type": "canceled"}
    # the stored body is spliced in byte for byte, not re-encoded
    line = openai_line("j2", "yours", "succeeded", '{"a":  1}', None, None)
    assert line == b'{"id":"batch_req_j2","custom_id":"yours","response":{"status_code":200,"request_id":null,' + (
        b'"body":{"a":  1}},"error":null}\n'
    )
    assert orjson.loads(openai_line("j2", "yours", "cancelled", None, None, None)) == {
        "id": "batch_req_j2",
        "custom_id": "yours",
        "response": None,
        "error": {"code": "batch_cancelled", "message": "This request was cancelled."},
    }
