"""End to end: fast-path tunnels relayed with splice (``aibridgeproxyd.mitm.splice_relay``).

The real daemon, the raw TCP target of ``tests/test_e2e_tunnel_fast_path.py`` (whose tests, run
on the same daemon configuration, cover bytes, half-close, resets, the idle timeout and the
drain with splice on). Here: that splice IS used (the debug log names the relay; the daemon
holds two more pipes while a tunnel is open), that no pipe or socket outlives its tunnel
whichever way it ends, and that the copying relay takes over when splice is switched off or
the descriptors ``max_connections`` leaves run out.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from aibridgeproxyd.mitm.splice_relay import FD_RESERVE, splice_supported
from tests.harness import DaemonProcess, wait_until
from tests.test_e2e_tunnel_fast_path import (
    MiB,
    RawTarget,
    read_all,
    seeded_bytes,
    tunnel,
    tunnel_config,
)

pytestmark = pytest.mark.skipif(not splice_supported(), reason="splice(2) is Linux's")

SPLICED = "tunnel relayed on the fast path (splice)"
COPIED = "tunnel relayed on the fast path (copy)"


@pytest.fixture(scope="module")
def raw_target() -> Iterator[RawTarget]:
    with RawTarget() as target:
        yield target


@pytest.fixture(scope="module")
def daemon(raw_target: RawTarget) -> Iterator[DaemonProcess]:
    with DaemonProcess(tunnel_config(raw_target)) as d:
        yield d


def descriptors(daemon: DaemonProcess, kind: str) -> int:
    """The daemon's open descriptors of ``kind`` (``socket`` or ``pipe``)."""
    fd_dir = f"/proc/{daemon.pid}/fd"
    count = 0
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            count += os.readlink(f"{fd_dir}/{fd}").startswith(kind + ":")
    return count


def wait_for_baseline(daemon: DaemonProcess, sockets: int, pipes: int) -> None:
    daemon.wait_for(
        lambda: daemon.metric("client_connections") == 0, message="client_connections back to 0"
    )
    wait_until(lambda: descriptors(daemon, "pipe") <= pipes, 10, "pipes back to the baseline")
    wait_until(lambda: descriptors(daemon, "socket") <= sockets, 10, "sockets back")


def test_a_bulk_tunnel_is_spliced_through_two_pipes_that_close_with_it(
    daemon: DaemonProcess, raw_target: RawTarget
) -> None:
    wait_for_baseline(daemon, 10**6, 10**6)
    pipes_before, sockets_before = descriptors(daemon, "pipe"), descriptors(daemon, "socket")
    spliced_before = daemon.logs().count(SPLICED)
    size = 32 * MiB + 5
    with tunnel(daemon, raw_target, f"SOURCE {size} 3") as sock:
        received = bytearray(sock.recv(MiB))
        # Mid-transfer (we read no more for now): the tunnel holds two pipes, four descriptors.
        wait_until(lambda: descriptors(daemon, "pipe") == pipes_before + 4, 5, "two pipes")
        received += read_all(sock)
    assert hashlib.sha256(received).digest() == hashlib.sha256(seeded_bytes(size, 3)).digest()
    assert daemon.logs().count(SPLICED) == spliced_before + 1
    assert COPIED not in daemon.logs()
    wait_for_baseline(daemon, sockets_before, pipes_before)


def _end_one_way(daemon: DaemonProcess, target: RawTarget, way: int) -> None:
    """One tunnel, ended one of four ways: a complete download, an echo ended by a half-close,
    a client reset mid-transfer, an upstream reset mid-transfer."""
    if way == 0:
        with tunnel(daemon, target, f"SOURCE {MiB} 1") as sock:
            assert len(read_all(sock)) == MiB
    elif way == 1:
        with tunnel(daemon, target, "ECHO") as sock:
            _echo_once(sock, b"ping")  # on the fast path before the half-close
            sock.sendall(b"e" * 100_000)
            sock.shutdown(socket.SHUT_WR)
            assert len(read_all(sock)) == 100_000
    elif way == 2:
        sock = tunnel(daemon, target, "ECHO")
        sock.sendall(os.urandom(MiB))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    else:
        with tunnel(daemon, target, f"ABORT {MiB}") as sock, contextlib.suppress(OSError):
            while sock.recv(MiB):
                pass


def test_many_tunnels_ending_every_way_leave_no_pipe_or_socket_behind(
    daemon: DaemonProcess, raw_target: RawTarget
) -> None:
    wait_for_baseline(daemon, 10**6, 10**6)
    pipes_before, sockets_before = descriptors(daemon, "pipe"), descriptors(daemon, "socket")
    spliced_before = daemon.logs().count(SPLICED)
    errors: list[BaseException] = []

    def run(way: int) -> None:
        try:
            for _ in range(10):
                _end_one_way(daemon, raw_target, way)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(way,)) for way in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    wait_for_baseline(daemon, sockets_before, pipes_before)
    # Most went through splice (a tunnel reset before its handover never reaches the relay).
    assert daemon.logs().count(SPLICED) - spliced_before >= 30
    assert "Traceback" not in daemon.logs()


def test_with_tunnel_splice_off_tunnels_use_the_copying_relay(raw_target: RawTarget) -> None:
    size = 8 * MiB + 1
    with DaemonProcess(tunnel_config(raw_target, tunnel_splice=False)) as d:
        pipes_before = descriptors(d, "pipe")
        with tunnel(d, raw_target, f"SOURCE {size} 5") as sock:
            received = bytearray(sock.recv(MiB))
            assert descriptors(d, "pipe") == pipes_before
            received += read_all(sock)
        assert received == seeded_bytes(size, 5)
        assert COPIED in d.logs() and SPLICED not in d.logs()


def _echo_once(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        received += sock.recv(len(data))
    assert received == data


@pytest.mark.skipif(
    resource.getrlimit(resource.RLIMIT_NOFILE)[1] in (resource.RLIM_INFINITY,)
    or resource.getrlimit(resource.RLIMIT_NOFILE)[1] > 2**24,
    reason="the descriptor budget needs a finite open file limit",
)
def test_tunnels_beyond_the_descriptor_budget_use_the_copying_relay(
    raw_target: RawTarget,
) -> None:
    # max_connections' sockets take every descriptor but four: room for one tunnel's pipes.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    max_connections = (hard - FD_RESERVE - 4) // 2
    config = tunnel_config(raw_target, max_connections=max_connections)
    with DaemonProcess(config) as d:
        with tunnel(d, raw_target, "ECHO") as first:
            _echo_once(first, b"first")
            wait_until(lambda: SPLICED in d.logs(), 5, "the first tunnel spliced")
            with tunnel(d, raw_target, "ECHO") as second:
                _echo_once(second, os.urandom(MiB))
                wait_until(lambda: COPIED in d.logs(), 5, "the second tunnel copied")
                _echo_once(first, os.urandom(MiB))
        # The first tunnel's pipes are back: the next tunnel splices again.
        d.wait_for(lambda: d.metric("client_connections") == 0, message="connections closed")
        with tunnel(d, raw_target, "ECHO") as third:
            _echo_once(third, b"third")
            wait_until(lambda: d.logs().count(SPLICED) == 2, 5, "the third tunnel spliced")
