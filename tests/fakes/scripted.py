"""An upstream whose answers are scripted byte for byte, on raw TLS sockets, so a test decides
how an answer's bytes are cut into writes (and so, mostly, into the proxy's reads):

    with ScriptedUpstream() as up:
        up.script([b"HTTP/1.1 200 OK\\r\\n...", b"5\\r\\nhello\\r\\n", CLOSE])
        ...   # send one request through the proxy; it gets that answer, written in 2 pieces

Each request takes the next script off the queue; a script is a list of writes, each sent whole
(``sendall``) after a pause of ``pause`` seconds, with ``CLOSE`` closing the connection where it
stands. A request with no script left is answered 500 and the connection is closed.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Self

from .tls import LOOPBACK, TlsIdentity

CLOSE = b"<close>"  # in a script: close the connection here
MAX_HEAD = 64 * 1024


class ScriptedUpstream:
    """A TLS (HTTP/1.1 only) upstream answering each request with the next script."""

    def __init__(self, *, pause: float = 0.01) -> None:
        self.pause = pause
        self._directory = Path(tempfile.mkdtemp(prefix="scripted-"))
        self.identity = TlsIdentity.create(self._directory)
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scripted", daemon=True)
        self._lock = threading.Lock()
        self._scripts: deque[list[bytes]] = deque()
        self.requests: list[tuple[int, str]] = []  # (connection number, request line)
        self.connections = 0

    @property
    def base_url(self) -> str:
        return f"https://{LOOPBACK}:{self._listener.getsockname()[1]}"

    @property
    def ca_pem_path(self) -> Path:
        return self.identity.ca_pem_path

    def script(self, *scripts: list[bytes]) -> None:
        """Queue the answers of the next requests, one script each."""
        with self._lock:
            self._scripts.extend(scripts)

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self.requests.clear()
            self.connections = 0

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

    def _serve(self) -> None:
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

    def _handle(self, raw: socket.socket, context: ssl.SSLContext, number: int) -> None:
        raw.settimeout(10)
        try:
            with raw:
                sock = context.wrap_socket(raw, server_side=True)
                while self._one_exchange(sock, number):
                    pass
        except (OSError, ssl.SSLError, ValueError):
            pass

    def _one_exchange(self, sock: socket.socket, number: int) -> bool:
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data or len(head) > MAX_HEAD:
                return False
            head += data
        head, _, body = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        while len(body) < length:
            data = sock.recv(65536)
            if not data:
                return False
            body += data
        with self._lock:
            self.requests.append((number, lines[0]))
            script = self._scripts.popleft() if self._scripts else None
        if script is None:
            sock.sendall(
                b"HTTP/1.1 500 No Script\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            return False
        for write in script:
            if write is CLOSE:
                return False
            time.sleep(self.pause)
            sock.sendall(write)
        return True
