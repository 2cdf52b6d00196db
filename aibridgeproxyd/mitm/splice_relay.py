"""The zero-copy relay of a tunnel: socket -> pipe -> socket with ``os.splice``, per direction.

A copying relay moves each byte twice (kernel to user, user to kernel); on this box that is
0.6-0.8 ms of CPU per MiB, almost all of it the kernel's. ``splice(2)`` moves the pages of a
socket's receive queue into a pipe and from the pipe into the other socket without copying them
to user space: 0.23-0.36 ms/MiB with 1 MiB pipes in a bare relay (bench/RESULTS.md, "Tunnel fast
path"). ``tunnel_relay.FastTunnelLayer`` starts a ``SpliceRelay`` once it has handed the
tunnel's two sockets to its ``_Relay`` protocols, when ``SplicePipes.take`` gives it two pipes.

How it runs, per direction (``_Direction``: source socket, pipe, destination socket):

- the transports stop reading (``pause_reading`` takes their reader out of the loop's selector)
  and each socket is registered, once, with an edge-triggered epoll of ours (``Poller``), which
  the loop watches as one more descriptor through the public ``add_reader``. The loop itself
  cannot take a socket a transport owns (its ``add_reader`` refuses it), ``dup()`` would cost two
  more descriptors per tunnel and keep a socket open after mitmproxy closed it, and the loop's
  private ``_add_reader`` would tie us to its internals (and cost a selector update each time
  a direction stops or starts). The transports and mitmproxy's reader tasks stay as they were:
  mitmproxy still owns and closes the connections, its reader tasks still wait in
  ``reader.read()``;
- an edge on a socket says it may be readable or writable; the direction then moves bytes until
  a splice would block: from the source into the pipe (up to its free room; each chunk counts as
  activity, ``_Relay.activity``, for the idle timeout) and from the pipe into the destination.
  A full destination leaves the bytes in the pipe, and a full pipe leaves the rest in the source
  socket, whose sender TCP then slows down: the pipe is the only buffer (at most its size per
  direction), and a slow receiver pauses the sender;
- an end of stream on the source ends the direction once its pipe is empty, through the
  source's ``_Relay.eof_received``: the destination is half-closed, or mitmproxy is told both
  ends came, exactly as with the copying relay.

Anything else hands the tunnel back to the copying relay (``SpliceRelay.fall_back``): a
connection lost (mitmproxy closed a transport: the tunnel's end, the idle timeout, the drain),
a splice error (``ECONNRESET``, ``EPIPE``: that side's transport is aborted and its
``_Relay`` passes the error to mitmproxy, as asyncio's own read or write error would), or a
splice that moved nothing. The sockets still open leave our epoll, the bytes left in a pipe
are read out and written to the destination's transport, the transports read again with their
``_Relay`` protocols, and the pipes are closed. The pipes are also closed
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
instead when splice is unavailable (not Linux: no ``os.splice`` or epoll), disabled
(``tunnel_splice: false``), a pipe cannot be created (EMFILE, ENFILE) or sized, or the epoll
cannot take the sockets (ENOMEM, ENOSPC). An unexpected error in the relay's callback closes
the tunnel (fail closed), as a failed handover does.

No private attribute of asyncio or mitmproxy is used here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import os
import resource
import select
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
        and hasattr(select, "epoll")
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
        self._poller: Poller | None = None

    def poller(self, loop: asyncio.AbstractEventLoop) -> Poller:
        """The relays' epoll on ``loop``, made on first use (one descriptor per process)."""
        if self._poller is None or self._poller.loop is not loop:
            self.close()
            self._poller = Poller(loop)
        return self._poller

    def close(self) -> None:
        """Close the relays' epoll (tests; a daemon's lives as long as its loop)."""
        if self._poller is not None:
            self._poller.close()
            self._poller = None

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


def _fd(transport: asyncio.BaseTransport) -> int:
    """The descriptor of a socket transport, -1 once its socket is closed."""
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else -1


_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_AGAIN = (BlockingIOError, InterruptedError)
_WATCH = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class Poller:
    """One edge-triggered epoll for the splice relays of an event loop, which watches it as one
    descriptor (``add_reader``, the public API: a socket a transport owns cannot be registered
    with the loop itself). A socket is registered once per tunnel and never modified: each
    edge says "try again", and a relay moves bytes until a splice would block."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        loop.add_reader(self.epoll.fileno(), self._dispatch)

    def watch(self, fd: int, handler: Callable[[int], None]) -> None:
        self.epoll.register(fd, _WATCH)
        self.handlers[fd] = handler

    def forget(self, fd: int) -> None:
        """Stop watching ``fd``; call it while ``fd`` is still open (its number may be reused
        once closed)."""
        self.handlers.pop(fd, None)
        with contextlib.suppress(OSError):
            self.epoll.unregister(fd)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()

    def _dispatch(self) -> None:
        for fd, events in self.epoll.poll(0):
            handler = self.handlers.get(fd)
            if handler is not None:
                handler(events)


class _Direction:
    """Source socket -> pipe -> destination socket (see the module docstring). ``readable`` and
    ``writable`` are what the last edges said, until a splice finds the socket empty or full."""

    def __init__(
        self, owner: SpliceRelay, relay: SideRelay, src: asyncio.Transport, pipe: Pipe
    ) -> None:
        self.owner, self.relay, self.pipe = owner, relay, pipe
        self.src, self.dst = src, relay.peer
        self.src_fd, self.dst_fd = _fd(src), _fd(relay.peer)
        self.in_pipe = 0  # bytes in the pipe
        self.readable = self.writable = True
        self.eof = self.done = False

    def pump(self) -> None:
        """Move bytes until neither the source nor the destination can go on; end the
        direction once the source ended and the pipe is empty."""
        while self.owner.splicing and not self.done:
            progress = self._fill()
            progress = self._drain() or progress
            if self.eof and not self.in_pipe and self.owner.splicing:
                self._end()
            elif not progress:
                return

    def _fill(self) -> bool:
        room = self.pipe.size - self.in_pipe
        if not (self.readable and room and not self.eof) or self.src.is_closing():
            return False
        try:
            moved = os.splice(self.src_fd, self.pipe.write_fd, room, flags=_FLAGS)
        except _AGAIN:
            # An empty pipe: the socket is empty. Else the pipe's slots may be full (of partial
            # pages) with bytes left in the socket: try again once the pipe drained.
            self.readable = self.in_pipe > 0
            return False
        except OSError as exc:
            self.owner.broken(self.relay, self.src, exc)
            return False
        if moved == 0:
            self.eof = True
            return True
        self.in_pipe += moved
        self.relay.bytes += moved
        self.relay.activity()
        return True

    def _drain(self) -> bool:
        if not (self.writable and self.in_pipe) or self.dst.is_closing():
            return False  # a closing destination: its loss reaches the relay in a moment
        try:
            moved = os.splice(self.pipe.read_fd, self.dst_fd, self.in_pipe, flags=_FLAGS)
        except _AGAIN:
            self.writable = False  # full: the next edge says when it has room
            return False
        except OSError as exc:
            self.owner.broken(self.owner.relay_of(self.dst), self.dst, exc)
            return False
        if moved <= 0:  # the pipe holds less than counted: let the copying relay go on
            self.owner.fall_back()
            return False
        self.in_pipe -= moved
        return True

    def _end(self) -> None:
        self.done = True
        self.owner.direction_ended()
        try:
            self.relay.eof_received()  # half-closes the destination, or tells mitmproxy
        except OSError as exc:
            self.owner.broken(self.relay, self.src, exc)

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
        self.poller = pipes.poller(asyncio.get_running_loop())
        self.pipes, self.pair = pipes, pair
        self.up, self.down = up, down
        self.directions = (
            _Direction(self, up, down.peer, pair[0]),
            _Direction(self, down, up.peer, pair[1]),
        )
        self.splicing = False

    def start(self) -> bool:
        """Start splicing; False if the sockets could not be watched (epoll's ENOMEM, ENOSPC
        past ``max_user_watches``): then the copying relay goes on, the pipes given back."""
        self.splicing = True
        upward, downward = self.directions
        for direction in self.directions:
            direction.src.pause_reading()  # the transport's reader leaves the loop's selector
        try:
            self.poller.watch(upward.src_fd, functools.partial(self._event, upward, downward))
            self.poller.watch(downward.src_fd, functools.partial(self._event, downward, upward))
        except OSError as exc:
            log.debug("splice relay not started: %s", exc)
            self.fall_back()
            return False
        for direction in self.directions:
            direction.pump()  # bytes that came before the registration
        return True

    def _event(self, reading: _Direction, writing: _Direction, events: int) -> None:
        """An edge on the socket ``reading`` reads from and ``writing`` writes to. A loop
        callback that no fail-closed guard sees: an unexpected error closes the tunnel."""
        try:
            if events & _READABLE:
                reading.readable = True
                reading.pump()
            if events & _WRITABLE:
                writing.writable = True
                writing.pump()
        except Exception:
            log.exception("splice relay failed; closing the tunnel")
            self.fall_back()
            for direction in self.directions:
                direction.src.abort()

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
        """Stop watching the sockets still open, and close the pipes."""
        self.splicing = False
        for direction in self.directions:
            fd = _fd(direction.src)
            if fd >= 0:
                self.poller.forget(fd)
        self.pipes.give_back(self.pair)


__all__ = [
    "PIPE_FDS_PER_TUNNEL",
    "Pipe",
    "Poller",
    "SplicePipes",
    "SpliceRelay",
    "descriptors_wanted",
    "open_pipe",
    "splice_supported",
]
