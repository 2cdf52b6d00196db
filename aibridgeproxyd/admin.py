"""The admin listener: /metrics, /ca-cert.pem, /healthz, /readyz.

A deliberately tiny HTTP/1.1 server on asyncio streams: four read-only GET endpoints do not
justify a web framework, and it shares the daemon's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aibridgeproxyd.errors import reason_phrase

log = logging.getLogger("aibridgeproxyd.admin")

MAX_REQUEST_HEAD = 8192
READ_TIMEOUT = 10.0


@dataclass(frozen=True)
class Reply:
    """What an admin route answers: status, body and headers."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    extra_headers: tuple[tuple[str, str], ...] = ()


# A route returns its reply, or an awaitable of it (for work kept off the event loop).
Route = Callable[[], Reply | Awaitable[Reply]]


class AdminServer:
    """The admin listener: a minimal HTTP/1.1 server answering GET and HEAD on a fixed set of
    paths (``/metrics``, ``/ca-cert.pem``, ``/healthz``, ``/readyz``), each a ``Route``."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._handle, host, port, reuse_address=True)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            reply, method = await self._dispatch(head)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            writer.close()
            return
        headers = [
            f"HTTP/1.1 {reply.status} {reason_phrase(reply.status)}",
            f"Content-Type: {reply.content_type}",
            f"Content-Length: {len(reply.body)}",
            "Connection: close",
            "Cache-Control: no-store",
            *(f"{k}: {v}" for k, v in reply.extra_headers),
        ]
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode())
        if method != "HEAD":
            writer.write(reply.body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _dispatch(self, head: bytes) -> tuple[Reply, str]:
        if len(head) > MAX_REQUEST_HEAD:
            return Reply(431, b"Request Header Fields Too Large\n"), "GET"
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3:
            return Reply(400, b"Bad Request\n"), "GET"
        method, target, _ = parts
        path = target.split("?", 1)[0]
        route = self.routes.get(path)
        if route is None:
            return Reply(404, b"Not Found\n"), method
        if method not in ("GET", "HEAD"):
            return Reply(
                405, b"Method Not Allowed\n", extra_headers=(("Allow", "GET, HEAD"),)
            ), method
        try:
            reply = route()
            if inspect.isawaitable(reply):
                reply = await reply
            return reply, method
        except Exception:
            log.exception("admin endpoint %s failed", path)
            return Reply(500, b"Internal Server Error\n"), method
