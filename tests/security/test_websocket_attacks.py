"""Attacker-style end-to-end tests of MITM'd WebSocket sessions, from both sides: a client and
an upstream that break RFC 6455 and RFC 7692 on purpose (fragments, control frames, compression,
the upgrade answer, hostile usage messages).

The real daemon, real TLS through the CONNECT tunnel, a raw-socket WebSocket client (frames byte
for byte) or the ``websockets`` client, and ``HostileWebSocketUpstream`` scripted per test. Each
test checks what the proxy must keep whatever arrives: no traceback, no hang, memory bounded per
connection (peak RSS, generous margins), the session recorded, no key in the logs or sent to the
client.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.hostile_websocket import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    TEXT,
    HostileWebSocketUpstream,
    Session,
    accept_value,
    frame,
)
from tests.harness import DaemonProcess, open_tls_tunnel, trust

KEY = "sk-ws-central-key-0123456789"
SECOND_KEY = "sk-ws-second-key-9876543210"
BYOK = "sk-ws-client-own-key-abcdef"
DEFLATE = "Sec-WebSocket-Extensions: permessage-deflate\r\n"
MIB = 1024 * 1024


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _deflated(data: bytes) -> bytes:
    """``data`` as one permessage-deflate message payload (RFC 7692 section 7.2.1)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


# --- the client side ----------------------------------------------------------------------------


class RawClient:
    """A WebSocket client on a raw TLS socket through the proxy: sends frames as given (masked
    with a zero key), reads the upgrade answer and then whatever the proxy sends."""

    def __init__(self, daemon: DaemonProcess, head: bytes, sock: socket.socket) -> None:
        self.daemon = daemon
        self.sock = sock
        head_bytes, _, self.after_head = head.partition(b"\r\n\r\n")
        self.status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)
        }

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def read_all(self, timeout: float = 15.0) -> bytes:
        """Everything until the proxy closes the connection (TimeoutError if it does not)."""
        self.sock.settimeout(timeout)
        data = self.after_head
        while chunk := self.sock.recv(65536):
            data += chunk
        return data

    def read_body(self) -> bytes:
        """The body of an answer that is no 101 (``Content-Length`` bytes)."""
        body = self.after_head
        while len(body) < int(self.headers["content-length"]):
            body += self.sock.recv(65536)
        return body

    def close_code(self, timeout: float = 15.0) -> int | None:
        """The code of the close frame the proxy sent, once it closed the connection."""
        return _close_code(self.read_all(timeout))


def _close_code(data: bytes) -> int | None:
    """The status code of the first close frame in unmasked server frames ``data``."""
    while len(data) >= 2:
        size, offset = data[1] & 0x7F, 2
        if size == 126:
            size, offset = struct.unpack("!H", data[2:4])[0], 4
        elif size == 127:
            size, offset = struct.unpack("!Q", data[2:10])[0], 10
        if data[0] & 0x0F == CLOSE:
            payload = data[offset : offset + size]
            return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else None
        data = data[offset + size :]
    return None


def _open(
    daemon: DaemonProcess,
    *,
    extra: str = DEFLATE,
    method: str = "GET",
    upgrade: bool = True,
    path: str = "/v1/realtime?model=gpt-realtime",
) -> RawClient:
    sock = open_tls_tunnel(
        daemon.proxy_host, daemon.proxy_port, "api.openai.com:443", trust(daemon.ca_cert_path)
    )
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}"
        if upgrade
        else "Content-Type: application/json\r\nContent-Length: 2\r\n"
    )
    body = "" if upgrade else "{}"
    sock.sendall(
        f"{method} {path} HTTP/1.1\r\nHost: api.openai.com\r\n{handshake}\r\n{body}".encode()
    )
    sock.settimeout(15)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            break
        head += chunk
    return RawClient(daemon, head, sock)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileWebSocketUpstream]:
    with HostileWebSocketUpstream() as upstream:
        yield upstream


def _start(upstream: HostileWebSocketUpstream, *keys: str, **config: Any) -> DaemonProcess:
    daemon = DaemonProcess({"upstream_ca_file": upstream.ca_pem_path, "auth": "none", **config})
    daemon.start()
    daemon.edit_provider("openai", upstream.base_url + "/v1", *(keys or (KEY,)))
    daemon.reload_and_wait()
    return daemon


@pytest.fixture(scope="module")
def shared(hostile: HostileWebSocketUpstream) -> Iterator[DaemonProcess]:
    """One daemon for the tests that measure no memory."""
    daemon = _start(hostile)
    try:
        yield daemon
        assert "Traceback" not in daemon.logs()
        assert KEY not in daemon.logs()
    finally:
        daemon.close()


@pytest.fixture
def fresh(hostile: HostileWebSocketUpstream) -> Iterator[DaemonProcess]:
    """A daemon of its own, for a test that measures its peak memory."""
    daemon = _start(hostile)
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.fixture(autouse=True)
def _reset(hostile: HostileWebSocketUpstream) -> None:
    assert hostile.wait_idle(), "a script of the test before still runs"
    hostile.sessions.clear()
    hostile.done.clear()
    hostile.behave = _echo


def _echo(session: Session) -> None:
    """Accept (with permessage-deflate when offered), then read until a close frame."""
    deflate = "permessage-deflate" in session.headers.get("sec-websocket-extensions", "")
    session.sock.sendall(session.accept(DEFLATE if deflate else ""))
    session.read_frames(timeout=120)


def _records(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return list(json.loads(daemon.cli("interceptions", "list").stdout))


def _record(client: RawClient) -> dict[str, Any]:
    """The record of the client's session (its answer names the request id), once written."""
    request_id = client.headers["x-aibridge-request-id"]

    def written() -> dict[str, Any] | None:
        return next((r for r in _records(client.daemon) if r["request_id"] == request_id), None)

    return client.daemon.wait_for(written, message=f"the record of {request_id}")


def _no_traceback(daemon: DaemonProcess) -> None:
    logs = daemon.logs()
    assert "Traceback" not in logs, logs[-3000:]


# --- fragments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["client", "upstream"])
def test_a_message_in_a_million_empty_fragments_holds_no_memory(
    fresh: DaemonProcess, hostile: HostileWebSocketUpstream, side: str
) -> None:
    """mitmproxy kept a buffer per fragment (about 60 bytes) whatever its size: a message in
    empty continuation frames (2 bytes each from an upstream, 6 from a client) grew the proxy
    without bound while the message never grew. Fragments are now joined; the message still
    arrives whole."""
    frames = 1_000_000
    from_upstream = side == "upstream"

    def send_fragments(session: Session) -> None:
        session.sock.sendall(session.accept())
        empty = frame(CONTINUATION, fin=False) * 10_000
        session.sock.sendall(frame(TEXT, b'{"a":', fin=False))
        for _ in range(frames // 10_000):
            session.sock.sendall(empty)
        session.sock.sendall(frame(CONTINUATION, b"1}") + frame(CLOSE, struct.pack("!H", 1000)))
        session.read_frames(timeout=120)

    hostile.behave = send_fragments if from_upstream else _echo
    before = _rss(fresh.pid)
    client = _open(fresh, extra="")
    assert client.status == 101
    if not from_upstream:
        empty = frame(CONTINUATION, fin=False, mask=True) * 10_000
        client.send(frame(TEXT, b'{"a":', fin=False, mask=True))
        for _ in range(frames // 10_000):
            client.send(empty)
        client.send(frame(CONTINUATION, b"1}", mask=True), frame(CLOSE, b"\x03\xe8", mask=True))
    received = client.read_all(timeout=120)
    grown = _peak_rss(fresh.pid) - before
    print(f"{frames} empty fragments from the {side}: peak RSS grew {grown >> 20} MiB")
    assert grown < 25 * MIB  # was about 55 MiB, and more with every frame
    # The fragments were joined: the message goes on as one frame.
    if from_upstream:
        assert received.startswith(frame(TEXT, b'{"a":1}'))
    else:
        assert hostile.done.wait(30)
        (session,) = hostile.sessions
        assert session.received[0] == (TEXT, b'{"a":1}')
    _no_traceback(fresh)


def test_a_text_message_in_one_byte_fragments_with_pings_between_arrives_intact(
    shared: DaemonProcess, hostile: HostileWebSocketUpstream
) -> None:
    """Fragments that split UTF-8 sequences, with a ping between every two: the joined fragments
    still end between characters, and every ping is relayed."""
    text = ("é€😀" * 300).encode()
    client = _open(shared, extra="")
    assert client.status == 101
    pieces = [
        frame(TEXT if i == 0 else CONTINUATION, text[i : i + 1], fin=i == len(text) - 1, mask=True)
        + frame(PING, b"p", mask=True)
        for i in range(len(text))
    ]
    client.send(*pieces, frame(CLOSE, b"\x03\xe8", mask=True))
    assert client.close_code() == 1000
    assert hostile.done.wait(10)
    (session,) = hostile.sessions
    message = b"".join(p for op, p in session.received if op in (TEXT, CONTINUATION))
    assert message == text
    assert sum(op == PING for op, _ in session.received) == len(text)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        pytest.param(b"\xff\xfe", 1007, id="invalid-utf8"),
        pytest.param(b"\xed\xa0\x80", 1007, id="utf8-surrogate"),
    ],
)
def test_invalid_utf8_from_either_side_closes_1007(
    shared: DaemonProcess, hostile: HostileWebSocketUpstream, payload: bytes, code: int
) -> None:
    client = _open(shared, extra="")
    client.send(frame(TEXT, b'{"a":"' + payload + b'"}', mask=True))
    assert client.close_code() == code
    assert hostile.done.wait(10)
    assert hostile.sessions[0].received == [(CLOSE, hostile.sessions[0].received[0][1])]

    hostile.behave = lambda s: (s.sock.sendall(s.accept() + frame(TEXT, payload)), s.read_frames())
    assert _open(shared, extra="").close_code() == code
    _no_traceback(shared)


# --- control frames -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "close",
    [
        pytest.param(struct.pack("!H", 1005), id="local-only-code"),
        pytest.param(struct.pack("!H", 999), id="code-below-1000"),
        pytest.param(struct.pack("!H", 2999), id="reserved-code"),
        pytest.param(b"\x03", id="one-byte"),
        pytest.param(struct.pack("!H", 1000) + b"r" * 5000, id="5000-byte-reason"),
        pytest.param(struct.pack("!H", 1000) + b"\xff", id="reason-not-utf8"),
    ],
)
@pytest.mark.parametrize("side", ["client", "upstream"])
def test_a_bad_close_frame_closes_both_sides_with_a_protocol_error(
    shared: DaemonProcess, hostile: HostileWebSocketUpstream, close: bytes, side: str
) -> None:
    if side == "upstream":
        hostile.behave = lambda s: (
            s.sock.sendall(s.accept() + frame(CLOSE, close)),
            s.read_frames(),
        )
    client = _open(shared, extra="")
    if side == "client":
        client.send(frame(CLOSE, close, mask=True))
    assert client.close_code() in (1002, 1007)
    assert hostile.done.wait(10)
    assert [op for op, _ in hostile.sessions[0].received] == [CLOSE]
    _no_traceback(shared)


@pytest.mark.parametrize(
    ("client_frame", "upstream_frame"),
    [
        pytest.param(
            frame(TEXT, b"x", mask=True, rsv1=True),
            frame(TEXT, b"x", rsv1=True),
            id="rsv1-unnegotiated",
        ),
        pytest.param(frame(0x3, b"x", mask=True), frame(0x3, b"x"), id="reserved-opcode"),
        pytest.param(
            frame(PING, b"x", fin=False, mask=True),
            frame(PING, b"x", fin=False),
            id="fragmented-ping",
        ),
        pytest.param(
            frame(CONTINUATION, b"x", mask=True), frame(CONTINUATION, b"x"), id="lone-continuation"
        ),
        pytest.param(
            frame(TEXT, b"a", fin=False, mask=True) + frame(BINARY, b"b", mask=True),
            frame(TEXT, b"a", fin=False) + frame(BINARY, b"b"),
            id="new-message-mid-message",
        ),
        pytest.param(frame(TEXT, b"x"), frame(TEXT, b"x", mask=True), id="wrong-masking"),
    ],
)
def test_a_frame_rfc_6455_forbids_closes_both_sides_1002(
    shared: DaemonProcess,
    hostile: HostileWebSocketUpstream,
    client_frame: bytes,
    upstream_frame: bytes,
) -> None:
    client = _open(shared, extra="")
    client.send(client_frame)
    assert client.close_code() == 1002
    assert hostile.done.wait(10)
    assert [op for op, _ in hostile.sessions[0].received] == [CLOSE]

    hostile.behave = lambda s: (s.sock.sendall(s.accept() + upstream_frame), s.read_frames())
    assert _open(shared, extra="").close_code() == 1002
    _no_traceback(shared)


def test_pings_flooding_from_both_sides_are_relayed_in_bounded_memory(
    fresh: DaemonProcess, hostile: HostileWebSocketUpstream
) -> None:
    """10,000 pings of 125 bytes each way, nobody reading pongs: every one relayed, no log line
    per ping, memory flat (the proxy reads a side only as fast as the other takes its writes)."""
    count = 10_000
    flood = frame(PING, b"u" * 125) * 1000

    def ping_back(session: Session) -> None:
        session.sock.sendall(session.accept())
        for _ in range(count // 1000):
            session.sock.sendall(flood)
        session.read_frames(timeout=120)

    hostile.behave = ping_back
    before = _rss(fresh.pid)
    client = _open(fresh, extra="")
    client_flood = frame(PING, b"c" * 125, mask=True) * 1000
    for _ in range(count // 1000):
        client.send(client_flood)
    client.send(frame(CLOSE, b"\x03\xe8", mask=True))
    received = client.read_all(timeout=120)
    assert received.count(frame(PING, b"u" * 125)) == count
    assert hostile.done.wait(30)
    assert sum(op == PING for op, _ in hostile.sessions[0].received) == count
    assert _peak_rss(fresh.pid) - before < 40 * MIB
    assert len(fresh.logs().splitlines()) < 50


def test_an_upstream_that_drops_tcp_mid_message_ends_the_session(
    shared: DaemonProcess, hostile: HostileWebSocketUpstream
) -> None:
    """No close frame, half a message, then TCP closed: the client is closed too (no hang) and
    the session recorded."""
    hostile.behave = lambda s: s.sock.sendall(s.accept() + frame(TEXT, b'{"type":"re', fin=False))
    started = time.monotonic()
    client = _open(shared, extra="")
    assert client.close_code() is not None
    assert time.monotonic() - started < 10
    assert _record(client)["status"] == 101


def test_messages_being_assembled_are_held_to_max_buffered_bytes_across_sessions(
    hostile: HostileWebSocketUpstream,
) -> None:
    """Each session within max_websocket_message (16 MiB), together past max_buffered_bytes:
    mitmproxy holds a message until it is whole, so 700 KiB halves of messages on many sessions
    added up without bound. The session whose message the budget cannot hold is closed with
    1013 (try again later); the other one's message still arrives whole."""
    hostile.behave = _echo
    daemon = _start(hostile, max_buffered_bytes="1MiB")
    try:
        holding, refused = _open(daemon, extra=""), _open(daemon, extra="")
        assert (holding.status, refused.status) == (101, 101)
        half = b"a" * (700 * 1024)
        holding.send(frame(BINARY, half, fin=False, mask=True))
        daemon.wait_for(lambda: (daemon.metric("buffered_bytes") or 0) >= len(half))
        refused.send(frame(BINARY, half, fin=False, mask=True))
        # The client's close frame may be lost to a reset (the proxy stopped reading); the
        # upstream's is not.
        with contextlib.suppress(ConnectionResetError):
            refused.read_all()
        holding.send(frame(CONTINUATION, b"b", mask=True), frame(CLOSE, b"\x03\xe8", mask=True))
        assert holding.close_code() == 1000
        assert hostile.wait_idle()
        received = [frame for session in hostile.sessions for frame in session.received]
        # Relayed whole, in the fragments it came in.
        assert [(BINARY, half), (CONTINUATION, b"b")] == [f for f in received if f[0] != CLOSE]
        assert (CLOSE, struct.pack("!H", 1013) + b"try again later") in received
        daemon.wait_for(lambda: daemon.metric("buffered_bytes") == 0)
        assert "max_buffered_bytes (1048576 bytes) is spent; closing the session with 1013" in (
            daemon.logs()
        )
        _no_traceback(daemon)
    finally:
        daemon.close()


def test_a_close_the_upstream_never_answers_does_not_hold_the_client(
    shared: DaemonProcess, hostile: HostileWebSocketUpstream
) -> None:
    hostile.behave = lambda s: (s.sock.sendall(s.accept()), time.sleep(5))
    client = _open(shared, extra="")
    started = time.monotonic()
    client.send(frame(CLOSE, b"\x03\xe8", mask=True))
    assert client.close_code() == 1000
    assert time.monotonic() - started < 5


def test_a_silent_session_is_closed_after_idle_timeout_and_pings_keep_one_open(
    hostile: HostileWebSocketUpstream,
) -> None:
    """After the upgrade the flow stays in flight, so no idle timer ran: a session silent both
    ways held its connection for ever. Now its idle time runs from its last byte either way:
    the silent session is closed (idle_timeout 1s here), one that pings stays open."""
    daemon = _start(hostile, idle_timeout="1s")
    try:
        before = daemon.metric("client_connections_closed_total", reason="idle_timeout") or 0
        silent, pinging = _open(daemon, extra=""), _open(daemon, extra="")
        assert (silent.status, pinging.status) == (101, 101)
        for _ in range(10):  # 3 s: three idle timeouts' worth
            pinging.send(frame(PING, b"p", mask=True))
            time.sleep(0.3)
        silent.read_all(timeout=10)  # closed by the daemon (TimeoutError if it never is)
        pinging.send(frame(CLOSE, b"\x03\xe8", mask=True))
        assert pinging.close_code() == 1000  # still open: it closes normally now
        closed = daemon.metric("client_connections_closed_total", reason="idle_timeout") or 0
        assert closed == before + 1
        _no_traceback(daemon)
    finally:
        daemon.close()


def test_a_failover_resend_the_upstream_closes_unanswered_goes_out_again_on_a_new_connection(
    hostile: HostileWebSocketUpstream,
) -> None:
    """The upstream answers 401 on a kept-alive connection, reads the upgrade sent again with
    the next key on that connection, and closes it unanswered (as a server closing an idle
    connection does). That connection was reused for the resend, so the resend is retried on
    a new one; it was taken for this request's own, and the client got 502."""

    def reject_first_key_then_drop(session: Session) -> None:
        if session.headers.get("authorization") != f"Bearer {KEY}":
            _echo(session)
            return
        body = b'{"error": {"message": "Incorrect API key provided"}}'
        session.sock.sendall(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        resent = b""
        session.sock.settimeout(10)
        while b"\r\n\r\n" not in resent:
            resent += session.sock.recv(65536)  # the resend, on this same connection
        session.sock.close()

    hostile.behave = reject_first_key_then_drop
    daemon = _start(hostile, KEY, SECOND_KEY)
    try:
        client = _open(daemon, extra="")
        assert client.status == 101, client.status_line
        client.send(frame(CLOSE, b"\x03\xe8", mask=True))
        assert client.close_code() == 1000
        assert "sending the request again" in daemon.logs()
        _no_traceback(daemon)
    finally:
        daemon.close()


# --- permessage-deflate -------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["client", "upstream"])
def test_a_deflate_bomb_is_not_inflated_beyond_the_limit(
    fresh: DaemonProcess, hostile: HostileWebSocketUpstream, side: str
) -> None:
    """300 MiB of zeros in 300 KiB of permessage-deflate: the proxy stops inflating at
    max_websocket_message (16 MiB) and closes both sides with 1009."""
    bomb = _deflated(b"\0" * (300 * MIB))

    def send_bomb(session: Session) -> None:
        session.sock.sendall(session.accept(DEFLATE) + frame(BINARY, bomb, rsv1=True))
        session.read_frames()

    if side == "upstream":
        hostile.behave = send_bomb
    before = _rss(fresh.pid)
    client = _open(fresh)
    assert client.headers["sec-websocket-extensions"] == "permessage-deflate"
    if side == "client":
        client.send(frame(BINARY, bomb, rsv1=True, mask=True))
        # The proxy stops reading the bomb and closes: the rest unread, the kernel may answer
        # with a reset that drops the close frame on its way. The upstream's is checked below.
        with contextlib.suppress(ConnectionResetError):
            assert client.close_code() == 1009
    else:
        assert client.close_code() == 1009
    grown = _peak_rss(fresh.pid) - before
    print(f"300 MiB deflate bomb from the {side}: peak RSS grew {grown >> 20} MiB")
    assert grown < 100 * MIB
    assert hostile.done.wait(10)
    ((op, payload),) = hostile.sessions[0].received
    assert op == CLOSE
    if side == "client":
        assert payload[:2] == struct.pack("!H", 1009)


# --- the upgrade answer -------------------------------------------------------------------------


def _answer(head: Callable[[Session], bytes]) -> Callable[[Session], None]:
    def behave(session: Session) -> None:
        session.sock.sendall(head(session) + frame(TEXT, b'{"type":"session.created"}'))
        session.read_frames(timeout=5)

    return behave


def _switching(upgrade: str = "websocket", accept: str | None = None, extra: str = "") -> Any:
    def head(session: Session) -> bytes:
        value = accept_value(session.headers.get("sec-websocket-key", ""))
        accept_line = "" if accept == "" else f"Sec-WebSocket-Accept: {accept or value}\r\n"
        return (
            f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: {upgrade}\r\nConnection: Upgrade\r\n"
            f"{accept_line}{extra}\r\n"
        ).encode()

    return head


@pytest.mark.parametrize(
    ("answer", "offer"),
    [
        pytest.param(
            _switching(
                extra="Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=8\r\n"
            ),
            DEFLATE,
            id="window-bits-8",
        ),
        pytest.param(
            _switching(
                extra="Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
            ),
            DEFLATE,
            id="window-bits-without-value",
        ),
        pytest.param(
            _switching(
                extra="Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=x\r\n"
            ),
            DEFLATE,
            id="window-bits-not-a-number",
        ),
        pytest.param(
            _switching(extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"),
            "",
            id="deflate-not-offered",
        ),
        pytest.param(
            _switching(
                extra="Sec-WebSocket-Extensions: permessage-deflate, permessage-deflate\r\n"
            ),
            DEFLATE,
            id="deflate-twice",
        ),
        pytest.param(
            _switching(extra="Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n"),
            "Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n",
            id="extension-not-relayable",
        ),
        pytest.param(
            _switching(extra="Sec-WebSocket-Protocol: chat\r\n"), "", id="subprotocol-not-offered"
        ),
        pytest.param(_switching(accept=""), "", id="no-accept"),
        pytest.param(_switching(accept="d3JvbmcK"), "", id="wrong-accept"),
        pytest.param(_switching(upgrade="h2c"), "", id="upgrade-to-h2c"),
    ],
)
def test_a_101_that_is_no_websocket_handshake_gets_502_not_a_relay(
    shared: DaemonProcess,
    hostile: HostileWebSocketUpstream,
    answer: Callable[[Session], bytes],
    offer: str,
) -> None:
    """A 101 the proxy cannot relay as a WebSocket (RFC 6455 section 4.1: the client fails such
    a handshake; here the proxy is the upstream's client). Bad permessage-deflate parameters
    ended the client connection with a traceback; the rest opened a session the client had to
    refuse."""
    hostile.behave = _answer(answer)
    client = _open(shared, extra=offer)
    assert client.status == 502
    assert json.loads(client.read_body())["error"]["code"] == "upstream_bad_response"
    record = _record(client)
    assert (record["status"], record["error"]) == (502, "upstream_bad_response")
    _no_traceback(shared)


def test_a_101_to_a_request_that_is_no_upgrade_opens_no_raw_relay(
    fresh: DaemonProcess, hostile: HostileWebSocketUpstream
) -> None:
    """mitmproxy relayed any other 101 as raw TCP, keeping every byte in the flow: 50 MiB sent
    afterwards grew the proxy by 50 MiB, and the upstream got it all unrecorded."""

    def switch_and_sink(session: Session) -> None:
        session.sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: anything\r\nConnection: Upgrade\r\n\r\n"
        )
        session.read_frames(timeout=5)

    hostile.behave = switch_and_sink
    client = _open(fresh, method="POST", upgrade=False, path="/v1/chat/completions")
    assert client.status == 502
    assert hostile.done.wait(10)
    assert hostile.sessions[0].received == []
    _no_traceback(fresh)


def test_a_401_on_the_upgrade_fails_over_to_the_next_key(
    hostile: HostileWebSocketUpstream,
) -> None:
    """The upgrade is a request like any: 401 with the first key, the session opens with the
    second; the client sees neither key nor the 401, the logs hold neither key."""

    def reject_first_key(session: Session) -> None:
        if session.headers.get("authorization") == f"Bearer {KEY}":
            body = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}"}})
            session.sock.sendall(
                f"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
            )
            return
        _echo(session)

    hostile.behave = reject_first_key
    daemon = _start(hostile, KEY, SECOND_KEY)
    try:
        client = _open(daemon, extra="")
        assert client.status == 101
        client.send(frame(CLOSE, b"\x03\xe8", mask=True))
        seen = client.read_all()
        assert [s.headers["authorization"] for s in hostile.sessions] == [
            f"Bearer {KEY}",
            f"Bearer {SECOND_KEY}",
        ]
        for secret in (KEY, SECOND_KEY):
            assert secret.encode() not in client.after_head + seen
            assert secret not in str(client.headers)
            assert secret not in daemon.logs()
        assert _record(client)["status"] == 101
    finally:
        daemon.close()


def test_a_byok_key_on_the_upgrade_is_not_logged_or_echoed(
    shared: DaemonProcess, hostile: HostileWebSocketUpstream
) -> None:
    """The client's own key goes upstream on the upgrade, and an upstream that rejects it
    quoting it back has it redacted from the answer the client gets."""

    def reject_quoting(session: Session) -> None:
        quoted = session.headers.get("authorization", "")
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {quoted}"}})
        session.sock.sendall(
            f"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Echo: {quoted}\r\n\r\n{body}".encode()
        )

    hostile.behave = reject_quoting
    client = _open(shared, extra=f"Authorization: Bearer {BYOK}\r\n")
    answer = client.read_body()
    assert hostile.sessions[0].headers["authorization"] == f"Bearer {BYOK}"
    assert client.status == 401
    assert BYOK.encode() not in answer
    assert BYOK not in str(client.headers)
    assert _record(client)["credential_kind"] == "byok"
    assert BYOK not in shared.logs()


# --- hostile usage messages ---------------------------------------------------------------------


def _server_messages(*messages: tuple[int, bytes]) -> Callable[[Session], None]:
    def behave(session: Session) -> None:
        session.sock.sendall(
            session.accept()
            + b"".join(frame(op, payload) for op, payload in messages)
            + frame(CLOSE, struct.pack("!H", 1000))
        )
        session.read_frames()

    return behave


def _done(usage: Any) -> bytes:
    return json.dumps({"type": "response.done", "response": {"usage": usage}}).encode()


def test_hostile_usage_messages_record_only_believable_counts(
    shared: DaemonProcess, hostile: HostileWebSocketUpstream
) -> None:
    """Huge numbers, wrong types, deep nesting, a binary frame: the session is relayed whole,
    recorded, and counts only the one believable usage."""
    messages = [
        (TEXT, _done({"input_tokens": 10**30, "output_tokens": 1})),
        (
            TEXT,
            b'{"type":"response.done","response":{"usage":{"input_tokens":1' + b"0" * 5000 + b"}}}",
        ),
        (TEXT, b'{"type":"response.done","response":{"usage":{"input_tokens":1e999}}}'),
        (TEXT, _done({"input_tokens": "12", "output_tokens": [3]})),
        (TEXT, _done({"input_tokens": -5, "output_tokens": True})),
        (TEXT, b'{"type":"response.done","response":{"usage":' + b"[" * 100_000 + b"}}"),
        (TEXT, b'{"usage":' * 50_000),
        (BINARY, _done({"input_tokens": 7, "output_tokens": 3})),
    ]
    hostile.behave = _server_messages(*messages)
    client = _open(shared, extra="")
    received = client.read_all()
    assert _close_code(received) == 1000
    for _, payload in messages:
        assert payload in received
    record = _record(client)
    assert (record["input_tokens"], record["output_tokens"]) == (7, 3)
    _no_traceback(shared)


def test_a_15_mib_server_message_is_not_parsed_whole_for_tool_calls(
    fresh: DaemonProcess, hostile: HostileWebSocketUpstream
) -> None:
    """A response.done under max_websocket_message naming a function call, with 5 million empty
    objects: parsed whole for the record's tool calls it held over 400 MiB. A message over the
    tool-call reader's cap (1 MiB) is skipped as an SSE event over it is; its usage still
    counts."""
    objects = b"{}," * 5_000_000
    message = (
        b'{"type":"response.done","response":{"output":[{"type":"function_call","name":"f",'
        b'"arguments":"{}","call_id":"c1","x":['
        + objects
        + b'{}]}],"usage":{"input_tokens":5,"output_tokens":6}}}'
    )
    hostile.behave = _server_messages((TEXT, message))
    before = _rss(fresh.pid)
    client = _open(fresh, extra="")
    received = client.read_all(timeout=60)
    grown = _peak_rss(fresh.pid) - before
    print(f"{len(message) >> 20} MiB response.done: peak RSS grew {grown >> 20} MiB")
    assert _close_code(received) == 1000
    assert grown < 150 * MIB
    record = _record(client)
    assert (record["input_tokens"], record["output_tokens"]) == (5, 6)
    assert record["tool_calls"] == []


def test_a_50_mb_response_done_closes_1009_and_the_session_is_recorded(
    shared: DaemonProcess, hostile: HostileWebSocketUpstream
) -> None:
    big = _done({"input_tokens": 1, "output_tokens": 1, "pad": "x" * (50 * 1000 * 1000)})
    hostile.behave = _server_messages((TEXT, big))
    client = _open(shared, extra="")
    assert client.close_code(timeout=60) == 1009
    assert _record(client)["status"] == 101
    _no_traceback(shared)
