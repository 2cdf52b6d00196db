"""Bounds on what the streams of one client connection may hold (README.md#configuration).

- HTTP/2: the concurrent streams a client may open (``SETTINGS_MAX_CONCURRENT_STREAMS``), and how
  many streams it may reset within a window before the connection is cut off with GOAWAY
  ``ENHANCE_YOUR_CALM``. A reset stream stops counting against the concurrency limit at once
  (RFC 9113 section 5.1), so without a reset budget a client that loops HEADERS + RST_STREAM
  ("rapid reset", CVE-2023-44487) makes the proxy start unbounded work.
- WebSocket: the largest message relayed. mitmproxy assembles each message whole before
  relaying it, so an unbounded message is unbounded memory; beyond the limit the session is
  closed with status 1009 (message too big) before the message is assembled. The message being
  assembled is also held against the process budget (``max_buffered_bytes``): many sessions,
  each within the limit, add up; past the budget the session is closed with 1013 (try again
  later).
- Upstream time: how long a connection to the upstream may take to open (TCP and TLS), how long
  the upstream may take to send response headers, and how long it may stay silent once it has
  started answering.

The HTTP layer (``aibridgeproxyd.mitm.http_layer``) applies them; this module holds the values and
the pieces that do not depend on mitmproxy's stream state machine.
"""

from __future__ import annotations

import collections
import logging
import time
import zlib
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import h2.errors
import h2.events
import wsproto.events
from mitmproxy.proxy import events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import Http2Server
from mitmproxy.proxy.layers.http._http2 import StreamState
from mitmproxy.proxy.layers.websocket import WebsocketConnection, WebsocketLayer
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

from aibridgeproxyd.mitm.memory_budget import (
    BUDGET,
    H2_INITIAL_WINDOW,
    BufferBudget,
    ConnectionBytes,
    Reservation,
)

log = logging.getLogger("aibridgeproxyd.bounds")

MIB = 1024 * 1024


@dataclass(frozen=True)
class StreamBounds:
    """The limits, from the configuration keys of the same names (durations in seconds, sizes
    in bytes). The defaults are the configuration defaults."""

    http2_max_concurrent_streams: int = 100
    http2_max_resets: int = 200
    http2_reset_window: float = 10.0
    max_websocket_message: int = 16 * MIB
    upstream_connect_timeout: float = 30.0
    # Non-streaming reasoning requests can think for many minutes before the first byte.
    upstream_response_timeout: float = 600.0
    upstream_idle_timeout: float = 300.0

    @property
    def deadline_check_interval(self) -> float:
        """How often a connection with open streams checks their upstream deadlines: a quarter
        of the shorter timeout, between 50 ms and 5 s, so a deadline is noticed at most that
        late and an idle check costs nothing measurable."""
        shorter = min(
            self.upstream_connect_timeout,
            self.upstream_response_timeout,
            self.upstream_idle_timeout,
        )
        return max(0.05, min(5.0, shorter / 4))


DEFAULT_BOUNDS = StreamBounds()


class ResetBudget:
    """Counts the streams a client resets in a sliding window of ``window`` seconds.

    ``spend(now)`` records one reset and returns False once more than ``limit`` resets fall
    within the window. Memory is bounded by ``limit + 1`` timestamps."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._resets: collections.deque[float] = collections.deque(maxlen=limit + 1)

    def spend(self, now: float) -> bool:
        resets = self._resets
        while resets and now - resets[0] >= self.window:
            resets.popleft()
        resets.append(now)
        return len(resets) <= self.limit


class BoundedHttp2Server(Http2Server):
    """mitmproxy's HTTP/2 server side (the client's connection), with our concurrent stream
    limit advertised and a budget of stream resets. A client that resets more streams than
    the budget allows gets GOAWAY ``ENHANCE_YOUR_CALM`` and the connection is closed: every
    stream still open on it ends (its flow gets the error hook).

    It also reports a reset that arrives in the same read as the end of the request. mitmproxy
    12.3 stops tracking a stream at END_STREAM when hyper-h2 already shows it closed, which it
    does once it has processed the whole read, RST_STREAM included; the reset was then dropped
    and the request sent upstream as if nothing happened: exactly what a rapid-reset client
    sends (HEADERS with END_STREAM, then RST_STREAM)."""

    def __init__(self, context: Context, bounds: StreamBounds, connect_id: str = "") -> None:
        super().__init__(context)
        settings = self.h2_conn.local_settings
        settings.max_concurrent_streams = bounds.http2_max_concurrent_streams
        # mitmproxy advertises 2**31 - 1; see memory_budget.H2_INITIAL_WINDOW.
        settings.initial_window_size = H2_INITIAL_WINDOW
        # Applied before the connection preface is sent, so the first SETTINGS frame carries it
        # (mitmproxy's Http2Client does the same for enable_push).
        settings.acknowledge()
        self.reset_budget = ResetBudget(bounds.http2_max_resets, bounds.http2_reset_window)
        self.connect_id = connect_id
        # Streams mitmproxy stopped tracking at END_STREAM during the current read.
        self._untracked_in_this_read: set[int] = set()

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        try:
            yield from super()._handle_event(event)
        finally:
            self._untracked_in_this_read.clear()

    def handle_h2_event(self, event: h2.events.Event) -> layer.CommandGenerator[bool]:
        if isinstance(event, h2.events.StreamEnded):
            tracked = event.stream_id in self.streams
            stop = yield from super().handle_h2_event(event)
            if tracked and event.stream_id not in self.streams:
                self._untracked_in_this_read.add(event.stream_id)
            return stop
        if isinstance(event, h2.events.StreamReset):
            if event.stream_id in self._untracked_in_this_read:
                self._untracked_in_this_read.discard(event.stream_id)
                self.streams[event.stream_id] = StreamState.HEADERS_RECEIVED
            if event.stream_id in self.streams and not self.reset_budget.spend(time.monotonic()):
                yield from self._refuse_more_resets()
                return True
        return (yield from super().handle_h2_event(event))

    def _refuse_more_resets(self) -> layer.CommandGenerator[None]:
        budget = self.reset_budget
        log.warning(
            "client reset more than %d streams within %gs; closing its connection "
            "(GOAWAY ENHANCE_YOUR_CALM)",
            budget.limit,
            budget.window,
            extra={"connect_id": self.connect_id},
        )
        yield from self.protocol_error(
            f"more than {budget.limit} streams reset within {budget.window:g}s",
            error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
        )


# --- WebSocket messages ---------------------------------------------------------------------

MESSAGE_TOO_BIG = 1009  # RFC 6455 section 7.4.1
# IANA's WebSocket close code registry (RFC 6455 section 11.7): a temporary condition.
TRY_AGAIN_LATER = 1013


# Bytes: a received fragment shorter than this is joined to the next one instead of kept on its
# own (mitmproxy's Fragmentizer.FRAGMENT_SIZE, the size it cuts a message it rewrote into).
JOIN_FRAGMENTS_BELOW = 4000


class _Fragments(list[bytearray]):
    """mitmproxy's ``frame_buf`` (the fragments of the message being received), holding
    bytearrays: its ``frame_buf[-1] += data`` then appends in place, where with bytes it copied
    the whole message so far for every read (quadratic: a 16 MiB message took a minute).

    mitmproxy keeps one buffer per frame, and relays the message in the same fragments. A
    fragment shorter than ``JOIN_FRAGMENTS_BELOW`` takes the next frame's bytes instead of a new
    buffer: a message in empty continuation frames (2 bytes each on the wire) held a buffer of
    about 60 bytes per frame, without bound since the message never grew, and one in 1-byte
    fragments 60 times its size. The boundaries carry no meaning (RFC 6455 section 5.4: an
    intermediary may coalesce fragments); fragments of a text message still end between
    characters (they are whole decoded pieces)."""

    def __init__(self, fragments: Iterable[bytes] = ()) -> None:
        super().__init__(bytearray(fragment) for fragment in fragments)

    def append(self, fragment: bytes) -> None:  # type: ignore[override]
        if self and len(self[-1]) < JOIN_FRAGMENTS_BELOW:
            self[-1] += fragment
        else:
            super().append(bytearray(fragment))


class _SizeLimitedWebsocketConnection(WebsocketConnection):
    """A WebsocketConnection whose ``events()`` stops at the first message that grows beyond
    ``max_message_size`` bytes, or that the process budget cannot hold, and reports a close
    with status 1009 (or 1013) in its place, so that mitmproxy's relay closes both sides
    instead of assembling the message. The fragments received so far are dropped with the
    session; nothing of the message has been relayed, since mitmproxy relays a message only
    once it is complete. ``held``: the message's bytes against the budget, given back when it
    is complete (relayed), when the session closes (its fragments are dropped then), or at the
    latest when the connection object is freed."""

    max_message_size: int
    message_size: int
    held: Reservation
    log_extra: Mapping[str, Any]
    side: str

    @property  # type: ignore[override]
    def frame_buf(self) -> _Fragments:
        return self._fragments

    @frame_buf.setter
    def frame_buf(self, fragments: Iterable[bytes]) -> None:
        self._fragments = _Fragments(fragments)

    def events(self) -> Generator[wsproto.events.Event]:
        for event in super().events():
            if isinstance(event, wsproto.events.Message):
                refusal = self._hold(event.data)
                if refusal is not None:
                    self._drop_message()
                    yield refusal
                    return
                if event.message_finished:
                    self.message_size = 0
                    self.held.release()
            elif isinstance(event, wsproto.events.CloseConnection):
                # A close frame, or the connection lost (1006): no more of the message comes.
                self._drop_message()
            yield event

    def _drop_message(self) -> None:
        self.frame_buf = [b""]  # as mitmproxy leaves it between messages
        self.held.release()

    def _hold(self, data: bytes | str) -> wsproto.events.CloseConnection | None:
        """Count a received piece of the message; the close that ends the session when the
        message grows beyond its limit or the budget refuses it, else None."""
        size = len(data) if isinstance(data, bytes) else len(data.encode())
        self.message_size += size
        if self.message_size > self.max_message_size:
            _log_too_big(self.side, self.max_message_size, self.log_extra)
            return wsproto.events.CloseConnection(code=MESSAGE_TOO_BIG, reason="message too big")
        if self.held.grow(size, self.max_message_size) is not None:
            log.warning(
                "WebSocket message from the %s refused: max_buffered_bytes (%d bytes) is "
                "spent; closing the session with 1013",
                self.side,
                self.held.budget.limit,
                extra=dict(self.log_extra),
            )
            return wsproto.events.CloseConnection(code=TRY_AGAIN_LATER, reason="try again later")
        return None


class _SizeLimitedDeflate(PerMessageDeflate):
    """permessage-deflate (RFC 7692) that inflates a message only up to ``max_message_size``.
    wsproto inflates each received chunk whole: 64 KiB of a compressed run of one byte is
    tens of MiB, before any size check could look at it."""

    max_message_size: int
    message_size: int
    log_extra: Mapping[str, Any]
    side: str

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        if opcode is not Opcode.CONTINUATION and not opcode.iscontrol():
            self.message_size = 0
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        # PerMessageDeflate's private state: wsproto inflates a chunk whole, with no hook.
        decompressor = self._decompressor
        if (
            not self._inbound_compressed
            or not self._inbound_is_compressible
            or decompressor is None
        ):
            return super().frame_inbound_payload_data(proto, data)
        budget = self.max_message_size - self.message_size
        try:
            inflated = decompressor.decompress(bytes(data), budget + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if len(inflated) > budget:
            _log_too_big(self.side, self.max_message_size, self.log_extra)
            return CloseReason.MESSAGE_TOO_BIG
        self.message_size += len(inflated)
        return inflated


def _log_too_big(side: str, limit: int, extra: Mapping[str, Any]) -> None:
    log.warning(
        "WebSocket message from the %s exceeds max_websocket_message (%d bytes); "
        "closing the session with 1009",
        side,
        limit,
        extra=dict(extra),
    )


def limit_websocket_messages(
    websocket_layer: WebsocketLayer,
    max_message_size: int,
    log_extra: Mapping[str, Any],
    budget: BufferBudget = BUDGET,
) -> None:
    """Bound the size of messages either side of a started WebsocketLayer may send, and hold
    the message each side is sending against ``budget`` (bytes; the process's by default).

    Call right after the layer received ``Start`` (its two connections exist then) and before
    it receives any data. The connections' class is switched rather than the layer's start
    rewritten, because ``WebsocketLayer.start`` creates them itself (mitmproxy 12.3)."""
    for connection, side in (
        (websocket_layer.client_ws, "client"),
        (websocket_layer.server_ws, "upstream"),
    ):
        fragments = vars(connection).pop("frame_buf")
        connection.__class__ = _SizeLimitedWebsocketConnection
        assert isinstance(connection, _SizeLimitedWebsocketConnection)
        connection.frame_buf = fragments
        connection.max_message_size = max_message_size
        connection.message_size = 0
        connection.held = Reservation(budget, ConnectionBytes())
        connection.held.attach(connection)
        connection.log_extra = log_extra
        connection.side = side
        # wsproto's private _proto holds the negotiated extensions; there is no public view.
        for extension in connection._proto.extensions:
            if type(extension) is PerMessageDeflate:
                extension.__class__ = _SizeLimitedDeflate
                assert isinstance(extension, _SizeLimitedDeflate)
                extension.max_message_size = max_message_size
                extension.message_size = 0
                extension.log_extra = log_extra
                extension.side = side


__all__ = [
    "DEFAULT_BOUNDS",
    "MESSAGE_TOO_BIG",
    "BoundedHttp2Server",
    "ResetBudget",
    "StreamBounds",
    "limit_websocket_messages",
]
