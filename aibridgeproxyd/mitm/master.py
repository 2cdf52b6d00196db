"""mitmproxy's ``Master`` as the daemon embeds it, and what the daemon reads of it.

- construction (``new_master``): our core options and mitmproxy's deprecated log forwarding
  removed; ``builtin_addons`` are the only built-ins installed;
- the running master: its listen addresses, why a listener failed to bind, its open client
  connections and how to close them all (the end of a drain), after failing the tunnels still
  being dialed so that their CONNECTs get an answer; the hooks still running;
- logging: mitmproxy's bind-failure line dropped (the daemon reports the failure itself), and its
  root-logger handlers detached once the event loop they post to has closed.

Everything here that is not mitmproxy's addon API (the connection handlers of ``Proxyserver``,
its server instances, hook task names, ``Master._legacy_log_events``, ``MitmLogHandler``) was
read in mitmproxy 12.3's source; re-check it on an upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from mitmproxy import http, options
from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, tlsconfig, upstream_auth
from mitmproxy.certs import DEFAULT_DHPARAM
from mitmproxy.log import MitmLogHandler
from mitmproxy.master import Master

from aibridgeproxyd.ca import write_file_atomically
from aibridgeproxyd.mitm.client_bounds import DIAL_STOPPED, dialing_tunnels
from aibridgeproxyd.mitm.dispatch import use_hook_dispatch

__all__ = [
    "Master",
    "Running",
    "builtin_addons",
    "close_all_clients",
    "detach_log_handlers",
    "drop_repeated_logs",
    "hooks_running",
    "listen_addresses",
    "listen_failures",
    "new_master",
    "open_connections",
    "stop_tunnel_dials",
    "write_dhparam",
]


def new_master(
    *, listen_host: str, listen_port: int, confdir: Path, upstream_trust: Path | None
) -> Master:
    """A ``Master`` with no addon yet, listening on ``listen_host:listen_port`` once run, with
    the CA in ``confdir`` and upstream certificates verified against ``upstream_trust`` (a PEM
    bundle; None: mitmproxy's default, certifi). Must be called inside the running loop."""
    opts = options.Options(
        listen_host=listen_host,
        listen_port=listen_port,
        confdir=str(confdir),
        # Leaves are built from the CONNECT host/SNI alone: MITM'd hosts are never dialled.
        upstream_cert=False,
        ssl_insecure=False,
        ssl_verify_upstream_trusted_ca=str(upstream_trust) if upstream_trust else None,
    )
    master = Master(opts)
    # Each event's handlers looked up once per chain instead of on every event (dispatch.py).
    use_hook_dispatch(master)
    # mitmproxy forwards every log record to its deprecated `add_log` hook through the event
    # loop; nothing here uses that hook, and a record logged after the loop has closed (the
    # "cannot start" line) would raise "Event loop is closed" instead of being printed.
    master._legacy_log_events.uninstall()
    return master


def builtin_addons() -> list[object]:
    """mitmproxy's own addons, in mitmproxy's order: only those a forward proxy needs, since
    every addon costs time on every hook. Leaving out ``block`` means no client is refused for
    its source address (access control is proxy auth); leaving out ``onboarding`` means no
    mitm.it app."""
    return [
        core.Core(),
        disable_h2c.DisableH2C(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        upstream_auth.UpstreamAuth(),
    ]


class Running:
    """Signals (``event``) when mitmproxy has finished setting up its listeners: its
    ``running`` hook, bound or not (see ``listen_failures``)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def running(self) -> None:
        self.event.set()


def _proxyserver(master: Master | None) -> Any:
    return master.addons.get("proxyserver") if master is not None else None


def listen_addresses(master: Master | None) -> list[tuple[Any, ...]]:
    """The socket addresses the proxy listener is bound to; empty before it runs or when it
    could not bind."""
    server = _proxyserver(master)
    return server.listen_addrs() if server is not None else []


def listen_failures(master: Master) -> list[BaseException]:
    """Why the listener could not bind, one exception per failed server (mitmproxy keeps
    running without a listener instead of failing)."""
    server = _proxyserver(master)
    if server is None:
        return []
    return [s.last_exception for s in server.servers if s.last_exception]


def open_connections(master: Master) -> int:
    """How many client connections mitmproxy still handles."""
    server = _proxyserver(master)
    return len(server.connections) if server is not None else 0


def close_all_clients(master: Master) -> None:
    """Close every client connection now. mitmproxy cancels each connection's tasks; the
    disconnect hooks (and a flow's ``error`` or ``websocket_end``) still run."""
    server = _proxyserver(master)
    if server is None:
        return
    for handler in list(server.connections.values()):
        with contextlib.suppress(Exception):
            handler.close_connection(handler.client)


def stop_tunnel_dials(master: Master) -> list[http.HTTPFlow]:
    """Fail the dial of every tunnel whose CONNECT is still unanswered, marked ``DIAL_STOPPED``
    so that it is answered as refused by a stopping proxy (the destination guard's 503), not
    cut off without an answer when the clients are closed; the flows of those CONNECTs. A dial
    not begun yet (its ``server_connect`` hook runs) is failed when the hook returns."""
    server = _proxyserver(master)
    stopped: list[http.HTTPFlow] = []
    for handler in list(server.connections.values()) if server is not None else []:
        for stream, dialled in dialing_tunnels(handler.layer.context):
            stream.flow.metadata[DIAL_STOPPED] = True
            stopped.append(stream.flow)
            if dialled.timestamp_start is None:
                dialled.error = "the proxy is stopping"
            else:
                handler.close_connection(dialled)  # the dial's task is cancelled: it fails
    return stopped


def hooks_running() -> bool:
    """Whether a hook invocation is still running: mitmproxy runs each in a task named
    ``handle_hook(<hook>)`` (``proxy/server.py``), which outlives the connection it came from."""
    return any(
        not task.done() and task.get_name().startswith("handle_hook(")
        for task in asyncio.all_tasks()
    )


class _DropLines(logging.Filter):
    """Drops the records whose message holds ``phrase``."""

    def __init__(self, phrase: str) -> None:
        super().__init__()
        self.phrase = phrase

    def filter(self, record: logging.LogRecord) -> bool:
        return self.phrase not in record.getMessage()


# mitmproxy's loggers and lines the daemon says itself, better: a bind failure (mitmproxy's
# names its own --mode option; ours names --listen), and a failed TLS handshake with an
# upstream (``aibridgeproxyd.upstream`` names the provider, the request and upstream_ca_file;
# a tunnel's failure is logged by the destination guard).
_SAID_BY_US = (
    ("mitmproxy.addons.proxyserver", "failed to listen on", True),
    ("mitmproxy.proxy.server", "Server TLS handshake failed", False),
)


def drop_repeated_logs(debug: bool) -> None:
    """Drop mitmproxy's log lines that the daemon says again in its own words (``_SAID_BY_US``);
    at ``log_level: debug`` all but the bind failure are kept. Installed once per process: any
    earlier such filter is replaced."""
    for name, phrase, always in _SAID_BY_US:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _DropLines)]:
            logger.removeFilter(old)
        if always or not debug:
            logger.addFilter(_DropLines(phrase))


def detach_log_handlers() -> None:
    """Remove the handlers mitmproxy attached to the root logger: they post to an event loop
    that ``asyncio.run`` has closed by now."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, MitmLogHandler):
            root.removeHandler(handler)


def write_dhparam(confdir: Path) -> None:
    """Write mitmproxy's DH parameters file into ``confdir`` if it is missing, atomically.
    Workers started together would otherwise each create it with a plain write
    (``CertStore.load_dhparam``), and one could read another's half-written file."""
    path = confdir / "mitmproxy-dhparam.pem"
    if not path.exists():
        write_file_atomically(path, DEFAULT_DHPARAM, 0o600)
