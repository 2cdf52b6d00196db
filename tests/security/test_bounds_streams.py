"""Attacker-style end-to-end tests: what the streams of one client connection may hold
(HTTP/2 streams, WebSocket messages, upstream time; README.md#configuration).

The real daemon, real TLS through the CONNECT tunnel, a raw hyper-h2 client (full control over
HEADERS / RST_STREAM / GOAWAY), the websockets client, and local fake upstreams. Bounds are
checked by behaviour (status, what reached the upstream, gauges back to 0, exit code) and memory
by growth with generous margins, never by timing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx
import pytest

from tests.fakes.raw_http import read_head_field, serving
from tests.fakes.upstream import (
    HEADER_GATE,
    HEADER_RESPONSE_DELAY_MS,
    HEADER_STREAM_ID,
    FakeUpstream,
)
from tests.harness import DaemonProcess, open_tls_tunnel, trust

BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


def _rss(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of `pid` in bytes (VmHWM: the peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def _configure(daemon: DaemonProcess, upstream_url: str) -> None:
    for provider in ("openai", "anthropic"):
        daemon.edit_provider(provider, upstream_url, "k")
    daemon.reload_and_wait()


def _inflight(daemon: DaemonProcess) -> float:
    return daemon.metric("inflight_mitm_requests", provider="openai") or 0.0


def _active_flows(daemon: DaemonProcess) -> int:
    return int(daemon.admin_get("/healthz").json()["active_flows"])


class H2Client:
    """A raw HTTP/2 client inside a CONNECT tunnel to api.openai.com, MITM'd by the daemon."""

    def __init__(self, daemon: DaemonProcess, *, read_settings: bool = True) -> None:
        context = ssl.create_default_context(cafile=str(daemon.ca_cert_path))
        context.set_alpn_protocols(["h2"])
        self.sock = open_tls_tunnel(
            daemon.proxy_host, daemon.proxy_port, "api.openai.com:443", context
        )
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.flush()
        self.events: list[h2.events.Event] = []
        self.closed = False
        if read_settings:
            self.read_until(lambda: self.server_settings() is not None)

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def request(self, *extra_headers: tuple[str, str], path: str = "/v1/chat/completions") -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":path", path),
            (":scheme", "https"),
            (":authority", "api.openai.com"),
            ("content-type", "application/json"),
            *extra_headers,
        ]
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, BODY.encode(), end_stream=True)
        return stream_id

    def read_until(self, done, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
        """Read frames until `done()` is true or the proxy closes the connection."""
        self.sock.settimeout(timeout)
        while not done() and not self.closed:
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
                break
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.closed = True
                break
            for event in events:
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            self.events.extend(events)
            with _suppress_closed():
                self.flush()

    def server_settings(self) -> h2.events.RemoteSettingsChanged | None:
        return next(
            (e for e in self.events if isinstance(e, h2.events.RemoteSettingsChanged)), None
        )

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)

    def ended(self) -> set[int]:
        return {
            e.stream_id
            for e in self.events
            if isinstance(e, h2.events.StreamEnded | h2.events.StreamReset)
        }

    def status(self, stream_id: int) -> int | None:
        for event in self.events:
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                return int(dict(event.headers)[b":status"])
        return None

    def body(self, stream_id: int) -> bytes:
        return b"".join(
            e.data
            for e in self.events
            if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id
        )

    def close(self) -> None:
        self.sock.close()


class _suppress_closed:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:  # type: ignore[no-untyped-def]
        return exc_type is not None and issubclass(exc_type, OSError)


# --- HTTP/2 streams the client abandons --------------------------------------------------------


@pytest.mark.parametrize("how", ["rst_stream", "goaway", "disconnect"])
def test_abandoned_h2_streams_end_their_flows_at_every_stage(
    upstream: FakeUpstream, how: str
) -> None:
    """Issue example: 100 streams against a slow upstream; 64 hold an upstream connection
    (waiting for response headers), 36 wait for a connection slot. The client resets them all,
    or sends GOAWAY, or just goes away. Every flow ends: the gauge and /healthz active_flows
    return to 0 (they stayed at 36 forever), the queued 36 never reach the upstream, and SIGTERM
    no longer waits for drain_timeout."""
    upstream.reset()
    config = {"upstream_ca_file": upstream.ca_pem_path, "auth": "none", "drain_timeout": "5m"}
    with DaemonProcess(config, stop_timeout=20) as daemon:
        _configure(daemon, upstream.base_url)
        client = H2Client(daemon)
        streams = [client.request((HEADER_RESPONSE_DELAY_MS, "60000")) for _ in range(100)]
        client.flush()
        upstream.wait_for_requests(64, timeout=20)
        daemon.wait_for(lambda: _inflight(daemon) == 100, message="100 in flight")
        if how == "rst_stream":
            for stream_id in streams:
                client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            client.flush()
        elif how == "goaway":
            client.conn.close_connection()
            client.flush()
        else:
            client.close()
        daemon.wait_for(lambda: _inflight(daemon) == 0, message="every flow ended")
        assert _active_flows(daemon) == 0
        # The streams that waited for a connection slot never reached the upstream.
        assert len(upstream.requests) == 64
        records = daemon.wait_for(
            lambda: (
                (r := json.loads(daemon.cli("interceptions", "list").stdout))
                and len(r) == 100
                and r
            ),
            message="100 records",
        )
        assert all(record["error"] for record in records)
        client.close()
        # A leaked flow would hold SIGTERM for drain_timeout (5m), past the harness's 20 s.
        assert daemon.stop() == 0


@pytest.mark.parametrize("how", ["rst_stream", "disconnect"])
def test_h2_stream_abandoned_while_its_upstream_connection_is_being_set_up(how: str) -> None:
    """The connecting stage: the upstream accepts TCP and never answers the TLS handshake."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as blackhole:
        port = blackhole.getsockname()[1]
        with DaemonProcess({"auth": "none", "allowed_private_cidrs": ["127.0.0.0/8"]}) as daemon:
            _configure(daemon, f"https://127.0.0.1:{port}/v1")
            client = H2Client(daemon)
            streams = [client.request() for _ in range(3)]
            client.flush()
            accepted = []
            blackhole.settimeout(10)
            accepted.append(blackhole.accept()[0])  # the dial reached the upstream
            daemon.wait_for(lambda: _inflight(daemon) == 3, message="3 in flight")
            if how == "rst_stream":
                for stream_id in streams:
                    client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                client.flush()
            else:
                client.close()
            daemon.wait_for(lambda: _inflight(daemon) == 0, message="flows ended while connecting")
            assert _active_flows(daemon) == 0
            client.close()
            for sock in accepted:
                sock.close()


def test_h2_client_beyond_the_connection_slots_is_served(upstream: FakeUpstream) -> None:
    """100 concurrent streams of one HTTP/2 client (within SETTINGS_MAX_CONCURRENT_STREAMS):
    the upstream connections of finished streams go to the streams waiting for a connection
    slot, instead of sitting idle in the pool while those wait for the upstream to close them."""
    upstream.reset()
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path, "auth": "none"}) as daemon:
        _configure(daemon, upstream.base_url)
        client = H2Client(daemon)
        streams = [client.request() for _ in range(100)]
        client.flush()
        client.read_until(lambda: set(streams) <= client.ended(), timeout=30)
        assert [client.status(s) for s in streams] == [200] * 100
        assert len(upstream.requests) == 100
        client.close()
        daemon.wait_for(lambda: _inflight(daemon) == 0, message="gauge back to 0")


def test_a_failed_dial_is_retried_on_the_same_client_connection(tmp_path: Path) -> None:
    """The upstream refuses the first dial, then comes up: the next request on the same
    client connection dials again (mitmproxy answered the first dial's error to every later
    request for that address until the client reconnected)."""
    import socket

    import trustme

    from tests.harness import free_port

    ca = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    port = free_port()
    config = {
        "auth": "none",
        "allowed_private_cidrs": ["127.0.0.0/8"],
        "upstream_ca_file": ca_path,
    }
    with DaemonProcess(config) as daemon:
        _configure(daemon, f"https://127.0.0.1:{port}/v1")
        with httpx.Client(
            proxy=daemon.proxy_url, verify=trust(daemon.ca_cert_path), trust_env=False, timeout=10
        ) as client:
            url = "https://api.openai.com/v1/chat/completions"
            assert client.post(url, json={"model": "m", "messages": []}).status_code == 502

            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1").configure_cert(context)
            with socket.create_server(("127.0.0.1", port)) as listener:

                def answer_once() -> None:
                    raw, _ = listener.accept()
                    with context.wrap_socket(raw, server_side=True) as conn:
                        request = b""
                        while b"\r\n\r\n" not in request:
                            request += conn.recv(65536)
                        head, _, body_so_far = request.partition(b"\r\n\r\n")
                        length = int(
                            next(
                                line.split(b":", 1)[1]
                                for line in head.split(b"\r\n")
                                if line.lower().startswith(b"content-length:")
                            )
                        )
                        while len(body_so_far) < length:  # read it all: closing early resets
                            body_so_far += conn.recv(65536)
                        body = b'{"object": "chat.completion", "choices": []}'
                        conn.sendall(
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
                        )

                server = threading.Thread(target=answer_once, daemon=True)
                server.start()
                response = client.post(url, json={"model": "m", "messages": []})
                server.join(10)
            assert response.status_code == 200, (response.text, daemon.logs()[-3000:])


# --- rapid reset and concurrency ----------------------------------------------------------------


@pytest.fixture(scope="module")
def h2_daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    config = {
        "upstream_ca_file": upstream.ca_pem_path,
        "auth": "none",
        "http2_max_resets": 50,
        "http2_reset_window": "1m",
        "http2_max_concurrent_streams": 20,
    }
    with DaemonProcess(config) as daemon:
        _configure(daemon, upstream.base_url)
        yield daemon


@pytest.mark.parametrize("separate_reads", [False, True])
def test_rapid_reset_client_gets_goaway_and_barely_reaches_the_upstream(
    h2_daemon: DaemonProcess, upstream: FakeUpstream, separate_reads: bool
) -> None:
    """CVE-2023-44487: HEADERS (END_STREAM) + RST_STREAM in a loop. The connection is cut off
    with GOAWAY ENHANCE_YOUR_CALM once the reset budget (50) is spent, and the upstream sees at
    most that many requests, not thousands. A reset in the same read as the request used to be
    dropped by mitmproxy, sending every such request upstream."""
    upstream.reset()
    before = _rss(h2_daemon.pid)
    client = H2Client(h2_daemon)
    sent = 0
    client.sock.setblocking(False)
    try:
        for _ in range(5000):
            stream_id = client.request()
            if separate_reads:
                client.flush()
            client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            client.flush()
            sent += 1
            try:
                data = client.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                continue
            if not data:
                break
            client.events.extend(client.conn.receive_data(data))
            if client.goaway():
                break
    except (OSError, h2.exceptions.ProtocolError):
        pass  # the proxy closed the connection under our feet
    client.sock.setblocking(True)
    client.read_until(lambda: client.goaway() is not None)
    goaway = client.goaway()
    assert goaway is not None, f"no GOAWAY after {sent} resets"
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert sent < 5000
    h2_daemon.wait_for(lambda: _inflight(h2_daemon) == 0, message="storm flows ended")
    hits = len(upstream.requests)
    grown = _rss(h2_daemon.pid) - before
    print(f"rapid reset: {sent} HEADERS+RST sent, {hits} upstream requests, RSS +{grown >> 20} MiB")
    assert hits <= 50
    client.close()


def test_concurrent_stream_limit_is_advertised_and_enforced(
    h2_daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    upstream.reset()
    client = H2Client(h2_daemon)
    settings = client.server_settings()
    assert settings is not None
    assert (
        settings.changed_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 20
    )
    client.close()

    # A client that ignores the setting: the 21st concurrent stream closes the connection.
    client = H2Client(h2_daemon, read_settings=False)
    for _ in range(21):
        client.request((HEADER_RESPONSE_DELAY_MS, "60000"))
    client.flush()
    client.read_until(lambda: client.goaway() is not None)
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    h2_daemon.wait_for(lambda: _inflight(h2_daemon) == 0, message="flows of the closed connection")
    assert len(upstream.requests) <= 20
    client.close()


# --- upstream time -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    config = {
        "upstream_ca_file": upstream.ca_pem_path,
        "auth": "none",
        "upstream_response_timeout": "1s",
        "upstream_idle_timeout": "1s",
    }
    with DaemonProcess(config) as daemon:
        _configure(daemon, upstream.base_url)
        yield daemon


def _client(daemon: DaemonProcess, upstream: FakeUpstream) -> httpx.Client:
    return httpx.Client(
        proxy=daemon.proxy_url,
        verify=trust(daemon.ca_cert_path),
        trust_env=False,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("path", "body", "error_type"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": []}, "openai"),
        (
            "/v1/messages",
            {"model": "claude", "max_tokens": 5, "messages": []},
            "anthropic",
        ),
    ],
)
def test_upstream_that_never_answers_gets_504_in_the_client_format(
    slow_daemon: DaemonProcess, upstream: FakeUpstream, path: str, body: dict, error_type: str
) -> None:
    upstream.reset()
    stream_name = f"never-{error_type}"
    state = upstream.stream(stream_name)
    with _client(slow_daemon, upstream) as client:
        response = client.post(
            "https://api.openai.com" + path
            if error_type == "openai"
            else "https://api.anthropic.com" + path,
            json={**body, "stream": True},
            headers={HEADER_RESPONSE_DELAY_MS: "4000", HEADER_STREAM_ID: stream_name},
        )
    assert response.status_code == 504
    payload = response.json()
    if error_type == "openai":
        assert payload["error"]["code"] == "upstream_timeout"
    else:
        assert payload["type"] == "error" and payload["error"]["type"] == "timeout_error"
    assert "timed out" in response.text and "Traceback" not in response.text
    assert response.headers["x-aibridge-request-id"]
    # The upstream connection was closed: the fake sees its client gone when it answers.
    assert state.wait_finished(timeout=15) == "aborted"
    slow_daemon.wait_for(lambda: _inflight(slow_daemon) == 0, message="gauge back to 0")
    provider = "openai" if error_type == "openai" else "anthropic"
    records = slow_daemon.wait_for(
        lambda: [
            r
            for r in json.loads(slow_daemon.cli("interceptions", "list").stdout)
            if r["request_id"] == response.headers["x-aibridge-request-id"]
        ],
        message="record written",
    )
    (record,) = records
    assert record["status"] == 504 and "timeout" in record["error"]
    assert record["ttfb_ms"] is None and record["provider"] == provider


def test_upstream_timeout_answers_an_http2_client_on_its_stream(
    slow_daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    """The same 504 on an HTTP/2 stream; the connection's other streams carry on."""
    upstream.reset()
    client = H2Client(slow_daemon)
    slow = client.request((HEADER_RESPONSE_DELAY_MS, "4000"))
    fast = client.request()
    client.flush()
    client.read_until(lambda: {slow, fast} <= client.ended())
    assert (client.status(slow), client.status(fast)) == (504, 200)
    assert json.loads(client.body(slow))["error"]["code"] == "upstream_timeout"
    client.close()
    slow_daemon.wait_for(lambda: _inflight(slow_daemon) == 0, message="gauge back to 0")


def test_upstream_silent_mid_stream_breaks_the_stream(
    slow_daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    upstream.reset()
    state = upstream.gate("stall-mid-stream")
    state.release(1)
    with (
        _client(slow_daemon, upstream) as client,
        client.stream(
            "POST",
            "https://api.openai.com/v1/chat/completions",
            json={"model": "m", "messages": [], "stream": True},
            headers={HEADER_STREAM_ID: "stall-mid-stream", HEADER_GATE: "1"},
        ) as response,
    ):
        assert response.status_code == 200
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in response.iter_bytes():
                received += chunk
        assert received.startswith(b"data: ") and b"[DONE]" not in received
    assert state.wait_finished(timeout=15) == "aborted"
    slow_daemon.wait_for(lambda: _inflight(slow_daemon) == 0, message="gauge back to 0")
    (record,) = slow_daemon.wait_for(
        lambda: [
            r
            for r in json.loads(slow_daemon.cli("interceptions", "list").stdout)
            if r["error"] and "sent nothing" in r["error"]
        ],
        message="record with the idle error",
    )
    assert record["status"] == 200 and record["streamed"]


def test_upstream_time_limits_do_not_cut_a_slow_but_live_stream(
    slow_daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    """Events 400 ms apart for 3 s: never 1 s of silence, so the 1 s idle limit never fires."""
    upstream.reset()
    with _client(slow_daemon, upstream) as client:
        response = client.post(
            "https://api.openai.com/v1/chat/completions",
            json={"model": "m", "messages": [], "stream": True},
            headers={"x-fake-events": "8", "x-fake-delay-ms": "400"},
        )
    assert response.status_code == 200
    assert "[DONE]" in response.text


# --- WebSocket messages -------------------------------------------------------------------------


@pytest.fixture
def ws_upstream() -> Iterator[object]:
    from tests.fakes.websocket import FakeWebSocketUpstream

    with FakeWebSocketUpstream() as fake:
        yield fake


def _ws_daemon(fake, **config) -> DaemonProcess:  # type: ignore[no-untyped-def]
    return DaemonProcess({"upstream_ca_file": fake.ca_pem_path, "auth": "none", **config})


def _ws_connect(daemon: DaemonProcess):  # type: ignore[no-untyped-def]
    from websockets.sync.client import connect

    return connect(
        "wss://api.openai.com/v1/realtime?model=gpt-realtime",
        proxy=daemon.proxy_url,
        ssl=trust(daemon.ca_cert_path),
        max_size=None,
        open_timeout=10,
    )


def test_websocket_message_over_the_limit_closes_1009_either_direction(ws_upstream) -> None:  # type: ignore[no-untyped-def]
    from websockets.exceptions import ConnectionClosed

    limit = 64 * 1024
    with _ws_daemon(ws_upstream, max_websocket_message="64KiB") as daemon:
        _configure(daemon, ws_upstream.base_url)
        # Upstream direction: the client's message fits, the echo ("echo:" + it) does not.
        with _ws_connect(daemon) as ws:
            ws.send(b"a" * 100)
            assert ws.recv(timeout=10) == b"echo:" + b"a" * 100
            ws.send(b"b" * (limit - 2))
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            assert ws.close_code == 1009
        assert ws_upstream.closed.wait(10)
        assert ws_upstream.close_codes == [1009]
        assert ws_upstream.received == [100, limit - 2]

        # Client direction: the message never reaches the upstream.
        ws_upstream.closed.clear()
        with _ws_connect(daemon) as ws:
            with pytest.raises(ConnectionClosed):
                ws.send(b"c" * (limit + 1))
                ws.recv(timeout=10)
            assert ws.close_code == 1009
        assert ws_upstream.closed.wait(10)
        assert ws_upstream.close_codes == [1009, 1009]
        assert ws_upstream.received == [100, limit - 2]  # nothing more arrived
        daemon.wait_for(lambda: _inflight(daemon) == 0, message="sessions ended")
        daemon.wait_for(
            lambda: len(json.loads(daemon.cli("interceptions", "list").stdout)) == 2,
            message="both sessions recorded",
        )


def _send_huge_websocket_message(daemon: DaemonProcess, size: int) -> tuple[int | None, int]:
    """A raw wsproto client: upgrade, then one binary message of `size` bytes in 1 MiB
    fragments, stopping when the proxy closes. Returns (close code received, bytes sent)."""
    import select

    import wsproto
    import wsproto.events

    context = trust(daemon.ca_cert_path)
    sock = open_tls_tunnel(daemon.proxy_host, daemon.proxy_port, "api.openai.com:443", context)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    close_code: int | None = None
    sent = 0
    with sock:
        sock.sendall(ws.send(wsproto.events.Request(host="api.openai.com", target="/v1/realtime")))
        accepted = False
        while not accepted:
            ws.receive_data(sock.recv(65536))
            accepted = any(isinstance(e, wsproto.events.AcceptConnection) for e in ws.events())
        chunk = b"x" * (1024 * 1024)
        try:
            while sent < size and close_code is None:
                last = sent + len(chunk) >= size
                sock.sendall(ws.send(wsproto.events.BytesMessage(chunk, message_finished=last)))
                sent += len(chunk)
                while close_code is None and select.select([sock], [], [], 0)[0]:
                    data = sock.recv(65536)
                    ws.receive_data(data or None)
                    for event in ws.events():
                        if isinstance(event, wsproto.events.CloseConnection):
                            close_code = event.code
                    if not data:
                        break
        except (OSError, ssl.SSLError):
            pass  # the proxy closed the connection; its close frame may still be readable
        sock.settimeout(10)
        try:
            while close_code is None and (data := sock.recv(65536)):
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, wsproto.events.CloseConnection):
                        close_code = event.code
        except (OSError, ssl.SSLError):
            pass
    return close_code, sent


def test_200_mib_websocket_message_is_not_assembled(ws_upstream) -> None:  # type: ignore[no-untyped-def]
    """Issue example: a 200 MiB message was assembled whole (RSS 781 MiB). With the default
    limit (16 MiB) the session closes with 1009 after about 16 MiB, memory stays flat, and
    nothing of the message reaches the upstream."""
    with _ws_daemon(ws_upstream) as daemon:
        _configure(daemon, ws_upstream.base_url)
        before = _rss(daemon.pid)
        close_code, sent = _send_huge_websocket_message(daemon, 200 * 1024 * 1024)
        peak = _rss(daemon.pid, "VmHWM")
        print(
            f"200 MiB WebSocket message: closed {close_code} after {sent >> 20} MiB sent; "
            f"daemon RSS {before >> 20} MiB before, peak {peak >> 20} MiB"
        )
        assert close_code == 1009
        assert sent < 200 * 1024 * 1024
        assert peak - before < 100 * 1024 * 1024
        assert ws_upstream.closed.wait(10)
        assert ws_upstream.received == []
        assert ws_upstream.close_codes == [1009]
        daemon.wait_for(lambda: _inflight(daemon) == 0, message="session ended")


def test_compressed_websocket_message_is_not_inflated_beyond_the_limit(ws_upstream) -> None:  # type: ignore[no-untyped-def]
    """permessage-deflate: 8 MiB of one byte compresses to a few KiB; the proxy stops
    inflating at the limit instead of inflating whole chunks."""
    from websockets.exceptions import ConnectionClosed

    with _ws_daemon(ws_upstream, max_websocket_message="1MiB") as daemon:
        _configure(daemon, ws_upstream.base_url)
        with _ws_connect(daemon) as ws:
            ws.send(b"ok")
            assert ws.recv(timeout=10) == b"echo:ok"
            with pytest.raises(ConnectionClosed):
                ws.send(b"\0" * (8 * 1024 * 1024))
                ws.recv(timeout=30)
            assert ws.close_code == 1009
        assert ws_upstream.closed.wait(10)
        assert ws_upstream.received == [2]


@contextlib.contextmanager
def websocket_destination(message_size: int, extensions: bytes = b"") -> Iterator[int]:
    """The port of a plain-HTTP WebSocket server (a destination a client picks) that accepts
    the handshake, naming ``extensions`` if any, and sends one binary message of
    ``message_size`` bytes."""

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            key = read_head_field(conn, b"sec-websocket-key")
            accept = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + accept
                + b"\r\n"
                + (b"Sec-WebSocket-Extensions: " + extensions + b"\r\n" if extensions else b"")
                + b"\r\n"
            )
            conn.sendall(bytes([0x82, 127]) + struct.pack(">Q", message_size))
            for _ in range(message_size >> 20):
                conn.sendall(b"z" * (1 << 20))
            conn.recv(65536)

    with serving(serve) as port:
        yield port


WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def plain_websocket_upgrade(port: int) -> bytes:
    """A plain-HTTP proxy request upgrading to a WebSocket at 127.0.0.1:``port``, offering
    permessage-deflate."""
    return (
        f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    ).encode()


def test_a_plain_http_websocket_message_over_the_limit_closes_1009() -> None:
    """max_websocket_message bounded WebSockets to provider hosts only: a plain-HTTP WebSocket
    through the listener, to a server of the client's choosing, had its messages assembled
    whole, however large (the daemon grew without end while one arrived). It closes with 1009
    at the limit, as a MITM'd one does, and nothing of the message reaches the client."""
    with websocket_destination(64 * 1024 * 1024) as port:
        config = {
            "auth": "none",
            "allowed_private_cidrs": ["127.0.0.1/32"],
            "allowed_ports": [port],
            "max_websocket_message": "1MiB",
        }
        with DaemonProcess(config) as daemon:
            with socket.create_connection((daemon.proxy_host, daemon.proxy_port), 20) as sock:
                sock.sendall(plain_websocket_upgrade(port))
                received = b""
                while b"\x88" not in received.partition(b"\r\n\r\n")[2]:
                    chunk = sock.recv(65536)  # a timeout fails the test
                    assert chunk, received[:300]
                    received += chunk
            logs = daemon.logs()
    head, _, frames = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert frames[:1] == b"\x88" and frames[2:4] == struct.pack(">H", 1009), frames[:20]
    assert "exceeds max_websocket_message (1048576 bytes)" in logs
    assert "Traceback" not in logs


@pytest.mark.parametrize(
    "extensions", [b"permessage-deflate; server_max_window_bits=3", b"x-not-offered"]
)
def test_a_plain_http_websocket_handshake_the_proxy_cannot_relay_gets_502(
    extensions: bytes,
) -> None:
    """The 101 checks (websocket_handshake.switch_problem) covered provider hosts only: a
    server of the client's choosing whose 101 named permessage-deflate parameters mitmproxy
    cannot take ended the client connection with a traceback in the log; one naming an
    extension nobody offered was relayed. Both are answered 502, as for a MITM'd upstream."""
    with websocket_destination(0, extensions) as port:
        config = {
            "auth": "none",
            "allowed_private_cidrs": ["127.0.0.1/32"],
            "allowed_ports": [port],
        }
        with DaemonProcess(config) as daemon:
            with socket.create_connection((daemon.proxy_host, daemon.proxy_port), 10) as sock:
                sock.sendall(plain_websocket_upgrade(port))
                received = b""
                while chunk := sock.recv(65536):
                    received += chunk
            logs = daemon.logs()
    assert received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), received[:300]
    assert "Traceback" not in logs
