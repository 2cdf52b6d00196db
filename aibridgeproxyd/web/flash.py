"""One-shot messages of the dashboard ("Provider openai added", and a warning for each provider a
change left in status error), carried from a form's POST to the page it redirects to in a
short-lived cookie (``HttpOnly``, ``SameSite=Strict``, like the session's), never in a URL.

The cookie's value is base64url of the JSON ``{"notice": str, "warnings": [str]}``, at most
``MAX_BYTES``; the next rendered page shows it once and deletes it. A malformed cookie is
ignored. The text is escaped where it is shown, like any other."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi.responses import RedirectResponse, Response
from starlette.requests import Request

COOKIE_NAME = "aibridgeproxyd_flash"
MAX_BYTES = 3000  # of the encoded value: well under a browser's 4096 bytes per cookie
MAX_AGE_SECONDS = 60
EMPTY: dict[str, Any] = {"notice": "", "warnings": []}


def encoded(notice: str, warnings: list[str]) -> str:
    """The cookie value of ``notice`` and ``warnings``; warnings past ``MAX_BYTES`` are
    dropped and counted in a last one."""
    kept = list(warnings)
    while True:
        shown = kept + (
            [f"and {len(warnings) - len(kept)} more"] if len(kept) < len(warnings) else []
        )
        body = json.dumps({"notice": notice[:500], "warnings": shown}).encode()
        value = base64.urlsafe_b64encode(body).decode().rstrip("=")
        if len(value) <= MAX_BYTES or not kept:
            return value[:MAX_BYTES]
        kept.pop()


def decoded(value: str | None) -> dict[str, Any]:
    """``{notice, warnings}`` of a cookie value; ``EMPTY`` for none or a malformed one."""
    if not value or len(value) > MAX_BYTES:
        return EMPTY
    try:
        body = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (ValueError, binascii.Error):
        return EMPTY
    if not isinstance(body, dict):
        return EMPTY
    notice, warnings = body.get("notice"), body.get("warnings")
    if not isinstance(notice, str) or not isinstance(warnings, list):
        return EMPTY
    return {"notice": notice, "warnings": [str(warning) for warning in warnings]}


def redirect(request: Request, location: str, notice: str, warnings: list[str]) -> Response:
    """A 303 to ``location`` (a fixed path of ours) carrying the messages in the cookie."""
    response = RedirectResponse(location, status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        encoded(notice, warnings),
        max_age=MAX_AGE_SECONDS,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


def take(request: Request, response: Response) -> None:
    """Forget the request's messages once shown: ``response`` deletes the cookie."""
    if COOKIE_NAME in request.cookies:
        response.delete_cookie(
            COOKIE_NAME,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
