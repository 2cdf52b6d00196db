"""End to end: tunneled CONNECTs relayed on the fast path (``aibridgeproxyd.mitm.tunnel_relay``).

A raw TCP target runs in threads; the first line a client sends picks what it does: take
bytes until the end of stream and answer their SHA-256 (``SINK``), send N seeded random bytes
(``SOURCE n seed``), echo (``ECHO``), send N bytes then reset (``ABORT n``), or just hold the
connection and note when the proxy closes it (``HOLD``). Every test checks that the tunnel
really went on the fast path (its debug log line), and that nothing is left behind: the
``client_connections`` gauge back to 0 and the daemon's open sockets back to where they
were.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Self

import pytest

from tests.harness import DaemonProcess, open_tunnel, wait_until
from tests.test_e2e_upstream_proxy import CorporateProxy

MiB = 1 << 20
FAST_PATH_LOG = "tunnel relayed on the fast path"


def seeded_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class RawTarget:
    """The raw TCP target described in the module docstring."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.held_closed = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Self:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._listener.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            line = b""
            while not line.endswith(b"\n"):
                chunk = conn.recv(1)
                if not chunk:
                    return
                line += chunk
            command, *args = line.decode().split()
            getattr(self, "_" + command.lower())(conn, *args)

    def _sink(self, conn: socket.socket) -> None:
        digest = hashlib.sha256()
        while chunk := conn.recv(MiB):
            digest.update(chunk)
        conn.sendall(digest.hexdigest().encode())  # after the client's end of stream

    def _source(self, conn: socket.socket, size: str, seed: str) -> None:
        conn.sendall(seeded_bytes(int(size), int(seed)))

    def _echo(self, conn: socket.socket) -> None:
        while chunk := conn.recv(MiB):
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)

    def _abort(self, conn: socket.socket, size: str) -> None:
        conn.sendall(os.urandom(int(size)))
        time.sleep(0.2)
        # SO_LINGER 0: close() sends a reset, the way a crashed upstream looks.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _hold(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while conn.recv(MiB):
                pass
        self.held_closed.set()


@pytest.fixture(scope="module")
def raw_target() -> Iterator[RawTarget]:
    with RawTarget() as target:
        yield target


def tunnel_config(raw_target: RawTarget, **extra: object) -> dict[str, object]:
    return {
        "auth": "none",
        "allowed_private_cidrs": ["127.0.0.0/8"],
        "allowed_ports": [443, raw_target.port],
        "log_level": "debug",
        **extra,
    }


@pytest.fixture(scope="module")
def daemon(raw_target: RawTarget) -> Iterator[DaemonProcess]:
    with DaemonProcess(tunnel_config(raw_target)) as d:  # idle_timeout 5m: ends are our doing
        yield d


@pytest.fixture(scope="module")
def idle_daemon(raw_target: RawTarget) -> Iterator[DaemonProcess]:
    with DaemonProcess(tunnel_config(raw_target, idle_timeout="1s")) as d:
        yield d


def open_fds(daemon: DaemonProcess) -> int:
    """The daemon's open sockets (its database files come and go with reloads)."""
    fd_dir = f"/proc/{daemon.pid}/fd"
    count = 0
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            count += os.readlink(f"{fd_dir}/{fd}").startswith("socket:")
    return count


def tunnel(daemon: DaemonProcess, target: RawTarget, command: str) -> socket.socket:
    sock = open_tunnel(daemon.proxy_host, daemon.proxy_port, target.address, timeout=20)
    sock.sendall(command.encode() + b"\n")
    return sock


def read_all(sock: socket.socket) -> bytes:
    received = bytearray()
    while chunk := sock.recv(MiB):
        received += chunk
    return bytes(received)


def assert_left_nothing(daemon: DaemonProcess, fds_before: int) -> None:
    daemon.wait_for(
        lambda: daemon.metric("client_connections") == 0, message="client_connections back to 0"
    )
    # The target's side and our own sockets are closed; the daemon holds no socket more.
    wait_until(lambda: open_fds(daemon) <= fds_before, 10, "file descriptors back")


def fast_path_count(daemon: DaemonProcess) -> int:
    return daemon.logs().count(FAST_PATH_LOG)


@pytest.fixture
def fds_before(daemon: DaemonProcess) -> int:
    assert_left_nothing(daemon, 10**6)  # earlier tests' connections gone first
    return open_fds(daemon)


# --- bytes intact, both ways --------------------------------------------------------------------


def test_bulk_bytes_from_the_target_arrive_intact(
    daemon: DaemonProcess, raw_target: RawTarget, fds_before: int
) -> None:
    size = 24 * MiB + 12345
    with tunnel(daemon, raw_target, f"SOURCE {size} 7") as sock:
        received = read_all(sock)
    assert hashlib.sha256(received).digest() == hashlib.sha256(seeded_bytes(size, 7)).digest()
    assert FAST_PATH_LOG in daemon.logs()
    assert_left_nothing(daemon, fds_before)


def test_bulk_bytes_to_the_target_arrive_intact_and_its_answer_after_our_end_of_stream(
    daemon: DaemonProcess, raw_target: RawTarget, fds_before: int
) -> None:
    # Half-close: the client ends its side; the target answers only after it saw that end.
    payload = os.urandom(16 * MiB + 7)
    with tunnel(daemon, raw_target, "SINK") as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        answer = read_all(sock)
    assert answer == hashlib.sha256(payload).hexdigest().encode()
    assert_left_nothing(daemon, fds_before)


def test_bytes_both_ways_at_once_arrive_intact(
    daemon: DaemonProcess, raw_target: RawTarget, fds_before: int
) -> None:
    payload = os.urandom(12 * MiB + 3)
    before = fast_path_count(daemon)
    with tunnel(daemon, raw_target, "ECHO") as sock:
        # A little ping-pong first, then a bulk transfer sent and echoed concurrently.
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        echoed = read_all(sock)
        sender.join()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert fast_path_count(daemon) == before + 1
    assert_left_nothing(daemon, fds_before)


# --- aborts ---------------------------------------------------------------------------------


def test_a_client_abort_mid_transfer_closes_the_target_side_and_leaves_nothing(
    daemon: DaemonProcess, raw_target: RawTarget, fds_before: int
) -> None:
    raw_target.held_closed.clear()
    sock = tunnel(daemon, raw_target, "HOLD")
    sock.sendall(os.urandom(4 * MiB))
    wait_until(lambda: FAST_PATH_LOG in daemon.logs(), 5, "fast path")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset, mid-stream
    assert raw_target.held_closed.wait(10), "the target's connection was not closed"
    assert_left_nothing(daemon, fds_before)


def test_an_upstream_abort_mid_transfer_ends_the_tunnel_and_leaves_nothing(
    daemon: DaemonProcess, raw_target: RawTarget, fds_before: int
) -> None:
    with tunnel(daemon, raw_target, f"ABORT {2 * MiB}") as sock:
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(MiB):
                received += len(chunk)
    assert received <= 2 * MiB
    assert_left_nothing(daemon, fds_before)


# --- timeouts and the drain -----------------------------------------------------------------


def test_an_idle_fast_path_tunnel_is_closed_and_a_busy_one_is_not(
    idle_daemon: DaemonProcess, raw_target: RawTarget
) -> None:
    daemon = idle_daemon
    fds_before = open_fds(daemon)
    with tunnel(daemon, raw_target, "ECHO") as busy, tunnel(daemon, raw_target, "ECHO") as idle:
        for sock in (busy, idle):
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        started = time.monotonic()
        # The busy one exchanges a byte every 0.3 s for longer than idle_timeout (1 s).
        while time.monotonic() - started < 2.5:
            busy.sendall(b"y")
            assert busy.recv(1) == b"y"
            time.sleep(0.3)
        idle.settimeout(5)
        assert idle.recv(1) == b"", "the idle tunnel was not closed"
    assert daemon.logs().count(FAST_PATH_LOG) == 2
    assert_left_nothing(daemon, fds_before)


def test_sigterm_closes_an_open_fast_path_tunnel_and_exits_cleanly(raw_target: RawTarget) -> None:
    with DaemonProcess(tunnel_config(raw_target, drain_timeout="2s")) as d:
        raw_target.held_closed.clear()
        sock = tunnel(d, raw_target, "HOLD")
        sock.sendall(b"some bytes")
        wait_until(lambda: FAST_PATH_LOG in d.logs(), 5, "fast path")
        with sock:
            assert d.stop() == 0
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
        assert raw_target.held_closed.wait(5)
        assert "Traceback" not in d.logs()


# --- through a corporate proxy --------------------------------------------------------------


def test_a_tunnel_through_the_corporate_proxy_carries_bulk_bytes_intact(
    raw_target: RawTarget,
) -> None:
    size = 8 * MiB + 1
    with (
        CorporateProxy() as corporate,
        DaemonProcess(tunnel_config(raw_target, upstream_proxy=corporate.url())) as d,
    ):
        with tunnel(d, raw_target, f"SOURCE {size} 11") as sock:
            received = read_all(sock)
        assert received == seeded_bytes(size, 11)
        assert [asked.target for asked in corporate.asked] == [raw_target.address]
        d.wait_for(lambda: d.metric("client_connections") == 0, message="connections closed")


def test_destination_checks_still_apply(daemon: DaemonProcess) -> None:
    assert daemon.raw_connect("10.1.2.3:443").status_code == 403
    assert daemon.raw_connect("127.0.0.1:1").status_code == 403  # port not allowed
    assert daemon.metric("connect_sessions_total", type="tunneled")


def test_a_tunnel_dial_never_answered_gets_504_after_the_connect_timeout(
    raw_target: RawTarget,
) -> None:
    """A listener whose accept queue is full drops every new SYN, so a tunnel's dial to it is
    never answered: the system would retry for about two minutes. ``upstream_connect_timeout``
    (2s here) closes the dial, the CONNECT gets a bare 504 (the reason only in the log), and
    the next tunnel is relayed."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))  # fills the accept queue
    config = tunnel_config(
        raw_target, upstream_connect_timeout="2s", allowed_ports=[443, raw_target.port, port]
    )
    try:
        with DaemonProcess(config) as d:
            started = time.monotonic()
            response = d.raw_connect(f"127.0.0.1:{port}")
            waited = time.monotonic() - started
            with tunnel(d, raw_target, f"SOURCE {MiB} 3") as sock:
                received = read_all(sock)
            logs = d.logs()
    finally:
        queued.close()
        listener.close()
    assert waited < 8, f"the client waited {waited:.1f}s on an unanswered dial"
    assert response.status_code == 504, response
    assert f"tunnel to 127.0.0.1:{port} failed: no connection within 2s: timed out" in logs
    assert received == seeded_bytes(MiB, 3)
    assert "Traceback" not in logs
