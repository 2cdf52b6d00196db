"""The fail-closed guard (aibridgeproxyd.failclosed): each real addon of ours, with one of its
dependencies raising, refuses what its hook was deciding; a tap that raises only logs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aibridgeproxyd.addons.classify import Classify
from aibridgeproxyd.addons.destinations import UNRESOLVED, DestinationGuard
from aibridgeproxyd.addons.in_flight import InFlight
from aibridgeproxyd.addons.intercept import Intercept
from aibridgeproxyd.addons.metrics import RequestMetrics
from aibridgeproxyd.addons.proxy_auth import ProxyAuth
from aibridgeproxyd.addons.route import RouteRequests
from aibridgeproxyd.addons.streaming import StreamResponses
from mitmproxy import connection, options
from mitmproxy.proxy import layer, layers, server_hooks
from mitmproxy.proxy.context import Context
from mitmproxy.test import taddons, tflow
from mitmproxy.tls import ClientHello, ClientHelloData

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.destinations import DestinationPolicy
from aibridgeproxyd.failclosed import DIAL_REFUSED, Role, guard, guard_chain
from aibridgeproxyd.interception.state import ConnectInfo, ConnectionTable, request_context
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import ProviderRecord, TokenRecord
from aibridgeproxyd.providers import evaluate_providers
from aibridgeproxyd.reload import SnapshotHolder
from aibridgeproxyd.snapshot import Snapshot, build_snapshot
from aibridgeproxyd.tokens import hash_token
from tests.harness import basic_auth
from tests.metric_samples import registry_samples, sample_value


class Boom(RuntimeError):
    pass


class RaisingSnapshot(Snapshot):
    """A snapshot whose look-ups raise, as a bug in one would."""

    def provider_for_host(self, host: str) -> Any:
        raise Boom("provider_for_host")

    def identity_for_token(self, token: str) -> Any:
        raise Boom("identity_for_token")


@pytest.fixture
def tctx() -> Iterator[Any]:
    with taddons.context() as context:
        yield context


def holder_with(snapshot: Snapshot) -> SnapshotHolder:
    holder = SnapshotHolder()
    holder.current = snapshot
    holder.loaded = True
    return holder


def openai_snapshot() -> Snapshot:
    providers = evaluate_providers([ProviderRecord("openai", "openai", keys=("sk-central",))])
    return build_snapshot(providers, [TokenRecord("alice", hash_token("tok"))])


def connect_flow(host: str = "api.openai.com", port: int = 443, auth: str | None = None) -> Any:
    flow = tflow.tflow()
    flow.request.method = "CONNECT"
    flow.request.host, flow.request.port = host, port
    if auth is not None:
        flow.request.headers["Proxy-Authorization"] = auth
    return flow


def mitm_info(connections: ConnectionTable, flow: Any) -> ConnectInfo:
    info = ConnectInfo(host="api.openai.com", port=443, intercept=True, provider_name="openai")
    info.identity, info.proxy_token = "alice", "tok"
    connections.add(flow.client_conn, info)
    return info


# --- CONNECT checks -------------------------------------------------------------------------------


def test_classification_that_raises_refuses_the_connect_with_403(
    tctx: Any, caplog: pytest.LogCaptureFixture
) -> None:
    classify = Classify(holder_with(RaisingSnapshot()), ConnectionTable(), (443,), Metrics())
    flow = connect_flow()
    with caplog.at_level(logging.ERROR, "aibridgeproxyd.failclosed"):
        guard(classify, Role.CHECK, 403).http_connect(flow)
    assert flow.response is not None and flow.response.status_code == 403
    lines = [r for r in caplog.records if r.name == "aibridgeproxyd.failclosed"]
    assert len(lines) == 1 and "refused (fail closed)" in lines[0].getMessage()


def test_unguarded_classification_that_raises_would_have_let_the_connect_through() -> None:
    # The fault the guard exists for: mitmproxy logs the exception and carries on.
    classify = Classify(holder_with(RaisingSnapshot()), ConnectionTable(), (443,), Metrics())
    flow = connect_flow()
    with pytest.raises(Boom):
        classify.http_connect(flow)
    assert flow.response is None


async def test_auth_that_raises_refuses_the_connect_with_407(tctx: Any) -> None:
    connections = ConnectionTable()
    auth = ProxyAuth(holder_with(RaisingSnapshot()), connections, "token", False, Metrics())
    flow = connect_flow(auth=basic_auth("tok"))
    mitm_info(connections, flow).identity = None
    await guard(auth, Role.CHECK, 407).http_connect(flow)
    assert flow.response is not None and flow.response.status_code == 407
    assert flow.response.headers["Proxy-Authenticate"].startswith("Basic ")
    assert "proxy-authorization" not in flow.request.headers


async def test_auth_whose_token_reread_raises_refuses_with_407(tctx: Any) -> None:
    class FailingRefresher:
        async def identity_for_token(self, token: str) -> str | None:
            raise Boom("store unreadable")

    connections = ConnectionTable()
    auth = ProxyAuth(
        holder_with(openai_snapshot()),
        connections,
        "token",
        False,
        Metrics(),
        refresher=FailingRefresher(),
    )
    flow = connect_flow(auth=basic_auth("not-in-the-snapshot"))
    info = mitm_info(connections, flow)
    info.identity = info.proxy_token = None
    await guard(auth, Role.CHECK, 407).http_connect(flow)
    assert flow.response is not None and flow.response.status_code == 407
    assert info.identity is None


def test_auth_with_non_ascii_credentials_refuses_even_unguarded() -> None:
    # The example of issue 8: the parser itself no longer raises.
    from aibridgeproxyd.proxy_auth import token_from_proxy_authorization

    assert (
        token_from_proxy_authorization(
            "Basic " + b"\xe9\xe9\xe9".decode("utf-8", "surrogateescape")
        )
        is None
    )
    assert token_from_proxy_authorization("Basic \xe9\xe9\xe9") is None


async def test_destination_check_that_raises_refuses_the_dial(
    tctx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = DestinationPolicy(())
    monkeypatch.setattr(policy, "is_blocked", lambda ip: (_ for _ in ()).throw(Boom("policy")))
    destinations = DestinationGuard(
        holder_with(openai_snapshot()), ConnectionTable(), policy, (443,), Metrics()
    )
    server = connection.Server(address=("10.0.0.1", 443))
    data = server_hooks.ServerConnectionHookData(server=server, client=tflow.tclient_conn())
    await guard(destinations, Role.CHECK, 403).server_connect(data)
    # Refused either by the check's own fail-closed branch or by the guard: never dialled.
    assert data.server.error in (DIAL_REFUSED, UNRESOLVED)


# --- requests on a MITM'd host -------------------------------------------------------------------


def test_routing_that_raises_refuses_in_the_client_format(
    tctx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    connections = ConnectionTable()
    route = guard(RouteRequests(holder_with(openai_snapshot()), connections, "aibridgeproxyd"))
    flow = tflow.tflow()
    flow.request.host, flow.request.path = "api.openai.com", "/v1/chat/completions"
    mitm_info(connections, flow)
    route.requestheaders(flow)
    assert request_context(flow) is not None
    adapter = ADAPTERS["openai"]
    monkeypatch.setattr(adapter, "rewrite", lambda *a: (_ for _ in ()).throw(Boom("rewrite")))
    route.request(flow)
    assert flow.response is not None and flow.response.status_code == 502
    body = json.loads(flow.response.content or b"")
    assert body["error"]["code"] == "internal_error"
    assert "Boom" not in (flow.response.text or "") and "rewrite" not in (flow.response.text or "")
    ctx = request_context(flow)
    assert ctx is not None
    assert flow.response.headers["X-AIBridge-Request-Id"] == ctx.request_id


def test_routing_lookup_that_raises_refuses_a_request_before_it_is_sent(tctx: Any) -> None:
    connections = ConnectionTable()
    route = guard(RouteRequests(holder_with(RaisingSnapshot()), connections, "aibridgeproxyd"))
    flow = tflow.tflow()
    mitm_info(connections, flow)
    route.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 502


def test_stream_setup_that_raises_kills_the_flow(tctx: Any) -> None:
    flow = tflow.tflow(resp=True)

    class BadHeaders(StreamResponses):
        def responseheaders(self, flow: Any) -> None:
            raise Boom("transform.start")

    guard(BadHeaders()).responseheaders(flow)
    assert flow.error is not None and flow.error.msg == "Connection killed."


def test_a_buffered_response_whose_check_raises_is_replaced(tctx: Any) -> None:
    class BadResponse(RouteRequests):
        def response(self, flow: Any) -> None:
            raise Boom("response")

    flow = tflow.tflow(resp=True)
    guard(BadResponse(holder_with(openai_snapshot()), ConnectionTable(), "x")).response(flow)
    assert flow.response is not None and flow.response.status_code == 502


# --- connection-level hooks -----------------------------------------------------------------------


def _client_hello_data() -> ClientHelloData:
    context = Context(tflow.tclient_conn(), options.Options())
    hello = ClientHello(
        bytes.fromhex(
            # A minimal TLS 1.2 ClientHello with SNI "example.com", as mitmproxy's tests use.
            "0303"
            + "00" * 32
            + "00"
            + "0002c02f"
            + "0100"
            + "0010"
            + "0000000c000a0000076578616d706c65"
        )
    )
    return ClientHelloData(context, hello)


def test_tls_clienthello_that_raises_never_dials_the_original_host(tctx: Any) -> None:
    connections = ConnectionTable()

    class BadIntercept(Intercept):
        def tls_clienthello(self, data: ClientHelloData) -> None:
            data.establish_server_tls_first = True  # half-done work before the fault
            raise Boom("tls_clienthello")

    data = _client_hello_data()
    guard(BadIntercept(connections, Metrics())).tls_clienthello(data)
    assert data.establish_server_tls_first is False
    assert data.ignore_connection is False


def test_next_layer_that_raises_leaves_no_layer(tctx: Any) -> None:
    connections = ConnectionTable()
    context = Context(tflow.tclient_conn(), options.Options())
    nextlayer = layer.NextLayer(context)
    nextlayer.layer = layers.TCPLayer(context, ignore=True)  # what mitmproxy proposed
    connections.add(context.client, ConnectInfo(host="api.openai.com", port=443, intercept=True))
    connections.get(context.client).established = True  # type: ignore[union-attr]

    class BadIntercept(Intercept):
        def next_layer(self, nextlayer: layer.NextLayer) -> None:
            raise Boom("next_layer")

    guard(BadIntercept(connections, Metrics())).next_layer(nextlayer)
    assert nextlayer.layer is None


def test_client_connected_that_raises_refuses_the_client(tctx: Any) -> None:
    class BadIntercept(Intercept):
        def client_connected(self, client: connection.Client) -> None:
            raise Boom("client_connected")

    client = tflow.tclient_conn()
    guard(BadIntercept(ConnectionTable(), Metrics())).client_connected(client)
    assert client.error == DIAL_REFUSED


# --- taps -----------------------------------------------------------------------------------------


def test_a_tap_that_raises_only_logs(tctx: Any, caplog: pytest.LogCaptureFixture) -> None:
    class BadMetrics(RequestMetrics):
        def requestheaders(self, flow: Any) -> None:
            raise Boom("metrics")

    flow = tflow.tflow()
    with caplog.at_level(logging.ERROR, "aibridgeproxyd.failclosed"):
        guard(BadMetrics(Metrics(), InFlight()), Role.TAP).requestheaders(flow)
    assert flow.response is None and flow.error is None
    assert any("carrying on" in r.getMessage() for r in caplog.records)


def test_guard_chain_wraps_our_addons_only(tctx: Any) -> None:
    master = tctx.master
    ours = Classify(holder_with(openai_snapshot()), ConnectionTable(), (443,), Metrics())
    master.addons.add(ours, RequestMetrics(Metrics(), InFlight()))
    builtins_before = [
        a for a in master.addons.chain if type(a).__module__.startswith("mitmproxy.")
    ]
    guard_chain(master)
    chain = master.addons.chain
    assert [a for a in chain if type(a).__module__.startswith("mitmproxy.")] == builtins_before
    wrapped = [a for a in chain if repr(a).startswith("guard(")]
    assert len(wrapped) == 2
    # mitmproxy still finds the addon by name, and hooks it does not implement stay absent.
    assert master.addons.get("classify") is ours
    assert getattr(wrapped[0], "websocket_message", None) is None  # mitmproxy skips it
    assert hasattr(wrapped[0], "http_connect")


async def test_auth_that_raises_on_a_plain_http_request_refuses_with_407(tctx: Any) -> None:
    auth = ProxyAuth(holder_with(RaisingSnapshot()), ConnectionTable(), "token", True, Metrics())
    flow = tflow.tflow()  # no CONNECT on its connection: a plain-HTTP proxy request
    flow.request.headers["Proxy-Authorization"] = basic_auth("tok")
    await guard(auth, Role.CHECK, 407).requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 407
    assert flow.response.headers["Connection"] == "close"


def test_each_failure_is_counted_and_its_traceback_logged_once(
    tctx: Any, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    classify = Classify(holder_with(RaisingSnapshot()), ConnectionTable(), (443,), metrics)
    guarded = guard(classify, Role.CHECK, 403, metrics.hook_failures)
    with caplog.at_level(logging.ERROR, "aibridgeproxyd.failclosed"):
        for _ in range(3):
            guarded.http_connect(connect_flow())
    records = [r for r in caplog.records if r.name == "aibridgeproxyd.failclosed"]
    assert len(records) == 3
    assert [r.exc_info is not None for r in records] == [True, False, False]
    sample = sample_value(
        registry_samples(metrics.registry),
        "coder_aibridgeproxyd_hook_failures_total",
        addon="Classify",
        hook="http_connect",
        role="check",
    )
    assert sample == 3


def test_a_connect_error_mapping_that_raises_still_hides_the_detail(tctx: Any) -> None:
    class BadDestinations(DestinationGuard):
        def http_connect_error(self, flow: Any) -> None:
            raise Boom("http_connect_error")

    flow = connect_flow()
    flow.response = tflow.tresp(
        status_code=502, content=b"connect to 10.1.2.3:443 failed: EHOSTUNREACH"
    )
    addon = BadDestinations(
        holder_with(openai_snapshot()), ConnectionTable(), DestinationPolicy(()), (443,), Metrics()
    )
    guard(addon, Role.CHECK, 403).http_connect_error(flow)
    assert flow.response.status_code == 502
    assert b"10.1.2.3" not in (flow.response.content or b"")


# --- structural: every hook of every check in the daemon's real chain -------------------------------


def _subject(hook: str) -> Any:
    """A fresh first argument for ``hook``, as mitmproxy would pass it."""
    if hook.startswith("websocket_"):
        return tflow.twebsocketflow()
    if hook in ("http_connect", "http_connect_upstream", "http_connected"):
        return connect_flow()
    if hook == "http_connect_error":
        flow = connect_flow()
        flow.response = tflow.tresp(status_code=502, content=b"detail")
        return flow
    if hook in ("requestheaders", "request", "error"):
        return tflow.tflow()
    if hook in ("responseheaders", "response"):
        flow = tflow.tflow(resp=True)
        if hook == "responseheaders":
            assert flow.response is not None
            flow.response.stream = True
        return flow
    if hook.startswith("server_"):
        server = connection.Server(address=("203.0.113.1", 443))
        return server_hooks.ServerConnectionHookData(server=server, client=tflow.tclient_conn())
    if hook == "tls_clienthello":
        return _client_hello_data()
    if hook == "next_layer":
        context = Context(tflow.tclient_conn(), options.Options())
        nextlayer = layer.NextLayer(context)
        nextlayer.layer = layers.TCPLayer(context, ignore=True)
        return nextlayer
    if hook.startswith("client_"):
        return tflow.tclient_conn()
    raise AssertionError(f"no subject for hook {hook}")


def _refused(hook: str, subject: Any, closed: list[Any]) -> bool:
    if hook in ("error", "client_disconnected", "server_disconnected", "websocket_end"):
        return True  # after the fact: nothing left to refuse
    if hook in ("http_connect", "http_connect_upstream", "requestheaders", "request", "response"):
        return subject.response is not None and subject.response.status_code in (403, 407, 502)
    if hook == "http_connect_error":
        return subject.response.content != b"detail"
    if hook in ("responseheaders",) or hook.startswith("websocket_"):
        return subject.error is not None
    if hook == "server_connect":
        return subject.server.error == DIAL_REFUSED
    if hook == "client_connected":
        return subject.error == DIAL_REFUSED
    if hook == "tls_clienthello":
        return not subject.establish_server_tls_first and bool(closed)
    if hook == "next_layer":
        return subject.layer is None and bool(closed)
    if hook == "http_connected":
        return bool(closed)
    return bool(closed)


async def test_every_hook_of_every_check_in_the_daemon_chain_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aibridgeproxyd import failclosed
    from aibridgeproxyd.ca import ensure_ca
    from aibridgeproxyd.config import load_config
    from aibridgeproxyd.daemon import Daemon

    config = load_config(
        flags={"data_dir": str(tmp_path / "data"), "certs_dir": str(tmp_path / "certs")},
        environ={},
    )
    master = Daemon(config, ensure_ca(config))._build_master()
    closed: list[Any] = []
    monkeypatch.setattr(failclosed, "close_client", closed.append)
    checked = []
    for wrapped in master.addons.chain:
        if getattr(wrapped, "role", None) is not Role.CHECK:
            continue
        for hook in failclosed.HOOKS:
            if getattr(wrapped, hook, None) is None:
                continue

            def raise_(*args: Any) -> None:
                raise Boom("injected")

            raiser = type("Raiser", (), {hook: staticmethod(raise_)})()
            subject = _subject(hook)
            closed.clear()
            guard(raiser, Role.CHECK, wrapped.connect_status).__getattribute__(hook)(subject)
            assert _refused(hook, subject, closed), f"{wrapped!r}.{hook} let a failure through"
            checked.append((type(wrapped._addon).__name__, hook))
    # The chain's checks really were exercised, hook by hook.
    assert ("ProxyAuth", "http_connect") in checked
    assert ("Intercept", "next_layer") in checked
    assert ("DestinationGuard", "server_connect") in checked
    assert ("RouteRequests", "responseheaders") in checked
    assert len(checked) >= 15


def test_hooks_beyond_the_listed_ones_are_guarded_too(tctx: Any) -> None:
    class DnsCheck:
        def dns_request(self, flow: Any) -> None:
            raise Boom("dns_request")

    wrapped = guard(DnsCheck())
    assert wrapped.dns_request is not DnsCheck.dns_request
    flow = tflow.tdnsflow()
    wrapped.dns_request(flow)  # caught, not raised
    assert flow.error is not None  # killed
