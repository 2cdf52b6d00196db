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

import socket
import time
from collections import deque

from .raw_http import RawHttpUpstream, read_request

CLOSE = b"<close>"  # in a script: close the connection here


class ScriptedUpstream(RawHttpUpstream):
    """A TLS (HTTP/1.1 only) upstream answering each request with the next script;
    ``requests`` holds (connection number, request line) of every request read. ``tls=False``:
    plain TCP, a destination of plain-HTTP proxy requests."""

    name = "scripted"
    handle_timeout = 10.0

    def __init__(self, *, pause: float = 0.01, tls: bool = True) -> None:
        super().__init__(tls=tls)
        self.pause = pause
        self._scripts: deque[list[bytes]] = deque()
        self.requests: list[tuple[int, str]] = []

    def script(self, *scripts: list[bytes]) -> None:
        """Queue the answers of the next requests, one script each."""
        with self._lock:
            self._scripts.extend(scripts)

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self.requests.clear()
            self.connections = 0

    def _one_exchange(self, sock: socket.socket, number: int) -> bool:
        request = read_request(sock)
        if request is None:
            return False
        with self._lock:
            self.requests.append((number, request[0]))
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
