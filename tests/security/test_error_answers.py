"""Every answer in the client's language, with no internal detail and no secret
(docs/providers.md#keys-byok-and-the-proxys-own-errors).

Against the real daemon, with real TLS and the official SDKs:

- upstreams that misbehave (garbage instead of HTTP, closing before or during the answer,
  contradicting framing headers, an untrusted certificate) give the client its provider's JSON
  error, never mitmproxy's HTML page with its parser, OS or address detail;
- Bedrock's own errors reach Anthropic clients as Anthropic errors, with the matching status
  and type, whole or inside a stream;
- an upstream that echoes the request back never hands the central key or a Bedrock secret
  setting to the client or to the log;
- refusals no retry can cure are sent once: the SDKs do not retry them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.fakes.bedrock import AwsCredentials, FakeBedrock, exception_message
from tests.fakes.misbehaving import MisbehavingUpstream
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, ca_bundle, open_tls_tunnel, trust

OPENAI_KEY = "sk-central-openai-9f8e7d6c5b4a39281706"
ANTHROPIC_KEY = "sk-ant-central-a1b2c3d4e5f60718293a"
REJECTED_KEY = "sk-rejected-key-0011223344556677"
AWS = AwsCredentials(
    "AKIDERRORSEXAMPLE77", "err/secret+key/0123456789abcdef", "errors-session-token-xyz"
)
SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
BEDROCK_HOST = "bedrock.errors.test"
ECHO_BEDROCK_HOST = "bedrock-echo.errors.test"
CHAT = [{"role": "user", "content": "hi"}]
OPENAI_CHAT = "https://api.openai.com/v1/chat/completions"
OPENAI_BODY = {"model": "gpt-4o-mini", "messages": CHAT}
# Text that only mitmproxy's error page, the OS or a parser would put in a body.
INTERNAL_DETAIL = (
    "mitmproxy",
    "<html",
    "127.0.0.1",
    "errno",
    "traceback",
    "openssl",
    "ssh-2.0",
    "cannot parse",
    "protocol error",
    "certificate verify failed",
    "connection_strategy",
    "body_size_limit",
)


@pytest.fixture(scope="module")
def untrusted() -> Iterator[MisbehavingUpstream]:
    """A server whose CA the daemon does not trust."""
    with MisbehavingUpstream(mode="echo") as fake:
        yield fake


@pytest.fixture(scope="module")
def bedrock() -> Iterator[FakeBedrock]:
    with FakeBedrock(credentials=AWS, region="us-east-1") as fake:
        yield fake


@pytest.fixture(scope="module")
def daemon(
    misbehaving: MisbehavingUpstream,
    untrusted: MisbehavingUpstream,
    upstream: FakeUpstream,
    bedrock: FakeBedrock,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DaemonProcess]:
    bundle = ca_bundle(
        tmp_path_factory.mktemp("upstream-ca") / "bundle.pem",
        misbehaving.ca_pem_path,
        upstream.ca_pem_path,
        bedrock.ca_pem_path,
    )
    config = {"upstream_ca_file": bundle, "auth": "none", "max_request_body": "64KiB"}
    aws = [f"--set={name}={value}" for name, value in AWS.as_settings().items()]
    bedrock_settings = ["--set", "region=us-east-1", "--set", f"model={SONNET}", *aws]
    with DaemonProcess(config) as d:
        d.edit_provider("openai", f"{misbehaving.base_url}/v1", OPENAI_KEY)
        d.edit_provider("anthropic", misbehaving.base_url, ANTHROPIC_KEY)
        add = [
            ["untrusted", "--type", "openai-compat", "--base-url", f"{untrusted.base_url}/v1",
             "--host", "untrusted.errors.test", "--key", OPENAI_KEY],
            ["nokey", "--type", "openai-compat", "--base-url", f"{upstream.origin}/v1",
             "--host", "nokey.errors.test"],
            ["nokey-anthropic", "--type", "anthropic", "--base-url", upstream.origin,
             "--host", "nokey-anthropic.errors.test"],
            ["nobyok", "--type", "openai-compat", "--base-url", f"{upstream.origin}/v1",
             "--host", "nobyok.errors.test", "--key", OPENAI_KEY, "--no-byok"],
            ["rejected", "--type", "openai-compat", "--base-url", f"{upstream.origin}/v1",
             "--host", "rejected.errors.test", "--key", REJECTED_KEY],
            ["rejected-anthropic", "--type", "anthropic", "--base-url", upstream.origin,
             "--host", "rejected-anthropic.errors.test", "--key", REJECTED_KEY],
            ["bedrock", "--type", "bedrock", "--base-url", bedrock.origin, "--host", BEDROCK_HOST,
             *bedrock_settings],
            ["bedrock-echo", "--type", "bedrock", "--base-url", misbehaving.base_url,
             "--host", ECHO_BEDROCK_HOST, *bedrock_settings],
        ]  # fmt: skip
        for arguments in add:
            d.cli("providers", "add", *arguments, check=True)
        d.reload_and_wait()
        yield d


@pytest.fixture(autouse=True)
def clean_fakes(upstream: FakeUpstream, bedrock: FakeBedrock) -> None:
    upstream.reset()
    bedrock.reset()
    upstream.fail_key(REJECTED_KEY, 401)


def openai_sdk(
    daemon: DaemonProcess, host: str = "api.openai.com", **options: Any
) -> openai.OpenAI:
    return daemon.openai_client(base_url=f"https://{host}/v1", **options)


def anthropic_sdk(
    daemon: DaemonProcess, host: str = "api.anthropic.com", **options: Any
) -> anthropic.Anthropic:
    return daemon.anthropic_client(base_url=f"https://{host}", **options)


def assert_no_internal_detail(text: str, *more: str) -> None:
    lowered = text.lower()
    for detail in (*INTERNAL_DETAIL, *more):
        assert detail.lower() not in lowered, f"{detail!r} reached the client: {text!r}"


def assert_no_secret(text: str) -> None:
    for secret in (OPENAI_KEY, ANTHROPIC_KEY, AWS.access_key_id, AWS.secret_access_key,
                   AWS.session_token):  # fmt: skip
        assert secret not in text, f"a secret reached the client or the log: {text[:2000]!r}"
        assert json.dumps(secret)[1:-1] not in text


def requests_counted(daemon: DaemonProcess, provider: str) -> float:
    return daemon.metric("mitm_requests_total", provider=provider) or 0.0


# --- mitmproxy's own failures ------------------------------------------------------------------

BROKEN_UPSTREAMS = [
    ("garbage", "upstream_bad_response"),
    ("close", "upstream_closed"),
    ("partial", "upstream_closed"),
    ("bad-header", "upstream_bad_response"),
]


@pytest.mark.parametrize(("mode", "code"), BROKEN_UPSTREAMS)
@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2"])
def test_broken_upstream_answers_are_provider_json_without_detail(
    daemon: DaemonProcess, misbehaving: MisbehavingUpstream, mode: str, code: str, http2: bool
) -> None:
    answered_502 = daemon.metric("mitm_responses_total", provider="openai", code="502") or 0
    with daemon.httpx_client(http2=http2) as client:
        response = client.post(OPENAI_CHAT, json=OPENAI_BODY, headers={"x-misbehave": mode})
        # The connection stays usable for the next request.
        again = client.post(OPENAI_CHAT, json=OPENAI_BODY, headers={"x-misbehave": mode})
    for answer in (response, again):
        assert answer.status_code == 502, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["error"]["code"] == code
        assert answer.json()["error"]["type"] == "api_error"
        assert "x-aibridge-request-id" in answer.headers
        assert_no_internal_detail(answer.text, str(misbehaving.port))
    # Counted as what the client got.
    assert daemon.metric("mitm_responses_total", provider="openai", code="502") == answered_502 + 2
    assert daemon.metric("inflight_mitm_requests", provider="openai") == 0


def test_a_broken_upstream_after_100_continue_is_still_provider_json(
    daemon: DaemonProcess,
) -> None:
    """The ``100 Continue`` the proxy sends is not the answer: an upstream failure after it is
    still answered in the provider's JSON shape, not by a bare close."""
    from tests.security.test_bounds_client import read_response

    body = json.dumps(OPENAI_BODY).encode()
    context = trust(daemon.ca_cert_path)
    context.set_alpn_protocols(["http/1.1"])
    with open_tls_tunnel(
        daemon.proxy_host, daemon.proxy_port, "api.openai.com:443", context
    ) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
            b"Content-Type: application/json\r\nx-misbehave: garbage\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        assert read_response(sock)[0] == 100
        sock.sendall(body)
        status, headers, answer = read_response(sock)
    assert status == 502, answer
    assert headers["content-type"] == "application/json"
    assert json.loads(answer)["error"]["code"] == "upstream_bad_response"


@pytest.mark.parametrize(("mode", "code"), BROKEN_UPSTREAMS)
def test_broken_upstream_answers_reach_the_sdks_as_their_errors(
    daemon: DaemonProcess, misbehaving: MisbehavingUpstream, mode: str, code: str
) -> None:
    extra = {"x-misbehave": mode}
    with pytest.raises(openai.InternalServerError) as openai_error:
        openai_sdk(daemon).chat.completions.create(
            model="gpt-4o-mini",
            messages=CHAT,
            extra_headers=extra,  # type: ignore[arg-type]
        )
    assert openai_error.value.status_code == 502
    assert isinstance(openai_error.value.body, dict)
    assert openai_error.value.body["code"] == code  # the SDK unwraps "error"
    assert_no_internal_detail(openai_error.value.response.text, str(misbehaving.port))

    with pytest.raises(anthropic.InternalServerError) as anthropic_error:
        anthropic_sdk(daemon).messages.create(
            model="claude-sonnet-4-6",
            max_tokens=8,
            messages=CHAT,
            extra_headers=extra,  # type: ignore[arg-type]
        )
    assert anthropic_error.value.status_code == 502
    body = anthropic_error.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "api_error"
    assert "closed" in body["error"]["message"] or "not valid HTTP" in body["error"]["message"]
    assert_no_internal_detail(anthropic_error.value.response.text, str(misbehaving.port))


def test_untrusted_upstream_certificate_is_a_json_error_sent_once(
    daemon: DaemonProcess, untrusted: MisbehavingUpstream
) -> None:
    before = requests_counted(daemon, "untrusted")
    client = openai_sdk(daemon, "untrusted.errors.test", max_retries=2)
    with pytest.raises(openai.InternalServerError) as error:
        client.chat.completions.create(model="gpt-4o-mini", messages=CHAT)  # type: ignore[arg-type]
    assert error.value.status_code == 502
    assert error.value.response.headers["x-should-retry"] == "false"
    assert isinstance(error.value.body, dict)
    assert error.value.body["code"] == "upstream_certificate_untrusted"
    assert_no_internal_detail(error.value.response.text, str(untrusted.port))
    # A retry cannot fix an untrusted certificate: the SDK sent it once.
    assert requests_counted(daemon, "untrusted") - before == 1
    assert untrusted.request_count == 0  # no HTTP ever reached the untrusted server
    # Logged once, by us, with the request's context: not again by mitmproxy.
    daemon.wait_for(lambda: "does not trust (see upstream_ca_file)" in daemon.logs())
    assert "Server TLS handshake failed" not in daemon.logs()


def test_the_daemon_logs_the_detail_the_client_does_not_get(daemon: DaemonProcess) -> None:
    with daemon.httpx_client() as client:
        client.post(OPENAI_CHAT, json=OPENAI_BODY, headers={"x-misbehave": "garbage"})
    daemon.wait_for(lambda: "sent an answer that is not valid HTTP" in daemon.logs())


def test_garbage_quoting_the_key_leaves_no_key_in_the_log_or_the_record(
    daemon: DaemonProcess, misbehaving: MisbehavingUpstream
) -> None:
    with daemon.httpx_client() as client:
        response = client.post(
            OPENAI_CHAT, json=OPENAI_BODY, headers={"x-misbehave": "garbage-echo"}
        )
    assert response.status_code == 502
    assert OPENAI_KEY in misbehaving.requests[-1]["authorization"]
    request_id = response.headers["x-aibridge-request-id"]

    def record() -> dict[str, Any] | None:
        listing = json.loads(daemon.cli("interceptions", "list", check=True).stdout)
        # The record's id is the request id (docs/monitoring.md#interception-records); older
        # builds call it request_id.
        return next((r for r in listing if request_id in (r.get("id"), r.get("request_id"))), None)

    recorded = daemon.wait_for(record)
    # The record names the refusal; the detail (redacted) is in the log only.
    assert recorded["error"] == "upstream_bad_response"
    assert_no_secret(json.dumps(recorded))
    daemon.wait_for(lambda: "you sent Bearer ***" in daemon.logs())
    assert_no_secret(response.text + daemon.logs())


# --- Bedrock's errors, in Anthropic's shape ----------------------------------------------------

BEDROCK_ERRORS = [
    (400, "ValidationException", anthropic.BadRequestError, 400, "invalid_request_error"),
    (403, "AccessDeniedException", anthropic.PermissionDeniedError, 403, "permission_error"),
    (404, "ResourceNotFoundException", anthropic.NotFoundError, 404, "not_found_error"),
    (429, "ThrottlingException", anthropic.RateLimitError, 429, "rate_limit_error"),
    (400, "ServiceQuotaExceededException", anthropic.RateLimitError, 429, "rate_limit_error"),
    (408, "ModelTimeoutException", anthropic.InternalServerError, 504, "timeout_error"),
    (429, "ModelNotReadyException", anthropic.InternalServerError, 529, "overloaded_error"),
    (424, "ModelErrorException", anthropic.InternalServerError, 500, "api_error"),
    (503, "ServiceUnavailableException", anthropic.InternalServerError, 529, "overloaded_error"),
    (500, "InternalServerException", anthropic.InternalServerError, 500, "api_error"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
@pytest.mark.parametrize(
    ("bedrock_status", "error_type", "sdk_error", "status", "anthropic_type"), BEDROCK_ERRORS
)
def test_bedrock_errors_reach_anthropic_clients_as_anthropic_errors(
    daemon: DaemonProcess,
    bedrock: FakeBedrock,
    bedrock_status: int,
    error_type: str,
    sdk_error: type[anthropic.APIStatusError],
    status: int,
    anthropic_type: str,
    stream: bool,
) -> None:
    message = f"{error_type} says: try something else"
    bedrock.forced_error = (bedrock_status, error_type, message)
    with pytest.raises(sdk_error) as error:
        anthropic_sdk(daemon, BEDROCK_HOST).messages.create(
            model="claude-sonnet-4-6",
            max_tokens=8,
            messages=CHAT,  # type: ignore[arg-type]
            stream=stream,
        )
    assert error.value.status_code == status
    assert error.value.body == {
        "type": "error",
        "error": {"type": anthropic_type, "message": message},
    }
    assert error.value.response.headers["x-aibridge-request-id"]


def test_a_real_bedrock_validation_error_is_an_invalid_request(
    daemon: DaemonProcess, bedrock: FakeBedrock
) -> None:
    # The example of the issue: a field Bedrock rejects gives a 400 ValidationException.
    with pytest.raises(anthropic.BadRequestError) as error:
        anthropic_sdk(daemon, BEDROCK_HOST).messages.create(
            model="claude-sonnet-4-6",
            max_tokens=8,
            messages=CHAT,  # type: ignore[arg-type]
            extra_body={"no_such_field": 1},
        )
    assert error.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "Malformed input request: #: extraneous key [no_such_field] is not permitted",
        },
    }
    assert len(bedrock.requests) == 1  # a 400 is not retried


@pytest.mark.parametrize(
    ("exception", "anthropic_type"),
    [
        ("throttlingException", "rate_limit_error"),
        ("validationException", "invalid_request_error"),
        ("modelStreamErrorException", "api_error"),
        ("serviceUnavailableException", "overloaded_error"),
    ],
)
def test_a_bedrock_stream_exception_is_an_anthropic_error_event(
    daemon: DaemonProcess, bedrock: FakeBedrock, exception: str, anthropic_type: str
) -> None:
    bedrock.trailing_frames = [exception_message(exception, "It broke mid-stream.")]
    with pytest.raises(anthropic.APIStatusError) as error:
        list(
            anthropic_sdk(daemon, BEDROCK_HOST).messages.create(
                model="claude-sonnet-4-6",
                max_tokens=8,
                messages=CHAT,  # type: ignore[arg-type]
                stream=True,
            )
        )
    assert error.value.body == {
        "type": "error",
        "error": {"type": anthropic_type, "message": "It broke mid-stream."},
    }


def test_a_stream_exception_split_across_chunks_still_arrives(
    daemon: DaemonProcess, bedrock: FakeBedrock
) -> None:
    """Half a frame converts to nothing yet; that must not end an HTTP/1 chunked body (an empty
    chunk is its terminator), or the client sees a clean end instead of the error."""
    frame = exception_message("throttlingException", "Split in two.")
    bedrock.trailing_frames = [frame[:20], frame[20:]]
    bedrock.event_delay = 0.05  # pacing, so the halves leave the fake as separate writes
    with pytest.raises(anthropic.APIStatusError) as error:
        list(
            anthropic_sdk(daemon, BEDROCK_HOST).messages.create(
                model="claude-sonnet-4-6",
                max_tokens=8,
                messages=CHAT,  # type: ignore[arg-type]
                stream=True,
            )
        )
    assert error.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Split in two."},
    }


# --- secrets echoed back -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["echo", "echo-chunked"])
@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2"])
def test_an_echoed_central_key_never_reaches_the_client_or_the_log(
    daemon: DaemonProcess, misbehaving: MisbehavingUpstream, mode: str, http2: bool
) -> None:
    with daemon.httpx_client(http2=http2) as client:
        openai_answer = client.post(OPENAI_CHAT, json=OPENAI_BODY, headers={"x-misbehave": mode})
        anthropic_answer = client.post(
            "https://api.anthropic.com/v1/messages",
            json={"model": "claude-sonnet-4-6", "max_tokens": 8, "messages": CHAT},
            headers={"x-misbehave": mode, "anthropic-version": "2023-06-01"},
        )
    # The upstream did get the keys, and quoted them back.
    assert any(OPENAI_KEY in value for value in misbehaving.requests[-2].values())
    assert any(ANTHROPIC_KEY in value for value in misbehaving.requests[-1].values())
    for answer in (openai_answer, anthropic_answer):
        assert answer.status_code == 400
        echoed = answer.json()["error"]["request"]["headers"]  # still valid JSON
        assert "***" in json.dumps(echoed)
        assert_no_secret(answer.text)
    assert_no_secret(daemon.logs())


def test_the_sdks_see_the_echo_without_the_key(daemon: DaemonProcess) -> None:
    with pytest.raises(openai.BadRequestError) as openai_error:
        openai_sdk(daemon).chat.completions.create(
            model="gpt-4o-mini",
            messages=CHAT,
            extra_headers={"x-misbehave": "echo-chunked"},  # type: ignore[arg-type]
        )
    assert_no_secret(openai_error.value.response.text + str(openai_error.value))
    with pytest.raises(anthropic.BadRequestError) as anthropic_error:
        anthropic_sdk(daemon).messages.create(
            model="claude-sonnet-4-6",
            max_tokens=8,
            messages=CHAT,  # type: ignore[arg-type]
        )
    assert_no_secret(anthropic_error.value.response.text + str(anthropic_error.value))
    assert_no_secret(daemon.logs())


def test_echoed_bedrock_credentials_never_reach_the_client_or_the_log(
    daemon: DaemonProcess, misbehaving: MisbehavingUpstream
) -> None:
    with pytest.raises(anthropic.BadRequestError) as error:
        anthropic_sdk(daemon, ECHO_BEDROCK_HOST).messages.create(
            model="claude-sonnet-4-6",
            max_tokens=8,
            messages=CHAT,  # type: ignore[arg-type]
        )
    echoed = misbehaving.requests[-1]
    assert AWS.session_token in echoed.values() and AWS.access_key_id in echoed["authorization"]
    assert_no_secret(error.value.response.text)
    assert_no_secret(daemon.logs())


# --- refusals no retry can cure are sent once --------------------------------------------------

BIG = "x" * (80 * 1024)  # over max_request_body (64KiB)


def _openai_call(host: str, **options: Any) -> Any:
    def call(daemon: DaemonProcess) -> Any:
        content = options.pop("content", "hi")
        return openai_sdk(daemon, host, max_retries=2, **options).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": content}]
        )

    return call


def _anthropic_call(host: str, *, models: bool = False, content: str = "hi") -> Any:
    def call(daemon: DaemonProcess) -> Any:
        client = anthropic_sdk(daemon, host, max_retries=2)
        if models:
            return client.models.list()
        return client.messages.create(
            model="claude-sonnet-4-6", max_tokens=8, messages=[{"role": "user", "content": content}]
        )

    return call


PERMANENT_REFUSALS = [
    # (id, provider counted, call, SDK error, status, code or Anthropic type)
    ("openai-no-key", "nokey", _openai_call("nokey.errors.test"), openai.PermissionDeniedError,
     403, "no_key_configured"),
    ("anthropic-no-key", "nokey-anthropic", _anthropic_call("nokey-anthropic.errors.test"),
     anthropic.PermissionDeniedError, 403, "permission_error"),
    ("openai-byok-refused", "nobyok", _openai_call("nobyok.errors.test", api_key="sk-my-own-key"),
     openai.PermissionDeniedError, 403, "byok_not_allowed"),
    ("openai-keys-rejected", "rejected", _openai_call("rejected.errors.test"),
     openai.InternalServerError, 502, "all_keys_rejected"),
    ("anthropic-keys-rejected", "rejected-anthropic", _anthropic_call("rejected-anthropic.errors.test"),
     anthropic.InternalServerError, 502, "api_error"),
    ("openai-too-large", "nobyok", _openai_call("nobyok.errors.test", content=BIG),
     openai.APIStatusError, 413, "request_too_large"),
    ("anthropic-too-large", "nokey-anthropic", _anthropic_call("nokey-anthropic.errors.test", content=BIG),
     anthropic.APIStatusError, 413, "request_too_large"),
    ("bedrock-unsupported-endpoint", "bedrock", _anthropic_call(BEDROCK_HOST, models=True),
     anthropic.NotFoundError, 404, "not_found_error"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("provider", "call", "sdk_error", "status", "kind"),
    [pytest.param(*case[1:], id=case[0]) for case in PERMANENT_REFUSALS],
)
def test_permanent_refusals_are_not_retried_by_the_sdks(
    daemon: DaemonProcess,
    provider: str,
    call: Any,
    sdk_error: type[Exception],
    status: int,
    kind: str,
) -> None:
    before = requests_counted(daemon, provider)
    with pytest.raises(sdk_error) as error:  # type: ignore[call-overload]
        call(daemon)
    failure = error.value
    assert failure.status_code == status
    body = failure.body
    if "error" in body and isinstance(body.get("error"), dict):  # Anthropic shape
        assert body["type"] == "error" and body["error"]["type"] == kind
    else:  # the openai SDK unwraps "error"
        assert body["code"] == kind
    assert_no_internal_detail(failure.response.text)
    assert requests_counted(daemon, provider) - before == 1, "the SDK retried"


def test_no_key_configured_is_403_in_the_contract_shape(daemon: DaemonProcess) -> None:
    with daemon.httpx_client() as client:
        response = client.post(
            "https://nokey.errors.test/v1/chat/completions",
            json=OPENAI_BODY,
            headers={"authorization": "Bearer aibridgeproxyd"},
        )
    assert response.status_code == 403
    assert response.headers["x-should-retry"] == "false"
    assert response.json()["error"] == {
        "message": "No API key is configured for provider 'nokey'; send your own key or ask an "
        "operator to add one.",
        "type": "permission_error",
        "code": "no_key_configured",
    }


def test_transient_upstream_failures_still_invite_a_retry(daemon: DaemonProcess) -> None:
    """Only permanent conditions opt out: a closed upstream may well answer the next try."""
    before = requests_counted(daemon, "openai")
    client = openai_sdk(daemon, max_retries=1)
    with pytest.raises(openai.InternalServerError) as error:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=CHAT,
            extra_headers={"x-misbehave": "close"},  # type: ignore[arg-type]
        )
    assert "x-should-retry" not in error.value.response.headers
    assert requests_counted(daemon, "openai") - before == 2


# --- a request mitmproxy cannot parse -----------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nno colon here\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: x1\r\n\r\n",
        b"NOT-HTTP\r\n\r\n",
    ],
    ids=["header-without-colon", "bad-content-length", "not-a-request-line"],
)
def test_an_unparseable_request_gets_json_without_parser_detail(
    daemon: DaemonProcess, head: bytes
) -> None:
    context = trust(daemon.ca_cert_path)
    context.set_alpn_protocols(["http/1.1"])
    with open_tls_tunnel(
        daemon.proxy_host, daemon.proxy_port, "api.openai.com:443", context
    ) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 400 "), answer
    assert b"content-type: application/json" in head_part.lower()
    error = json.loads(body)["error"]  # the OpenAI shape: api.openai.com is an OpenAI host
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request"
    assert b"connection: close" in head_part.lower()
    assert_no_internal_detail(answer.decode("latin-1"), "colon", "x1", "NOT-HTTP")
