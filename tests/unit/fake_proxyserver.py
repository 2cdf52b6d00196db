"""A stand-in for mitmproxy's Proxyserver addon and its per-connection handlers, for driving
addons that reach a client connection's handler (through ``aibridgeproxyd.mitm.connections``)
without sockets."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection


class FakeWriter:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.transport: Any = None

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeIO:
    writer: FakeWriter = field(default_factory=FakeWriter)
    handler: asyncio.Task[None] | None = None


@dataclass
class FakeWatchdog:
    last_activity: float


class FakeHandler:
    """The parts of mitmproxy's ConnectionHandler the mitm package uses."""

    def __init__(self, client: connection.Client, last_activity: float = 0.0) -> None:
        self.client = client
        self.transports: dict[connection.Connection, FakeIO] = {client: FakeIO()}
        self.timeout_watchdog = FakeWatchdog(last_activity)
        self.max_conns: collections.defaultdict[Any, asyncio.Semaphore] = collections.defaultdict(
            lambda: asyncio.Semaphore(5)
        )
        self.closed: list[connection.Connection] = []

    def close_connection(self, conn: connection.Connection) -> None:
        self.closed.append(conn)


class FakeProxyserver:
    name = "proxyserver"

    def __init__(self) -> None:
        self.connections: dict[str, FakeHandler] = {}

    def connect(self, client: connection.Client) -> FakeHandler:
        handler = self.connections[client.id] = FakeHandler(client)
        return handler
