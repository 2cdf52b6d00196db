"""Cancel the upstream of an HTTP/2 stream the client abandoned without resetting it.

Some clients (httpx among them) stop reading a stream they no longer want without sending
RST_STREAM. The stream's flow-control window then stays shut, the proxy queues what the upstream
keeps sending, and the upstream keeps generating (and billing) tokens until the whole client
connection closes. A stream whose window stays shut for ``stall_timeout`` with data waiting is
treated as abandoned: its upstream connection is closed, which ends the flow like a client abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aibridgeproxyd.interception.state import ConnectionTable, request_context
from aibridgeproxyd.mitm.connections import ClientConnection
from aibridgeproxyd.mitm.http_layer import AIBridgeHttpLayer

log = logging.getLogger("aibridgeproxyd.stalls")


class StallWatch:
    def __init__(self, connections: ConnectionTable, stall_timeout: float) -> None:
        self.connections = connections
        self.stall_timeout = stall_timeout
        self.interval = max(0.2, min(5.0, stall_timeout / 4))
        self._stalled_since: dict[tuple[str, int], float] = {}
        self._task: asyncio.Task[None] | None = None

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
                request = request_context(flow)
                log.warning(
                    "client stopped reading a stream for %.0fs without resetting it; cancelling its upstream",
                    now - since,
                    extra={
                        "connect_id": info.connect_id,
                        "request_id": request.request_id if request else "",
                    },
                )
                handle.close_upstream(flow.server_conn)
                del still_stalled[key]
                cancelled += 1
        self._stalled_since = still_stalled
        return cancelled

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # a sweep must never take the daemon down
                log.exception("stall check failed")

    def running(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stall-watch")

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
