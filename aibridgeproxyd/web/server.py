"""Serving the admin application with uvicorn on the daemon's event loop.

uvicorn's ``Server.serve`` would install its own signal handlers and wake ten times a second;
the daemon owns the signals and the loop, so the socket is bound here (a bind error is an
``OSError`` the daemon reports as a listen failure) and only uvicorn's ``startup``/``shutdown``
run: no timer, no signal handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

# Connections the admin listener serves at once; more get 503 from uvicorn.
MAX_CONNECTIONS = 256
KEEP_ALIVE_SECONDS = 5
# A connection must deliver a whole request head this long after it opened or after its last
# response: a client that connects and sends nothing (or a head byte by byte) cannot hold one
# of the MAX_CONNECTIONS slots, and so cannot take the listener down by holding them all.
HEAD_TIMEOUT_SECONDS = 10.0
SHUTDOWN_GRACE_SECONDS = 2


class HeadDeadlineH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request head (uvicorn itself only
    times a connection out between requests, once a first response was sent)."""

    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(HEAD_TIMEOUT_SECONDS, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


class AdminServer:
    """The admin listener: an ASGI application served by uvicorn (HTTP/1.1 via h11), with TLS
    when ``tls`` holds a certificate and key file."""

    def __init__(self, app: Any, tls: tuple[Path, Path] | None = None) -> None:
        self.app = app
        self.tls = tls
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None

    async def start(self, host: str, port: int) -> None:
        """Bind ``host:port`` and start serving. Raises ``OSError`` when the address cannot be
        bound (in use, not local)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, reuse_port=False)
        sock.setblocking(False)
        config = uvicorn.Config(
            self.app,
            http=HeadDeadlineH11,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            limit_concurrency=MAX_CONNECTIONS,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
            ssl_certfile=str(self.tls[0]) if self.tls else None,
            ssl_keyfile=str(self.tls[1]) if self.tls else None,
        )
        config.load()
        # uvicorn's own lifecycle lines ("Shutting down", ...) are not the daemon's to print.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        self._server, self._socket = server, sock

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        assert self._socket is not None
        return int(self._socket.getsockname()[1])

    @property
    def scheme(self) -> str:
        """``https`` when served over TLS, else ``http``."""
        return "https" if self.tls else "http"

    async def close(self) -> None:
        """Stop accepting, let requests in progress finish (up to two seconds), close."""
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                await server.shutdown()
        if self._socket is not None:
            self._socket.close()
