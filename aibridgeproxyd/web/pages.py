"""What every dashboard page shares: ``render`` (Jinja2 templates, autoescape on, so every
recorded string is text, never markup), the ``Viewer`` dependency (a signed-in admin or
auditor, else a redirect to the sign-in) and ``EditorForm`` (a state-changing form: same-site,
the session's CSRF token, an admin), and the two refusals pages raise."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException

from aibridgeproxyd.errors import reason_phrase
from aibridgeproxyd.web import charts, flash, problems
from aibridgeproxyd.web import dashboard_session as session
from aibridgeproxyd.web.auth import Principal

HERE = Path(__file__).resolve().parent
TEMPLATES = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
TEMPLATES.filters["usd"] = charts.cost_text  # micro-dollars as the charts write them
# (key, path, label, admins only). Proxy tokens are an admin's: CONTRACT section 12 lets an
# auditor read providers (without secrets), interceptions, sessions and usage, and the API
# refuses an auditor GET /api/v2/ai/proxy-tokens; the page and its link follow the same rule.
NAVIGATION = (
    ("providers", "/providers", "Providers", False),
    ("tokens", "/tokens", "Proxy tokens", True),
    ("sessions", "/sessions", "Sessions", False),
    ("usage", "/usage", "Usage", False),
    ("policies", "/policies", "Policies", False),
)


class SignInRequired(Exception):
    """The page needs a signed-in admin or auditor: answered with a redirect to the sign-in."""


class PageRefused(Exception):
    """A page or form the signed-in person may not use, or a form that failed its CSRF check:
    answered with the error page and ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def render(request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
    """``template`` rendered with ``values``, the signed-in principal, its CSRF token, the
    navigation it may use and the one-shot messages of the last change (``flash``)."""
    principal = getattr(request.state, "principal", None)
    token = getattr(request.state, "session_token", None)
    is_admin = isinstance(principal, Principal) and principal.is_admin
    html = TEMPLATES.get_template(template).render(
        principal=principal,
        csrf_field=session.CSRF_FIELD,
        csrf_token=session.csrf_token(token) if token else "",
        navigation=[item[:3] for item in NAVIGATION if is_admin or not item[3]],
        flash=flash.decoded(request.cookies.get(flash.COOKIE_NAME)) if principal else flash.EMPTY,
        **values,
    )
    response = HTMLResponse(html, status_code=status)
    flash.take(request, response)
    return response


def viewer(request: Request) -> Principal:
    """FastAPI dependency: the signed-in admin or auditor, else ``SignInRequired``."""
    principal = getattr(request.state, "principal", None)
    if (
        not isinstance(principal, Principal)
        or getattr(request.state, "session_token", None) is None
    ):
        raise SignInRequired()
    return principal


async def checked_form(
    request: Request, _principal: Annotated[Principal, Depends(viewer)]
) -> dict[str, str]:
    """FastAPI dependency of every state-changing page: a same-site form carrying the session's
    CSRF token, else ``PageRefused`` 403. Returns the form's text fields."""
    form = await request.form()
    fields = {name: value for name, value in form.items() if isinstance(value, str)}
    token = request.state.session_token
    if session.cross_site(request) or not session.csrf_matches(
        token, fields.get(session.CSRF_FIELD)
    ):
        raise PageRefused(403, "this form is out of date or came from another site: reload it")
    return fields


def editor(principal: Annotated[Principal, Depends(viewer)]) -> Principal:
    """FastAPI dependency: a signed-in admin (an auditor only reads: ``PageRefused`` 403)."""
    if not principal.is_admin:
        raise PageRefused(403, f"role {principal.role!r} may only read; sign in as an admin")
    return principal


def admin_reader(principal: Annotated[Principal, Depends(viewer)]) -> Principal:
    """FastAPI dependency of a page only admins read (Proxy tokens: the API refuses an auditor
    the same list), else ``PageRefused`` 403."""
    if not principal.is_admin:
        raise PageRefused(
            403,
            "proxy tokens are shown to admins only; an auditor reads providers, sessions and usage",
        )
    return principal


async def editor_form(
    _editor: Annotated[Principal, Depends(editor)],
    fields: Annotated[dict[str, str], Depends(checked_form)],
) -> dict[str, str]:
    """``checked_form``, sent by an admin."""
    return fields


Viewer = Annotated[Principal, Depends(viewer)]
Editor = Annotated[Principal, Depends(editor)]
AdminReader = Annotated[Principal, Depends(admin_reader)]
CheckedForm = Annotated[dict[str, str], Depends(checked_form)]
EditorForm = Annotated[dict[str, str], Depends(editor_form)]


async def on_sign_in_required(_request: Request, _exc: Exception) -> Response:
    """Exception handler: to the sign-in page."""
    return RedirectResponse("/sign-in", status_code=303)


async def on_page_refused(request: Request, exc: Exception) -> Response:
    """Exception handler: the error page with the refusal's status and message."""
    assert isinstance(exc, PageRefused)
    return render(request, "error.html", status=exc.status, message=exc.message)


async def on_http_error(request: Request, exc: Exception) -> Response:
    """Exception handler of Starlette's HTTP errors (an unknown path: 404; a wrong method:
    405): under ``/api/`` the API's JSON (``problems``); any other path is a browser's, and
    gets the error page."""
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/api/"):
        return await problems.on_http_error(request, exc)
    found = exc.status_code != 404
    message = "there is no such page: check the address" if not found else ""
    response = render(
        request,
        "error.html",
        status=exc.status_code,
        heading=reason_phrase(exc.status_code) if found else "Page not found",
        message=message or reason_phrase(exc.status_code),
    )
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response
