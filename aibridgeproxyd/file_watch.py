"""Tell the event loop when files of one directory change, through Linux ``inotify(7)``.

The SQLite store's change probe (``aibridgeproxyd.store_access``) would otherwise poll the
database files twice a second for ever, and each wake-up of an idle daemon costs CPU. With a
watch the probe runs when a file changed (a management write, the daemon's own writes), at most
once per ``min_interval``, and polls only as a slow safety net.

Where inotify is not available (another OS, no instance left under
``fs.inotify.max_user_instances``) ``FileWatch.start`` says so and the caller keeps polling; a
watch that ends (its directory deleted or moved) calls ``on_change`` a last time and reports
itself inactive, so the caller polls again.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct
from collections.abc import Callable, Collection
from pathlib import Path

log = logging.getLogger("aibridgeproxyd.store")

# inotify(7) flags and event bits (<sys/inotify.h>).
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_IN_MODIFY = 0x2
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
_WATCH_MASK = (
    _IN_MODIFY
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_ONLYDIR
)
# The watch has ended: the directory went away or moved (its path now names another).
_WATCH_ENDED = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED
# struct inotify_event: wd, mask, cookie, len, then ``len`` bytes of NUL-padded name.
_EVENT = struct.Struct("iIII")
_READ_BYTES = 64 * 1024

# A write is several write(2) calls, the commit last: the first call waits this long, so that
# the change is usually committed when ``on_change`` runs (a later call comes for the rest).
SETTLE_SECONDS = 0.05


class FileWatch:
    """Calls ``on_change()`` on the running loop when a file named one of ``names`` in
    ``directory`` is written, created, deleted or renamed: ``SETTLE_SECONDS`` after the first
    change, then at most once per ``min_interval`` seconds however many follow (the events of a
    busy database wait in the kernel meanwhile). ``active``: whether the watch is in place."""

    def __init__(
        self,
        directory: Path,
        names: Collection[str],
        on_change: Callable[[], None],
        min_interval: float = 0.5,
    ) -> None:
        self.directory = directory
        self.names = frozenset(os.fsencode(name) for name in names)
        self.on_change = on_change
        self.min_interval = min_interval
        self.active = False
        self._fd: int | None = None
        self._last_call = float("-inf")
        self._pending: asyncio.TimerHandle | None = None

    def start(self) -> bool:
        """Watch ``directory``; False (and nothing started) where inotify cannot watch it."""
        fd = _watching(self.directory)
        if fd is None:
            return False
        self._fd, self.active = fd, True
        asyncio.get_running_loop().add_reader(fd, self._readable)
        return True

    def close(self) -> None:
        """Stop watching (no call after this)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        fd, self._fd, self.active = self._fd, None, False
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, _READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self._end(f"cannot read the watch: {exc}")
            return
        changed, ended = _scan(data, self.names)
        if ended:
            self._end("the directory was removed or moved")
        elif changed:
            self._schedule()
        else:
            self._pause()

    def _pause(self) -> None:
        """Read no events for ``SETTLE_SECONDS``: another file of the directory written
        non-stop would wake the loop once per write (the kernel merges a repeated event that
        waits unread, and a queue that overflows counts as a change)."""
        loop = asyncio.get_running_loop()
        assert self._fd is not None
        loop.remove_reader(self._fd)
        self._pending = loop.call_later(SETTLE_SECONDS, self._resume)

    def _resume(self) -> None:
        self._pending = None
        if self._fd is not None:
            asyncio.get_running_loop().add_reader(self._fd, self._readable)

    def _schedule(self) -> None:
        """Call ``on_change`` soon; read no more events until then."""
        loop = asyncio.get_running_loop()
        assert self._fd is not None
        loop.remove_reader(self._fd)
        delay = max(SETTLE_SECONDS, self._last_call + self.min_interval - loop.time())
        self._pending = loop.call_later(delay, self._call)

    def _call(self) -> None:
        self._pending = None
        loop = asyncio.get_running_loop()
        self._last_call = loop.time()
        if self._fd is not None:
            loop.add_reader(self._fd, self._readable)
        self.on_change()

    def _end(self, reason: str) -> None:
        log.info(
            "no longer watching %s for store changes (%s); polling instead", self.directory, reason
        )
        self.close()
        self.on_change()


def _scan(data: bytes, names: frozenset[bytes]) -> tuple[bool, bool]:
    """``(changed, ended)`` of a read of inotify events: whether one names a file of ``names``
    (or events were lost: the queue overflowed), and whether the watch has ended."""
    changed = ended = False
    offset = 0
    while offset + _EVENT.size <= len(data):
        _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
        offset += _EVENT.size + length
        ended = ended or bool(mask & _WATCH_ENDED)
        changed = changed or bool(mask & _IN_Q_OVERFLOW) or name in names
    return changed, ended


def _watching(directory: Path) -> int | None:
    """A non-blocking inotify descriptor watching ``directory``, or None (logged)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        log.info("no inotify here: the store's change probe polls every 0.5 s")
        return None
    init.argtypes, init.restype = [ctypes.c_int], ctypes.c_int
    add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    add.restype = ctypes.c_int
    fd = init(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        log.info(
            "cannot watch %s (%s): the store's change probe polls every 0.5 s",
            directory,
            os.strerror(ctypes.get_errno()),
        )
        return None
    if add(fd, os.fsencode(directory), _WATCH_MASK) < 0:
        log.info(
            "cannot watch %s (%s): the store's change probe polls every 0.5 s",
            directory,
            os.strerror(ctypes.get_errno()),
        )
        os.close(fd)
        return None
    return fd
