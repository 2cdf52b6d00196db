"""The route addon driven through mitmproxy's test flows: its hooks create the request's
context, answer the proxy's refusals in the client format, inject the key, and fail over."""

from __future__ import annotations

import json
from typing import Any

from aibridgeproxyd.addons.route import RouteRequests
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from aibridgeproxyd.credentials import CredentialMode
from aibridgeproxyd.errors import REQUEST_ID_HEADER
from aibridgeproxyd.interception.state import ConnectInfo, ConnectionTable, request_context
from aibridgeproxyd.keypool import KeyPool
from aibridgeproxyd.mitm.http_layer import CLOSE_CLIENT, RESEND
from aibridgeproxyd.model import ProviderRecord
from aibridgeproxyd.providers import evaluate_providers
from aibridgeproxyd.reload import SnapshotHolder
from aibridgeproxyd.snapshot import build_snapshot

TOKEN = "proxy-token-0123456789"
KEYS = ("sk-central-one", "sk-central-two")
CHAT = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Route:
    """One RouteRequests for one openai provider, and flows on a MITM'd tunnel to it."""

    def __init__(self, **provider: Any) -> None:
        self.holder = SnapshotHolder()
        self.provide(**provider)
        self.connections = ConnectionTable()
        self.pool = KeyPool(Clock())
        self.addon = RouteRequests(self.holder, self.connections, "aibridgeproxyd", self.pool)

    def provide(self, **provider: Any) -> None:
        records = [ProviderRecord(name="openai", type="openai", **provider)] if provider else []
        self.holder.current = build_snapshot(evaluate_providers(records), [])

    def flow(self, path: str = "/v1/chat/completions", **headers: str) -> http.HTTPFlow:
        flow = tflow.tflow()
        request = flow.request
        request.method, request.host, request.port, request.path = (
            "POST",
            "api.openai.com",
            443,
            path,
        )
        request.headers.update(headers)
        request.content = CHAT
        info = ConnectInfo("api.openai.com", 443, intercept=True, identity="alice")
        info.provider_name, info.provider_type, info.proxy_token = "openai", "openai", TOKEN
        self.connections.add(flow.client_conn, info)
        return flow

    def send(self, flow: http.HTTPFlow) -> None:
        """The request hooks, as mitmproxy fires them."""
        self.addon.requestheaders(flow)
        self.addon.request(flow)

    def answer(self, flow: http.HTTPFlow, status: int, **headers: str) -> None:
        """The upstream's answer, through the response hooks (unless the request is re-sent)."""
        flow.response = http.Response.make(status, b'{"error": {"message": "upstream"}}', headers)
        self.addon.responseheaders(flow)
        if not flow.metadata.get(RESEND):
            self.addon.response(flow)


def error(flow: http.HTTPFlow) -> tuple[int, str]:
    assert flow.response is not None
    return flow.response.status_code, json.loads(flow.response.content or b"")["error"]["code"]


def test_a_central_request_gets_the_first_key_and_a_request_id() -> None:
    route = Route(keys=KEYS)
    flow = route.flow(authorization=f"Bearer {TOKEN}")
    with taddons.context(route.addon):
        route.send(flow)
        assert (
            flow.response is None and flow.request.headers["authorization"] == f"Bearer {KEYS[0]}"
        )
        route.answer(flow, 200)
    ctx = request_context(flow)
    assert ctx is not None and ctx.routing.credential_mode is CredentialMode.CENTRAL
    assert flow.response is not None
    assert flow.response.headers[REQUEST_ID_HEADER] == ctx.request_id


def test_a_tunnel_that_is_not_intercepted_is_left_alone() -> None:
    route = Route(keys=KEYS)
    flow = route.flow()
    route.connections.add(flow.client_conn, ConnectInfo("example.com", 443))
    with taddons.context(route.addon):
        route.send(flow)
    assert request_context(flow) is None and flow.response is None


def test_a_tunnel_whose_provider_is_gone_is_answered_503_and_closed() -> None:
    route = Route(keys=KEYS)
    flow = route.flow()
    route.provide()  # the provider was disabled after the CONNECT
    with taddons.context(route.addon):
        route.send(flow)
    assert error(flow) == (503, "provider_unavailable")
    assert flow.metadata[CLOSE_CLIENT] and request_context(flow) is None


def test_a_dot_segment_path_is_refused_before_any_key_is_injected() -> None:
    route = Route(keys=KEYS)
    flow = route.flow("/v1/../admin")
    with taddons.context(route.addon):
        route.send(flow)
    assert error(flow) == (400, "invalid_path")
    ctx = request_context(flow)
    assert (
        ctx is not None
        and ctx.proxy_answer_code == "invalid_path"
        and ctx.routing.key_index is None
    )
    assert "authorization" not in flow.request.headers


def test_byok_refused_is_answered_in_the_client_format_with_no_retry() -> None:
    route = Route(keys=KEYS, allow_byok=False)
    flow = route.flow(authorization="Bearer sk-users-own")
    with taddons.context(route.addon):
        route.send(flow)
    assert error(flow) == (403, "byok_not_allowed")
    assert flow.response is not None and flow.response.headers["x-should-retry"] == "false"


def test_a_rejected_key_fails_over_to_the_next_then_the_answer_passes() -> None:
    route = Route(keys=KEYS)
    flow = route.flow()
    with taddons.context(route.addon):
        route.send(flow)
        route.answer(flow, 401)
        assert (
            flow.metadata[RESEND] and flow.request.headers["authorization"] == f"Bearer {KEYS[1]}"
        )
        del flow.metadata[RESEND]  # the HTTP layer re-sends the request
        route.answer(flow, 200)
    assert flow.response is not None and flow.response.status_code == 200
    ctx = request_context(flow)
    assert ctx is not None and ctx.routing.tried_keys == {0, 1} and ctx.proxy_answer_code is None


def test_every_key_rejected_replaces_the_last_answer_with_502() -> None:
    route = Route(keys=KEYS)
    flow = route.flow()
    with taddons.context(route.addon):
        route.send(flow)
        route.answer(flow, 401)
        del flow.metadata[RESEND]
        route.answer(flow, 401)
    assert error(flow) == (502, "all_keys_rejected")
    ctx = request_context(flow)
    assert ctx is not None and ctx.proxy_answer_code == "all_keys_rejected"
    assert flow.response is not None
    assert flow.response.headers[REQUEST_ID_HEADER] == ctx.request_id


def test_every_key_rate_limited_answers_429_with_retry_after() -> None:
    route = Route(keys=KEYS)
    flow = route.flow()
    with taddons.context(route.addon):
        route.send(flow)
        route.answer(flow, 429, **{"retry-after": "12"})
        del flow.metadata[RESEND]
        route.answer(flow, 401)
    assert error(flow) == (429, "all_keys_rate_limited")
    assert flow.response is not None and flow.response.headers["retry-after"] == "12"
    # The next request finds both keys cooling down and is refused before going upstream.
    second = route.flow()
    with taddons.context(route.addon):
        route.send(second)
    assert error(second) == (429, "all_keys_rate_limited")


def test_a_byok_answer_of_401_is_the_clients_and_is_not_failed_over() -> None:
    route = Route(keys=KEYS, allow_byok=True)
    flow = route.flow(authorization="Bearer sk-users-own")
    with taddons.context(route.addon):
        route.send(flow)
        route.answer(flow, 401)
    assert RESEND not in flow.metadata
    assert flow.response is not None and flow.response.status_code == 401
