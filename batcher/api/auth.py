"""Bearer-key authentication: every call but ``/healthz`` and ``/openapi.json`` needs ``Authorization: Bearer <key>``.

A verified key (and its tenant's limits) is trusted for ``api_auth_cache_s`` seconds before it is read again,
so a key revoked with ``batcher keys revoke`` stops working within that time on every API process. Keys never
made are not remembered: each costs one indexed lookup of its hash. Requests that miss the cache for one key at
the same moment (a busy client, as its entry runs out) share one lookup.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict

from aiohttp import web

from batcher import tenants
from batcher.api.errors import ApiError
from batcher.db.engine import Database
from batcher.tenants import Principal, Tenant

PRINCIPAL = web.RequestKey("principal", Principal)
#: how many verified keys one process remembers
CACHE_ENTRIES = 10_000
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="batcher"'}
#: what an API key can be made of (keys are ``bk_`` and URL-safe base64; anything else is refused unread)
_KEY_CHARS = re.compile(r"[\x21-\x7e]{1,512}")


class KeyCache:
    """Verified keys by key, each for ``ttl_s`` seconds."""

    def __init__(self, db: Database, ttl_s: float) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self._known: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        #: the lookup under way for a key, which concurrent misses of that key wait for
        self._looking: dict[str, asyncio.Task[Principal | None]] = {}

    async def principal(self, key: str) -> Principal | None:
        hit = self._known.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        lookup = self._looking.get(key)
        if lookup is None:
            lookup = self._looking[key] = asyncio.create_task(self._lookup(key))
            lookup.add_done_callback(lambda _: self._looking.pop(key, None))
        # a caller that goes away stops waiting; the lookup goes on for the others
        return await asyncio.shield(lookup)

    async def _lookup(self, key: str) -> Principal | None:
        now = time.monotonic()
        found = await tenants.authenticate(self.db, key)
        if found is None:
            self._known.pop(key, None)
            return None
        if self.ttl_s > 0:
            self._known[key] = (now + self.ttl_s, found)
            self._known.move_to_end(key)
            while len(self._known) > CACHE_ENTRIES:
                self._known.popitem(last=False)
        return found

    def forget(self) -> None:
        self._known.clear()


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, field="Authorization", headers=_CHALLENGE)


def bearer_key(request: web.Request) -> str:
    """The key of ``Authorization: Bearer <key>``.

    Raises:
        ApiError: 401 when the header is missing or malformed.
    """
    header = request.headers.get("Authorization")
    if header is None:
        raise unauthorized("missing Authorization header: send Authorization: Bearer <your API key>")
    scheme, _, key = header.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise unauthorized("the Authorization header must be 'Bearer <your API key>'")
    if not _KEY_CHARS.fullmatch(key):  # bytes that are not UTF-8 arrive as surrogates: never a key of ours
        raise unauthorized("invalid API key: a key is printable ASCII")
    return key


async def authenticate(request: web.Request, cache: KeyCache) -> None:
    """Put the caller's :class:`Principal` on the request (``request[PRINCIPAL]``).

    Raises:
        ApiError: 401 for a missing, malformed, unknown or revoked key.
    """
    principal = await cache.principal(bearer_key(request))
    if principal is None:
        raise unauthorized("invalid API key")
    if principal.revoked:
        raise unauthorized("this API key was revoked; make a new one with `batcher keys create`")
    request[PRINCIPAL] = principal


def tenant_of(request: web.Request) -> Tenant:
    return request[PRINCIPAL].tenant
