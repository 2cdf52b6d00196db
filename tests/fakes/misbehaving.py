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
import socket

from .raw_http import RawHttpUpstream, read_request

MODE_HEADER = "x-misbehave"


class MisbehavingUpstream(RawHttpUpstream):
    """Answers each request as its mode says (see the module docstring); ``requests`` holds the
    header fields of every request read, with its ``request-line``."""

    name = "misbehaving"

    def __init__(self, *, mode: str = "echo", tls: bool = True) -> None:
        super().__init__(tls=tls)
        self.mode = mode
        self.requests: list[dict[str, str]] = []

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def _one_exchange(self, sock: socket.socket, number: int) -> bool:
        request = read_request(sock)
        if request is None:
            return False
        request_line, headers, _ = request
        with self._lock:
            self.requests.append({"request-line": request_line, **headers})
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
