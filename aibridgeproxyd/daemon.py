"""The daemon: mitmproxy embedded in our own asyncio loop, plus the admin listener, the
provider reload, signal handling and a graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path

from mitmproxy import options
from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, tlsconfig, upstream_auth
from mitmproxy.master import Master

from aibridgeproxyd import seeding, store
from aibridgeproxyd.addons.classify import Classify
from aibridgeproxyd.addons.destinations import DestinationGuard
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
from aibridgeproxyd.ca import CaError, CaFiles, ensure_ca, mitmproxy_confdir, upstream_trust_bundle
from aibridgeproxyd.config import Config, ConfigError
from aibridgeproxyd.connections import ConnectionTable
from aibridgeproxyd.destinations import DestinationPolicy
from aibridgeproxyd.interceptions import InterceptionWriter
from aibridgeproxyd.logs import setup_logging
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.reload import ProviderReloader, SnapshotHolder
from aibridgeproxyd.stream_bounds import StreamBounds
from aibridgeproxyd.tracing import build_tracing
from aibridgeproxyd.upstream_proxy import NoProxy, parse_upstream_proxy

log = logging.getLogger("aibridgeproxyd")


def _files_signature(database: Path) -> tuple[tuple[int, int], ...]:
    """(mtime, size) of the database and its write-ahead log: any commit changes one of them."""
    signature = []
    for path in (database, database.with_name(database.name + "-wal")):
        try:
            st = os.stat(path)
            signature.append((st.st_mtime_ns, st.st_size))
        except OSError:
            signature.append((0, -1))
    return tuple(signature)


class StartupError(RuntimeError):
    pass


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
        self._probe_store: store.Store | None = None
        self._probe_signature: tuple[tuple[int, int], ...] = ()
        self._probe_generation: int | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def _generation(self) -> int:
        """The store's write counter, read on a connection kept open for it: a CLI write
        reaches the daemon within half a second instead of one reload interval. While the
        database files are untouched (an idle daemon) the last value is reused without a query."""
        signature = _files_signature(self.config.database_path)
        if signature == self._probe_signature and self._probe_generation is not None:
            return self._probe_generation
        if self._probe_store is None:
            self._probe_store = await store.Store.open(self.config.database_path, create=False)
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
                self.holder, self.connections, config.auth, config.auth_tunneled, self.metrics
            ),
            Intercept(self.connections, self.metrics, stream_bounds(config)),
            RouteRequests(
                self.holder,
                self.connections,
                config.central_key_placeholder,
                max_request_body=config.max_request_body,
            ),
            # After the route's rewrite, so the destination it chains is the one dialled; before
            # the guard, which checks what goes through the proxy when that choice is made.
            *([chain] if chain else []),
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
            RecordInterceptions(self.interceptions, self.metrics),
            TraceRequests(self.tracing, self.connections),
            ForgetWebSocketMessages(),  # last: every other addon has seen the message
        )
        # Options defined by addons exist only once the addons are loaded.
        opts.update(connection_strategy="eager")
        return master

    def _upstream_proxy_chain(self) -> ChainUpstreamProxy | None:
        config = self.config
        if config.upstream_proxy is None:
            return None
        try:
            no_proxy = NoProxy(config.upstream_no_proxy)
        except ValueError as exc:
            raise StartupError(f"invalid value for config key 'upstream_no_proxy': {exc}") from None
        try:
            chain = ChainUpstreamProxy(
                parse_upstream_proxy(config.upstream_proxy),
                no_proxy,
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
                "upstream_no_proxy": ",".join(config.upstream_no_proxy),
            },
        )
        return chain

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.master = self._build_master()
        await self.reloader.reload_once("start")
        self.reloader.start()
        self.interceptions.start()
        try:
            await self.admin.start(self.config.admin_listen.host, self.config.admin_listen.port)
        except OSError as exc:
            raise StartupError(
                f"cannot listen on admin_listen {self.config.admin_listen}: {exc.strerror or exc}"
            ) from None
        master_task = asyncio.create_task(self.master.run(), name="mitmproxy")
        await asyncio.wait(
            [master_task, asyncio.create_task(self.running.event.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not self._listen_addrs():
            ps = self.master.addons.get("proxyserver")
            reasons = (
                "; ".join(str(s.last_exception) for s in ps.servers if s.last_exception)
                or "unknown error"
            )
            self.master.shutdown()
            await master_task
            await self._cleanup()
            raise StartupError(f"cannot listen on {self.config.listen}: {reasons}")
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

    async def _drain(self) -> None:
        """Stop accepting, let open streams finish up to ``drain_timeout``, then close the rest."""
        assert self.master is not None
        log.info("stopping: draining open streams", extra={"active_flows": self.active_flows.count})
        self.master.options.update(server=False)
        deadline = time.monotonic() + self.config.drain_timeout
        while self.active_flows.count > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ps = self.master.addons.get("proxyserver")
        if self.active_flows.count > 0:
            log.warning("drain timeout reached; closing %d open streams", self.active_flows.count)
        for handler in list(ps.connections.values()):
            with contextlib.suppress(Exception):
                handler.close_connection(handler.client)
        # Give the closed connections' hooks a moment to run before the loop goes away.
        close_deadline = time.monotonic() + 2
        while ps.connections and time.monotonic() < close_deadline:
            await asyncio.sleep(0.02)
        self.master.shutdown()

    async def _cleanup(self) -> None:
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
    await seeding.initialize(config)
    ca = ensure_ca(config)
    return await Daemon(config, ca).run()


def run_daemon(config: Config) -> int:
    setup_logging(config.log_level, config.log_format)
    try:
        return asyncio.run(_serve(config))
    except (ConfigError, CaError, StartupError, store.StoreError) as exc:
        log.error("cannot start: %s", exc)
        return 1
