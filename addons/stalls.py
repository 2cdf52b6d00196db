"""Cancel the upstream of an HTTP/2 stream the client abandoned without resetting it.

Some clients (httpx among them) stop reading a stream they no longer want without sending
RST_STREAM. The stream's flow-control window then stays shut, the proxy queues what the upstream
keeps sending, and the upstream keeps generating (and billing) tokens until the whole client
connection closes. A stream whose window stays shut for ``stall_timeout`` with data waiting is
treated as abandoned: its upstream connection is closed, which ends the flow like a client abort.
"""

from __future__ import annotations

import logging
import time

from aibridgeproxyd.interception.state import ConnectionTable, request_context
from aibridgeproxyd.mitm.connections import ClientConnection
from aibridgeproxyd.mitm.http_layer import AIBridgeHttpLayer
from aibridgeproxyd.periodic import PeriodicTask

log = logging.getLogger("aibridgeproxyd.stalls")


class StallWatch:
    """From ``running`` until ``done``, sweeps the MITM'd HTTP/2 connections and closes the
    upstream of a stream its client stopped reading for ``stall_timeout``."""

    def __init__(self, connections: ConnectionTable, stall_timeout: float) -> None:
        self.connections = connections
        self.stall_timeout = stall_timeout
        self.interval = max(0.2, min(5.0, stall_timeout / 4))
        self._stalled_since: dict[tuple[str, int], float] = {}
        # A sweep that raises is logged and the next one still runs: it must never take the
        # daemon down.
        self._checks = PeriodicTask(
            "stall-watch", self.interval, self.check, log=log, failure="stall check failed"
        )

    def check(self, now: float | None = None) -> int:
        """One sweep; returns how many abandoned streams were cancelled."""
        now = time.monotonic() if now is None else now
        still_stalled: dict[tuple[str, int], float] = {}
        cancelled = 0
        for client, info in self.connections.items():
            layer = info.http_layer
            if not isinstance(layer, AIBridgeHttpLayer):
                continue
            for stream_id, flow in layer.unread_response_streams():
                key = (client.id, stream_id)
                since = self._stalled_since.get(key, now)
                still_stalled[key] = since
                if now - since < self.stall_timeout:
                    continue
                handle = ClientConnection.of(client)
                if handle is None:
                    continue
                ctx = request_context(flow)
                log.warning(
                    "client stopped reading a stream for %.0fs without resetting it; "
                    "cancelling its upstream",
                    now - since,
                    extra={
                        "connect_id": info.connect_id,
                        "request_id": ctx.request_id if ctx else "",
                    },
                )
                handle.close_upstream(flow.server_conn)
                del still_stalled[key]
                cancelled += 1
        self._stalled_since = still_stalled
        return cancelled

    def running(self) -> None:
        self._checks.start()

    async def done(self) -> None:
        await self._checks.stop()
