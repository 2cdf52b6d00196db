"""The admin listener's connection bounds: a client that connects and sends nothing, or sends a
request head byte by byte, is closed after the head deadline, so holding every connection slot
cannot take /healthz, the API and the dashboard down (attack review of issue 11)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from aibridgeproxyd.web.server import HEAD_TIMEOUT_SECONDS
from tests.harness import DaemonProcess


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with DaemonProcess({}) as d:
        yield d


def admin_socket(daemon: DaemonProcess) -> socket.socket:
    host, port = daemon.config["admin_listen"].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=HEAD_TIMEOUT_SECONDS + 10)


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def closed_after(sock: socket.socket, trickle: bytes = b"") -> float:
    """Seconds until the listener closes ``sock`` (sending ``trickle`` a byte a second)."""
    started = time.monotonic()
    sock.settimeout(1.0)
    for byte in trickle:
        sock.sendall(bytes([byte]))
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except ConnectionError:
            return time.monotonic() - started
    sock.settimeout(HEAD_TIMEOUT_SECONDS + 10)
    try:
        while sock.recv(65536):
            pass
    except ConnectionError:
        pass
    return time.monotonic() - started


def test_a_connection_that_sends_nothing_is_closed_and_others_are_served(
    daemon: DaemonProcess,
) -> None:
    idle = [admin_socket(daemon) for _ in range(20)]
    assert daemon.admin_get("/healthz").status_code == 200
    with idle[0]:
        waited = closed_after(idle[0])
    assert waited < HEAD_TIMEOUT_SECONDS + 5
    for sock in idle[1:]:
        sock.close()


def test_a_request_head_sent_byte_by_byte_is_cut_off_at_the_deadline(
    daemon: DaemonProcess,
) -> None:
    with admin_socket(daemon) as sock:
        waited = closed_after(sock, b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 40)
    assert waited < HEAD_TIMEOUT_SECONDS + 5


def test_a_keep_alive_connection_is_served_again_and_then_closed_when_idle(
    daemon: DaemonProcess,
) -> None:
    with admin_socket(daemon) as sock:
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200")
        assert closed_after(sock) < HEAD_TIMEOUT_SECONDS + 5


def test_the_start_up_line_names_the_dashboards_url(daemon: DaemonProcess) -> None:
    (line,) = [line for line in daemon.logs().splitlines() if "aibridgeproxyd listening" in line]
    assert f"dashboard=http://{daemon.config['admin_listen']}/" in line
