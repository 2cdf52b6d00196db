"""End to end: the real daemon, real TLS, real clients (openai and anthropic SDKs, httpx, curl)
against local fake upstreams. Nothing leaves loopback."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fakes.raw_http import serving
from tests.fakes.tls import TunnelTarget, issued_by
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, basic_auth, open_tls_tunnel, trust

CENTRAL_OPENAI_KEY = "sk-central-openai"
CENTRAL_ANTHROPIC_KEY = "sk-ant-central"
REQUEST_ID = "x-aibridge-request-id"

pytestmark = pytest.mark.usefixtures("clean_upstream")


@pytest.fixture(scope="module")
def daemon(upstream: FakeUpstream, target: TunnelTarget) -> Iterator[DaemonProcess]:
    config = {
        "upstream_ca_file": upstream.ca_pem_path,
        "allowed_private_cidrs": ["127.0.0.0/8"],
        "allowed_ports": [443, target.port],
        "reload_interval": "2s",
        "log_level": "debug",
    }
    with DaemonProcess(config) as d:
        d.edit_provider("openai", upstream.base_url, CENTRAL_OPENAI_KEY)
        d.edit_provider("anthropic", upstream.origin, CENTRAL_ANTHROPIC_KEY)
        d.reload_and_wait()
        yield d


def assert_no_secret_upstream(upstream: FakeUpstream, *secrets: str) -> None:
    for request in upstream.requests:
        flat = json.dumps([list(pair) for pair in request.headers.items()]) + request.path
        for secret in secrets:
            assert secret not in flat, f"{secret!r} reached the upstream"


# --- SDKs, central keys and BYOK ----------------------------------------------------------------


def test_openai_sdk_central_key_is_injected(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    client = daemon.openai_client(token)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert raw.headers[REQUEST_ID]
    (request,) = upstream.requests
    assert request.method == "POST"
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {CENTRAL_OPENAI_KEY}"
    assert request.json()["model"] == "gpt-4o"
    assert_no_secret_upstream(upstream, token, "aibridgeproxyd")


def test_openai_sdk_stream_with_the_proxy_token_as_api_key(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    client = daemon.openai_client(token, api_key=token)
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None
    (request,) = upstream.requests
    assert request.headers["authorization"] == f"Bearer {CENTRAL_OPENAI_KEY}"
    assert_no_secret_upstream(upstream, token)


def test_openai_sdk_byok_key_passes_through(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    client = daemon.openai_client(token, api_key="sk-user-own-key")
    client.embeddings.create(model="text-embedding-3-small", input="hello")
    (request,) = upstream.requests
    assert request.path == "/v1/embeddings"
    assert request.headers["authorization"] == "Bearer sk-user-own-key"
    assert_no_secret_upstream(upstream, token)


def test_anthropic_sdk_central_key_non_stream_and_stream(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    client = daemon.anthropic_client(token)
    raw = client.messages.with_raw_response.create(
        model="claude-sonnet-4-6", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().content[0].text
    assert raw.headers[REQUEST_ID]
    with client.messages.stream(
        model="claude-sonnet-4-6", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        streamed = "".join(stream.text_stream)
    assert streamed
    first, second = upstream.requests
    for request in (first, second):
        assert request.path == "/v1/messages"
        assert request.headers["x-api-key"] == CENTRAL_ANTHROPIC_KEY
        assert "authorization" not in request.headers
        assert request.headers["anthropic-version"]
    assert second.json()["stream"] is True
    assert_no_secret_upstream(upstream, token, "aibridgeproxyd")


@pytest.mark.parametrize(
    "credentials",
    [{"api_key": "sk-ant-user-key"}, {"auth_token": "user-oauth-token"}],
    ids=["api-key", "oauth-token"],
)
def test_anthropic_sdk_byok_passes_through(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream, credentials: dict[str, str]
) -> None:
    # The current SDK sends either credential as `Authorization: Bearer`.
    client = daemon.anthropic_client(token, **credentials)
    client.messages.create(
        model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    (request,) = upstream.requests
    assert request.headers["authorization"] == f"Bearer {next(iter(credentials.values()))}"
    assert "x-api-key" not in request.headers


def test_x_api_key_byok_passes_through(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    """Claude Code and older SDKs send the key as x-api-key."""
    with daemon.httpx_client(token) as client:
        response = client.post(
            "https://api.anthropic.com/v1/messages",
            headers={"x-api-key": "sk-ant-user-key", "anthropic-version": "2023-06-01"},
            json={
                "model": "claude-haiku-4-5",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
    assert response.status_code == 200
    (request,) = upstream.requests
    assert request.headers["x-api-key"] == "sk-ant-user-key"


def test_anthropic_sdk_bearer_proxy_token_means_central(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    client = daemon.anthropic_client(token, auth_token=token)
    client.messages.create(
        model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    (request,) = upstream.requests
    assert request.headers["x-api-key"] == CENTRAL_ANTHROPIC_KEY
    assert "authorization" not in request.headers
    assert_no_secret_upstream(upstream, token)


def test_sdks_honour_https_proxy_and_ssl_cert_file_from_the_environment(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The real user path: no code change, only HTTPS_PROXY and the CA in the environment."""
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(
            """
            import anthropic, openai
            o = openai.OpenAI(api_key="aibridgeproxyd", max_retries=0)
            print(o.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content)
            a = anthropic.Anthropic(api_key="aibridgeproxyd", max_retries=0)
            print(a.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=[{"role": "user", "content": "hi"}]).content[0].text)
            """
        )
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HTTPS_PROXY": daemon.proxy_url_for(token),
        "SSL_CERT_FILE": str(daemon.ca_cert_path),
    }
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 2
    assert [r.path for r in upstream.requests] == ["/v1/chat/completions", "/v1/messages"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_proxy_and_cacert(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    result = subprocess.run(
        [
            "curl", "-sS", "--fail-with-body", "-D", "-",
            "-x", daemon.proxy_url_for(token),
            "--cacert", str(daemon.ca_cert_path),
            "-H", "Authorization: Bearer aibridgeproxyd",
            "https://api.openai.com/v1/models",
        ],
        capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    # -D - prints the CONNECT reply's head, then the response's head, then the body.
    assert REQUEST_ID in result.stdout.lower()
    body = result.stdout.rstrip().splitlines()[-1]
    assert json.loads(body)["object"] == "list"
    (request,) = upstream.requests
    assert request.path == "/v1/models"
    assert request.headers["authorization"] == f"Bearer {CENTRAL_OPENAI_KEY}"


# --- streaming ----------------------------------------------------------------------------------


def test_sse_is_not_buffered(daemon: DaemonProcess, token: str, upstream: FakeUpstream) -> None:
    """The upstream sends event k only after the client has seen event k-1: a buffering proxy
    would deadlock here and the test would time out."""
    events = 6
    stream_state = upstream.gate("not-buffered")
    with (
        daemon.httpx_client(token) as client,
        client.stream(
            "POST",
            "https://api.openai.com/v1/chat/completions",
            json={
                "model": "gpt-4o",
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
            headers={
                "x-fake-stream-id": "not-buffered",
                "x-fake-events": str(events),
                "authorization": "Bearer aibridgeproxyd",
            },
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        seen = 0
        stream_state.release()
        for line in response.iter_lines():
            if line.startswith("data:"):
                seen += 1
                stream_state.release()
    assert seen >= events
    assert stream_state.wait_finished() == "completed"


def test_client_abort_mid_stream_returns_the_inflight_gauge_to_zero(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    stream_state = upstream.gate("abort-me")
    with (
        daemon.httpx_client(token) as client,
        client.stream(
            "POST",
            "https://api.openai.com/v1/chat/completions",
            json={
                "model": "gpt-4o",
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
            headers={
                "x-fake-stream-id": "abort-me",
                "x-fake-events": "50",
                "authorization": "Bearer aibridgeproxyd",
            },
        ) as response,
    ):
        stream_state.release()
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert daemon.metric("inflight_mitm_requests", provider="openai") == 1
    # Leaving both blocks closed the client connection mid-stream. The gate stays shut, so the
    # stream can only finish if the proxy cancels the upstream request.
    assert stream_state.wait_finished(timeout=10) == "aborted"
    daemon.wait_for(
        lambda: daemon.metric("inflight_mitm_requests", provider="openai") == 0,
        message="gauge back to 0",
    )


# --- tunnels, refusals and destinations ---------------------------------------------------------


def test_tunneled_host_presents_its_own_certificate(
    daemon: DaemonProcess, token: str, target: TunnelTarget
) -> None:
    tunneled_before = daemon.metric("connect_sessions_total", type="tunneled") or 0
    with open_tls_tunnel(
        daemon.proxy_host, daemon.proxy_port, target.address, trust(target.ca_pem_path)
    ) as tls:
        assert issued_by(tls.getpeercert(binary_form=True), target.ca_pem_path)
        assert not issued_by(tls.getpeercert(binary_form=True), daemon.ca_cert_path)
    with httpx.Client(
        proxy=daemon.proxy_url, verify=trust(target.ca_pem_path), trust_env=False
    ) as client:
        response = client.get(f"{target.url}/hello")
    assert response.status_code == 200
    assert REQUEST_ID not in response.headers
    assert (daemon.metric("connect_sessions_total", type="tunneled") or 0) == tunneled_before + 2


@pytest.mark.parametrize(
    "proxy_auth",
    [None, basic_auth("not-a-token"), "Basic !!!", "Bearer something"],
    ids=["missing", "unknown", "malformed", "wrong-scheme"],
)
def test_provider_connect_without_a_valid_token_gets_407(
    daemon: DaemonProcess, proxy_auth: str | None
) -> None:
    response = daemon.raw_connect("api.openai.com:443", proxy_auth)
    assert response.status_code == 407
    assert response.headers["proxy-authenticate"] == 'Basic realm="aibridgeproxyd"'


def test_scheme_is_case_insensitive(daemon: DaemonProcess, token: str) -> None:
    auth = basic_auth(token).replace("Basic", "bAsIc")
    assert daemon.raw_connect("api.openai.com:443", auth).status_code == 200


@pytest.mark.parametrize("target_address", ["api.openai.com:22", "example.com:25", "10.0.0.1:8443"])
def test_connect_to_a_port_outside_allowed_ports_gets_403(
    daemon: DaemonProcess, token: str, target_address: str
) -> None:
    response = daemon.raw_connect(target_address, basic_auth(token))
    assert response.status_code == 403


@pytest.mark.parametrize(
    "target_address",
    ["10.1.2.3:443", "169.254.169.254:443", "[::ffff:192.168.0.1]:443", "[fd00::1]:443"],
)
def test_connect_to_a_private_destination_gets_403_forbidden(
    daemon: DaemonProcess, target_address: str
) -> None:
    response = daemon.raw_connect(target_address)
    assert response.status_code == 403
    assert response.body == b"Forbidden: private or reserved destination"


def test_dial_failure_gets_a_bare_502(daemon: DaemonProcess, target: TunnelTarget) -> None:
    # Listening nowhere: the port of a server that has just been stopped.
    with TunnelTarget() as gone:
        port = gone.port
    with DaemonProcess(
        {"allowed_private_cidrs": ["127.0.0.0/8"], "allowed_ports": [port]}
    ) as other:
        response = other.raw_connect(f"127.0.0.1:{port}")
    assert response.status_code == 502
    assert response.body == b"Bad Gateway"


def test_plain_http_proxy_requests_follow_the_tunnel_rules(daemon: DaemonProcess) -> None:
    with (
        TunnelTarget(tls=False) as plain,
        DaemonProcess(
            {"allowed_private_cidrs": ["127.0.0.1/32"], "allowed_ports": [plain.port, 80]}
        ) as other,
        httpx.Client(proxy=other.proxy_url, trust_env=False) as client,
    ):
        assert client.get(f"{plain.url}/hi").status_code == 200
        assert client.get("http://10.9.9.9/").status_code == 403
        assert (
            client.get(
                f"http://127.0.0.1:{plain.port + 1 if plain.port < 65535 else 1}/"
            ).status_code
            == 403
        )


# --- plain-HTTP proxy requests: the destination's time ---------------------------------------

# What the scripted destination answers on each path, before it holds the connection open.
DESTINATION_ANSWERS = {
    b"/silent": b"",
    b"/stalled-stream": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n"
    ),
    b"/stalled-buffer": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n"
        b'{"partial":'
    ),
    b"/ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
    b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
}


@dataclass
class Destination:
    """A destination of plain-HTTP proxy requests on loopback (``DESTINATION_ANSWERS``), and
    the paths of the requests whose connection the proxy closed while it was held open."""

    port: int
    closed_by_proxy: list[bytes]


@pytest.fixture(scope="module")
def destination() -> Iterator[Destination]:
    closed: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head and (data := conn.recv(65536)):
                head += data
            path = head.split(b" ", 2)[1].partition(b"?")[0]
            conn.sendall(DESTINATION_ANSWERS[path])
            if path not in (b"/ok", b"/chunked"):
                while conn.recv(65536):
                    pass  # held until the proxy closes it
                closed.append(path)

    with serving(serve) as port:
        yield Destination(port, closed)


@pytest.fixture(scope="module")
def plain_daemon(destination: Destination) -> Iterator[DaemonProcess]:
    config = {
        "allowed_private_cidrs": ["127.0.0.1/32"],
        "allowed_ports": [destination.port],
        "upstream_response_timeout": "1s",
        "upstream_idle_timeout": "1s",
    }
    with DaemonProcess(config) as d:
        yield d


def test_a_plain_http_request_to_a_silent_destination_gets_504_at_the_response_timeout(
    plain_daemon: DaemonProcess, destination: Destination
) -> None:
    """A destination that accepts a plain-HTTP proxy request and never answers held the client
    for ever: no upstream deadline applied to the listener's requests. It gets a plain 504
    after upstream_response_timeout, the destination's connection is closed, and the client's
    connection serves its next request."""
    secret = "sk-in-the-query-0123456789"
    with httpx.Client(proxy=plain_daemon.proxy_url, trust_env=False, timeout=20) as client:
        started = time.monotonic()
        response = client.get(f"http://127.0.0.1:{destination.port}/silent?key={secret}")
        waited = time.monotonic() - started
        assert (response.status_code, response.text) == (
            504,
            "The destination did not answer in time: no response headers within 1s "
            "(upstream_response_timeout).\n",
        )
        assert waited < 8, f"the client waited {waited:.1f}s"
        assert client.get(f"http://127.0.0.1:{destination.port}/ok").text == "hi"
    plain_daemon.wait_for(lambda: b"/silent" in destination.closed_by_proxy, timeout=10)
    logs = plain_daemon.logs()
    assert (
        "upstream timed out: no response headers within 1s (upstream_response_timeout)" in logs
    ), logs[-2000:]
    assert secret not in logs
    assert "Traceback" not in logs


def test_a_plain_http_answer_stalled_after_its_headers_is_broken_off_at_the_idle_timeout(
    plain_daemon: DaemonProcess, destination: Destination
) -> None:
    """A destination that sends its answer's head and a first chunk, then nothing: the client
    had the chunk and then waited for ever. After upstream_idle_timeout the answer is broken
    off (the client's connection closed), and the destination's connection closed."""
    with httpx.Client(proxy=plain_daemon.proxy_url, trust_env=False, timeout=20) as client:
        started = time.monotonic()
        with client.stream("GET", f"http://127.0.0.1:{destination.port}/stalled-stream") as r:
            assert r.status_code == 200
            chunks = r.iter_raw()
            assert next(chunks) == b"first\n"
            with pytest.raises(httpx.RemoteProtocolError):
                next(chunks)
        waited = time.monotonic() - started
    assert waited < 8, f"the client waited {waited:.1f}s"
    plain_daemon.wait_for(lambda: b"/stalled-stream" in destination.closed_by_proxy, timeout=10)
    logs = plain_daemon.logs()
    assert "upstream timed out: the upstream sent nothing for 1s (upstream_idle_timeout)" in logs
    assert "Traceback" not in logs


def test_a_buffered_plain_http_answer_stalled_mid_body_gets_504_at_the_idle_timeout(
    plain_daemon: DaemonProcess, destination: Destination
) -> None:
    """A small answer with a length is buffered whole before the client gets its head: nothing
    of it went out when the destination stalled, so the client gets the 504."""
    with httpx.Client(proxy=plain_daemon.proxy_url, trust_env=False, timeout=20) as client:
        response = client.get(f"http://127.0.0.1:{destination.port}/stalled-buffer")
    assert (response.status_code, response.text) == (
        504,
        "The destination did not answer in time: the upstream sent nothing for 1s "
        "(upstream_idle_timeout).\n",
    )
    plain_daemon.wait_for(lambda: b"/stalled-buffer" in destination.closed_by_proxy, timeout=10)


# --- admin endpoints ----------------------------------------------------------------------------


def test_ca_endpoint_serves_only_the_certificate(daemon: DaemonProcess) -> None:
    response = daemon.admin_get("/ca-cert.pem")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-pem-file"
    assert response.text.startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" not in response.text
    assert response.text == daemon.cli("ca", "export", check=True).stdout
    assert daemon.cli("ca", "path", check=True).stdout.strip() == str(daemon.ca_cert_path)
    assert oct(daemon.ca_cert_path.with_name("ca-key.pem").stat().st_mode & 0o777) == "0o600"
    assert oct((daemon.data_dir / "aibridgeproxyd.db").stat().st_mode & 0o777) == "0o600"


def test_health_and_readiness(daemon: DaemonProcess) -> None:
    assert daemon.admin_get("/healthz").status_code == 200
    ready = daemon.admin_get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert daemon.admin_get("/nope").status_code == 404


def test_metrics_after_the_scenarios(daemon: DaemonProcess, token: str) -> None:
    """Runs last in this module: the counters reflect everything above."""
    assert (
        daemon.metric(
            "provider_info", provider_name="openai", provider_type="openai", status="enabled"
        )
        == 1
    )
    assert (
        daemon.metric(
            "provider_info", provider_name="anthropic", provider_type="anthropic", status="enabled"
        )
        == 1
    )
    assert (daemon.metric("mitm_requests_total", provider="openai") or 0) >= 6
    assert (daemon.metric("mitm_requests_total", provider="anthropic") or 0) >= 6
    assert daemon.metric("inflight_mitm_requests", provider="openai") == 0
    assert daemon.metric("inflight_mitm_requests", provider="anthropic") == 0
    assert (daemon.metric("mitm_responses_total", code="200", provider="openai") or 0) >= 5
    assert (daemon.metric("connect_sessions_total", type="mitm") or 0) >= 8
    assert daemon.metric("providers_last_reload_success_timestamp_seconds") == pytest.approx(
        daemon.metric("providers_last_reload_timestamp_seconds"), abs=5
    )


# --- lifecycle ----------------------------------------------------------------------------------


def test_a_second_stop_signal_closes_open_streams_without_waiting_for_the_drain(
    upstream: FakeUpstream,
) -> None:
    """The gated stream would hold a 10-minute drain; the second SIGTERM ends it now."""
    config = {"upstream_ca_file": upstream.ca_pem_path, "auth": "none", "drain_timeout": "10m"}
    with DaemonProcess(config) as d:
        d.edit_provider("openai", upstream.base_url, "k")
        d.reload_and_wait()
        state = upstream.gate("second-signal")
        with (
            d.httpx_client() as client,
            client.stream(
                "POST",
                "https://api.openai.com/v1/chat/completions",
                json={"model": "m", "stream": True, "messages": []},
                headers={"x-fake-stream-id": "second-signal", "x-fake-events": "3"},
            ) as response,
        ):
            state.release()
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            d.send_signal(signal.SIGTERM)
            d.wait_for(lambda: d.admin_get("/readyz").status_code == 503)
            d.send_signal(signal.SIGTERM)
            d.wait_for(lambda: d.returncode is not None, timeout=30, message="daemon exits")
            state.open_gate()
        assert d.returncode == 0
        assert "second stop signal" in d.logs()


def test_sigterm_drains_an_open_stream_then_exits(upstream: FakeUpstream) -> None:
    config = {"upstream_ca_file": upstream.ca_pem_path, "auth": "none", "drain_timeout": "20s"}
    with DaemonProcess(config) as d:
        d.edit_provider("openai", upstream.base_url, "k")
        d.reload_and_wait()
        state = upstream.gate("drain")
        with (
            d.httpx_client() as client,
            client.stream(
                "POST",
                "https://api.openai.com/v1/chat/completions",
                json={"model": "m", "stream": True, "messages": []},
                headers={"x-fake-stream-id": "drain", "x-fake-events": "3"},
            ) as response,
        ):
            state.release()
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            d.send_signal(signal.SIGTERM)
            d.wait_for(
                lambda: d.admin_get("/readyz").status_code == 503,
                message="not ready while draining",
            )
            with pytest.raises(httpx.ConnectError):
                httpx.get(d.proxy_url, timeout=2)
            state.open_gate()
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        assert (
            d.wait_for(lambda: d.returncode is not None, message="daemon exits after the drain")
            is not None
        )
        assert d.returncode == 0


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose connects are never answered: its listener's accept queue is full
    (backlog 0, one connection queued and never accepted), so the system drops every SYN."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            yield port


def connecting_to(port: int) -> bool:
    """Whether a TCP connect to ``port`` on loopback is under way (SYN sent, no answer): read
    from Linux's /proc/net/tcp, state 02."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(
        fields[2] == f"0100007F:{port:04X}" and fields[3] == "02"
        for fields in (line.split() for line in lines)
    )


@pytest.mark.parametrize("via", ["direct", "proxy"])
def test_sigterm_answers_a_connect_still_dialing_503(via: str) -> None:
    """A tunnel's CONNECT whose dial had not finished when the drain ended (at once here:
    nothing else in flight) got an EOF: no answer at all, which a client cannot tell from a
    crash. Its dial is failed and it gets a retryable 503 first. Through a corporate proxy the
    dial is the connect to the proxy."""
    with unanswered_port() as port:
        target = f"127.0.0.1:{port}" if via == "direct" else "127.0.0.1:8080"
        config = {
            "allowed_private_cidrs": ["127.0.0.1/32"],
            "allowed_ports": [port, 8080],
            "upstream_connect_timeout": "60s",
            "drain_timeout": "20s",
            **({"upstream_proxy": f"http://127.0.0.1:{port}"} if via == "proxy" else {}),
        }
        with (
            DaemonProcess(config) as d,
            socket.create_connection((d.proxy_host, d.proxy_port), timeout=30) as sock,
        ):
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            d.wait_for(lambda: connecting_to(port), message="the daemon's dial begins")
            started = time.monotonic()
            d.send_signal(signal.SIGTERM)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            waited = time.monotonic() - started
            d.wait_for(lambda: d.returncode is not None, timeout=30, message="daemon exits")
            logs = d.logs()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer
    assert b"\r\nRetry-After: 1" in head, answer
    assert body == b"Service Unavailable: the proxy is stopping; retry"
    assert waited < 15, f"the client waited {waited:.1f}s"
    assert d.returncode == 0
    assert f"tunnel to {target} failed: the proxy is stopping" in logs, logs[-2000:]
    assert "Traceback" not in logs


def test_an_http10_client_gets_a_chunked_answer_delimited_by_the_close(
    plain_daemon: DaemonProcess, destination: Destination
) -> None:
    """An HTTP/1.0 request whose destination answers chunked (HTTP/1.1) got the chunks with
    ``Transfer-Encoding: chunked``, which an HTTP/1.0 client cannot read (RFC 9112 section 6.1).
    It gets the decoded body, and the proxy closes the connection to end it."""
    request = (
        f"GET http://127.0.0.1:{destination.port}/chunked HTTP/1.0\r\n"
        f"Host: 127.0.0.1:{destination.port}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", plain_daemon.proxy_port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while data := conn.recv(65536):  # the proxy's close ends the answer
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    assert b"transfer-encoding" not in head.lower(), head
    assert b"connection: close" in head.lower(), head
    assert body == b"hello"
