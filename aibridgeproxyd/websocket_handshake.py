"""Whether an upstream's ``101 Switching Protocols`` is an answer the proxy may relay.

A 101 turns the rest of the connection into what it names. mitmproxy relays a WebSocket (its
``WebsocketLayer``, with our message bounds) and any other upgrade as raw TCP, without bound or
record; and it builds its permessage-deflate state from the answer's extension header, raising
on a parameter it cannot take (``server_max_window_bits=8``): the client connection then ended
with a traceback. The proxy is the upstream's WebSocket client, so it checks the answer as
RFC 6455 section 4.1 asks a client to, before anything of it is relayed:

- the request was a WebSocket upgrade (``Upgrade: websocket``, ``Sec-WebSocket-Version: 13``)
  and the answer upgrades to ``websocket``;
- ``Sec-WebSocket-Accept`` is the one the request's ``Sec-WebSocket-Key`` calls for;
- every extension it names is permessage-deflate (RFC 7692: the only one relayed), offered by the
  client, named once, with parameters wsproto accepts;
- a subprotocol, if named, is one the client offered.

``switch_problem`` says what is wrong, or None. It quotes nothing the upstream sent: the text is
logged, and read to classify the failure (``errors.upstream_failure``).
"""

from __future__ import annotations

import base64
import hashlib

from mitmproxy import http
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import split_comma_header

_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


def accept_value(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _WEBSOCKET_GUID).digest()).decode()


def _tokens(headers: http.Headers, name: str) -> list[str]:
    """The comma-separated items of every ``name`` field, each without parameters, lower-case."""
    values = ",".join(headers.get_all(name)).encode("ascii", "replace")
    return [item.split(";", 1)[0].strip().lower() for item in split_comma_header(values)]


def switch_problem(request: http.Request, response: http.Response) -> str | None:
    """What makes ``response`` (a 101) no answer to relay for ``request``, or None."""
    if not is_websocket_upgrade(request):
        return "the upstream switched protocols for a request that is not a WebSocket upgrade"
    if _tokens(response.headers, "upgrade") != ["websocket"]:
        return "the upstream's 101 does not upgrade to websocket"
    expected = accept_value(request.headers.get("sec-websocket-key", "").strip())
    if response.headers.get("sec-websocket-accept", "").strip() != expected:
        return "the upstream's 101 has a missing or wrong Sec-WebSocket-Accept"
    return _extension_problem(request, response) or _subprotocol_problem(request, response)


def is_websocket_upgrade(request: http.Request) -> bool:
    """Whether ``request`` asks for a WebSocket (mitmproxy's own test, plus the token list)."""
    return "websocket" in _tokens(request.headers, "upgrade") and (
        request.headers.get("sec-websocket-version", "").strip() == "13"
    )


def _extension_problem(request: http.Request, response: http.Response) -> str | None:
    named = response.headers.get_all("sec-websocket-extensions")
    if not named:
        return None
    offered = set(_tokens(request.headers, "sec-websocket-extensions"))
    extensions = split_comma_header(",".join(named).encode("ascii", "replace"))
    names = [extension.split(";", 1)[0].strip().lower() for extension in extensions]
    if any(name not in offered for name in names):
        return "the upstream's 101 names a WebSocket extension the client did not offer"
    if names != [PerMessageDeflate.name]:
        return "the upstream's 101 names WebSocket extensions other than one permessage-deflate"
    try:
        PerMessageDeflate().finalize(extensions[0])
    except (ValueError, IndexError):
        return "the upstream's 101 has permessage-deflate parameters that are not valid"
    return None


def _subprotocol_problem(request: http.Request, response: http.Response) -> str | None:
    chosen = _tokens(response.headers, "sec-websocket-protocol")
    if not chosen:
        return None
    offered = set(_tokens(request.headers, "sec-websocket-protocol"))
    if len(chosen) > 1 or chosen[0] not in offered:
        return "the upstream's 101 names a WebSocket subprotocol the client did not offer"
    return None
