"""Bounds on what one client connection can hold (issue 8, section 3).

- ``max_connections``: client connections beyond this many are refused as they arrive (a
  ``503`` on a plain-text listener, then the close), counted in
  ``client_connections_closed_total{reason="max_connections"}``.
- ``max_connections_per_address``: connections from one source address beyond this many are
  refused the same way (``reason="max_connections_per_address"``), so one address cannot take
  every slot of ``max_connections``.
- ``max_buffered_bytes``: sets the process-wide memory budget (``aibridgeproxyd.mitm.memory_budget``).
- ``request_head_timeout``: a request head must be complete within this long of the moment the
  proxy started waiting for it: the connection opened (the CONNECT or a plain-HTTP request; on a
  TLS listener, the handshake too), the CONNECT to a MITM'd host was answered (the TLS
  handshake inside the tunnel plus the first request), or, on HTTP/1.1 keep-alive, the previous
  response ended. A slow-loris client that sends a byte every few seconds is cut off all the
  same, because the deadline does not move with bytes.
- ``idle_timeout``: an HTTP/2 connection with no stream open, or a tunnel with no bytes in either
  direction, is closed after this long. While a request is in flight neither timer runs (the
  upstream's own time is bounded elsewhere).

Each connection has at most one timer (``loop.call_later``). A phase change only records the
new deadline; the timer is moved only when the deadline comes earlier, and re-armed when it
fires early, so a busy keep-alive connection costs no timer operation per request.

``max_request_head`` and ``max_request_body`` are enforced inside mitmproxy's HTTP layers
(``aibridgeproxyd.mitm.client_bounds``); this addon declares them as options and installs the bounded
layer on the proxy's own listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, ctx, http
from mitmproxy.proxy import layer, layers, server_hooks
from mitmproxy.proxy.context import Context

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.interception.state import ConnectionTable
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.client_bounds import (
    BoundedClientTLSLayer,
    BoundedHttpLayer,
    load_options,
    outer_http_layer,
)
from aibridgeproxyd.mitm.memory_budget import BUDGET, DEFAULT_MAX_BUFFERED_BYTES
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


class Phase(enum.Enum):
    HEAD = "waiting for a request head"
    BUSY = "request in flight"
    IDLE = "idle"
    TUNNEL = "tunnel"


@dataclass
class Watch:
    """The timing state of one client connection."""

    handler: Any  # mitmproxy's ProxyConnectionHandler
    phase: Phase
    since: float  # time.time() when the phase began
    flows: set[str] = field(default_factory=set)  # ids of flows in flight
    address: str = ""  # the client's source address (max_connections_per_address)
    timer: asyncio.TimerHandle | None = None
    timer_at: float = math.inf


class ClientLimits:
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
        handler = ctx.master.addons.get("proxyserver").connections.get(client.id)
        if handler is None:
            return
        if len(self.watches) >= self.max_connections:
            self._refuse(client, handler)
            return
        address = client.peername[0] if client.peername else ""
        if self.per_address.get(address, 0) >= self.max_connections_per_address:
            self._refuse(client, handler, "max_connections_per_address")
            return
        self.per_address[address] = self.per_address.get(address, 0) + 1
        self.watches[client.id] = Watch(handler, Phase.HEAD, time.time(), address=address)
        self.metrics.client_connections.set(len(self.watches))
        self._schedule(client.id)

    def _refuse(
        self, client: connection.Client, handler: Any, reason: str = "max_connections"
    ) -> None:
        self.metrics.client_connections_closed.labels(reason).inc()
        if self.plain_listener:
            # Best effort: a client that already sent its request may see a reset instead.
            with contextlib.suppress(Exception):
                handler.transports[client].writer.write(_TOO_MANY)
        # mitmproxy closes a client whose error is set in this hook, before reading from it.
        client.error = f"too many connections ({reason})"
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "refused %d client connection(s): %s (%d) reached",
                self._refused_since_log,
                reason,
                self.max_connections
                if reason == "max_connections"
                else self.max_connections_per_address,
            )
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
        _close_leftover_socket(watch.handler, client)

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        watch = self.watches.get(data.client.id)
        if watch is not None:
            _close_leftover_socket(watch.handler, data.server)

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
        if watch.phase is Phase.HEAD:
            return watch.since + self.request_head_timeout
        if watch.phase is Phase.IDLE:
            return watch.since + self.idle_timeout
        if watch.phase is Phase.TUNNEL:
            # mitmproxy records every event of the connection, bytes either way included.
            last = getattr(watch.handler.timeout_watchdog, "last_activity", watch.since)
            return max(watch.since, last) + self.idle_timeout
        return None

    def _schedule(self, client_id: str) -> None:
        watch = self.watches.get(client_id)
        if watch is None:
            return
        deadline = self._deadline(watch)
        if deadline is None or (watch.timer is not None and watch.timer_at <= deadline):
            return  # no deadline, or the pending timer fires first and re-arms
        if watch.timer is not None:
            watch.timer.cancel()
        delay = max(0.0, deadline - time.time())
        watch.timer = asyncio.get_running_loop().call_later(delay, self._expire, client_id)
        watch.timer_at = deadline

    def _expire(self, client_id: str) -> None:
        watch = self.watches.get(client_id)
        if watch is None:
            return
        watch.timer, watch.timer_at = None, math.inf
        deadline = self._deadline(watch)
        if deadline is None:
            return
        if deadline > time.time():
            self._schedule(client_id)
            return
        if watch.phase is not Phase.TUNNEL and _still_sending(watch.handler):
            # The last response is still on its way to a slow reader: not idle yet.
            watch.since = time.time()
            self._schedule(client_id)
            return
        reason = "request_head_timeout" if watch.phase is Phase.HEAD else "idle_timeout"
        self.metrics.client_connections_closed.labels(reason).inc()
        handler = watch.handler
        peer = handler.client.peername
        log.info(
            "closing client connection: %s (%s)",
            reason,
            watch.phase.value,
            extra={"client": f"{peer[0]}:{peer[1]}" if peer else ""},
        )
        with contextlib.suppress(KeyError, AttributeError):
            handler.close_connection(handler.client)

    # --- layers ---

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Bound the heads and bodies read on the listener itself (CONNECT, absolute-form
        requests) and every TLS ClientHello, and give MITM'd layers the client format their
        431 answers use."""
        proposed = nextlayer.layer
        parent: layer.Layer | None = None
        current: layer.Layer | None = proposed
        while current is not None:  # e.g. ClientTLSLayer, then HttpLayer on a TLS listener
            replacement: layer.Layer | None = None
            if type(current) is layers.HttpLayer and outer_http_layer(current.mode):
                replacement = _swap(current, functools.partial(BoundedHttpLayer, mode=current.mode))
            elif type(current) is layers.ClientTLSLayer:
                replacement = _swap(current, BoundedClientTLSLayer)
            if replacement is not None:
                if parent is None:
                    nextlayer.layer = replacement
                else:
                    parent.child_layer = replacement  # type: ignore[attr-defined]
                current = replacement
            parent, current = current, getattr(current, "child_layer", None)
        if isinstance(proposed, BoundedHttpLayer) and not outer_http_layer(proposed.mode):
            info = self.connections.get(nextlayer.context.client)
            provider = self.holder.current.provider_for_host(info.host) if info else None
            if provider is not None:
                proposed.error_format = ADAPTERS[provider.type].client_format


def _still_sending(handler: Any) -> bool:
    """Whether bytes for the client still wait in its transport's write buffer."""
    try:
        transport = handler.transports[handler.client].writer.transport
        return bool(transport.get_write_buffer_size())
    except (KeyError, AttributeError):
        return False


def _raise_file_limit(max_connections: int) -> None:
    """Each client connection holds a descriptor, and usually an upstream one: raise the soft
    RLIMIT_NOFILE towards the hard limit so ``max_connections`` is reachable, and say so when
    the hard limit is too low (accepting would fail with EMFILE before the cap refuses)."""
    wanted = 2 * max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
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


def _swap(proposed: layer.Layer, make: Callable[[Context], layer.Layer]) -> layer.Layer:
    """A bounded layer in place of a proposed one that has not started yet: same context, same
    place in the context's layer stack, same child."""
    context = proposed.context
    index = context.layers.index(proposed)
    # Constructing a layer appends it to the context's stack: take the proposal off first.
    context.layers.remove(proposed)
    replacement = make(context)
    context.layers.remove(replacement)
    context.layers.insert(index, replacement)
    child = getattr(proposed, "child_layer", None)
    if child is not None:
        replacement.child_layer = child  # type: ignore[attr-defined]
    return replacement


def _close_leftover_socket(handler: Any, conn: connection.Connection) -> None:
    """Close a socket mitmproxy's connection handler left open.

    mitmproxy 12.3 closes a connection by cancelling its reader task; when that task is waiting
    for the handler's event lock at that moment (another task, such as a hook's, is delivering
    an event that closes the connection), the cancellation escapes ``handle_connection`` before
    its ``writer.close()``. The task ends, the disconnect hooks run, and the socket stays open
    until garbage collection: file descriptors pile up under a storm of refused requests."""
    io = handler.transports.get(conn)
    if io is None or io.writer is None:
        return
    task = io.handler
    # The hook runs in the finished client task's caller, or inside a server connection's task
    # after its handle_connection returned: in both cases nobody else will close the socket.
    if task is not None and not task.done() and task is not asyncio.current_task():
        return
    with contextlib.suppress(Exception):
        if not io.writer.is_closing():
            io.writer.close()
