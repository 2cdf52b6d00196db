"""``/api/v2/ai/proxy-tokens`` (CONTRACT section 12, Proxy tokens): list, create (the token is
shown once), revoke; ``admin`` tokens only (an auditor or a proxy token gets 403).

Each write answers once the daemon has reloaded with it (``AdminContext.reload_now``): a created
token works, a revoked one is refused, on the next new connection.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from aibridgeproxyd import management
from aibridgeproxyd.web.api_errors import error_responses
from aibridgeproxyd.web.auth import Admin, AuthenticateFirst
from aibridgeproxyd.web.context import AdminContext, context
from aibridgeproxyd.web.patterns import TOKEN_NAME

router = APIRouter(
    prefix="/api/v2/ai/proxy-tokens", tags=["proxy tokens"], route_class=AuthenticateFirst
)
Context = Annotated[AdminContext, Depends(context)]


class ProxyTokenView(BaseModel):
    """A proxy token as listed: never the token or its hash. ``last_used_at`` is when its user's
    newest recorded request started (null when none was recorded)."""

    name: str
    created_at: str
    last_used_at: str | None


class ProxyTokenCreate(BaseModel):
    """The user the token is for: the ``initiator`` its records carry."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(pattern=TOKEN_NAME)]


class CreatedProxyToken(BaseModel):
    """The new token, shown this once (only its hash is stored)."""

    name: str
    token: str


@router.get("", response_model=list[ProxyTokenView], responses=error_responses(401, 403))
async def list_proxy_tokens(_caller: Admin, ctx: Context) -> list[dict[str, Any]]:
    """Every proxy token, by name."""
    return await management.list_proxy_tokens(ctx.store)


@router.post(
    "",
    status_code=201,
    response_model=CreatedProxyToken,
    responses=error_responses(400, 401, 403, 409),
)
async def create_proxy_token(
    _caller: Admin, ctx: Context, body: ProxyTokenCreate
) -> dict[str, str]:
    """Create a proxy token for user ``name``."""
    created = await management.create_proxy_token(ctx.store, body.name)
    await ctx.reload_now()
    return created


@router.delete(
    "/{name}", status_code=204, response_class=Response, responses=error_responses(401, 403, 404)
)
async def revoke_proxy_token(name: str, _caller: Admin, ctx: Context) -> Response:
    """Revoke a proxy token: new connections with it are refused once this answers."""
    await management.revoke_proxy_token(ctx.store, name)
    await ctx.reload_now()
    return Response(status_code=204)
