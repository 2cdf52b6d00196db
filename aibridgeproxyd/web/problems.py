"""API errors in the contract's shape (CONTRACT section 12):
``{"message": str, "detail": str, "validations": [{"field": str, "detail": str}]}`` with 400
(bad input, naming the field), 401, 403, 404, 405, 409, 413 and, never on purpose, 500.

Raise ``ApiError`` in a handler; ``install`` turns it, FastAPI's request validation errors and
Starlette's HTTP errors into that shape, and any other exception into a 500 that logs the
traceback but answers nothing of it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from aibridgeproxyd.errors import reason_phrase
from aibridgeproxyd.sealing import SealingError
from aibridgeproxyd.store import (
    DuplicateRecord,
    MissingRecord,
    RecordError,
    StoreError,
    StoreUnavailable,
)
from aibridgeproxyd.web.patterns import MEANINGS

log = logging.getLogger("aibridgeproxyd.admin")


class Validation(BaseModel):
    """A field at fault: its name (``limit``, ``q``, ``api_keys[0].api_key``) and why."""

    field: str
    detail: str


class Problem(BaseModel):
    """The error body of every API failure (documented in the OpenAPI document for every
    status the API answers with besides success)."""

    message: str
    detail: str
    validations: list[Validation] = []


class ApiError(Exception):
    """An error answered as JSON: ``status`` (HTTP), a one-line ``message``, an optional
    ``detail`` and the fields at fault as ``(field, detail)`` pairs."""

    def __init__(
        self,
        status: int,
        message: str,
        detail: str = "",
        validations: Sequence[tuple[str, str]] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail
        self.validations = tuple(validations)
        self.headers = headers


def error_response(error: ApiError) -> JSONResponse:
    """The JSON response of ``error``."""
    body: dict[str, Any] = {
        "message": _json_text(error.message),
        "detail": _json_text(error.detail),
        "validations": [
            {"field": _json_text(f), "detail": _json_text(d)} for f, d in error.validations
        ],
    }
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _json_text(text: str) -> str:
    # An error may name what the caller sent, and that may hold a lone surrogate (a JSON
    # "\ud800" escape), which no JSON answer can encode: it is answered escaped.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _field_name(location: Sequence[Any]) -> str:
    # ("body", "api_keys", 0, "api_key") -> "api_keys[0].api_key"; ("query", "limit") -> "limit"
    parts = [str(part) for part in location[1:]] or [str(part) for part in location]
    name = ""
    for part in parts:
        name += f"[{part}]" if part.isdigit() else (f".{part}" if name else part)
    return name


def _validation(error: Mapping[str, Any]) -> tuple[str, str]:
    """One pydantic error as ``(field, detail)``; a body that is not JSON names ``body``."""
    location = error.get("loc", ())
    if error.get("type") == "model_attributes_type" and tuple(location) == ("body",):
        # Also what a body sent without Content-Type: application/json (curl -d) gets.
        return "body", "the body must be a JSON object sent with Content-Type: application/json"
    if error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "invalid JSON")
        where = location[1] if len(location) > 1 else "?"
        return "body", f"the body is not valid JSON: {reason} at character {where}"
    if error.get("type") == "string_pattern_mismatch":
        # The pattern in words (web.patterns), never the value: it may be a key.
        pattern = (error.get("ctx") or {}).get("pattern")
        if meaning := MEANINGS.get(str(pattern)):
            return _field_name(location), meaning
    return _field_name(location), str(error.get("msg", ""))


async def _on_api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    validations = [_validation(error) for error in exc.errors()]
    fields = ", ".join(field for field, _ in validations) or "the request"
    return error_response(ApiError(400, f"invalid {fields}", validations=validations))


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler: a Starlette HTTP error (404, 405, ...) in the contract's shape."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else None
    allowed = _documented_methods(request) if exc.status_code == 405 else None
    if allowed:
        headers = {**(headers or {}), "Allow": allowed}
    message = exc.detail if isinstance(exc.detail, str) else reason_phrase(exc.status_code)
    return error_response(ApiError(exc.status_code, message, headers=headers))


def _documented_methods(request: Request) -> str | None:
    """The methods the OpenAPI document gives the request's path, or None for a path it does
    not describe; a concrete path wins over a template it also matches (OpenAPI 3.1, Paths
    Object: ``/providers/reload`` before ``/providers/{name}``). Starlette's 405 names only
    the methods of the first route matching the path, and FastAPI makes one route per method,
    whereas ``Allow`` lists every method of the resource (RFC 9110 section 10.2.1)."""
    matches: dict[int, set[str]] = {}
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, request.url.path):
            methods = matches.setdefault(template.count("{"), set())
            methods.update(method.upper() for method in operations)
    return ", ".join(sorted(matches[min(matches)])) if matches else None


async def _on_record_error(_request: Request, exc: Exception) -> JSONResponse:
    # Refused input, from the store or a management operation (whose NotFound and Conflict are
    # MissingRecord and DuplicateRecord): 404 for a missing name, 409 for a duplicate, else
    # 400 naming the field (the body as a whole when no single field is at fault).
    assert isinstance(exc, RecordError)
    if isinstance(exc, MissingRecord):
        return error_response(ApiError(404, str(exc)))
    status = 409 if isinstance(exc, DuplicateRecord) else 400
    return error_response(ApiError(status, str(exc), validations=[(exc.field or "body", str(exc))]))


async def _on_store_unusable(request: Request, exc: Exception) -> JSONResponse:
    # The database cannot be read as it is (a value sealed with a key this daemon does not
    # have, a database replaced under it): the store's message names the cause, never a secret.
    # Where the database is (a path, a host and user) stays in the log: callers may not even be
    # authenticated yet (the token lookup itself needs the database).
    log.warning("admin request refused: the store cannot be read: %s", exc)
    if isinstance(exc, StoreUnavailable):
        detail = "the database cannot be reached right now; try again later"
    else:
        detail = str(exc)
        store = getattr(getattr(request.app.state, "context", None), "store", None)
        for name in (getattr(store, "name", None), str(getattr(store, "path", ""))):
            if name:
                detail = detail.replace(name, "the database")
    return error_response(ApiError(503, "the store cannot be read", detail=detail))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("admin request failed: %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ApiError(500, "internal error; see the daemon's log"))


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` in the contract's shape."""
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(SealingError, _on_store_unusable)
    app.add_exception_handler(StoreError, _on_store_unusable)
    app.add_exception_handler(RecordError, _on_record_error)
    app.add_exception_handler(Exception, _on_unexpected)
