"""Tenants of the HTTP API: their API keys, webhook secrets and limits.

An API key is ``bk_`` followed by 40 random URL-safe characters (240 bits). Only its SHA-256 is stored — a
slow password hash buys nothing for a random key of that size — together with its first characters, so
listings can tell keys apart. The key itself is printed once, when it is made.

A tenant's webhook secret is ``whsec_`` and the base64 of 32 random bytes (the Standard Webhooks form: those bytes
are the HMAC key). It is stored sealed (:mod:`batcher.secretbox`), made with the tenant's first key, and shown when
a key is made and when it is rotated (:func:`rotate_secret`): then the previous secret keeps signing, next to the
new one, for the overlap, so receivers can switch without missing a delivery. Revoking a tenant's last API key
erases its secrets; its undelivered webhooks are then given up, and its next key brings a new secret. A secret
from before revision 0006 (kept in the clear) is sealed by :func:`prepare_secrets` as ``whsec_`` + the base64 of
its characters: the HMAC key stays the same bytes, so a receiver builds the new form from the secret it holds.

A tenant's limits are checked at enqueue, inside the transaction that stores the jobs (see
:func:`check_limits`): the most jobs it may have unsettled at once, and a monthly budget that the month's
ledger spend plus the estimate of its unsettled jobs must not exceed. On PostgreSQL the check holds a
per-tenant advisory lock, so concurrent enqueues of one tenant are counted one after the other; on SQLite
the INSERT before it already holds the database's write lock.

Errors::

    BatcherError
    └── LimitExceeded        over a tenant limit (``tenant``)
        ├── TooManyQueued    more unsettled jobs than ``max_queued_jobs`` (HTTP 429)
        ├── OverBudget       the monthly budget would be exceeded (HTTP 402; budget, spend and estimate)
        └── UnpricedUnderBudget  a tenant with a budget asked for a model with no price (HTTP 402; ``models``)
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from batcher.config import Settings
from batcher.db.engine import Database
from batcher.db.tables import api_keys, jobs, ledger, tenants
from batcher.domain import JOB_ACTIVE, new_id, state_values
from batcher.errors import BatcherError, ConfigError, InvalidInput, NotFound
from batcher.estimate import count_input_tokens, max_output_tokens, model_max_output
from batcher.intake import SpecLike
from batcher.pricing import PriceBook, TokenUsage, money
from batcher.secretbox import SEALED_PREFIX, SecretBox, secret_box
from batcher.timeutil import utcnow

logger = logging.getLogger(__name__)

KEY_PREFIX = "bk_"
SECRET_PREFIX = "whsec_"
#: characters of a key kept in the clear for listings (``bk_`` and 9 more)
SHOWN_CHARS = 12
#: a tenant's name: it prefixes its runs (``acme/nightly``), so no ``/``
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: how long a rotated-out secret keeps signing unless told otherwise, and the most it may
DEFAULT_OVERLAP_S = 86400.0
MAX_OVERLAP_S = 30 * 86400.0
_ACTIVE = state_values(JOB_ACTIVE)


class _Unset:
    """Marks a limit argument that was not given (``None`` means "no limit")."""


UNSET: Any = _Unset()


class LimitExceeded(BatcherError):
    """A tenant limit refused an enqueue."""

    def __init__(self, message: str, *, tenant: str) -> None:
        super().__init__(message)
        self.tenant = tenant


class TooManyQueued(LimitExceeded):
    """The enqueue would leave the tenant with more unsettled jobs than its ``max_queued_jobs``."""


class OverBudget(LimitExceeded):
    """The enqueue would take the tenant over its monthly budget.

    Attributes:
        budget_usd: the monthly budget.
        spent_usd: ledger spend this calendar month (UTC).
        queued_usd: the estimate of the tenant's unsettled jobs before this request.
        request_usd: the estimate of the jobs this request adds.
    """

    def __init__(
        self, *, tenant: str, budget_usd: Decimal, spent_usd: Decimal, queued_usd: Decimal, request_usd: Decimal
    ) -> None:
        total = spent_usd + queued_usd + request_usd
        super().__init__(
            f"tenant {tenant!r} would exceed its monthly budget of ${_usd(budget_usd)}: "
            f"spent ${_usd(spent_usd)} this month + estimated ${_usd(queued_usd)} for its unsettled jobs "
            f"+ estimated ${_usd(request_usd)} for this request = ${_usd(total)}",
            tenant=tenant,
        )
        self.budget_usd = budget_usd
        self.spent_usd = spent_usd
        self.queued_usd = queued_usd
        self.request_usd = request_usd


class UnpricedUnderBudget(LimitExceeded):
    """A tenant with a monthly budget asked for a model with no known price: its spend could not be counted.

    Attributes:
        models: the unpriced ``provider/model`` names of the request.
    """

    def __init__(self, *, tenant: str, models: Sequence[str]) -> None:
        names = ", ".join(models)
        super().__init__(
            f"tenant {tenant!r} has a monthly budget, and no price is known for {names}: its cost could not be "
            "counted against the budget. Use a priced model, or ask the operator for a price override "
            "(BATCHER_PRICE_OVERRIDES_FILE).",
            tenant=tenant,
        )
        self.models = list(models)


def _usd(value: Decimal) -> str:
    """Dollars with every digit the amount has (at least to the cent): ``0.0132``, ``1,250.00``."""
    exact = value.normalize()
    if exact.as_tuple().exponent > -2:  # type: ignore[operator]
        exact = exact.quantize(Decimal("0.01"))
    return f"{exact:,f}"


@dataclass(frozen=True)
class Tenant:
    """A tenant and its limits (``None``: no limit)."""

    name: str
    max_queued_jobs: int | None
    monthly_budget_usd: Decimal | None

    @property
    def limited(self) -> bool:
        return self.max_queued_jobs is not None or self.monthly_budget_usd is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.name,
            "max_queued_jobs": self.max_queued_jobs,
            "monthly_budget_usd": None if self.monthly_budget_usd is None else str(self.monthly_budget_usd),
        }


@dataclass(frozen=True)
class KeyInfo:
    """An API key as listings show it (never the key)."""

    id: str
    tenant: str
    prefix: str
    admin: bool
    created_at: datetime
    revoked_at: datetime | None
    #: (revoking) it was the tenant's last key, so the tenant's webhook secrets were erased
    secret_erased: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "prefix": self.prefix,
            "admin": self.admin,
            "created_at": self.created_at.isoformat(),
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
        }


@dataclass(frozen=True)
class CreatedKey:
    """A new key, shown once: ``key`` is not stored anywhere."""

    id: str
    tenant: str
    key: str
    webhook_secret: str


@dataclass(frozen=True)
class RotatedSecret:
    """A tenant's new webhook secret, shown once; the previous one signs too until ``previous_valid_until``."""

    tenant: str
    webhook_secret: str
    #: ``None``: rotated without an overlap (or there was no secret), only the new one signs
    previous_valid_until: datetime | None

    def to_json(self) -> dict[str, Any]:
        until = self.previous_valid_until
        return {
            "tenant": self.tenant,
            "webhook_secret": self.webhook_secret,
            "previous_valid_until": None if until is None else until.isoformat(),
        }


@dataclass(frozen=True)
class Principal:
    """Who a presented key belongs to."""

    key_id: str
    admin: bool
    revoked: bool
    tenant: Tenant


def hash_key(key: str) -> str:
    """The stored form of a key: SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant_name(name: str) -> str:
    """Raise :class:`InvalidInput` unless ``name`` is a valid tenant name."""
    if not TENANT_NAME.match(name):
        raise InvalidInput(
            f"tenant name {name!r}: use 1 to 64 letters, digits, '_', '.' and '-', starting with a letter or digit",
            field="tenant",
        )
    return name


def run_prefix(tenant: str) -> str:
    """What a tenant's stored run names start with: its runs never collide with another tenant's."""
    return f"{tenant}/"


def _tenant(row: Mapping[Any, Any]) -> Tenant:
    return Tenant(row["name"], row["max_queued_jobs"], row["monthly_budget_usd"])


async def get_tenant(conn: AsyncConnection, name: str) -> Tenant | None:
    row = (await conn.execute(sa.select(tenants).where(tenants.c.name == name))).mappings().first()
    return None if row is None else _tenant(row)


async def create_key(
    db: Database,
    tenant: str,
    *,
    box: SecretBox,
    admin: bool = False,
    max_queued_jobs: int | None = UNSET,
    monthly_budget_usd: Decimal | None = UNSET,
) -> CreatedKey:
    """Make an API key for ``tenant``, creating the tenant (and its webhook secret) if it is new.

    Limits given here are set on the tenant; limits not given are left as they are (a new tenant has none).
    ``box`` seals a new secret and opens the tenant's current one, which the answer carries.

    Raises:
        InvalidInput: a bad tenant name or limit.
    """
    check_tenant_name(tenant)
    _check_limits_values(max_queued_jobs, monthly_budget_usd)
    now = utcnow()
    key = KEY_PREFIX + secrets.token_urlsafe(30)
    key_id = new_id()
    async with db.engine.begin() as conn:
        await conn.execute(
            db.insert(tenants)
            .values(
                name=tenant,
                webhook_secret="",
                secret_sealed=box.seal(new_webhook_secret(), context=tenant),
                max_queued_jobs=None,
                monthly_budget_usd=None,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["name"])
        )
        secret = await _current_secret(conn, box, tenant, now)
        await _update_limits(conn, tenant, max_queued_jobs, monthly_budget_usd, now)
        await conn.execute(
            sa.insert(api_keys).values(
                id=key_id,
                tenant=tenant,
                key_hash=hash_key(key),
                prefix=key[:SHOWN_CHARS],
                admin=admin,
                created_at=now,
                revoked_at=None,
            )
        )
    logger.info("API key %s made for tenant %s", key_id, tenant)
    return CreatedKey(key_id, tenant, key, secret)


def _check_limits_values(max_queued_jobs: int | None, monthly_budget_usd: Decimal | None) -> None:
    if isinstance(max_queued_jobs, int) and max_queued_jobs < 0:
        raise InvalidInput("max queued jobs must be >= 0", field="max_queued_jobs")
    if isinstance(monthly_budget_usd, Decimal) and (not monthly_budget_usd.is_finite() or monthly_budget_usd < 0):
        raise InvalidInput("the monthly budget must be a number of dollars >= 0", field="monthly_budget_usd")


async def _update_limits(
    conn: AsyncConnection, tenant: str, max_queued_jobs: int | None, monthly_budget_usd: Decimal | None, now: datetime
) -> None:
    values: dict[str, Any] = {}
    if max_queued_jobs is not UNSET:
        values["max_queued_jobs"] = max_queued_jobs
    if monthly_budget_usd is not UNSET:
        values["monthly_budget_usd"] = None if monthly_budget_usd is None else money(Decimal(str(monthly_budget_usd)))
    if values:
        await conn.execute(sa.update(tenants).where(tenants.c.name == tenant).values(updated_at=now, **values))


async def set_limits(
    db: Database, tenant: str, *, max_queued_jobs: int | None = UNSET, monthly_budget_usd: Decimal | None = UNSET
) -> Tenant:
    """Change a tenant's limits (``None`` removes one; an argument not given leaves it as it is).

    Raises:
        NotFound: no such tenant.
        InvalidInput: a bad limit.
    """
    _check_limits_values(max_queued_jobs, monthly_budget_usd)
    async with db.engine.begin() as conn:
        if await get_tenant(conn, tenant) is None:
            raise NotFound(f"no tenant {tenant!r} (make one with `batcher keys create --tenant {tenant}`)")
        await _update_limits(conn, tenant, max_queued_jobs, monthly_budget_usd, utcnow())
        found = await get_tenant(conn, tenant)
    assert found is not None
    return found


async def list_tenants(db: Database) -> list[Tenant]:
    async with db.engine.connect() as conn:
        rows = (await conn.execute(sa.select(tenants).order_by(tenants.c.name))).mappings()
        return [_tenant(r) for r in rows]


async def list_keys(db: Database, *, tenant: str | None = None) -> list[KeyInfo]:
    """Keys, oldest first (revoked ones included)."""
    query = sa.select(
        api_keys.c.id,
        api_keys.c.tenant,
        api_keys.c.prefix,
        api_keys.c.admin,
        api_keys.c.created_at,
        api_keys.c.revoked_at,
    ).order_by(api_keys.c.created_at, api_keys.c.id)
    if tenant is not None:
        query = query.where(api_keys.c.tenant == tenant)
    async with db.engine.connect() as conn:
        return [KeyInfo(**r) for r in (await conn.execute(query)).mappings()]


async def revoke_key(db: Database, ref: str) -> KeyInfo:
    """Revoke a key named by its id, its shown prefix or the key itself. Revoking twice changes nothing.

    Revoking the tenant's last unrevoked key erases its webhook secrets (``secret_erased`` says so): nothing is
    left that signs for a tenant nobody can act for. Its next key gets a new secret.

    Raises:
        NotFound: no key matches.
        InvalidInput: the prefix matches several keys.
    """
    condition = sa.or_(api_keys.c.id == ref, api_keys.c.prefix == ref, api_keys.c.key_hash == hash_key(ref))
    async with db.engine.begin() as conn:
        ids = [r[0] for r in await conn.execute(sa.select(api_keys.c.id).where(condition))]
        if not ids:
            raise NotFound(f"no API key {ref!r} (see `batcher keys list`)")
        if len(ids) > 1:
            raise InvalidInput(f"{ref!r} names {len(ids)} keys ({', '.join(ids)}); give one key id", field="key")
        owner: str = (await conn.execute(sa.select(api_keys.c.tenant).where(api_keys.c.id == ids[0]))).scalar_one()
        # one at a time per tenant, or two revokes of its last two keys would each see the other key still there
        await _lock_tenant(conn, owner)
        now = utcnow()
        await conn.execute(
            sa.update(api_keys).where(api_keys.c.id == ids[0], api_keys.c.revoked_at.is_(None)).values(revoked_at=now)
        )
        row = (await conn.execute(sa.select(api_keys).where(api_keys.c.id == ids[0]))).mappings().one()
        active = await conn.scalar(
            sa.select(api_keys.c.id).where(api_keys.c.tenant == owner, api_keys.c.revoked_at.is_(None)).limit(1)
        )
        erased = False
        if active is None:
            done = await conn.execute(
                sa.update(tenants)
                .where(
                    tenants.c.name == owner,
                    sa.or_(tenants.c.secret_sealed.is_not(None), tenants.c.webhook_secret != ""),
                )
                .values(
                    webhook_secret="",
                    secret_sealed=None,
                    previous_secret_sealed=None,
                    previous_secret_until=None,
                    updated_at=now,
                )
            )
            erased = done.rowcount == 1
    logger.info("API key %s of tenant %s revoked", row["id"], row["tenant"])
    if erased:
        logger.info("tenant %s has no API key left: its webhook secrets are erased", row["tenant"])
    return KeyInfo(
        row["id"],
        row["tenant"],
        row["prefix"],
        row["admin"],
        row["created_at"],
        row["revoked_at"],
        secret_erased=erased,
    )


async def authenticate(db: Database, key: str) -> Principal | None:
    """Who ``key`` belongs to (revoked keys included, flagged), or ``None`` for a key never made."""
    query = (
        sa.select(api_keys.c.id, api_keys.c.admin, api_keys.c.revoked_at, tenants)
        .select_from(api_keys.join(tenants, tenants.c.name == api_keys.c.tenant))
        .where(api_keys.c.key_hash == hash_key(key))
    )
    async with db.engine.connect() as conn:
        row = (await conn.execute(query)).mappings().first()
    if row is None:
        return None
    return Principal(row["id"], bool(row["admin"]), row["revoked_at"] is not None, _tenant(row))


# ------------------------------------------------------------------------------------------------ webhook secrets


def new_webhook_secret() -> str:
    """A new webhook secret: ``whsec_`` and the base64 of 32 random bytes (the HMAC key)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def whsec_from_legacy(secret: str) -> str:
    """A secret from before revision 0006 (its characters were the HMAC key) in ``whsec_`` form, same key."""
    return SECRET_PREFIX + base64.b64encode(secret.encode()).decode()


async def _lock_tenant(conn: AsyncConnection, name: str) -> None:
    """Hold the tenant's row until the transaction ends (PostgreSQL; SQLite writers are one at a time anyway)."""
    await conn.execute(sa.select(tenants.c.name).where(tenants.c.name == name).with_for_update())


async def _current_secret(conn: AsyncConnection, box: SecretBox, tenant: str, now: datetime) -> str:
    """The tenant's current secret, in the clear; made (or sealed from the pre-0006 column) when it has none."""
    await _lock_tenant(conn, tenant)
    row = (
        (
            await conn.execute(
                sa.select(tenants.c.secret_sealed, tenants.c.webhook_secret).where(tenants.c.name == tenant)
            )
        )
        .mappings()
        .one()
    )
    if row["secret_sealed"] is not None:
        return box.open(row["secret_sealed"], context=tenant)
    secret = whsec_from_legacy(row["webhook_secret"]) if row["webhook_secret"] else new_webhook_secret()
    await conn.execute(
        sa.update(tenants)
        .where(tenants.c.name == tenant)
        .values(webhook_secret="", secret_sealed=box.seal(secret, context=tenant), updated_at=now)
    )
    return secret


async def prepare_secrets(db: Database, settings: Settings, *, required: bool = True) -> SecretBox | None:
    """At start-up, once migrated: the key of the webhook secrets, and the stored secrets made ready for it.

    Secrets still in the clear (kept so before revision 0006) are sealed, in ``whsec_`` form with the same key
    bytes; sealed ones are checked to be this key's, so a process given another key stops here, saying so,
    instead of failing to sign every webhook.

    Args:
        db: the (migrated) database.
        settings: where the key comes from (:func:`batcher.secretbox.secret_box`).
        required: ``False`` for a worker: with no key to be had and no tenant in the database, there is nothing
            to sign and ``None`` is returned.

    Raises:
        ConfigError: no key (PostgreSQL without ``BATCHER_SECRET_KEY``); a secret sealed with another key.
    """
    try:
        box = secret_box(settings)
    except ConfigError:
        if required:
            raise
        async with db.engine.connect() as conn:
            if await conn.scalar(sa.select(tenants.c.name).limit(1)) is None:
                return None
        raise
    now = utcnow()
    async with db.engine.connect() as conn:
        legacy = [r[0] for r in await conn.execute(sa.select(tenants.c.name).where(tenants.c.webhook_secret != ""))]
    for name in legacy:
        async with db.engine.begin() as conn:
            await _lock_tenant(conn, name)
            row = (await conn.execute(sa.select(tenants).where(tenants.c.name == name))).mappings().one()
            if not row["webhook_secret"]:
                continue  # another process sealed it meanwhile
            values: dict[str, Any] = {"webhook_secret": "", "updated_at": now}
            if row["secret_sealed"] is None:
                values["secret_sealed"] = box.seal(whsec_from_legacy(row["webhook_secret"]), context=name)
            await conn.execute(sa.update(tenants).where(tenants.c.name == name).values(**values))
        logger.info("sealed the webhook secret of tenant %s (kept in the clear before revision 0006)", name)
    mine = f"{SEALED_PREFIX}{box.key_id}:%"
    query = sa.select(tenants.c.name, tenants.c.secret_sealed, tenants.c.previous_secret_sealed).where(
        sa.or_(
            sa.and_(tenants.c.secret_sealed.is_not(None), tenants.c.secret_sealed.not_like(mine)),
            sa.and_(tenants.c.previous_secret_sealed.is_not(None), tenants.c.previous_secret_sealed.not_like(mine)),
        )
    )
    async with db.engine.connect() as conn:
        other = (await conn.execute(query.limit(1))).mappings().first()
    if other is not None:
        for sealed in (other["secret_sealed"], other["previous_secret_sealed"]):
            if sealed is not None:
                box.open(sealed, context=other["name"])  # raises, naming both keys
    return box


async def signing_secrets(db: Database, box: SecretBox, names: Iterable[str], now: datetime) -> dict[str, list[str]]:
    """The secrets that sign each tenant's webhooks at ``now``: its current one, then the previous one while its
    overlap lasts. A tenant whose secrets were erased (its last key revoked) has none; one not found is left out.

    Raises:
        SealedSecretError: a secret does not open with ``box``.
    """
    wanted = sorted(set(names))
    if not wanted:
        return {}
    query = sa.select(
        tenants.c.name, tenants.c.secret_sealed, tenants.c.previous_secret_sealed, tenants.c.previous_secret_until
    ).where(tenants.c.name.in_(wanted))
    async with db.engine.connect() as conn:
        rows = list((await conn.execute(query)).mappings())
    found: dict[str, list[str]] = {}
    for r in rows:
        signing = [] if r["secret_sealed"] is None else [box.open(r["secret_sealed"], context=r["name"])]
        until = r["previous_secret_until"]
        if signing and r["previous_secret_sealed"] is not None and until is not None and until > now:
            signing.append(box.open(r["previous_secret_sealed"], context=r["name"]))
        found[r["name"]] = signing
    return found


async def rotate_secret(
    db: Database, box: SecretBox, tenant: str, *, overlap_s: float = DEFAULT_OVERLAP_S, now: datetime | None = None
) -> RotatedSecret:
    """Give ``tenant`` a new webhook secret; the current one keeps signing, next to it, for ``overlap_s`` seconds.

    A secret rotated out earlier stops signing at once (two sign at most). With ``overlap_s=0``, or a tenant whose
    secret was erased, only the new one signs.

    Raises:
        NotFound: no such tenant.
        InvalidInput: ``overlap_s`` is not between 0 and 30 days.
    """
    if not 0 <= overlap_s <= MAX_OVERLAP_S:
        raise InvalidInput("the overlap must be between 0 and 30 days (in seconds: 0 to 2592000)", field="overlap_s")
    now = now or utcnow()
    secret = new_webhook_secret()
    async with db.engine.begin() as conn:
        await _lock_tenant(conn, tenant)
        row = (
            (await conn.execute(sa.select(tenants.c.secret_sealed).where(tenants.c.name == tenant))).mappings().first()
        )
        if row is None:
            raise NotFound(f"no tenant {tenant!r} (make one with `batcher keys create --tenant {tenant}`)")
        keep = row["secret_sealed"] is not None and overlap_s > 0
        until = now + timedelta(seconds=overlap_s) if keep else None
        await conn.execute(
            sa.update(tenants)
            .where(tenants.c.name == tenant)
            .values(
                webhook_secret="",
                secret_sealed=box.seal(secret, context=tenant),
                previous_secret_sealed=row["secret_sealed"] if keep else None,
                previous_secret_until=until,
                secret_rotated_at=now,
                updated_at=now,
            )
        )
    logger.info("webhook secret of tenant %s rotated (the previous one signs until %s)", tenant, until)
    return RotatedSecret(tenant, secret, until)


# ------------------------------------------------------------------------------------------------ limits


def estimate_usd(prices: PriceBook, spec: SpecLike) -> Decimal | None:
    """What a job is expected to cost at most, at the batch price: its input tokens and its output bound (the
    request's own, else the model's longest reply). ``None``: no price is known for the model.
    """
    model_max = model_max_output(prices, spec.provider.value, spec.model)
    usage = TokenUsage(
        input_tokens=count_input_tokens(spec.provider, spec.endpoint, spec.body),
        output_tokens=max_output_tokens(spec.endpoint, spec.body, model_max),
    )
    return prices.cost(spec.provider.value, spec.model, usage, mode="batch").actual_usd


def month_start(now: datetime) -> datetime:
    """The start of ``now``'s calendar month (UTC)."""
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


async def spent_this_month(conn: AsyncConnection, tenant: str, now: datetime) -> Decimal:
    """The tenant's ledger spend (actual cost) since the start of the month.

    An entry whose cost is unknown (a success the provider reported no usage for) counts at its job's estimate,
    an upper bound of what it can have cost, so unknown spend cannot slip past the budget.
    """
    query = (
        sa.select(sa.func.sum(sa.func.coalesce(ledger.c.actual_usd, jobs.c.estimate_usd)))
        .select_from(ledger.join(jobs, jobs.c.id == ledger.c.job_id))
        .where(jobs.c.tenant == tenant, ledger.c.settled_at >= month_start(now))
    )
    value = await conn.scalar(query)
    return value if value is not None else Decimal(0)


def _lock_key(tenant: str) -> int:
    return int.from_bytes(hashlib.sha256(f"batcher-tenant:{tenant}".encode()).digest()[:8], "big", signed=True)


async def check_limits(
    conn: AsyncConnection,
    tenant: Tenant,
    created_ids: Sequence[str],
    estimates: Mapping[str, Decimal | None] | None,
    now: datetime,
    models: Mapping[str, str] | None = None,
) -> None:
    """Check a tenant's limits inside the transaction that has just stored ``created_ids``.

    Args:
        conn: the enqueue's connection, its transaction open.
        tenant: the tenant, with its limits.
        created_ids: the jobs this enqueue stored (already in the table).
        estimates: each created job's estimated cost (needed when the tenant has a budget; ``None``: its model has
            no price); stored on the job.
        now: the current time (for the month's start).
        models: each created job's ``provider/model``, to name an unpriced one.

    Raises:
        TooManyQueued: more unsettled jobs than the tenant may have.
        OverBudget: spend this month plus the estimate of the unsettled jobs exceeds the monthly budget.
        UnpricedUnderBudget: the tenant has a budget and a created job's model has no price.
    """
    if not created_ids or not tenant.limited:
        return
    if conn.dialect.name == "postgresql":
        # concurrent enqueues of one tenant count one after the other (the lock ends with the transaction)
        await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_key(tenant.name))))
    unsettled = jobs.c.tenant == tenant.name, jobs.c.state.in_(_ACTIVE)
    if tenant.max_queued_jobs is not None:
        count = int(await conn.scalar(sa.select(sa.func.count()).select_from(jobs).where(*unsettled)) or 0)
        if count > tenant.max_queued_jobs:
            before = count - len(created_ids)
            raise TooManyQueued(
                f"tenant {tenant.name!r} may have at most {tenant.max_queued_jobs:,} unsettled jobs; it has "
                f"{before:,} and this request adds {len(created_ids):,}. Wait for some to settle, or cancel some.",
                tenant=tenant.name,
            )
    if tenant.monthly_budget_usd is not None:
        estimates = estimates or {}
        unpriced = [i for i in created_ids if i in estimates and estimates[i] is None]
        if unpriced:
            names = sorted({(models or {}).get(i, "a model") for i in unpriced})
            raise UnpricedUnderBudget(tenant=tenant.name, models=names)
        known = {i: e for i, e in estimates.items() if e is not None}
        request = sum((known.get(i, Decimal(0)) for i in created_ids), Decimal(0))
        if known:
            await conn.execute(
                sa.update(jobs).where(jobs.c.id == sa.bindparam("e_id")).values(estimate_usd=sa.bindparam("e_usd")),
                [{"e_id": i, "e_usd": money(known[i])} for i in created_ids if i in known],
            )
        queued = await conn.scalar(sa.select(sa.func.sum(jobs.c.estimate_usd)).where(*unsettled))
        queued = (queued if queued is not None else Decimal(0)) - request
        spent = await spent_this_month(conn, tenant.name, now)
        if spent + queued + request > tenant.monthly_budget_usd:
            raise OverBudget(
                tenant=tenant.name,
                budget_usd=tenant.monthly_budget_usd,
                spent_usd=spent,
                queued_usd=queued,
                request_usd=request,
            )
