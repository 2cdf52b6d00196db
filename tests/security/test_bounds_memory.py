"""Attacker-style end-to-end tests: memory a client can make the daemon hold across streams and
connections: every resource a client can hold is bounded (README.md#configuration).

- HTTP/2 responses a client does not read: the daemon stops reading the upstream (backpressure)
  instead of buffering the whole answer.
- HTTP/1 responses a client does not read (MITM'd and plain-HTTP): the same, through the drain
  after each read.
- HTTP/2 request bodies: a sane receive window, and one connection buffers at most
  ``max_request_body`` across its streams.
- A process-wide budget for buffered bytes (``max_buffered_bytes``): beyond it, 503.
- ``max_connections_per_address``: one address cannot take every connection slot.

The real daemon, real TLS through the CONNECT tunnel, raw hyper-h2 and raw sockets. The daemon's
RSS and open fds are read from /proc before and after each storm and printed (``-s``); margins
are generous. ``buffered_bytes`` is the gauge of the budget, which must come back to 0.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

from tests.fakes.raw_http import RawHttpUpstream, endless, read_request, serving
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, free_port, open_tls_tunnel, wait_until
from tests.security.test_bounds_client import (
    closed_by_daemon,
    head,
    open_fds,
    push,
    read_response,
    rss_bytes,
)

MIB = 1024 * 1024
OPENAI = "api.openai.com"


class Footprint:
    """RSS and open fds of the daemon around a storm, with a margin chosen per test."""

    def __init__(self, daemon: DaemonProcess, label: str, margin: int) -> None:
        self.daemon, self.label, self.margin = daemon, label, margin
        self.rss, self.fds = rss_bytes(daemon.pid), open_fds(daemon.pid)
        self.peak_rss = self.rss

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, rss_bytes(self.daemon.pid))

    def check(self, settle_margin: int = 30 * MIB) -> None:
        pid = self.daemon.pid
        fds_after = wait_until(
            lambda: (n := open_fds(pid)) <= self.fds + 10 and n,
            timeout=15,
            message=f"{self.label}: open fds stay above {self.fds} + 10",
        )
        # The housekeeping returns freed memory within a few seconds of the flows ending.
        rss_after = wait_until(
            lambda: (r := rss_bytes(pid)) - self.rss < settle_margin and r,
            timeout=30,
            message=f"{self.label}: RSS stays above {self.rss / MIB:.0f} MiB + margin",
        )
        print(
            f"\n[{self.label}] RSS before {self.rss / MIB:.1f} MiB, peak seen "
            f"{self.peak_rss / MIB:.1f} MiB, after {rss_after / MIB:.1f} MiB; "
            f"open fds before {self.fds}, after {fds_after}"
        )
        assert self.peak_rss - self.rss < self.margin


def buffered(daemon: DaemonProcess) -> float:
    return daemon.metric("buffered_bytes") or 0.0


def budget_back_to_zero(daemon: DaemonProcess) -> None:
    daemon.wait_for(lambda: buffered(daemon) == 0, message="buffered_bytes back to 0")


def _configure(daemon: DaemonProcess, upstream: FakeUpstream, *, root: bool = False) -> None:
    """Route api.openai.com to the fake; ``root``: to its root, where ``/bulk`` lives."""
    base_url = upstream.base_url.removesuffix("/v1") if root else upstream.base_url
    daemon.edit_provider("openai", base_url, "k")
    daemon.reload_and_wait()


class RawH2:
    """A raw HTTP/2 client in a MITM'd tunnel to api.openai.com. It reads the socket always, but
    opens a stream's flow-control window only for the streams in ``acknowledge``."""

    def __init__(self, daemon: DaemonProcess) -> None:
        context = ssl.create_default_context(cafile=str(daemon.ca_cert_path))
        context.set_alpn_protocols(["h2"])
        self.sock = open_tls_tunnel(daemon.proxy_host, daemon.proxy_port, f"{OPENAI}:443", context)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.flush()
        self.acknowledge: set[int] = set()  # streams whose data is acknowledged as it arrives
        self.received: dict[int, int] = {}
        self.statuses: dict[int, int] = {}
        self.headers: dict[int, dict[bytes, bytes]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.remote_settings: dict[int, int] = {}

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def start(self, method: str, path: str, *, end_stream: bool = True) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [
                (":method", method),
                (":path", path),
                (":scheme", "https"),
                (":authority", OPENAI),
                ("content-type", "application/json"),
            ],
            end_stream=end_stream,
        )
        self.flush()
        return stream_id

    def read_once(self, timeout: float) -> bool:
        """Read what arrives within ``timeout``; False once the connection is closed."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return True
        except (ConnectionResetError, ssl.SSLError):
            return False
        if not data:
            return False
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RemoteSettingsChanged):
                for code, setting in event.changed_settings.items():
                    self.remote_settings[int(code)] = setting.new_value
            elif isinstance(event, h2.events.ResponseReceived):
                headers = dict(event.headers)
                self.headers[event.stream_id] = headers
                self.statuses[event.stream_id] = int(headers[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                sid = event.stream_id
                self.received[sid] = self.received.get(sid, 0) + len(event.data)
                if self.received[sid] < 64 * 1024:
                    self.bodies[sid] = self.bodies.get(sid, b"") + event.data
                if sid in self.acknowledge:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif event.flow_controlled_length:
                    # The socket is read, the stream is not: only the connection's window
                    # opens again, as with an application that does not consume a response.
                    self.conn.increment_flow_control_window(event.flow_controlled_length)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                self.ended.add(event.stream_id)
        with suppress(OSError):
            self.flush()
        return True

    def read_until(self, done, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out: received {self.received}"
            assert self.read_once(0.5), "connection closed"

    def close(self) -> None:
        self.sock.close()


# --- 1. HTTP/2 responses the client does not read ----------------------------------------------


def test_unread_http2_responses_are_not_buffered(upstream: FakeUpstream) -> None:
    """The tester's example: 3 streams GET /bulk?bytes=157286400 against a fast upstream, and a
    client that never opens its window. RSS went 439 -> 963 MiB in 3 s: mitmproxy buffered the
    whole answer. Now the daemon stops reading the upstream once 1 MiB waits per stream."""
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path, "auth": "none"}) as daemon:
        _configure(daemon, upstream, root=True)
        footprint = Footprint(daemon, "h2 unread responses 3 x 150 MiB", margin=60 * MIB)
        client = RawH2(daemon)
        streams = [client.start("GET", "/bulk?bytes=157286400") for _ in range(3)]
        client.read_until(lambda: all(s in client.statuses for s in streams))
        assert [client.statuses[s] for s in streams] == [200, 200, 200]
        # Each stream reaches its high-water mark, and no further.
        daemon.wait_for(lambda: buffered(daemon) >= 3 * MIB, message="streams paused")
        deadline = time.monotonic() + 3.0  # the tester's window, where RSS grew by 524 MiB
        while time.monotonic() < deadline:
            client.read_once(0.2)
            footprint.sample()
            assert buffered(daemon) <= 3 * 2 * MIB
        print(f"\n[h2 unread] buffered_bytes while paused: {buffered(daemon) / MIB:.2f} MiB")
        # A client that starts reading gets the data flowing again (the upstream is resumed).
        first = streams[0]
        before = client.received.get(first, 0)
        client.acknowledge.add(first)
        client.conn.acknowledge_received_data(before, first)
        client.flush()
        client.read_until(lambda: client.received.get(first, 0) >= before + 32 * MIB)
        footprint.sample()
        client.close()
        budget_back_to_zero(daemon)
        footprint.check()


def test_a_slow_http2_reader_gets_the_whole_response(upstream: FakeUpstream) -> None:
    """Backpressure is not a limit: a client that reads nothing for a while, then reads, gets
    every byte of a 24 MiB response, and the stream ends normally. The upstream the proxy
    stopped reading is not "silent" for upstream_idle_timeout (1s here)."""
    size = 24 * MIB
    config = {
        "upstream_ca_file": upstream.ca_pem_path,
        "auth": "none",
        "upstream_idle_timeout": "1s",
    }
    with DaemonProcess(config) as daemon:
        _configure(daemon, upstream, root=True)
        client = RawH2(daemon)
        stream = client.start("GET", f"/bulk?bytes={size}")
        client.read_until(lambda: stream in client.statuses)
        daemon.wait_for(lambda: buffered(daemon) >= MIB, message="stream paused")
        deadline = time.monotonic() + 3.0  # three idle timeouts while paused
        while time.monotonic() < deadline:
            assert client.read_once(0.2)
        assert stream not in client.ended
        client.acknowledge.add(stream)
        client.conn.acknowledge_received_data(client.received.get(stream, 0), stream)
        client.flush()
        client.read_until(lambda: stream in client.ended, timeout=60)
        assert client.received[stream] == size
        client.close()
        budget_back_to_zero(daemon)


# --- 2. HTTP/2 request bodies ------------------------------------------------------------------


def _send_bodies(client: RawH2, streams: list[int], total: int, footprint: Footprint) -> None:
    """Send up to ``total`` bytes on each stream, as flow control allows, never ending one; a
    stream that got an answer stops. Reads between rounds (the daemon's window updates)."""
    sent = dict.fromkeys(streams, 0)
    chunk = b"x" * 16384
    rounds = 0
    while True:
        active = [s for s in streams if sent[s] < total and s not in client.statuses]
        if not active:
            return
        progressed = False
        for stream in active:
            window = min(client.conn.local_flow_control_window(stream), 4 * len(chunk))
            while window >= len(chunk) and sent[stream] < total:
                client.conn.send_data(stream, chunk)
                sent[stream] += len(chunk)
                window -= len(chunk)
                progressed = True
        with suppress(OSError):
            client.flush()
        assert client.read_once(0.01 if progressed else 1.0), "connection closed"
        rounds += 1
        if rounds % 200 == 0:
            footprint.sample()


def test_http2_request_bodies_are_bounded_per_connection(upstream: FakeUpstream) -> None:
    """The tester's example: 4 streams POSTing 50 MiB each without END_STREAM (RSS 122 -> 367
    MiB; max_request_body was per stream, so one connection could hold 100 x 64 MiB). The
    daemon advertises a 1 MiB window, and one connection buffers at most max_request_body
    (64 MiB) across its streams: beyond it, 503 in the provider's shape, retryable."""
    upstream.reset()
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path, "auth": "none"}) as daemon:
        _configure(daemon, upstream)
        footprint = Footprint(daemon, "h2 request bodies 4 x 50 MiB", margin=140 * MIB)
        client = RawH2(daemon)
        client.read_until(
            lambda: h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in client.remote_settings
        )
        window = client.remote_settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE]
        assert window <= MIB
        streams = [client.start("POST", "/v1/chat/completions", end_stream=False) for _ in range(4)]
        _send_bodies(client, streams, 50 * MIB, footprint)
        refused = [s for s in streams if client.statuses.get(s) == 503]
        assert len(refused) >= 2, client.statuses
        client.read_until(lambda: all(s in client.ended for s in refused))
        for stream in refused:
            error = json.loads(client.bodies[stream])["error"]
            assert error["code"] == "proxy_overloaded"
            assert client.headers[stream].get(b"x-should-retry") != b"false"
        assert buffered(daemon) <= 64 * MIB
        client.close()
        budget_back_to_zero(daemon)
        footprint.check()
        assert upstream.requests == []


# --- 3. the process-wide budget ----------------------------------------------------------------


def _mitm_http1(daemon: DaemonProcess) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(daemon.ca_cert_path))
    context.set_alpn_protocols(["http/1.1"])
    return open_tls_tunnel(daemon.proxy_host, daemon.proxy_port, f"{OPENAI}:443", context)


def test_buffered_bodies_beyond_max_buffered_bytes_get_503(upstream: FakeUpstream) -> None:
    """The tester's example: 5 connections x 60 MiB bodies held before dialling (RSS +290 MiB).
    With max_buffered_bytes 100MiB the first is buffered, the others get 503 (retryable, in
    the provider's shape) instead; every byte is given back when the flows end."""
    upstream.reset()
    config = {
        "upstream_ca_file": upstream.ca_pem_path,
        "auth": "none",
        "max_buffered_bytes": "100MiB",
    }
    with DaemonProcess(config) as daemon:
        _configure(daemon, upstream)
        footprint = Footprint(daemon, "5 x 60 MiB bodies, budget 100 MiB", margin=200 * MIB)
        size = 60 * MIB
        first = head(
            "POST /v1/chat/completions HTTP/1.1",
            OPENAI,
            "Content-Type: application/json",
            f"Content-Length: {size}",
        )
        holder = _mitm_http1(daemon)
        push(holder, first, b"f" * MIB, size - MIB, footprint)  # all but the last MiB
        daemon.wait_for(lambda: buffered(daemon) >= size - 2 * MIB, message="first body held")
        chunked = head(
            "POST /v1/chat/completions HTTP/1.1",
            OPENAI,
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
        )
        for attempt in range(4):
            with closing(_mitm_http1(daemon)) as sock:
                if attempt % 2:
                    # Declared: refused on the head, before any of the body is sent.
                    sock.sendall(first)
                else:
                    # Chunked: refused once the body would cross the budget.
                    chunk = b"%x\r\n%s\r\n" % (MIB, b"f" * MIB)
                    push(sock, chunked, chunk, size, footprint)
                status, headers, body = read_response(sock)
                assert status == 503
                assert json.loads(body)["error"]["code"] == "proxy_overloaded"
                assert headers.get("x-should-retry") != "false"
                assert closed_by_daemon(sock)
            footprint.sample()
            assert buffered(daemon) <= 100 * MIB
        # Every refusal gave its bytes back: only the held body counts.
        assert buffered(daemon) < size
        holder.close()
        budget_back_to_zero(daemon)
        # A normal request passes afterwards, and its body is given back once it is answered.
        with closing(_mitm_http1(daemon)) as sock:
            body = json.dumps({"model": "gpt-4o-mini", "messages": []}).encode()
            sock.sendall(
                head(
                    "POST /v1/chat/completions HTTP/1.1",
                    OPENAI,
                    "Content-Type: application/json",
                    f"Content-Length: {len(body)}",
                )
                + body
            )
            status, _, _ = read_response(sock)
            assert status == 200
        budget_back_to_zero(daemon)
        footprint.check()
    # The refusals were never forwarded.
    assert len(upstream.requests) == 1


# --- 4. connections per source address ---------------------------------------------------------


def _plain(daemon: DaemonProcess, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(
        (daemon.proxy_host, daemon.proxy_port), timeout=20, source_address=(source, 0)
    )
    return sock


def test_one_address_cannot_take_every_connection_slot() -> None:
    config = {"max_connections": 20, "max_connections_per_address": 5, "auth": "none"}
    with DaemonProcess(config) as daemon:
        footprint = Footprint(daemon, "connections per address", margin=50 * MIB)
        held = [_plain(daemon) for _ in range(5)]
        try:
            daemon.wait_for(lambda: daemon.metric("client_connections") == 5)
            for _ in range(50):
                with closing(_plain(daemon)) as extra:
                    status, _, _ = read_response(extra)
                    assert status == 503
                    assert closed_by_daemon(extra)
            assert (
                daemon.metric(
                    "client_connections_closed_total", reason="max_connections_per_address"
                )
                == 50
            )
            # Another address still gets in.
            other = _plain(daemon, "127.0.0.2")
            held.append(other)
            daemon.wait_for(lambda: daemon.metric("client_connections") == 6)
            # Once one of its connections goes, the first address gets a slot again.
            held.pop(0).close()
            daemon.wait_for(lambda: daemon.metric("client_connections") == 5)
            held.append(_plain(daemon))
            daemon.wait_for(lambda: daemon.metric("client_connections") == 6)
            assert daemon.metric("client_connections_closed_total", reason="max_connections") == 0
        finally:
            for sock in held:
                sock.close()
        footprint.check()


def test_the_budget_is_given_back_when_the_upstream_fails(upstream: FakeUpstream) -> None:
    """The error path: a buffered body whose upstream cannot be reached (502) gives its bytes
    back, as the response and abort paths above do."""
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path, "auth": "none"}) as daemon:
        gone = f"https://127.0.0.1:{free_port()}/v1"  # nothing listens there
        daemon.edit_provider("openai", gone, "k")
        daemon.reload_and_wait()
        body = json.dumps({"model": "m", "messages": [], "pad": "p" * (8 * MIB)}).encode()
        with closing(_mitm_http1(daemon)) as sock:
            sock.sendall(
                head(
                    "POST /v1/chat/completions HTTP/1.1",
                    OPENAI,
                    "Content-Type: application/json",
                    f"Content-Length: {len(body)}",
                )
                + body
            )
            status, _, answer = read_response(sock)
        assert status == 502
        assert json.loads(answer)["error"]["code"] == "upstream_unreachable"
        budget_back_to_zero(daemon)


# --- a plain-HTTP destination whose answer never ends where it should -------------------------


@contextmanager
def endless_answer(kind: str) -> Iterator[int]:
    """The port of an HTTP server (a destination a client picks) whose answer never ends where
    it should: ``head``, header lines without end; ``chunk_line``, a chunk-size line without
    end. It writes as fast as it is read, until the connection is closed."""
    if kind == "head":
        first, filler = b"HTTP/1.1 200 OK\r\n", b"X-Filler: " + b"a" * 8000 + b"\r\n"
    else:
        first, filler = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"0" * 8000

    with serving(endless(first, filler)) as port:
        yield port


@pytest.mark.parametrize("kind", ["head", "chunk_line"])
def test_a_plain_http_answer_that_never_ends_its_head_or_chunk_line_is_cut_off(kind: str) -> None:
    """mitmproxy buffers an answer's head, and a chunk-size line, until it ends. The bounds on
    them (``aibridgeproxyd.mitm.body_chunks``) covered MITM'd upstreams only: a plain-HTTP proxy
    request to a server of the client's choosing that sends either without end grew the daemon
    by gigabytes (about 2 GB in 8 s), and the client waited for ever. Now the answer is cut
    off, in bounded memory."""
    with endless_answer(kind) as port:
        config = {
            "auth": "none",
            "allowed_private_cidrs": ["127.0.0.1/32"],
            "allowed_ports": [port],
        }
        with DaemonProcess(config) as daemon:
            footprint = Footprint(daemon, f"endless {kind}", margin=200 * MIB)
            with socket.create_connection((daemon.proxy_host, daemon.proxy_port), 15) as sock:
                destination = f"127.0.0.1:{port}"
                request = f"GET http://{destination}/ HTTP/1.1\r\nHost: {destination}\r\n\r\n"
                sock.sendall(request.encode())
                answer = b""
                while chunk := sock.recv(65536):  # to the end: a timeout fails the test
                    answer += chunk
                    footprint.sample()
            footprint.sample()
            footprint.check()
            logs = daemon.logs()
    # A head cut off is answered 502; a body cut off ends the connection mid-answer.
    status = b"HTTP/1.1 502 " if kind == "head" else b"HTTP/1.1 200 OK"
    assert answer.startswith(status), answer[:200]
    assert len(answer) < 1024 * 1024
    assert "Traceback" not in logs


# --- HTTP/1 answers a client does not read -----------------------------------------------------


class PushingUpstream(RawHttpUpstream):
    """An HTTP/1.1 upstream that answers each request with ``first`` and then ``filler`` for
    ever, as fast as the proxy reads it; ``pushed`` counts the bytes written, ``ended`` is set
    once the proxy closed the connection."""

    name = "pushing-upstream"
    handle_timeout = 120.0  # a proxy that stops reading is what the tests provoke

    def __init__(self, first: bytes, filler: bytes, *, tls: bool) -> None:
        super().__init__(tls=tls)
        self.first, self.filler = first, filler
        self.pushed = 0
        self.ended = threading.Event()

    def _one_exchange(self, sock: socket.socket, number: int) -> bool:
        if read_request(sock) is None:
            return False
        try:
            sock.sendall(self.first)
            while True:
                sock.sendall(self.filler)
                self.pushed += len(self.filler)
        finally:
            self.ended.set()


_SSE_CHUNK = b"data: " + b"x" * 16000 + b"\n\n"
_UNREAD_ANSWERS = {
    "plain-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n", b"x" * 65536),
    "plain-close": (b"HTTP/1.0 200 OK\r\n\r\n", b"x" * 65536),
    "mitm-sse": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"%x\r\n%s\r\n" % (len(_SSE_CHUNK), _SSE_CHUNK),
    ),
}


def _request_unread(daemon: DaemonProcess, up: PushingUpstream, route: str) -> socket.socket:
    """Send one GET to ``up`` (through the proxy's listener, or MITM'd as api.openai.com) on a
    socket with a small receive buffer, and read nothing."""
    if route.startswith("mitm"):
        daemon.edit_provider("openai", up.base_url, "k")
        daemon.reload_and_wait()
        sock: socket.socket = _mitm_http1(daemon)
        request = head("GET /v1/stream HTTP/1.1", OPENAI)
    else:
        sock = _plain(daemon)
        destination = f"127.0.0.1:{up.port}"
        request = head(f"GET http://{destination}/ HTTP/1.1", destination)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(request)
    return sock


@pytest.mark.parametrize("route", sorted(_UNREAD_ANSWERS))
def test_an_http1_client_that_reads_nothing_stops_the_proxy_reading_the_upstream(
    route: str,
) -> None:
    """Backpressure on an HTTP/1 client connection is the drain after each read: mitmproxy's
    waits while a socket's write buffer is over its high-water mark, so the upstream is not
    read; ours skips it only when nothing waits to be written (``drain_when_buffered``). An
    upstream that pushes as fast as it can to a client that reads nothing gets a few MiB of
    socket buffers out, not hundreds (without the drain: over 1 GiB in 3 s). A client reset
    then ends the upstream connection and the flow."""
    first, filler = _UNREAD_ANSWERS[route]
    with PushingUpstream(first, filler, tls=route.startswith("mitm")) as up:
        config: dict[str, object] = {
            "auth": "none",
            "allowed_private_cidrs": ["127.0.0.1/32"],
            "allowed_ports": [443, up.port],
        }
        if up.identity is not None:
            config["upstream_ca_file"] = up.ca_pem_path
        with DaemonProcess(config) as daemon:
            footprint = Footprint(daemon, f"unread http1 {route}", margin=100 * MIB)
            sock = _request_unread(daemon, up, route)
            wait_until(lambda: up.pushed > 0, 10, "the upstream pushes")
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                time.sleep(0.1)
                footprint.sample()
                assert up.pushed < 64 * MIB, f"the proxy kept reading: {up.pushed} bytes"
            print(f"\n[unread http1 {route}] pushed {up.pushed / MIB:.1f} MiB")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset
            assert up.ended.wait(10), "the upstream connection outlived the client's reset"
            daemon.wait_for(lambda: daemon.metric("client_connections") == 0)
            if route.startswith("mitm"):
                daemon.wait_for(
                    lambda: daemon.metric("inflight_mitm_requests", provider="openai") == 0
                )
            footprint.check()
