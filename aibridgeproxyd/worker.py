"""One proxy worker process of ``workers`` > 1: ``python -m aibridgeproxyd.worker``, started by
the main process (``aibridgeproxyd.workers``), which writes a pickled ``WorkerSpec`` to its
standard input and hands it two file descriptors: the listening socket and its end of the
control channel (``aibridgeproxyd.worker_channel``).

A worker is the one-process daemon (``Daemon``) without the admin listener: its own provider
snapshot and reload, interception writer and presence report, mitmproxy accepting on the shared
socket. It answers the main process's status, metrics, reload and stop requests, and keeps its
own signal handling (SIGTERM drains, a second one closes at once, SIGHUP reloads), so a signal
sent to the whole process group does what it does to one process. Every log line of a worker
carries ``worker=<slot>``.
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
from aibridgeproxyd.daemon import Daemon, run_daemon
from aibridgeproxyd.metrics_sum import family_samples
from aibridgeproxyd.mitm.master import Master
from aibridgeproxyd.mitm.shared_listener import SharedSocket
from aibridgeproxyd.worker_channel import ChannelError, read_frame, send_frame

log = logging.getLogger("aibridgeproxyd.worker")


@dataclass(frozen=True)
class WorkerSpec:
    """What the main process tells a worker: its configuration and CA files, its slot
    (0 .. workers-1), and the descriptor numbers of the listening socket and its control end."""

    config: Config
    ca: CaFiles
    slot: int
    listen_fd: int
    control_fd: int


class WorkerDaemon(Daemon):
    """``Daemon`` serving the inherited listening socket, with the control channel where the
    one-process daemon has its admin listener."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec.config, spec.ca)
        self.spec = spec
        self._shared: SharedSocket | None = None
        self._control: asyncio.Task[None] | None = None
        self._control_writer: asyncio.StreamWriter | None = None
        self._stop_signals = 0

    def _build_master(self) -> Master:
        master = super()._build_master()
        self._shared = SharedSocket(master, socket.socket(fileno=self.spec.listen_fd))
        return master

    async def _start_admin(self) -> None:
        reader, writer = await asyncio.open_connection(
            sock=socket.socket(fileno=self.spec.control_fd)
        )
        self._control_writer = writer
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
            log.info("reloading providers: asked by the main process")
            self.reloader.trigger()
            return {}
        if command == "stop":
            self._stop(now=bool(request.get("now")))
            return {}
        return {"error": f"unknown command {command!r}"}

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


if __name__ == "__main__":
    main()
