"""websocket_handshake.switch_problem: which upstream 101 answers the proxy relays."""

from __future__ import annotations

import pytest
from mitmproxy import http

from aibridgeproxyd.websocket_handshake import accept_value, is_websocket_upgrade, switch_problem

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's example


def _upgrade(**headers: str) -> http.Request:
    fields = {
        "Host": "api.openai.com",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
        **{name.replace("_", "-"): value for name, value in headers.items()},
    }
    return http.Request.make("GET", "https://api.openai.com/v1/realtime", b"", fields)


def _switch(**headers: str) -> http.Response:
    fields = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Accept": accept_value(KEY),
        **{name.replace("_", "-"): value for name, value in headers.items()},
    }
    return http.Response.make(101, b"", fields)


def test_accept_value_is_the_rfc_example() -> None:
    assert accept_value(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(
    ("request_headers", "response_headers"),
    [
        pytest.param({}, {}, id="plain"),
        pytest.param({"Upgrade": "WebSocket"}, {"Upgrade": "WEBSOCKET"}, id="any-case"),
        pytest.param(
            {"Sec_WebSocket_Extensions": "permessage-deflate; client_max_window_bits"},
            {"Sec_WebSocket_Extensions": "permessage-deflate; client_max_window_bits=12"},
            id="deflate-with-parameters",
        ),
        pytest.param(
            {"Sec_WebSocket_Protocol": "realtime, openai-insecure-api-key.x"},
            {"Sec_WebSocket_Protocol": "realtime"},
            id="offered-subprotocol",
        ),
    ],
)
def test_a_handshake_a_websocket_client_accepts_is_relayed(
    request_headers: dict[str, str], response_headers: dict[str, str]
) -> None:
    assert switch_problem(_upgrade(**request_headers), _switch(**response_headers)) is None


@pytest.mark.parametrize(
    ("request_headers", "response_headers", "problem"),
    [
        ({"Upgrade": "h2c"}, {}, "not a WebSocket upgrade"),
        ({"Sec_WebSocket_Version": "8"}, {}, "not a WebSocket upgrade"),
        ({}, {"Upgrade": "websocket, h2c"}, "does not upgrade to websocket"),
        ({}, {"Sec_WebSocket_Accept": "d3Jvbmc="}, "Sec-WebSocket-Accept"),
        ({}, {"Sec_WebSocket_Extensions": "permessage-deflate"}, "did not offer"),
        (
            {"Sec_WebSocket_Extensions": "permessage-deflate"},
            {"Sec_WebSocket_Extensions": "permessage-deflate; server_max_window_bits=8"},
            "not valid",
        ),
        (
            {"Sec_WebSocket_Extensions": "permessage-deflate"},
            {"Sec_WebSocket_Extensions": "permessage-deflate; client_max_window_bits"},
            "not valid",
        ),
        (
            {"Sec_WebSocket_Extensions": "permessage-deflate, x-webkit-deflate-frame"},
            {"Sec_WebSocket_Extensions": "permessage-deflate, x-webkit-deflate-frame"},
            "other than one permessage-deflate",
        ),
        ({}, {"Sec_WebSocket_Protocol": "chat"}, "subprotocol"),
        (
            {"Sec_WebSocket_Protocol": "a, b"},
            {"Sec_WebSocket_Protocol": "a, b"},
            "subprotocol",
        ),
    ],
)
def test_a_handshake_a_websocket_client_fails_is_named(
    request_headers: dict[str, str], response_headers: dict[str, str], problem: str
) -> None:
    found = switch_problem(_upgrade(**request_headers), _switch(**response_headers))
    assert found is not None and problem in found


def test_a_request_with_a_body_is_no_upgrade() -> None:
    request = http.Request.make("POST", "https://api.openai.com/v1/chat/completions", b"{}")
    assert not is_websocket_upgrade(request)
    assert "not a WebSocket upgrade" in (switch_problem(request, _switch()) or "")
