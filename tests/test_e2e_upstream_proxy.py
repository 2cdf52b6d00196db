"""End to end: outbound connections chained through a corporate proxy (``upstream_proxy``).

A small corporate proxy runs in a thread: it answers CONNECT and absolute-form requests, records
what it was asked for and with which ``Proxy-Authorization``, can require credentials (407
otherwise), refuse everything, or serve over TLS with its own CA. Nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
import pytest
import trustme

from tests.fakes.raw_http import endless, read_head_field, serving
from tests.fakes.tls import TUNNEL_TARGET_BODY, TlsIdentity, TunnelTarget, issued_by
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, free_port, open_tls_tunnel, trust

CENTRAL_KEY = "sk-central"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def basic(userinfo: str) -> str:
    return "Basic " + base64.b64encode(userinfo.encode()).decode()


# --- the corporate proxy ------------------------------------------------------------------------


@dataclass(frozen=True)
class Asked:
    """One request the corporate proxy received: ``CONNECT host:port`` or ``GET http://...``."""

    method: str
    target: str
    proxy_authorization: str | None


class CorporateProxy:
    """A forward proxy for tests: CONNECT and absolute-form requests, relayed byte for byte.

    `userinfo`: credentials it requires (407 without them). `refuse_with`: answer every request
    with this status (a test may change it at any time). `tls`: serve over TLS with a trustme CA
    (`ca_pem_path`) issued for 127.0.0.1 and localhost.
    """

    def __init__(
        self, *, userinfo: str | None = None, tls: bool = False, refuse_with: int | None = None
    ) -> None:
        self.required_authorization = basic(userinfo) if userinfo is not None else None
        self.refuse_with = refuse_with
        self._directory = Path(tempfile.mkdtemp(prefix="corporate-proxy-"))
        self.identity = TlsIdentity.create(self._directory) if tls else None
        self._asked: list[Asked] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    # -- what tests look at

    @property
    def asked(self) -> list[Asked]:
        with self._lock:
            return list(self._asked)

    def clear(self) -> None:
        with self._lock:
            self._asked.clear()

    def url(self, userinfo: str | None = None) -> str:
        scheme = "https" if self.identity else "http"
        credentials = f"{userinfo}@" if userinfo is not None else ""
        return f"{scheme}://{credentials}127.0.0.1:{self.port}"

    @property
    def ca_pem_path(self) -> Path:
        assert self.identity is not None
        return self.identity.ca_pem_path

    # -- lifecycle

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("corporate proxy did not start")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        for path in self._directory.iterdir():
            path.unlink()
        self._directory.rmdir()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        context = None
        if self.identity is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(self.identity.server_pem_path))
            context.set_alpn_protocols(["http/1.1"])
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=context)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- serving

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *header_lines = head.split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = [line.partition(":") for line in header_lines if line]
        authorization = next(
            (v.strip() for k, _, v in headers if k.lower() == "proxy-authorization"), None
        )
        with self._lock:
            self._asked.append(Asked(method, target, authorization))
        if self.refuse_with is not None:
            await _answer(writer, self.refuse_with)
            return
        if self.required_authorization and authorization != self.required_authorization:
            await _answer(writer, 407, ("Proxy-Authenticate", 'Basic realm="corp"'))
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            try:
                up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            except OSError:
                await _answer(writer, 502)
                return
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            url = urlsplit(target)
            up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port or 80)
            kept = [
                f"{k}:{v}\r\n"
                for k, _, v in headers
                if k.lower() not in ("proxy-authorization", "proxy-connection", "connection")
            ]
            path = url.path + (f"?{url.query}" if url.query else "")
            up_writer.write(
                f"{method} {path or '/'} HTTP/1.1\r\n{''.join(kept)}Connection: close\r\n\r\n".encode(
                    "latin-1"
                )
            )
        try:
            await _relay(reader, writer, up_reader, up_writer)
        finally:
            up_writer.close()


async def _answer(writer: asyncio.StreamWriter, status: int, *headers: tuple[str, str]) -> None:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    writer.write(
        f"HTTP/1.1 {status} Refused\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()


async def _relay(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until either side closes."""

    async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()

    tasks = [
        asyncio.create_task(copy(reader, up_writer)),
        asyncio.create_task(copy(up_reader, writer)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- fixtures and helpers -----------------------------------------------------------------------


def daemon_config(
    upstream: FakeUpstream, base_url: str | None = None, **extra: Any
) -> dict[str, Any]:
    """`auth: none` on loopback; an openai provider seeded with a central key."""
    return {
        "auth": "none",
        "upstream_ca_file": upstream.ca_pem_path,
        "providers": [
            {
                "name": "openai",
                "type": "openai",
                "base_url": base_url or upstream.base_url,
                "keys": [CENTRAL_KEY],
            }
        ],
        **extra,
    }


def chat_through(daemon: DaemonProcess) -> httpx.Response:
    with daemon.httpx_client() as client:
        return client.post("https://api.openai.com/v1/chat/completions", json=CHAT)


def connects(proxy: CorporateProxy) -> list[Asked]:
    return [asked for asked in proxy.asked if asked.method == "CONNECT"]


# --- an http:// proxy that requires user:pass ---------------------------------------------------


@pytest.fixture(scope="module")
def corporate() -> Iterator[CorporateProxy]:
    with CorporateProxy(userinfo="proxy-user:proxy-pass") as proxy:
        yield proxy


@pytest.fixture(scope="module")
def daemon(
    upstream: FakeUpstream,
    target: TunnelTarget,
    plain_target: TunnelTarget,
    corporate: CorporateProxy,
) -> Iterator[DaemonProcess]:
    config = daemon_config(
        upstream,
        upstream_proxy=corporate.url("proxy-user:proxy-pass"),
        allowed_private_cidrs=["127.0.0.1/32"],
        allowed_ports=[80, 443, target.port, plain_target.port],
        log_level="debug",  # for test_credentials_never_reach_the_logs
    )
    with DaemonProcess(config) as d:
        yield d


@pytest.fixture(autouse=True)
def fresh_records(request: pytest.FixtureRequest, upstream: FakeUpstream) -> None:
    upstream.reset()
    if "corporate" in request.fixturenames:
        request.getfixturevalue("corporate").clear()


def test_mitm_sdk_request_goes_through_the_corporate_proxy(
    daemon: DaemonProcess, corporate: CorporateProxy, upstream: FakeUpstream
) -> None:
    client = daemon.openai_client(http_options={"timeout": 10})
    completion = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert completion.choices[0].message.content
    (request,) = upstream.requests
    assert request.headers["authorization"] == f"Bearer {CENTRAL_KEY}"
    assert request.json()["messages"] == CHAT["messages"]
    # The rewritten upstream was reached through the proxy, with TLS inside the tunnel.
    assert connects(corporate) == [
        Asked("CONNECT", f"127.0.0.1:{upstream.port}", basic("proxy-user:proxy-pass"))
    ]


def test_tunneled_connect_goes_through_the_corporate_proxy(
    daemon: DaemonProcess, corporate: CorporateProxy, target: TunnelTarget
) -> None:
    with open_tls_tunnel(
        daemon.proxy_host,
        daemon.proxy_port,
        target.address,
        target.identity.client_context(),  # type: ignore[union-attr]
    ) as sock:
        # The target's own certificate: relayed through both proxies, never decrypted.
        assert issued_by(sock.getpeercert(binary_form=True) or b"", target.ca_pem_path)
        sock.sendall(b"GET /through-the-chain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    assert received.endswith(TUNNEL_TARGET_BODY)
    assert target.requests[-1].path == "/through-the-chain"
    assert corporate.asked == [Asked("CONNECT", target.address, basic("proxy-user:proxy-pass"))]


def test_plain_http_goes_to_the_proxy_in_absolute_form(
    daemon: DaemonProcess, corporate: CorporateProxy, plain_target: TunnelTarget
) -> None:
    with httpx.Client(proxy=daemon.proxy_url, trust_env=False, timeout=10) as client:
        response = client.get(f"{plain_target.url}/plain?x=1")
    assert response.status_code == 200
    assert response.content == TUNNEL_TARGET_BODY
    assert corporate.asked == [
        Asked("GET", f"{plain_target.url}/plain?x=1", basic("proxy-user:proxy-pass"))
    ]
    # The proxy's credentials were for the proxy only.
    assert "proxy-authorization" not in plain_target.requests[-1].headers


@pytest.mark.parametrize("destination", ["10.1.2.3:443", "169.254.169.254:443", "127.0.0.2:443"])
def test_private_destination_is_refused_although_the_proxy_would_dial_it(
    daemon: DaemonProcess, corporate: CorporateProxy, destination: str
) -> None:
    response = daemon.raw_connect(destination)
    assert (response.status_code, response.body) == (
        403,
        b"Forbidden: private or reserved destination",
    )
    assert corporate.asked == []


def test_private_plain_http_destination_is_refused(
    daemon: DaemonProcess, corporate: CorporateProxy
) -> None:
    with httpx.Client(proxy=daemon.proxy_url, trust_env=False, timeout=10) as client:
        assert client.get("http://10.9.9.9/").status_code == 403
    assert corporate.asked == []


@pytest.mark.parametrize("status", [407, 403, 502])
def test_proxy_refusing_a_tunnel_gives_the_client_502(
    daemon: DaemonProcess, corporate: CorporateProxy, target: TunnelTarget, status: int
) -> None:
    corporate.refuse_with = status
    try:
        response = daemon.raw_connect(target.address)
    finally:
        corporate.refuse_with = None
    phrase = {407: "Proxy Authentication Required", 403: "Forbidden", 502: "Bad Gateway"}[status]
    assert (response.status_code, response.body.decode()) == (
        502,
        f"Bad Gateway: upstream proxy refused the connection: {status} {phrase}",
    )
    assert corporate.asked == [Asked("CONNECT", target.address, basic("proxy-user:proxy-pass"))]


def test_proxy_asking_for_credentials_on_a_plain_request_gives_the_client_502(
    daemon: DaemonProcess, corporate: CorporateProxy, plain_target: TunnelTarget
) -> None:
    """The corporate proxy's 407 to a plain-HTTP request reached the client as it was, with the
    proxy's Proxy-Authenticate challenge: read as aibridgeproxyd's own, for credentials the
    client cannot fix (and a proxy page quoting the request would show the client the proxy's
    credentials). It is a 502, as for a tunnel; the log says why, without the proxy's text."""
    corporate.refuse_with = 407
    try:
        with httpx.Client(proxy=daemon.proxy_url, trust_env=False, timeout=10) as client:
            response = client.get(f"{plain_target.url}/plain")
    finally:
        corporate.refuse_with = None
    assert response.status_code == 502
    assert "proxy-authenticate" not in response.headers
    assert response.text == (
        "The upstream proxy refused the request: 407 Proxy Authentication Required.\n"
    )
    assert corporate.asked == [
        Asked("GET", f"{plain_target.url}/plain", basic("proxy-user:proxy-pass"))
    ]
    expected = (
        f"upstream proxy refused a plain-HTTP request to {plain_target.address}: 407 "
        "(check upstream_proxy's credentials)"
    )
    daemon.wait_for(lambda: expected in daemon.logs())


def test_proxy_refusing_a_mitm_upstream_gives_the_provider_shaped_502(
    daemon: DaemonProcess, corporate: CorporateProxy
) -> None:
    corporate.refuse_with = 502
    try:
        response = chat_through(daemon)
    finally:
        corporate.refuse_with = None
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"
    assert "x-aibridge-request-id" in response.headers


def test_credentials_never_reach_the_logs(daemon: DaemonProcess) -> None:
    logs = daemon.logs()
    assert "proxy-pass" not in logs
    assert basic("proxy-user:proxy-pass").split()[1] not in logs
    assert (
        f"upstream proxy http://127.0.0.1:{urlsplit(daemon.config['upstream_proxy']).port}" in logs
    )


# --- the other userinfo forms, an https:// proxy, and no private allowance -----------------------


@pytest.mark.parametrize(
    ("userinfo", "header_payload"),
    [
        ("proxy-user:", "proxy-user:"),
        ("proxy-user", "proxy-user"),
        (":t%40ken", ":t@ken"),  # token-style, percent-encoded in the URL
    ],
)
def test_every_userinfo_form_becomes_the_proxy_authorization(
    upstream: FakeUpstream, target: TunnelTarget, userinfo: str, header_payload: str
) -> None:
    with (
        CorporateProxy(userinfo=header_payload) as corporate,
        DaemonProcess(
            daemon_config(
                upstream, upstream_proxy=corporate.url(userinfo), allowed_ports=[443, target.port]
            )
        ) as daemon,
    ):
        assert chat_through(daemon).status_code == 200
        # No private allowance: the tunnel target (127.0.0.1) is refused before the proxy hears
        # of it, while the provider upstream and the proxy itself, both operator
        # configuration, are reached.
        assert daemon.raw_connect(target.address).status_code == 403
        assert daemon.raw_connect(f"localhost:{target.port}").status_code == 403
    assert corporate.asked == [
        Asked("CONNECT", f"127.0.0.1:{upstream.port}", basic(header_payload))
    ]


def test_https_proxy_is_verified_against_upstream_proxy_ca(
    upstream: FakeUpstream, target: TunnelTarget
) -> None:
    with CorporateProxy(userinfo="u:p", tls=True) as corporate:
        config = daemon_config(
            upstream,
            upstream_proxy=corporate.url("u:p"),
            allowed_private_cidrs=["127.0.0.1/32"],
            allowed_ports=[443, target.port],
        )
        with DaemonProcess({**config, "upstream_proxy_ca": corporate.ca_pem_path}) as daemon:
            assert chat_through(daemon).status_code == 200
            with httpx.Client(
                proxy=daemon.proxy_url, verify=trust(target.ca_pem_path), trust_env=False
            ) as client:
                assert client.get(f"{target.url}/over-tls").content == TUNNEL_TARGET_BODY
        assert corporate.asked == [
            Asked("CONNECT", f"127.0.0.1:{upstream.port}", basic("u:p")),
            Asked("CONNECT", target.address, basic("u:p")),
        ]
        corporate.clear()
        # Without the proxy's CA, the default bundle does not trust it: nothing is sent to it.
        with DaemonProcess(config) as untrusting:
            assert untrusting.raw_connect(target.address).status_code == 502
            assert chat_through(untrusting).status_code == 502
            logs = untrusting.logs()
            assert "upstream proxy did not open a tunnel" in logs
            # The reason, once: ours, not also mitmproxy's "Server TLS handshake failed".
            assert "Certificate verify failed" in logs
            assert "Server TLS handshake failed" not in logs
        assert corporate.asked == []


def test_upstream_no_proxy_is_dialled_directly(
    upstream: FakeUpstream, target: TunnelTarget
) -> None:
    with (
        CorporateProxy() as corporate,
        DaemonProcess(
            daemon_config(
                upstream,
                # The FakeUpstream's certificate names localhost too.
                base_url=f"https://localhost:{upstream.port}/v1",
                upstream_proxy=corporate.url(),
                upstream_no_proxy=["localhost"],
                allowed_private_cidrs=["127.0.0.1/32"],
                allowed_ports=[443, target.port],
            )
        ) as daemon,
    ):
        assert chat_through(daemon).status_code == 200
        assert len(upstream.requests) == 1
        assert corporate.asked == []  # the provider upstream matched upstream_no_proxy
        assert daemon.raw_connect(target.address).status_code == 200
        assert corporate.asked == [Asked("CONNECT", target.address, None)]


def test_proxy_that_is_down_gives_502(upstream: FakeUpstream, target: TunnelTarget) -> None:
    port = free_port()  # nothing listens there
    with DaemonProcess(
        daemon_config(
            upstream,
            upstream_proxy=f"http://127.0.0.1:{port}",
            allowed_private_cidrs=["127.0.0.1/32"],
            allowed_ports=[443, target.port],
        )
    ) as daemon:
        response = daemon.raw_connect(target.address)
        assert (response.status_code, response.body) == (502, b"Bad Gateway")
        mitm = chat_through(daemon)
        assert mitm.status_code == 502
        assert mitm.json()["error"]["code"] == "upstream_unreachable"


def test_chaining_works_behind_a_tls_listener(
    upstream: FakeUpstream, target: TunnelTarget, tmp_path: Path
) -> None:
    listener_ca = trustme.CA()
    leaf = listener_ca.issue_cert("127.0.0.1")
    cert, key, ca = tmp_path / "listener.pem", tmp_path / "listener-key.pem", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    listener_ca.cert_pem.write_to_path(str(ca))
    with (
        CorporateProxy() as corporate,
        DaemonProcess(
            daemon_config(
                upstream,
                upstream_proxy=corporate.url(),
                tls_cert_file=cert,
                tls_key_file=key,
                allowed_private_cidrs=["127.0.0.1/32"],
                allowed_ports=[443, target.port],
            )
        ) as daemon,
    ):
        proxy = httpx.Proxy(daemon.proxy_url, ssl_context=trust(ca))
        with httpx.Client(
            proxy=proxy, verify=trust(target.ca_pem_path), trust_env=False, timeout=10
        ) as client:
            assert client.get(f"{target.url}/behind-tls").content == TUNNEL_TARGET_BODY
        with httpx.Client(
            proxy=proxy, verify=trust(daemon.ca_cert_path), trust_env=False, timeout=10
        ) as client:
            assert (
                client.post("https://api.openai.com/v1/chat/completions", json=CHAT).status_code
                == 200
            )
    assert corporate.asked == [
        Asked("CONNECT", target.address, None),
        Asked("CONNECT", f"127.0.0.1:{upstream.port}", None),
    ]


@contextlib.contextmanager
def stalled_proxy(answer: str) -> Iterator[int]:
    """The port of a proxy that never opens a tunnel. ``unanswered``: its accept queue is full
    (backlog 0, one connection queued), so a connect to it is never answered; ``silent``: it
    accepts the connection and never answers the CONNECT."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    held: list[socket.socket] = []
    if answer == "unanswered":
        held.append(socket.create_connection(("127.0.0.1", port)))
    else:

        def accept() -> None:
            with contextlib.suppress(OSError):
                while True:
                    held.append(listener.accept()[0])

        threading.Thread(target=accept, daemon=True).start()
    try:
        yield port
    finally:
        listener.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("answer", ["unanswered", "silent"])
def test_a_proxy_that_never_opens_the_tunnel_gets_the_client_a_504_after_the_connect_timeout(
    upstream: FakeUpstream, answer: str
) -> None:
    """Through a corporate proxy mitmproxy dials the proxy, not the target: the target's
    connection never started its connect, so ``upstream_connect_timeout`` never ended the dial
    and the client waited for ever (a silent proxy) or two minutes (an unanswered connect). Now
    the proxy connection's start counts, and that connection is closed (``_dialled``)."""
    with stalled_proxy(answer) as port:
        config = daemon_config(
            upstream,
            upstream_proxy=f"http://127.0.0.1:{port}",
            allowed_private_cidrs=["127.0.0.1/32"],
            upstream_connect_timeout="1s",
        )
        with DaemonProcess(config) as daemon:
            started = time.monotonic()
            with daemon.httpx_client(timeout=15) as client:
                response = client.post("https://api.openai.com/v1/chat/completions", json=CHAT)
            waited = time.monotonic() - started
            logs = daemon.logs()
    assert waited < 6, f"the client waited {waited:.1f}s on a proxy that never opened a tunnel"
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert CENTRAL_KEY not in response.text
    assert "no upstream connection within 1s: timed out" in logs, logs[-2000:]
    assert "Traceback" not in logs


@pytest.mark.parametrize("answer", ["unanswered", "silent"])
def test_a_tunnel_through_a_proxy_that_never_opens_it_gets_504_after_the_connect_timeout(
    upstream: FakeUpstream, target: TunnelTarget, answer: str
) -> None:
    """A tunneled CONNECT through a corporate proxy waited on the proxy without bound: two
    minutes when its connect is never answered, for ever when it accepts and never answers the
    CONNECT. ``upstream_connect_timeout`` now covers the dial and the proxy's answer: the
    proxy connection is closed, the client gets a bare 504, and the reason is in the log."""
    with stalled_proxy(answer) as port:
        config = daemon_config(
            upstream,
            upstream_proxy=f"http://127.0.0.1:{port}",
            allowed_private_cidrs=["127.0.0.1/32"],
            allowed_ports=[443, target.port],
            upstream_connect_timeout="1s",
        )
        with DaemonProcess(config) as daemon:
            started = time.monotonic()
            response = daemon.raw_connect(target.address)
            waited = time.monotonic() - started
            logs = daemon.logs()
    assert waited < 6, f"the client waited {waited:.1f}s on a proxy that never opened a tunnel"
    assert (response.status_code, response.body) == (504, b"Gateway Timeout")
    assert f"tunnel to {target.address} failed: no connection within 1s: timed out" in logs
    assert f"did not open a tunnel to {target.address}: no answer within 1s: timed out" in logs
    assert "Traceback" not in logs


@contextlib.contextmanager
def endless_proxy(answer: str) -> Iterator[int]:
    """The port of a proxy whose answer to CONNECT never ends: ``headers``, a 200 followed by
    header lines without end; ``status_line``, a status line without end. It writes as fast as
    it is read, until the connection is closed."""
    first = b"HTTP/1.1 200 OK\r\n" if answer == "headers" else b"HTTP/1.1 200 OK"
    filler = b"X-Filler: " + b"a" * 8000 + b"\r\n" if answer == "headers" else b"a" * 8000

    with serving(endless(first, filler)) as port:
        yield port


@pytest.mark.parametrize("answer", ["headers", "status_line"])
def test_a_proxy_answer_to_connect_that_never_ends_is_refused_at_a_bound(
    upstream: FakeUpstream, target: TunnelTarget, answer: str
) -> None:
    """mitmproxy buffered a corporate proxy's answer to CONNECT until its blank line: a proxy
    sending one without end grew the daemon by gigabytes until upstream_connect_timeout cut it
    (30s by default). The answer's head is now bounded: past it the tunnel fails at once, a 502
    for a tunneled CONNECT and a provider-shaped 502 for a MITM'd request."""
    with endless_proxy(answer) as port:
        config = daemon_config(
            upstream,
            upstream_proxy=f"http://127.0.0.1:{port}",
            allowed_private_cidrs=["127.0.0.1/32"],
            allowed_ports=[443, target.port],
        )
        with DaemonProcess(config) as daemon:
            started = time.monotonic()
            tunnel = daemon.raw_connect(target.address)
            with daemon.httpx_client(timeout=40) as client:
                chat = client.post("https://api.openai.com/v1/chat/completions", json=CHAT)
            waited = time.monotonic() - started
            logs = daemon.logs()
    assert waited < 15, f"the answers took {waited:.1f}s: the proxy's answer was not cut off"
    assert (tunnel.status_code, tunnel.body) == (502, b"Bad Gateway")
    assert chat.status_code == 502, chat.text
    assert chat.json()["error"]["code"] == "upstream_unreachable"
    assert "answer to CONNECT over 65536 bytes" in logs, logs[-2000:]
    assert "Traceback" not in logs


def plain_request(daemon: DaemonProcess, destination: str) -> bytes:
    """The daemon's answer (status line and body) to ``GET http://destination/`` on a socket."""
    with socket.create_connection((daemon.proxy_host, daemon.proxy_port), timeout=20) as sock:
        sock.sendall(f"GET http://{destination}/ HTTP/1.1\r\nHost: {destination}\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return status_line + b" | " + rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("via", ["direct", "proxy"])
def test_a_plain_http_request_whose_connect_is_never_answered_gets_504_after_the_timeout(
    upstream: FakeUpstream, via: str
) -> None:
    """A plain-HTTP proxy request's dial had no bound of ours: a connect nobody answers, to the
    destination or to the corporate proxy, held the client for the system's two minutes of
    retries. It is held to upstream_connect_timeout like a tunnel's, and answered 504."""
    with stalled_proxy("unanswered") as port:
        proxied = {"upstream_proxy": f"http://127.0.0.1:{port}"} if via == "proxy" else {}
        destination = "127.0.0.1:8080" if via == "proxy" else f"127.0.0.1:{port}"
        config = daemon_config(
            upstream,
            allowed_private_cidrs=["127.0.0.1/32"],
            allowed_ports=[8080, port],
            upstream_connect_timeout="1s",
            **proxied,
        )
        with DaemonProcess(config) as daemon:
            started = time.monotonic()
            answer = plain_request(daemon, destination)
            waited = time.monotonic() - started
            logs = daemon.logs()
    assert waited < 6, f"the client waited {waited:.1f}s on a connect nobody answered"
    assert answer == (
        b"HTTP/1.1 504 Gateway Timeout | The proxy could not connect to the destination in time.\n"
    )
    assert "answered 504 (connect_failed) no connection within 1s: timed out" in logs, logs[-2000:]
    assert "Traceback" not in logs


@contextlib.contextmanager
def echoing_proxy(answer: str) -> Iterator[int]:
    """The port of a proxy that quotes the ``Proxy-Authorization`` it got in its answer to
    CONNECT: ``refusal``, in the reason phrase of a 407; ``garbage``, in a status line that is
    not HTTP (which mitmproxy quotes in its error)."""

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            auth = read_head_field(conn, b"proxy-authorization")
            status = b"HTTP/1.1 407 denied " if answer == "refusal" else b"HTTX/1.1 200 "
            conn.sendall(status + auth + b"\r\nContent-Length: 0\r\n\r\n")
            conn.recv(1)

    with serving(serve) as port:
        yield port


@pytest.mark.parametrize("answer", ["refusal", "garbage"])
def test_proxy_credentials_quoted_by_the_proxy_never_reach_the_log(
    upstream: FakeUpstream, target: TunnelTarget, answer: str
) -> None:
    """mitmproxy's error for a proxy's refusal quotes its reason phrase, and for an answer that
    is not HTTP its status line: a proxy that echoes the Proxy-Authorization it got put the
    proxy credentials in three log lines per tunnel. They are redacted from that error."""
    with echoing_proxy(answer) as port:
        config = daemon_config(
            upstream,
            upstream_proxy=f"http://svc-ai:s3cret-pw@127.0.0.1:{port}",
            allowed_private_cidrs=["127.0.0.1/32"],
            allowed_ports=[443, target.port],
            log_level="debug",
        )
        with DaemonProcess(config) as daemon:
            tunnel = daemon.raw_connect(target.address)
            chat = chat_through(daemon)
            logs = daemon.logs()
    refused = b": upstream proxy refused the connection: 407 Proxy Authentication Required"
    assert (tunnel.status_code, tunnel.body) == (
        502,
        b"Bad Gateway" + (refused if answer == "refusal" else b""),
    )
    assert chat.json()["error"]["code"] == "upstream_unreachable"
    assert "upstream proxy did not open a tunnel" in logs
    for secret in ("s3cret-pw", base64.b64encode(b"svc-ai:s3cret-pw").decode()):
        assert secret not in logs, [line for line in logs.splitlines() if secret in line]


@contextlib.contextmanager
def refusing_proxy(status: bytes, *, quote: bool = True, padding: int = 0) -> Iterator[int]:
    """The port of a proxy that refuses every request (a CONNECT or an absolute-form request)
    with ``status`` and an HTML error page quoting the request head it got, the way proxies'
    error pages do, ``Proxy-Authorization`` included, in a header field and in the body.
    ``quote=False``: the page quotes nothing (as a destination's own error page relayed by the
    proxy); ``padding``: bytes of filler before the page's text."""

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head and (data := conn.recv(65536)):
                head += data
            head = head.partition(b"\r\n\r\n")[0] if quote else b"(nothing quoted)"
            auth = next(
                (
                    v.strip()
                    for k, _, v in (line.partition(b":") for line in head.split(b"\r\n"))
                    if k.lower() == b"proxy-authorization"
                ),
                b"-",
            )
            body = (
                b"<html><body>"
                + b"." * padding
                + b"<h1>Access denied</h1><pre>"
                + head
                + b"</pre></body></html>"
            )
            conn.sendall(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: text/html\r\nX-Request-Auth: "
                + auth
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            conn.recv(1)

    with serving(serve) as port:
        yield port


def raw_exchange(daemon: DaemonProcess, request: bytes) -> bytes:
    """Everything the daemon sends back, until it closes, on a connection that sent
    ``request``."""
    with socket.create_connection((daemon.proxy_host, daemon.proxy_port), timeout=20) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("status", [b"403 Forbidden", b"502 Bad Gateway", b"503 Busy"])
def test_a_proxy_error_page_quoting_its_credentials_never_reaches_the_client(
    upstream: FakeUpstream, target: TunnelTarget, status: bytes
) -> None:
    """A corporate proxy's error page may quote the request it refused, Proxy-Authorization
    included. Whatever the path (a tunnel, a MITM'd request, a plain-HTTP request), the client
    gets the daemon's own short error naming the proxy's status, never the proxy's head or
    body; the log names the status and never the credentials."""
    secrets = ("s3cret-pw", base64.b64encode(b"svc-ai:s3cret-pw").decode())
    code = int(status.split()[0])
    with refusing_proxy(status) as port:
        config = daemon_config(
            upstream,
            upstream_proxy=f"http://svc-ai:s3cret-pw@127.0.0.1:{port}",
            allowed_private_cidrs=["127.0.0.1/32"],
            allowed_ports=[443, 8080, target.port],
            log_level="debug",
        )
        with DaemonProcess(config) as daemon:
            connect = daemon.raw_connect(target.address)
            chat = chat_through(daemon)
            plain = raw_exchange(
                daemon,
                b"GET http://127.0.0.1:8080/page HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                b"Connection: close\r\n\r\n",
            )
            daemon.wait_for(lambda: "plain-HTTP request to 127.0.0.1:8080" in daemon.logs())
            logs = daemon.logs()
    tunnel = str(connect.headers).encode() + connect.body
    mitm = str(chat.headers).encode() + chat.content
    for answer in (tunnel, mitm, plain):
        assert b"Access denied" not in answer and b"X-Request-Auth" not in answer, answer
        for secret in secrets:
            assert secret.encode() not in answer, answer
    for secret in secrets:
        assert secret not in logs, [line for line in logs.splitlines() if secret in line]
    assert connect.status_code == 502, connect
    assert f"upstream proxy refused the connection: {code}".encode() in connect.body, connect
    assert chat.status_code == 502, chat.text
    assert chat.json()["error"]["code"] == "upstream_unreachable"
    assert f"upstream proxy refused the connection: {code}" in chat.json()["error"]["message"]
    assert plain.startswith(b"HTTP/1.1 502 "), plain
    assert f"upstream proxy refused the request: {code}".encode() in plain, plain
    assert f"refused a plain-HTTP request to 127.0.0.1:8080: {code}" in logs


@pytest.mark.parametrize("padding", [0, 200_000])
def test_a_non_2xx_answer_to_a_plain_request_that_quotes_no_credentials_is_relayed(
    upstream: FakeUpstream, padding: int
) -> None:
    """The proxy relays the destination's own answers on the same connection: a 404 page that
    quotes no credentials is the client's to read, whole, however long (held back and searched
    up to a bound, then relayed)."""
    with refusing_proxy(b"404 Not Found", quote=False, padding=padding) as port:
        config = daemon_config(
            upstream,
            upstream_proxy=f"http://svc-ai:s3cret-pw@127.0.0.1:{port}",
            allowed_private_cidrs=["127.0.0.1/32"],
            allowed_ports=[443, 8080],
        )
        with DaemonProcess(config) as daemon:
            plain = raw_exchange(
                daemon,
                b"GET http://127.0.0.1:8080/page HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                b"Connection: close\r\n\r\n",
            )
    head, _, body = plain.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n"), head
    assert b"X-Request-Auth: -" in head
    assert body == (
        b"<html><body>"
        + b"." * padding
        + b"<h1>Access denied</h1><pre>(nothing quoted)</pre></body></html>"
    )
