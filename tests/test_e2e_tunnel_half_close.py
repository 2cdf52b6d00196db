"""End to end: an end of stream in a tunnel is a half-close, however early it comes.

A tunneled CONNECT's bytes are relayed untouched, ends of stream included: when one side
half-closes (``shutdown(SHUT_WR)``), the other side is half-closed and the other direction
carries on until its own end. The cases here end a side at once, with its first bytes, before
the tunnel's fast-path handover (``aibridgeproxyd.mitm.tunnel_relay``): the client after its
request (an echo target answers it), or a target that speaks first after its answer (and
counts what the client still sends). Both relays after the handover (splice and copy) are
run. A reset is still passed on as a reset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from tests.harness import DaemonProcess, _connect, wait_until
from tests.test_e2e_tunnel_fast_path import MiB, RawTarget, read_all, tunnel_config

SIZE = 100_000
ROUNDS = 5  # the race with the handover is the daemon's: several tunnels give it chances


class Outcomes:
    """What the targets' connections ended with, in order: a byte count, ``"eof"`` or
    ``"reset"``."""

    def __init__(self) -> None:
        self.seen: list[int | str] = []
        self.changed = threading.Condition()

    def note(self, outcome: int | str) -> None:
        with self.changed:
            self.seen.append(outcome)
            self.changed.notify_all()

    def next(self, count: int) -> int | str:
        """The outcome after the first ``count``, once there is one."""
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.seen) > count, 10), "no outcome"
            return self.seen[count]


class WatchTarget(RawTarget):
    """``RawTarget`` plus ``WATCH``: read until the end and note how it ended."""

    def __init__(self, outcomes: Outcomes) -> None:
        super().__init__()
        self.outcomes = outcomes

    def _watch(self, conn: socket.socket) -> None:
        try:
            while conn.recv(MiB):
                pass
        except ConnectionResetError:
            self.outcomes.note("reset")
        else:
            self.outcomes.note("eof")


class AnswerFirstTarget:
    """Speaks first: on accept it sends ``SIZE`` bytes and half-closes at once, then counts the
    bytes still coming until the client's end of stream (noted in ``outcomes``)."""

    def __init__(self, outcomes: Outcomes) -> None:
        self.outcomes = outcomes
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.sendall(b"a" * SIZE)
            conn.shutdown(socket.SHUT_WR)
            received = 0
            while chunk := conn.recv(MiB):
                received += len(chunk)
            self.outcomes.note(received)


@dataclasses.dataclass
class Targets:
    outcomes: Outcomes
    raw: WatchTarget
    answer_first: AnswerFirstTarget


@pytest.fixture(scope="module")
def targets() -> Iterator[Targets]:
    outcomes = Outcomes()
    answer_first = AnswerFirstTarget(outcomes)
    with WatchTarget(outcomes) as raw:
        yield Targets(outcomes, raw, answer_first)
    answer_first.close()


@pytest.fixture(scope="module", params=[True, False], ids=["splice", "copy"])
def daemon(request: pytest.FixtureRequest, targets: Targets) -> Iterator[DaemonProcess]:
    ports = [443, targets.raw.port, int(targets.answer_first.address.rsplit(":", 1)[1])]
    config = tunnel_config(targets.raw, tunnel_splice=request.param, allowed_ports=ports)
    with DaemonProcess(config) as d:
        yield d


def connect(daemon: DaemonProcess, address: str) -> tuple[socket.socket, bytes]:
    """A tunnel to ``address``, and the bytes that came right after the CONNECT's 200."""
    sock = socket.create_connection((daemon.proxy_host, daemon.proxy_port), timeout=20)
    response, trailing = _connect(sock, address, None, ())
    assert response.status_code == 200
    return sock, trailing


def assert_all_closed(daemon: DaemonProcess) -> None:
    daemon.wait_for(
        lambda: daemon.metric("client_connections") == 0, message="client_connections back to 0"
    )


def test_a_client_half_close_with_its_first_bytes_still_gets_the_whole_answer(
    daemon: DaemonProcess, targets: Targets
) -> None:
    for _ in range(ROUNDS):
        sock, _ = connect(daemon, targets.raw.address)
        with sock:
            # The request and the end of stream right after the CONNECT's 200, in one go.
            sock.sendall(b"ECHO\n" + b"e" * SIZE)
            sock.shutdown(socket.SHUT_WR)
            assert len(read_all(sock)) == SIZE
    assert_all_closed(daemon)
    assert "Traceback" not in daemon.logs()


def test_a_target_half_close_with_its_first_answer_still_gets_the_rest_of_the_request(
    daemon: DaemonProcess, targets: Targets
) -> None:
    for _ in range(ROUNDS):
        count = len(targets.outcomes.seen)
        sock, trailing = connect(daemon, targets.answer_first.address)
        with sock:
            # The target's answer and end of stream came with, or right after, the 200.
            assert len(trailing + read_all(sock)) == SIZE
            sock.sendall(b"r" * SIZE)  # still sending after it: the client side stays open
            sock.shutdown(socket.SHUT_WR)
            assert targets.outcomes.next(count) == SIZE
    assert_all_closed(daemon)
    assert "Traceback" not in daemon.logs()


def test_a_client_reset_right_after_its_first_bytes_resets_the_target_side(
    daemon: DaemonProcess, targets: Targets
) -> None:
    count = len(targets.outcomes.seen)
    sock, _ = connect(daemon, targets.raw.address)
    sock.sendall(b"WATCH\n" + b"w" * SIZE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset
    assert targets.outcomes.next(count) == "reset"
    assert_all_closed(daemon)


def test_a_client_half_close_after_the_handover_still_ends_the_tunnel(
    daemon: DaemonProcess, targets: Targets
) -> None:
    # Both ends of stream reach mitmproxy once both directions ended, and it closes the tunnel.
    sock, _ = connect(daemon, targets.raw.address)
    with sock:
        sock.sendall(b"ECHO\nping")
        assert sock.recv(4) == b"ping"
        wait_until(lambda: "tunnel relayed on the fast path" in daemon.logs(), 5, "fast path")
        sock.sendall(b"e" * SIZE)
        sock.shutdown(socket.SHUT_WR)
        assert len(read_all(sock)) == SIZE
    assert_all_closed(daemon)


def test_a_target_reset_reaches_the_client_as_a_reset(
    daemon: DaemonProcess, targets: Targets
) -> None:
    sock, _ = connect(daemon, targets.raw.address)
    with sock, pytest.raises(ConnectionResetError):
        sock.sendall(b"ABORT 1000\n")  # 1000 bytes, then the target resets
        read_all(sock)
    assert_all_closed(daemon)
