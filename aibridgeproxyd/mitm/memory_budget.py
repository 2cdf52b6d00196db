"""Bounds on the memory clients can make the proxy hold across streams and connections.

Per-request bounds (``max_request_body``, ``max_websocket_message``) do not bound the sum: many
streams on one connection, or many connections, each within their limit, add up. This module
holds the pieces that bound the sum:

- ``BufferBudget``: the process-wide budget (``max_buffered_bytes``) for buffered request bodies,
  HTTP/2 response bytes not yet sent to a client, and WebSocket messages being assembled
  (``aibridgeproxyd.mitm.stream_bounds``). A request body that would cross it is
  refused with 503 (retryable) instead of being buffered; the bytes are given back when the
  flow ends (response, error, abort), or at the latest when its stream object is freed.
- ``ConnectionBytes``: the request body bytes one client connection may buffer across all its
  streams (``max_request_body``: one connection holds at most what one request may).
- HTTP/2 response backpressure (``ResponseBackpressure``): mitmproxy's HTTP/2 layer buffers
  what the client's flow-control window does not admit, without limit, and keeps reading the
  upstream. Our upstream leg is one HTTP/1.1 connection per stream, so reading its socket is
  paused while the stream's unsent bytes exceed ``STREAM_UNSENT_HIGH`` (or the connection's
  exceed ``CONNECTION_UNSENT_HIGH``, or the process budget is spent) and resumed once the client
  has taken them below ``STREAM_UNSENT_LOW``. TCP then pushes back on the upstream, as it does
  for an HTTP/1.1 client.
- ``H2_INITIAL_WINDOW``: the receive window advertised to HTTP/2 clients (mitmproxy's is
  2**31 - 1 bytes, so a client never waits).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any

from mitmproxy.connection import Connection

from aibridgeproxyd.mitm.connections import ClientConnection

log = logging.getLogger("aibridgeproxyd.limits")

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

DEFAULT_MAX_BUFFERED_BYTES = 1 * GIB
# A stream's own receive window: enough for a fast upload on a long path (1 MiB per round trip),
# small against max_request_body. The connection window stays mitmproxy's (it acknowledges each
# DATA frame as it arrives, so the window only bounds bytes in flight, never bytes held).
H2_INITIAL_WINDOW = 1 * MIB
# Unsent response bytes of one HTTP/2 stream beyond which its upstream is no longer read, and
# below which reading resumes. 1 MiB is several seconds of the fastest token stream, and a few
# HTTP/2 windows: a client that reads slowly loses no throughput, it only stops the proxy from
# reading ahead of it.
STREAM_UNSENT_HIGH = 1 * MIB
STREAM_UNSENT_LOW = 256 * KIB
# The same for the sum over one connection's streams (100 concurrent streams x 1 MiB would be
# 100 MiB per connection).
CONNECTION_UNSENT_HIGH = 8 * MIB
# Released bytes after which the housekeeping returns memory to the system.
SWEEP_AFTER_RELEASED = 16 * MIB


class BufferBudget:
    """A count of bytes held against ``limit`` (bytes). ``take`` refuses what would cross the
    limit; ``adjust`` records bytes held whatever the limit (response bytes, which are paused
    rather than refused). ``released`` counts bytes given back since the housekeeping last
    reset it."""

    def __init__(self, limit: int = DEFAULT_MAX_BUFFERED_BYTES) -> None:
        self.limit = limit
        self.used = 0
        self.released = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def adjust(self, delta: int) -> None:
        self.used += delta
        if delta < 0:
            self.released -= delta

    def give_back(self, size: int) -> None:
        self.adjust(-size)

    @property
    def exhausted(self) -> bool:
        return self.used >= self.limit


# The process-wide budget; its limit is set from ``max_buffered_bytes`` by the client limits addon.
BUDGET = BufferBudget()


class ConnectionBytes:
    """Request body bytes buffered by the streams of one client connection."""

    def __init__(self) -> None:
        self.used = 0


class Reservation:
    """The request body bytes one stream holds against the process budget and its connection.

    ``grow(size, connection_limit)`` returns None when the bytes were taken, else the name of
    the bound that refused them (``"max_buffered_bytes"`` or ``"connection"``). ``release`` is
    idempotent; it also runs when the owner is garbage collected (``attach``), so no path that
    forgets to release leaks budget."""

    def __init__(self, budget: BufferBudget, connection: ConnectionBytes) -> None:
        self.budget = budget
        self.connection = connection
        self.held = 0

    def attach(self, owner: object) -> None:
        weakref.finalize(owner, self.release)

    def grow(self, size: int, connection_limit: int) -> str | None:
        if self.connection.used + size > connection_limit:
            return "connection"
        if not self.budget.take(size):
            return "max_buffered_bytes"
        self.connection.used += size
        self.held += size
        return None

    def release(self) -> None:
        held, self.held = self.held, 0
        if held:
            self.connection.used -= held
            self.budget.give_back(held)


def unsent_bytes(h2_conn: Any) -> dict[int, int]:
    """Bytes mitmproxy's ``BufferedH2Connection`` holds per stream id, waiting for the peer's
    flow-control window (its ``stream_buffers``: deques of ``SendH2Data(data, end_stream)``)."""
    return {
        stream_id: sum(len(chunk.data) for chunk in chunks)
        for stream_id, chunks in h2_conn.stream_buffers.items()
        if chunks
    }


def _transport(client: Connection, conn: Connection) -> Any:
    """The asyncio transport of ``conn`` (an upstream connection of ``client``), or None."""
    handle = ClientConnection.of(client)
    return handle.transport(conn) if handle is not None else None


class ResponseBackpressure:
    """Pauses and resumes reading the upstream connections of one HTTP/2 client connection.

    ``update(h2_conn, streams)`` takes the client's ``BufferedH2Connection`` and the streams
    whose upstream may be paused, as ``{stream_id: upstream connection or None}``; call it after
    every event of the connection. It also reports the connection's unsent bytes to the process
    budget. ``close()`` resumes everything and gives the budget back."""

    # Stands for a closed one, in place of a new one, once the client connection is done.
    CLOSED: ResponseBackpressure

    def __init__(self, client: Connection | None, budget: BufferBudget = BUDGET) -> None:
        self.client = client
        self.budget = budget
        self.reported = 0
        self.paused: dict[Connection, Any] = {}  # upstream connection -> its transport

    def update(self, h2_conn: Any, streams: dict[int, Connection | None]) -> None:
        unsent = unsent_bytes(h2_conn)
        total = sum(unsent.values())
        self.budget.adjust(total - self.reported)
        self.reported = total
        wanted: set[Connection] = set()
        for stream_id, upstream in streams.items():
            if upstream is None:
                continue
            held = unsent.get(stream_id, 0)
            if upstream in self.paused:
                still = held > STREAM_UNSENT_LOW or (
                    held > 0 and (total > CONNECTION_UNSENT_HIGH // 2 or self.budget.exhausted)
                )
            else:
                still = held > STREAM_UNSENT_HIGH or (
                    held > 0 and (total > CONNECTION_UNSENT_HIGH or self.budget.exhausted)
                )
            if still:
                wanted.add(upstream)
        for upstream in list(self.paused):
            if upstream not in wanted:
                self._resume(upstream)
        for upstream in wanted:
            self._pause(upstream)

    def _pause(self, upstream: Connection) -> None:
        if self.client is None:
            return
        transport = self.paused.get(upstream) or _transport(self.client, upstream)
        if transport is None:
            return
        # asyncio's StreamReader resumes a transport it paused itself once its buffer drains:
        # checked on every event, so a pause it undid is applied again at the next read.
        with contextlib.suppress(Exception):
            if transport.is_reading():
                transport.pause_reading()
        self.paused[upstream] = transport

    def _resume(self, upstream: Connection) -> None:
        transport = self.paused.pop(upstream)
        with contextlib.suppress(Exception):
            if not transport.is_closing() and not transport.is_reading():
                transport.resume_reading()

    def close(self) -> None:
        """Resume every paused upstream (its stream is ending with the client) and give the
        budget back. Idempotent."""
        for upstream in list(self.paused):
            self._resume(upstream)
        self.budget.adjust(-self.reported)
        self.reported = 0


ResponseBackpressure.CLOSED = ResponseBackpressure(None, BufferBudget())


__all__ = [
    "BUDGET",
    "CONNECTION_UNSENT_HIGH",
    "DEFAULT_MAX_BUFFERED_BYTES",
    "H2_INITIAL_WINDOW",
    "STREAM_UNSENT_HIGH",
    "STREAM_UNSENT_LOW",
    "BufferBudget",
    "ConnectionBytes",
    "Reservation",
    "ResponseBackpressure",
    "unsent_bytes",
]
