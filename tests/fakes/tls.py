"""Local TLS servers for tests: certificates, a background ASGI server, and a tunnel target.

Everything binds 127.0.0.1 on a free port and runs in a background thread with its own event
loop, so synchronous tests and the official SDKs can talk to it. Certificates come from a
throwaway trustme CA per server, written to a temporary directory so a daemon under test can be
pointed at the CA file (`upstream_ca_file`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import shutil
import socket
import ssl
import tempfile
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast
from urllib.parse import parse_qs

import brotli
import httpx
import trustme
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from hypercorn.asyncio import serve
from hypercorn.config import Config, Sockets
from hypercorn.typing import Framework

try:  # Python 3.14+; before that the backport mitmproxy depends on
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[no-redef]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK = "127.0.0.1"
DEFAULT_HOSTNAMES = (LOOPBACK, "localhost")
BULK_CHUNK = b"x" * 65536
TUNNEL_TARGET_BODY = b"hello from the tunnel target\n"


# --- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsIdentity:
    """A trustme CA and one server certificate it issued, written to `directory`."""

    ca: trustme.CA
    ca_pem_path: Path
    server_pem_path: Path  # private key + certificate chain, the form hypercorn loads

    @classmethod
    def create(cls, directory: Path, hostnames: Iterable[str] = DEFAULT_HOSTNAMES) -> TlsIdentity:
        ca = trustme.CA()
        server = ca.issue_cert(*hostnames)
        ca_pem_path = directory / "ca.pem"
        server_pem_path = directory / "server.pem"
        ca.cert_pem.write_to_path(str(ca_pem_path))
        server.private_key_and_cert_chain_pem.write_to_path(str(server_pem_path))
        return cls(ca, ca_pem_path, server_pem_path)

    def client_context(self) -> ssl.SSLContext:
        """An SSL context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.ca_pem_path))


def issued_by(cert_der: bytes, ca_pem_path: Path | str) -> bool:
    """True when `cert_der` is signed directly by the CA in `ca_pem_path`."""
    cert = x509.load_der_x509_certificate(cert_der)
    ca_cert = x509.load_pem_x509_certificate(Path(ca_pem_path).read_bytes())
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --- request recording -------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One request exactly as the server received it."""

    method: str
    path: str  # raw path including the query string
    headers: httpx.Headers  # case-insensitive multidict, in arrival order
    body: bytes
    http_version: str  # "1.1" or "2"
    received_at: float = field(default_factory=time.monotonic)

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0]

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(self.path.split("?", 1)[1]) if "?" in self.path else {}

    @property
    def decoded_body(self) -> bytes:
        """The body with its ``Content-Encoding`` undone (gzip, deflate, br, zstd): clients such
        as Codex compress request bodies, and an upstream reads them decoded."""
        return decode_content(self.body, self.headers.get("content-encoding", ""))

    def json(self) -> Any:
        return json.loads(self.decoded_body)

    def mentions(self, text: str) -> bool:
        """Whether `text` appears anywhere in the path, a header or the body (e.g. a proxy token)."""
        values = [self.path, *(f"{name}: {value}" for name, value in self.headers.multi_items())]
        return any(text in value for value in values) or text.encode() in self.body


def decode_content(body: bytes, content_encoding: str) -> bytes:
    """``body`` with each coding of a ``Content-Encoding`` value undone, last applied first
    (RFC 9110 section 8.4). ValueError names a coding this fake does not know."""
    decoders: dict[str, Callable[[bytes], bytes]] = {
        "gzip": gzip.decompress,
        "x-gzip": gzip.decompress,
        "deflate": zlib.decompress,
        "br": brotli.decompress,
        "zstd": zstd.decompress,
        "identity": lambda data: data,
    }
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding not in decoders:
            raise ValueError(f"unsupported content-encoding {coding!r}")
        try:
            body = decoders[coding](body)
        except Exception as error:  # each library raises its own error type
            raise ValueError(f"body is not valid {coding}: {error}") from None
    return body


class RequestLog:
    """A thread-safe, append-only list of received requests that tests can wait on."""

    def __init__(self) -> None:
        self._requests: list[RecordedRequest] = []
        self._changed = threading.Condition()

    def append(self, request: RecordedRequest) -> None:
        with self._changed:
            self._requests.append(request)
            self._changed.notify_all()

    def snapshot(self) -> list[RecordedRequest]:
        with self._changed:
            return list(self._requests)

    def clear(self) -> None:
        with self._changed:
            self._requests.clear()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least `count` requests arrived; raise TimeoutError otherwise."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(
                    f"expected {count} requests within {timeout}s, got {len(self._requests)}"
                )
            return list(self._requests)


async def read_request(scope: Scope, receive: Receive) -> RecordedRequest:
    """Read the whole request body and capture the request as received."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    path = raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
    headers = httpx.Headers(
        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
    )
    return RecordedRequest(scope["method"], path, headers, b"".join(chunks), scope["http_version"])


# --- responses shared by the fakes -------------------------------------------------------------


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: str = "application/json",
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    all_headers = [("content-type", content_type), ("content-length", str(len(body))), *headers]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode(), v.encode()) for k, v in all_headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()
) -> None:
    await send_bytes(send, status, json.dumps(payload).encode(), "application/json", headers)


async def send_bulk(send: Send, size: int) -> None:
    """Stream `size` bytes in 64 KiB chunks, for throughput benchmarks."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(size).encode()),
            ],
        }
    )
    remaining = size
    while remaining > 0:
        chunk = BULK_CHUNK[: min(remaining, len(BULK_CHUNK))]
        remaining -= len(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": remaining > 0})
    if size == 0:
        await send({"type": "http.response.body", "body": b""})


def bulk_size(request: RecordedRequest) -> int:
    return int(request.query.get("bytes", ["0"])[0])


# --- the background server ---------------------------------------------------------------------


class _PreboundConfig(Config):
    """Serve on a socket we bound ourselves, so the free port is known before the thread starts."""

    def __init__(self, sock: socket.socket) -> None:
        self._prebound = sock

    def create_sockets(self) -> Sockets:
        if self.ssl_enabled:
            return Sockets([self._prebound], [], [])
        return Sockets([], [self._prebound], [])


class _QuickTlsShutdownLoop(asyncio.SelectorEventLoop):
    """An event loop whose TLS servers wait at most briefly for a peer's close_notify.

    The default wait is 30 s; a test client that holds a connection without reading would
    otherwise keep the server from stopping for that long.
    """

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_shutdown_timeout", 0.5)
        return await super().create_server(*args, **kwargs)


class BackgroundServer:
    """Runs an ASGI app under hypercorn in a daemon thread with its own event loop.

    TLS when `identity` is given (ALPN h2 and http/1.1, or http/1.1 only with http2=False),
    plain HTTP otherwise. Use as a context manager, or call start() and stop().
    """

    def __init__(
        self,
        app: AsgiApp,
        *,
        identity: TlsIdentity | None,
        http2: bool = True,
        name: str = "fake-server",
        options: dict[str, Any] | None = None,
    ) -> None:
        self._app = app
        self._identity = identity
        self._http2 = http2
        self._name = name
        self._options = options or {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._ready = threading.Event()
        self._app_tasks: set[asyncio.Task[Any]] = set()
        self._error: BaseException | None = None
        self.port = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "server not started"
        return self._loop

    def start(self, timeout: float = 5.0) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((LOOPBACK, 0))
        sock.listen(1024)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = self._config(sock)
        self._thread = threading.Thread(
            target=self._run, args=(config,), name=f"{self._name}:{self.port}", daemon=True
        )
        self._thread.start()
        # The socket already listens, so clients that connect before hypercorn accepts just wait
        # in the backlog. Readiness is the lifespan start-up, which proves the loop is running.
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError(f"{self._name} did not start") from self._error

    def stop(self, timeout: float = 10.0) -> None:
        thread = self._thread
        if thread is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in the meantime
                self._loop.call_soon_threadsafe(self._begin_shutdown)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"{self._name} did not stop within {timeout}s")
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _config(self, sock: socket.socket) -> Config:
        config = _PreboundConfig(sock)
        config.loglevel = "WARNING"
        config.accesslog = None
        # Requests in flight are cancelled on stop (see _begin_shutdown), so no grace is needed.
        config.graceful_timeout = 0.5
        # Real providers keep idle connections open for a long while. A short timeout here would
        # make a proxy's reused upstream connection race with the server closing it.
        config.keep_alive_timeout = 120
        config.alpn_protocols = ["h2", "http/1.1"] if self._http2 else ["http/1.1"]
        if self._identity is not None:
            config.certfile = str(self._identity.server_pem_path)
            config.keyfile = str(self._identity.server_pem_path)
        for key, value in self._options.items():
            setattr(config, key, value)
        return config

    def _run(self, config: Config) -> None:
        try:
            with asyncio.Runner(loop_factory=_QuickTlsShutdownLoop) as runner:
                runner.run(self._serve(config))
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self, config: Config) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(self._handle_loop_exception)
        self._stop_requested = asyncio.Event()
        app = cast(Framework, self._with_lifespan)
        await serve(app, config, shutdown_trigger=self._stop_requested.wait)

    def _handle_loop_exception(
        self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]
    ) -> None:
        # Clients that never answer our TLS close_notify are expected while stopping.
        stopping = self._stop_requested is not None and self._stop_requested.is_set()
        if stopping and isinstance(context.get("exception"), (TimeoutError, ssl.SSLError, OSError)):
            return
        loop.default_exception_handler(context)

    def _begin_shutdown(self) -> None:
        # Python 3.12's Server.wait_closed() waits for every connection, so a stream the test
        # left open (gated, paced, or stuck on a client that stopped reading) would block stop.
        for task in self._app_tasks:
            task.cancel()
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def _with_lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            task = asyncio.current_task()
            assert task is not None
            self._app_tasks.add(task)
            try:
                await self._app(scope, receive, send)
            finally:
                self._app_tasks.discard(task)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
                self._ready.set()
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


# --- the tunnel target -------------------------------------------------------------------------


class ServedFake:
    """Start/stop and context management for a fake that owns a BackgroundServer (``_server``)
    and a temporary directory (``_directory``, removed on stop)."""

    _server: BackgroundServer
    _directory: Path

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        try:
            self._server.stop()
        finally:
            shutil.rmtree(self._directory, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class TunnelTarget(ServedFake):
    """A server with its own CA that answers any request with a small body.

    Tests CONNECT to it through the proxy and check that the bytes arrive untouched and that the
    certificate the client sees is this server's (issued by `ca_pem_path`), not the proxy's.
    GET /bulk?bytes=N returns N bytes for throughput benchmarks. With tls=False it serves plain
    HTTP, for absolute-form proxy requests.
    """

    def __init__(
        self,
        *,
        tls: bool = True,
        http2: bool = True,
        hostnames: Iterable[str] = DEFAULT_HOSTNAMES,
    ) -> None:
        self._directory = Path(tempfile.mkdtemp(prefix="tunnel-target-"))
        self.identity = TlsIdentity.create(self._directory, hostnames) if tls else None
        self._log = RequestLog()
        self._server = BackgroundServer(
            self._app, identity=self.identity, http2=http2, name="tunnel-target"
        )

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def address(self) -> str:
        """`host:port`, the CONNECT target."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.identity else 'http'}://{self.address}"

    @property
    def ca_pem_path(self) -> Path:
        if self.identity is None:
            raise RuntimeError("this tunnel target serves plain HTTP and has no CA")
        return self.identity.ca_pem_path

    @property
    def requests(self) -> list[RecordedRequest]:
        return self._log.snapshot()

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        return self._log.wait_for(count, timeout)

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = await read_request(scope, receive)
        self._log.append(request)
        if request.method == "GET" and request.path_only == "/bulk":
            await send_bulk(send, bulk_size(request))
        else:
            await send_bytes(send, 200, TUNNEL_TARGET_BODY, "text/plain")
