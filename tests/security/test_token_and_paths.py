"""What a MITM'd request may carry upstream (issue 8, security review), against the real daemon.

- The proxy token never reaches an upstream: sent as ``Authorization: Basic
  base64(user:TOKEN)`` inside the tunnel it counts as central (the central key is injected), and
  it is removed from any other header and query parameter.
- A path with dot-segments (``/v1/../../../secret``, percent-encoded, with backslashes) is
  refused 400 ``invalid_path`` in the client format; nothing is sent upstream, so no key either.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Iterator

import h11
import pytest

from tests.fakes.upstream import FakeUpstream, presented_key
from tests.harness import DaemonProcess, basic_auth, open_tls_tunnel, trust

CENTRAL_KEY = "sk-central-rows"


@pytest.fixture(scope="module")
def daemon(upstream: FakeUpstream) -> Iterator[tuple[DaemonProcess, str]]:
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path}) as daemon:
        daemon.edit_provider("openai", upstream.base_url, CENTRAL_KEY)
        token = daemon.create_token("alice")
        yield daemon, token


def test_a_basic_encoded_proxy_token_is_replaced_by_the_central_key(
    daemon: tuple[DaemonProcess, str], upstream: FakeUpstream
) -> None:
    """Regression: `Authorization: Basic base64(user:TOKEN)` was taken as the user's own key
    and forwarded verbatim."""
    proxy, token = daemon
    upstream.reset()
    encoded_token = base64.b64encode(f"user:{token}".encode()).decode()
    with proxy.httpx_client(token) as client:
        response = client.post(
            f"https://api.openai.com/v1/chat/completions?key={token}&stream=false",
            json={"model": "gpt-4o", "messages": []},
            headers={
                "Authorization": f"Basic {encoded_token}",
                "X-Custom-Auth": f"Token {token}",
                "Cookie": f"session={token}",
            },
        )
    assert response.status_code == 200, response.text
    (seen,) = upstream.requests
    assert presented_key(seen.headers) == CENTRAL_KEY
    assert token not in seen.path and "key=" not in seen.path and "stream=false" in seen.path
    upstream_text = json.dumps(list(seen.headers.multi_items()))
    assert token not in upstream_text and encoded_token not in upstream_text
    assert "x-custom-auth" not in seen.headers and "cookie" not in seen.headers


def raw_request(proxy: DaemonProcess, token: str, target: str) -> tuple[int, bytes]:
    """One HTTP/1.1 GET with `target` sent byte for byte (clients such as httpx would resolve
    the dot-segments themselves) inside a MITM'd tunnel to api.openai.com."""
    context: ssl.SSLContext = trust(proxy.ca_cert_path)
    with open_tls_tunnel(
        proxy.proxy_host, proxy.proxy_port, "api.openai.com:443", context, basic_auth(token)
    ) as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n".encode()
        )
        connection = h11.Connection(h11.CLIENT)
        connection.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        connection.send(h11.EndOfMessage())
        status, body = 0, b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, body


@pytest.mark.parametrize(
    "target",
    [
        "/v1/../../../secret",  # the tester's exact input
        "/v1/%2e%2e/%2E%2E/secret",
        "/v1/..%5c..%5csecret",
        "/v1/./models",
    ],
)
def test_a_dot_segment_path_is_refused_before_any_key_is_injected(
    daemon: tuple[DaemonProcess, str], upstream: FakeUpstream, target: str
) -> None:
    proxy, token = daemon
    upstream.reset()
    status, body = raw_request(proxy, token, target)
    assert status == 400
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_path"
    assert upstream.requests == []
    # The same tunnel's ordinary paths still route.
    status, _ = raw_request(proxy, token, "/v1/models")
    assert status == 200
    assert [r.path for r in upstream.requests] == ["/v1/models"]
