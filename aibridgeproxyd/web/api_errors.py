"""The management API's error bodies in the OpenAPI document. A refused management
operation (``ManagementError``: ``InvalidInput`` 400, ``NotFound`` 404, ``Conflict`` 409) is
answered by the application's ``RecordError`` handler in ``web.problems``."""

from __future__ import annotations

from typing import Any

from aibridgeproxyd.web.problems import Problem


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
