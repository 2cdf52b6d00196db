"""The dashboard's sign-in session (CONTRACT section 12, Dashboard): the token a person pasted
is kept in an ``HttpOnly``, ``SameSite=Strict`` cookie (``Secure`` under TLS) and never appears
in a URL; every request carrying the cookie is authenticated again from the store, so a revoked
token signs its browser out at once.

``CookieAuth`` (ASGI middleware) puts the cookie's ``Principal`` on ``request.state.principal``
so the API routes (``web/auth.py``) serve the dashboard too. A state-changing request that
relies on the cookie must prove it comes from our own pages: the CSRF token (an HMAC of a fixed
label keyed by the session's token: unguessable without the token, the same on every replica
and after a restart) in the form field ``csrf_token`` or the header ``X-CSRF-Token``, and no
cross-site ``Origin``/``Sec-Fetch-Site``. A cross-site or token-less cookie request to the API
is refused with 403 here; dashboard forms check the field themselves (``require_csrf``).
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from aibridgeproxyd.store import StoreError
from aibridgeproxyd.tokens import hash_token
from aibridgeproxyd.web.auth import MAX_TOKEN_LENGTH, Principal
from aibridgeproxyd.web.context import AdminContext
from aibridgeproxyd.web.problems import ApiError, error_response

COOKIE_NAME = "aibridgeproxyd_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Roles that may sign in to the dashboard: admins change things, auditors only read. A proxy
# token reads its own records through the API instead (the dashboard shows everyone's).
DASHBOARD_ROLES = frozenset({"admin", "auditor"})
_CSRF_LABEL = b"aibridgeproxyd dashboard csrf v1"


def csrf_token(session_token: str) -> str:
    """The CSRF token of a signed-in session: 64 hex characters."""
    return hmac.new(session_token.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def csrf_matches(session_token: str, presented: str | None) -> bool:
    """Whether ``presented`` is the session's CSRF token (constant-time comparison)."""
    return presented is not None and hmac.compare_digest(csrf_token(session_token), presented)


def cross_site(request: Request) -> bool:
    """Whether the browser says the request comes from another site. ``Sec-Fetch-Site`` (sent
    by every current browser) decides when present: only ``same-origin`` and ``none`` (typed
    by the user) pass. Without it, an ``Origin`` must be this server's own. (Under our
    ``Referrer-Policy: no-referrer`` a browser sends ``Origin: null`` even for our own forms,
    which is why ``Sec-Fetch-Site`` comes first.)"""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return False
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    return origin != own


def session_token(request: Request) -> str | None:
    """The token in the session cookie, or None (absent, empty or absurdly long)."""
    token = request.cookies.get(COOKIE_NAME, "").strip()
    return token if token and len(token) <= MAX_TOKEN_LENGTH else None


async def dashboard_principal(ctx: AdminContext, token: str | None) -> Principal | None:
    """The admin or auditor a session token names; None for no token, an unknown token or a
    proxy token. A store error is raised (fails closed: the caller answers an error)."""
    if token is None:
        return None
    owner = await ctx.store.token_owner(hash_token(token))
    if owner is None or owner[0] not in DASHBOARD_ROLES:
        return None
    return Principal(role=owner[0], name=owner[1])


def cookie_settings(request: Request) -> dict[str, Any]:
    """Attributes of the session cookie: ``Secure`` when the request came over TLS."""
    return {
        "key": COOKIE_NAME,
        "httponly": True,
        "samesite": "strict",
        "secure": request.url.scheme == "https",
        "path": "/",
    }


def _uses_header_token(request: Request) -> bool:
    return "authorization" in request.headers or "coder-session-token" in request.headers


class CookieAuth:
    """ASGI middleware: a request without a token header but with the session cookie gets the
    cookie's principal on ``request.state.principal`` (and its token on
    ``request.state.session_token``). An API write through the cookie needs the CSRF header and
    a same-site origin, else 403."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        token = session_token(request)
        if token is None or _uses_header_token(request):
            await self.app(scope, receive, send)
            return
        try:
            refusal = await self._sign_in(scope, request, token)
        except (StoreError, sqlite3.Error) as exc:
            # Fails closed: without the store nobody is signed in.
            refusal = ApiError(503, "the store could not be read", detail=str(exc))
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _sign_in(self, scope: Scope, request: Request, token: str) -> ApiError | None:
        ctx = request.app.state.context
        principal = await dashboard_principal(ctx, token)
        if principal is None:
            return None  # signed out or revoked: the page asks to sign in again
        state = scope.setdefault("state", {})
        state["principal"] = principal
        state["session_token"] = token
        api_write = scope["path"].startswith("/api/") and request.method not in SAFE_METHODS
        if api_write and (
            cross_site(request) or not csrf_matches(token, request.headers.get(CSRF_HEADER))
        ):
            return ApiError(403, "a dashboard session's write needs its X-CSRF-Token header")
        return None
