"""Which HTTP flows are in flight: the one count a graceful stop waits for, and the one rule the
in-flight gauge follows.

A flow is in flight from its ``requestheaders`` hook until the first of:

- its ``response`` hook, unless the response is a WebSocket upgrade (101);
- its ``error`` hook (client abort, upstream failure, a stream cut at the drain timeout);
- its ``websocket_end`` hook: a WebSocket session stays in flight until it closes.

mitmproxy gives every flow one ``response`` or ``error`` and a WebSocket one ``websocket_end``;
leaving flight happens once all the same, whichever hooks come.

It comes early in the chain (``aibridgeproxyd.chain``), before any check that awaits (proxy
auth re-reading tokens, destination DNS), so a flow counts from its first hook.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http


class InFlight:
    """The flows in flight, by flow id. ``count`` is what the drain waits on;
    ``on_landing(flow, callback)`` runs ``callback`` once the flow leaves flight (the in-flight
    gauge's decrement, ``addons.metrics``)."""

    def __init__(self) -> None:
        # flow id -> what to run when it leaves flight
        self._flows: dict[str, list[Callable[[], None]]] = {}

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
        self._flows.setdefault(flow.id, [])

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self._land(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._land(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._land(flow)

    def _land(self, flow: http.HTTPFlow) -> None:
        for callback in self._flows.pop(flow.id, ()):
            callback()
