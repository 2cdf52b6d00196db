"""The OpenAPI document as the API answers: the contract's error shape, never FastAPI's 422,
and the token schemes on every ``/api/`` operation; the data API under both prefixes."""

from __future__ import annotations

from typing import Any, cast

from aibridgeproxyd.web.app import build_app
from aibridgeproxyd.web.context import AdminContext
from aibridgeproxyd.web.records import PREFIXES


def document() -> dict[str, Any]:
    # build_app only keeps the context for handlers; the document needs none of it.
    return build_app({}, cast(AdminContext, None)).openapi()


def operations(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(path, op) for path, item in doc["paths"].items() for op in item.values()]


def test_errors_are_documented_in_the_contracts_shape_and_never_as_422() -> None:
    doc = document()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert set(schemas["Problem"]["properties"]) == {"message", "detail", "validations"}
    for path, op in operations(doc):
        responses = op["responses"]
        assert "422" not in responses, path
        # 400 where there is input to be bad (parameters); a token is needed everywhere.
        for status in ("400", "401", "403") if op.get("parameters") else ("401", "403"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Problem"}, (path, status)
        assert op["security"] == [{"CoderSessionToken": []}, {"BearerToken": []}], path


def test_every_data_api_path_is_served_under_both_prefixes() -> None:
    paths = set(document()["paths"])
    for name in ("interceptions", "sessions", "sessions/{session_id}", "clients", "models"):
        assert {f"{prefix}/{name}" for prefix in PREFIXES} <= paths
    assert {f"{prefix}/usage" for prefix in PREFIXES} <= paths
    detail = document()["paths"]["/api/v2/aibridge/sessions/{session_id}"]["get"]
    assert "404" in detail["responses"]


def test_the_document_is_built_once_and_served_the_same() -> None:
    app = build_app({}, cast(AdminContext, None))
    assert app.openapi() is app.openapi()
