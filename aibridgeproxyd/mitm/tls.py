"""TLS helpers that reach below mitmproxy's and pyOpenSSL's public APIs.

- The TLS connection to an ``https://`` corporate proxy checks the proxy's certificate names
  its host. pyOpenSSL has no public API for that check, so it is set through OpenSSL's
  ``X509_VERIFY_PARAM`` via ``SSL._lib``, exactly as mitmproxy's own ``TlsConfig`` does for
  upstreams (mitmproxy 12.3 ``addons/tlsconfig.py``, ``tls_start_server``).
- Telling the TLS of the proxy listener itself from the TLS inside a MITM'd tunnel needs the
  context's layer stack.
"""

from __future__ import annotations

from pathlib import Path

import certifi
from mitmproxy import tls
from mitmproxy.addons.tlsconfig import DEFAULT_HOSTFLAGS
from mitmproxy.net import tls as net_tls
from mitmproxy.proxy.layers import modes
from OpenSSL import SSL

from aibridgeproxyd.destinations import literal_ip
from aibridgeproxyd.pem_files import read_certificate_file
from aibridgeproxyd.upstream_proxy import UpstreamProxyError


def proxy_tls_context(ca_file: Path | None) -> SSL.Context:
    """A client context that verifies the corporate proxy against the default bundle plus
    ``ca_file`` (``upstream_proxy_ca``), and against nothing else: ``upstream_ca_file`` is for
    the upstreams, not for the proxy. Raises ``UpstreamProxyError`` naming the key when
    ``ca_file`` cannot be read or holds no PEM certificate."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(net_tls.DEFAULT_OPTIONS)
    context.set_verify(SSL.VERIFY_PEER)
    context.load_verify_locations(certifi.where())
    if ca_file is not None:
        try:
            read_certificate_file(ca_file, "upstream_proxy_ca")
        except ValueError as exc:
            raise UpstreamProxyError(str(exc)) from None
        context.load_verify_locations(str(ca_file))
    return context


def proxy_tls_connection(context: SSL.Context, host: str) -> SSL.Connection:
    """A client TLS connection that checks the proxy's certificate names ``host`` (a name, or
    an address in standard notation), as mitmproxy's TlsConfig does for upstreams."""
    ssl_conn = SSL.Connection(context)
    # Private on purpose: pyOpenSSL exposes no host-name or IP check; these are the calls
    # mitmproxy's TlsConfig makes.
    param = SSL._lib.SSL_get0_param(ssl_conn._ssl)
    SSL._lib.X509_VERIFY_PARAM_set_hostflags(param, DEFAULT_HOSTFLAGS)
    ip = literal_ip(host)
    if ip is None:
        name = host.encode("idna")
        ssl_conn.set_tlsext_host_name(name)
        ok = SSL._lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))
    else:  # RFC 6066: no SNI for an address
        packed = ip.packed
        ok = SSL._lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    SSL._openssl_assert(ok == 1)
    # CONNECT to a TLS-wrapped proxy is HTTP/1.1 only in mitmproxy.
    ssl_conn.set_alpn_protos([b"http/1.1"])
    ssl_conn.set_connect_state()
    return ssl_conn


def is_listener_handshake(tls_start: tls.TlsData) -> bool:
    """Whether ``tls_start`` is the TLS directly in front of the proxy protocol (a client using
    an ``https://`` proxy URL), not the TLS of a MITM'd tunnel: no CONNECT has named a
    destination yet."""
    layers = tls_start.context.layers
    return (
        bool(layers)
        and isinstance(layers[0], modes.HttpProxy)
        and tls_start.context.server.address is None
    )


__all__ = ["is_listener_handshake", "proxy_tls_connection", "proxy_tls_context"]
