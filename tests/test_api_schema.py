"""The OpenAPI document against the running daemon: ``schemathesis`` generates requests for
every operation of ``/api/v2/openapi.json`` (valid and invalid parameters and bodies, with an
admin token and without one) and checks that no answer is a 500 and that every answer, status
code, content type and body, is one the document describes (the contract's error shape for
400, 401, 403, 404 and the rest included).

Left out: ``positive_data_acceptance``, which expects every request the document allows to
succeed. A ``q`` filter or a cursor can be a well-formed string and still name an unknown key,
client or record: those are 400 in the documented error shape, which the checks above cover.

The store holds records with prompts, tool calls and thoughts, so the response bodies checked
are full ones. The run takes well under a minute (``MAX_EXAMPLES`` per operation).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import pytest

from aibridgeproxyd.model import ToolCall
from aibridgeproxyd.store import Store
from aibridgeproxyd.tokens import hash_token
from tests.harness import DaemonProcess
from tests.test_store import interception

MAX_EXAMPLES = 12
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "ignored_auth",
    "unsupported_method",
)
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with DaemonProcess() as d:
        yield d


@pytest.fixture(scope="module")
def admin_token(daemon: DaemonProcess) -> str:
    """An admin token, and records for the bodies to carry (two sessions, children, nulls)."""
    token = "abp_admin_" + secrets.token_urlsafe(24)
    records = [
        interception("r1", "2026-01-01T00:00:00.000Z", client_session_id="s1", cost_micros=5,
                     prompt="<script>alert(1)</script>", thoughts=("thinking",),
                     tool_calls=(ToolCall("call_1", "grep", '{"q": "x"}'), ToolCall(None, "ls", "{}"))),
        interception("r2", "2026-01-01T00:00:05.000Z", client_session_id="s1",
                     tool_result_ids=("call_1",), model=None, status=None, ttfb_ms=None,
                     input_tokens=None, error="upstream closed"),
        interception("r3", "2026-01-02T00:00:00.000Z", initiator="bob", client="Claude Code"),
    ]  # fmt: skip

    async def write() -> None:
        async with await Store.open(daemon.data_dir / "aibridgeproxyd.db") as store:
            await store.insert_admin_token("schema-admin", hash_token(token), "admin")
            await store.insert_interceptions(records)

    asyncio.run(write())
    return token


def test_every_operation_answers_as_the_openapi_document_says(
    daemon: DaemonProcess, admin_token: str, tmp_path: Path
) -> None:
    document = daemon.admin_get("/api/v2/openapi.json").json()
    junit = tmp_path / "junit.xml"
    command = [
        str(SCHEMATHESIS), "run", daemon.admin_url + "/api/v2/openapi.json",
        "--header", f"Authorization: Bearer {admin_token}",
        "--checks", ",".join(CHECKS),
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "20261129",
        "--workers", "2",
        "--request-timeout", "10",
        "--report", "junit", "--report-junit-path", str(junit),
        "--output-sanitize", "true",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-4000:]
    tested = {case.get("name") for case in ElementTree.parse(junit).iter("testcase")}
    operations = {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if path.startswith("/api/")
    }
    assert operations and operations <= tested, json.dumps(sorted(operations - tested))
