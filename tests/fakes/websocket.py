"""A TLS WebSocket upstream: records each upgrade request and echoes every message back,
prefixed with ``echo:``. Stands in for the Responses API over WebSocket and OpenAI Realtime.

``received`` holds the size of every message it got, and ``close_codes`` the close code of each
session (as the fake saw it), so a test can tell what reached the upstream."""

from __future__ import annotations

import shutil
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

from .tls import LOOPBACK, TlsIdentity


@dataclass(frozen=True)
class Upgrade:
    path: str
    headers: dict[str, str]


class FakeWebSocketUpstream:
    def __init__(self) -> None:
        self._directory = Path(tempfile.mkdtemp(prefix="fake-ws-"))
        self.identity = TlsIdentity.create(self._directory)
        self.upgrades: list[Upgrade] = []
        self.received: list[int] = []
        self.close_codes: list[int | None] = []
        self.closed = threading.Event()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    def _handle(self, connection: ServerConnection) -> None:
        request = connection.request
        assert request is not None
        self.upgrades.append(
            Upgrade(request.path, {k.lower(): v for k, v in request.headers.raw_items()})
        )
        try:
            for message in connection:
                self.received.append(len(message))
                reply = b"echo:" + message if isinstance(message, bytes) else "echo:" + message
                connection.send(reply)
        except ConnectionClosed:
            pass  # closed abnormally (e.g. 1009 from the proxy): the code is recorded below
        finally:
            self.close_codes.append(connection.close_code)
            self.closed.set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.socket.getsockname()[1])

    @property
    def base_url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}/v1"

    @property
    def ca_pem_path(self) -> Path:
        return self.identity.ca_pem_path

    def __enter__(self) -> Self:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.identity.server_pem_path))
        self._server = serve(self._handle, LOOPBACK, 0, ssl=context, max_size=None)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-ws", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)
        shutil.rmtree(self._directory, ignore_errors=True)
