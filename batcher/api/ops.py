"""Health, metrics, the OpenAPI document, and a tenant's webhook deliveries."""

from __future__ import annotations

import sqlalchemy as sa
from aiohttp import web

from batcher import webhooks
from batcher.api.auth import PRINCIPAL, tenant_of
from batcher.api.errors import ApiError, not_found
from batcher.api.io import check_query, json_response, query_id, query_int, query_text
from batcher.api.metrics import render
from batcher.api.models import Health, WebhookOut, WebhookPage
from batcher.api.openapi import Param, Route
from batcher.api.state import state_of
from batcher.timeutil import utcnow


async def healthz(request: web.Request) -> web.StreamResponse:
    try:
        async with state_of(request).db.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except (sa.exc.OperationalError, sa.exc.InterfaceError, OSError):
        return json_response({"status": "unavailable", "database": "unavailable"}, status=503)
    return json_response({"status": "ok", "database": "ok"})


async def metrics(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    principal = request.get(PRINCIPAL)
    if principal is not None and not principal.admin:
        raise ApiError(403, "forbidden", "/metrics needs an admin key (batcher keys create --admin)")
    text = await render(state.db, state.http_counts, utcnow())
    return web.Response(
        text=text, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"}
    )


async def openapi(request: web.Request) -> web.StreamResponse:
    return web.Response(body=state_of(request).openapi, content_type="application/json")


_STATES = ("pending", "delivered", "failed")


async def list_webhooks(request: web.Request) -> web.StreamResponse:
    check_query(request, frozenset({"state", "job_id", "cursor", "limit"}))
    state = query_text(request, "state", max_length=16)
    if state is not None and state not in _STATES:
        raise ApiError(422, "invalid_request", f"state {state!r}: use {', '.join(_STATES)}", field="state")
    limit = query_int(request, "limit", 100, low=1, high=1000)
    found = await webhooks.list_deliveries(
        state_of(request).db,
        tenant=tenant_of(request).name,
        state=state,
        job_id=query_text(request, "job_id", max_length=64),
        cursor=query_id(request, "cursor"),
        limit=limit + 1,
    )
    page = [{k: v for k, v in d.items() if k != "tenant"} for d in found[:limit]]
    return json_response({"webhooks": page, "next_cursor": found[limit - 1]["id"] if len(found) > limit else None})


async def get_webhook(request: web.Request) -> web.StreamResponse:
    check_query(request, frozenset())
    delivery_id = request.match_info["id"]
    db = state_of(request).db
    found = await webhooks.list_deliveries(db, tenant=tenant_of(request).name, delivery_id=delivery_id, limit=1)
    if not found:
        raise not_found(f"webhook delivery {delivery_id}")
    return json_response({k: v for k, v in found[0].items() if k != "tenant"})


async def retry_webhook(request: web.Request) -> web.StreamResponse:
    check_query(request, frozenset())
    delivery = await webhooks.retry(
        state_of(request).db, request.match_info["id"], utcnow(), tenant=tenant_of(request).name
    )
    return json_response({k: v for k, v in delivery.items() if k != "tenant"})


_HOOK_ID = Param("id", "path", "the delivery id")

ROUTES = [
    Route(
        "GET",
        "/healthz",
        healthz,
        "Liveness and database reachability (no key needed)",
        "health",
        response=Health,
        errors=(503,),
    ),
    Route(
        "GET",
        "/metrics",
        metrics,
        "Prometheus metrics (needs an admin key unless BATCHER_API_METRICS_PUBLIC=true)",
        "metrics",
        text=True,
        errors=(401, 403),
    ),
    Route("GET", "/openapi.json", openapi, "This document", "openapi", errors=()),
    Route(
        "GET",
        "/v1/webhooks",
        list_webhooks,
        "Webhook deliveries, newest first, with their state",
        "listWebhooks",
        response=WebhookPage,
        params=(
            Param("state", "query", "only deliveries in this state", {"enum": list(_STATES)}),
            Param("job_id", "query", "only the delivery of this job"),
            Param("cursor", "query", "next_cursor of the previous page"),
            Param("limit", "query", "deliveries per page", {"type": "integer", "minimum": 1, "maximum": 1000}),
        ),
    ),
    Route(
        "GET",
        "/v1/webhooks/{id}",
        get_webhook,
        "One webhook delivery",
        "getWebhook",
        response=WebhookOut,
        params=(_HOOK_ID,),
        errors=(401, 404),
    ),
    Route(
        "POST",
        "/v1/webhooks/{id}/retry",
        retry_webhook,
        "Send a delivery again now (a failed one gets one more attempt)",
        "retryWebhook",
        response=WebhookOut,
        params=(_HOOK_ID,),
        errors=(401, 404, 422),
    ),
]
