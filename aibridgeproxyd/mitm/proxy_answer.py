"""A tunnel through a corporate proxy (``upstream_proxy``) whose answer to CONNECT is bounded,
and whose credentials stay out of the log lines that answer makes (``BoundedHttpUpstreamProxy``).

mitmproxy builds that tunnel layer itself (``HttpUpstreamProxy``, in ``HttpLayer.get_connection``
and in the stack ``_ChainedStream`` makes); ``bound_proxy_answer`` switches its class before the
connection to the proxy opens. mitmproxy is pinned to 12.3.x; the overridden methods mirror that
version (``tests/unit/test_mitm_digests.py``).
"""

from __future__ import annotations

import base64
import re
from typing import Any

from mitmproxy.proxy import commands, layer
from mitmproxy.proxy.layers.http._hooks import HttpConnectUpstreamHook
from mitmproxy.proxy.layers.http._upstream_proxy import HttpUpstreamProxy
from mitmproxy.utils import human

from aibridgeproxyd.errors import SecretRedactor, proxy_refusal
from aibridgeproxyd.mitm.framing import HEAD_END

# Bytes: the longest answer head a corporate proxy (upstream_proxy) may send to a CONNECT.
MAX_PROXY_ANSWER_HEAD = 64 * 1024
# mitmproxy's error for a non-2xx answer to CONNECT (HttpUpstreamProxy.receive_handshake_data).
_REFUSED = re.compile(r"Upstream proxy .* refused HTTP CONNECT request: (\d{3})\b")


class BoundedHttpUpstreamProxy(HttpUpstreamProxy):
    """mitmproxy's tunnel through a corporate proxy, with the proxy's answer to CONNECT bounded
    and its credentials kept out of what that answer makes us log.

    mitmproxy buffers that answer until its blank line: a proxy sending one without end grew
    the daemon's memory until ``upstream_connect_timeout`` closed the dial. Past
    ``MAX_PROXY_ANSWER_HEAD`` bytes without an end of head the tunnel fails (a 502).
    mitmproxy's error for a refusal quotes its reason phrase, and for an answer that is not HTTP
    its first line: a proxy that echoes the ``Proxy-Authorization`` it got put the credentials
    in the log. A refusal's error is ours instead (``proxy_refusal``: the status and its
    standard phrase), which the client may be told; every form of the credentials is redacted
    from any other error and from mitmproxy's log lines. The rest of a refusal (its page) is
    never read."""

    # The Proxy-Authorization this tunnel's CONNECT carried, and the credentials inside it.
    _credentials: tuple[str, ...] = ()

    def start_handshake(self) -> layer.CommandGenerator[None]:
        """mitmproxy's, keeping the credentials the upstream proxy addon adds in its hook."""
        steps = super().start_handshake()
        reply: Any = None
        while True:
            try:
                command = steps.send(reply)
            except StopIteration:
                return
            reply = yield command
            if isinstance(command, HttpConnectUpstreamHook):
                authorization = command.flow.request.headers.get("proxy-authorization", "")
                self._credentials = credential_forms(authorization)

    def receive_handshake_data(
        self, data: bytes
    ) -> layer.CommandGenerator[tuple[bool, str | None]]:
        redactor = SecretRedactor(self._credentials)
        steps = self._receive_bounded(data)
        reply: Any = None
        while True:
            try:
                command = steps.send(reply)
            except StopIteration as done:
                opened, err = done.value
                return opened, _own_error(err, redactor)
            if isinstance(command, commands.Log) and redactor:
                command.message = redactor.redact_text(command.message)
            reply = yield command

    def _receive_bounded(self, data: bytes) -> layer.CommandGenerator[tuple[bool, str | None]]:
        if self.send_connect and len(self.buf) + len(data) > MAX_PROXY_ANSWER_HEAD:
            # At most one read past the limit is copied; the bytes after a 2xx head are the
            # target's, however many, so only the head itself is held to the limit.
            pending = (bytes(self.buf) + data)[:MAX_PROXY_ANSWER_HEAD]
            if HEAD_END.search(pending.lstrip(b"\r\n")) is None:
                self.buf.maybe_extract_at_most(len(self.buf))
                proxy = human.format_address(self.tunnel_connection.address)
                return False, (
                    f"upstream proxy {proxy} sent an answer to CONNECT over "
                    f"{MAX_PROXY_ANSWER_HEAD} bytes"
                )
        return (yield from super().receive_handshake_data(data))


def _own_error(err: str | None, redactor: SecretRedactor) -> str | None:
    """The tunnel's error as the daemon tells it: a refusal by its status alone, anything else
    with the credentials redacted."""
    if err is None:
        return None
    refused = _REFUSED.match(err)
    if refused is not None:
        return proxy_refusal("connection", int(refused.group(1)))
    return redactor.redact_text(err) if redactor else err


def credential_forms(authorization: str) -> tuple[str, ...]:
    """The secrets in a ``Proxy-Authorization`` value: itself, and for Basic the ``user:pass``
    it encodes and the password (``SecretRedactor`` adds their base64 and other spellings)."""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return (authorization,) if authorization else ()
    try:
        userinfo = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except ValueError:
        return (authorization,)
    return authorization, token.strip(), userinfo, userinfo.partition(":")[2]


def bound_proxy_answer(handler: layer.Layer | None) -> None:
    """Make the tunnel through a corporate proxy in ``handler``'s stack (and its children) a
    ``BoundedHttpUpstreamProxy``, before the connection to the proxy opens (mitmproxy's
    ``HttpLayer.get_connection`` builds the tunnel layer itself)."""
    while handler is not None:
        if type(handler) is HttpUpstreamProxy:
            handler.__class__ = BoundedHttpUpstreamProxy
        handler = getattr(handler, "child_layer", None)
