"""The inotify watch that tells the SQLite store's change probe of writes
(aibridgeproxyd.file_watch), on real files."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

from aibridgeproxyd.file_watch import SETTLE_SECONDS, FileWatch


class Calls:
    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()

    async def next(self, timeout: float = 5.0) -> bool:
        """Whether a call comes within ``timeout`` seconds (then ready for the next)."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            return False
        self.event.clear()
        return True


def watch(tmp_path: Path, calls: Calls, min_interval: float = 0.5) -> FileWatch:
    watched = FileWatch(tmp_path, ("db", "db-wal"), calls, min_interval=min_interval)
    assert watched.start() and watched.active
    return watched


async def test_a_write_to_a_watched_file_calls_and_others_do_not(tmp_path: Path) -> None:
    calls = Calls()
    watched = watch(tmp_path, calls)
    try:
        (tmp_path / "db-shm").write_bytes(b"x")
        (tmp_path / "unrelated").write_bytes(b"x")
        assert not await calls.next(timeout=0.3)
        (tmp_path / "db-wal").write_bytes(b"frame")  # created, then written
        assert await calls.next()
        with (tmp_path / "db-wal").open("ab") as wal:
            wal.write(b"commit")
        assert await calls.next()
        assert calls.count == 2
    finally:
        watched.close()


async def test_a_database_renamed_over_or_deleted_calls(tmp_path: Path) -> None:
    calls = Calls()
    (tmp_path / "db").write_bytes(b"old")
    (tmp_path / "restored").write_bytes(b"new")
    watched = watch(tmp_path, calls)
    try:
        os.replace(tmp_path / "restored", tmp_path / "db")
        assert await calls.next()
        (tmp_path / "db").unlink()
        assert await calls.next()
    finally:
        watched.close()


async def test_a_busy_file_calls_at_most_once_per_interval(tmp_path: Path) -> None:
    calls = Calls()
    watched = watch(tmp_path, calls, min_interval=0.2)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with (tmp_path / "db-wal").open("ab") as wal:
            while loop.time() - started < 1.0:
                wal.write(b"x")
                wal.flush()
                await asyncio.sleep(0.001)
        elapsed = loop.time() - started
        await asyncio.sleep(0.3)  # the call for the last writes (one interval at most)
        # One call per interval at most, plus the first (after SETTLE_SECONDS) and the last.
        assert 2 <= calls.count <= elapsed / 0.2 + 2
        settled = calls.count
        await asyncio.sleep(0.5)
        assert calls.count == settled  # nothing once the writes stop
    finally:
        watched.close()


async def test_a_watch_whose_directory_goes_says_so_and_stops(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    calls = Calls()
    watched = watch(directory, calls)
    shutil.rmtree(directory)
    assert await calls.next()
    assert not watched.active  # the caller polls again
    watched.close()  # closing twice is harmless


async def test_a_directory_that_cannot_be_watched_is_refused(tmp_path: Path) -> None:
    watched = FileWatch(tmp_path / "missing", ("db",), Calls())
    assert not watched.start()
    assert not watched.active
    assert SETTLE_SECONDS < 0.5


def _rewrite_for(path: Path, seconds: float) -> int:
    """Rewrite one byte of ``path`` as fast as possible for ``seconds``; how many times."""
    count = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            os.pwrite(fd, b"x", 0)
            count += 1
    finally:
        os.close(fd)
    return count


async def test_a_flood_of_writes_to_another_file_does_not_keep_the_loop_busy(
    tmp_path: Path,
) -> None:
    """Another file of the directory written non-stop (a log, anything local) is nothing to
    the watch: its events wait in the kernel between reads, so the loop does not wake, read
    and skip one event per write (most of a core)."""
    calls = Calls()
    watched = watch(tmp_path, calls)
    try:
        used = time.thread_time()
        writes = await asyncio.to_thread(_rewrite_for, tmp_path / "unrelated", 1.0)
        used = time.thread_time() - used
        assert writes > 1000  # a flood indeed
        assert used < 0.25, f"the loop's thread used {used:.2f} s of CPU"
        (tmp_path / "db").write_bytes(b"x")  # a watched file still calls
        assert await calls.next()
    finally:
        watched.close()
