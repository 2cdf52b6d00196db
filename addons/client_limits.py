"""Bounds on what one client connection can hold (README.md#configuration).

- ``max_connections``: client connections beyond this many are refused as they arrive (a
  ``503`` on a plain-text listener, then the close), counted in
  ``client_connections_closed_total{reason="max_connections"}``.
- ``max_connections_per_address``: connections from one source address beyond this many are
  refused the same way (``reason="max_connections_per_address"``), so one address cannot take
  every slot of ``max_connections``.
- ``max_buffered_bytes``: sets the process-wide memory budget
  (``aibridgeproxyd.mitm.memory_budget``).
- ``request_head_timeout``: a request head must be complete within this long of the moment the
  proxy started waiting for it: the connection opened (the CONNECT or a plain-HTTP request; on a
  TLS listener, the handshake too), the CONNECT to a MITM'd host was answered (the TLS
  handshake inside the tunnel plus the first request), or, on HTTP/1.1 keep-alive, the previous
  response ended. A slow-loris client that sends a byte every few seconds is cut off all the
  same, because the deadline does not move with bytes.
- ``idle_timeout``: an HTTP/2 connection with no stream open, or a tunnel or WebSocket session
  with no bytes in either direction (pings count), is closed after this long. While a request
  is in flight neither timer runs (the upstream's own time is bounded elsewhere).

Each connection has at most one timer (``loop.call_later``). A phase change only records the
new deadline; the timer is moved only when the deadline comes earlier, and re-armed when it
fires early, so a busy keep-alive connection costs no timer operation per request.

``max_request_head`` and ``max_request_body`` are enforced inside mitmproxy's HTTP layers
(``aibridgeproxyd.mitm.client_bounds``); this addon declares them as options and installs the
bounded layer on the proxy's own listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, http

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.client_timeouts import Expiry, Phase, deadline, on_timer, timeout_reason
from aibridgeproxyd.interception.state import ConnectionTable
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.client_bounds import load_options
from aibridgeproxyd.mitm.connections import ClientConnection
from aibridgeproxyd.mitm.hooks import NextLayer, ServerConnectionHookData
from aibridgeproxyd.mitm.layers import bound_client_layers, tunnel_http_layer
from aibridgeproxyd.mitm.memory_budget import BUDGET, DEFAULT_MAX_BUFFERED_BYTES
from aibridgeproxyd.mitm.splice_relay import descriptors_wanted
from aibridgeproxyd.mitm.stream_bounds import DEFAULT_BOUNDS, StreamBounds
from aibridgeproxyd.reload import SnapshotHolder

log = logging.getLogger("aibridgeproxyd.limits")

# One log line per interval for refusals at the connection cap, with the count since the last.
REFUSAL_LOG_INTERVAL = 10.0

_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain\r\n"
    b"Connection: close\r\n"
    b"Content-Length: 43\r\n\r\n"
    b"Too many connections to this proxy; retry.\n"
)


@dataclass
class Watch:
    """The timing state of one client connection."""

    handle: ClientConnection
    phase: Phase
    since: float  # time.time() when the phase began
    flows: set[str] = field(default_factory=set)  # ids of flows in flight
    address: str = ""  # the client's source address (max_connections_per_address)
    timer: asyncio.TimerHandle | None = None
    timer_at: float = math.inf


class ClientLimits:
    """Enforces the connection limits and the head and idle timeouts: counts connections
    (``client_connected``/``client_disconnected``) and moves each through its ``Phase`` on the
    request hooks; bounds mitmproxy's listener layer (``next_layer``)."""

    def __init__(
        self,
        holder: SnapshotHolder,
        connections: ConnectionTable,
        metrics: Metrics,
        *,
        max_connections: int,
        request_head_timeout: float,
        idle_timeout: float,
        plain_listener: bool = True,
        max_connections_per_address: int | None = None,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        stream_bounds: StreamBounds = DEFAULT_BOUNDS,
    ) -> None:
        self.holder = holder
        self.connections = connections
        self.metrics = metrics
        self.max_connections = max_connections
        self.request_head_timeout = request_head_timeout
        self.idle_timeout = idle_timeout
        self.plain_listener = plain_listener
        self.max_connections_per_address = max_connections_per_address or max_connections
        self.max_buffered_bytes = max_buffered_bytes
        self.stream_bounds = stream_bounds
        self.watches: dict[str, Watch] = {}
        self.per_address: dict[str, int] = {}
        self._refused_since_log = 0
        self._last_refusal_log = -math.inf

    def load(self, loader: Any) -> None:
        load_options(loader)

    def running(self) -> None:
        _raise_file_limit(self.max_connections)
        BUDGET.limit = self.max_buffered_bytes

    # --- connection count ---

    def client_connected(self, client: connection.Client) -> None:
        handle = ClientConnection.of(client)
        if handle is None:
            return
        if len(self.watches) >= self.max_connections:
            self._refuse(client, handle)
            return
        address = client.peername[0] if client.peername else ""
        if self.per_address.get(address, 0) >= self.max_connections_per_address:
            self._refuse(client, handle, "max_connections_per_address")
            return
        self.per_address[address] = self.per_address.get(address, 0) + 1
        self.watches[client.id] = Watch(handle, Phase.HEAD, time.time(), address=address)
        self.metrics.client_connections.set(len(self.watches))
        self._schedule(client.id)

    def _refuse(
        self, client: connection.Client, handle: ClientConnection, reason: str = "max_connections"
    ) -> None:
        self.metrics.client_connections_closed.labels(reason).inc()
        if self.plain_listener:
            handle.write(_TOO_MANY)
        # mitmproxy closes a client whose error is set in this hook, before reading from it.
        client.error = f"too many connections ({reason})"
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            per_address = reason != "max_connections"
            limit = self.max_connections_per_address if per_address else self.max_connections
            count = self._refused_since_log
            log.warning("refused %d client connection(s): %s (%d) reached", count, reason, limit)
            self._refused_since_log = 0
            self._last_refusal_log = now

    def client_disconnected(self, client: connection.Client) -> None:
        watch = self.watches.pop(client.id, None)
        if watch is None:
            return
        self._forget_address(watch.address)
        if watch.timer is not None:
            watch.timer.cancel()
        self.metrics.client_connections.set(len(self.watches))
        watch.handle.close_leftover_socket(client)

    def server_disconnected(self, data: ServerConnectionHookData) -> None:
        watch = self.watches.get(data.client.id)
        if watch is not None:
            watch.handle.close_leftover_socket(data.server)

    def _forget_address(self, address: str) -> None:
        left = self.per_address.get(address, 0) - 1
        if left > 0:
            self.per_address[address] = left
        else:
            self.per_address.pop(address, None)

    # --- phases ---

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._enter(flow.client_conn, Phase.BUSY)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        info = self.connections.get(flow.client_conn)
        # A MITM'd tunnel must now complete its TLS handshake and first request head.
        intercepted = info is not None and info.intercept
        self._enter(flow.client_conn, Phase.HEAD if intercepted else Phase.TUNNEL)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        watch = self.watches.get(flow.client_conn.id)
        if watch is not None:
            watch.flows.add(flow.id)
            self._enter(flow.client_conn, Phase.BUSY)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:  # a WebSocket stays in flight until websocket_end
            self._flow_ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._flow_ended(flow)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        # The upgrade request's flow stays in flight until websocket_end: idle time counts from
        # here, from the last byte either way, as a tunnel's does.
        self._enter(flow.client_conn, Phase.WEBSOCKET)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._flow_ended(flow)

    def _flow_ended(self, flow: http.HTTPFlow) -> None:
        watch = self.watches.get(flow.client_conn.id)
        if watch is None:
            return
        watch.flows.discard(flow.id)
        if watch.flows:
            return
        # HTTP/1.1 waits for the next head; HTTP/2 has no head between streams, only idleness.
        next_phase = Phase.IDLE if flow.client_conn.alpn == b"h2" else Phase.HEAD
        self._enter(flow.client_conn, next_phase)

    def _enter(self, client: connection.Client, phase: Phase) -> None:
        watch = self.watches.get(client.id)
        if watch is None:
            return
        watch.phase, watch.since = phase, time.time()
        self._schedule(client.id)

    # --- the timer ---

    def _deadline(self, watch: Watch) -> float | None:
        # mitmproxy records every event of the connection, bytes either way included.
        last_activity = watch.handle.last_activity
        head, idle = self.request_head_timeout, self.idle_timeout
        return deadline(watch.phase, watch.since, head, idle, last_activity)

    def _schedule(self, client_id: str) -> None:
        watch = self.watches.get(client_id)
        if watch is None:
            return
        due = self._deadline(watch)
        if due is None or (watch.timer is not None and watch.timer_at <= due):
            return  # no deadline, or the pending timer fires first and re-arms
        if watch.timer is not None:
            watch.timer.cancel()
        delay = max(0.0, due - time.time())
        watch.timer = asyncio.get_running_loop().call_later(delay, self._expire, client_id)
        watch.timer_at = due

    def _expire(self, client_id: str) -> None:
        # A timer callback, not a hook: the fail-closed guard does not see it, so it fails
        # closed itself. A connection whose deadline cannot be worked out is closed, never left
        # without one (a slow client would otherwise hold its slot for good).
        watch = self.watches.get(client_id)
        if watch is None:
            return
        try:
            self._expire_watch(client_id, watch)
        except Exception:
            log.exception("client timeout check failed; closing the connection")
            with contextlib.suppress(Exception):
                watch.handle.close()

    def _expire_watch(self, client_id: str, watch: Watch) -> None:
        watch.timer, watch.timer_at = None, math.inf
        due = self._deadline(watch)
        if due is None:
            return
        expiry = on_timer(watch.phase, due, time.time(), watch.handle.still_sending)
        if expiry is Expiry.CLOSE:
            self._close(watch)
            return
        if expiry is Expiry.STILL_SENDING:
            watch.since = time.time()
        self._schedule(client_id)

    def _close(self, watch: Watch) -> None:
        reason = timeout_reason(watch.phase)
        self.metrics.client_connections_closed.labels(reason).inc()
        handle = watch.handle
        peer = handle.client.peername
        log.info(
            "closing client connection: %s (%s)",
            reason,
            watch.phase.value,
            extra={"client": f"{peer[0]}:{peer[1]}" if peer else ""},
        )
        with contextlib.suppress(KeyError, AttributeError):
            handle.close()

    # --- layers ---

    def next_layer(self, nextlayer: NextLayer) -> None:
        """Bound the heads and bodies read on the listener itself (CONNECT, absolute-form
        requests), its requests' upstream time and every TLS ClientHello, and give MITM'd
        layers the client format their 431 answers use."""
        bound_client_layers(nextlayer, self.stream_bounds)
        http_layer = tunnel_http_layer(nextlayer)
        info = self.connections.get(nextlayer.context.client)
        if http_layer is None or info is None:
            return
        provider = self.holder.current.provider_for_host(info.host)
        if provider is not None:
            http_layer.error_format = ADAPTERS[provider.type].client_format


def _raise_file_limit(max_connections: int) -> None:
    """Each client connection holds a descriptor, and usually an upstream one: raise the soft
    RLIMIT_NOFILE towards the hard limit so ``max_connections`` is reachable, and say so when
    the hard limit is too low (accepting would fail with EMFILE before the cap refuses). Raised
    for spliced tunnels' pipes too if it can (they only use what the sockets leave)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted, raise_to = (descriptors_wanted(max_connections, with_pipes=p) for p in (False, True))
    if soft != resource.RLIM_INFINITY and soft < raise_to:
        new_soft = raise_to if hard == resource.RLIM_INFINITY else min(raise_to, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "open file limit %d is below what max_connections %d needs (%d); "
            "raise LimitNOFILE / ulimit -n or lower max_connections",
            soft,
            max_connections,
            wanted,
        )
