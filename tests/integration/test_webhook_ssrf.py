"""Callback URLs cannot reach the operator's network, on SQLite and PostgreSQL: every notation of a private
address is refused at enqueue, the address actually connected to is checked at send time, a refusal is final,
and a receiver's answer never comes back to the tenant. Every connection here stays on loopback."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from api_env import ApiEnv, api_env, chat
from test_webhooks import FAST, deliveries, pump, receiving

from batcher import webhooks
from batcher.domain import JobSpec, Provider
from batcher.intake import enqueue
from batcher.timeutil import utcnow

#: loopback, private, link-local and reserved addresses in the notations resolvers and URL parsers accept
HOSTILE = [
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/hook",  # full-width digits: IDNA makes them 127.0.0.1
    "http://①②⑦.0.0.1/hook",
    "http://127。0。0。1/hook",  # ideographic full stops
    "http://2130706433/hook",  # decimal
    "http://0x7f000001/hook",
    "http://0x7f.0.0.1/hook",  # hex
    "http://0177.0.0.1/hook",  # octal
    "http://127.1/hook",  # short
    "http://0/hook",
    "http://127.0.0.1./hook",
    "http://user@127.0.0.1/hook",
    "http://10.1.2.3/hook",
    "http://169.254.169.254/latest",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped
    "http://[::ffff:7f00:1]/hook",
    "http://[64:ff9b::7f00:1]/hook",  # NAT64
    "http://[64:ff9b::a01:203]/hook",
    "http://[2002:7f00:1::]/hook",  # 6to4
    "http://[2002:a9fe:a9fe::1]/hook",
    "http://[fe80::1%25eth0]/hook",
    "http://[fc00::1]/hook",
    "http://LOCALHOST./hook",
    "http://\uff41\uff50\uff49.localhost/hook",
]
PUBLIC = ["https://hooks.example.com/batcher", "http://93.184.216.34/hook", "http://[2606:2800:220:1::]/hook"]


@pytest.fixture
async def env(db_url: str) -> AsyncIterator[ApiEnv]:
    async with api_env(db_url, webhook_allow_private=False, **FAST) as e:
        yield e


async def test_every_notation_of_a_private_address_is_refused_at_enqueue(env: ApiEnv) -> None:
    for url in HOSTILE:
        reply = await env.post_job(chat(0, callback_url=url))
        assert reply.status == 422, url
        assert reply.error["field"] == "callback_url", url
        bulk = await env.call("POST", "/v1/jobs/bulk", json=[chat(1, custom_id="ok"), chat(2, callback_url=url)])
        assert bulk.status == 422, url
        assert "callback_url" in bulk.error["field"], url
        put = await env.call("PUT", "/v1/runs/r/callback", json={"url": url})
        assert (put.status, put.error["field"]) == (422, "url"), url
    assert await env.count() == 0
    for i, url in enumerate(PUBLIC):
        assert (await env.post_job(chat(i, callback_url=url))).status == 202, url


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("::ffff:127.0.0.1", False),
        ("64:ff9b::7f00:1", False),
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("2002:7f00:1::", False),
        ("2002:808:808::", True),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo, client 127.0.0.1
        ("::127.0.0.1", False),  # IPv4-compatible
        ("224.0.0.1", False),
        ("93.184.216.34", True),
    ],
)
def test_embedded_ipv4_addresses_are_checked(address: str, public: bool) -> None:
    assert webhooks.is_public(address) is public


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0177.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("[::1]", "::1"),
        ("example.com", None),
        ("deadbeef", None),
        ("1e100.net", None),
    ],
)
def test_ip_literals_in_every_notation(host: str, address: str | None) -> None:
    found = webhooks.ip_literal(host)
    assert (None if found is None else str(found)) == address


async def _stored_delivery(env: ApiEnv, url: str) -> None:
    """A settled job whose callback URL was stored past the enqueue check (as if the policy changed since)."""
    spec = JobSpec(
        provider=Provider.OPENAI,
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        custom_id="stored",
        body=chat(0)["body"],
        run="acme/r",
    )
    done = await enqueue(env.db, [spec], tenant="acme", callback_urls=[url])
    await env.settle(done.ids[0])


async def test_a_unicode_literal_stored_earlier_never_reaches_loopback(env: ApiEnv) -> None:
    async with receiving() as receiver:
        port = receiver.url.split(":")[2].split("/")[0]
        await _stored_delivery(env, f"http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:{port}/hook")
        await pump(env)
        assert receiver.got == []
        (delivery,) = await deliveries(env)
        assert (delivery["state"], delivery["attempts"]) == ("failed", 1)
        assert delivery["last_error"].startswith("refused")


class _Answers(AbstractResolver):
    """A DNS answer the test chooses (no query leaves the machine)."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            {"hostname": host, "host": self.address, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
        ]

    async def close(self) -> None:
        pass


@asynccontextmanager
async def _session(resolver: AbstractResolver) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(resolver=resolver, socket_factory=webhooks.public_socket, use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        yield session


async def test_a_name_that_resolves_inward_fails_at_once(env: ApiEnv) -> None:
    async with receiving() as receiver:
        port = receiver.url.split(":")[2].split("/")[0]
        await _stored_delivery(env, f"http://hooks.example.test:{port}/hook")
        resolver = webhooks.PublicResolver(allow_private=False)
        resolver._inner = _Answers("127.0.0.1")  # type: ignore[assignment]
        async with _session(resolver) as session:
            await webhooks.schedule(env.db, utcnow())
            report = await webhooks.send_due(env.db, env.settings, utcnow(), session=session)
        assert report.failed == 1
        assert receiver.got == []
        (delivery,) = await deliveries(env)
        assert (delivery["state"], delivery["attempts"], delivery["next_attempt_at"]) == ("failed", 1, None)


async def test_the_address_connected_to_is_checked_whatever_the_resolver_said() -> None:
    async with receiving() as receiver:
        port = int(receiver.url.split(":")[2].split("/")[0])
        # a resolver that lets a private answer through, and a literal host aiohttp never resolves
        for url, resolver in (
            (f"http://rebound.example.test:{port}/hook", _Answers("127.0.0.1")),
            (f"http://127.0.0.1:{port}/hook", _Answers("127.0.0.1")),
        ):
            async with _session(resolver) as session:
                with pytest.raises(aiohttp.ClientConnectorError) as caught:
                    await session.post(url, data=b"{}")
                assert isinstance(caught.value.os_error, webhooks.AddressRefused)
        assert receiver.got == []


@asynccontextmanager
async def _chatty_receiver() -> AsyncIterator[str]:
    async def handle(_request: web.Request) -> web.Response:
        return web.Response(status=500, text="SECRET-BODY of an internal service " * 20)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a for a in runner.addresses if isinstance(a, tuple))[1]
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


async def test_a_receivers_answer_never_reaches_the_tenant(db_url: str) -> None:
    async with _chatty_receiver() as url, api_env(db_url, webhook_give_up_s=0.3, **FAST) as env:
        job_id = (await env.post_job(chat(1, callback_url=url))).json["id"]
        await env.settle(job_id)
        await pump(env)
        (delivery,) = await deliveries(env)
        listed: Any = (await env.call("GET", "/v1/webhooks")).body
        assert b"SECRET-BODY" not in listed
        assert delivery["last_error"] == "the receiver answered HTTP 500"
        retried = await env.call("POST", f"/v1/webhooks/{delivery['id']}/retry")
        assert b"SECRET-BODY" not in retried.body
        await pump(env)
        assert b"SECRET-BODY" not in (await env.call("GET", "/v1/webhooks")).body
        assert b"SECRET-BODY" not in (await env.call("GET", f"/v1/jobs/{job_id}")).body
