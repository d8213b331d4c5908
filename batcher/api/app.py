"""The aiohttp application: routes, middlewares (errors, metrics, auth), start-up and shut-down.

``create_app(settings)`` opens the database on start-up (migrating it unless told not to) and starts the
group committer; ``serve_api`` serves it in-process on a port (tests, ``batcher up``); ``run_api`` serves
until cancelled (``batcher api``). Every route is declared once in :data:`ROUTES`, which also feeds
``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import ValidationError

from batcher.api import admin, ops, runs
from batcher.api import jobs as job_routes
from batcher.api.auth import KeyCache, authenticate
from batcher.api.enqueue import Enqueuer
from batcher.api.errors import ApiError, from_validation
from batcher.api.openapi import Route, build_openapi
from batcher.api.server import ApiRunner
from batcher.api.state import STATE, ApiState
from batcher.config import Settings
from batcher.db import migrate
from batcher.db.engine import Database
from batcher.errors import ConfigError, InvalidInput, NotFound, ProviderError, StateConflict
from batcher.pricing import PriceBook, load_overrides
from batcher.providers import registry
from batcher.tenants import OverBudget, TooManyQueued, UnpricedUnderBudget, prepare_secrets

logger = logging.getLogger(__name__)

__all__ = ["ROUTES", "create_app", "run_api", "serve_api"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROUTES: list[Route] = [*job_routes.ROUTES, *runs.ROUTES, *ops.ROUTES, *admin.ROUTES]

_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def _field(name: str | None) -> str | None:
    """Intake names Anthropic fields ``params.…``; over HTTP they are the job's ``body``."""
    if name is None:
        return None
    if name == "params" or name.startswith("params."):
        return "body" + name[len("params") :]
    return name


def translate(exc: Exception) -> ApiError | None:
    """batcher's own errors as HTTP answers (``None``: not one of them)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation(exc)
    if isinstance(exc, InvalidInput):
        return ApiError(422, "invalid_request", exc.reason, field=_field(exc.field), line=exc.line)
    if isinstance(exc, NotFound):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, StateConflict):
        return ApiError(409, "conflict", str(exc))
    if isinstance(exc, TooManyQueued):
        return ApiError(429, "too_many_queued", str(exc))
    if isinstance(exc, OverBudget):
        return ApiError(
            402,
            "over_budget",
            str(exc),
            extra={
                "budget_usd": str(exc.budget_usd),
                "spent_usd": str(exc.spent_usd),
                "queued_usd": str(exc.queued_usd),
                "request_usd": str(exc.request_usd),
            },
        )
    if isinstance(exc, UnpricedUnderBudget):
        return ApiError(402, "unpriced_model", str(exc), extra={"models": exc.models})
    if isinstance(exc, ProviderError):
        return ApiError(502, "provider_error", f"the provider refused: {exc}")
    if isinstance(exc, ConfigError):
        return ApiError(503, "unavailable", f"batcher is misconfigured: {exc}")
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, ConnectionError)):
        logger.warning("database unavailable: %s", exc)
        return ApiError(503, "unavailable", "the database is unavailable; retry later")
    return None


def _answer(request: web.Request, exc: Exception) -> web.Response:
    """The JSON answer to a failed request."""
    if isinstance(exc, web.HTTPException):
        if exc.status == 404:
            message = f"no endpoint {request.method} {request.path} (see /openapi.json)"
        elif exc.status == 405:
            message = f"{request.method} is not allowed on {request.path} (see /openapi.json)"
        else:
            message = exc.reason
        return ApiError(exc.status, _HTTP_TYPES.get(exc.status, "http_error"), message).response()
    answer = translate(exc)
    if answer is None:
        logger.error("%s %s failed", request.method, request.path, exc_info=exc)
        answer = ApiError(500, "internal", "batcher failed to answer; the error is in its log")
    return answer.response()


def _middleware(keys: KeyCache, public: frozenset[str], counts: Counter[tuple[str, str, int]]) -> Middleware:
    """Authentication, errors as JSON answers, and the count of answers, in one middleware (one per request)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.path not in public:
                await authenticate(request, keys)
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _answer(request, exc)
        except Exception as exc:
            response = _answer(request, exc)
        resource = request.match_info.route.resource
        counts[(request.method, resource.canonical if resource is not None else "unmatched", response.status)] += 1
        return response

    return middleware


@dataclass(frozen=True)
class _Options:
    migrate: bool


def create_app(settings: Settings | None = None, *, migrate_db: bool = True) -> web.Application:
    """The HTTP API.

    Args:
        settings: configuration (default: from the environment).
        migrate_db: bring the database to the current schema on start-up.
    """
    settings = settings or Settings()
    counts: Counter[tuple[str, str, int]] = Counter()
    public = {"/healthz", "/openapi.json"} | ({"/metrics"} if settings.api_metrics_public else set())
    db = Database(settings.database_url)
    state = ApiState(
        settings=settings,
        db=db,
        keys=KeyCache(db, settings.api_auth_cache_s),
        enqueuer=Enqueuer(
            db, settings, PriceBook(registry.discounts(settings), load_overrides(settings.price_overrides_file))
        ),
        http_counts=counts,
        openapi=b"",
    )
    app = web.Application(
        middlewares=[_middleware(state.keys, frozenset(public), counts)],
        # bodies are limited per route (413 with the limit named); this only bounds what aiohttp itself reads
        client_max_size=max(settings.api_max_bulk_bytes, settings.api_max_job_bytes) + 1,
    )
    app[STATE] = state
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    state.openapi = build_openapi(ROUTES, public_paths=frozenset(public))
    options = _Options(migrate_db)

    async def on_startup(_app: web.Application) -> None:
        if options.migrate:
            await migrate.upgrade(db.engine)
        # the webhook secrets' key (PostgreSQL: BATCHER_SECRET_KEY or no start), and any pre-0006 secret sealed
        await prepare_secrets(db, settings)
        state.enqueuer.start()

    async def on_cleanup(_app: web.Application) -> None:
        await state.enqueuer.close()
        if state.pipeline is not None:
            await registry.close_adapters(state.pipeline.adapters)
        await db.aclose()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


@asynccontextmanager
async def serve_api(
    settings: Settings | None = None, host: str = "127.0.0.1", port: int = 0, *, migrate_db: bool = True
) -> AsyncIterator[str]:
    """Serve the API in-process for the duration of the block; yields its base URL (``http://host:port``)."""
    settings = settings or Settings()
    runner = ApiRunner(create_app(settings, migrate_db=migrate_db), settings, handler_cancellation=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = next(a for a in runner.addresses if isinstance(a, tuple))
        url_host = f"[{host}]" if ":" in host else host
        yield f"http://{url_host}:{bound[1]}"
    finally:
        await runner.cleanup()


def freeze_heap() -> None:
    """Move what start-up made (modules, schemas, compiled statements) out of the garbage collector's sight.

    A server process keeps all of it for its whole life; without this every full collection walks it again.
    """
    gc.collect()
    gc.freeze()


async def run_api(settings: Settings, host: str = "127.0.0.1", port: int = 8300) -> None:
    """Serve the API until cancelled."""
    async with serve_api(settings, host, port) as url:
        freeze_heap()
        logger.info("batcher API listening on %s", url)
        await asyncio.Event().wait()
