"""Which HTTP flows are in flight: the one count a graceful stop waits for, and the one rule the
in-flight gauge follows.

A flow is in flight from its ``requestheaders`` hook until the first of:

- its ``response`` hook, unless the response is a WebSocket upgrade (101);
- its ``error`` hook (client abort, upstream failure, a stream cut at the drain timeout);
- its ``websocket_end`` hook: a WebSocket session stays in flight until it closes;
- its client connection closing (``client_disconnected``).

The last rule is the backstop: mitmproxy does not always end a flow with a hook. An upgrade
killed while its ``response`` hook runs (the client's disconnect queued meanwhile) gets no
``error`` hook and, with no WebSocket layer started, no ``websocket_end``; a flow on a
connection the proxy closes may get neither; an upgrade whose 101 a later check replaced (the
fail-closed guard's 502, after this addon's ``response``) starts no WebSocket layer either. No
flow outlives its connection, so the table stays bounded by the open connections, and a flow
that ended without a hook holds a graceful stop only until its connection closes (the idle
timeout, or the drain's own deadline). Leaving flight happens once, whichever hooks come.

It comes early in the chain (``aibridgeproxyd.chain``), before any check that awaits (proxy
auth re-reading tokens, destination DNS), so a flow counts from its first hook.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import connection, http


class InFlight:
    """The flows in flight, by flow id, with the client connection each came on. ``count`` is
    what the drain waits on; ``on_landing(flow, callback)`` runs ``callback`` once the flow
    leaves flight (the in-flight gauge's decrement, ``addons.metrics``)."""

    def __init__(self) -> None:
        # flow id -> what to run when it leaves flight
        self._flows: dict[str, list[Callable[[], None]]] = {}
        # client connection id -> ids of its flows in flight
        self._by_client: dict[str, set[str]] = {}

    @property
    def count(self) -> int:
        return len(self._flows)

    def on_landing(self, flow: http.HTTPFlow, callback: Callable[[], None]) -> None:
        """Run ``callback`` once, when ``flow`` leaves flight; at once if it is not in flight."""
        callbacks = self._flows.get(flow.id)
        if callbacks is None:
            callback()
        else:
            callbacks.append(callback)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.id not in self._flows:
            self._flows[flow.id] = []
            self._by_client.setdefault(flow.client_conn.id, set()).add(flow.id)

    def response(self, flow: http.HTTPFlow) -> None:
        # Only an upgrade answered 101 becomes a WebSocket session, ended by websocket_end.
        response = flow.response
        if flow.websocket is None or response is None or response.status_code != 101:
            self._land(flow.id, flow.client_conn.id)

    def error(self, flow: http.HTTPFlow) -> None:
        self._land(flow.id, flow.client_conn.id)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._land(flow.id, flow.client_conn.id)

    def client_disconnected(self, client: connection.Client) -> None:
        for flow_id in self._by_client.pop(client.id, set()):
            self._land(flow_id, None)

    def _land(self, flow_id: str, client_id: str | None) -> None:
        callbacks = self._flows.pop(flow_id, None)
        if callbacks is None:
            return
        if client_id is not None:
            flows = self._by_client.get(client_id)
            if flows is not None:
                flows.discard(flow_id)
                if not flows:
                    del self._by_client[client_id]
        for callback in callbacks:
            callback()
