"""End to end, one provider type at a time: the real daemon, a local fake of that provider's
wire format, and the client a user would run (the official SDK where there is one, httpx
otherwise), configured the HTTPS_PROXY way. Each test checks the exact request the upstream
received and that the stream reached the client event by event: every upstream stream here is
gated, so event k+1 leaves the fake only after the client has seen event k, and a proxy that
buffered would deadlock (the client's read timeout would fail the test).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote

import anthropic
import httpx
import openai
import pytest

from tests.fakes.bedrock import AwsCredentials, FakeBedrock, exception_message
from tests.fakes.gemini import FakeGemini
from tests.fakes.upstream import HEADER_STREAM_ID, FakeUpstream, StreamState, reply_text
from tests.harness import DaemonProcess, ca_bundle, wait_until

PLACEHOLDER = "aibridgeproxyd"
AWS = AwsCredentials("AKIDE2EEXAMPLE", "e2e/secret+key", "e2e-session-token")
SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
HAIKU = "us.anthropic.claude-haiku-4-5-20251001-v1:0"
AZURE_HOST = "contoso.openai.azure.com"
COMPAT_HOST = "llm.internal.example"
COPILOT_HEADERS = {
    "editor-version": "vscode/1.104.0",
    "editor-plugin-version": "copilot-chat/0.31.0",
    "copilot-integration-id": "vscode-chat",
}
KEYS = {
    "azure": "azure-central-key",
    "openrouter": "sk-or-central",
    "openrouter-as-openai": "sk-or-openai-host",
    "vercel": "vercel-central-key",
    "compat": "compat-central-key",
    "google": "AIza-central-key",
}
CHAT = [{"role": "user", "content": "hi"}]
SDK_HTTP = {"timeout": 10}  # for the SDKs' httpx clients


@pytest.fixture(scope="module")
def bedrock() -> Iterator[FakeBedrock]:
    with FakeBedrock(credentials=AWS, region="us-east-1") as fake:
        yield fake


@pytest.fixture(scope="module")
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini() as fake:
        yield fake


@pytest.fixture(scope="module")
def daemon(
    upstream: FakeUpstream,
    bedrock: FakeBedrock,
    gemini: FakeGemini,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DaemonProcess]:
    # One upstream_ca_file: a bundle of the three fakes' CAs.
    bundle = ca_bundle(
        tmp_path_factory.mktemp("upstream-ca") / "bundle.pem",
        upstream.ca_pem_path,
        bedrock.ca_pem_path,
        gemini.ca_pem_path,
    )
    config = {
        "upstream_ca_file": bundle,
        "allowed_private_cidrs": ["127.0.0.0/8"],
        "reload_interval": "2s",
    }
    with DaemonProcess(config) as d:
        # The defaults claim api.openai.com and api.anthropic.com, which bedrock and an
        # openrouter provider take over here.
        d.cli("providers", "disable", "openai", check=True)
        d.cli("providers", "disable", "anthropic", check=True)
        aws_settings = [f"--set={name}={value}" for name, value in AWS.as_settings().items()]
        add = [
            ["bedrock", "--type", "bedrock", "--base-url", bedrock.origin, "--set", "region=us-east-1",
             "--set", f"model={SONNET}", "--set", f"small_fast_model={HAIKU}", *aws_settings],
            ["azure", "--type", "azure", "--base-url", f"{upstream.origin}/openai/v1", "--host", AZURE_HOST,
             "--key", KEYS["azure"], "--set", "api_version=preview", "--set", 'deployments={"gpt-4o": "prod-4o"}'],
            ["openrouter", "--type", "openrouter", "--base-url", f"{upstream.origin}/api/v1", "--key", KEYS["openrouter"]],
            ["openrouter-as-openai", "--type", "openrouter", "--base-url", f"{upstream.origin}/api/v1",
             "--host", "api.openai.com", "--key", KEYS["openrouter-as-openai"]],
            ["vercel", "--type", "vercel", "--base-url", f"{upstream.origin}/v1", "--key", KEYS["vercel"]],
            ["compat", "--type", "openai-compat", "--base-url", f"{upstream.origin}/compat/v1", "--host", COMPAT_HOST,
             "--key", KEYS["compat"]],
            ["copilot", "--type", "copilot", "--base-url", upstream.origin],
            ["google", "--type", "google", "--base-url", gemini.origin, "--key", KEYS["google"]],
        ]  # fmt: skip
        for arguments in add:
            d.cli("providers", "add", *arguments, check=True)
        d.reload_and_wait()
        yield d


@pytest.fixture(autouse=True)
def clean_fakes(upstream: FakeUpstream, bedrock: FakeBedrock, gemini: FakeGemini) -> None:
    for fake in (upstream, bedrock, gemini):
        fake.reset()


def test_every_provider_is_enabled(daemon: DaemonProcess) -> None:
    listing = json.loads(daemon.cli("providers", "list", "--json", check=True).stdout)
    statuses = {p["name"]: (p["status"], p["status_reason"]) for p in listing}
    for name in (
        "bedrock",
        "azure",
        "openrouter",
        "openrouter-as-openai",
        "vercel",
        "compat",
        "copilot",
        "google",
    ):
        assert statuses[name] == ("enabled", ""), name
    bedrock_row = next(p for p in listing if p["name"] == "bedrock")
    assert AWS.secret_access_key not in json.dumps(bedrock_row)
    assert AWS.session_token not in json.dumps(bedrock_row)


# --- helpers -----------------------------------------------------------------------------------


def gated[T](items: Iterable[T], state: StreamState, ahead: int = 0) -> list[T]:
    """Consume a stream, letting the upstream send its next event only after this client has
    received the previous one. `ahead` events may be in flight at once, for clients that hide
    some events (the anthropic SDK never yields `ping`)."""
    state.release(1 + ahead)
    received = []
    for item in items:
        received.append(item)
        state.release()
    return received


def only_request(fake: Any) -> Any:
    (request,) = fake.requests
    return request


def assert_no_proxy_secrets(request: Any, *secrets: str) -> None:
    flat = (
        request.path
        + json.dumps(list(request.headers.multi_items()))
        + request.body.decode("utf-8", "replace")
    )
    for secret in secrets:
        assert secret not in flat, f"{secret!r} reached the upstream"


def streamed_chat(client: openai.OpenAI, state: StreamState, model: str) -> str:
    """The text of a gated chat completion stream, which must end normally."""
    stream = client.chat.completions.create(
        model=model,
        messages=CHAT,  # type: ignore[arg-type]
        stream=True,
        extra_headers={HEADER_STREAM_ID: state.stream_id},
    )
    chunks = gated(stream, state)
    assert state.wait_finished() == "completed"
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# --- bedrock: anthropic SDK -> Bedrock InvokeModel, SigV4 verified by the fake -----------------

BEDROCK_HEADERS = {
    "host",
    "user-agent",
    "content-type",
    "content-length",
    "x-amz-date",
    "x-amz-security-token",
    "authorization",
}


def test_bedrock_messages_are_signed_invoke_calls(
    daemon: DaemonProcess, token: str, bedrock: FakeBedrock
) -> None:
    client = daemon.anthropic_client(token, http_options=SDK_HTTP)
    message = client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=64,
        system="Be brief.",
        messages=CHAT,
        extra_headers={"anthropic-beta": "claude-code-20250219,context-1m-2025-08-07"},
    )
    assert message.content[0].text == reply_text()  # type: ignore[union-attr]
    request = only_request(bedrock)
    assert bedrock.signature_problems == []  # the fake recomputed the signature with botocore
    assert request.method == "POST"
    assert request.path == f"/model/{quote(SONNET, safe='')}/invoke"
    assert set(request.headers.keys()) == BEDROCK_HEADERS | {"accept"}
    assert request.headers["accept"] == "application/json"
    assert request.headers["x-amz-security-token"] == AWS.session_token
    assert request.headers["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={AWS.access_key_id}/"
    )
    assert request.json() == {
        "max_tokens": 64,
        "system": "Be brief.",
        "messages": CHAT,
        "anthropic_version": "bedrock-2023-05-31",
        "anthropic_beta": ["context-1m-2025-08-07"],
    }
    assert_no_proxy_secrets(request, token, PLACEHOLDER)


def test_bedrock_stream_is_converted_to_anthropic_sse_event_by_event(
    daemon: DaemonProcess, token: str, bedrock: FakeBedrock
) -> None:
    bedrock.gate_all_streams = True
    bedrock.stream_events = 5
    client = daemon.anthropic_client(token, http_options=SDK_HTTP)
    stream = client.messages.create(
        model="claude-3-5-haiku-latest", max_tokens=64, messages=CHAT, stream=True
    )
    state = wait_until(lambda: bedrock.streams and bedrock.streams[-1])
    events = gated(stream, state, ahead=1)
    assert [e.type for e in events] == [
        "message_start", "content_block_start", *["content_block_delta"] * 5,
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == reply_text(5)  # type: ignore[union-attr]
    assert state.wait_finished() == "completed"
    request = only_request(bedrock)
    assert request.path == f"/model/{quote(HAIKU, safe='')}/invoke-with-response-stream"
    assert set(request.headers.keys()) == BEDROCK_HEADERS | {"x-amzn-bedrock-accept"}
    assert bedrock.signature_problems == []
    assert "stream" not in request.json()


def test_bedrock_stream_exception_reaches_the_sdk_as_an_error_event(
    daemon: DaemonProcess, token: str, bedrock: FakeBedrock
) -> None:
    bedrock.trailing_frames = [
        exception_message("throttlingException", "Too many requests, please wait.")
    ]
    client = daemon.anthropic_client(token, http_options=SDK_HTTP)
    with pytest.raises(anthropic.APIStatusError) as error:
        list(
            client.messages.create(
                model="claude-sonnet-4-6", max_tokens=8, messages=CHAT, stream=True
            )
        )
    assert error.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Too many requests, please wait."},
    }


def test_bedrock_refuses_endpoints_it_does_not_have_in_anthropic_shape(
    daemon: DaemonProcess, token: str, bedrock: FakeBedrock
) -> None:
    client = daemon.anthropic_client(token, http_options=SDK_HTTP)
    with pytest.raises(anthropic.NotFoundError) as error:
        client.models.list()
    assert error.value.body == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": "Provider 'bedrock' sends requests to Amazon Bedrock, which serves only "
            "POST /v1/messages; GET /v1/models is not available.",
        },
    }
    assert error.value.response.headers["x-aibridge-request-id"]
    assert bedrock.requests == []


# --- azure: openai SDK and AzureOpenAI SDK ------------------------------------------------------


def test_azure_mapped_model_goes_to_its_deployment_with_api_key(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    client = daemon.openai_client(
        token, http_options=SDK_HTTP, base_url=f"https://{AZURE_HOST}/openai/v1"
    )
    completion = client.chat.completions.create(model="gpt-4o", messages=CHAT)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == reply_text()
    request = only_request(upstream)
    assert request.path == "/openai/deployments/prod-4o/chat/completions?api-version=preview"
    assert request.headers["api-key"] == KEYS["azure"]
    assert "authorization" not in request.headers
    assert request.json()["model"] == "gpt-4o"
    assert_no_proxy_secrets(request, token, PLACEHOLDER)


def test_azure_unmapped_model_streams_through_the_v1_style(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    state = upstream.gate("azure-v1")
    client = daemon.openai_client(
        token, http_options=SDK_HTTP, base_url=f"https://{AZURE_HOST}/openai/v1", api_key=token
    )
    assert streamed_chat(client, state, "gpt-4.1") == reply_text()
    request = only_request(upstream)
    assert request.path == "/openai/v1/chat/completions?api-version=preview"
    assert request.headers["api-key"] == KEYS["azure"]
    assert_no_proxy_secrets(request, token)


def test_azure_sdk_requests_keep_their_own_shape(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    client = openai.AzureOpenAI(
        azure_endpoint=f"https://{AZURE_HOST}",
        api_version="2024-10-21",
        api_key=PLACEHOLDER,
        http_client=daemon.httpx_client(token),
        max_retries=0,
    )
    client.embeddings.create(model="legacy-embeddings", input="hello")
    request = only_request(upstream)
    assert request.path == "/openai/deployments/legacy-embeddings/embeddings?api-version=2024-10-21"
    assert request.headers["api-key"] == KEYS["azure"]


# --- openrouter, vercel, openai-compat: openai SDK ----------------------------------------------


@pytest.mark.parametrize(
    ("provider", "client_base_url", "upstream_path", "model"),
    [
        (
            "openrouter",
            "https://openrouter.ai/api/v1",
            "/api/v1/chat/completions",
            "anthropic/claude-sonnet-4.5",
        ),
        ("openrouter-as-openai", None, "/api/v1/chat/completions", "openai/gpt-4o"),
        ("vercel", "https://ai-gateway.vercel.sh/v1", "/v1/chat/completions", "xai/grok-4"),
        (
            "compat",
            f"https://{COMPAT_HOST}/v1",
            "/compat/v1/chat/completions",
            "meta-llama/Llama-3.3-70B",
        ),
    ],
)
def test_openai_format_gateways_stream_with_their_bearer_key(
    daemon: DaemonProcess,
    token: str,
    upstream: FakeUpstream,
    provider: str,
    client_base_url: str | None,
    upstream_path: str,
    model: str,
) -> None:
    state = upstream.gate(provider)
    client = daemon.openai_client(token, http_options=SDK_HTTP, base_url=client_base_url)
    assert streamed_chat(client, state, model) == reply_text()
    request = only_request(upstream)
    assert (request.method, request.path) == ("POST", upstream_path)
    assert request.headers["authorization"] == f"Bearer {KEYS[provider]}"
    assert request.json()["model"] == model  # slash ids untouched
    assert_no_proxy_secrets(request, token, PLACEHOLDER)


def test_openai_format_byok_passes_through(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    client = daemon.openai_client(
        token,
        http_options=SDK_HTTP,
        base_url="https://openrouter.ai/api/v1",
        api_key="sk-or-user-own",
    )
    client.embeddings.create(model="openai/text-embedding-3-small", input="hello")
    request = only_request(upstream)
    assert request.path == "/api/v1/embeddings"
    assert request.headers["authorization"] == "Bearer sk-or-user-own"


# --- copilot: httpx, the user's GitHub token -----------------------------------------------------


def copilot_stream(client: httpx.Client, state: StreamState, authorization: str) -> list[str]:
    with client.stream(
        "POST",
        "https://api.business.githubcopilot.com/chat/completions",
        json={"model": "gpt-4.1", "messages": CHAT, "stream": True},
        headers={
            **COPILOT_HEADERS,
            "authorization": authorization,
            HEADER_STREAM_ID: state.stream_id,
        },
    ) as response:
        assert response.status_code == 200
        return [line for line in gated(response.iter_lines(), state) if line.startswith("data:")]


def test_copilot_forwards_the_users_token_and_editor_headers(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    state = upstream.gate("copilot")
    with daemon.httpx_client(token) as client:
        lines = copilot_stream(client, state, "Bearer gho_user_github_token")
    assert lines[-1] == "data: [DONE]"
    request = only_request(upstream)
    assert request.path == "/chat/completions"
    assert request.headers["authorization"] == "Bearer gho_user_github_token"
    assert request.headers["editor-version"] == COPILOT_HEADERS["editor-version"]
    assert request.headers["editor-plugin-version"] == COPILOT_HEADERS["editor-plugin-version"]
    assert request.headers["copilot-integration-id"] == COPILOT_HEADERS["copilot-integration-id"]


def test_copilot_never_forwards_the_proxy_token(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    state = upstream.gate("copilot-token")
    with daemon.httpx_client(token) as client:
        copilot_stream(client, state, f"Bearer {token}")
    request = only_request(upstream)
    assert "authorization" not in request.headers
    assert_no_proxy_secrets(request, token)


# --- google: httpx for the native API, openai SDK for the compatible one -------------------------

GEMINI_NATIVE = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash"


def test_gemini_native_stream_with_the_central_key(
    daemon: DaemonProcess, token: str, gemini: FakeGemini
) -> None:
    state = gemini.gate("gemini-native")
    with (
        daemon.httpx_client(token) as client,
        client.stream(
            "POST",
            f"{GEMINI_NATIVE}:streamGenerateContent?alt=sse",
            json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
            headers={"x-goog-api-key": PLACEHOLDER, HEADER_STREAM_ID: "gemini-native"},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [
            json.loads(line[5:])
            for line in gated(response.iter_lines(), state)
            if line.startswith("data:")
        ]
    text = "".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in events)
    assert text == reply_text()
    assert state.wait_finished() == "completed"
    request = only_request(gemini)
    assert request.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert request.headers["x-goog-api-key"] == KEYS["google"]
    assert "authorization" not in request.headers
    assert_no_proxy_secrets(request, token, PLACEHOLDER)


def test_gemini_query_key_with_the_proxy_token_means_central(
    daemon: DaemonProcess, token: str, gemini: FakeGemini
) -> None:
    with daemon.httpx_client(token) as client:
        response = client.post(
            f"{GEMINI_NATIVE}:generateContent",
            params={"key": token},
            json={"contents": [{"parts": [{"text": "hi"}]}]},
        )
    assert response.status_code == 200
    request = only_request(gemini)
    assert request.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert request.headers["x-goog-api-key"] == KEYS["google"]
    assert_no_proxy_secrets(request, token)


def test_gemini_openai_compatible_endpoint_with_the_openai_sdk(
    daemon: DaemonProcess, token: str, gemini: FakeGemini
) -> None:
    state = gemini.gate("gemini-openai")
    client = daemon.openai_client(
        token,
        http_options=SDK_HTTP,
        base_url="https://generativelanguage.googleapis.com/v1beta/openai/",
    )
    assert streamed_chat(client, state, "gemini-2.5-flash") == reply_text()
    request = only_request(gemini)
    assert request.path == "/v1beta/openai/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEYS['google']}"
    assert "x-goog-api-key" not in request.headers
