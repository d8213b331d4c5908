"""Budgets that hold, over real HTTP on SQLite and PostgreSQL: unpriced models, long inputs, requests with no
output bound, and spend the ledger could not price."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from api_env import ApiEnv, api_env, chat

from batcher import tenants
from batcher.db.tables import ledger


@pytest.fixture
async def env(db_url: str, tmp_path: Path) -> AsyncIterator[ApiEnv]:
    overrides = tmp_path / "prices.json"
    overrides.write_text(json.dumps({"openai/in-house-model": {"realtime": {"input_mtok": "1", "output_mtok": "2"}}}))
    async with api_env(db_url, price_overrides_file=overrides) as e:
        yield e


def _model(job: dict[str, object], model: str) -> dict[str, object]:
    body = dict(job["body"])  # type: ignore[call-overload]
    body["model"] = model
    return job | {"body": body}


async def test_an_unpriced_model_is_refused_under_a_budget(env: ApiEnv) -> None:
    unpriced = _model(chat(0), "no-such-model-xyz")
    # without a budget the job is taken (its cost will be recorded as unknown)
    assert (await env.post_job(unpriced, tenant="globex")).status == 202

    await tenants.set_limits(env.db, "acme", monthly_budget_usd=Decimal("100"))
    refused = await env.post_job(unpriced)
    assert refused.status == 402
    assert refused.error["type"] == "unpriced_model"
    assert refused.error["models"] == ["openai/no-such-model-xyz"]
    assert "no price is known for openai/no-such-model-xyz" in refused.error["message"]
    assert "price override" in refused.error["message"]
    # in a bulk request it refuses the lot; nothing of acme's is stored
    bulk = await env.call(
        "POST", "/v1/jobs/bulk", json=[chat(1, custom_id="a"), _model(chat(2, custom_id="b"), "nope")]
    )
    assert bulk.status == 402
    assert await env.count(tenant="acme") == 0
    # a model the operator priced by override is counted and taken
    priced = await env.post_job(_model(chat(3), "in-house-model"))
    assert priced.status == 202
    (row,) = await env.jobs(id=priced.json["id"])
    assert row["estimate_usd"] > 0


async def test_no_output_bound_is_estimated_at_the_models_longest_reply(env: ApiEnv) -> None:
    unbounded = chat(0)
    del unbounded["body"]["max_tokens"]
    # gpt-4o-mini replies up to 16,384 tokens: at $0.30 per M (batch) that is over $0.0049
    await tenants.set_limits(env.db, "acme", monthly_budget_usd=Decimal("0.004"))
    refused = await env.post_job(unbounded)
    assert refused.status == 402
    assert refused.error["type"] == "over_budget"
    assert Decimal(refused.error["request_usd"]) >= Decimal(16_384) * Decimal("0.30") / 10**6
    assert (await env.post_job(chat(1))).status == 202  # 16 output tokens: well within


async def test_a_million_character_request_is_estimated_not_a_500(env: ApiEnv) -> None:
    await tenants.set_limits(env.db, "acme", monthly_budget_usd=Decimal("1000"))
    job = chat(0)
    job["body"]["messages"] = [{"role": "user", "content": "word " * 200_000}]  # 1,000,000 characters
    taken = await env.post_job(job)
    assert taken.status == 202, taken.body[:300]
    (row,) = await env.jobs(id=taken.json["id"])
    # at least 200,000 input tokens at gpt-4o-mini's batch input price ($0.075 per M)
    assert row["estimate_usd"] >= Decimal(200_000) * Decimal("0.075") / 10**6
    await tenants.set_limits(env.db, "acme", monthly_budget_usd=Decimal("0.001"))
    refused = await env.post_job(job | {"custom_id": "again"})
    assert refused.status == 402
    assert refused.error["type"] == "over_budget"


async def test_spend_the_ledger_could_not_price_counts_at_the_estimate(env: ApiEnv) -> None:
    await tenants.set_limits(env.db, "acme", monthly_budget_usd=Decimal("0.0001"))
    first = await env.post_job(chat(0))
    assert first.status == 202
    (row,) = await env.jobs(id=first.json["id"])
    estimate = row["estimate_usd"]
    # the provider reported no usage: the ledger's cost is unknown
    await env.settle(first.json["id"], cost=None)
    async with env.db.engine.connect() as conn:
        assert await conn.scalar(sa.select(ledger.c.actual_usd)) is None
    await tenants.set_limits(env.db, "acme", monthly_budget_usd=estimate * 2 - Decimal("0.0000000001"))
    refused = await env.post_job(chat(1))
    assert refused.status == 402
    assert Decimal(refused.error["spent_usd"]) == estimate
    assert f"spent ${estimate.normalize():f} this month" in refused.error["message"]
