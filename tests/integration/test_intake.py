"""Intake through the Python door, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from batcher import Batcher, InvalidFile, InvalidInput, JobSpec, JobState, NotFound, Provider, Settings


def write_openai_file(path: Path, n: int, *, broken: int | None = None, model: str = "gpt-4o-mini") -> Path:
    with path.open("wb") as fh:
        for i in range(1, n + 1):
            if i == broken:
                fh.write(b'{"custom_id": "oops", "method": "POST", \n')
                continue
            line = {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]},
            }
            fh.write(orjson.dumps(line) + b"\n")
    return path


async def test_submit_file_is_idempotent(settings: Settings, tmp_path: Path) -> None:
    path = write_openai_file(tmp_path / "in.jsonl", 1200)
    async with Batcher(settings) as b:
        first = await b.submit_file(path, provider="openai", run="nightly", tags={"team": "search"}, priority=2)
        assert (first.received, first.inserted, first.duplicates) == (1200, 1200, 0)
        again = await b.submit_file(path, provider="openai", run="nightly")
        assert (again.received, again.inserted, again.duplicates) == (1200, 0, 1200)
        # another run is another namespace for custom_ids
        other = await b.submit_file(path, provider="openai", run="other")
        assert other.inserted == 1200
        report = await b.status()
        assert report.totals["queued"] == 2400
        assert {r.run: r.total for r in report.runs} == {"nightly": 1200, "other": 1200}
        jobs = await b.jobs(run="nightly", limit=5)
        assert len(jobs) == 5
        job = await b.get(jobs[0].id)
        assert job.tags == {"team": "search"}
        assert job.priority == 2
        assert job.state == "queued"
        assert job.model == "gpt-4o-mini"


async def test_broken_line_refuses_whole_file(settings: Settings, tmp_path: Path) -> None:
    path = write_openai_file(tmp_path / "in.jsonl", 100, broken=57)
    async with Batcher(settings) as b:
        with pytest.raises(InvalidFile) as info:
            await b.submit_file(path, provider="openai", run="r")
        assert info.value.line == 57
        assert "line 57" in str(info.value)
        assert "nothing was stored" in str(info.value)
        assert (await b.status()).totals["queued"] == 0


async def test_duplicate_custom_id_in_file_named(settings: Settings, tmp_path: Path) -> None:
    path = write_openai_file(tmp_path / "in.jsonl", 10)
    with path.open("ab") as fh:
        fh.write(path.read_bytes().splitlines()[2] + b"\n")
    async with Batcher(settings) as b:
        with pytest.raises(InvalidFile) as info:
            await b.submit_file(path, provider="openai", run="r")
        assert "line 11: duplicate custom_id 'req-3' (first on line 3)" in str(info.value)
        assert (await b.status()).totals["queued"] == 0


async def test_skip_invalid_stores_good_lines_and_writes_rejects(settings: Settings, tmp_path: Path) -> None:
    path = write_openai_file(tmp_path / "in.jsonl", 20, broken=7)
    rejects = tmp_path / "rejects.jsonl"
    async with Batcher(settings) as b:
        result = await b.submit_file(path, provider="openai", run="r", rejects_path=rejects)
        assert (result.inserted, result.rejected) == (19, 1)
        lines = [orjson.loads(x) for x in rejects.read_bytes().splitlines()]
        assert len(lines) == 1
        assert lines[0]["line"] == 7
        assert "invalid JSON" in lines[0]["error"]
        assert (await b.status()).totals["queued"] == 19


async def test_anthropic_file(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = [
        {
            "custom_id": f"q{i}",
            "params": {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]},
        }
        for i in range(5)
    ]
    path.write_bytes(b"\n".join(orjson.dumps(x) for x in lines) + b"\n")
    async with Batcher(settings) as b:
        result = await b.submit_file(path, provider=Provider.ANTHROPIC, run="a")
        assert result.inserted == 5
        job = (await b.jobs(run="a", limit=1))[0]
        assert (job.provider, job.endpoint, job.model) == ("anthropic", "/v1/messages", "claude-haiku-4-5")


async def test_enqueue_get_and_wait(settings: Settings) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with Batcher(settings) as b:
        job_id = await b.enqueue(provider="openai", body=body, custom_id="one", run="r", tags={"k": "v"})
        assert await b.enqueue(provider="openai", body=body, custom_id="one", run="r") == job_id
        job = await b.get(job_id)
        assert job.state == JobState.QUEUED.value
        assert orjson.loads(job.result or "null") is None
        with pytest.raises(TimeoutError):
            await b.wait(job_id, timeout_s=0.2, poll_s=0.05)
        with pytest.raises(NotFound):
            await b.get("0" * 32)
        with pytest.raises(InvalidInput) as info:
            await b.enqueue(provider="openai", body={"messages": []}, custom_id="two", run="r")
        assert info.value.field == "body.model"


async def test_enqueue_many_all_or_nothing(settings: Settings) -> None:
    def spec(i: int, model: str | None = "gpt-4o-mini") -> JobSpec:
        body: dict[str, object] = {"messages": [{"role": "user", "content": str(i)}]}
        if model:
            body["model"] = model
        return JobSpec(
            provider=Provider.OPENAI, endpoint="/v1/embeddings", model=model or "x", custom_id=f"c{i}", body=body
        )

    async with Batcher(settings) as b:
        with pytest.raises(InvalidInput) as info:
            await b.enqueue_many([spec(1), spec(2), spec(3, model=None)])
        assert info.value.line == 3
        assert (await b.status()).totals["queued"] == 0
        ids = await b.enqueue_many([spec(i) for i in range(1000)])
        assert len(set(ids)) == 1000
        assert ids == await b.enqueue_many([spec(i) for i in range(1000)])
        assert (await b.status()).totals["queued"] == 1000


async def test_wait_returns_when_settled(settings: Settings) -> None:
    import sqlalchemy as sa

    from batcher.db.tables import jobs
    from batcher.timeutil import utcnow

    body = {"model": "gpt-4o-mini", "messages": []}
    async with Batcher(settings) as b:
        job_id = await b.enqueue(provider="openai", body=body, custom_id="w", run="r")

        async def settle_later() -> None:
            await asyncio.sleep(0.2)
            async with b.db.engine.begin() as conn:
                await conn.execute(
                    sa.update(jobs).where(jobs.c.id == job_id).values(state="cancelled", settled_at=utcnow())
                )

        task = asyncio.create_task(settle_later())
        job = await b.wait(job_id, timeout_s=5, poll_s=0.05)
        await task
        assert job.state == "cancelled"


async def test_file_in_the_other_providers_format_is_named(settings: Settings, tmp_path: Path) -> None:
    path = write_openai_file(tmp_path / "in.jsonl", 3)
    async with Batcher(settings) as b:
        with pytest.raises(InvalidFile) as info:
            await b.submit_file(path, provider="anthropic", run="r")
        assert info.value.total == 3
        assert [str(e) for e in info.value.errors] == [
            f"line {i}: this is an OpenAI line (custom_id, method, url, body); use --provider openai" for i in (1, 2, 3)
        ]
        assert (await b.status()).totals["queued"] == 0


async def test_bad_output_bounds_are_refused_at_intake(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    bodies = [
        {"max_tokens": 16},
        {"max_tokens": "lots"},
        {"max_completion_tokens": -5},
        {"model": 42},
    ]
    lines = [
        orjson.dumps(
            {
                "custom_id": f"q{i}",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": []} | extra,
            }
        )
        for i, extra in enumerate(bodies, start=1)
    ]
    # a 31-digit max_tokens, as a user's file may hold it (orjson writes no such integer)
    lines.append(
        b'{"custom_id": "q5", "url": "/v1/responses", "body": {"model": "m", "max_output_tokens": ' + b"9" * 31 + b"}}"
    )
    path.write_bytes(b"\n".join(lines) + b"\n")
    rejects = tmp_path / "rejects.jsonl"
    async with Batcher(settings) as b:
        result = await b.submit_file(path, provider="openai", run="r", rejects_path=rejects)
        assert (result.inserted, result.rejected) == (1, 4)
    found = [(r["line"], r["error"]) for r in map(orjson.loads, rejects.read_bytes().splitlines())]
    assert found == [
        (2, "body.max_tokens must be an integer from 1 to 2,147,483,647, not 'lots'"),
        (3, "body.max_completion_tokens must be an integer from 1 to 2,147,483,647, not -5"),
        (4, "body.model must be a string (the model name), not 42"),
        (5, "body.max_output_tokens must be an integer from 1 to 2,147,483,647, not 1e+31"),
    ]


async def test_enqueue_names_a_model_that_is_not_a_string(settings: Settings) -> None:
    async with Batcher(settings) as b:
        with pytest.raises(InvalidInput) as info:
            await b.enqueue(provider="anthropic", body={"model": 7, "max_tokens": 5, "messages": []}, custom_id="x")
        assert info.value.field == "params.model"
        assert "params.model must be a string (the model name)" in str(info.value)
        with pytest.raises(InvalidInput) as info:
            await b.enqueue(
                provider="anthropic", body={"model": "m", "max_tokens": 2**40, "messages": []}, custom_id="y"
            )
        assert info.value.field == "params.max_tokens"


def test_dry_run_refuses_what_submit_refuses(tmp_path: Path) -> None:
    from batcher.estimate import estimate_file
    from batcher.pricing import PriceBook

    path = write_openai_file(tmp_path / "in.jsonl", 6)
    with path.open("ab") as fh:
        fh.write(path.read_bytes().splitlines()[1] + b"\n")  # line 7 repeats req-2
    with pytest.raises(InvalidFile) as info:
        estimate_file(path, Provider.OPENAI, PriceBook())
    assert [str(e) for e in info.value.errors] == ["line 7: duplicate custom_id 'req-2' (first on line 2)"]
    rejects = tmp_path / "rejects.jsonl"
    estimate = estimate_file(path, Provider.OPENAI, PriceBook(), rejects_path=rejects)
    assert (estimate.jobs, estimate.rejected) == (6, 1)
    [reject] = map(orjson.loads, rejects.read_bytes().splitlines())
    assert (reject["line"], reject["error"]) == (7, "duplicate custom_id 'req-2' (first on line 2)")
