"""An attacker's client against the real daemon: every resource one client can make the proxy
hold is bounded (request heads, request bodies, connections, memory; README.md#configuration).

Raw sockets throughout, so the tests control every byte: heads that never end, bodies that never
end, connections that never speak. Bounds are checked by behaviour (status, bytes forwarded,
connection closed by the daemon) and by the daemon's RSS and open file descriptors, read from
/proc before and after each storm and printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import closing, suppress

import h2.config
import h2.connection
import h2.events
import h11
import pytest

from tests.fakes.tls import TunnelTarget
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, basic_auth, open_tls_tunnel, open_tunnel, wait_until

MIB = 1024 * 1024
# Generous: a storm of 300-400 MiB must not leave anything like it behind.
RSS_GROWTH_LIMIT = 100 * MIB
FD_GROWTH_LIMIT = 10
OPENAI = "api.openai.com"


# --- measuring the daemon ----------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Footprint:
    """RSS and open fds of the daemon before a storm; ``check`` compares and prints both."""

    def __init__(self, daemon: DaemonProcess, label: str) -> None:
        self.daemon, self.label = daemon, label
        self.rss, self.fds = rss_bytes(daemon.pid), open_fds(daemon.pid)
        self.peak_rss = self.rss

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, rss_bytes(self.daemon.pid))

    def check(self) -> None:
        pid = self.daemon.pid
        # Closed connections release their descriptors as the loop gets to them.
        fds_after = wait_until(
            lambda: (n := open_fds(pid)) <= self.fds + FD_GROWTH_LIMIT and n,
            timeout=15,
            message=f"{self.label}: open fds stay above {self.fds} + {FD_GROWTH_LIMIT}",
        )
        rss_after = rss_bytes(pid)
        self.peak_rss = max(self.peak_rss, rss_after)
        print(
            f"\n[{self.label}] RSS before {self.rss / MIB:.1f} MiB, peak seen "
            f"{self.peak_rss / MIB:.1f} MiB, after {rss_after / MIB:.1f} MiB; "
            f"open fds before {self.fds}, after {fds_after}"
        )
        assert rss_after - self.rss < RSS_GROWTH_LIMIT
        assert self.peak_rss - self.rss < RSS_GROWTH_LIMIT


# --- raw client helpers ------------------------------------------------------------------------


def push(sock: socket.socket, first: bytes, chunk: bytes, total: int, footprint: Footprint) -> int:
    """Send ``first`` and then ``chunk`` repeatedly up to ``total`` bytes, or until the daemon
    stops taking them (it closed the connection). Returns the bytes sent."""
    sent = 0
    try:
        sock.sendall(first)
        sent = len(first)
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
            if sent % (32 * MIB) < len(chunk):
                footprint.sample()
    except OSError:
        pass
    return sent


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The next response on ``sock`` (status, lower-case headers, body); skips nothing."""
    connection = h11.Connection(h11.CLIENT)
    # The client side of h11 must have sent a request before it parses a response.
    connection.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    status, headers, body = 0, {}, b""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            connection.receive_data(data)
            if not data and status == 0:
                raise ConnectionError("closed without an answer")
        elif isinstance(event, h11.InformationalResponse | h11.Response):
            status = event.status_code
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            if isinstance(event, h11.InformationalResponse):
                return status, headers, b""
        elif isinstance(event, h11.Data):
            body += event.data
        else:
            return status, headers, body


def closed_by_daemon(sock: socket.socket, timeout: float = 20.0) -> bool:
    """True once the daemon closed ``sock`` (EOF or reset), reading and dropping what it sends;
    False if it was still open after ``timeout`` (a generous bound, not a measurement)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    return True


def head(request_line: str, host: str, *extra: str) -> bytes:
    lines = [request_line, f"Host: {host}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(upstream: FakeUpstream, plain_target: TunnelTarget) -> Iterator[DaemonProcess]:
    """Default head limit and timeouts; a 1 MiB body limit; tokens for tunnels too."""
    config = {
        "upstream_ca_file": upstream.ca_pem_path,
        "max_request_body": "1MiB",
        "auth_tunneled": True,
        "allowed_private_cidrs": ["127.0.0.0/8"],
        "allowed_ports": [443, plain_target.port],
    }
    with DaemonProcess(config) as d:
        d.edit_provider("openai", upstream.base_url, "sk-central")
        d.reload_and_wait()
        d.token = d.create_token("attacker")  # type: ignore[attr-defined]
        yield d


def mitm_socket(daemon: DaemonProcess, alpn: str | None = "http/1.1") -> ssl.SSLSocket:
    """A TLS connection to the MITM'd provider host; ``alpn`` None offers no ALPN at all
    (curl --no-alpn, older clients): HTTP/1.1 all the same."""
    context = ssl.create_default_context(cafile=str(daemon.ca_cert_path))
    if alpn is not None:
        context.set_alpn_protocols([alpn])
    return open_tls_tunnel(
        daemon.proxy_host,
        daemon.proxy_port,
        f"{OPENAI}:443",
        context,
        basic_auth(daemon.token),  # type: ignore[attr-defined]
    )


def plain_socket(daemon: DaemonProcess) -> socket.socket:
    return socket.create_connection((daemon.proxy_host, daemon.proxy_port), timeout=20)


# --- request heads -----------------------------------------------------------------------------


def test_connect_head_that_never_ends_gets_431_and_leaves_no_memory(
    daemon: DaemonProcess,
) -> None:
    # The example: 400 MiB of CONNECT head without a blank line and without auth.
    footprint = Footprint(daemon, "CONNECT head 400 MiB")
    filler = (b"X-Filler: " + b"a" * 1000 + b"\r\n") * 1024  # ~1 MiB of header lines
    with closing(plain_socket(daemon)) as sock:
        sent = push(
            sock,
            f"CONNECT {OPENAI}:443 HTTP/1.1\r\nHost: {OPENAI}:443\r\n".encode(),
            filler,
            400 * MIB,
            footprint,
        )
        status, headers, _ = read_response(sock)
        assert status == 431
        assert headers["connection"] == "close"
        assert closed_by_daemon(sock)
    print(f"\n[CONNECT head 400 MiB] the daemon took {sent / MIB:.1f} MiB before it closed")
    assert sent < 400 * MIB
    footprint.check()


@pytest.mark.parametrize(
    "shape",
    ["one huge header line", "many small header lines"],
)
@pytest.mark.parametrize(
    "where", ["CONNECT", "plain HTTP", "MITM'd HTTP/1.1", "MITM'd HTTP/1.1 without ALPN"]
)
def test_request_head_over_the_default_limit_gets_431(
    daemon: DaemonProcess,
    plain_target: TunnelTarget,
    upstream: FakeUpstream,
    where: str,
    shape: str,
) -> None:
    if shape == "one huge header line":
        extra = ["X-Big: " + "b" * (100 * 1024)]
    else:
        extra = [f"X-Small-{i}: {'c' * 20}" for i in range(5000)]
    upstream.reset()
    target_requests = len(plain_target.requests)
    if where == "CONNECT":
        sock: socket.socket = plain_socket(daemon)
        data = head(f"CONNECT {OPENAI}:443 HTTP/1.1", f"{OPENAI}:443", *extra)
    elif where == "plain HTTP":
        sock = plain_socket(daemon)
        url = f"http://127.0.0.1:{plain_target.port}/"
        data = head(f"GET {url} HTTP/1.1", f"127.0.0.1:{plain_target.port}", *extra)
    else:
        sock = mitm_socket(daemon, alpn=None if "without ALPN" in where else "http/1.1")
        data = head("GET /v1/models HTTP/1.1", OPENAI, *extra)
    with closing(sock):
        # The daemon may close while we still send: its answer is already on the way.
        with suppress(OSError):
            sock.sendall(data)
        status, _, body = read_response(sock)
        assert status == 431
        if where.startswith("MITM'd"):
            # The provider's own error shape, as for every refusal on a MITM'd host.
            assert json.loads(body)["error"]["code"] == "request_header_fields_too_large"
        assert closed_by_daemon(sock)
    assert upstream.requests == []
    assert len(plain_target.requests) == target_requests


def test_request_head_within_the_limit_still_passes(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    upstream.reset()
    with closing(mitm_socket(daemon)) as sock:
        sock.sendall(head("GET /v1/models HTTP/1.1", OPENAI, "X-Big: " + "d" * (48 * 1024)))
        status, _, _ = read_response(sock)
    assert status == 200
    assert len(upstream.requests) == 1


def test_http2_header_block_over_the_limit_ends_the_connection(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    upstream.reset()
    with closing(mitm_socket(daemon, alpn="h2")) as sock:
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(
            1,
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", OPENAI),
                (":path", "/v1/models"),
                ("x-big", "e" * (200 * 1024)),
            ],
            end_stream=True,
        )
        sock.sendall(conn.data_to_send())
        terminated = False
        sock.settimeout(20)
        try:
            while not terminated:
                data = sock.recv(65536)
                if not data:
                    break
                for event in conn.receive_data(data):
                    terminated |= isinstance(event, h2.events.ConnectionTerminated)
                    assert not isinstance(event, h2.events.ResponseReceived)
        except (ConnectionResetError, ssl.SSLError):
            pass
    assert upstream.requests == []


def test_a_tls_client_hello_that_never_ends_is_cut_off(daemon: DaemonProcess) -> None:
    # After the CONNECT to a MITM'd host: a ClientHello announced as 16 MiB, trickled in
    # 16 KiB TLS records. mitmproxy would keep it all until it is complete.
    footprint = Footprint(daemon, "ClientHello 16 MiB")
    record = b"\x16\x03\x01\x40\x00" + b"\x00" * 0x4000
    first = b"\x16\x03\x01\x40\x00" + b"\x01\xff\xff\xff" + b"\x03\x03" + b"\x00" * (0x4000 - 6)
    sock = open_tunnel(
        daemon.proxy_host,
        daemon.proxy_port,
        f"{OPENAI}:443",
        basic_auth(daemon.token),  # type: ignore[attr-defined]
    )
    with closing(sock):
        sent = push(sock, first, record, 16 * MIB, footprint)
        assert closed_by_daemon(sock)
    assert sent < 16 * MIB
    footprint.check()


@pytest.mark.parametrize("alpn", ["http/1.1", None])
def test_pipelined_bytes_beyond_the_head_limit_close_the_connection(
    daemon: DaemonProcess, upstream: FakeUpstream, alpn: str | None
) -> None:
    # A request in flight, and the client keeps sending "the next request" meanwhile.
    footprint = Footprint(daemon, "pipelined 64 MiB")
    with closing(mitm_socket(daemon, alpn)) as sock:
        first = head(
            "GET /v1/models HTTP/1.1", OPENAI, "x-fake-response-delay-ms: 60000"
        )  # the answer waits a minute: the bytes below arrive while it is in flight
        push(sock, first, b"z" * 65536, 64 * MIB, footprint)
        assert closed_by_daemon(sock)
    footprint.check()


# --- request bodies ----------------------------------------------------------------------------


def test_chunked_body_over_the_limit_is_refused_and_never_forwarded(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    # The example: 300 MiB chunked, with a 1 MiB limit.
    upstream.reset()
    footprint = Footprint(daemon, "chunked body 300 MiB")
    chunk = b"%x\r\n%s\r\n" % (MIB, b"f" * MIB)
    with closing(mitm_socket(daemon)) as sock:
        sent = push(
            sock,
            head(
                "POST /v1/chat/completions HTTP/1.1",
                OPENAI,
                "Content-Type: application/json",
                "Transfer-Encoding: chunked",
            ),
            chunk,
            300 * MIB,
            footprint,
        )
        status, _, body = read_response(sock)
        assert status == 413
        assert json.loads(body)["error"]["code"] == "request_too_large"
        assert closed_by_daemon(sock)
    print(f"\n[chunked body 300 MiB] the daemon took {sent / MIB:.1f} MiB before it closed")
    assert upstream.requests == []
    footprint.check()


@pytest.mark.parametrize("expect_continue", [False, True])
def test_declared_body_over_the_limit_is_answered_before_it_is_sent(
    daemon: DaemonProcess, upstream: FakeUpstream, expect_continue: bool
) -> None:
    upstream.reset()
    extra = ["Content-Type: application/json", f"Content-Length: {300 * MIB}"]
    if expect_continue:
        extra.append("Expect: 100-continue")
    with closing(mitm_socket(daemon)) as sock:
        # Not one byte of the body is sent: the answer must come anyway, and not be a 100.
        sock.sendall(head("POST /v1/chat/completions HTTP/1.1", OPENAI, *extra))
        status, headers, body = read_response(sock)
        assert status == 413
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "request_too_large"
        assert closed_by_daemon(sock)
    assert upstream.requests == []
    request_id = headers["x-aibridge-request-id"]

    def record() -> dict | None:
        listing = json.loads(daemon.cli("interceptions", "list", check=True).stdout)
        return next((r for r in listing if r["id"] == request_id), None)

    # Recorded as the proxy's own refusal: its code, and no upstream time to first byte.
    recorded = daemon.wait_for(record)
    assert (recorded["status"], recorded["error"], recorded["ttfb_ms"]) == (
        413,
        "request_too_large",
        None,
    )


def test_body_within_the_limit_passes_chunked_and_declared(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    upstream.reset()
    payload = json.dumps({"model": "gpt-4o", "messages": [], "pad": "g" * 500_000}).encode()
    with closing(mitm_socket(daemon)) as sock:
        sock.sendall(
            head(
                "POST /v1/chat/completions HTTP/1.1",
                OPENAI,
                "Content-Type: application/json",
                "Transfer-Encoding: chunked",
                "Expect: 100-continue",
            )
        )
        status, _, _ = read_response(sock)
        assert status == 100  # within the limit, the expectation is met
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
        status, _, _ = read_response(sock)
        assert status == 200
        # The connection stays usable (keep-alive).
        sock.sendall(
            head(
                "POST /v1/chat/completions HTTP/1.1",
                OPENAI,
                "Content-Type: application/json",
                f"Content-Length: {len(payload)}",
            )
            + payload
        )
        status, _, _ = read_response(sock)
        assert status == 200
    assert [len(r.body) for r in upstream.requests] == [len(payload)] * 2


def _h2_status(conn: h2.connection.H2Connection, sock: ssl.SSLSocket, stream_id: int) -> int:
    """Read until ``stream_id`` has its response headers; return the status."""
    sock.settimeout(20)
    while True:
        data = sock.recv(65536)
        assert data, "connection closed before the answer"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                headers = dict(event.headers)
                sock.sendall(conn.data_to_send())
                return int(headers[b":status"])
        sock.sendall(conn.data_to_send())


def test_http2_bodies_over_the_limit_get_413_and_the_connection_lives_on(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    upstream.reset()
    request = [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", OPENAI),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
    ]
    with closing(mitm_socket(daemon, alpn="h2")) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        # No content-length: counted as it arrives.
        conn.send_headers(1, request)
        sock.sendall(conn.data_to_send())
        sock.settimeout(20)
        # 3 MiB against a 1 MiB limit, as the daemon's window allows (1 MiB per stream; it opens
        # it again as it reads), until the answer comes.
        sent, status = 0, None
        while sent < 3 * MIB and status is None:
            if conn.local_flow_control_window(1) >= 65536:
                conn.send_data(1, b"h" * 65536)
                sent += 65536
            else:
                for event in conn.receive_data(sock.recv(65536)):
                    if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                        status = int(dict(event.headers)[b":status"])
            sock.sendall(conn.data_to_send())
        assert (status or _h2_status(conn, sock, 1)) == 413
        # Declared: answered on the head, with no DATA sent at all.
        conn.send_headers(3, [*request, ("content-length", str(300 * MIB))])
        sock.sendall(conn.data_to_send())
        assert _h2_status(conn, sock, 3) == 413
        # The connection is still good for the next request.
        conn.send_headers(
            5,
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", OPENAI),
                (":path", "/v1/models"),
            ],
            end_stream=True,
        )
        sock.sendall(conn.data_to_send())
        assert _h2_status(conn, sock, 5) == 200
    assert [r.path for r in upstream.requests] == ["/v1/models"]


def test_plain_http_body_to_a_refused_request_is_not_read(
    daemon: DaemonProcess, plain_target: TunnelTarget
) -> None:
    # No token (auth_tunneled): 407 on the head, before any of the declared 300 MiB arrives.
    target_requests = len(plain_target.requests)
    url = f"http://127.0.0.1:{plain_target.port}/upload"
    with closing(plain_socket(daemon)) as sock:
        sock.sendall(
            head(
                f"POST {url} HTTP/1.1",
                f"127.0.0.1:{plain_target.port}",
                f"Content-Length: {300 * MIB}",
            )
        )
        status, _, _ = read_response(sock)
        assert status == 407
        assert closed_by_daemon(sock)
    # With a token, the declared size alone gets the 413, again before the body.
    with closing(plain_socket(daemon)) as sock:
        sock.sendall(
            head(
                f"POST {url} HTTP/1.1",
                f"127.0.0.1:{plain_target.port}",
                f"Content-Length: {300 * MIB}",
                f"Proxy-Authorization: {basic_auth(daemon.token)}",  # type: ignore[attr-defined]
            )
        )
        status, _, _ = read_response(sock)
        assert status == 413
        assert closed_by_daemon(sock)
    # A private destination: 403 on the head, whatever the body.
    blocked = f"10.255.255.1:{plain_target.port}"
    with closing(plain_socket(daemon)) as sock:
        sock.sendall(
            head(
                f"POST http://{blocked}/upload HTTP/1.1",
                blocked,
                f"Content-Length: {300 * MIB}",
                f"Proxy-Authorization: {basic_auth(daemon.token)}",  # type: ignore[attr-defined]
            )
        )
        status, _, _ = read_response(sock)
        assert status == 403
        assert closed_by_daemon(sock)
    assert len(plain_target.requests) == target_requests


# --- connections: head and idle timeouts -------------------------------------------------------


@pytest.fixture(scope="module")
def timeouts_daemon(
    upstream: FakeUpstream, plain_target: TunnelTarget, target: TunnelTarget
) -> Iterator[DaemonProcess]:
    config = {
        "upstream_ca_file": upstream.ca_pem_path,
        "auth": "none",
        "request_head_timeout": "1s",
        "idle_timeout": "1s",
        "allowed_private_cidrs": ["127.0.0.0/8"],
        "allowed_ports": [443, plain_target.port, target.port],
    }
    with DaemonProcess(config) as d:
        d.edit_provider("openai", upstream.base_url, "sk-central")
        d.reload_and_wait()
        yield d


def _closed_count(daemon: DaemonProcess, reason: str) -> float:
    return daemon.metric("client_connections_closed_total", reason=reason) or 0.0


def dribble(sock: socket.socket, data: bytes, pause: float = 0.2) -> int:
    """A slow-loris client: one byte every ``pause`` seconds until the daemon hangs up.
    The pause paces the attack; nothing waits on it. Returns the bytes sent."""
    sent = 0
    sock.settimeout(pause)
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
            sent += 1
            if sock.recv(65536) == b"":
                break
        except TimeoutError:
            continue
        except OSError:
            break
    return sent


def test_a_connection_that_sends_nothing_is_closed(timeouts_daemon: DaemonProcess) -> None:
    before = _closed_count(timeouts_daemon, "request_head_timeout")
    with closing(plain_socket(timeouts_daemon)) as sock:
        assert closed_by_daemon(sock)
    assert _closed_count(timeouts_daemon, "request_head_timeout") > before


def test_a_storm_of_silent_connections_leaves_nothing_behind(
    timeouts_daemon: DaemonProcess,
) -> None:
    footprint = Footprint(timeouts_daemon, "300 silent connections")
    silent = [plain_socket(timeouts_daemon) for _ in range(300)]
    try:
        assert all(closed_by_daemon(sock) for sock in silent)
    finally:
        for sock in silent:
            sock.close()
    footprint.check()


def test_a_connect_head_sent_byte_by_byte_is_cut_off(timeouts_daemon: DaemonProcess) -> None:
    data = head(
        f"CONNECT {OPENAI}:443 HTTP/1.1", f"{OPENAI}:443", *[f"X-{i}: y" for i in range(50)]
    )
    with closing(plain_socket(timeouts_daemon)) as sock:
        sent = dribble(sock, data)
    assert sent < len(data)  # cut off before the head was complete


def test_a_keep_alive_head_sent_byte_by_byte_is_cut_off(
    timeouts_daemon: DaemonProcess, plain_target: TunnelTarget
) -> None:
    url = f"http://127.0.0.1:{plain_target.port}/"
    request = head(f"GET {url} HTTP/1.1", f"127.0.0.1:{plain_target.port}")
    with closing(plain_socket(timeouts_daemon)) as sock:
        sock.sendall(request)
        status, _, _ = read_response(sock)
        assert status == 200
        slow = head(f"GET {url} HTTP/1.1", f"127.0.0.1:{plain_target.port}", "X-Pad: " + "p" * 200)
        sent = dribble(sock, slow)
    assert sent < len(slow)


def test_a_mitm_tunnel_that_never_starts_tls_is_closed(timeouts_daemon: DaemonProcess) -> None:
    sock = open_tunnel(timeouts_daemon.proxy_host, timeouts_daemon.proxy_port, f"{OPENAI}:443")
    with closing(sock):
        assert closed_by_daemon(sock)


def test_an_idle_tunnel_is_closed(timeouts_daemon: DaemonProcess, target: TunnelTarget) -> None:
    before = _closed_count(timeouts_daemon, "idle_timeout")
    sock = open_tunnel(
        timeouts_daemon.proxy_host, timeouts_daemon.proxy_port, f"127.0.0.1:{target.port}"
    )
    with closing(sock):
        assert closed_by_daemon(sock)
    assert _closed_count(timeouts_daemon, "idle_timeout") > before


def test_an_idle_http2_connection_is_closed(timeouts_daemon: DaemonProcess) -> None:
    context = ssl.create_default_context(cafile=str(timeouts_daemon.ca_cert_path))
    context.set_alpn_protocols(["h2"])
    sock = open_tls_tunnel(
        timeouts_daemon.proxy_host, timeouts_daemon.proxy_port, f"{OPENAI}:443", context
    )
    with closing(sock):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(
            1,
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", OPENAI),
                (":path", "/v1/models"),
            ],
            end_stream=True,
        )
        sock.sendall(conn.data_to_send())
        answered = False
        sock.settimeout(20)
        try:
            while data := sock.recv(65536):
                for event in conn.receive_data(data):
                    answered |= isinstance(event, h2.events.StreamEnded)
                sock.sendall(conn.data_to_send())
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            pass
        assert answered  # the request went through, then the idle connection was closed


def test_requests_in_flight_outlive_both_timeouts(timeouts_daemon: DaemonProcess) -> None:
    # The answer takes longer than request_head_timeout and idle_timeout together: neither
    # timer runs while a request is in flight.
    with closing(
        open_tls_tunnel(
            timeouts_daemon.proxy_host,
            timeouts_daemon.proxy_port,
            f"{OPENAI}:443",
            ssl.create_default_context(cafile=str(timeouts_daemon.ca_cert_path)),
        )
    ) as sock:
        sock.sendall(head("GET /v1/models HTTP/1.1", OPENAI, "x-fake-response-delay-ms: 3000"))
        sock.settimeout(30)
        status, _, _ = read_response(sock)
    assert status == 200


def test_a_slow_reader_gets_the_whole_response(
    timeouts_daemon: DaemonProcess, plain_target: TunnelTarget
) -> None:
    # Reading takes several times request_head_timeout: the connection is not idle while the
    # response is still on its way.
    size = 8 * MIB
    url = f"http://127.0.0.1:{plain_target.port}/bulk?bytes={size}"
    with closing(plain_socket(timeouts_daemon)) as sock:
        sock.sendall(head(f"GET {url} HTTP/1.1", f"127.0.0.1:{plain_target.port}"))
        received = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += data
            if len(received) > size and b"\r\n\r\n" in received:
                head_end = received.index(b"\r\n\r\n") + 4
                if len(received) - head_end >= size:
                    break
            time.sleep(0.02)  # the pace of a slow client, not a synchronisation
    assert received.startswith(b"HTTP/1.1 200")
    assert len(received) - (received.index(b"\r\n\r\n") + 4) >= size


# --- connections: the cap ----------------------------------------------------------------------


def test_connections_beyond_max_connections_are_refused_and_counted(
    upstream: FakeUpstream,
) -> None:
    with DaemonProcess({"max_connections": 5, "auth": "none"}) as daemon:
        footprint = Footprint(daemon, "connection cap")
        held = [plain_socket(daemon) for _ in range(5)]
        try:
            daemon.wait_for(lambda: daemon.metric("client_connections") == 5)
            with closing(plain_socket(daemon)) as extra:
                status, _, _ = read_response(extra)
                assert status == 503
                assert closed_by_daemon(extra)
            assert daemon.metric("client_connections_closed_total", reason="max_connections") == 1
            # Once one goes, a new client gets in again.
            held.pop().close()
            daemon.wait_for(lambda: daemon.metric("client_connections") == 4)
            held.append(plain_socket(daemon))
            daemon.wait_for(lambda: daemon.metric("client_connections") == 5)
            # A storm beyond the cap costs nothing that stays.
            for _ in range(200):
                with closing(plain_socket(daemon)) as refused:
                    refused.settimeout(20)
                    with suppress(OSError):
                        refused.recv(1024)
            assert daemon.metric("client_connections_closed_total", reason="max_connections") == 201
        finally:
            for sock in held:
                sock.close()
        footprint.check()
