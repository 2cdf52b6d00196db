"""End to end: transport features — the proxy listener over TLS, large request bodies, chunked
non-SSE streams."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from tests.fakes.tls import TunnelTarget
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, trust


@pytest.fixture(scope="module")
def listener_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(CA pem, listener cert chain pem, listener key pem) for 127.0.0.1 / localhost."""
    directory = tmp_path_factory.mktemp("listener-tls")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    paths = directory / "ca.pem", directory / "listener.pem", directory / "listener-key.pem"
    ca.cert_pem.write_to_path(str(paths[0]))
    leaf.cert_chain_pems[0].write_to_path(str(paths[1]))
    leaf.private_key_pem.write_to_path(str(paths[2]))
    return paths


@pytest.fixture(scope="module")
def tls_daemon(
    upstream: FakeUpstream, target: TunnelTarget, listener_ca: tuple[Path, Path, Path]
) -> Iterator[DaemonProcess]:
    _, cert, key = listener_ca
    config = {
        "upstream_ca_file": upstream.ca_pem_path,
        "tls_cert_file": cert,
        "tls_key_file": key,
        "auth": "none",
        "allowed_private_cidrs": ["127.0.0.0/8"],
        "allowed_ports": [443, target.port],
    }
    with DaemonProcess(config) as d:
        d.edit_provider("openai", upstream.base_url, "k-central")
        d.reload_and_wait()
        yield d


def https_proxy(daemon: DaemonProcess) -> str:
    return f"https://127.0.0.1:{daemon.proxy_port}"


def test_https_proxy_url_mitm_with_httpx(
    tls_daemon: DaemonProcess, listener_ca: tuple[Path, Path, Path], upstream: FakeUpstream
) -> None:
    proxy = httpx.Proxy(https_proxy(tls_daemon), ssl_context=trust(listener_ca[0]))
    with httpx.Client(
        proxy=proxy, verify=trust(tls_daemon.ca_cert_path), trust_env=False
    ) as client:
        response = client.post(
            "https://api.openai.com/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.status_code == 200
    assert "x-aibridge-request-id" in response.headers
    assert upstream.requests[-1].headers["authorization"] == "Bearer k-central"


def test_https_proxy_url_tunnel_with_httpx(
    tls_daemon: DaemonProcess, listener_ca: tuple[Path, Path, Path], target: TunnelTarget
) -> None:
    proxy = httpx.Proxy(https_proxy(tls_daemon), ssl_context=trust(listener_ca[0]))
    with httpx.Client(proxy=proxy, verify=trust(target.ca_pem_path), trust_env=False) as client:
        response = client.get(f"{target.url}/through-tls-listener")
    assert response.status_code == 200
    assert "x-aibridge-request-id" not in response.headers


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_https_proxy_url_with_curl(
    tls_daemon: DaemonProcess, listener_ca: tuple[Path, Path, Path]
) -> None:
    result = subprocess.run(
        [
            "curl", "-sS", "--fail-with-body",
            "-x", https_proxy(tls_daemon), "--proxy-cacert", str(listener_ca[0]),
            "--cacert", str(tls_daemon.ca_cert_path),
            "https://api.openai.com/v1/models",
        ],
        capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"object"' in result.stdout


@pytest.mark.parametrize("kind", ["connect", "plain"])
def test_a_cleartext_proxy_request_to_a_tls_listener_is_refused(
    tls_daemon: DaemonProcess, target: TunnelTarget, kind: str
) -> None:
    """An ``http://`` proxy URL left in place after the listener moved to TLS sent its proxy
    token in cleartext, and was served: nothing told the client or the admin. Now it is
    refused with 400 before anything reads it (no 407 asking for the token either)."""
    with httpx.Client(proxy=f"http://127.0.0.1:{tls_daemon.proxy_port}", trust_env=False) as client:
        if kind == "connect":
            with pytest.raises(httpx.ProxyError, match="400"):
                client.get(f"{target.url}/never-reached")
        else:
            response = client.get(f"http://127.0.0.1:{target.port}/never-reached")
            assert response.status_code == 400
            assert (
                response.text == "This proxy listener accepts TLS only: use an https:// proxy URL."
            )
    assert not any(r.path == "/never-reached" for r in target.requests)
    assert "refused a cleartext proxy request: this listener serves TLS" in tls_daemon.logs()


def test_listener_presents_the_operator_certificate(
    tls_daemon: DaemonProcess, listener_ca: tuple[Path, Path, Path]
) -> None:
    import socket
    import ssl

    from tests.fakes.tls import issued_by

    context = trust(listener_ca[0])
    with (
        socket.create_connection(("127.0.0.1", tls_daemon.proxy_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.selected_alpn_protocol() in (None, "http/1.1")
        assert issued_by(tls.getpeercert(binary_form=True), listener_ca[0])
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    assert isinstance(context, ssl.SSLContext)


def test_unreadable_listener_key_refuses_to_start(
    tmp_path: Path, listener_ca: tuple[Path, Path, Path]
) -> None:
    other = trustme.CA().issue_cert("127.0.0.1")
    wrong_key = tmp_path / "wrong-key.pem"
    other.private_key_pem.write_to_path(str(wrong_key))
    daemon = DaemonProcess(
        {"tls_cert_file": listener_ca[1], "tls_key_file": wrong_key}, ready_timeout=10
    )
    try:
        with pytest.raises(Exception):  # noqa: B017 - the daemon must not come up
            daemon.start()
        assert "tls_key_file" in daemon.logs()
    finally:
        daemon.close()


# --- WebSocket ----------------------------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_websocket_is_routed_with_auth_injected_and_relayed_both_ways(tmp_path: Path) -> None:
    from websockets.sync.client import connect

    from tests.fakes.websocket import FakeWebSocketUpstream

    with (
        FakeWebSocketUpstream() as ws_upstream,
        DaemonProcess({"upstream_ca_file": ws_upstream.ca_pem_path}) as d,
    ):
        d.edit_provider("openai", ws_upstream.base_url, "k-ws")
        d.reload_and_wait()
        token = d.create_token("codex-user")
        with connect(
            "wss://api.openai.com/v1/responses?model=gpt-5",
            proxy=d.proxy_url_for(token),
            ssl=trust(d.ca_cert_path),
            additional_headers={
                "Authorization": f"Bearer {token}",
                "OpenAI-Beta": "responses_websockets=2026-02-06",
            },
            max_size=None,
        ) as ws:
            for text in ("one", "two", "three"):
                ws.send(text)
                assert ws.recv(timeout=10) == f"echo:{text}"
            # Usage arrives in server messages, one per response; the session's record sums them.
            completed = '{"type":"response.completed","response":{"model":"gpt-5","usage":{"input_tokens":7,"output_tokens":5}}}'
            for _ in range(2):
                ws.send(completed)
                assert ws.recv(timeout=10) == f"echo:{completed}"
            assert d.metric("inflight_mitm_requests", provider="openai") == 1
            # Large messages must not pile up in the daemon: mitmproxy would keep every one.
            before = _rss_bytes(d.pid)
            blob = b"x" * (1024 * 1024)
            for _ in range(100):
                ws.send(blob)
                assert len(ws.recv(timeout=10)) == len(blob) + 5
            grown = _rss_bytes(d.pid) - before
            assert grown < 60 * 1024 * 1024, (
                f"daemon RSS grew by {grown / 2**20:.0f} MiB over 200 MiB relayed"
            )
        assert ws_upstream.closed.wait(10)
        (upgrade,) = ws_upstream.upgrades
        assert upgrade.path == "/v1/responses?model=gpt-5"
        assert upgrade.headers["authorization"] == "Bearer k-ws"
        assert upgrade.headers["openai-beta"] == "responses_websockets=2026-02-06"
        assert token not in str(upgrade.headers)
        d.wait_for(
            lambda: d.metric("inflight_mitm_requests", provider="openai") == 0,
            message="session ended",
        )
        assert d.metric("mitm_responses_total", provider="openai", code="101") == 1
        assert d.metric("mitm_requests_total", provider="openai") == 1
        (record,) = d.wait_for(
            lambda: json.loads(d.cli("interceptions", "list", check=True).stdout),
            message="session recorded",
        )
        assert (record["path"], record["status"], record["initiator"]) == (
            "/v1/responses",
            101,
            "codex-user",
        )
        assert (record["input_tokens"], record["output_tokens"], record["model"]) == (
            14,
            10,
            "gpt-5",
        )


# --- connection turnover ------------------------------------------------------------------------


async def _json_app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    """Answers every request with a small chat completion; hypercorn retires its connections."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    body = b'{"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}'
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def retiring_upstream(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An upstream that retires each connection after 5 requests: GOAWAY on h2, close on 1.1."""
    from tests.fakes.tls import BackgroundServer, TlsIdentity

    identity = TlsIdentity.create(tmp_path)
    server = BackgroundServer(
        _json_app,
        identity=identity,
        name="retiring-upstream",
        options={"keep_alive_max_requests": 5},
    )
    server.start()
    try:
        yield server.port, identity.ca_pem_path
    finally:
        # Streams the client abandoned may keep hypercorn busy; the thread is a daemon.
        with contextlib.suppress(RuntimeError):
            server.stop(timeout=3)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_h2_goaway_turnover_never_reaches_the_client(retiring_upstream: tuple[int, Path]) -> None:
    """curl multiplexes 200 requests over HTTP/2 (20 at a time); the upstream retires each
    connection after 5 requests (GOAWAY on h2, close on HTTP/1.1). The proxy speaks HTTP/1.1
    upstream from a pool, so retirement is a clean close between requests, never a lost stream."""
    port, ca = retiring_upstream
    with DaemonProcess({"upstream_ca_file": ca, "auth": "none", "log_level": "debug"}) as d:
        d.edit_provider("openai", f"https://127.0.0.1:{port}/v1", "k")
        d.reload_and_wait()
        command = [
            "curl", "-sS", "--http2", "--parallel", "--parallel-max", "20",
            "-x", d.proxy_url, "--cacert", str(d.ca_cert_path),
            "-H", "content-type: application/json", "-d", "{}", "-w", "%{http_code} %{http_version}\n",
        ]  # fmt: skip
        for _ in range(200):
            command += ["-o", "/dev/null", "https://api.openai.com/v1/chat/completions"]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"}
        )
        outcomes = result.stdout.split()
        assert outcomes.count("200") == 200, (
            result.stderr[-500:],
            {o: outcomes.count(o) for o in set(outcomes)},
        )
        assert outcomes.count("2") == 200  # every exchange was HTTP/2 to the proxy
        # The turnover did happen: the upstream saw at least 200 / 5 connections.
        assert d.logs().count("server connect 127.0.0.1") >= 40


def test_http1_keepalive_turnover_never_reaches_the_client(
    retiring_upstream: tuple[int, Path],
) -> None:
    """Concurrent HTTP/1.1 clients; the upstream closes each connection after 5 requests."""
    import asyncio

    port, ca = retiring_upstream
    with DaemonProcess({"upstream_ca_file": ca, "auth": "none"}) as d:
        d.edit_provider("openai", f"https://127.0.0.1:{port}/v1", "k")
        d.reload_and_wait()

        async def run() -> list[int]:
            async with httpx.AsyncClient(
                proxy=d.proxy_url, verify=trust(d.ca_cert_path), trust_env=False, timeout=20
            ) as client:
                semaphore = asyncio.Semaphore(20)

                async def one() -> int:
                    async with semaphore:
                        response = await client.post(
                            "https://api.openai.com/v1/chat/completions",
                            json={"model": "m", "messages": []},
                        )
                        return response.status_code

                return await asyncio.gather(*(one() for _ in range(200)))

        statuses = asyncio.run(run())
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}


# --- request bodies -----------------------------------------------------------------------------


def test_large_request_bodies_pass_and_the_limit_is_configurable(upstream: FakeUpstream) -> None:
    big = "x" * (6 * 1024 * 1024)  # a coding agent's few MB of context
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": big}]}
    with DaemonProcess(
        {"upstream_ca_file": upstream.ca_pem_path, "auth": "none", "max_request_body": "8MiB"}
    ) as d:
        d.edit_provider("openai", upstream.base_url, "k")
        d.reload_and_wait()
        upstream.reset()
        with d.httpx_client(timeout=60) as client:
            ok = client.post("https://api.openai.com/v1/chat/completions", json=body)
            assert ok.status_code == 200
            (request,) = upstream.requests
            assert request.json()["messages"][0]["content"] == big
            too_big = client.post(
                "https://api.openai.com/v1/chat/completions",
                json={**body, "messages": [{"role": "user", "content": big + big}]},
            )
        assert too_big.status_code == 413
        assert too_big.json()["error"]["code"] == "request_too_large"
        assert len(upstream.requests) == 1  # the oversized request never left the proxy


# --- client aborts over HTTP/2 ------------------------------------------------------------------


def _h2_stream(daemon: DaemonProcess, stream_name: str):  # type: ignore[no-untyped-def]
    """A raw HTTP/2 client through the proxy: opens one SSE request, returns (socket, h2 conn)."""
    import json as json_module
    import ssl

    import h2.config
    import h2.connection

    from tests.harness import open_tls_tunnel

    context = ssl.create_default_context(cafile=str(daemon.ca_cert_path))
    context.set_alpn_protocols(["h2"])
    sock = open_tls_tunnel(daemon.proxy_host, daemon.proxy_port, "api.openai.com:443", context)
    assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    body = json_module.dumps({"model": "m", "stream": True, "messages": []}).encode()
    conn.send_headers(
        1,
        [
            (":method", "POST"), (":path", "/v1/chat/completions"), (":scheme", "https"),
            (":authority", "api.openai.com"), ("content-type", "application/json"),
            ("x-fake-stream-id", stream_name), ("x-fake-events", "5000"), ("x-fake-delay-ms", "2"),
        ],
    )  # fmt: skip
    conn.send_data(1, body, end_stream=True)
    sock.sendall(conn.data_to_send())
    return sock, conn


def _read_until_data(sock, conn) -> None:  # type: ignore[no-untyped-def]
    import h2.events

    while True:
        events = conn.receive_data(sock.recv(65536))
        sock.sendall(conn.data_to_send() or b"")
        if any(isinstance(e, h2.events.DataReceived) for e in events):
            return


@pytest.fixture
def stall_daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    with DaemonProcess(
        {"upstream_ca_file": upstream.ca_pem_path, "auth": "none", "stream_stall_timeout": "2s"}
    ) as d:
        d.edit_provider("openai", upstream.base_url, "k")
        d.reload_and_wait()
        yield d


def test_h2_stream_reset_by_the_client_cancels_the_upstream(
    stall_daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    state = upstream.stream("h2-reset")
    sock, conn = _h2_stream(stall_daemon, "h2-reset")
    with sock:
        _read_until_data(sock, conn)
        conn.reset_stream(1, error_code=8)  # CANCEL; the connection stays open
        sock.sendall(conn.data_to_send())
        assert state.wait_finished(timeout=10) == "aborted"
        stall_daemon.wait_for(
            lambda: stall_daemon.metric("inflight_mitm_requests", provider="openai") == 0,
            message="gauge 0",
        )


def test_h2_stream_abandoned_without_reset_is_cancelled(
    stall_daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    """The client reads one event, then neither reads nor resets: its window stays shut. The
    connection stays open throughout, so only the stall watch can notice."""
    state = upstream.stream("h2-abandoned")
    sock, conn = _h2_stream(stall_daemon, "h2-abandoned")
    with sock:
        _read_until_data(sock, conn)
        assert state.wait_finished(timeout=30) == "aborted"
        assert state.sent < 5000
        stall_daemon.wait_for(
            lambda: stall_daemon.metric("inflight_mitm_requests", provider="openai") == 0,
            message="gauge 0",
        )
    assert "client stopped reading a stream" in stall_daemon.logs()
