"""The daemon: mitmproxy embedded in our own asyncio loop, plus the admin listener, the
provider reload, signal handling and a graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine

from mitmproxy.exceptions import OptionsError

from aibridgeproxyd import seeding, store
from aibridgeproxyd.addons.in_flight import InFlight
from aibridgeproxyd.addons.listener_tls import ListenerTls, ListenerTlsError
from aibridgeproxyd.addons.upstream_proxy import ChainUpstreamProxy
from aibridgeproxyd.auth_failures import AuthFailureTracker
from aibridgeproxyd.ca import (
    CaError,
    CaFiles,
    ensure_ca,
    ensure_shared_ca,
    mitmproxy_confdir,
    upstream_trust_bundle,
)
from aibridgeproxyd.chain import build_chain
from aibridgeproxyd.config import Config, ConfigError
from aibridgeproxyd.exit_codes import EXIT_FAILURE, EXIT_USAGE
from aibridgeproxyd.failclosed import guard_chain
from aibridgeproxyd.interception.state import ConnectionTable
from aibridgeproxyd.interception.writer import InterceptionWriter
from aibridgeproxyd.logs import setup_logging
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm import master as mitm_master
from aibridgeproxyd.mitm.master import Master, Running
from aibridgeproxyd.mitm.memory_budget import BUDGET
from aibridgeproxyd.policy_counters import PolicyCounters, PolicySync
from aibridgeproxyd.presence import DaemonPresence
from aibridgeproxyd.reload import ProviderReloader, SnapshotHolder
from aibridgeproxyd.sealing import Keyring
from aibridgeproxyd.store_access import store_access
from aibridgeproxyd.token_refresh import TokenRefresher
from aibridgeproxyd.tracing import build_tracing
from aibridgeproxyd.upstream_proxy import UpstreamProxyError
from aibridgeproxyd.web.app import Reply, Route, build_app
from aibridgeproxyd.web.context import APPLY_TIMEOUT_SECONDS, AdminContext
from aibridgeproxyd.web.server import AdminServer

log = logging.getLogger("aibridgeproxyd")


class StartupError(RuntimeError):
    """The daemon cannot start with this configuration (a listener cannot bind, a file the
    listener needs is unusable). Reported as one ``cannot start`` line, exit code 2."""


def listen_failure(flag: str, key: str, address: object, exc: BaseException) -> str:
    """One line for a listener that cannot bind, naming our flag and config key (mitmproxy's own
    hint names its ``--mode`` option, which ours does not have)."""
    # mitmproxy wraps the bind error in one with its own text; the original has the errno.
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    number = cause.errno if isinstance(cause, OSError) else None
    if number is not None and number > 0:
        reason = os.strerror(number).lower()
    elif isinstance(cause, OSError) and cause.strerror:  # e.g. a name that does not resolve
        reason = cause.strerror.lower()
    else:
        reason = " ".join(str(cause).split())
    if number == errno.EADDRINUSE:
        hint = f"choose another address with {flag} HOST:PORT or config key '{key}'"
    else:
        hint = f"{flag} (config key '{key}') must name an address of this machine"
    return f"cannot listen on {address} ({key}): {reason}; {hint}"


def ca_cert_reply(ca: CaFiles) -> Reply:
    """``/ca-cert.pem``: the MITM CA certificate as a download, 404 when there is none."""
    pem = ca.certificate_pem()
    if not pem:
        return Reply(404, b"MITM CA certificate not configured\n")
    return Reply(
        200,
        pem,
        "application/x-pem-file",
        (("Content-Disposition", "attachment; filename=ca-cert.pem"),),
    )


class Daemon:
    """One daemon process: the provider snapshot and its reload, the mitmproxy master with our
    addon chain (``aibridgeproxyd.chain``), the admin listener, and the stop signals."""

    def __init__(self, config: Config, ca: CaFiles) -> None:
        self.config = config
        self.ca = ca
        self.metrics = Metrics(config.metrics_prefix)
        self.metrics.buffered_bytes.set_function(lambda: float(BUDGET.used))
        self.tracing = build_tracing(config)
        self.holder = SnapshotHolder()
        self.connections = ConnectionTable()
        # Opens the provider keys and secret settings sealed in the store (section 13).
        self.keyring = Keyring.from_config(config.encryption_keys, config.data_dir)
        self._record_cache = store.RecordCache(self.keyring)
        self.in_flight = InFlight()
        self.running = Running()
        self.interceptions = InterceptionWriter(config.database, self.metrics, config.retention)
        # The reload's reads, the change probe, token re-reads and presence (SQLite file or
        # PostgreSQL with LISTEN/NOTIFY: aibridgeproxyd.store_access).
        self.access = store_access(config.database, self.keyring)
        self.reloader = ProviderReloader(
            source=lambda: self.access.routing_state(self._record_cache),
            holder=self.holder,
            metrics=self.metrics,
            interval=config.reload_interval,
            change_probe=self.access.generation,
            tracer=self.tracing.tracer,
            pushed=self.access.pushed,
        )
        # A token the snapshot does not know yet is re-read before it is refused; failed
        # authentications are counted per source address (aibridgeproxyd.auth_failures).
        self.token_refresher = TokenRefresher(self._reread_tokens)
        self.auth_failures = AuthFailureTracker(
            config.auth_failure_limit,
            config.auth_failure_window,
            config.auth_failure_cooldown,
            config.auth_failure_log_interval,
        )
        self.presence = DaemonPresence(
            self.access, lambda: self.reloader.applied_generation, self.keyring.key_ids
        )
        # Policy counters in memory, reconciled with the store's shared ones about every second
        # (docs/policies.md#enforcement).
        self.policy_counters = PolicyCounters()
        self.policy_sync = PolicySync(
            self.policy_counters,
            lambda: store.Store.open(
                config.database, create=False, migrate=False, keyring=self.keyring
            ),
            policies=lambda: self.holder.current.policies,
            metrics=self.metrics,
        )
        self.reloader.on_applied = self._applied_generation_moved
        self.admin: AdminServer | None = None
        self.admin_store: store.Store | None = None
        self.master: Master | None = None
        self._stopping = False
        self._drain_now = asyncio.Event()  # set by a second stop signal: skip the drain
        self._drain_task: asyncio.Task[None] | None = None

    # --- admin endpoints ---

    async def _start_admin(self) -> None:
        """Open the admin application's own store connection and serve the application."""
        self.admin_store = await store.Store.open(
            self.config.database, create=False, migrate=False, keyring=self.keyring
        )
        ops: dict[str, Route] = {
            "/metrics": self._metrics,
            "/ca-cert.pem": self._ca_cert,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }
        context = AdminContext(self.config, self.admin_store, self._apply_now)
        tls = self.config.admin_tls_cert_file, self.config.admin_tls_key_file
        self.admin = AdminServer(
            build_app(ops, context), (tls[0], tls[1]) if tls[0] and tls[1] else None
        )
        await self.admin.start(self.config.admin_listen.host, self.config.admin_listen.port)

    async def _apply_now(self) -> None:
        """Reload at once; return once this process has (a management write is then in force
        here), or after ``APPLY_TIMEOUT_SECONDS``."""
        if not await self.reloader.reload_and_wait(APPLY_TIMEOUT_SECONDS):
            log.warning(
                "a management write is stored but not in force yet: the reload failed or took "
                "over %gs; it applies at the next successful reload",
                APPLY_TIMEOUT_SECONDS,
            )

    async def _metrics(self) -> Reply:
        # Rendering is CPU work that grows with the provider count: off the event loop.
        body = await asyncio.to_thread(self.metrics.exposition)
        return Reply(200, body, "text/plain; version=0.0.4; charset=utf-8")

    def _ca_cert(self) -> Reply:
        return ca_cert_reply(self.ca)

    def _listen_addrs(self) -> list[tuple[object, ...]]:
        return mitm_master.listen_addresses(self.master)

    def _healthz(self) -> Reply:
        body = {
            "status": "ok",
            "listening": bool(self._listen_addrs()),
            "active_flows": self.in_flight.count,
        }
        return Reply(200, json.dumps(body).encode() + b"\n", "application/json")

    def _readyz(self) -> Reply:
        # Routing keeps its last snapshot while the database is away or reloads fail (a key
        # this daemon lacks); readiness tells a load balancer once that has lasted longer than
        # one reload interval (CONTRACT 14): changes, revocations included, no longer apply.
        unreachable = self.access.unreachable_for()
        stale = max(unreachable, self.reloader.failing_for()) > self.config.reload_interval
        ready = (
            self.running.event.is_set()
            and bool(self._listen_addrs())
            and self.holder.loaded
            and not stale
            and not self._stopping
        )
        body = {
            "ready": ready,
            "listening": bool(self._listen_addrs()),
            "providers_loaded": self.holder.loaded,
            "database_reachable": unreachable == 0,
            "reload_failing": self.reloader.last_error is not None,
            "stopping": self._stopping,
        }
        return Reply(200 if ready else 503, json.dumps(body).encode() + b"\n", "application/json")

    # --- lifecycle ---

    def _build_master(self) -> Master:
        config = self.config
        confdir = mitmproxy_confdir(self.ca, config.data_dir)
        master = mitm_master.new_master(
            listen_host=config.listen.host,
            listen_port=config.listen.port,
            confdir=confdir,
            upstream_trust=upstream_trust_bundle(config.upstream_ca_file, confdir),
        )
        listener_tls = None
        if config.tls_cert_file is not None and config.tls_key_file is not None:
            try:
                listener_tls = ListenerTls(config.tls_cert_file, config.tls_key_file)
            except ListenerTlsError as exc:
                raise StartupError(str(exc)) from None
        master.addons.add(
            *build_chain(
                config,
                holder=self.holder,
                connections=self.connections,
                metrics=self.metrics,
                tracing=self.tracing,
                interceptions=self.interceptions,
                token_refresher=self.token_refresher,
                auth_failures=self.auth_failures,
                in_flight=self.in_flight,
                running=self.running,
                listener_tls=listener_tls,
                upstream_proxy=self._upstream_proxy_chain(),
                policy_counters=self.policy_counters,
            )
        )
        # Fail closed: an exception in one of our checks refuses instead of letting through.
        guard_chain(master, self.metrics.hook_failures)
        # Options defined by addons exist only once the addons are loaded.
        master.options.update(
            connection_strategy="eager",
            max_request_head=config.max_request_head,
            max_request_body=config.max_request_body,
            upstream_connect_timeout=config.upstream_connect_timeout,
            max_websocket_message=config.max_websocket_message,
        )
        return master

    def _upstream_proxy_chain(self) -> ChainUpstreamProxy | None:
        config = self.config
        if config.upstream_proxy is None:
            return None
        try:
            chain = ChainUpstreamProxy(
                config.upstream_proxy,
                config.upstream_no_proxy,
                self.connections,
                config.upstream_proxy_ca,
            )
        except UpstreamProxyError as exc:
            raise StartupError(str(exc)) from None
        log.info(
            "outbound connections go through upstream proxy %s",
            chain.proxy,
            extra={
                "upstream_proxy": str(chain.proxy),
                "upstream_no_proxy": ",".join(config.upstream_no_proxy.entries),
            },
        )
        return chain

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Fail closed: without a provider table every provider host would be tunneled, without
        # proxy auth and without the central key's policy. (A single unreadable row does not
        # get here: it is in status error and the others load.) Checked before mitmproxy is
        # set up, so nothing of it needs tearing down.
        # Subscribed before the first load: no write between the two goes unnoticed.
        await self.access.listen(self.reloader.check_now)
        if not await self._first_reload():
            # The change probe's connection runs a thread of its own that would keep the
            # process alive after the error.
            await self.access.close()
            raise store.StoreError(f"cannot load the provider table: {self.reloader.last_error}")
        self.master = self._build_master()
        await self._first_policy_sync()
        self.reloader.start()
        await self.presence.start()
        self.interceptions.start()
        try:
            await self._start_admin()
        except OSError as exc:
            await self._cleanup()
            raise StartupError(
                listen_failure("--admin-listen", "admin_listen", self.config.admin_listen, exc)
            ) from None
        mitm_master.drop_repeated_logs(debug=self.config.log_level == "debug")
        master_task = asyncio.create_task(self.master.run(), name="mitmproxy")
        await asyncio.wait(
            [master_task, asyncio.create_task(self.running.event.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not self._listen_addrs():
            failures = mitm_master.listen_failures(self.master)
            self.master.shutdown()
            await master_task
            await self._cleanup()
            reason = (
                listen_failure("--listen", "listen", self.config.listen, failures[0])
                if failures
                else f"cannot listen on {self.config.listen} (listen): unknown error"
            )
            raise StartupError(reason)
        self._log_listening()
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal)
        try:
            await master_task
        finally:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._cleanup()
        log.info("aibridgeproxyd stopped")
        return 0

    def _log_listening(self) -> None:
        log.info("aibridgeproxyd listening", extra=listening_fields(self.config))

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading providers")
        self.reloader.trigger()

    def _on_stop_signal(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._drain_task = asyncio.create_task(self._drain(), name="drain")
        elif not self._drain_now.is_set():
            # A second signal is an operator who does not want to wait for the drain.
            log.warning("second stop signal: closing %d open streams now", self.in_flight.count)
            self._drain_now.set()

    async def _drain(self) -> None:
        """Stop accepting, let open streams finish up to ``drain_timeout``, then close the rest.
        Open streams are the flows ``InFlight`` holds: a WebSocket session until it closes."""
        master = self.master
        assert master is not None
        log.info("stopping: draining open streams", extra={"active_flows": self.in_flight.count})
        master.options.update(server=False)
        await _until(
            lambda: self.in_flight.count == 0 or self._drain_now.is_set(),
            self.config.drain_timeout,
        )
        if self.in_flight.count > 0:
            log.warning("drain timeout reached; closing %d open streams", self.in_flight.count)
        # A CONNECT still dialing gets its 503 before its connection closes, not an EOF.
        stopped = mitm_master.stop_tunnel_dials(master)
        await _until(lambda: not any(flow.live for flow in stopped), 2)
        mitm_master.close_all_clients(master)
        # Let the closed connections' last hooks run (a flow's error or websocket_end hook
        # hands its interception record to the writer) before the loop goes away; the writer
        # then writes everything it was given before the process exits (``_cleanup``).
        await _until(
            lambda: not (mitm_master.open_connections(master) or mitm_master.hooks_running()), 2
        )
        master.shutdown()

    async def _reread_tokens(self) -> dict[str, str]:
        self.metrics.proxy_token_rereads.inc()
        return await self.access.token_names()

    async def _first_reload(self) -> bool:
        """Load the provider table once before listening; False when it failed."""
        # The generation is read before the snapshot, so the snapshot is at least that new.
        try:
            generation: int | None = await self.access.generation()
        except Exception:
            generation = None  # the reload reports what is wrong with the database
        loaded = await self.reloader.reload_once("start", log_failure=False)
        if loaded and generation is not None:
            self.reloader.applied_generation = generation
        # From now on a row this daemon cannot open is that provider's error, not every
        # reload's: tokens and revocations keep applying (store.RecordCache.strict).
        self._record_cache.strict = not loaded
        return loaded

    def _applied_generation_moved(self) -> None:
        """The snapshot now reflects a newer store generation: report it (presence), and
        reconcile policy counters now, since policies may have come into force."""
        self.presence.wake()
        self.policy_sync.wake()

    async def _first_policy_sync(self) -> None:
        """Adopt every replica's policy counters before the first request, so a restart does
        not start a budget over; on failure the periodic sync retries (and logs)."""
        try:
            await self.policy_sync.sync_once()
        except Exception as exc:
            log.warning("policy counters not read at start; the periodic sync retries: %s", exc)
        self.policy_sync.start()

    async def _cleanup(self) -> None:
        await self.policy_sync.stop()
        await self.presence.stop()
        await self.reloader.stop()
        await self.interceptions.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)
        await self.access.close()
        if self.admin is not None:
            await self.admin.close()
        if self.admin_store is not None:
            await self.admin_store.close()
        if self.master is not None:
            with contextlib.suppress(Exception):
                self.master.options.update(server=False)


# A PostgreSQL server not reachable at start-up (it starts after us, or restarts): retried
# this often, up to this long, before the daemon gives up with its usual one-line error.
START_RETRY_SECONDS = 2.0
START_WAIT_SECONDS = 300.0


async def _initialize(config: Config) -> None:
    """Create, migrate and seed the database; a PostgreSQL server that cannot be reached yet is
    waited for (logged at each attempt), up to ``START_WAIT_SECONDS``."""
    deadline = time.monotonic() + START_WAIT_SECONDS
    while True:
        try:
            await seeding.initialize(config)
            return
        except store.StoreUnavailable as exc:
            if time.monotonic() + START_RETRY_SECONDS > deadline:
                raise
            log.warning("waiting for the database: %s", exc)
            await asyncio.sleep(START_RETRY_SECONDS)


async def prepare(config: Config) -> CaFiles:
    """Start-up before anything listens, once per daemon (the main process of ``workers``):
    the database created, migrated and seeded (waited for while a PostgreSQL server cannot be
    reached), and the MITM CA: the replicas' shared one kept in PostgreSQL, else the local
    files (generated on first start) or the operator's."""
    existed = config.database.is_postgres or config.database_path.exists()
    await _initialize(config)
    if not existed:
        # Never silent (README.md#cli): a wrong --data-dir shows up in the first lines.
        log.info("created a new database %s", config.database_path)
    if config.database.is_postgres and config.ca_cert_file is None:
        keyring = Keyring.from_config(config.encryption_keys, config.data_dir)
        return await ensure_shared_ca(config, keyring)
    return ensure_ca(config)


async def _serve(config: Config) -> int:
    return await Daemon(config, await prepare(config)).run()


async def _until(done: Callable[[], bool], seconds: float) -> None:
    """Return once ``done()`` is true, or after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def listening_fields(config: Config) -> dict[str, str]:
    """The ``aibridgeproxyd listening`` line's fields: where the proxy, the admin listener and
    the dashboard are."""
    tls = config.admin_tls_cert_file is not None
    return {
        "listen": str(config.listen),
        "admin_listen": str(config.admin_listen),
        "dashboard": f"{'https' if tls else 'http'}://{config.admin_listen}/",
    }


def run_daemon(
    config: Config, serve: Callable[[Config], Coroutine[object, object, int]] = _serve
) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code. A start-up failure is one
    ``cannot start: ...`` log line (never a traceback) and exit code 2 (configuration) or
    1 (database or CA). ``serve`` is what runs: the one-process daemon, or with ``workers`` > 1
    the supervisor or one worker (``aibridgeproxyd.workers``, ``aibridgeproxyd.worker``)."""
    setup_logging(config.log_level, config.log_format)
    try:
        return asyncio.run(serve(config))
    except (ConfigError, StartupError) as exc:
        return _cannot_start(str(exc), EXIT_USAGE)
    except OptionsError as exc:
        # An addon's configure() refused an option derived from our configuration.
        return _cannot_start(f"invalid option: {exc}", EXIT_USAGE)
    except (CaError, store.StoreError) as exc:
        return _cannot_start(str(exc), EXIT_FAILURE)
    except OSError as exc:
        # A file or directory of ours (data_dir, certs_dir) that cannot be created or written.
        where = f" {exc.filename}" if exc.filename else ""
        return _cannot_start(f"cannot use{where}: {exc.strerror or exc}", EXIT_FAILURE)
    except Exception as exc:
        # A bug, not a configuration problem: still one line for the operator, with the
        # traceback kept for whoever runs with --log-level debug.
        mitm_master.detach_log_handlers()
        log.debug("unexpected error", exc_info=True)
        log.error(
            "aibridgeproxyd failed: %s: %s (run with --log-level debug for the traceback)",
            type(exc).__name__,
            " ".join(str(exc).split()),
        )
        return EXIT_FAILURE


def _cannot_start(message: str, code: int) -> int:
    mitm_master.detach_log_handlers()
    log.error("cannot start: %s", " ".join(message.split()))
    return code
