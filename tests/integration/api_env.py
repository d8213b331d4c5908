"""The HTTP API served in-process on a free port, with two tenants and their keys. Shared by the API tests."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import sqlalchemy as sa

from batcher import tenants
from batcher.api.app import serve_api
from batcher.config import Settings
from batcher.db import migrate
from batcher.db.engine import Database
from batcher.db.tables import jobs, ledger
from batcher.domain import JobState
from batcher.secretbox import secret_box
from batcher.timeutil import utcnow

TENANTS = ("acme", "globex")


def chat(i: int = 0, **extra: Any) -> dict[str, Any]:
    """A valid OpenAI chat job."""
    job: dict[str, Any] = {
        "provider": "openai",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"question number {i}"}],
            "max_tokens": 16,
        },
    }
    return job | extra


def claude(i: int = 0, **extra: Any) -> dict[str, Any]:
    """A valid Anthropic job."""
    job: dict[str, Any] = {
        "provider": "anthropic",
        "body": {
            "model": "claude-haiku-4-5",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": f"question number {i}"}],
        },
    }
    return job | extra


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        data = self.json
        assert "error" in data, data
        error: dict[str, Any] = data["error"]
        return error


@dataclass
class ApiEnv:
    url: str
    db: Database
    settings: Settings
    keys: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    http: aiohttp.ClientSession | None = None

    async def call(
        self,
        method: str,
        path: str,
        *,
        tenant: str | None = "acme",
        key: str | None = None,
        json: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Reply:
        assert self.http is not None
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        elif tenant is not None:
            sent["Authorization"] = f"Bearer {self.keys[tenant]}"
        if json is not None:
            data = orjson.dumps(json)
            sent.setdefault("Content-Type", "application/json")
        # aiohttp warns about big bytes bodies (they are written in one go); a file object is streamed
        payload: Any = io.BytesIO(data) if data is not None and len(data) > 1 << 20 else data
        async with self.http.request(method, self.url + path, data=payload, headers=sent, params=params) as resp:
            return Reply(resp.status, dict(resp.headers), await resp.read())

    async def post_job(self, job: Mapping[str, Any], tenant: str = "acme", **kw: Any) -> Reply:
        return await self.call("POST", "/v1/jobs", tenant=tenant, json=job, **kw)

    async def jobs(self, **where: Any) -> list[dict[str, Any]]:
        query = sa.select(jobs).where(*(jobs.c[k] == v for k, v in where.items()))
        async with self.db.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]

    async def count(self, **where: Any) -> int:
        query = sa.select(sa.func.count()).select_from(jobs).where(*(jobs.c[k] == v for k, v in where.items()))
        async with self.db.engine.connect() as conn:
            return int(await conn.scalar(query) or 0)

    async def settle(
        self,
        job_id: str,
        *,
        state: JobState = JobState.SUCCEEDED,
        cost: Decimal | None = Decimal("0.0005"),
        when: datetime | None = None,
    ) -> None:
        """Settle a job as collect would: state, result, usage, and (succeeded) its ledger entry."""
        now = when or utcnow()
        result = orjson.dumps({"id": "chatcmpl-1", "choices": [{"message": {"role": "assistant", "content": "42"}}]})
        async with self.db.engine.begin() as conn:
            row = (await conn.execute(sa.select(jobs).where(jobs.c.id == job_id))).mappings().one()
            values: dict[str, Any] = {"state": state.value, "settled_at": now, "updated_at": now}
            if state is JobState.SUCCEEDED:
                values |= {"result": result.decode(), "usage": {"prompt_tokens": 10, "completion_tokens": 2}}
            else:
                values |= {"error_code": "server_error", "error": {"code": "server_error", "message": "boom"}}
            await conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(**values))
            if state is JobState.SUCCEEDED:
                await conn.execute(
                    sa.insert(ledger).values(
                        job_id=job_id,
                        attempt=row["attempts"],
                        batch_id=None,
                        provider=row["provider"],
                        account=row["account"],
                        model=row["model"],
                        run=row["run"],
                        tags=row["tags"],
                        mode="batch",
                        input_tokens=10,
                        cached_input_tokens=0,
                        cache_creation_tokens=0,
                        cache_creation_1h_tokens=0,
                        output_tokens=2,
                        reasoning_tokens=0,
                        actual_usd=cost,
                        realtime_usd=None if cost is None else cost * 2,
                        batch_price_derived=False,
                        price_source="test",
                        price_version="test",
                        settled_at=now,
                    )
                )


@asynccontextmanager
async def api_env(db_url: str, **settings: Any) -> AsyncIterator[ApiEnv]:
    """The API on a free port; tenants ``acme`` (with an admin key) and ``globex``."""
    config = Settings(database_url=db_url, **({"webhook_allow_private": True, "api_auth_cache_s": 0.0} | settings))
    db = Database(db_url)
    await migrate.upgrade(db.engine)
    try:
        env = ApiEnv("", db, config)
        for name in TENANTS:
            made = await tenants.create_key(db, name, box=secret_box(config), admin=name == "acme")
            env.keys[name] = made.key
            env.secrets[name] = made.webhook_secret
        async with serve_api(config, migrate_db=False) as url, aiohttp.ClientSession() as http:
            env.url = url
            env.http = http
            yield env
    finally:
        await db.aclose()
