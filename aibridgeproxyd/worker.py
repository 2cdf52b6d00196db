"""One proxy worker process of ``workers`` > 1, started by the main process
(``aibridgeproxyd.workers``), which writes a pickled ``WorkerSpec`` to its standard input and
hands it its end of the control channel (``aibridgeproxyd.worker_channel``) as a file
descriptor.

A worker is the one-process daemon (``Daemon``) without the admin listener: its own provider
snapshot and reload, interception writer and presence report, mitmproxy accepting on a
listening socket of its own, bound with ``SO_REUSEPORT`` to the port every worker shares
(``reuse_port_socket``). It answers the main process's status, metrics, reload and stop
requests, and keeps its own signal handling (SIGTERM drains, a second one closes at once, SIGHUP
reloads), so a signal sent to the whole process group does what it does to one process. Every
log line of a worker carries ``worker=<slot>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import socket
import sys
from dataclasses import dataclass
from typing import Any

from aibridgeproxyd.ca import CaFiles
from aibridgeproxyd.config import Config
from aibridgeproxyd.daemon import Daemon, StartupError, listen_failure, run_daemon
from aibridgeproxyd.metrics_sum import family_samples
from aibridgeproxyd.mitm.listen_socket import ListenSocket
from aibridgeproxyd.mitm.master import Master
from aibridgeproxyd.worker_channel import ChannelError, read_frame, send_frame

log = logging.getLogger("aibridgeproxyd.worker")


@dataclass(frozen=True)
class WorkerSpec:
    """What the main process tells a worker: its configuration and CA files, its slot
    (0 .. workers-1), the port to listen on (the one the main process bound: ``listen``'s, or
    the one chosen for port 0), and the descriptor number of its control end."""

    config: Config
    ca: CaFiles
    slot: int
    listen_port: int
    control_fd: int


LISTEN_BACKLOG = 4096


def reuse_port_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT``: the kernel spreads incoming
    connections over every listening socket bound so, by a hash of the connection's addresses.
    ``listen=False`` only binds (the main process's, which holds the port and accepts nothing:
    a socket that does not listen gets no connection). Raises ``OSError`` as ``bind`` does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets whose proto says
    # TCP (base_events._set_nodelay), and without it Nagle's algorithm met with delayed ACKs
    # held responses for 40 ms (measured: 48 ms median on one connection, 4.5 ms with it).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class WorkerDaemon(Daemon):
    """``Daemon`` on a ``SO_REUSEPORT`` socket of its own, with the control channel where the
    one-process daemon has its admin listener."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec.config, spec.ca)
        self.spec = spec
        self._listener: ListenSocket | None = None
        self._control: asyncio.Task[None] | None = None
        self._control_writer: asyncio.StreamWriter | None = None
        self._stop_signals = 0

    def _build_master(self) -> Master:
        master = super()._build_master()
        try:
            sock = reuse_port_socket(self.config.listen.host, self.spec.listen_port)
        except OSError as exc:
            raise StartupError(
                listen_failure("--listen", "listen", self.config.listen, exc)
            ) from None
        self._listener = ListenSocket(master, sock)
        return master

    async def _start_admin(self) -> None:
        reader, writer = await asyncio.open_connection(
            sock=socket.socket(fileno=self.spec.control_fd)
        )
        self._control_writer = writer
        with contextlib.suppress(ConnectionError):  # the main process is gone: EOF stops us
            await send_frame(writer, {"started": True})
        self._control = asyncio.create_task(self._serve_control(reader, writer), name="control")

    async def _serve_control(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer the main process until it closes the channel, then drain: the main process
        is gone or stopping, and a worker must not outlive it."""
        while True:
            try:
                request = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError, ChannelError):
                break
            try:
                await send_frame(writer, await self._answer(request))
            except ConnectionError:
                break
        self._stop(now=False)

    async def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        if command == "status":
            status: dict[str, Any] = json.loads(self._readyz().body)
            return status | {"active_flows": self.in_flight.count, "pid": os.getpid()}
        if command == "metrics":
            families = await asyncio.to_thread(family_samples, self.metrics.registry)
            info = await asyncio.to_thread(self.metrics.provider_info_exposition)
            return {"families": families, "provider_info": info.decode()}
        if command == "reload":
            return await self._reload(request.get("wait"))
        if command == "stop":
            self._stop(now=bool(request.get("now")))
            return {}
        return {"error": f"unknown command {command!r}"}

    async def _reload(self, wait: object) -> dict[str, Any]:
        """The ``reload`` command: SIGHUP passed on, or (``wait``: seconds) a management write,
        answered once this worker has applied it (``applied``) or after ``wait`` seconds."""
        if isinstance(wait, int | float) and wait > 0:
            return {"applied": await self.reloader.reload_and_wait(float(wait))}
        log.info("reloading providers: asked by the main process")
        self.reloader.trigger()
        return {}

    def _on_stop_signal(self) -> None:
        # A signal sent to the whole process group (Ctrl-C, systemd's default KillMode, the
        # ``timeout`` command) reaches the worker as well as the main process, which passes it
        # on: only this worker's own second signal skips the drain.
        self._stop_signals += 1
        self._stop(now=self._stop_signals > 1)

    def _stop(self, *, now: bool) -> None:
        """What SIGTERM does (``now``: what a second one does); asking twice is harmless."""
        if self.master is None:
            return
        if not self._stopping:
            super()._on_stop_signal()
        if now and not self._drain_now.is_set():
            super()._on_stop_signal()

    def _log_listening(self) -> None:
        log.info("worker listening", extra={"listen": str(self.config.listen), "pid": os.getpid()})

    async def _cleanup(self) -> None:
        if self._control is not None:
            self._control.cancel()
            with contextlib.suppress(BaseException):
                await self._control
        if self._control_writer is not None:
            self._control_writer.close()
        await super()._cleanup()


def _tag_log_records(slot: int) -> None:
    """Every log record of this process carries ``worker=<slot>``."""
    factory = logging.getLogRecordFactory()

    def tagged(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.worker = slot
        return record

    logging.setLogRecordFactory(tagged)


def main() -> None:
    """The worker process: read the ``WorkerSpec`` the main process wrote to standard input
    (pickled: it comes from our own parent over a pipe), run, exit with the daemon's code."""
    spec: WorkerSpec = pickle.load(sys.stdin.buffer)
    _tag_log_records(spec.slot)

    async def serve(config: Config) -> int:
        return await WorkerDaemon(spec).run()

    sys.exit(run_daemon(spec.config, serve))
