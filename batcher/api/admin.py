"""Operator routes on tenants, for admin keys only (``batcher keys create --admin``): rotating a webhook secret."""

from __future__ import annotations

from datetime import datetime

from aiohttp import web
from pydantic import BaseModel, Field, ValidationError

from batcher import tenants
from batcher.api.auth import PRINCIPAL
from batcher.api.errors import ApiError, from_validation
from batcher.api.io import check_query, json_response, read_body
from batcher.api.models import _Strict
from batcher.api.openapi import Param, Route
from batcher.api.state import state_of
from batcher.secretbox import secret_box
from batcher.timeutil import utcnow


class RotateSecretIn(_Strict):
    overlap_s: float = Field(
        default=tenants.DEFAULT_OVERLAP_S,
        ge=0,
        le=tenants.MAX_OVERLAP_S,
        allow_inf_nan=False,
        description="seconds the current secret keeps signing next to the new one (0: it stops at once)",
    )


class WebhookSecretOut(BaseModel):
    tenant: str
    webhook_secret: str = Field(description="the new secret (whsec_…); shown only in this answer")
    previous_valid_until: datetime | None = Field(description="until when the previous secret signs too")


def _admin_only(request: web.Request, what: str) -> None:
    principal = request.get(PRINCIPAL)
    if principal is None or not principal.admin:
        raise ApiError(403, "forbidden", f"{what} needs an admin key (batcher keys create --admin)")


async def rotate_secret(request: web.Request) -> web.StreamResponse:
    check_query(request, frozenset())
    _admin_only(request, "rotating a tenant's webhook secret")
    state = state_of(request)
    body = await read_body(request, 1 << 12, "a rotation body is at most 4 KiB")
    try:
        given = RotateSecretIn.model_validate_json(body) if body.strip() else RotateSecretIn()
    except ValidationError as exc:
        raise from_validation(exc) from None
    rotated = await tenants.rotate_secret(
        state.db, secret_box(state.settings), request.match_info["tenant"], overlap_s=given.overlap_s, now=utcnow()
    )
    # the secret is in this answer only: nothing on the way may keep it
    return json_response(rotated.to_json(), headers={"Cache-Control": "no-store"})


ROUTES = [
    Route(
        "POST",
        "/v1/tenants/{tenant}/webhook-secret/rotate",
        rotate_secret,
        "Give a tenant a new webhook secret; the current one signs too for overlap_s (admin keys only)",
        "rotateWebhookSecret",
        request=RotateSecretIn,
        response=WebhookSecretOut,
        params=(Param("tenant", "path", "the tenant's name"),),
        errors=(401, 403, 404, 422),
    ),
]
