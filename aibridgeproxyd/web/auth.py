"""Who is calling the API (CONTRACT section 12, Authentication).

A token comes as ``Authorization: Bearer <token>`` or ``Coder-Session-Token: <token>`` and is
looked up by its SHA-256 (``tokens.hash_token``) among admin tokens (roles ``admin`` and
``auditor``) and proxy tokens (role ``proxy``: a user, who sees only their own records).
Missing or unknown: 401. A role not allowed for the route: 403.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute

from aibridgeproxyd.tokens import hash_token
from aibridgeproxyd.web.context import AdminContext, context
from aibridgeproxyd.web.problems import ApiError

# Longer than any token we issue by far; a longer value is not looked up at all.
MAX_TOKEN_LENGTH = 512
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="aibridgeproxyd"'}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``role`` is ``admin``, ``auditor`` or ``proxy``; ``name`` the
    token's name (for ``proxy``, the initiator its records carry)."""

    role: str
    name: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def sees_everyone(self) -> bool:
        """Admins and auditors read every user's records; a proxy token only its own."""
        return self.role in ("admin", "auditor")


def presented_token(request: Request) -> str | None:
    """The token of ``Authorization: Bearer`` or ``Coder-Session-Token``; None when neither
    is present. A malformed ``Authorization`` header is a 401, and so are two headers naming
    different tokens: which one the caller meant is unknown, so neither is taken."""
    session_token = request.headers.get("coder-session-token")
    session_token = session_token.strip() if session_token is not None else None
    authorization = request.headers.get("authorization")
    if authorization is None:
        return session_token
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "the Authorization header must be 'Bearer <token>'", headers=CHALLENGE)
    if session_token is not None and session_token != token.strip():
        raise ApiError(
            401,
            "Authorization and Coder-Session-Token name different tokens; send one",
            headers=CHALLENGE,
        )
    return token.strip()


async def principal_of(ctx: AdminContext, token: str | None) -> Principal:
    """The caller a token names. Raises ``ApiError`` 401 for a missing or unknown token."""
    if not token:
        raise ApiError(401, "authentication required: send a token", headers=CHALLENGE)
    if len(token) > MAX_TOKEN_LENGTH:
        raise ApiError(401, "unknown token", headers=CHALLENGE)
    owner = await ctx.store.token_owner(hash_token(token))
    if owner is None:
        raise ApiError(401, "unknown token", headers=CHALLENGE)
    return Principal(role=owner[0], name=owner[1])


async def authenticated(
    request: Request, ctx: Annotated[AdminContext, Depends(context)]
) -> Principal:
    """FastAPI dependency: the caller, from a request header or (the dashboard) a principal a
    middleware already put on ``request.state.principal``."""
    known = getattr(request.state, "principal", None)
    if isinstance(known, Principal):
        return known
    return await principal_of(ctx, presented_token(request))


async def admin_only(caller: Annotated[Principal, Depends(authenticated)]) -> Principal:
    """FastAPI dependency: an ``admin`` token, else 403."""
    if not caller.is_admin:
        raise ApiError(403, f"role {caller.role!r} may not do this; an admin token is required")
    return caller


async def staff_only(caller: Annotated[Principal, Depends(authenticated)]) -> Principal:
    """FastAPI dependency: an ``admin`` or ``auditor`` token, else 403."""
    if not caller.sees_everyone:
        raise ApiError(403, "a proxy token may not do this; an admin or auditor token is required")
    return caller


Caller = Annotated[Principal, Depends(authenticated)]
Admin = Annotated[Principal, Depends(admin_only)]
Staff = Annotated[Principal, Depends(staff_only)]


class AuthenticateFirst(APIRoute):
    """A route class (``APIRouter(route_class=AuthenticateFirst)``) that authenticates the
    caller before FastAPI reads the request body: without a valid token the answer is 401
    whatever the body holds (FastAPI parses the body before running dependencies, so a
    malformed one would otherwise be a 400 to anyone). The principal goes on
    ``request.state.principal``, where ``authenticated`` finds it; role checks stay with the
    ``Admin`` and ``Staff`` dependencies."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def authenticate_then_handle(request: Request) -> Response:
            request.state.principal = await authenticated(request, context(request))
            return await handler(request)

        return authenticate_then_handle
