"""Webhooks: a settled job's result, or a settled run's summary, POSTed to its callback URL and signed.

Signing follows Standard Webhooks (https://www.standardwebhooks.com, the scheme OpenAI's webhooks use), so any
of its libraries verifies a delivery. Every delivery carries::

    Content-Type: application/json
    Batcher-Event: job.settled | run.settled
    webhook-id: <delivery id>                (the same on every retry: receivers can drop repeats)
    webhook-timestamp: <unix seconds>        (refuse old ones)
    webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">  [v1,<…> during a rotation]

keyed with the base64-decoded part of the tenant's ``whsec_…`` secret. The id is signed, so a captured delivery
sent again under another id does not verify. While a rotated-out secret still signs (``batcher.tenants``), the
header holds one signature per secret, space-separated; a receiver holding either secret verifies.
:func:`verify` checks all of that on the receiving side.

The database drives it all, like the rest of batcher. :func:`schedule` turns what has settled into delivery
rows — a job's from the partial index of settled jobs that still carry a ``callback_url`` (cleared in the same
transaction, so the index stays small), a run's when an armed run callback finds no unsettled job left —
with the body fixed, so every attempt sends the same bytes. :func:`send_due` claims due deliveries (the claim
bumps ``attempts`` and pushes ``next_attempt_at`` past the send's timeout, so a sender that dies only delays
the next attempt), POSTs them with no transaction open, and records each outcome ``WHERE attempts = :claimed``.
A failed attempt is retried with exponential backoff until ``webhook_give_up_s`` (24 h) after scheduling.

Callback URLs must be http(s). Private, loopback, link-local and other non-global addresses are refused
unless ``BATCHER_WEBHOOK_ALLOW_PRIVATE=true``. The host is read as aiohttp will read it (yarl's IDNA
normalisation turns 127.0.0.1 in full-width digits into ``127.0.0.1``), and an IP literal in any notation the
resolver takes (``2130706433``, ``0x7f.0.0.1``, ``127.1``, ``0``; IPv4-mapped, NAT64, 6to4, Teredo) is
refused when the URL is given. When a delivery is sent, the resolver keeps only public addresses and the
connector makes a socket only for a public one: the address actually connected to, whatever the name. A
refusal fails the delivery at once; it is never retried. Redirects are not followed, and the receiver's answer
is never read or shown: a failed attempt keeps its status code and a fixed reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import orjson
import sqlalchemy as sa
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from batcher import tenants as tenant_secrets
from batcher.api.views import DELIVERY_COLUMNS, JOB_COLUMNS, delivery_json, job_costs, job_json, public_run
from batcher.config import Settings
from batcher.db import queries
from batcher.db.engine import Database
from batcher.db.tables import idempotency_keys, jobs, tenant_runs, webhook_deliveries
from batcher.domain import JOB_ACTIVE, new_id, state_values
from batcher.errors import BatcherError, ConfigError, InvalidInput, NotFound
from batcher.ledger import savings
from batcher.secretbox import SecretBox, secret_box
from batcher.timeutil import utcnow

logger = logging.getLogger(__name__)

__all__ = [
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "InvalidSignature",
    "check_callback_url",
    "retry_delay_s",
    "schedule",
    "send_due",
    "sign",
    "signature_header",
    "verify",
]

#: Standard Webhooks' headers
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
#: the delivery id travels as the ``webhook-id``
DELIVERY_HEADER = ID_HEADER
EVENT_HEADER = "Batcher-Event"
SECRET_PREFIX = "whsec_"
USER_AGENT = "batcher-webhooks/1"
JOB_SETTLED = "job.settled"
RUN_SETTLED = "run.settled"
#: settled jobs (or armed runs) one :func:`schedule` call turns into deliveries
SCHEDULE_CHUNK = 500
#: a claim outlives the send's timeout by this much before another sender may take the delivery
CLAIM_MARGIN_S = 30.0
_ACTIVE = state_values(JOB_ACTIVE)
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


class CallbackRefused(BatcherError):
    """A callback URL points where batcher may not send (a private address, when those are not allowed)."""


class InvalidSignature(BatcherError):
    """A webhook's signature or timestamp does not check out."""


# ------------------------------------------------------------------------------------------------ URL policy


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: NAT64 prefixes (RFC 6052, RFC 8215): the last 32 bits are the IPv4 address a translator connects to
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
#: the characters of the IPv4 forms inet_aton takes besides dotted decimal (2130706433, 0x7f.0.0.1, 0177.1, 127.1)
_INET_ATON_CHARS = frozenset("0123456789abcdefxABCDEFX.")


def callback_host(url: str) -> str:
    """The host of ``url`` as the HTTP client sends to it: yarl's parse, IDNA-normalised (full-width and other
    Unicode digits become ASCII ones), lower-case, without brackets.

    Raises:
        ValueError: not a URL yarl can parse.
    """
    host = URL(url).raw_host
    return (host or "").lower()


def ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` names when it is an IP literal in any notation the system's resolver takes — dotted,
    decimal, octal, hex or short IPv4, IPv6 with a zone — else ``None`` (a host name)."""
    bare = host.strip("[]").split("%", 1)[0].rstrip(".")
    if not bare:
        return None
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if set(bare) <= _INET_ATON_CHARS:
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address leads to: IPv4-mapped, IPv4-compatible, NAT64, 6to4 and Teredo."""
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if any(ip in net for net in _NAT64) or (int(ip) >> 32 == 0 and int(ip) > 1):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_public(address: str | IPAddress) -> bool:
    """Whether an address is one callbacks may reach: globally routable, not multicast, and every IPv4 address
    it embeds (IPv4-mapped, NAT64, 6to4, Teredo) the same."""
    ip = ipaddress.ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        candidates.extend(_embedded_ipv4(ip))
    return all(c.is_global and not c.is_multicast for c in candidates)


def _local_name(host: str) -> bool:
    name = host.rstrip(".")
    return name in _LOCAL_NAMES or name.endswith(".localhost")


def check_callback_url(url: str, *, allow_private: bool) -> str:
    """Check a callback URL when it is given: http(s), a host, and no private address (unless allowed).

    The host is read as the HTTP client will read it (:func:`callback_host`), and an IP literal in any notation
    (:func:`ip_literal`) must be public. A host name is checked again when a delivery is sent, on every address
    it resolves to and on the address actually connected to.

    Raises:
        ValueError: what is wrong (pydantic names the field).
    """
    try:
        parts = URL(url)
        host = callback_host(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not host:
        raise ValueError("has no host")
    if not allow_private:
        literal = ip_literal(host)
        if literal is not None and not is_public(literal):
            raise ValueError(
                f"{host} is the address {literal}, a private, loopback or reserved one; callbacks go to public "
                "addresses (BATCHER_WEBHOOK_ALLOW_PRIVATE=true allows others)"
            )
        if _local_name(host):
            raise ValueError(f"{host} is the local machine; callbacks go to public addresses")
    return url


class AddressRefused(OSError):
    """A delivery's connection would go to an address callbacks may not reach."""


class PublicResolver(AbstractResolver):
    """Resolves as usual, then keeps only public addresses (all of them when private ones are allowed).

    aiohttp connects only to what the resolver returns; :func:`public_socket` checks the address again as the
    socket is connected, which also covers hosts aiohttp never resolves (IP literals).
    """

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if self.allow_private:
            return found
        public = [r for r in found if is_public(r["host"])]
        if not public:
            raise CallbackRefused(f"{host} resolves only to private or reserved addresses")
        return public

    async def close(self) -> None:
        await self._inner.close()


def public_socket(addr_info: AddrInfoType) -> socket.socket:
    """A socket for aiohttp's connector, made only when the address it will connect to is public.

    Raises:
        AddressRefused: the address is private, loopback, link-local or reserved.
    """
    family, type_, proto, _, sockaddr = addr_info
    if not is_public(str(sockaddr[0])):
        raise AddressRefused(f"{sockaddr[0]} is not a public address")
    return socket.socket(family=family, type=type_, proto=proto)


# ------------------------------------------------------------------------------------------------ signatures


def signing_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (the prefix is optional, as Standard Webhooks has it).

    Raises:
        InvalidSignature: the secret is not base64 after its prefix (the message does not repeat it).
    """
    encoded = secret.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSignature("the webhook secret is not a whsec_<base64> secret") from None
    if not key:
        raise InvalidSignature("the webhook secret is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``webhook-signature`` entry: ``v1,`` + base64 HMAC-SHA256 of ``"<id>.<timestamp>.<body>"``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(signing_key(secret), signed, hashlib.sha256).digest()).decode()


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one entry per secret that signs, space-separated."""
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets)


def verify(
    secret: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    tolerance_s: float = 300.0,
    now_s: float | None = None,
) -> None:
    """Check a received webhook: its signature over id, timestamp and body, and that the timestamp is recent.

    The same check as any Standard Webhooks library's (``standardwebhooks.Webhook(secret).verify``).

    Args:
        secret: the tenant's webhook secret, ``whsec_…`` (``batcher keys create --json`` prints it).
        body: the request body exactly as received.
        headers: the request headers (any mapping; names as sent).
        tolerance_s: how old (or how far ahead) a timestamp may be.
        now_s: the current unix time (default: the clock).

    Raises:
        InvalidSignature: a header is missing, the signature differs, or the timestamp is out of tolerance.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get(ID_HEADER)
    stamp = lowered.get(TIMESTAMP_HEADER)
    given = lowered.get(SIGNATURE_HEADER)
    if not (msg_id and stamp and given):
        raise InvalidSignature(f"missing {ID_HEADER}, {TIMESTAMP_HEADER} or {SIGNATURE_HEADER}")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise InvalidSignature(f"{TIMESTAMP_HEADER} is not unix seconds") from None
    now = time.time() if now_s is None else now_s
    if abs(now - timestamp) > tolerance_s:
        raise InvalidSignature(f"{TIMESTAMP_HEADER} is {now - timestamp:.0f} s off: a replay, or a skewed clock")
    expected = sign(secret, msg_id, timestamp, body).encode()
    if not any(hmac.compare_digest(expected, part.encode()) for part in given.split(" ") if part):
        raise InvalidSignature("the signature does not match")


# ------------------------------------------------------------------------------------------------ retries


def retry_delay_s(attempts: int, *, base_s: float, max_s: float, jitter: float = 0.0) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: ``base_s * 2**(attempts-1)``, capped.

    ``jitter`` (a number in [0, 1), e.g. ``random.random() * 0.2``) stretches it, so that many deliveries to a
    receiver that was down do not all come back in the same second.
    """
    exponent = max(attempts - 1, 0)
    delay = max_s if exponent > 60 else min(base_s * (2**exponent), max_s)
    return delay * (1 + jitter)


@dataclass(frozen=True)
class Attempt:
    """The outcome of one POST."""

    delivered: bool
    status: int | None = None
    error: str | None = None
    #: never worth retrying (a refused address)
    final: bool = False


def next_state(
    attempt: Attempt, *, attempts: int, created_at: datetime, now: datetime, settings: Settings, jitter: float
) -> dict[str, Any]:
    """The row values an attempt's outcome leads to: delivered, pending with a retry time, or failed."""
    values: dict[str, Any] = {
        "last_status": attempt.status,
        "last_error": None if attempt.error is None else attempt.error[:500],
        "updated_at": now,
    }
    if attempt.delivered:
        return values | {"state": "delivered", "delivered_at": now, "next_attempt_at": None}
    delay = retry_delay_s(
        attempts, base_s=settings.webhook_retry_base_s, max_s=settings.webhook_retry_max_s, jitter=jitter
    )
    retry_at = now + timedelta(seconds=delay)
    if attempt.final or retry_at > created_at + timedelta(seconds=settings.webhook_give_up_s):
        return values | {"state": "failed", "next_attempt_at": None}
    return values | {"state": "pending", "next_attempt_at": retry_at}


# ------------------------------------------------------------------------------------------------ scheduling


@dataclass
class ScheduleReport:
    jobs: int = 0
    runs: int = 0


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def schedule(db: Database, now: datetime) -> ScheduleReport:
    """Turn settled jobs with a callback, and settled runs with an armed callback, into pending deliveries."""
    report = ScheduleReport()
    while True:
        count = await _schedule_jobs(db, now)
        report.jobs += count
        if count < SCHEDULE_CHUNK:
            break
    report.runs = await _schedule_runs(db, now)
    return report


async def _schedule_jobs(db: Database, now: datetime) -> int:
    due = jobs.c.callback_url.is_not(None), jobs.c.settled_at.is_not(None)
    query = (
        sa.select(*JOB_COLUMNS, jobs.c.result)
        .where(*due)
        .order_by(jobs.c.settled_at)
        .limit(SCHEDULE_CHUNK)
        .with_for_update(skip_locked=True, of=jobs)
    )
    async with db.engine.begin() as conn:
        rows = list((await conn.execute(query)).mappings())
        if not rows:
            return 0
        costs = await job_costs(conn, [r["id"] for r in rows])
        deliveries = []
        for r in rows:
            if r["tenant"] is None:
                # only API tenants have a secret to sign with
                logger.warning("job %s has a callback URL but no tenant; it is not sent", r["id"])
                continue
            job = job_json(r, cost=costs.get(r["id"]), webhook=None, result=r["result"], with_result=True)
            job["callback_url"] = r["callback_url"]
            deliveries.append(
                {
                    "id": new_id(),
                    "tenant": r["tenant"],
                    "event": JOB_SETTLED,
                    "job_id": r["id"],
                    "run": None,
                    "run_jobs": None,
                    "url": r["callback_url"],
                    "payload": _dumps({"event": JOB_SETTLED, "job": job}),
                    "state": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        if deliveries:
            await conn.execute(
                db.insert(webhook_deliveries).on_conflict_do_nothing(index_elements=["job_id"]), deliveries
            )
        await conn.execute(
            sa.update(jobs)
            .where(jobs.c.id.in_([r["id"] for r in rows]), jobs.c.callback_url.is_not(None))
            .values(callback_url=None)
        )
    return len(rows)


async def _schedule_runs(db: Database, now: datetime) -> int:
    armed_query = (
        sa.select(
            tenant_runs.c.run,
            tenant_runs.c.tenant,
            tenant_runs.c.callback_url,
            tenant_runs.c.arm_seq,
            tenant_runs.c.notified_jobs,
        )
        .where(tenant_runs.c.armed.is_(True), tenant_runs.c.callback_url.is_not(None))
        .limit(SCHEDULE_CHUNK)
    )
    async with db.engine.connect() as conn:
        armed = list((await conn.execute(armed_query)).mappings())
    made = 0
    for r in armed:
        async with db.engine.connect() as conn:
            busy = await conn.scalar(
                sa.select(jobs.c.id).where(jobs.c.run == r["run"], jobs.c.state.in_(_ACTIVE)).limit(1)
            )
            if busy is not None:
                continue
            status = await queries.status(conn, run=r["run"])
            cost = await savings(conn, run=r["run"])
        total = status.runs[0].total if status.runs else 0
        if total == 0:
            continue  # a callback set before the run's first job: wait for jobs
        guard = sa.and_(tenant_runs.c.run == r["run"], tenant_runs.c.arm_seq == r["arm_seq"])
        async with db.engine.begin() as conn:
            # jobs added since we looked bump arm_seq: then this changes nothing and the run is checked again
            changed = await conn.execute(
                sa.update(tenant_runs)
                .where(guard)
                .values(armed=False, notified_jobs=max(total, r["notified_jobs"]), updated_at=now)
            )
            if changed.rowcount != 1 or total <= r["notified_jobs"]:
                continue
            run_status = status.runs[0]
            payload = {
                "event": RUN_SETTLED,
                "run": {
                    "run": public_run(r["run"], r["tenant"]),
                    "jobs": run_status.jobs,
                    "total": run_status.total,
                    "settled": run_status.settled,
                    "cost": cost.totals.to_json(),
                    "results": f"/v1/runs/{public_run(r['run'], r['tenant'])}/results",
                },
            }
            await conn.execute(
                db.insert(webhook_deliveries)
                .values(
                    id=new_id(),
                    tenant=r["tenant"],
                    event=RUN_SETTLED,
                    job_id=None,
                    run=r["run"],
                    run_jobs=total,
                    url=r["callback_url"],
                    payload=_dumps(payload),
                    state="pending",
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
                .on_conflict_do_nothing(index_elements=["run", "run_jobs"])
            )
            made += 1
    return made


# ------------------------------------------------------------------------------------------------ sending


@dataclass
class SendReport:
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    #: deliveries another sender had claimed meanwhile (nothing recorded)
    lost: int = 0
    outcomes: list[tuple[str, Attempt]] = field(default_factory=list)


def make_session(settings: Settings) -> aiohttp.ClientSession:
    """An HTTP session for deliveries: the address policy in its resolver, no proxies from the environment."""
    connector = aiohttp.TCPConnector(
        resolver=PublicResolver(allow_private=settings.webhook_allow_private),
        socket_factory=None if settings.webhook_allow_private else public_socket,
        limit=settings.webhook_concurrency,
        ttl_dns_cache=None,
        use_dns_cache=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_s),
        headers={"User-Agent": USER_AGENT},
        trust_env=False,
    )


async def _claim(db: Database, settings: Settings, now: datetime) -> list[dict[str, Any]]:
    due = (
        sa.select(webhook_deliveries.c.id)
        .where(webhook_deliveries.c.state == "pending", webhook_deliveries.c.next_attempt_at <= now)
        .order_by(webhook_deliveries.c.next_attempt_at)
        .limit(settings.webhook_batch)
        .with_for_update(skip_locked=True)
    )
    lease_until = now + timedelta(seconds=settings.webhook_timeout_s + CLAIM_MARGIN_S)
    claim = (
        sa.update(webhook_deliveries)
        .where(webhook_deliveries.c.id.in_(due), webhook_deliveries.c.state == "pending")
        .values(
            attempts=webhook_deliveries.c.attempts + 1,
            next_attempt_at=lease_until,
            last_attempt_at=now,
            updated_at=now,
        )
        .returning(
            webhook_deliveries.c.id,
            webhook_deliveries.c.tenant,
            webhook_deliveries.c.event,
            webhook_deliveries.c.url,
            webhook_deliveries.c.payload,
            webhook_deliveries.c.attempts,
            webhook_deliveries.c.created_at,
        )
    )
    # the key before the claim: a worker without it (PostgreSQL, BATCHER_SECRET_KEY unset) uses up no attempt
    try:
        box = secret_box(settings)
    except ConfigError:
        pending = webhook_deliveries.c.state == "pending", webhook_deliveries.c.next_attempt_at <= now
        async with db.engine.connect() as conn:
            if await conn.scalar(sa.select(webhook_deliveries.c.id).where(*pending).limit(1)) is None:
                return []
        raise
    async with db.engine.begin() as conn:
        claimed = [dict(r) for r in (await conn.execute(claim)).mappings()]
    found, broken = await _signing_secrets(db, box, {c["tenant"] for c in claimed}, now)
    for c in claimed:
        c["secrets"] = found.get(c["tenant"], [])
        c["secret_error"] = broken.get(c["tenant"])
    return claimed


async def _signing_secrets(
    db: Database, box: SecretBox, names: set[str], now: datetime
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Each tenant's signing secrets, and what is wrong with those that do not open (one bad row stops no other)."""
    try:
        return await tenant_secrets.signing_secrets(db, box, names, now), {}
    except ConfigError:
        pass
    found: dict[str, list[str]] = {}
    broken: dict[str, str] = {}
    for name in sorted(names):
        try:
            found |= await tenant_secrets.signing_secrets(db, box, [name], now)
        except ConfigError as exc:
            logger.error("webhooks of tenant %s are not sent: %s", name, exc)
            broken[name] = str(exc)
    return found, broken


async def post(session: aiohttp.ClientSession, delivery: Mapping[str, Any], *, allow_private: bool) -> Attempt:
    """POST one delivery, signed now. Never raises for the receiver's failures: they are the outcome."""
    url = delivery["url"]
    if not allow_private:
        try:
            host = callback_host(url)
        except ValueError:
            return Attempt(False, error="refused: not a valid URL", final=True)
        literal = ip_literal(host)
        if (literal is not None and not is_public(literal)) or _local_name(host):
            return Attempt(False, error=f"refused: {host} is not a public address", final=True)
    if delivery.get("secret_error"):
        return Attempt(False, error=f"not signed: {delivery['secret_error']}")
    if not delivery["secrets"]:
        return Attempt(
            False, error=f"tenant {delivery['tenant']} has no webhook secret (its last key was revoked)", final=True
        )
    body = delivery["payload"].encode()
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        EVENT_HEADER: delivery["event"],
        ID_HEADER: delivery["id"],
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature_header(delivery["secrets"], delivery["id"], timestamp, body),
    }
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            # the receiver's body is never read: what it says is not the tenant's to see (it may be a service
            # on the operator's network); the status and a fixed reason are kept
            if 200 <= resp.status < 300:
                return Attempt(True, status=resp.status)
            return Attempt(False, status=resp.status, error=f"the receiver answered HTTP {resp.status}")
    except CallbackRefused as exc:
        return Attempt(False, error=f"refused: {exc}", final=True)
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, (CallbackRefused, AddressRefused)):
            return Attempt(False, error="refused: the address is not a public one", final=True)
        logger.debug("webhook %s: cannot connect: %s", delivery["id"], exc)
        return Attempt(False, error="cannot connect to the receiver")
    except TimeoutError:
        return Attempt(False, error="no answer in time")
    except aiohttp.ClientSSLError:
        return Attempt(False, error="the TLS handshake with the receiver failed")
    except aiohttp.ServerDisconnectedError:
        return Attempt(False, error="the receiver closed the connection without answering")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        logger.debug("webhook %s: %s", delivery["id"], exc)
        return Attempt(False, error=f"the request failed ({type(exc).__name__})")


async def send_due(
    db: Database,
    settings: Settings,
    now: datetime,
    *,
    session: aiohttp.ClientSession | None = None,
    rng: random.Random | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> SendReport:
    """Claim the deliveries that are due, POST them (``webhook_concurrency`` at a time), record each outcome.

    Args:
        db: the database.
        settings: timeouts, retry schedule, concurrency, the address policy.
        now: the current time.
        session: the HTTP session to send with (default: a new one from :func:`make_session`, closed after).
        rng: randomness for retry jitter.
        clock: the time after each attempt (retries are timed from when the attempt failed).
    """
    report = SendReport()
    claimed = await _claim(db, settings, now)
    if not claimed:
        return report
    rng = rng or random.Random()
    own = session is None
    http = make_session(settings) if session is None else session
    gate = asyncio.Semaphore(settings.webhook_concurrency)

    async def one(delivery: dict[str, Any]) -> None:
        async with gate:
            attempt = await post(http, delivery, allow_private=settings.webhook_allow_private)
        values = next_state(
            attempt,
            attempts=delivery["attempts"],
            created_at=delivery["created_at"],
            now=max(now, clock()),
            settings=settings,
            jitter=rng.random() * 0.2,
        )
        async with db.engine.begin() as conn:
            result = await conn.execute(
                sa.update(webhook_deliveries)
                .where(webhook_deliveries.c.id == delivery["id"], webhook_deliveries.c.attempts == delivery["attempts"])
                .values(**values)
            )
        report.outcomes.append((delivery["id"], attempt))
        if result.rowcount != 1:
            report.lost += 1
        elif values["state"] == "delivered":
            report.delivered += 1
        elif values["state"] == "failed":
            report.failed += 1
            logger.warning("webhook %s to %s given up: %s", delivery["id"], delivery["url"], attempt.error)
        else:
            report.retrying += 1

    try:
        await asyncio.gather(*(one(d) for d in claimed))
    finally:
        if own:
            await http.close()
    return report


async def cleanup(db: Database, settings: Settings, now: datetime) -> int:
    """Forget idempotency keys older than ``api_idempotency_ttl_s``; returns how many."""
    cutoff = now - timedelta(seconds=settings.api_idempotency_ttl_s)
    async with db.engine.begin() as conn:
        result = await conn.execute(sa.delete(idempotency_keys).where(idempotency_keys.c.created_at < cutoff))
    return int(result.rowcount or 0)


# ------------------------------------------------------------------------------------------------ inspection


async def list_deliveries(
    db: Database,
    *,
    tenant: str | None = None,
    state: str | None = None,
    job_id: str | None = None,
    delivery_id: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Deliveries, newest first (ids are time-ordered); ``cursor``: only those older than that id."""
    if state is not None and state not in ("pending", "delivered", "failed"):
        raise InvalidInput(f"state {state!r}: use pending, delivered or failed", field="state")
    query = sa.select(*DELIVERY_COLUMNS).order_by(webhook_deliveries.c.id.desc()).limit(limit)
    if tenant is not None:
        query = query.where(webhook_deliveries.c.tenant == tenant)
    if state is not None:
        query = query.where(webhook_deliveries.c.state == state)
    if job_id is not None:
        query = query.where(webhook_deliveries.c.job_id == job_id)
    if delivery_id is not None:
        query = query.where(webhook_deliveries.c.id == delivery_id)
    if cursor is not None:
        query = query.where(webhook_deliveries.c.id < cursor)
    async with db.engine.connect() as conn:
        return [delivery_json(r) | {"tenant": r["tenant"]} for r in (await conn.execute(query)).mappings()]


async def retry(db: Database, delivery_id: str, now: datetime, *, tenant: str | None = None) -> dict[str, Any]:
    """Send a delivery again at once (a failed one gets one more attempt; a pending one is brought forward).

    Raises:
        NotFound: no such delivery (of this tenant).
        InvalidInput: it was delivered already.
    """
    where = [webhook_deliveries.c.id == delivery_id]
    if tenant is not None:
        where.append(webhook_deliveries.c.tenant == tenant)
    async with db.engine.begin() as conn:
        row = (await conn.execute(sa.select(*DELIVERY_COLUMNS).where(*where))).mappings().first()
        if row is None:
            raise NotFound(f"no webhook delivery {delivery_id}")
        if row["state"] == "delivered":
            raise InvalidInput(f"webhook delivery {delivery_id} was delivered already", field="id")
        await conn.execute(
            sa.update(webhook_deliveries)
            .where(*where, webhook_deliveries.c.state != "delivered")
            .values(state="pending", next_attempt_at=now, updated_at=now)
        )
        row = (await conn.execute(sa.select(*DELIVERY_COLUMNS).where(*where))).mappings().one()
    return delivery_json(row) | {"tenant": row["tenant"]}
