"""Tenants of the HTTP API: their API keys, webhook secrets and limits.

An API key is ``bk_`` followed by 40 random URL-safe characters (240 bits). Only its SHA-256 is stored — a
slow password hash buys nothing for a random key of that size — together with its first characters, so
listings can tell keys apart. The key itself is printed once, when it is made.

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

import hashlib
import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from batcher.db.engine import Database
from batcher.db.tables import api_keys, jobs, ledger, tenants
from batcher.domain import JOB_ACTIVE, new_id, state_values
from batcher.errors import BatcherError, InvalidInput, NotFound
from batcher.estimate import count_input_tokens, max_output_tokens, model_max_output
from batcher.intake import SpecLike
from batcher.pricing import PriceBook, TokenUsage, money
from batcher.timeutil import utcnow

logger = logging.getLogger(__name__)

KEY_PREFIX = "bk_"
SECRET_PREFIX = "whsec_"
#: characters of a key kept in the clear for listings (``bk_`` and 9 more)
SHOWN_CHARS = 12
#: a tenant's name: it prefixes its runs (``acme/nightly``), so no ``/``
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
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
    webhook_secret: str
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
    return Tenant(row["name"], row["webhook_secret"], row["max_queued_jobs"], row["monthly_budget_usd"])


async def get_tenant(conn: AsyncConnection, name: str) -> Tenant | None:
    row = (await conn.execute(sa.select(tenants).where(tenants.c.name == name))).mappings().first()
    return None if row is None else _tenant(row)


async def create_key(
    db: Database,
    tenant: str,
    *,
    admin: bool = False,
    max_queued_jobs: int | None = UNSET,
    monthly_budget_usd: Decimal | None = UNSET,
) -> CreatedKey:
    """Make an API key for ``tenant``, creating the tenant (and its webhook secret) if it is new.

    Limits given here are set on the tenant; limits not given are left as they are (a new tenant has none).

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
                webhook_secret=SECRET_PREFIX + secrets.token_urlsafe(32),
                max_queued_jobs=None,
                monthly_budget_usd=None,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["name"])
        )
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
        found = await get_tenant(conn, tenant)
    assert found is not None
    logger.info("API key %s made for tenant %s", key_id, tenant)
    return CreatedKey(key_id, tenant, key, found.webhook_secret)


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
        await conn.execute(
            sa.update(api_keys)
            .where(api_keys.c.id == ids[0], api_keys.c.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        row = (await conn.execute(sa.select(api_keys).where(api_keys.c.id == ids[0]))).mappings().one()
    logger.info("API key %s of tenant %s revoked", row["id"], row["tenant"])
    return KeyInfo(row["id"], row["tenant"], row["prefix"], row["admin"], row["created_at"], row["revoked_at"])


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
