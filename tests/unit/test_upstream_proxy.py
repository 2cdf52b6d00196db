"""Upstream proxy chaining: the proxy URL and its credentials, upstream_no_proxy matching, and
the addon's and the destination guard's hooks, one at a time."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import trustme
from aibridgeproxyd.addons.destinations import DestinationGuard
from aibridgeproxyd.addons.upstream_proxy import ChainUpstreamProxy
from mitmproxy import connection, http, options, tls
from mitmproxy.proxy import layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import NextLayer
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.test import tflow

from aibridgeproxyd.config import ConfigError, load_config
from aibridgeproxyd.destinations import DestinationPolicy
from aibridgeproxyd.interception.state import ConnectInfo, ConnectionTable
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.tls import proxy_tls_context
from aibridgeproxyd.reload import SnapshotHolder
from aibridgeproxyd.upstream_proxy import (
    NoProxy,
    UpstreamProxy,
    UpstreamProxyError,
    basic_proxy_authorization,
    parse_upstream_proxy,
    redact_url,
)


def basic(userinfo: str) -> str:
    return "Basic " + base64.b64encode(userinfo.encode()).decode()


# --- the proxy URL ------------------------------------------------------------------------------


def test_proxy_url_without_credentials() -> None:
    assert parse_upstream_proxy("http://proxy.corp:3128") == UpstreamProxy(
        "http", "proxy.corp", 3128
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://proxy.corp", ("http", "proxy.corp", 80)),
        ("https://proxy.corp/", ("https", "proxy.corp", 443)),
        ("HTTPS://Proxy.Corp.:8443", ("https", "proxy.corp", 8443)),
        ("http://[fd00::1]:3128", ("http", "fd00::1", 3128)),
    ],
)
def test_proxy_url_scheme_host_and_default_port(url: str, expected: tuple[str, str, int]) -> None:
    proxy = parse_upstream_proxy(url)
    assert (proxy.scheme, proxy.host, proxy.port) == expected


@pytest.mark.parametrize(
    ("userinfo", "credentials"),
    [
        ("user:pass", "user:pass"),
        ("user:", "user:"),
        ("user", "user"),
        (":pass", ":pass"),  # token-style
        ("d%C3%A9v:p%40ss%3Aword", "dév:p@ss:word"),  # percent-encoded in the URL
    ],
)
def test_every_userinfo_form_becomes_basic_proxy_authorization(
    userinfo: str, credentials: str
) -> None:
    proxy = parse_upstream_proxy(f"http://{userinfo}@proxy:3128")
    assert proxy.authorization == basic(credentials)
    assert proxy.address == ("proxy", 3128)


@pytest.mark.parametrize("url", ["http://:@proxy:3128", "http://@proxy:3128"])
def test_proxy_url_with_both_credentials_empty_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="both username and password are empty"):
        parse_upstream_proxy(url)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://user:s3cret@proxy:21",
        "http://user:s3cret@proxy:99999",
        "http://user:s3cret@proxy:3128/path",
        "http://user:s3cret@proxy:3128?q=1",
        "http://user:s3cret@",
        "http://user:%ff%fe@proxy:3128",
    ],
)
def test_bad_proxy_url_is_refused_without_echoing_credentials(url: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_upstream_proxy(url)
    assert "s3cret" not in str(info.value)
    assert "%ff" not in str(info.value)


def test_proxy_prints_without_its_credentials() -> None:
    proxy = parse_upstream_proxy("https://user:s3cret@[::1]:3128")
    assert str(proxy) == "https://[::1]:3128"
    assert "s3cret" not in repr(proxy.via)


def test_redact_url_hides_userinfo() -> None:
    assert redact_url("http://u:p@host:1") == "http://***@host:1"
    assert redact_url("http://host:1") == "http://host:1"


def test_basic_proxy_authorization_is_the_userinfo_as_written() -> None:
    assert basic_proxy_authorization("user") == "Basic dXNlcg=="


def test_config_refuses_empty_credentials_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"'upstream_proxy'.*both username and password"):
        load_config(flags={"upstream_proxy": "http://:@proxy:3128"}, environ={})
    config = load_config(environ={"AIBRIDGEPROXYD_UPSTREAM_PROXY": "http://:tok@proxy:3128"})
    assert config.upstream_proxy is not None
    assert config.upstream_proxy.authorization == basic_proxy_authorization(":tok")
    assert "OnRvaw" not in repr(config)


# --- upstream_no_proxy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "host", "bypass"),
    [
        (["example.com"], "example.com", True),
        (["example.com"], "api.example.com", True),
        (["example.com"], "notexample.com", False),
        (["Example.COM."], "API.example.com.", True),
        ([".example.com"], "api.example.com", True),
        ([".example.com"], "example.com", False),
        (["*.example.com"], "a.b.example.com", True),
        (["*.example.com"], "example.com", False),
        (["10.0.0.0/8"], "10.1.2.3", True),
        (["10.0.0.0/8"], "11.1.2.3", False),
        (["10.0.0.0/8"], "[::ffff:10.1.2.3]", True),
        (["192.168.1.7"], "192.168.1.7", True),
        (["fd00::/8"], "[fd00::1]", True),
        (["fd00::/8"], "fd00::1", True),
        (["10.0.0.0/8"], "internal.corp", False),  # names are not resolved to be matched
        (["internal.corp"], "10.0.0.1", False),
        (["*"], "anything.at.all", True),
        ([], "example.com", False),
    ],
)
def test_no_proxy_matching(entries: list[str], host: str, bypass: bool) -> None:
    assert NoProxy(entries).matches(host) is bypass


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "example.com:443", "exa mple.com", "-bad.com"])
def test_no_proxy_refuses_entries_it_cannot_match(entry: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        NoProxy([entry])


def client_context() -> Context:
    return Context(tflow.tclient_conn(), options.Options())


# --- the addon's hooks --------------------------------------------------------------------------

HTTP_PROXY = UpstreamProxy("http", "proxy.corp", 3128, basic("u:p"))


def chain(proxy: UpstreamProxy = HTTP_PROXY, *no_proxy: str) -> ChainUpstreamProxy:
    return ChainUpstreamProxy(proxy, NoProxy(no_proxy), ConnectionTable())


def connect_flow(host: str, port: int = 443) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method = "CONNECT"
    flow.request.host, flow.request.port = host, port
    flow.server_conn = connection.Server(address=None)
    return flow


def test_tunneled_connect_is_chained_unless_bypassed() -> None:
    addon = chain(HTTP_PROXY, ".internal.corp")
    tunneled, bypassed = connect_flow("example.com"), connect_flow("git.internal.corp")
    addon.http_connect(tunneled)
    addon.http_connect(bypassed)
    assert tunneled.server_conn.via == ("http", ("proxy.corp", 3128))
    assert bypassed.server_conn.via is None


def test_answered_connect_is_left_alone() -> None:
    # MITM'd (answered without a dial) or already refused.
    flow = connect_flow("api.openai.com")
    flow.response = http.Response.make(200)
    chain().http_connect(flow)
    assert flow.server_conn.via is None


def test_connect_sent_to_the_proxy_carries_its_credentials() -> None:
    flow = connect_flow("api.openai.com")
    chain().http_connect_upstream(flow)
    assert flow.request.headers["Proxy-Authorization"] == basic("u:p")
    anonymous = connect_flow("api.openai.com")
    chain(UpstreamProxy("http", "proxy.corp", 3128)).http_connect_upstream(anonymous)
    assert "Proxy-Authorization" not in anonymous.request.headers


def test_request_gets_a_connection_spec_of_its_own() -> None:
    shared = connection.Server(address=("api.openai.com", 443))
    routed, bypassed = tflow.tflow(), tflow.tflow()
    routed.server_conn = bypassed.server_conn = shared
    routed.request.host = "upstream.example"
    bypassed.request.host = "10.1.2.3"
    addon = chain(HTTP_PROXY, "10.0.0.0/8")
    addon.request(routed)
    addon.request(bypassed)
    assert routed.server_conn.via == HTTP_PROXY.via
    assert routed.server_conn is not shared and shared.via is None
    assert bypassed.server_conn is shared


def test_request_with_a_response_is_not_dialled() -> None:
    flow = tflow.tflow(resp=True)
    chain().request(flow)
    assert flow.server_conn.via is None


def test_client_facing_http_layer_is_replaced_but_mitm_layers_are_not() -> None:
    addon = chain()
    context = client_context()
    outer = NextLayer(context)
    outer.layer = layers.HttpLayer(context, HTTPMode.regular)
    addon.next_layer(outer)
    assert type(outer.layer).__name__ == "_ChainedHttpLayer"
    assert context.layers[-1] is outer.layer
    inner = NextLayer(context)
    inner.layer = mitm = layers.HttpLayer(context, HTTPMode.transparent)
    addon.next_layer(inner)
    assert inner.layer is mitm


# --- TLS to an https:// proxy -------------------------------------------------------------------


@pytest.fixture
def proxy_ca(tmp_path: Path) -> Path:
    path = tmp_path / "proxy-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def test_https_proxy_connection_gets_its_own_trust_store(proxy_ca: Path) -> None:
    proxy = UpstreamProxy("https", "proxy.corp", 3128)
    addon = ChainUpstreamProxy(proxy, NoProxy([]), ConnectionTable(), proxy_ca)
    context = client_context()
    context.server = connection.Server(address=("api.openai.com", 443), via=proxy.via)
    to_proxy = tls.TlsData(connection.Server(address=proxy.address), context)
    to_destination = tls.TlsData(context.server, context)
    addon.tls_start_server(to_proxy)
    addon.tls_start_server(to_destination)
    assert to_proxy.ssl_conn is not None
    assert to_proxy.ssl_conn.get_context() is addon.tls_context
    assert to_destination.ssl_conn is None  # mitmproxy's TlsConfig handles upstreams


def test_proxy_ca_that_is_not_a_certificate_is_refused(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("hello\n")
    with pytest.raises(UpstreamProxyError, match=r"upstream_proxy_ca .* holds no PEM certificate"):
        proxy_tls_context(not_pem)
    with pytest.raises(UpstreamProxyError, match="cannot read upstream_proxy_ca"):
        proxy_tls_context(tmp_path / "missing.pem")


def test_proxy_ca_is_ignored_for_an_http_proxy(
    proxy_ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    addon = ChainUpstreamProxy(HTTP_PROXY, NoProxy([]), ConnectionTable(), proxy_ca)
    assert addon.tls_context is None
    assert "upstream_proxy_ca is ignored" in caplog.text


# --- the destination guard with a proxy ---------------------------------------------------------


def guard(connections: ConnectionTable | None = None) -> DestinationGuard:
    return DestinationGuard(
        SnapshotHolder(),
        connections or ConnectionTable(),
        DestinationPolicy(),
        (443,),
        Metrics(),
        upstream_proxy_address=HTTP_PROXY.address,
    )


async def test_proxied_tunnel_to_a_private_address_is_refused_before_any_dial() -> None:
    flow = connect_flow("10.1.2.3")
    flow.server_conn.via = HTTP_PROXY.via
    await guard().http_connect(flow)
    assert flow.response is not None and flow.response.status_code == 403


async def test_proxied_pass_through_request_to_a_name_resolving_to_loopback_is_refused() -> None:
    # A request the proxy makes on no provider's behalf goes to the host the client chose.
    flow = tflow.tflow()
    flow.request.host, flow.request.port = "localhost", 443
    flow.server_conn = connection.Server(address=None, via=HTTP_PROXY.via)
    in_tunnel = ConnectionTable()
    in_tunnel.add(flow.client_conn, ConnectInfo(host="localhost", port=443))
    await guard(in_tunnel).request(flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.response.content == b"Forbidden: private or reserved destination"


async def test_direct_pass_through_request_is_left_to_the_dial_check() -> None:
    flow = tflow.tflow()
    flow.request.host, flow.request.port = "10.1.2.3", 443
    in_tunnel = ConnectionTable()
    in_tunnel.add(flow.client_conn, ConnectInfo(host="10.1.2.3", port=443))
    await guard(in_tunnel).request(flow)
    assert flow.response is None


async def test_direct_tunnel_is_left_to_the_dial_check() -> None:
    flow = connect_flow("10.1.2.3")
    await guard().http_connect(flow)
    assert flow.response is None


async def test_the_proxy_itself_is_never_blocked() -> None:
    # proxy.corp would not even resolve here: it is dialled as configured.
    data = connection.Server(address=HTTP_PROXY.address)
    hook_data = ServerConnectionHookData(server=data, client=tflow.tclient_conn())
    await guard().server_connect(hook_data)
    assert data.error is None and data.address == HTTP_PROXY.address
