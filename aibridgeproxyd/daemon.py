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
from pathlib import Path

from mitmproxy import options
from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, tlsconfig, upstream_auth
from mitmproxy.exceptions import OptionsError
from mitmproxy.master import Master

from aibridgeproxyd import seeding, store
from aibridgeproxyd.addons.classify import Classify
from aibridgeproxyd.addons.client_limits import ClientLimits
from aibridgeproxyd.addons.destinations import DestinationGuard
from aibridgeproxyd.addons.error_answers import UpstreamErrorAnswers
from aibridgeproxyd.addons.housekeeping import MemoryHousekeeping
from aibridgeproxyd.addons.intercept import Intercept
from aibridgeproxyd.addons.interceptions import RecordInterceptions
from aibridgeproxyd.addons.leaf_renewal import LeafRenewal
from aibridgeproxyd.addons.listener_tls import ListenerTls, ListenerTlsError
from aibridgeproxyd.addons.metrics import RequestMetrics
from aibridgeproxyd.addons.proxy_auth import ProxyAuth
from aibridgeproxyd.addons.route import RouteRequests
from aibridgeproxyd.addons.stalls import StallWatch
from aibridgeproxyd.addons.streaming import StreamResponses
from aibridgeproxyd.addons.tracing import TraceRequests
from aibridgeproxyd.addons.upstream_proxy import ChainUpstreamProxy, UpstreamProxyError
from aibridgeproxyd.addons.websocket import ForgetWebSocketMessages
from aibridgeproxyd.admin import AdminServer, Reply
from aibridgeproxyd.auth_failures import AuthFailureTracker
from aibridgeproxyd.ca import CaError, CaFiles, ensure_ca, mitmproxy_confdir, upstream_trust_bundle
from aibridgeproxyd.config import Config, ConfigError
from aibridgeproxyd.destinations import DestinationPolicy
from aibridgeproxyd.failclosed import guard_chain
from aibridgeproxyd.interception.state import ConnectionTable
from aibridgeproxyd.interception.writer import InterceptionWriter
from aibridgeproxyd.logs import setup_logging
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.stream_bounds import StreamBounds
from aibridgeproxyd.presence import DaemonPresence
from aibridgeproxyd.reload import ProviderReloader, SnapshotHolder
from aibridgeproxyd.token_refresh import TokenRefresher
from aibridgeproxyd.tracing import build_tracing

log = logging.getLogger("aibridgeproxyd")


def _files_signature(database: Path) -> tuple[tuple[int, int, int], ...]:
    """(mtime, size, inode) of the database and its write-ahead log: any commit changes one of
    them, and so does a file deleted or renamed over the database."""
    signature = []
    for path in (database, database.with_name(database.name + "-wal")):
        try:
            st = os.stat(path)
            signature.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            signature.append((0, -1, 0))
    return tuple(signature)


def _pending_hooks() -> list[asyncio.Task[object]]:
    """mitmproxy's hook invocations still running: it runs each in a task named
    ``handle_hook(<hook>)`` (``proxy/server.py``), which outlives the connection it came from."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and task.get_name().startswith("handle_hook(")
    ]


class StartupError(RuntimeError):
    """The daemon cannot start with this configuration (a listener cannot bind, a file the
    listener needs is unusable). Reported as one ``cannot start`` line, exit code 2."""


# Exit codes of ``run``, the same as the CLI's: 2 when the configuration must change (bad value,
# address in use), 1 when the database or the CA cannot be used.
EXIT_CONFIG = 2
EXIT_FAILURE = 1


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


class _DropMitmproxyListenErrors(logging.Filter):
    """mitmproxy logs a bind failure with a hint about its own ``--mode`` option; the daemon
    reports the failure itself in one line that names ``--listen``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to listen on" not in record.getMessage()


def stream_bounds(config: Config) -> StreamBounds:
    """The per-connection stream limits, from the configuration keys of the same names."""
    return StreamBounds(
        http2_max_concurrent_streams=config.http2_max_concurrent_streams,
        http2_max_resets=config.http2_max_resets,
        http2_reset_window=config.http2_reset_window,
        max_websocket_message=config.max_websocket_message,
        upstream_response_timeout=config.upstream_response_timeout,
        upstream_idle_timeout=config.upstream_idle_timeout,
    )


class ActiveFlows:
    """Counts HTTP flows in progress, so a graceful stop can wait for open streams."""

    def __init__(self) -> None:
        self.count = 0

    def requestheaders(self, flow) -> None:  # type: ignore[no-untyped-def]
        self.count += 1

    def response(self, flow) -> None:  # type: ignore[no-untyped-def]
        self.count -= 1

    def error(self, flow) -> None:  # type: ignore[no-untyped-def]
        self.count -= 1


class Running:
    """Signals when mitmproxy has finished setting up its listeners."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def running(self) -> None:
        self.event.set()


class Daemon:
    def __init__(self, config: Config, ca: CaFiles) -> None:
        self.config = config
        self.ca = ca
        self.metrics = Metrics(config.metrics_prefix)
        self.tracing = build_tracing(config)
        self.holder = SnapshotHolder()
        self.connections = ConnectionTable()
        self._record_cache = store.RecordCache()
        self.active_flows = ActiveFlows()
        self.running = Running()
        self.interceptions = InterceptionWriter(
            config.database_path, self.metrics, config.retention
        )
        self.reloader = ProviderReloader(
            source=lambda: store.read_routing_state(config.database_path, self._record_cache),
            holder=self.holder,
            metrics=self.metrics,
            interval=config.reload_interval,
            change_probe=self._generation,
            tracer=self.tracing.tracer,
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
            config.database_path, lambda: self.reloader.applied_generation
        )
        self.admin = AdminServer(
            {
                "/metrics": self._metrics,
                "/ca-cert.pem": self._ca_cert,
                "/healthz": self._healthz,
                "/readyz": self._readyz,
            }
        )
        self.master: Master | None = None
        self._stopping = False
        self._drain_now = asyncio.Event()  # set by a second stop signal: skip the drain
        self._probe_store: store.Store | None = None
        self._probe_signature: tuple[tuple[int, int, int], ...] = ()
        self._probe_generation: int | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def _generation(self) -> int:
        """The store's write counter, read on a connection kept open for it: a CLI write
        reaches the daemon within half a second instead of one reload interval. While the
        database files are untouched (an idle daemon) the last value is reused without a query."""
        signature = _files_signature(self.config.database_path)
        if signature == self._probe_signature and self._probe_generation is not None:
            return self._probe_generation
        if self._probe_store is not None and self._probe_store.file_state() != "same":
            # Deleted or replaced: the open connection would keep reading the old file.
            probe, self._probe_store = self._probe_store, None
            self._probe_generation = None
            await probe.close()
        if self._probe_store is None:
            self._probe_store = await store.Store.open(
                self.config.database_path, create=False, migrate=False
            )
        try:
            generation = await self._probe_store.generation()
        except Exception:
            probe, self._probe_store = self._probe_store, None
            self._probe_generation = None
            await probe.close()
            raise
        self._probe_signature, self._probe_generation = signature, generation
        return generation

    # --- admin endpoints ---

    async def _metrics(self) -> Reply:
        # Rendering is CPU work that grows with the provider count: off the event loop.
        body = await asyncio.to_thread(self.metrics.exposition)
        return Reply(200, body, "text/plain; version=0.0.4; charset=utf-8")

    def _ca_cert(self) -> Reply:
        pem = self.ca.certificate_pem()
        if not pem:
            return Reply(404, b"MITM CA certificate not configured\n")
        return Reply(
            200,
            pem,
            "application/x-pem-file",
            (("Content-Disposition", "attachment; filename=ca-cert.pem"),),
        )

    def _listen_addrs(self) -> list[tuple]:
        ps = self.master.addons.get("proxyserver") if self.master else None
        return ps.listen_addrs() if ps else []

    def _healthz(self) -> Reply:
        body = {
            "status": "ok",
            "listening": bool(self._listen_addrs()),
            "active_flows": self.active_flows.count,
        }
        return Reply(200, json.dumps(body).encode() + b"\n", "application/json")

    def _readyz(self) -> Reply:
        ready = (
            self.running.event.is_set()
            and bool(self._listen_addrs())
            and self.holder.loaded
            and not self._stopping
        )
        body = {
            "ready": ready,
            "listening": bool(self._listen_addrs()),
            "providers_loaded": self.holder.loaded,
            "stopping": self._stopping,
        }
        return Reply(200 if ready else 503, json.dumps(body).encode() + b"\n", "application/json")

    # --- lifecycle ---

    def _build_master(self) -> Master:
        config = self.config
        confdir = mitmproxy_confdir(self.ca, config.data_dir)
        trust = upstream_trust_bundle(config.upstream_ca_file, confdir)
        opts = options.Options(
            listen_host=config.listen.host,
            listen_port=config.listen.port,
            confdir=str(confdir),
            # Leaves are built from the CONNECT host/SNI alone: MITM'd hosts are never dialled.
            upstream_cert=False,
            ssl_insecure=False,
            ssl_verify_upstream_trusted_ca=str(trust) if trust else None,
        )
        master = Master(opts)
        # mitmproxy forwards every log record to its deprecated `add_log` hook through the event
        # loop; nothing here uses that hook, and a record logged after the loop has closed (the
        # "cannot start" line) would raise "Event loop is closed" instead of being printed.
        master._legacy_log_events.uninstall()
        policy = DestinationPolicy(config.allowed_private_cidrs)
        listener_tls: list[object] = []
        if config.tls_cert_file is not None and config.tls_key_file is not None:
            try:
                listener_tls.append(ListenerTls(config.tls_cert_file, config.tls_key_file))
            except ListenerTlsError as exc:
                raise StartupError(str(exc)) from None
        chain = self._upstream_proxy_chain()
        # A bare Master with only the built-ins a forward proxy needs: every addon costs time on
        # every hook. Leaving out `block` means no client is refused for its source address
        # (access control is proxy auth); leaving out `onboarding` means no mitm.it app.
        master.addons.add(
            core.Core(),
            disable_h2c.DisableH2C(),
            proxyserver.Proxyserver(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            upstream_auth.UpstreamAuth(),
            *listener_tls,
            LeafRenewal(),
            MemoryHousekeeping(),
            StallWatch(self.connections, config.stream_stall_timeout),
            self.running,
            self.active_flows,
            Classify(self.holder, self.connections, config.allowed_ports, self.metrics),
            ProxyAuth(
                self.holder,
                self.connections,
                config.auth,
                config.auth_tunneled,
                self.metrics,
                refresher=self.token_refresher,
                failures=self.auth_failures,
            ),
            Intercept(self.connections, self.metrics, stream_bounds(config)),
            RouteRequests(self.holder, self.connections, config.central_key_placeholder),
            # After the route's rewrite, so the destination it chains is the one dialled; before
            # the guard, which checks what goes through the proxy when that choice is made.
            *([chain] if chain else []),
            # After Intercept and the chain, whose HTTP layers (already bounded) it leaves in
            # place; it bounds mitmproxy's own listener layer otherwise.
            ClientLimits(
                self.holder,
                self.connections,
                self.metrics,
                max_connections=config.max_connections,
                request_head_timeout=config.request_head_timeout,
                idle_timeout=config.idle_timeout,
                plain_listener=not listener_tls,
                max_connections_per_address=config.max_connections_per_address,
                max_buffered_bytes=config.max_buffered_bytes,
            ),
            DestinationGuard(
                self.holder,
                self.connections,
                policy,
                config.allowed_ports,
                self.metrics,
                chain.proxy.address if chain else None,
            ),
            RequestMetrics(self.metrics),
            StreamResponses(),
            UpstreamErrorAnswers(),  # before the record: it logs error bodies
            RecordInterceptions(self.interceptions, self.metrics),
            TraceRequests(self.tracing, self.connections),
            ForgetWebSocketMessages(),  # last: every other addon has seen the message
        )
        # Fail closed: an exception in one of our checks refuses instead of letting through.
        guard_chain(master, self.metrics.hook_failures)
        # Options defined by addons exist only once the addons are loaded.
        opts.update(
            connection_strategy="eager",
            max_request_head=config.max_request_head,
            max_request_body=config.max_request_body,
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
        if not await self._first_reload():
            # The change probe's connection runs a thread of its own that would keep the
            # process alive after the error.
            if self._probe_store is not None:
                await self._probe_store.close()
                self._probe_store = None
            raise store.StoreError(f"cannot load the provider table: {self.reloader.last_error}")
        self.master = self._build_master()
        self.reloader.start()
        await self.presence.start()
        self.interceptions.start()
        try:
            await self.admin.start(self.config.admin_listen.host, self.config.admin_listen.port)
        except OSError as exc:
            await self._cleanup()
            raise StartupError(
                listen_failure("--admin-listen", "admin_listen", self.config.admin_listen, exc)
            ) from None
        logging.getLogger("mitmproxy.addons.proxyserver").addFilter(_DropMitmproxyListenErrors())
        master_task = asyncio.create_task(self.master.run(), name="mitmproxy")
        await asyncio.wait(
            [master_task, asyncio.create_task(self.running.event.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not self._listen_addrs():
            ps = self.master.addons.get("proxyserver")
            failures = [s.last_exception for s in ps.servers if s.last_exception]
            self.master.shutdown()
            await master_task
            await self._cleanup()
            reason = (
                listen_failure("--listen", "listen", self.config.listen, failures[0])
                if failures
                else f"cannot listen on {self.config.listen} (listen): unknown error"
            )
            raise StartupError(reason)
        log.info(
            "aibridgeproxyd listening",
            extra={
                "listen": str(self.config.listen),
                "admin_listen": str(self.config.admin_listen),
            },
        )
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

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading providers")
        self.reloader.trigger()

    def _on_stop_signal(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._drain_task = asyncio.create_task(self._drain(), name="drain")
        elif not self._drain_now.is_set():
            # A second signal is an operator who does not want to wait for the drain.
            log.warning("second stop signal: closing %d open streams now", self.active_flows.count)
            self._drain_now.set()

    async def _drain(self) -> None:
        """Stop accepting, let open streams finish up to ``drain_timeout``, then close the rest."""
        assert self.master is not None
        log.info("stopping: draining open streams", extra={"active_flows": self.active_flows.count})
        self.master.options.update(server=False)
        deadline = time.monotonic() + self.config.drain_timeout
        while (
            self.active_flows.count > 0
            and time.monotonic() < deadline
            and not self._drain_now.is_set()
        ):
            await asyncio.sleep(0.05)
        ps = self.master.addons.get("proxyserver")
        if self.active_flows.count > 0:
            log.warning("drain timeout reached; closing %d open streams", self.active_flows.count)
        for handler in list(ps.connections.values()):
            with contextlib.suppress(Exception):
                handler.close_connection(handler.client)
        # Let the closed connections' last hooks run (a flow's error or websocket_end hook
        # hands its interception record to the writer) before the loop goes away; the writer
        # then writes everything it was given before the process exits (``_cleanup``).
        close_deadline = time.monotonic() + 2
        while (ps.connections or _pending_hooks()) and time.monotonic() < close_deadline:
            await asyncio.sleep(0.02)
        self.master.shutdown()

    async def _reread_tokens(self) -> dict[str, str]:
        self.metrics.proxy_token_rereads.inc()
        return await store.read_token_names(self.config.database_path)

    async def _first_reload(self) -> bool:
        """Load the provider table once before listening; False when it failed."""
        # The generation is read before the snapshot, so the snapshot is at least that new.
        try:
            generation: int | None = await self._generation()
        except Exception:
            generation = None  # the reload reports what is wrong with the database
        loaded = await self.reloader.reload_once("start", log_failure=False)
        if loaded and generation is not None:
            self.reloader.applied_generation = generation
        return loaded

    async def _cleanup(self) -> None:
        await self.presence.stop()
        await self.reloader.stop()
        await self.interceptions.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)
        if self._probe_store is not None:
            await self._probe_store.close()
        await self.admin.close()
        if self.master is not None:
            with contextlib.suppress(Exception):
                self.master.options.update(server=False)


async def _serve(config: Config) -> int:
    existed = config.database_path.exists()
    await seeding.initialize(config)
    if not existed:
        # Never silent (contract section 4): a wrong --data-dir shows up in the first lines.
        log.info("created a new database %s", config.database_path)
    ca = ensure_ca(config)
    return await Daemon(config, ca).run()


def run_daemon(config: Config) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code. A start-up failure is one
    ``cannot start: ...`` log line (never a traceback) and exit code 2 (configuration) or
    1 (database or CA)."""
    setup_logging(config.log_level, config.log_format)
    try:
        return asyncio.run(_serve(config))
    except (ConfigError, StartupError) as exc:
        return _cannot_start(str(exc), EXIT_CONFIG)
    except OptionsError as exc:
        # An addon's configure() refused an option derived from our configuration.
        return _cannot_start(f"invalid option: {exc}", EXIT_CONFIG)
    except (CaError, store.StoreError) as exc:
        return _cannot_start(str(exc), EXIT_FAILURE)
    except OSError as exc:
        # A file or directory of ours (data_dir, certs_dir) that cannot be created or written.
        where = f" {exc.filename}" if exc.filename else ""
        return _cannot_start(f"cannot use{where}: {exc.strerror or exc}", EXIT_FAILURE)
    except Exception as exc:
        # A bug, not a configuration problem: still one line for the operator, with the
        # traceback kept for whoever runs with --log-level debug.
        _detach_mitmproxy_log_handlers()
        log.debug("unexpected error", exc_info=True)
        log.error(
            "aibridgeproxyd failed: %s: %s (run with --log-level debug for the traceback)",
            type(exc).__name__,
            " ".join(str(exc).split()),
        )
        return EXIT_FAILURE


def _cannot_start(message: str, code: int) -> int:
    _detach_mitmproxy_log_handlers()
    log.error("cannot start: %s", " ".join(message.split()))
    return code


def _detach_mitmproxy_log_handlers() -> None:
    """Remove handlers mitmproxy attached to the root logger: they post to an event loop that
    ``asyncio.run`` has closed by now."""
    from mitmproxy.log import MitmLogHandler

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, MitmLogHandler):
            root.removeHandler(handler)
