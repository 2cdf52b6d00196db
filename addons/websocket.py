"""WebSocket sessions on MITM'd hosts (Codex's Responses API transport, OpenAI Realtime).

The upgrade request is routed like any request (the adapter rewrites it and injects the key);
mitmproxy then relays messages both ways. mitmproxy appends every message to
``flow.websocket.messages`` for the session's lifetime; this addon, last in the chain, drops each
one once every other addon has seen it, so a long session holds no history in memory.
"""

from __future__ import annotations

from mitmproxy import http


class ForgetWebSocketMessages:
    """Drops each WebSocket message from the flow once every addon has seen it
    (``websocket_message``)."""

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        flow.websocket.messages.clear()
