"""An upstream that misbehaves on purpose, written on raw sockets so it can break HTTP in ways a
real server library never would:

    with MisbehavingUpstream() as up:
        # a provider with base_url=up.base_url, the daemon with upstream_ca_file=up.ca_pem_path
        ...   # send a request with header "x-misbehave: garbage"
        assert up.request_count == 1

Modes (the request header ``x-misbehave``, else ``MisbehavingUpstream.mode``):

    garbage       a line that is not HTTP, then close
    garbage-echo  a line that is not HTTP but quotes the request's Authorization, then close
    close         read the request, close without a byte
    partial       200 with Content-Length 100, 10 bytes of body, close
    bad-header    a response whose framing headers contradict each other
    cl-te         a response with both Content-Length and Transfer-Encoding: chunked, whose two
                  framings disagree; the connection is kept open (it must not be reused)
    bad-chunk     200 chunked with a chunk size that is not hex; the connection is kept open
    echo          400 with a JSON body quoting every request header back (as some gateways do)
    echo-chunked  the same body, chunked, cut into 7-byte chunks

TLS uses a throwaway trustme CA (``ca_pem_path``); ``tls=False`` serves plain TCP, so a TLS
client meets a server that does not speak TLS.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

from .tls import LOOPBACK, TlsIdentity

MODE_HEADER = "x-misbehave"
MAX_HEAD = 64 * 1024


class MisbehavingUpstream:
    def __init__(self, *, mode: str = "echo", tls: bool = True) -> None:
        self.mode = mode
        self._directory = Path(tempfile.mkdtemp(prefix="misbehaving-"))
        self.identity = TlsIdentity.create(self._directory) if tls else None
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="misbehaving", daemon=True)
        self._lock = threading.Lock()
        self.requests: list[dict[str, str]] = []  # the header fields of every request read
        self.connections = 0  # connections accepted

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def base_url(self) -> str:
        return f"{'https' if self.identity else 'http'}://{LOOPBACK}:{self.port}"

    @property
    def ca_pem_path(self) -> Path:
        assert self.identity is not None
        return self.identity.ca_pem_path

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

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
            threading.Thread(target=self._handle, args=(connection, context), daemon=True).start()

    def _handle(self, raw: socket.socket, context: ssl.SSLContext | None) -> None:
        raw.settimeout(5)
        try:
            with raw:
                sock = context.wrap_socket(raw, server_side=True) if context else raw
                while self._one_exchange(sock):
                    pass
        except (OSError, ssl.SSLError, ValueError):
            pass  # the proxy gave up on us: exactly what these tests provoke

    def _one_exchange(self, sock: socket.socket) -> bool:
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data or len(head) > MAX_HEAD:
                return False
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
                return False
            body += data
        with self._lock:
            self.requests.append({"request-line": lines[0], **headers})
        mode = headers.get(MODE_HEADER, self.mode)
        if mode == "garbage":
            sock.sendall(b"SSH-2.0-OpenSSH_9.6 this is not http\r\n\r\n")
            return False
        if mode == "garbage-echo":
            quoted = headers.get("authorization", "").encode("latin-1")
            sock.sendall(b"NOT HTTP, you sent " + quoted + b"\r\n\r\n")
            return False
        if mode == "close":
            return False
        if mode == "partial":
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n" + b'{"partial"'
            )
            return False
        if mode == "bad-header":
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
            )
            return False
        if mode == "cl-te":
            # The two framings disagree on where the body ends; the bytes behind the chunked
            # body form a second response a reused connection would hand to the next request.
            smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\n{}\r\n0\r\n\r\n" + smuggled
            )
            return True
        if mode == "bad-chunk":
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
            )
            return True
        echo = json.dumps(
            {"error": {"message": "bad request", "request": {"headers": headers}}}
        ).encode()
        if mode == "echo-chunked":
            chunks = b"".join(
                b"%x\r\n%s\r\n" % (len(echo[i : i + 7]), echo[i : i + 7])
                for i in range(0, len(echo), 7)
            )
            sock.sendall(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
            )
            return True
        sock.sendall(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(echo) + echo
        )
        return True
