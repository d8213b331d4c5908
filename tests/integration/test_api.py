"""The HTTP API over a real socket, on SQLite and PostgreSQL: auth, tenants, enqueue, reads, cancel, limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from api_env import ApiEnv, api_env, chat, claude

from batcher import tenants
from batcher.api.app import ROUTES
from batcher.api.auth import KeyCache
from batcher.api.models import BulkAccepted, JobAccepted, JobOut, JobPage, ResultLine, RunOut, SavingsOut
from batcher.config import Settings
from batcher.db.engine import Database
from batcher.db.tables import idempotency_keys, jobs
from batcher.domain import JobState
from batcher.secretbox import secret_box


@pytest.fixture
async def env(db_url: str) -> AsyncIterator[ApiEnv]:
    async with api_env(db_url) as e:
        yield e


# ------------------------------------------------------------------------------------------------ auth


async def test_missing_wrong_and_revoked_keys_answer_401(env: ApiEnv) -> None:
    missing = await env.call("GET", "/v1/jobs", tenant=None)
    assert missing.status == 401
    assert missing.error["type"] == "unauthorized"
    assert missing.error["field"] == "Authorization"
    assert "Bearer" in missing.headers["WWW-Authenticate"]

    basic = await env.call("GET", "/v1/jobs", tenant=None, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status == 401
    assert "Bearer" in basic.error["message"]

    wrong = await env.call("GET", "/v1/jobs", key="bk_" + "x" * 40)
    assert wrong.status == 401
    assert wrong.error["message"] == "invalid API key"
    # a wrong key never enqueues
    assert (await env.post_job(chat(), key="bk_nope")).status == 401
    assert await env.count() == 0

    made = await tenants.create_key(env.db, "acme", box=secret_box(env.settings))
    assert (await env.call("GET", "/v1/jobs", key=made.key)).status == 200
    await tenants.revoke_key(env.db, made.id)
    revoked = await env.call("GET", "/v1/jobs", key=made.key)
    assert revoked.status == 401
    assert "revoked" in revoked.error["message"]
    assert (await env.post_job(chat(), key=made.key)).status == 401
    # the tenant's other key still works
    assert (await env.call("GET", "/v1/jobs")).status == 200


async def test_concurrent_misses_of_one_key_share_one_lookup(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    made = await tenants.create_key(db, "acme", box=secret_box(Settings(database_url=db.url)))
    real = tenants.authenticate
    lookups = 0
    answer = asyncio.Event()

    async def counted(database: Database, key: str) -> tenants.Principal | None:
        nonlocal lookups
        lookups += 1
        if key == made.key:
            await answer.wait()  # the database answers only once every request below is waiting
        return await real(database, key)

    monkeypatch.setattr(tenants, "authenticate", counted)
    cache = KeyCache(db, ttl_s=60)
    # one waiter gives up; the lookup goes on for the others
    quitter = asyncio.create_task(cache.principal(made.key))
    await asyncio.sleep(0)
    quitter.cancel()
    waiters = [asyncio.create_task(cache.principal(made.key)) for _ in range(20)]
    await asyncio.sleep(0)
    assert lookups == 1 and not any(w.done() for w in waiters)
    answer.set()
    found = await asyncio.gather(*waiters)
    assert lookups == 1
    assert {p.tenant.name for p in found if p is not None} == {"acme"} and None not in found
    # then from the cache, and an unknown key is looked up each time
    assert await cache.principal(made.key) == found[0]
    assert await cache.principal("bk_unknown") is None
    assert await cache.principal("bk_unknown") is None
    assert lookups == 3


async def test_public_endpoints_and_admin_metrics(env: ApiEnv) -> None:
    health = await env.call("GET", "/healthz", tenant=None)
    assert (health.status, health.json) == (200, {"status": "ok", "database": "ok"})
    doc = await env.call("GET", "/openapi.json", tenant=None)
    assert doc.status == 200
    assert doc.json["openapi"].startswith("3.")

    assert (await env.call("GET", "/metrics", tenant=None)).status == 401
    forbidden = await env.call("GET", "/metrics", tenant="globex")
    assert forbidden.status == 403
    assert forbidden.error["type"] == "forbidden"

    accepted = (await env.post_job(chat(1))).json
    await env.settle(accepted["id"])
    await env.post_job(chat(2))
    metrics = await env.call("GET", "/metrics", tenant="acme")  # acme's key is an admin key
    assert metrics.status == 200
    text = metrics.body.decode()
    assert 'batcher_jobs{state="queued"} 1' in text
    assert 'batcher_jobs{state="succeeded"} 1' in text
    assert "batcher_oldest_queued_age_seconds " in text
    assert 'batcher_settled_cost_usd_total{provider="openai"} 0.0005' in text
    assert 'batcher_saved_usd_total{provider="openai"} 0.0005' in text
    assert "# TYPE batcher_batch_turnaround_seconds summary" in text
    assert 'batcher_http_requests_total{method="POST",route="/v1/jobs",status="202"} 2' in text


async def test_public_metrics_setting(db_url: str) -> None:
    async with api_env(db_url, api_metrics_public=True) as env:
        assert (await env.call("GET", "/metrics", tenant=None)).status == 200


# ------------------------------------------------------------------------------------------------ tenants


async def test_another_tenants_jobs_and_runs_answer_404(env: ApiEnv) -> None:
    mine = (await env.post_job(chat(1, run="nightly", custom_id="q1"))).json
    await env.post_job(chat(2, run="nightly", custom_id="q2"))
    job_id = mine["id"]

    for method, path in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", "/v1/runs/nightly"),
        ("GET", "/v1/runs/nightly/results"),
        ("POST", "/v1/runs/nightly/cancel"),
    ]:
        reply = await env.call(method, path, tenant="globex")
        assert reply.status == 404, (method, path, reply.body)
        assert reply.error["type"] == "not_found"
    listed = await env.call("GET", "/v1/jobs", tenant="globex")
    assert listed.json == {"jobs": [], "next_cursor": None}
    # the cancel attempt changed nothing
    assert (await env.jobs(id=job_id))[0]["state"] == "queued"

    # the same run name and custom_id are the other tenant's own: no collision, a job of its own
    theirs = (await env.post_job(chat(1, run="nightly", custom_id="q1"), tenant="globex")).json
    assert theirs["created"] is True
    assert theirs["id"] != job_id
    assert theirs["run"] == "nightly"
    assert (await env.call("GET", "/v1/runs/nightly", tenant="globex")).json["total"] == 1
    assert (await env.call("GET", "/v1/runs/nightly")).json["total"] == 2
    stored = {j["id"]: (j["tenant"], j["run"]) for j in await env.jobs()}
    assert stored[job_id] == ("acme", "acme/nightly")
    assert stored[theirs["id"]] == ("globex", "globex/nightly")

    await env.settle(job_id, cost=Decimal("0.25"))
    assert (await env.call("GET", "/v1/savings", tenant="globex")).json["totals"]["actual_usd"] == "0"
    assert (await env.call("GET", "/v1/savings")).json["totals"]["actual_usd"] == "0.250000000000"


# ------------------------------------------------------------------------------------------------ enqueue


async def test_post_job_commits_before_202(env: ApiEnv) -> None:
    reply = await env.post_job(chat(7, run="r1", custom_id="c7", tags={"team": "search"}, priority=3))
    assert reply.status == 202
    accepted = JobAccepted.model_validate_json(reply.body)
    assert (accepted.custom_id, accepted.run, accepted.state, accepted.created) == ("c7", "r1", JobState.QUEUED, True)
    (row,) = await env.jobs(id=accepted.id)
    assert (row["tenant"], row["run"], row["state"], row["priority"], row["tags"]) == (
        "acme",
        "acme/r1",
        "queued",
        3,
        {"team": "search"},
    )
    assert orjson.loads(row["body"])["model"] == "gpt-4o-mini"

    again = (await env.post_job(chat(7, run="r1", custom_id="c7"))).json
    assert again == {"id": accepted.id, "custom_id": "c7", "run": "r1", "state": "queued", "created": False}
    assert await env.count() == 1

    anthropic = await env.post_job(claude(1))
    assert anthropic.status == 202
    (row,) = await env.jobs(id=anthropic.json["id"])
    assert (row["provider"], row["endpoint"]) == ("anthropic", "/v1/messages")


async def test_concurrent_single_posts_are_each_committed_once(env: ApiEnv) -> None:
    replies = await asyncio.gather(*(env.post_job(chat(i, custom_id=f"c{i % 150}")) for i in range(300)))
    assert {r.status for r in replies} == {202}
    by_custom: dict[str, set[str]] = {}
    for r in replies:
        by_custom.setdefault(r.json["custom_id"], set()).add(r.json["id"])
    assert all(len(ids) == 1 for ids in by_custom.values())
    assert await env.count() == 150
    assert sum(r.json["created"] for r in replies) == 150


async def test_idempotent_post_returns_the_first_answer_and_never_a_second_job(env: ApiEnv) -> None:
    key = {"Idempotency-Key": "order-17"}
    first = await env.post_job(chat(1), headers=key)
    assert first.status == 202
    assert "Idempotent-Replayed" not in first.headers
    second = await env.post_job(chat(1), headers=key)
    assert (second.status, second.body) == (202, first.body)
    assert second.headers["Idempotent-Replayed"] == "true"
    assert await env.count() == 1

    # still the first answer after the job moved on
    await env.settle(first.json["id"])
    assert (await env.post_job(chat(1), headers=key)).body == first.body

    # the same key for another request is refused
    other = await env.post_job(chat(2), headers=key)
    assert other.status == 409
    assert other.error["field"] == "Idempotency-Key"
    assert await env.count() == 1

    # keys are per tenant
    theirs = await env.post_job(chat(1), tenant="globex", headers=key)
    assert theirs.status == 202
    assert theirs.json["id"] != first.json["id"]

    # retries racing each other: one job, one answer
    racing = await asyncio.gather(*(env.post_job(chat(3), headers={"Idempotency-Key": "race"}) for _ in range(25)))
    assert {r.status for r in racing} == {202}
    assert len({r.json["id"] for r in racing}) == 1
    assert len({r.body for r in racing}) == 1
    assert await env.count(tenant="acme") == 2

    bad = await env.post_job(chat(4), headers={"Idempotency-Key": ""})
    assert (bad.status, bad.error["field"]) == (422, "Idempotency-Key")


async def test_idempotent_bulk_post(env: ApiEnv) -> None:
    body = b"\n".join(orjson.dumps(chat(i)) for i in range(50))  # no custom_ids: derived from the key
    first = await env.call("POST", "/v1/jobs/bulk", data=body, headers={"Idempotency-Key": "nightly-2026-11-26"})
    assert first.status == 202
    assert first.json["created"] == 50
    again = await env.call("POST", "/v1/jobs/bulk", data=body, headers={"Idempotency-Key": "nightly-2026-11-26"})
    assert again.body == first.body
    assert await env.count() == 50
    async with env.db.engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(idempotency_keys)) == 1


async def test_bulk_post_of_10000_jobs(env: ApiEnv) -> None:
    n = 10_000
    body = b"\n".join(orjson.dumps(chat(i, custom_id=f"req-{i:05d}", run="big")) for i in range(n))
    reply = await env.call("POST", "/v1/jobs/bulk", data=body, headers={"Content-Type": "application/x-ndjson"})
    assert reply.status == 202, reply.body[:500]
    accepted = BulkAccepted.model_validate_json(reply.body)
    assert (accepted.jobs, accepted.created, accepted.duplicates) == (n, n, 0)
    assert len(set(accepted.ids)) == n
    assert await env.count(tenant="acme", run="acme/big", state="queued") == n
    # ids come back in request order
    async with env.db.engine.connect() as conn:
        custom = dict((await conn.execute(sa.select(jobs.c.id, jobs.c.custom_id))).all())
    assert [custom[i] for i in accepted.ids[:3]] == ["req-00000", "req-00001", "req-00002"]

    again = await env.call("POST", "/v1/jobs/bulk", data=body)
    assert again.json["created"] == 0
    assert again.json["duplicates"] == n
    assert again.json["ids"] == accepted.ids
    run = RunOut.model_validate_json((await env.call("GET", "/v1/runs/big")).body)
    assert (run.total, run.jobs["queued"]) == (n, n)


async def test_bulk_json_array(env: ApiEnv) -> None:
    reply = await env.call("POST", "/v1/jobs/bulk", json=[chat(1), claude(2), chat(3, run="other")])
    assert reply.status == 202
    assert reply.json["created"] == 3
    assert {j["run"] for j in await env.jobs()} == {"acme/default", "acme/other"}


async def test_bulk_errors_name_the_line_and_field_and_store_nothing(env: ApiEnv) -> None:
    lines = [orjson.dumps(chat(i)) for i in range(6)]
    broken = chat(2)
    del broken["body"]["model"]
    lines[2] = orjson.dumps(broken)
    lines[4] = orjson.dumps(chat(4, colour="blue"))
    reply = await env.call("POST", "/v1/jobs/bulk", data=b"\n".join(lines))
    assert reply.status == 422
    error = reply.error
    assert error["line"] == 5
    assert error["field"] == "colour"
    assert {(e["line"], e["field"]) for e in error["errors"]} == {(5, "colour")}
    assert await env.count() == 0

    # body.model is intake's check: named with the job's position
    reply = await env.call("POST", "/v1/jobs/bulk", data=b"\n".join(lines[:4]))
    assert reply.status == 422
    assert (reply.error["line"], reply.error["field"]) == (3, "body.model")
    assert await env.count() == 0

    reply = await env.call("POST", "/v1/jobs/bulk", json=[chat(0), {"provider": "openai"}, chat(2, priority="high")])
    assert reply.status == 422
    assert {(e["line"], e["field"]) for e in reply.error["errors"]} == {(2, "body"), (3, "priority")}

    dup = await env.call("POST", "/v1/jobs/bulk", json=[chat(0, custom_id="a"), chat(1, custom_id="a")])
    assert (dup.status, dup.error["line"]) == (422, 2)
    assert "duplicate" in dup.error["message"]

    for empty in (b"", b"\n\n", b"[]"):
        reply = await env.call("POST", "/v1/jobs/bulk", data=empty)
        assert (reply.status, reply.error["field"]) == (422, "body")
    assert await env.count() == 0


@pytest.mark.parametrize(
    ("job", "field", "words"),
    [
        ({"body": {"model": "m"}}, "provider", "Field required"),
        (chat(0, provider="gemini"), "provider", "openai"),
        (chat(0) | {"body": "hi"}, "body", "object"),
        (chat(0, colour="blue"), "colour", "unknown field"),
        (chat(0, url="/v1/images"), "url", "not an OpenAI batch endpoint"),
        (claude(0, url="/v1/messages/batches"), "url", "take no url"),
        (chat(0, run=""), "run", "at least 1"),
        (chat(0, run="a/b"), "run", "pattern"),
        (chat(0, priority=10**9), "priority", "less than or equal"),
        (chat(0, not_after="2030-01-01T00:00:00"), "not_after", "timezone"),
        (chat(0, tags={"k": 5}), "tags.k", "string"),
        (chat(0, callback_url="ftp://example.com/x"), "callback_url", "http"),
        (chat(0, callback_url="not a url"), "callback_url", "http"),
        (chat(0, custom_id=""), "custom_id", "at least 1"),
        (chat(0) | {"body": {"messages": []}}, "body.model", "model"),
        (claude(0) | {"body": {"model": "claude-haiku-4-5", "messages": []}}, "body.max_tokens", "max_tokens"),
        (claude(0, custom_id="has space"), "custom_id", "rejected by the provider"),
        (chat(0) | {"body": {"model": 42, "messages": []}}, "body.model", "body.model must be a string (the model"),
        (chat(0) | {"body": {"model": "", "messages": []}}, "body.model", "body.model is missing"),
        (claude(0) | {"body": {"model": 42, "max_tokens": 5, "messages": []}}, "body.model", "must be a string"),
        (chat(0) | {"body": {"model": "m", "max_tokens": "lots"}}, "body.max_tokens", "must be an integer from 1"),
        (chat(0) | {"body": {"model": "m", "max_completion_tokens": -5}}, "body.max_completion_tokens", "not -5"),
        (
            chat(0, url="/v1/responses") | {"body": {"model": "m", "max_output_tokens": 2**31}},
            "body.max_output_tokens",
            "2,147,483,647",
        ),
        (claude(0) | {"body": {"model": "m", "max_tokens": 2**31, "messages": []}}, "body.max_tokens", "2,147,483,647"),
        (
            claude(0, url="/v1/chat/completions"),
            "provider",
            'this is an OpenAI job (url /v1/chat/completions): set provider to "openai"',
        ),
        (
            {"provider": "openai", "custom_id": "a", "params": claude(0)["body"]},
            "provider",
            'set provider to "anthropic"',
        ),
    ],
)
async def test_bad_job_answers_422_naming_the_field(env: ApiEnv, job: dict[str, Any], field: str, words: str) -> None:
    reply = await env.post_job(job)
    assert reply.status == 422, reply.body
    assert reply.error["type"] == "invalid_request"
    assert reply.error["field"] == field
    assert words.lower() in reply.error["message"].lower()
    assert await env.count() == 0


async def test_intake_errors_use_the_api_field_names(env: ApiEnv) -> None:
    no_bound = claude(1)
    del no_bound["body"]["max_tokens"]
    reply = await env.post_job(no_bound)
    assert reply.status == 422
    message = "body.max_tokens is missing: Anthropic requests need one (an integer from 1 to 2,147,483,647)"
    assert (reply.error["field"], reply.error["message"]) == ("body.max_tokens", message)
    assert [e["message"] for e in reply.error["errors"]] == [message]
    # every mention of params is the job's body over HTTP
    stream = claude(1)
    stream["body"]["stream"] = True
    reply = await env.post_job(stream)
    assert (reply.error["field"], reply.error["message"]) == ("body.stream", "body.stream is not allowed in a batch")
    assert "params" not in reply.body.decode()


async def test_bulk_intake_errors_name_the_job_in_arrays_and_json_lines_alike(env: ApiEnv) -> None:
    bad = chat(1)
    bad["body"]["max_tokens"] = 0
    expected = "job 2: body.max_tokens must be an integer from 1 to 2,147,483,647, not 0"
    for data in (orjson.dumps([chat(0), bad]), orjson.dumps(chat(0)) + b"\n" + orjson.dumps(bad)):
        reply = await env.call("POST", "/v1/jobs/bulk", data=data)
        assert reply.status == 422
        assert (reply.error["message"], reply.error["field"], reply.error["line"]) == (expected, "body.max_tokens", 2)
        assert reply.error["errors"] == [
            {"field": "body.max_tokens", "message": expected.removeprefix("job 2: "), "line": 2}
        ]
    # validation errors read the same way
    for data in (
        orjson.dumps([chat(0), chat(1, colour=1)]),
        orjson.dumps(chat(0)) + b"\n" + orjson.dumps(chat(1, colour=1)),
    ):
        reply = await env.call("POST", "/v1/jobs/bulk", data=data)
        assert reply.error["message"].startswith("job 2: colour: unknown field")
    dup = await env.call("POST", "/v1/jobs/bulk", json=[chat(0, custom_id="a"), chat(1, custom_id="a")])
    assert dup.error["message"].startswith("job 2: duplicate custom_id 'a'")
    assert dup.error["field"] == "custom_id"
    assert await env.count() == 0


async def test_malformed_bodies_answer_4xx(env: ApiEnv) -> None:
    for data in (b"{not json", b"[1, 2]", b"null", b'"text"', b"", b"\xff\xfe"):
        reply = await env.call("POST", "/v1/jobs", data=data)
        assert reply.status == 422, (data, reply.body)
        assert reply.error["type"] == "invalid_request"


async def test_size_limits_answer_413(db_url: str) -> None:
    async with api_env(db_url, api_max_job_bytes=2000, api_max_bulk_bytes=5000, api_max_bulk_jobs=3) as env:
        big = chat(0)
        big["body"]["messages"][0]["content"] = "x" * 3000
        reply = await env.post_job(big)
        assert reply.status == 413
        assert reply.error["type"] == "too_large"
        assert "BATCHER_API_MAX_JOB_BYTES" in reply.error["message"]

        body = b"\n".join(orjson.dumps(chat(i)) for i in range(40))
        assert (await env.call("POST", "/v1/jobs/bulk", data=body)).status == 413

        # chunked (no Content-Length): still cut off at the limit
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(40):
                yield orjson.dumps(chat(i)) + b"\n"

        assert env.http is not None
        async with env.http.post(
            env.url + "/v1/jobs/bulk", data=chunks(), headers={"Authorization": f"Bearer {env.keys['acme']}"}
        ) as resp:
            assert resp.status == 413
        four = b"\n".join(orjson.dumps(chat(i)) for i in range(4))
        reply = await env.call("POST", "/v1/jobs/bulk", data=four)
        assert reply.status == 413
        assert "BATCHER_API_MAX_BULK_JOBS" in reply.error["message"]
        assert await env.count() == 0


async def test_private_callback_urls_are_refused_unless_allowed(db_url: str) -> None:
    async with api_env(db_url, webhook_allow_private=False) as env:
        for url in (
            "http://127.0.0.1:9000/hook",
            "http://10.1.2.3/hook",
            "http://192.168.0.10/hook",
            "http://169.254.169.254/latest",
            "http://[::1]/hook",
            "http://[::ffff:127.0.0.1]/hook",
            "http://localhost/hook",
            "http://api.localhost/hook",
        ):
            reply = await env.post_job(chat(0, callback_url=url))
            assert reply.status == 422, url
            assert reply.error["field"] == "callback_url"
        assert (await env.post_job(chat(0, callback_url="https://hooks.example.com/batcher"))).status == 202
        reply = await env.call("PUT", "/v1/runs/r/callback", json={"url": "http://127.0.0.1/x"})
        assert (reply.status, reply.error["field"]) == (422, "url")
    async with api_env(db_url, webhook_allow_private=True) as env:
        assert (await env.post_job(chat(1, callback_url="http://127.0.0.1:9000/hook"))).status == 202


# ------------------------------------------------------------------------------------------------ limits


async def test_budget_refusal_answers_402_with_budget_spend_and_estimate(env: ApiEnv) -> None:
    await tenants.set_limits(env.db, "acme", monthly_budget_usd=Decimal("0.001"))
    first = await env.post_job(chat(0))  # gpt-4o-mini, 16 output tokens: a tiny fraction of a cent
    assert first.status == 202
    (row,) = await env.jobs(id=first.json["id"])
    assert Decimal(0) < row["estimate_usd"] < Decimal("0.0001")
    # this month's spend, nearly the whole budget
    await env.settle(first.json["id"], cost=Decimal("0.000998"))

    refused = await env.post_job(chat(1))
    assert refused.status == 402
    error = refused.error
    assert error["type"] == "over_budget"
    assert "monthly budget of $0.001" in error["message"]
    assert "spent $0.000998 this month" in error["message"]
    assert "for this request" in error["message"]
    assert Decimal(error["budget_usd"]) == Decimal("0.001")
    assert Decimal(error["spent_usd"]) == Decimal("0.000998")
    assert Decimal(error["request_usd"]) > 0
    assert await env.count() == 1

    # last month's spend does not count
    async with env.db.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE ledger SET settled_at = :t"), {"t": datetime(2020, 1, 1)})
    assert (await env.post_job(chat(1))).status == 202
    # a bulk over budget is refused whole
    await tenants.set_limits(env.db, "acme", monthly_budget_usd=Decimal("0.0002"))
    reply = await env.call("POST", "/v1/jobs/bulk", json=[chat(i, custom_id=f"b{i}") for i in range(50)])
    assert reply.status == 402
    assert await env.count() == 2
    # the other tenant has no budget
    assert (await env.post_job(chat(9), tenant="globex")).status == 202


async def test_max_queued_jobs_answers_429(env: ApiEnv) -> None:
    await tenants.set_limits(env.db, "acme", max_queued_jobs=3)
    replies = await asyncio.gather(*(env.post_job(chat(i)) for i in range(6)))
    assert sorted(r.status for r in replies) == [202, 202, 202, 429, 429, 429]
    refused = next(r for r in replies if r.status == 429)
    assert refused.error["type"] == "too_many_queued"
    assert "at most 3" in refused.error["message"]
    assert await env.count(tenant="acme") == 3
    # a settled job makes room
    accepted = next(r for r in replies if r.status == 202)
    await env.call("POST", f"/v1/jobs/{accepted.json['id']}/cancel")
    assert (await env.post_job(chat(10))).status == 202
    assert (await env.call("POST", "/v1/jobs/bulk", json=[chat(20), chat(21)])).status == 429
    assert (await env.post_job(chat(11), tenant="globex")).status == 202


# ------------------------------------------------------------------------------------------------ reads


async def test_get_job_shows_result_error_and_cost(env: ApiEnv) -> None:
    ok = (await env.post_job(chat(1, callback_url="http://127.0.0.1:1/hook"))).json["id"]
    bad = (await env.post_job(chat(2))).json["id"]
    queued = (await env.post_job(chat(3))).json["id"]
    await env.settle(ok, cost=Decimal("0.0004"))
    await env.settle(bad, state=JobState.FAILED)

    job = JobOut.model_validate_json((await env.call("GET", f"/v1/jobs/{ok}")).body)
    assert job.state is JobState.SUCCEEDED
    assert job.result["choices"][0]["message"]["content"] == "42"
    assert job.cost is not None
    assert (job.cost.actual_usd, job.cost.realtime_usd, job.cost.saved_usd) == (
        "0.000400000000",
        "0.000800000000",
        "0.000400000000",
    )
    assert job.callback_url == "http://127.0.0.1:1/hook"
    assert job.run == "default"

    failed = JobOut.model_validate_json((await env.call("GET", f"/v1/jobs/{bad}")).body)
    assert (failed.state, failed.error_code, failed.result) == (JobState.FAILED, "server_error", None)
    assert failed.cost is not None and failed.cost.actual_usd == "0"

    waiting = JobOut.model_validate_json((await env.call("GET", f"/v1/jobs/{queued}")).body)
    assert (waiting.state, waiting.cost) == (JobState.QUEUED, None)

    assert (await env.call("GET", "/v1/jobs/" + "0" * 32)).status == 404
    assert (await env.call("GET", "/v1/jobs/nonsense")).status == 404
    assert (await env.call("GET", f"/v1/jobs/{ok}", params={"x": "1"})).status == 422


async def test_list_jobs_filters_and_pages(env: ApiEnv) -> None:
    ids = [(await env.post_job(chat(i, run="a" if i % 2 else "b"))).json["id"] for i in range(7)]
    await env.settle(ids[0])
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": "2"} | ({} if cursor is None else {"cursor": cursor})
        page = JobPage.model_validate_json((await env.call("GET", "/v1/jobs", params=params)).body)
        seen += [j.id for j in page.jobs]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    only_a = (await env.call("GET", "/v1/jobs", params={"run": "a"})).json["jobs"]
    assert {j["run"] for j in only_a} == {"a"}
    assert len(only_a) == 3
    done = (await env.call("GET", "/v1/jobs", params={"state": "succeeded"})).json["jobs"]
    assert [j["id"] for j in done] == [ids[0]]
    for params, field in [
        ({"state": "done"}, "state"),
        ({"limit": "0"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"cursor": "zz"}, "cursor"),
        ({"runn": "a"}, "runn"),
    ]:
        reply = await env.call("GET", "/v1/jobs", params=params)
        assert (reply.status, reply.error["field"]) == (422, field)


async def test_cancel_a_job(env: ApiEnv) -> None:
    job_id = (await env.post_job(chat(1))).json["id"]
    reply = await env.call("POST", f"/v1/jobs/{job_id}/cancel")
    assert reply.status == 200
    assert reply.json["state"] == "cancelled"
    assert (await env.call("POST", f"/v1/jobs/{job_id}/cancel")).status == 200  # already cancelled: same answer
    (row,) = await env.jobs(id=job_id)
    assert row["state"] == "cancelled" and row["settled_at"] is not None

    done = (await env.post_job(chat(2))).json["id"]
    await env.settle(done)
    reply = await env.call("POST", f"/v1/jobs/{done}/cancel")
    assert (reply.status, reply.error["type"]) == (409, "conflict")

    at_provider = (await env.post_job(chat(3))).json["id"]
    async with env.db.engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO batches (id, provider, account, endpoint, model, state, request_count, bytes, succeeded, "
                "failed, expired, cancelled, submit_attempts, poll_interval_s, created_at, updated_at) VALUES "
                "('b1', 'openai', 'openai', '/v1/chat/completions', 'gpt-4o-mini', 'in_progress', 1, 1, 0, 0, 0, 0, "
                "1, 15, :now, :now)"
            ),
            {"now": datetime.now(UTC).replace(tzinfo=None)},
        )
        await conn.execute(sa.update(jobs).where(jobs.c.id == at_provider).values(state="submitted", batch_id="b1"))
    reply = await env.call("POST", f"/v1/jobs/{at_provider}/cancel")
    assert reply.status == 409
    assert "batch b1" in reply.error["message"]

    keyed = (await env.post_job(chat(4))).json["id"]
    first = await env.call("POST", f"/v1/jobs/{keyed}/cancel", headers={"Idempotency-Key": "k1"})
    again = await env.call("POST", f"/v1/jobs/{keyed}/cancel", headers={"Idempotency-Key": "k1"})
    assert (first.status, again.body, again.headers.get("Idempotent-Replayed")) == (200, first.body, "true")


async def test_run_view_results_stream_and_savings(env: ApiEnv) -> None:
    ids = [
        (await env.post_job(chat(i, run="nightly", custom_id=f"q{i}", tags={"team": "t"}))).json["id"] for i in range(5)
    ]
    await env.settle(ids[0], cost=Decimal("0.001"))
    await env.settle(ids[1], cost=Decimal("0.002"))
    await env.settle(ids[2], state=JobState.FAILED)

    run = RunOut.model_validate_json((await env.call("GET", "/v1/runs/nightly")).body)
    assert (run.total, run.settled, run.jobs["queued"], run.jobs["succeeded"]) == (5, 3, 2, 2)
    assert (run.cost.actual_usd, run.cost.realtime_usd, run.cost.saved_usd) == (
        "0.003000000000",
        "0.006000000000",
        "0.003000000000",
    )
    assert run.callback is None

    reply = await env.call("GET", "/v1/runs/nightly/results")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [ResultLine.model_validate_json(line) for line in reply.body.splitlines()]
    assert [line.custom_id for line in lines] == ["q0", "q1", "q2"]
    assert lines[0].result["choices"][0]["message"]["content"] == "42"
    assert lines[2].error_code == "server_error"
    failed = await env.call("GET", "/v1/runs/nightly/results", params={"state": "failed"})
    assert [orjson.loads(x)["custom_id"] for x in failed.body.splitlines()] == ["q2"]
    resumed = await env.call("GET", "/v1/runs/nightly/results", params={"after": lines[0].id})
    assert len(resumed.body.splitlines()) == 2
    assert (await env.call("GET", "/v1/runs/nope/results")).status == 404
    assert (await env.call("GET", "/v1/runs/nightly/results", params={"state": "x"})).status == 422

    savings = SavingsOut.model_validate_json((await env.call("GET", "/v1/savings", params={"by": "run"})).body)
    assert [(g.key, g.actual_usd) for g in savings.groups] == [("nightly", "0.003000000000")]
    by_tag = (await env.call("GET", "/v1/savings", params={"by": "tag:team", "since": "7d"})).json
    assert by_tag["groups"][0]["key"] == "t"
    since = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert (await env.call("GET", "/v1/savings", params={"since": since})).json["totals"]["jobs"] == 0
    for params, field in [
        ({"by": "colour"}, "by"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-01-01"}, "since"),
    ]:
        reply = await env.call("GET", "/v1/savings", params=params)
        assert (reply.status, reply.error["field"]) == (422, field)


async def test_run_callback_endpoints(env: ApiEnv) -> None:
    reply = await env.call("PUT", "/v1/runs/nightly/callback", json={"url": "http://127.0.0.1:9/run"})
    assert reply.status == 200
    assert reply.json == {"run": "nightly", "url": "http://127.0.0.1:9/run", "armed": True, "notified_jobs": 0}
    await env.post_job(chat(0, run="nightly"))
    run = (await env.call("GET", "/v1/runs/nightly")).json
    assert run["callback"]["url"] == "http://127.0.0.1:9/run"
    assert (await env.call("PUT", "/v1/runs/nightly/callback", json={"url": "x", "y": 1})).status == 422
    assert (await env.call("DELETE", "/v1/runs/nightly/callback")).status == 204
    assert (await env.call("DELETE", "/v1/runs/nightly/callback")).status == 404
    assert (await env.call("GET", "/v1/runs/nightly")).json["callback"] is None


async def test_cancel_run(env: ApiEnv) -> None:
    for i in range(3):
        await env.post_job(chat(i, run="r"))
    reply = await env.call("POST", "/v1/runs/r/cancel")
    assert reply.status == 200
    assert reply.json == {"run": "r", "jobs_cancelled": 3, "batches_cancelled": 0, "batches_shared": 0}
    assert await env.count(state="cancelled") == 3


async def test_unknown_endpoints_and_methods(env: ApiEnv) -> None:
    missing = await env.call("GET", "/v2/jobs")
    assert (missing.status, missing.error["type"]) == (404, "not_found")
    wrong = await env.call("DELETE", "/v1/jobs")
    assert (wrong.status, wrong.error["type"]) == (405, "method_not_allowed")


async def test_openapi_is_generated_from_the_models(env: ApiEnv) -> None:
    doc = (await env.call("GET", "/openapi.json", tenant=None)).json
    for route in ROUTES:
        assert route.method.lower() in doc["paths"][route.path], (route.method, route.path)
    schemas = doc["components"]["schemas"]
    job_in = schemas["JobIn"]
    assert job_in["additionalProperties"] is False
    assert job_in["required"] == ["provider", "body"]
    assert set(job_in["properties"]) == {
        "provider",
        "url",
        "body",
        "custom_id",
        "run",
        "tags",
        "priority",
        "not_after",
        "callback_url",
    }
    post = doc["paths"]["/v1/jobs"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobIn"}
    assert {"202", "401", "402", "409", "413", "422", "429"} <= set(post["responses"])
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    for name in ("JobOut", "JobAccepted", "BulkAccepted", "RunOut", "SavingsOut", "ErrorOut", "ResultLine"):
        assert name in schemas
