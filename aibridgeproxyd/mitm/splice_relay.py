"""The zero-copy relay of a tunnel: socket -> pipe -> socket with ``os.splice``, per direction.

A copying relay moves each byte twice (kernel to user, user to kernel); on this box that is
0.6-0.8 ms of CPU per MiB, almost all of it the kernel's. ``splice(2)`` moves the pages of a
socket's receive queue into a pipe and from the pipe into the other socket without copying them
to user space: 0.23-0.36 ms/MiB with 1 MiB pipes in a bare relay (bench/RESULTS.md, "Tunnel fast
path"). ``tunnel_relay.FastTunnelLayer`` starts a ``SpliceRelay`` once it has handed the
tunnel's two sockets to its ``_Relay`` protocols, when ``SplicePipes.take`` gives it two pipes.

How it runs, per direction (``_Direction``: source socket, pipe, destination socket), on the
event loop's readiness callbacks:

- the transports stop reading (``pause_reading`` removes their reader from the selector), and
  the relay registers its own reader and writer on the sockets' descriptors with the loop's
  ``_add_reader``/``_add_writer`` (the public ``add_reader`` refuses a descriptor a transport
  owns; ``dup()`` would cost two more descriptors per tunnel and keep a socket open after
  mitmproxy closed it). The transports and mitmproxy's reader tasks stay as they were: mitmproxy
  still owns and closes the connections, and its reader tasks still wait in ``reader.read()``;
- readable: splice what the socket holds into the pipe, up to the pipe's free room; each chunk
  counts as activity (``_Relay.activity``, the idle timeout). Then splice the pipe into the
  destination; when that would block, wait for the destination to be writable, and stop reading
  the source once the pipe is full: the pipe is the only buffer (at most its size per
  direction), and a slow receiver pauses the sender;
- an end of stream on the source ends the direction once its pipe is empty, through the
  source's ``_Relay.eof_received``: the destination is half-closed, or mitmproxy is told both
  ends came, exactly as with the copying relay.

Anything else hands the tunnel back to the copying relay (``SpliceRelay.fall_back``): a
connection lost (mitmproxy closed a transport: the tunnel's end, the idle timeout, the drain),
a splice error (``ECONNRESET``, ``EPIPE``: that side's transport is aborted and its
``_Relay`` passes the error to mitmproxy, as asyncio's own read or write error would), or a
splice that moved nothing. Our callbacks are removed from the descriptors that are still open,
the bytes left in a pipe are read out and written to the destination's transport, the transports
read again with their ``_Relay`` protocols, and the pipes are closed. The pipes are also closed
as soon as both directions ended, so none outlives its tunnel.

Descriptors: two pipes are four descriptors per tunnel. ``SplicePipes`` hands pipes out only
from the descriptors left above what ``max_connections`` reserves for sockets
(``SOCKET_FDS_PER_CONNECTION`` per connection plus ``FD_RESERVE``, the budget
``addons/client_limits.py`` raises RLIMIT_NOFILE to): a pipe can never take a descriptor an
accepted connection or its upstream dial needs; past that, tunnels use the copying relay. The
client limits addon also tries to raise the soft limit by ``PIPE_FDS_PER_TUNNEL`` per
connection, so with a generous hard limit every tunnel can splice.

Pipes and fallback: a pipe is asked for 1 MiB, else 256 KiB (``F_SETPIPE_SZ``); smaller than
``MIN_PIPE_SIZE`` (64 KiB, the default size) it is not used. In the bare relay a 256 KiB pipe
cost 0.37 ms/MiB, 64 KiB 0.49-0.55 (still below copying's 0.6-0.8), but 4 KiB 2.2-2.4: when a
user's pipe pages are exhausted (``/proc/sys/fs/pipe-user-pages-soft``, for users without
CAP_SYS_RESOURCE) new pipes have one or two pages and cannot grow. The copying relay is used
instead when splice is
unavailable (not Linux, no ``os.splice``), disabled (``tunnel_splice: false``), a pipe cannot be
created (EMFILE, ENFILE) or sized, or the loop is not asyncio's selector loop.

Private attributes used: the selector loop's ``_add_reader``, ``_remove_reader``,
``_add_writer`` and ``_remove_writer`` (what its transports use themselves).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import resource
import sys
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("aibridgeproxyd.tunnel")

KiB = 1024
# Pipe sizes asked for, in order; pipes smaller than MIN_PIPE_SIZE are not used.
PIPE_SIZES = (1024 * KiB, 256 * KiB)
MIN_PIPE_SIZE = 64 * KiB
# Descriptors: a client connection and its upstream connection; two pipes per spliced tunnel.
SOCKET_FDS_PER_CONNECTION = 2
PIPE_FDS_PER_TUNNEL = 4
FD_RESERVE = 256  # listeners, the database, logs, the admin listener's connections
# Linux's fcntl numbers (fcntl.h), for Pythons whose fcntl module lacks them.
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def splice_supported() -> bool:
    """Whether this platform has what the splice relay needs (Linux's ``splice(2)``)."""
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "splice")
        and hasattr(os, "SPLICE_F_NONBLOCK")
        and hasattr(os, "pipe2")
    )


def descriptors_wanted(max_connections: int, *, with_pipes: bool) -> int:
    """Descriptors ``max_connections`` connections need: their sockets and the reserve, plus,
    ``with_pipes``, every tunnel's two pipes."""
    per_connection = SOCKET_FDS_PER_CONNECTION + (PIPE_FDS_PER_TUNNEL if with_pipes else 0)
    return per_connection * max_connections + FD_RESERVE


class Pipe:
    """A non-blocking pipe: ``read_fd``, ``write_fd``, ``size`` in bytes."""

    __slots__ = ("read_fd", "size", "write_fd")

    def __init__(self, read_fd: int, write_fd: int, size: int) -> None:
        self.read_fd, self.write_fd, self.size = read_fd, write_fd, size

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def open_pipe() -> Pipe | None:
    """A non-blocking pipe of at least ``MIN_PIPE_SIZE`` bytes, or None: no descriptor left
    (EMFILE, ENFILE), or the user's pipe pages exhausted (the pipe stays small)."""
    try:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("no pipe for a splice relay: %s", errno.errorcode.get(exc.errno or 0, exc))
        return None
    pipe = Pipe(read_fd, write_fd, _grow(write_fd))
    if pipe.size < MIN_PIPE_SIZE:
        log.debug("pipe of %d bytes is too small for a splice relay", pipe.size)
        pipe.close()
        return None
    return pipe


def _grow(fd: int) -> int:
    """The size the pipe ``fd`` got, after asking for each of ``PIPE_SIZES`` in turn."""
    for size in PIPE_SIZES:
        with contextlib.suppress(OSError):
            return int(fcntl.fcntl(fd, F_SETPIPE_SZ, size))
    with contextlib.suppress(OSError):
        return int(fcntl.fcntl(fd, F_GETPIPE_SZ))
    return 0


class SplicePipes:
    """Where splice relays get their pipes, within the descriptors left above what
    ``max_connections`` reserves (see the module docstring). ``open_pipes`` counts the pipes
    relays hold now; ``spliced`` the tunnels relayed with splice since start."""

    def __init__(self, enabled: bool = True, max_connections: int = 4096) -> None:
        self.enabled = enabled and splice_supported()
        self.max_connections = max_connections
        self.open_pipes = 0
        self.spliced = 0

    def take(self) -> tuple[Pipe, Pipe] | None:
        """Two pipes for one tunnel, or None (then the tunnel uses the copying relay)."""
        if not self.enabled or not self._descriptors_left():
            return None
        first = open_pipe()
        second = open_pipe() if first is not None else None
        if first is None or second is None:
            if first is not None:
                first.close()
            return None
        self.open_pipes += 2
        self.spliced += 1
        return first, second

    def give_back(self, pipes: tuple[Pipe, Pipe]) -> None:
        """Close a tunnel's pipes."""
        for pipe in pipes:
            pipe.close()
        self.open_pipes -= len(pipes)

    def _descriptors_left(self) -> bool:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return True
        reserved = descriptors_wanted(self.max_connections, with_pipes=False)
        return reserved + 2 * (self.open_pipes + 2) <= soft


class SideRelay(Protocol):
    """What the splice relay uses of a side's copying relay (``tunnel_relay._Relay``): the
    protocol of the source socket's transport, whose ``peer`` is the destination's."""

    peer: asyncio.Transport
    bytes: int
    error: Exception | None
    activity: Callable[[], None]

    def eof_received(self) -> bool: ...


def loop_supports_splice(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` lets the relay register callbacks on a transport's descriptor."""
    return all(
        hasattr(loop, name) for name in ("_add_reader", "_remove_reader", "_add_writer")
    ) and hasattr(loop, "_remove_writer")


def _fd(transport: asyncio.BaseTransport) -> int:
    """The descriptor of a socket transport, -1 once its socket is closed."""
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else -1


_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_AGAIN = (BlockingIOError, InterruptedError)


class _Direction:
    """Source socket -> pipe -> destination socket (see the module docstring)."""

    def __init__(
        self, owner: SpliceRelay, relay: SideRelay, src: asyncio.Transport, pipe: Pipe
    ) -> None:
        self.owner, self.relay, self.pipe = owner, relay, pipe
        self.src, self.dst = src, relay.peer
        self.src_fd, self.dst_fd = _fd(src), _fd(relay.peer)
        self.in_pipe = 0  # bytes in the pipe
        self.eof = self.done = self.reading = self.writing = False

    def readable(self) -> None:
        room = self.pipe.size - self.in_pipe
        try:
            moved = os.splice(self.src_fd, self.pipe.write_fd, room, flags=_FLAGS) if room else -1
        except _AGAIN:
            moved = -1
        except OSError as exc:
            self.owner.broken(self.relay, self.src, exc)
            return
        if moved < 0:  # nothing to read, or the pipe is full (its slots hold partial pages)
            if self.in_pipe:
                self.set_reading(False)  # the destination's writer starts it again
            return
        self._account(moved)
        if not self.writing:
            self.flush()

    def _account(self, moved: int) -> None:
        if moved == 0:
            self.eof = True
            self.set_reading(False)
            return
        self.in_pipe += moved
        self.relay.bytes += moved
        self.relay.activity()
        if self.in_pipe >= self.pipe.size:
            self.set_reading(False)

    def flush(self) -> None:
        """Splice the pipe into the destination until it is empty or the socket is full."""
        if self.dst.is_closing():
            return  # mitmproxy closed it: the loss reaches the relay in a moment
        while self.in_pipe:
            try:
                moved = os.splice(self.pipe.read_fd, self.dst_fd, self.in_pipe, flags=_FLAGS)
            except _AGAIN:
                self.set_writing(True)
                return
            except OSError as exc:
                self.owner.broken(self.owner.relay_of(self.dst), self.dst, exc)
                return
            if moved <= 0:  # the pipe holds less than counted: let the copying relay go on
                self.owner.fall_back()
                return
            self.in_pipe -= moved
        self.set_writing(False)
        if self.eof:
            self._end()
        else:
            self.set_reading(True)

    def _end(self) -> None:
        self.done = True
        self.owner.direction_ended()
        try:
            self.relay.eof_received()  # half-closes the destination, or tells mitmproxy
        except OSError as exc:
            self.owner.broken(self.relay, self.src, exc)

    def set_reading(self, on: bool) -> None:
        if on and not self.reading and not self.src.is_closing():
            self.owner.loop._add_reader(self.src_fd, self.readable)  # type: ignore[attr-defined]
            self.reading = True
        elif not on and self.reading:
            self.reading = False
            self.owner.loop._remove_reader(self.src_fd)  # type: ignore[attr-defined]

    def set_writing(self, on: bool) -> None:
        if on and not self.writing and not self.dst.is_closing():
            self.owner.loop._add_writer(self.dst_fd, self.flush)  # type: ignore[attr-defined]
            self.writing = True
        elif not on and self.writing:
            self.writing = False
            self.owner.loop._remove_writer(self.dst_fd)  # type: ignore[attr-defined]

    def drain_pipe(self) -> bytes:
        """What is left in the pipe, read out (at most its size)."""
        left = bytearray()
        while len(left) < self.in_pipe:
            try:
                chunk = os.read(self.pipe.read_fd, self.in_pipe - len(left))
            except OSError:
                break
            if not chunk:
                break
            left += chunk
        self.in_pipe = 0
        return bytes(left)


class SpliceRelay:
    """Both directions of one tunnel on splice; ``up`` and ``down`` are the client's and the
    server's copying relays, already their transports' protocols. ``start`` once; it ends by
    itself when both directions ended, or by ``fall_back``."""

    def __init__(
        self, pipes: SplicePipes, pair: tuple[Pipe, Pipe], up: SideRelay, down: SideRelay
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.pipes, self.pair = pipes, pair
        self.up, self.down = up, down
        self.directions = (
            _Direction(self, up, down.peer, pair[0]),
            _Direction(self, down, up.peer, pair[1]),
        )
        self.splicing = False

    def start(self) -> None:
        self.splicing = True
        for direction in self.directions:
            direction.src.pause_reading()  # the transport's reader leaves the selector
        for direction in self.directions:
            direction.set_reading(True)

    def relay_of(self, transport: asyncio.Transport) -> SideRelay:
        """The copying relay whose transport is ``transport``."""
        return self.up if transport is self.down.peer else self.down

    def direction_ended(self) -> None:
        if all(direction.done for direction in self.directions):
            self._release()

    def broken(self, relay: SideRelay, transport: asyncio.Transport, exc: OSError) -> None:
        """A splice on ``transport``'s socket failed: abort it (``relay`` passes ``exc`` on
        to mitmproxy when the transport reports the loss) and hand the rest back."""
        log.debug("splice relay: %s", exc)
        relay.error = exc
        transport.abort()
        self.fall_back()

    def fall_back(self) -> None:
        """Hand the tunnel back to the copying relay (see the module docstring). Idempotent;
        call it from a transport's ``connection_lost``, while its socket is still open."""
        if not self.splicing:
            return
        left = [(direction, direction.drain_pipe()) for direction in self.directions]
        self._release()
        for direction in self.directions:
            if not direction.eof:
                direction.src.resume_reading()  # no-op on a closing transport
        for direction, data in left:
            if data and not direction.dst.is_closing():
                with contextlib.suppress(RuntimeError):  # a write after the end of stream
                    direction.dst.write(data)
            if direction.eof and not direction.done:
                direction.done = True
                self._end_after_fallback(direction)

    def _end_after_fallback(self, direction: _Direction) -> None:
        with contextlib.suppress(OSError):
            direction.relay.eof_received()

    def _release(self) -> None:
        """Remove our callbacks from the descriptors still open, and close the pipes."""
        self.splicing = False
        for direction in self.directions:
            direction.reading = direction.writing = False
            for transport in (direction.src, direction.dst):
                fd = _fd(transport)
                if fd >= 0:
                    self.loop._remove_reader(fd)  # type: ignore[attr-defined]
                    self.loop._remove_writer(fd)  # type: ignore[attr-defined]
        self.pipes.give_back(self.pair)


__all__ = [
    "PIPE_FDS_PER_TUNNEL",
    "Pipe",
    "SplicePipes",
    "SpliceRelay",
    "descriptors_wanted",
    "loop_supports_splice",
    "open_pipe",
    "splice_supported",
]
