"""Webhook secrets: sealed at rest, rotated with an overlap, Standard Webhooks signatures; SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from api_env import api_env, chat
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from test_webhooks import FAST, deliveries, pump, receiving

from batcher import tenants, webhooks
from batcher.config import Settings
from batcher.db.engine import Database
from batcher.db.tables import tenants as tenants_table
from batcher.domain import new_id
from batcher.errors import ConfigError
from batcher.secretbox import SEALED_PREFIX, secret_box
from batcher.timeutil import utcnow
from workers import tasks

BATCHER = str(Path(sys.executable).with_name("batcher"))
ROTATE = "/v1/tenants/{}/webhook-secret/rotate"


async def raw_tenants(db: Database) -> dict[str, dict[str, Any]]:
    async with db.engine.connect() as conn:
        return {r["name"]: dict(r) for r in (await conn.execute(sa.select(tenants_table))).mappings()}


def replayed(headers: dict[str, str], **changes: str) -> dict[str, str]:
    """The headers with some replaced (names compared case-blind, as HTTP does)."""
    kept = {k: v for k, v in headers.items() if k.lower() not in changes}
    return kept | changes


def _db_file_bytes(db_url: str) -> bytes:
    path = db_url.split(":///", 1)[1]
    return b"".join(Path(path + suffix).read_bytes() for suffix in ("", "-wal") if Path(path + suffix).exists())


async def cli(db_url: str, *args: str, code: int = 0, drop: tuple[str, ...] = (), **env: str) -> tuple[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    proc = await asyncio.create_subprocess_exec(
        BATCHER,
        *args,
        env={**environ, "BATCHER_DATABASE_URL": db_url, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == code, f"exit {proc.returncode}\n{out.decode()}\n{err.decode()}"
    return out.decode(), err.decode()


async def test_stored_secrets_are_sealed_not_plaintext(db_url: str) -> None:
    async with api_env(db_url) as env:
        rotated = await env.call("POST", ROTATE.format("globex"), json={"overlap_s": 3600})
        assert rotated.status == 200, rotated.body
        plain = [env.secrets["acme"], env.secrets["globex"], rotated.json["webhook_secret"]]
        rows = await raw_tenants(env.db)
        assert set(rows) == {"acme", "globex"}
        for row in rows.values():
            assert row["webhook_secret"] == ""  # the pre-0006 plaintext column holds nothing
            assert row["secret_sealed"].startswith(SEALED_PREFIX)
        assert rows["globex"]["previous_secret_sealed"].startswith(SEALED_PREFIX)
        assert rows["acme"]["previous_secret_sealed"] is None
        for secret in plain:
            key_b64 = secret.removeprefix("whsec_")
            assert all(key_b64 not in str(v) for row in rows.values() for v in row.values())
            if db_url.startswith("sqlite"):
                assert key_b64.encode() not in _db_file_bytes(db_url)
                assert base64.b64decode(key_b64) not in _db_file_bytes(db_url)


async def test_deliveries_verify_with_standardwebhooks_and_a_replay_under_a_new_id_fails(db_url: str) -> None:
    async with receiving(fail_first=1) as receiver, api_env(db_url, **FAST) as env:
        job_id = (await env.post_job(chat(1, callback_url=receiver.url))).json["id"]
        await env.settle(job_id)
        await pump(env)
        (delivery,) = await deliveries(env)
        assert len(receiver.got) == 2
        for headers, body in receiver.got:
            lowered = {k.lower(): v for k, v in headers.items()}
            assert lowered["webhook-id"] == delivery["id"]  # the same on every retry
            assert lowered["batcher-event"] == "job.settled"
            assert not any(k.startswith("batcher-signature") or k.startswith("batcher-timestamp") for k in lowered)
            payload = Webhook(env.secrets["acme"]).verify(body, headers)
            assert payload["job"]["id"] == job_id
            webhooks.verify(env.secrets["acme"], body, headers)
            with pytest.raises(WebhookVerificationError):
                Webhook(env.secrets["globex"]).verify(body, headers)

        # a captured delivery sent again under a new id, within the 5 minutes: refused by both
        headers, body = receiver.got[-1]
        replay = replayed(headers, **{"webhook-id": new_id()})
        with pytest.raises(WebhookVerificationError):
            Webhook(env.secrets["acme"]).verify(body, replay)
        with pytest.raises(webhooks.InvalidSignature):
            webhooks.verify(env.secrets["acme"], body, replay)


async def test_rotation_signs_with_both_secrets_during_the_overlap_then_only_the_new(db_url: str) -> None:
    async with receiving() as receiver, api_env(db_url, **FAST) as env:
        old = env.secrets["globex"]
        before = utcnow()
        reply = await env.call("POST", ROTATE.format("globex"), json={"overlap_s": 3600})
        assert reply.status == 200, reply.body
        assert reply.headers["Cache-Control"] == "no-store"
        new = reply.json["webhook_secret"]
        assert new.startswith("whsec_") and new != old
        assert len(base64.b64decode(new.removeprefix("whsec_"))) == 32
        assert reply.json["tenant"] == "globex"
        until = datetime.fromisoformat(reply.json["previous_valid_until"])
        assert before + timedelta(seconds=3600) <= until <= utcnow() + timedelta(seconds=3600)

        # during the overlap: two signatures; a receiver holding either secret verifies
        first = (await env.post_job(chat(1, callback_url=receiver.url), tenant="globex")).json["id"]
        await env.settle(first)
        await pump(env)
        headers, body = receiver.got[0]
        assert len({k.lower(): v for k, v in headers.items()}["webhook-signature"].split(" ")) == 2
        Webhook(old).verify(body, headers)
        Webhook(new).verify(body, headers)
        webhooks.verify(old, body, headers)
        webhooks.verify(new, body, headers)

        # after it: only the new one signs
        second = (await env.post_job(chat(2, callback_url=receiver.url), tenant="globex")).json["id"]
        await env.settle(second)
        later = until + timedelta(seconds=1)
        await webhooks.schedule(env.db, later)
        await webhooks.send_due(env.db, env.settings, later)
        headers, body = receiver.got[1]
        assert orjson.loads(body)["job"]["id"] == second
        assert len({k.lower(): v for k, v in headers.items()}["webhook-signature"].split(" ")) == 1
        Webhook(new).verify(body, headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(old).verify(body, headers)

        # rotating with no overlap: the newest alone signs at once
        newest = (await env.call("POST", ROTATE.format("globex"), json={"overlap_s": 0})).json
        assert newest["previous_valid_until"] is None
        third = (await env.post_job(chat(3, callback_url=receiver.url), tenant="globex")).json["id"]
        await env.settle(third)
        await pump(env, until=3)
        headers, body = receiver.got[2]
        Webhook(newest["webhook_secret"]).verify(body, headers)
        for stale in (old, new):
            with pytest.raises(WebhookVerificationError):
                Webhook(stale).verify(body, headers)
        # acme's secret did not move
        assert (await raw_tenants(env.db))["acme"]["previous_secret_sealed"] is None


async def test_rotating_needs_an_admin_key(db_url: str) -> None:
    async with api_env(db_url) as env:
        before = await raw_tenants(env.db)
        for path in (ROTATE.format("globex"), ROTATE.format("acme")):
            refused = await env.call("POST", path, tenant="globex", json={"overlap_s": 60})
            assert refused.status == 403, refused.body
            assert refused.error["type"] == "forbidden" and "admin" in refused.error["message"]
            assert b"whsec_" not in refused.body
        assert (await env.call("POST", ROTATE.format("globex"), tenant=None)).status == 401
        unknown = await env.call("POST", ROTATE.format("initech"), json={})
        assert unknown.status == 404 and "initech" in unknown.error["message"]
        for body, words in (
            ({"overlap_s": -1}, "greater than or equal"),
            ({"overlap_s": 10**9}, "less than or equal"),
            ({"overlap_s": "soon"}, "number"),
            ({"overlap": 60}, "unknown field"),
        ):
            bad = await env.call("POST", ROTATE.format("globex"), json=body)
            assert bad.status == 422, bad.body
            assert bad.error["field"] in ("overlap_s", "overlap")
            assert words in bad.error["message"].lower() or words in str(bad.json).lower()
        broken = await env.call("POST", ROTATE.format("globex"), data=b"{not json")
        assert broken.status in (400, 422)
        assert await raw_tenants(env.db) == before  # nothing moved

        # an empty body rotates with the default overlap (24 h)
        done = await env.call("POST", ROTATE.format("globex"))
        assert done.status == 200, done.body
        until = datetime.fromisoformat(done.json["previous_valid_until"])
        assert timedelta(hours=23, minutes=59) < until - utcnow() <= timedelta(hours=24)


async def test_rotate_secret_through_the_cli(db_url: str) -> None:
    out, _ = await cli(db_url, "keys", "create", "--tenant", "acme", "--json")
    made = orjson.loads(out)
    out, err = await cli(db_url, "tenants", "rotate-secret", "acme", "--overlap", "2h", "--json")
    rotated = orjson.loads(out)
    assert set(rotated) == {"tenant", "webhook_secret", "previous_valid_until"}
    assert rotated["tenant"] == "acme"
    assert rotated["webhook_secret"].startswith("whsec_") and rotated["webhook_secret"] != made["webhook_secret"]
    until = datetime.fromisoformat(rotated["previous_valid_until"])
    assert timedelta(hours=1, minutes=59) < until - utcnow() <= timedelta(hours=2)

    db = Database(db_url)
    try:
        box = secret_box(Settings(database_url=db_url))
        signing = await tenants.signing_secrets(db, box, ["acme"], utcnow())
        assert signing == {"acme": [rotated["webhook_secret"], made["webhook_secret"]]}
        assert (await tenants.signing_secrets(db, box, ["acme"], until + timedelta(seconds=1))) == {
            "acme": [rotated["webhook_secret"]]
        }

        # the text form prints the secret once, and what happens to the old one
        out, err = await cli(db_url, "tenants", "rotate-secret", "acme", "--overlap", "0")
        assert "whsec_" in out and "no longer signs" in err
        (latest,) = (await tenants.signing_secrets(db, box, ["acme"], utcnow()))["acme"]
        assert latest in out
    finally:
        await db.aclose()

    _, err = await cli(db_url, "tenants", "rotate-secret", "initech", code=1)
    assert "no tenant 'initech'" in err and "Traceback" not in err
    _, err = await cli(db_url, "tenants", "rotate-secret", "acme", "--overlap", "soon", code=2)
    assert "--overlap" in err and "Traceback" not in err
    _, err = await cli(db_url, "tenants", "rotate-secret", "acme", "--overlap", "90d", code=2)
    assert "--overlap" in err and "30 days" in err


async def test_revoking_a_tenants_last_key_erases_its_webhook_secret(db_url: str) -> None:
    async with receiving() as receiver, api_env(db_url, **FAST) as env:
        box = secret_box(env.settings)
        job_id = (await env.post_job(chat(1, callback_url=receiver.url), tenant="globex")).json["id"]
        await env.settle(job_id)
        await env.call("POST", ROTATE.format("globex"), json={"overlap_s": 3600})

        # acme has another key: revoking one keeps its secret
        spare = await tenants.create_key(env.db, "acme", box=box)
        assert spare.webhook_secret == env.secrets["acme"]
        kept = await tenants.revoke_key(env.db, spare.id)
        assert kept.secret_erased is False
        assert (await raw_tenants(env.db))["acme"]["secret_sealed"] is not None

        (only,) = await tenants.list_keys(env.db, tenant="globex")
        erased = await tenants.revoke_key(env.db, only.id)
        assert erased.secret_erased is True
        row = (await raw_tenants(env.db))["globex"]
        assert (row["secret_sealed"], row["previous_secret_sealed"], row["previous_secret_until"]) == (None, None, None)

        # its pending delivery cannot be signed: given up, saying why, nothing sent
        await pump(env)
        (delivery,) = await deliveries(env)
        assert delivery["state"] == "failed"
        assert "no webhook secret" in delivery["last_error"]
        assert receiver.got == []

        # a new key for the tenant brings a new secret
        again = await tenants.create_key(env.db, "globex", box=box)
        assert again.webhook_secret.startswith("whsec_") and again.webhook_secret != env.secrets["globex"]


async def test_revoke_through_the_cli_says_the_secret_is_erased(db_url: str) -> None:
    out, _ = await cli(db_url, "keys", "create", "--tenant", "acme", "--json")
    out, _ = await cli(db_url, "keys", "list", "--json")
    (key,) = orjson.loads(out)
    out, _ = await cli(db_url, "keys", "revoke", key["id"])
    assert "webhook secret" in out and "erased" in out


async def test_a_process_with_another_key_refuses_to_start(db_url: str) -> None:
    await cli(db_url, "keys", "create", "--tenant", "acme", "--json")
    other = base64.b64encode(os.urandom(32)).decode()
    _, err = await cli(db_url, "tenants", "rotate-secret", "acme", code=1, BATCHER_SECRET_KEY=other)
    assert "BATCHER_SECRET_KEY" in err and "Traceback" not in err
    assert other not in err
    db = Database(db_url)
    try:
        with pytest.raises(ConfigError, match="BATCHER_SECRET_KEY"):
            await tenants.prepare_secrets(db, Settings(database_url=db_url, secret_key=SecretStr(other)))
    finally:
        await db.aclose()


async def test_postgresql_without_a_key_refuses_to_start_the_api(pg_url: str) -> None:
    _, err = await cli(pg_url, "api", "--port", "0", code=1, drop=("BATCHER_SECRET_KEY",))
    assert "BATCHER_SECRET_KEY" in err and "Traceback" not in err
    _, err = await cli(pg_url, "keys", "create", "--tenant", "acme", code=1, drop=("BATCHER_SECRET_KEY",))
    assert "BATCHER_SECRET_KEY" in err and "Traceback" not in err


async def test_postgresql_worker_needs_the_key_once_there_are_tenants(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyed = Settings(database_url=pg_url, openai_api_key=SecretStr("x"))
    monkeypatch.delenv("BATCHER_SECRET_KEY")
    keyless = Settings(database_url=pg_url, openai_api_key=SecretStr("x"))
    assert keyless.secret_key is None
    # no tenant: a worker of the CLI and Python doors needs no key
    ctx: dict[str, Any] = {"settings": keyless}
    await tasks.startup(ctx)
    await tasks.shutdown(ctx)
    db = Database(pg_url)
    try:
        await tenants.create_key(db, "acme", box=secret_box(keyed))
    finally:
        await db.aclose()
    with pytest.raises(ConfigError, match="BATCHER_SECRET_KEY"):
        await tasks.startup({"settings": keyless})
    ctx = {"settings": keyed}
    await tasks.startup(ctx)
    await tasks.shutdown(ctx)


async def test_a_secret_that_does_not_open_holds_back_only_its_tenants_webhooks(db_url: str) -> None:
    async with receiving() as receiver, api_env(db_url, **FAST) as env:
        ids = {}
        for tenant in ("acme", "globex"):
            ids[tenant] = (await env.post_job(chat(1, callback_url=receiver.url), tenant=tenant)).json["id"]
            await env.settle(ids[tenant])
        # globex's sealed secret, moved into acme's row: it does not open there
        rows = await raw_tenants(env.db)
        async with env.db.engine.begin() as conn:
            await conn.execute(
                sa.update(tenants_table)
                .where(tenants_table.c.name == "acme")
                .values(secret_sealed=rows["globex"]["secret_sealed"])
            )
        await webhooks.schedule(env.db, utcnow())
        report = await webhooks.send_due(env.db, env.settings, utcnow())
        assert (report.delivered, report.retrying) == (1, 1)
        ((_headers, body),) = receiver.got
        assert orjson.loads(body)["job"]["id"] == ids["globex"]
        held = next(d for d in await deliveries(env) if d["job_id"] == ids["acme"])
        assert held["state"] == "pending" and "does not open" in held["last_error"]
        assert env.secrets["globex"] not in held["last_error"]
