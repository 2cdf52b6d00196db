"""Errors the proxy itself returns on MITM'd requests, in the client format's own JSON shape
(section 6.6), so SDKs surface a useful message."""

from __future__ import annotations

import json
from http import HTTPStatus

from aibridgeproxyd.model import ApiFormat

# Anthropic's documented error types by status; OpenAI-format errors reuse them as `type`.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}


def error_body(api_format: ApiFormat, status: int, message: str, code: str) -> bytes:
    """The JSON body for an error the proxy originates. ``code`` is a stable machine-readable
    reason such as ``byok_not_allowed`` or ``upstream_unreachable``."""
    if api_format is ApiFormat.ANTHROPIC:
        payload: dict[str, object] = {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
        }
    elif api_format is ApiFormat.GEMINI:
        payload = {
            "error": {
                "code": status,
                "message": message,
                "status": _gemini_status(status),
            }
        }
    else:
        payload = {
            "error": {
                "message": message,
                "type": _ANTHROPIC_TYPES.get(status, "api_error"),
                "code": code,
            }
        }
    return json.dumps(payload).encode()


def _gemini_status(status: int) -> str:
    return {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }.get(status, "INTERNAL")


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
