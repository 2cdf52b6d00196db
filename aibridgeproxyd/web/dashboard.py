"""The dashboard (CONTRACT section 12, Dashboard): server-rendered pages at ``/`` for a person
in a browser, signed in with an admin token (may change things) or an auditor token (reads
only; a proxy token may not sign in: it reads its own records through the API). Pages:
sign-in (``sign_in_pages``), Providers and Proxy tokens (``provider_pages``), Sessions and
Usage (``record_pages``), Policies (``policy_pages``).

They call the same functions as the API (``management``, the store's queries) and know nothing
of the CLI. The only script is ``static/dashboard.js`` (the Content-Security-Policy forbids
inline script); forms are CSRF-protected (``dashboard_session``).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from aibridgeproxyd.web import pages, policy_pages, provider_pages, record_pages, sign_in_pages
from aibridgeproxyd.web.dashboard_session import CookieAuth
from aibridgeproxyd.web.security_headers import SecurityHeaders


def install(app: FastAPI) -> None:
    """Serve the dashboard on ``app``: its pages, its static files under ``/static``, the
    session cookie middleware and the security headers on every response."""
    app.include_router(sign_in_pages.router)
    app.include_router(provider_pages.router)
    app.include_router(record_pages.router)
    app.include_router(policy_pages.router)
    app.mount("/static", StaticFiles(directory=pages.HERE / "static"), name="static")
    app.add_exception_handler(pages.SignInRequired, pages.on_sign_in_required)
    app.add_exception_handler(pages.PageRefused, pages.on_page_refused)
    # Replaces the API's handler: JSON under /api/, an HTML page for a browser's path.
    app.add_exception_handler(HTTPException, pages.on_http_error)
    app.add_middleware(CookieAuth)
    app.add_middleware(SecurityHeaders)
