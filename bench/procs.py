"""Child processes (started and stopped by PID, even on failure) and /proc accounting."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1

# Proxy variables and daemon settings of the caller's shell must not change what is measured.
_DROPPED_ENV = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
_DROPPED_PREFIXES = ("AIBRIDGEPROXYD_",)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in _DROPPED_ENV and not key.startswith(_DROPPED_PREFIXES)
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the bench process dies, however it dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout}s")
        time.sleep(0.02)


def port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Processes:
    """Every child the bench starts. ``stop_all`` terminates them by PID: SIGTERM, then SIGKILL."""

    def __init__(self) -> None:
        self._children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
        stdin: int | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else clean_env(),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the bench, not them
            preexec_fn=_die_with_parent,
        )
        self._children.append((name, process))
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
        self._children = [(n, p) for n, p in self._children if p is not process]
        return process.returncode

    def stop_all(self) -> None:
        for _, process in reversed(list(self._children)):
            self.stop(process)


# --- /proc -------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads, including exited ones)."""
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def machine_busy_seconds() -> float:
    """Non-idle CPU time of the whole machine (all cores) from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLK_TCK


@dataclass
class CpuWindow:
    """CPU seconds used by some PIDs (and the whole machine) between start() and stop()."""

    pids: Mapping[str, int]

    def __post_init__(self) -> None:
        self.used: dict[str, float] = {}
        self.elapsed = 0.0
        self.machine_busy = 0.0

    def start(self) -> CpuWindow:
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._machine = machine_busy_seconds()
        self._t0 = time.monotonic()
        return self

    def stop(self) -> CpuWindow:
        self.elapsed = time.monotonic() - self._t0
        self.used = {name: cpu_seconds(pid) - self._before[name] for name, pid in self.pids.items()}
        self.machine_busy = machine_busy_seconds() - self._machine
        return self
