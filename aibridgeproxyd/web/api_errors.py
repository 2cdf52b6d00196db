"""The management API's errors: ``ManagementError`` (aibridgeproxyd.management) as the
contract's error answer, and the error bodies in the OpenAPI document.

``InvalidInput`` -> 400 with ``validations: [{field, detail}]`` naming the field; ``NotFound``
-> 404; ``Conflict`` -> 409 (a duplicate name). The message is the management error's own,
which never carries a key, a token or a secret setting.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from pydantic import BaseModel

from aibridgeproxyd.management import Conflict, ManagementError, NotFound
from aibridgeproxyd.web.problems import ApiError


class Validation(BaseModel):
    """One field at fault: ``field`` as in the request (``api_keys[1].id``), ``detail`` why."""

    field: str
    detail: str


class Problem(BaseModel):
    """Every error answer of the API (CONTRACT section 12, Errors)."""

    message: str
    detail: str = ""
    validations: list[Validation] = []


def api_error(exc: ManagementError) -> ApiError:
    """The HTTP answer to a refused management operation."""
    message = str(exc)
    if isinstance(exc, NotFound):
        return ApiError(404, message)
    status = 409 if isinstance(exc, Conflict) else 400
    return ApiError(status, message, validations=[(exc.field or "body", message)])


async def managed[T](operation: Awaitable[T]) -> T:
    """Await a management operation; its ``ManagementError`` becomes the matching ``ApiError``."""
    try:
        return await operation
    except ManagementError as exc:
        raise api_error(exc) from None


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses, each a ``Problem``."""
    meaning = {
        400: "bad input; `validations` names each field at fault",
        401: "no token, or an unknown or malformed one",
        403: "the token's role may not do this",
        404: "no such name",
        409: "the name exists already",
    }
    return {status: {"model": Problem, "description": meaning[status]} for status in statuses}
