"""The addon chain's order (``aibridgeproxyd.chain``): what each addon needs from the ones before
it, checked on the chain the daemon builds and against the comments ``build_chain`` carries, and
a few of those needs shown through the real chain with mitmproxy's hook dispatch."""

from __future__ import annotations

import ast
import inspect
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aibridgeproxyd.addons.classify import Classify
from aibridgeproxyd.addons.client_limits import ClientLimits
from aibridgeproxyd.addons.destinations import DestinationGuard
from aibridgeproxyd.addons.error_answers import UpstreamErrorAnswers
from aibridgeproxyd.addons.in_flight import InFlight
from aibridgeproxyd.addons.intercept import Intercept
from aibridgeproxyd.addons.interceptions import RecordInterceptions
from aibridgeproxyd.addons.listener_tls import ListenerTls
from aibridgeproxyd.addons.metrics import RequestMetrics
from aibridgeproxyd.addons.policy_enforcement import EnforcePolicies
from aibridgeproxyd.addons.policy_spend import CountPolicySpend
from aibridgeproxyd.addons.proxy_auth import ProxyAuth
from aibridgeproxyd.addons.route import RouteRequests
from aibridgeproxyd.addons.streaming import StreamResponses
from aibridgeproxyd.addons.tracing import TraceRequests
from aibridgeproxyd.addons.upstream_proxy import ChainUpstreamProxy
from aibridgeproxyd.addons.websocket import ForgetWebSocketMessages
from mitmproxy import http
from mitmproxy.addons import next_layer, tlsconfig
from mitmproxy.proxy.layers.http import (
    HttpRequestHeadersHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpResponseHook,
)
from mitmproxy.proxy.layers.websocket import WebsocketEndHook
from mitmproxy.test import taddons, tflow

from aibridgeproxyd import chain as chain_module
from aibridgeproxyd.auth_failures import AuthFailureTracker
from aibridgeproxyd.chain import build_chain
from aibridgeproxyd.config import Config, load_config
from aibridgeproxyd.failclosed import guard_chain
from aibridgeproxyd.interception.state import ConnectInfo, ConnectionTable, request_context
from aibridgeproxyd.interception.writer import InterceptionWriter
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.master import Running, builtin_addons
from aibridgeproxyd.model import InterceptionRecord, ProviderRecord, TokenRecord
from aibridgeproxyd.providers import evaluate_providers
from aibridgeproxyd.reload import SnapshotHolder
from aibridgeproxyd.snapshot import build_snapshot
from aibridgeproxyd.token_refresh import TokenRefresher
from aibridgeproxyd.tokens import hash_token
from aibridgeproxyd.tracing import build_tracing

# (earlier, later, what the later one needs from the earlier one). The one list of the needs:
# build_chain's comments name each pair (see test_the_comments_in_build_chain_name_each_need).
NEEDS: list[tuple[type, type, str]] = [
    (next_layer.NextLayer, Intercept, "Intercept overrides the layer NextLayer chose"),
    (tlsconfig.TlsConfig, ListenerTls, "ListenerTls replaces the TLS TlsConfig prepared"),
    (tlsconfig.TlsConfig, ChainUpstreamProxy, "the chain replaces TLS to the corporate proxy"),
    (InFlight, Classify, "a flow counts for the drain before any check runs"),
    (InFlight, ProxyAuth, "a flow counts while proxy auth awaits a token re-read"),
    (InFlight, DestinationGuard, "a flow counts while the guard awaits DNS"),
    (Classify, ProxyAuth, "Classify creates the ConnectInfo ProxyAuth reads"),
    (Classify, Intercept, "Intercept answers the CONNECTs Classify marked MITM"),
    (ProxyAuth, Intercept, "an unauthenticated MITM CONNECT gets 407, not Intercept's 200"),
    (Intercept, RouteRequests, "HTTP/2 becomes HTTP/1.1 before the adapter rewrites the host"),
    (RouteRequests, ChainUpstreamProxy, "the rewritten destination is the one chained"),
    (Intercept, ChainUpstreamProxy, "the chain leaves the MITM'd HTTP layer alone"),
    (Intercept, ClientLimits, "ClientLimits leaves Intercept's bounded layers in place"),
    (ChainUpstreamProxy, ClientLimits, "ClientLimits leaves the chain's layer in place"),
    (ProxyAuth, DestinationGuard, "a plain-HTTP request gets its 407 before a 403 or 400"),
    (RouteRequests, DestinationGuard, "the guard checks the rewritten destination"),
    (ChainUpstreamProxy, DestinationGuard, "the guard reads the server_conn.via it set"),
    (RouteRequests, RequestMetrics, "metrics count routed requests: the route's context"),
    (RouteRequests, StreamResponses, "streaming starts the transform the rewrite set"),
    (RouteRequests, UpstreamErrorAnswers, "an answer failover discards is left alone"),
    (StreamResponses, UpstreamErrorAnswers, "streamed and buffered errors differ"),
    (RouteRequests, RecordInterceptions, "the record is the route's context"),
    (StreamResponses, RecordInterceptions, "the usage tap wraps the stream setting"),
    (UpstreamErrorAnswers, RecordInterceptions, "the record logs the converted error"),
    (RecordInterceptions, TraceRequests, "spans carry what the record filled in"),
    (EnforcePolicies, RouteRequests, "a request a policy refuses is never routed"),
    (RecordInterceptions, CountPolicySpend, "spend counts the usage the record finished"),
    (RouteRequests, TraceRequests, "spans are the route's context"),
    (StreamResponses, TraceRequests, "the first-chunk timer wraps the stream setting"),
]


def _config(tmp_path: Path, **keys: str) -> Config:
    flags = {"data_dir": str(tmp_path / "data"), "certs_dir": str(tmp_path / "certs"), **keys}
    return load_config(flags=flags, environ={})


def _holder() -> SnapshotHolder:
    holder = SnapshotHolder()
    providers = evaluate_providers([ProviderRecord("openai", "openai", keys=("sk-central",))])
    holder.current = build_snapshot(providers, [TokenRecord("alice", hash_token("tok"))])
    holder.loaded = True
    return holder


class _Writer(InterceptionWriter):
    """The real writer, minus the database: keeps what it is given."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        super().__init__(config.database_path, metrics, config.retention)
        self.records: list[InterceptionRecord] = []

    def submit(self, record: InterceptionRecord) -> bool:
        self.records.append(record)
        return True


class Parts:
    """The objects the daemon hands to ``build_chain``, built the same way."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.holder = _holder()
        self.connections = ConnectionTable()
        self.metrics = Metrics()
        self.writer = _Writer(config, self.metrics)
        self.in_flight = InFlight()

        async def no_tokens() -> dict[str, str]:
            return {}

        self.kwargs: dict[str, Any] = {
            "holder": self.holder,
            "connections": self.connections,
            "metrics": self.metrics,
            "tracing": build_tracing(config),
            "interceptions": self.writer,
            "token_refresher": TokenRefresher(no_tokens),
            "auth_failures": AuthFailureTracker(
                config.auth_failure_limit,
                config.auth_failure_window,
                config.auth_failure_cooldown,
                config.auth_failure_log_interval,
            ),
            "in_flight": self.in_flight,
            "running": Running(),
        }

    def chain(self, **optional: Any) -> list[object]:
        return build_chain(self.config, **self.kwargs, **optional)

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"coder_aibridgeproxyd_{name}", labels)
        return value or 0.0


@pytest.fixture
def full_chain(tmp_path: Path) -> list[object]:
    """Every optional addon included: listener TLS and an upstream proxy."""
    ca = trustme.CA()
    cert = ca.issue_cert("proxy.test")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    config = _config(tmp_path, upstream_proxy="http://127.0.0.1:3128")
    parts = Parts(config)
    assert config.upstream_proxy is not None
    upstream_proxy = ChainUpstreamProxy(
        config.upstream_proxy, config.upstream_no_proxy, parts.connections
    )
    return parts.chain(listener_tls=ListenerTls(cert_file, key_file), upstream_proxy=upstream_proxy)


def _position(chain: list[object], kind: type) -> int:
    (index,) = [i for i, addon in enumerate(chain) if type(addon) is kind]
    return index


@pytest.mark.parametrize(("earlier", "later", "need"), NEEDS, ids=[n[2] for n in NEEDS])
def test_each_addon_comes_after_what_it_needs(
    full_chain: list[object], earlier: type, later: type, need: str
) -> None:
    assert _position(full_chain, earlier) < _position(full_chain, later), need


def _comments_by_addon(full_chain: list[object]) -> dict[type, str]:
    """The comment above each entry of ``build_chain``'s list, by the class of the addon(s) the
    entry puts in ``full_chain`` (every optional entry included)."""
    source = inspect.getsource(chain_module)
    lines = source.splitlines()
    (function,) = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and node.name == "build_chain"
    ]
    (returned,) = [node.value for node in ast.walk(function) if isinstance(node, ast.Return)]
    assert isinstance(returned, ast.List)
    comments: dict[type, str] = {}
    addons = iter(full_chain)
    for entry in returned.elts:
        above = []
        for line in reversed(lines[: entry.lineno - 1]):
            if not line.strip().startswith("#"):
                break
            above.insert(0, line.strip().lstrip("#").strip())
        builtins = (
            isinstance(entry, ast.Starred)
            and isinstance(entry.value, ast.Call)
            and ast.unparse(entry.value.func) == "builtin_addons"
        )
        for _ in range(len(builtin_addons()) if builtins else 1):
            comments[type(next(addons))] = " ".join(above)
    assert next(addons, None) is None
    return comments


def _names(text: str, addon: type) -> bool:
    return re.search(rf"\b{addon.__name__}\b", text) is not None


def test_the_comments_in_build_chain_name_each_need(full_chain: list[object]) -> None:
    """Each need is named, by class, in the comment of one of its two addons, and a comment
    names no addon it has no need with: the comments and NEEDS cannot drift apart."""
    comments = _comments_by_addon(full_chain)
    pairs = {frozenset((earlier, later)) for earlier, later, _ in NEEDS}
    for earlier, later, need in NEEDS:
        assert _names(comments[later], earlier) or _names(comments[earlier], later), need
    for addon, comment in comments.items():
        for other in comments.keys() - {addon}:
            if _names(comment, other):
                assert frozenset((addon, other)) in pairs, (
                    f"the comment on {addon.__name__} names {other.__name__}: add the need to NEEDS"
                )


def test_mitmproxy_builtins_come_before_every_addon_of_ours(full_chain: list[object]) -> None:
    origins = [type(addon).__module__.startswith("mitmproxy.") for addon in full_chain]
    assert origins == sorted(origins, reverse=True)
    assert origins.count(True) == 6


def test_websocket_messages_are_forgotten_last(full_chain: list[object]) -> None:
    assert type(full_chain[-1]) is ForgetWebSocketMessages


async def test_the_fail_closed_guard_keeps_the_chain_order(full_chain: list[object]) -> None:
    with taddons.context(loadcore=False) as context:
        context.master.addons.add(*full_chain)
        guard_chain(context.master)
        installed = [getattr(a, "_addon", a) for a in context.master.addons.chain]
    assert [type(a) for a in installed] == [type(a) for a in full_chain]
    assert all(a is b for a, b in zip(installed, full_chain, strict=True))


def test_optional_addons_are_left_out_when_not_configured(tmp_path: Path) -> None:
    kinds = {type(addon) for addon in Parts(_config(tmp_path)).chain()}
    assert ListenerTls not in kinds and ChainUpstreamProxy not in kinds
    assert {Classify, RouteRequests, RecordInterceptions} <= kinds


# --- the needs at work: hooks dispatched through the real chain, fail-closed guard included ---


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    return Parts(_config(tmp_path, auth="none"))


@pytest.fixture
def master(parts: Parts) -> Iterator[Any]:
    # mitmproxy's built-ins handle connections and TLS, not these flow hooks: left out.
    ours = [a for a in parts.chain() if not type(a).__module__.startswith("mitmproxy.")]
    with taddons.context() as context:
        context.master.addons.add(*ours)
        guard_chain(context.master, parts.metrics.hook_failures)
        yield context.master


def _mitm_flow(parts: Parts) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method, flow.request.path = "POST", "/v1/chat/completions"
    flow.request.host, flow.request.port = "api.openai.com", 443
    flow.request.content = b'{"model":"gpt-4o","stream":true}'
    info = ConnectInfo(host="api.openai.com", port=443, intercept=True, provider_name="openai")
    info.provider_type, info.identity = "openai", "alice"
    parts.connections.add(flow.client_conn, info)
    return flow


async def _send(master: Any, flow: http.HTTPFlow) -> None:
    """The request hooks, as mitmproxy runs them before dialling the upstream."""
    await master.addons.handle_lifecycle(HttpRequestHeadersHook(flow))
    await master.addons.handle_lifecycle(HttpRequestHook(flow))


def _upstream_answer(status: int, content_type: str) -> http.Response:
    # timestamp_end None: the upstream's headers have arrived, its body not yet.
    headers = http.Headers(content_type=content_type)
    return http.Response(b"HTTP/1.1", status, b"", headers, None, None, time.time(), None)


async def test_a_streamed_answer_keeps_the_stream_that_streaming_set_and_gets_the_usage_tap(
    master: Any, parts: Parts
) -> None:
    flow = _mitm_flow(parts)
    await _send(master, flow)
    flow.response = _upstream_answer(200, "text/event-stream")
    await master.addons.handle_lifecycle(HttpResponseHeadersHook(flow))
    ctx = request_context(flow)
    assert ctx is not None and ctx.recording.usage_tap is not None
    # StreamResponses' True stays: the tap is no transform, the stream layer feeds it each
    # chunk once sent (recording.chunk_tap).
    assert flow.response.stream is True
    assert ctx.recording.chunk_tap is not None
    ctx.recording.chunk_tap(b'data: {"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n')
    await master.addons.handle_lifecycle(HttpResponseHook(flow))
    (record,) = parts.writer.records
    assert (record.input_tokens, record.output_tokens, record.streamed) == (3, 4, True)


async def test_a_response_the_route_replaces_is_the_one_counted_and_recorded(
    master: Any, parts: Parts
) -> None:
    flow = _mitm_flow(parts)
    await _send(master, flow)
    # The only central key is rejected: the route answers 502 all_keys_rejected instead.
    flow.response = _upstream_answer(401, "application/json")
    await master.addons.handle_lifecycle(HttpResponseHeadersHook(flow))
    flow.response.content = b'{"error":"bad key"}'
    await master.addons.handle_lifecycle(HttpResponseHook(flow))
    assert flow.response.status_code == 502
    assert parts.metric("mitm_responses_total", code="502", provider="openai") == 1
    assert parts.metric("mitm_responses_total", code="401", provider="openai") == 0
    (record,) = parts.writer.records
    assert (record.status, record.error) == (502, "all_keys_rejected")


async def test_a_websocket_session_is_in_flight_for_the_drain_and_the_gauge_until_it_closes(
    master: Any, parts: Parts
) -> None:
    flow = tflow.twebsocketflow()
    info = ConnectInfo(host="api.openai.com", port=443, intercept=True, provider_name="openai")
    info.provider_type = "openai"
    parts.connections.add(flow.client_conn, info)
    flow.request.host, flow.request.path = "api.openai.com", "/v1/responses"
    await _send(master, flow)
    await master.addons.handle_lifecycle(HttpResponseHook(flow))  # the 101 upgrade
    assert parts.in_flight.count == 1
    assert parts.metric("inflight_mitm_requests", provider="openai") == 1
    await master.addons.handle_lifecycle(WebsocketEndHook(flow))
    assert parts.in_flight.count == 0
    assert parts.metric("inflight_mitm_requests", provider="openai") == 0
