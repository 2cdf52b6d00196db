"""A WebSocket upstream on raw TLS sockets that answers an upgrade however a test scripts it, so
it can break RFC 6455 and RFC 7692 in ways no server library would let it:

    with HostileWebSocketUpstream() as up:
        up.behave = lambda session: session.sock.sendall(session.accept() + frame(BINARY, ...))
        ...   # open a WebSocket through the proxy to a provider with base_url=up.base_url

``behave`` runs on the upgrade's connection, after the request was read, with a ``Session``: the
socket, the request line and header fields, and ``accept()`` (a correct 101 head). When it
returns, the connection is closed. ``sessions`` holds every Session served; each records the
frames the upstream read (``received``) when the script calls ``read_frames``.

``frame`` builds one frame byte for byte (RFC 6455 section 5.2): any opcode, FIN, RSV1, mask.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .raw_http import RawHttpUpstream, read_request

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bool = False,
    rsv1: bool = False,
) -> bytes:
    """One WebSocket frame. A client must mask (``mask=True``: an all-zero key, so the payload
    stays readable), a server must not."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    masked = 0x80 if mask else 0
    size = len(payload)
    if size < 126:
        head = bytes([first, masked | size])
    elif size < 1 << 16:
        head = bytes([first, masked | 126]) + struct.pack("!H", size)
    else:
        head = bytes([first, masked | 127]) + struct.pack("!Q", size)
    return head + (b"\0\0\0\0" if mask else b"") + payload


def accept_value(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


@dataclass
class Session:
    """One upgrade the upstream read: what a script needs to answer it."""

    sock: socket.socket
    request_line: str
    headers: dict[str, str]
    received: list[tuple[int, bytes]] = field(default_factory=list)

    def accept(self, extra: str = "") -> bytes:
        """A 101 head accepting the upgrade; ``extra``: more header lines, each ending CRLF."""
        value = accept_value(self.headers.get("sec-websocket-key", ""))
        return (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {value}\r\n{extra}\r\n"
        ).encode()

    def read_frames(self, until_opcode: int = CLOSE, timeout: float = 10.0) -> None:
        """Read (unmasked) frames into ``received`` until one of ``until_opcode`` or EOF."""
        self.sock.settimeout(timeout)
        buffer = b""
        while True:
            parsed = _parse(buffer)
            if parsed is None:
                data = self.sock.recv(65536)
                if not data:
                    return
                buffer += data
                continue
            opcode, payload, buffer = parsed
            self.received.append((opcode, payload))
            if opcode == until_opcode:
                return


def _parse(buffer: bytes) -> tuple[int, bytes, bytes] | None:
    if len(buffer) < 2:
        return None
    size, offset = buffer[1] & 0x7F, 2
    if size == 126:
        if len(buffer) < 4:
            return None
        size, offset = struct.unpack("!H", buffer[2:4])[0], 4
    elif size == 127:
        if len(buffer) < 10:
            return None
        size, offset = struct.unpack("!Q", buffer[2:10])[0], 10
    key = b""
    if buffer[1] & 0x80:
        key, offset = buffer[offset : offset + 4], offset + 4
    if len(buffer) < offset + size:
        return None
    payload = buffer[offset : offset + size]
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return buffer[0] & 0x0F, payload, buffer[offset + size :]


class HostileWebSocketUpstream(RawHttpUpstream):
    """Serves every upgrade with ``behave`` (see the module docstring)."""

    name = "hostile-ws"
    handle_timeout = 30.0

    def __init__(self) -> None:
        super().__init__(tls=True)
        self.behave: Callable[[Session], None] = lambda session: None
        self.sessions: list[Session] = []
        self.done = threading.Event()  # set each time a script returns
        self._running = 0
        self._idle = threading.Condition(self._lock)

    def wait_idle(self, timeout: float = 15.0) -> bool:
        """Wait until no script runs (one a test left behind ends before the next test)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout)

    def _one_exchange(self, sock: socket.socket, number: int) -> bool:
        request = read_request(sock)
        if request is None:
            return False
        session = Session(sock, request[0], request[1])
        with self._lock:
            self.sessions.append(session)
            self._running += 1
        try:
            self.behave(session)
        finally:
            sock.close()  # the session holds the TLS socket: closing the raw one would not
            with self._idle:
                self._running -= 1
                self._idle.notify_all()
            self.done.set()
        return False
