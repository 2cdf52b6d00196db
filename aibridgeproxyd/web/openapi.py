"""The OpenAPI document (``/api/v2/openapi.json``) as the API really answers.

FastAPI documents a 422 with its own error shape for every operation with parameters; this
application answers bad input with 400 and the contract's shape (``problems``). So every 422 is
replaced by a 400 of ``Problem``, every ``/api/`` operation documents 401 and 403 (each needs a
token: ``auth``) and the two ways of sending one, and an operation taking a body documents 413
(``body_limit``). Routes add their own other errors (404, 409) with ``responses=``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from aibridgeproxyd.web.problems import Problem

API_PREFIX = "/api/"
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
ERRORS = {
    "400": "Bad input: `validations` names each field at fault",
    "401": "No token, or an unknown one",
    "403": "The token's role may not do this",
}
BODY_TOO_LARGE = "Request body over 1 MiB"
SECURITY_SCHEMES = {
    "CoderSessionToken": {"type": "apiKey", "in": "header", "name": "Coder-Session-Token"},
    "BearerToken": {"type": "http", "scheme": "bearer"},
}
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def install(app: FastAPI) -> None:
    """Serve ``app``'s document with the errors and security it really has."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_errors(build())  # build() caches the document in app.openapi_schema
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def document_errors(schema: dict[str, Any]) -> None:
    """Rewrite ``schema`` (an OpenAPI document FastAPI built) in place, as described above."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(problem.pop("$defs", {}))
    schemas["Problem"] = problem
    components["securitySchemes"] = SECURITY_SCHEMES
    for path, item in schema.get("paths", {}).items():
        for method in _METHODS:
            if method in item:
                _document_operation(item[method], path.startswith(API_PREFIX))


def _document_operation(operation: dict[str, Any], authenticated: bool) -> None:
    responses = operation.setdefault("responses", {})
    validated = responses.pop("422", None) is not None  # it has parameters or a body
    statuses = {"400": ERRORS["400"]} if validated else {}
    if authenticated:
        statuses |= {"401": ERRORS["401"], "403": ERRORS["403"]}
    if "requestBody" in operation:
        statuses["413"] = BODY_TOO_LARGE
    for status, description in statuses.items():
        responses.setdefault(status, _problem(description))
    if authenticated:
        operation["security"] = [{name: []} for name in SECURITY_SCHEMES]


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": PROBLEM_REF}}}
