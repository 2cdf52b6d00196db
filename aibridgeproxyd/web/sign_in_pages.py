"""Signing in and out of the dashboard. The token is pasted into a form (POSTed, never in a
URL), checked against the store, and kept in the session cookie (``dashboard_session``).
Admin and auditor tokens may sign in; a proxy token or an unknown token gets the form again
with the reason."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from aibridgeproxyd.tokens import hash_token
from aibridgeproxyd.web import dashboard_session as session
from aibridgeproxyd.web.auth import MAX_TOKEN_LENGTH, Principal
from aibridgeproxyd.web.context import AdminContext, context
from aibridgeproxyd.web.pages import CheckedForm, render

router = APIRouter(include_in_schema=False)


@router.get("/")
async def home(request: Request) -> Response:
    signed_in = isinstance(getattr(request.state, "principal", None), Principal)
    return RedirectResponse("/providers" if signed_in else "/sign-in", status_code=303)


@router.get("/sign-in")
async def sign_in_page(request: Request) -> Response:
    return render(request, "sign_in.html", error="")


async def _refusal(ctx: AdminContext, token: str) -> str:
    """Why ``token`` may not sign in; empty when it may."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return "paste an admin or auditor token"
    owner = await ctx.store.token_owner(hash_token(token))
    if owner is None:
        return "unknown token (revoked, or mistyped)"
    if owner[0] not in session.DASHBOARD_ROLES:
        return "a proxy token may not sign in here; use an admin or auditor token"
    return ""


@router.post("/sign-in")
async def sign_in(
    request: Request,
    ctx: Annotated[AdminContext, Depends(context)],
    token: Annotated[str, Form()] = "",
) -> Response:
    """Sign in: a same-site POST with a valid token sets the cookie and goes to Providers."""
    token = token.strip()
    refusal = "this form came from another site" if session.cross_site(request) else ""
    refusal = refusal or await _refusal(ctx, token)
    if refusal:
        return render(request, "sign_in.html", status=401, error=refusal)
    response = RedirectResponse("/providers", status_code=303)
    response.set_cookie(value=token, **session.cookie_settings(request))
    return response


@router.post("/sign-out")
async def sign_out(request: Request, _form: CheckedForm) -> Response:
    response = RedirectResponse("/sign-in", status_code=303)
    response.delete_cookie(**session.cookie_settings(request))
    return response
