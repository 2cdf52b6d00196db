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
