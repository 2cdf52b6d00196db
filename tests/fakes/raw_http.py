"""What the raw-socket fake upstreams share (``misbehaving``, ``scripted``): a listener on
loopback served by a thread, TLS with a throwaway trustme CA (or plain TCP), a thread per
connection, and reading one HTTP/1.1 request. A subclass answers each request
(``_one_exchange``), byte for byte, the way no server library would let it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

from .tls import LOOPBACK, TlsIdentity

MAX_HEAD = 64 * 1024


class RawHttpUpstream:
    """A threaded HTTP/1.1 upstream on raw sockets; a context manager (serves inside ``with``).
    ``connections`` counts the connections accepted; ``_lock`` guards what subclasses record."""

    name = "raw-upstream"
    handle_timeout = 5.0  # seconds a connection may sit idle before it is dropped

    def __init__(self, *, tls: bool = True) -> None:
        self._directory = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.identity = TlsIdentity.create(self._directory) if tls else None
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._lock = threading.Lock()
        self.connections = 0

    @property
    def port(self) -> int:
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def base_url(self) -> str:
        return f"{'https' if self.identity else 'http'}://{LOOPBACK}:{self.port}"

    @property
    def ca_pem_path(self) -> Path:
        assert self.identity is not None
        return self.identity.ca_pem_path

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._listener.close()
        shutil.rmtree(self._directory, ignore_errors=True)

    def _one_exchange(self, sock: socket.socket, number: int) -> bool:
        """Read and answer one request on connection ``number`` (from 1); False closes it."""
        raise NotImplementedError

    def _serve(self) -> None:
        context = None
        if self.identity is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.identity.server_pem_path))
            context.set_alpn_protocols(["http/1.1"])
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(
                target=self._handle, args=(connection, context, number), daemon=True
            ).start()

    def _handle(self, raw: socket.socket, context: ssl.SSLContext | None, number: int) -> None:
        raw.settimeout(self.handle_timeout)
        try:
            with raw:
                sock = context.wrap_socket(raw, server_side=True) if context else raw
                while self._one_exchange(sock, number):
                    pass
        except (OSError, ssl.SSLError, ValueError):
            pass  # the proxy gave up on us: what these tests provoke, often


def read_request(sock: socket.socket) -> tuple[str, dict[str, str], bytes] | None:
    """One request: its request line, its header fields (names lower-cased, the last of a name
    wins) and its body (``Content-Length`` bytes); None when the connection ends first or the
    head passes ``MAX_HEAD`` bytes."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(65536)
        if not data or len(head) > MAX_HEAD:
            return None
        head += data
    head, _, body = head.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            return None
        body += data
    return lines[0], headers, body


@contextlib.contextmanager
def serving(serve: Callable[[socket.socket], None]) -> Iterator[int]:
    """The port of a plain TCP listener on loopback that runs ``serve`` on each connection it
    accepts, each in a thread of its own, while the block runs; ``serve`` owns (and closes) its
    connection. For a peer that misbehaves in one scripted way (a proxy, a server)."""
    listener = socket.create_server((LOOPBACK, 0))

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def endless(first: bytes, filler: bytes) -> Callable[[socket.socket], None]:
    """For ``serving``: read a request head, answer ``first``, then ``filler`` without end, as
    fast as it is read, until the connection is closed (an answer that never ends where it
    should: a head, a status line, a chunk-size line)."""

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while b"\r\n\r\n" not in conn.recv(65536):
                pass
            conn.sendall(first)
            while True:
                conn.sendall(filler * 8)

    return serve


def read_head_field(conn: socket.socket, name: bytes) -> bytes:
    """Read a request head from ``conn`` and give the value of its field ``name`` (lower case;
    StopIteration when it has none)."""
    head = b""
    while b"\r\n\r\n" not in head and (data := conn.recv(65536)):
        head += data
    fields = [line.partition(b":") for line in head.split(b"\r\n")]
    return next(v.strip() for k, _, v in fields if k.lower() == name)
