"""``workers`` > 1: the main process, which holds the ``listen`` port, starts the proxy workers
(``aibridgeproxyd.worker``) that listen on it, restarts a worker that dies, serves the admin
listener and passes signals on (README.md#workers).

Division of work:

- the main process: seeding and migrations, the CA, the port, the admin listener
  (API, dashboard, ``/metrics`` summed over the workers, ``/healthz``, ``/readyz``), signals;
- each worker: its own provider snapshot and reload, proxy, interception writer and presence
  report (so ``tokens revoke`` waits for every worker).

Every worker listens on a socket of its own bound with ``SO_REUSEPORT`` to the one port, and the
kernel spreads connections over them by a hash of each connection's addresses. One socket
bound once and inherited by every worker was tried first and measured (bench/RESULTS.md,
"Workers"): asyncio accepts every waiting connection at each wake-up, so a burst of new
connections (an SDK opening its pool) went to whichever worker woke first, all 16 of 16 in the
bench. The main process binds the port first, without listening (a socket that does not listen
is given no connection): it reports a bind failure once, before any worker starts, picks the
port when ``listen`` says port 0, and holds the port while a worker restarts. The costs: the
connections waiting in a dying worker's queue are reset with it, and another process of the same
user could bind the port with ``SO_REUSEPORT`` too (Linux allows it to the same user only).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import signal
import socket
import sys
import time
from typing import Any

from aibridgeproxyd import store
from aibridgeproxyd.ca import CaFiles, mitmproxy_confdir
from aibridgeproxyd.config import Config
from aibridgeproxyd.daemon import (
    StartupError,
    ca_cert_reply,
    listen_failure,
    listening_fields,
    prepare,
)
from aibridgeproxyd.metrics_sum import MetricsSum
from aibridgeproxyd.mitm.master import write_dhparam
from aibridgeproxyd.sealing import Keyring
from aibridgeproxyd.web.app import Reply, Route, build_app
from aibridgeproxyd.web.context import APPLY_TIMEOUT_SECONDS, AdminContext
from aibridgeproxyd.web.server import AdminServer
from aibridgeproxyd.worker import WorkerSpec, reuse_port_socket
from aibridgeproxyd.worker_channel import ChannelError, read_frame, send_frame

log = logging.getLogger("aibridgeproxyd.workers")

# A worker that dies is restarted after FIRST_RESTART_DELAY, doubled for each death in a row up
# to MAX_RESTART_DELAY, so a crash loop costs little; one that served STABLE_SECONDS resets it.
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE_SECONDS = 30.0
# How long the main process waits for a worker's answer on the control channel.
ANSWER_TIMEOUT = 10.0
# After a stop, workers still running this long past drain_timeout are killed.
STOP_GRACE_SECONDS = 10.0
_WORKER_COMMAND = ("-c", "from aibridgeproxyd.worker import main; main()")


def restart_delay(deaths_in_a_row: int) -> float:
    """Seconds before restarting a worker that died ``deaths_in_a_row`` times (1, 2, ...)."""
    return min(MAX_RESTART_DELAY, FIRST_RESTART_DELAY * 2 ** max(0, deaths_in_a_row - 1))


def bind_listener(config: Config) -> socket.socket:
    """The port every worker will listen on, bound (with ``SO_REUSEPORT``, not listening) by the
    main process. Raises ``StartupError`` with the one-process daemon's message when ``listen``
    cannot be bound."""
    try:
        return reuse_port_socket(config.listen.host, config.listen.port, listen=False)
    except OSError as exc:
        raise StartupError(listen_failure("--listen", "listen", config.listen, exc)) from None


class WorkerProcess:
    """One worker: its process, its slot and the main process's end of its control channel."""

    def __init__(
        self,
        slot: int,
        process: asyncio.subprocess.Process,
        channel: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.slot = slot
        self.process = process
        self.reader, self.writer = channel
        self.started = time.monotonic()
        self._lock = asyncio.Lock()  # one request at a time on the channel
        self._broken = False
        self.up = asyncio.Event()  # the worker said it started (worker_channel)
        self._greeting = asyncio.create_task(self._read_greeting())

    async def _read_greeting(self) -> None:
        try:
            await read_frame(self.reader)
        except (OSError, asyncio.IncompleteReadError, ChannelError):
            self._broken = True  # exited during its start; its exit code says why
            return
        self.up.set()

    async def ask(self, command: str, **fields: Any) -> dict[str, Any] | None:
        """Send ``command`` and return the answer; None when the worker is gone or did not
        answer within ``ANSWER_TIMEOUT``. The channel is then closed (a late answer would be
        read as the answer to the next request), which makes a hung worker drain and exit, and
        ``Supervisor._supervise`` starts it again."""
        async with self._lock:
            if self._broken or not self.up.is_set():
                return None
            try:
                await send_frame(self.writer, {"command": command, **fields})
                return await asyncio.wait_for(read_frame(self.reader), ANSWER_TIMEOUT)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ChannelError):
                self._broken = True
                self.writer.close()
                return None

    def close(self) -> None:
        self._broken = True
        self._greeting.cancel()
        self.writer.close()


class Supervisor:
    """The main process of ``workers`` > 1 (module docstring)."""

    def __init__(self, config: Config, ca: CaFiles) -> None:
        self.config = config
        self.ca = ca
        self.sums = MetricsSum()
        self.workers: dict[int, WorkerProcess] = {}
        self.listen_socket: socket.socket | None = None
        self.admin: AdminServer | None = None
        self.admin_store: store.Store | None = None
        self._stopping = asyncio.Event()
        self._drain_now = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- start and supervise ---

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT and every worker has drained; the exit code. A worker
        that fails to start (its own ``cannot start`` line) stops the others, with its code."""
        self.listen_socket = bind_listener(self.config)
        try:
            await self._start_admin()
            code = await self._start_workers()
            if code != 0:
                await self._stop_workers(now=True)
                return code
            log.info(
                "aibridgeproxyd listening",
                extra=listening_fields(self.config) | {"workers": self.config.workers},
            )
            return await self._supervise_all()
        finally:
            await self._cleanup()

    async def _start_workers(self) -> int:
        for slot in range(self.config.workers):
            self.workers[slot] = await self._spawn(slot)
        for worker in list(self.workers.values()):
            code = await self._wait_ready(worker)
            if code is not None:
                return code or 1
        return 0

    async def _spawn(self, slot: int) -> WorkerProcess:
        assert self.listen_socket is not None
        ours, theirs = socket.socketpair()
        port = int(self.listen_socket.getsockname()[1])
        spec = WorkerSpec(self.config, self.ca, slot, port, theirs.fileno())
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                *_WORKER_COMMAND,
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(spec.control_fd,),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        assert process.stdin is not None
        process.stdin.write(pickle.dumps(spec))
        with contextlib.suppress(ConnectionError):
            await process.stdin.drain()
        process.stdin.close()
        return WorkerProcess(slot, process, await asyncio.open_connection(sock=ours))

    async def _wait_ready(self, worker: WorkerProcess) -> int | None:
        """Poll the worker until it is ready (None) or has exited (its exit code)."""
        while worker.process.returncode is None:
            status = await worker.ask("status")
            if status is not None and status.get("ready"):
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.process.wait(), 0.05)  # poll; exit ends it
        return worker.process.returncode

    async def _supervise_all(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal)
        try:
            await asyncio.gather(*(self._supervise(slot) for slot in list(self.workers)))
        finally:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("aibridgeproxyd stopped")
        return 0

    async def _supervise(self, slot: int) -> None:
        """Restart the worker of ``slot`` each time it dies, until the stop."""
        deaths = 0
        while True:
            worker = self.workers[slot]
            code = await worker.process.wait()
            worker.close()
            if self._stopping.is_set():
                return
            deaths = 1 if time.monotonic() - worker.started >= STABLE_SECONDS else deaths + 1
            delay = restart_delay(deaths)
            log.warning(
                "worker %d (pid %d) exited (%s); restarting it in %.1fs",
                slot,
                worker.process.pid,
                _exit_reason(code),
                delay,
            )
            self.sums.retire(slot)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            try:
                self.workers[slot] = await self._spawn(slot)
            except OSError as exc:  # no process could be started (limits, memory)
                log.error("cannot start worker %d: %s", slot, exc)

    # --- signals and the stop ---

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading providers in every worker")
        self._broadcast("reload")

    def _on_stop_signal(self) -> None:
        if not self._stopping.is_set():
            log.info("stopping: draining every worker")
            self._stopping.set()
            self._spawn_task(self._stop_workers(now=False))
        elif not self._drain_now:
            log.warning("second stop signal: every worker closes its open streams now")
            self._drain_now = True
            self._broadcast("stop", now=True)

    async def _stop_workers(self, *, now: bool) -> None:
        """Ask every worker to stop; kill those still running ``STOP_GRACE_SECONDS`` after
        ``drain_timeout``."""
        self._stopping.set()
        workers = list(self.workers.values())
        await asyncio.gather(*(worker.ask("stop", now=now) for worker in workers))
        for worker in workers:
            if not worker.up.is_set():
                worker.close()  # still starting: end of file stops it once it reads the channel
        waits = [worker.process.wait() for worker in workers]
        grace = self.config.drain_timeout + STOP_GRACE_SECONDS
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits), grace)
        for worker in workers:
            if worker.process.returncode is None:
                log.warning("worker %d did not stop in time; killing it", worker.slot)
                worker.process.kill()
                await worker.process.wait()

    def _broadcast(self, command: str, **fields: Any) -> None:
        for worker in list(self.workers.values()):
            self._spawn_task(worker.ask(command, **fields))

    def _spawn_task(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cleanup(self) -> None:
        for worker in self.workers.values():
            worker.close()
        if self.admin is not None:
            await self.admin.close()
        if self.admin_store is not None:
            await self.admin_store.close()
        if self.listen_socket is not None:
            self.listen_socket.close()

    # --- the admin listener ---

    async def _start_admin(self) -> None:
        config = self.config
        keyring = Keyring.from_config(config.encryption_keys, config.data_dir)
        self.admin_store = await store.Store.open(
            config.database, create=False, migrate=False, keyring=keyring
        )
        ops: dict[str, Route] = {
            "/metrics": self._metrics,
            "/ca-cert.pem": lambda: ca_cert_reply(self.ca),
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }
        context = AdminContext(config, self.admin_store, self._apply_now)
        tls = config.admin_tls_cert_file, config.admin_tls_key_file
        self.admin = AdminServer(
            build_app(ops, context), (tls[0], tls[1]) if tls[0] and tls[1] else None
        )
        try:
            await self.admin.start(config.admin_listen.host, config.admin_listen.port)
        except OSError as exc:
            raise StartupError(
                listen_failure("--admin-listen", "admin_listen", config.admin_listen, exc)
            ) from None

    async def _apply_now(self) -> None:
        """Every worker reloads at once; return once each has (a management write is then in
        force in every worker), or about ``APPLY_TIMEOUT_SECONDS`` later. A hung worker's
        question goes on in the background until ``ANSWER_TIMEOUT`` (its channel is then
        closed and the worker restarted); a worker still starting is not asked, and applies a
        write its first load missed at its next change probe."""
        asks = {worker.slot: self._ask_in_background(worker) for worker in self.workers.values()}
        if asks:  # none before the first worker is spawned (the admin listener opens first)
            await asyncio.wait(asks.values(), timeout=APPLY_TIMEOUT_SECONDS + 1)
        late = [slot for slot, ask in asks.items() if not _applied(ask)]
        if late:
            log.warning(
                "a management write is stored but not in force yet in worker(s) %s: the reload "
                "failed or took over %gs; it applies at their next successful reload",
                ", ".join(map(str, late)),
                APPLY_TIMEOUT_SECONDS,
            )

    def _ask_in_background(self, worker: WorkerProcess) -> asyncio.Task[dict[str, Any] | None]:
        """``worker`` asked to apply a management write, in a task the supervisor keeps until
        it ends (it may outlive the caller's wait)."""
        ask = asyncio.create_task(worker.ask("reload", wait=APPLY_TIMEOUT_SECONDS))
        self._tasks.add(ask)
        ask.add_done_callback(self._tasks.discard)
        return ask

    async def _ask_all(self, command: str) -> dict[int, dict[str, Any] | None]:
        workers = list(self.workers.items())
        answers = await asyncio.gather(*(worker.ask(command) for _, worker in workers))
        return {slot: answer for (slot, _), answer in zip(workers, answers, strict=True)}

    async def _metrics(self) -> Reply:
        """The sum over the workers (``aibridgeproxyd.metrics_sum``). A worker that does not
        answer counts with what it reported last."""
        provider_info = ""
        workers = dict(self.workers)
        for slot, answer in (await self._ask_all("metrics")).items():
            if answer is None or self.workers.get(slot) is not workers[slot]:
                continue  # gone, or replaced while it answered: keep its last report
            self.sums.update(slot, answer["families"])
            provider_info = provider_info or answer["provider_info"]
        body = await asyncio.to_thread(self.sums.render, list(workers))
        return Reply(200, provider_info.encode() + body, "text/plain; version=0.0.4; charset=utf-8")

    async def _statuses(self) -> list[dict[str, Any]]:
        return [answer or {} for answer in (await self._ask_all("status")).values()]

    async def _healthz(self) -> Reply:
        statuses = await self._statuses()
        body = {
            "status": "ok",
            "listening": any(s.get("listening") for s in statuses),
            "active_flows": sum(int(s.get("active_flows", 0)) for s in statuses),
            "workers": self.config.workers,
        }
        return _json_reply(200, body)

    async def _readyz(self) -> Reply:
        """Ready when every worker is (listening, providers loaded) and no stop was asked."""
        statuses = await self._statuses()
        ready_workers = sum(1 for s in statuses if s.get("ready"))
        stopping = self._stopping.is_set()
        ready = ready_workers == self.config.workers and not stopping
        body = {
            "ready": ready,
            "listening": any(s.get("listening") for s in statuses),
            "providers_loaded": all(s.get("providers_loaded") for s in statuses),
            # As a single process reports them, over the workers that answered.
            "database_reachable": all(
                s["database_reachable"] for s in statuses if "database_reachable" in s
            ),
            "reload_failing": any(s.get("reload_failing") for s in statuses),
            "stopping": stopping,
            "workers": self.config.workers,
            "workers_ready": ready_workers,
        }
        return _json_reply(200 if ready else 503, body)


def _applied(ask: asyncio.Task[dict[str, Any] | None]) -> bool:
    """A worker's answer to ``reload`` with ``wait``: it has applied the write."""
    if not ask.done() or ask.cancelled() or ask.exception() is not None:
        return False
    return bool((ask.result() or {}).get("applied"))


def _json_reply(status: int, body: dict[str, Any]) -> Reply:
    return Reply(status, json.dumps(body).encode() + b"\n", "application/json")


def _exit_reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


async def serve_workers(config: Config) -> int:
    """The main process of ``workers`` > 1: seeding and the CA once, then the ``Supervisor``."""
    ca = await prepare(config)
    # Written once here: the workers would race to create it (``write_dhparam``).
    write_dhparam(mitmproxy_confdir(ca, config.data_dir))
    return await Supervisor(config, ca).run()
