"""The destination refusals the classifier and the destination guard share, and the response
builders behind them (``aibridgeproxyd.mitm.responses``)."""

from __future__ import annotations

import json
import logging

import pytest
from mitmproxy.test import tflow

from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.responses import (
    provider_misconfigured,
    refuse_misconfigured,
    refuse_port,
    use_connect,
)
from tests.unit.test_classify_addon import blocked


def test_a_misconfigured_row_refusal_is_logged_counted_and_names_no_provider(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    with caplog.at_level(logging.INFO, "aibridgeproxyd.destinations"):
        response = refuse_misconfigured("broken.example", "broken-row", "c1", metrics)
    assert response.status_code == 503
    assert (
        response.content
        == b"Service Unavailable: provider misconfigured; ask an operator to fix it"
    )
    assert b"broken-row" not in (response.content or b"")
    assert [r.provider for r in caplog.records] == ["broken-row"]  # type: ignore[attr-defined]
    assert blocked(metrics, "provider_misconfigured") == 1


def test_the_misconfigured_answer_is_plain_text() -> None:
    assert provider_misconfigured().headers["content-type"] == "text/plain"


def test_use_connect_answers_in_the_provider_format_and_names_the_host() -> None:
    flow = tflow.tflow()
    flow.request.host = "api.openai.com"
    response = use_connect(flow.request, "openai")
    assert response.status_code == 400
    error = json.loads(response.content or b"")["error"]
    assert error["code"] == "use_connect" and "https://api.openai.com/" in error["message"]


def test_a_port_refusal_reads_the_same_from_either_addon(caplog: pytest.LogCaptureFixture) -> None:
    """The CONNECT (with its connect_id) and the plain-HTTP request: one 403, one count each."""
    metrics = Metrics()
    logger = logging.getLogger("test.ports")
    with caplog.at_level(logging.INFO, "test.ports"):
        connect = refuse_port(logger, "CONNECT", "example.com", 22, metrics, "c1")
        plain = refuse_port(logger, "request", "example.com", 25, metrics)
    for response in (connect, plain):
        assert (response.status_code, response.content) == (403, b"Forbidden: port not allowed")
    assert [r.getMessage() for r in caplog.records] == [
        "CONNECT refused: port not allowed",
        "request refused: port not allowed",
    ]
    assert caplog.records[0].connect_id == "c1"  # type: ignore[attr-defined]
    assert not hasattr(caplog.records[1], "connect_id")
    assert blocked(metrics, "port_not_allowed") == 2
