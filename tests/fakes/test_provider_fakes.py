"""The Bedrock and Gemini fakes, driven directly (no proxy): they must accept what the real
clients send and refuse what the real services refuse, or the end-to-end tests prove nothing."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator

import botocore.session
import httpx
import pytest
from botocore.config import Config

from .bedrock import AwsCredentials, FakeBedrock, sigv4_problem
from .gemini import FakeGemini
from .upstream import HEADER_STREAM_ID, reply_text

CREDENTIALS = AwsCredentials("AKIDFAKETEST", "fake/secret", "fake-session")
MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
BODY = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": 8,
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.fixture
def bedrock() -> Iterator[FakeBedrock]:
    with FakeBedrock(credentials=CREDENTIALS, region="us-west-2") as fake:
        yield fake


@pytest.fixture
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini() as fake:
        yield fake


def botocore_client(bedrock: FakeBedrock, credentials: AwsCredentials = CREDENTIALS):  # type: ignore[no-untyped-def]
    """The reference AWS client, pointed at the fake."""
    return botocore.session.get_session().create_client(
        "bedrock-runtime",
        region_name="us-west-2",
        endpoint_url=bedrock.origin,
        verify=str(bedrock.ca_pem_path),
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        aws_session_token=credentials.session_token,
        config=Config(retries={"max_attempts": 1}),
    )


def test_bedrock_accepts_botocores_own_signature_and_answers_invoke_model(
    bedrock: FakeBedrock,
) -> None:
    response = botocore_client(bedrock).invoke_model(modelId=MODEL, body=json.dumps(BODY))
    message = json.loads(response["body"].read())
    assert message["content"][0]["text"] == reply_text()
    assert bedrock.signature_problems == []
    (request,) = bedrock.requests
    assert request.path == "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"


def test_bedrock_stream_is_an_event_stream_botocore_can_parse(bedrock: FakeBedrock) -> None:
    response = botocore_client(bedrock).invoke_model_with_response_stream(
        modelId=MODEL, body=json.dumps(BODY)
    )
    events = [json.loads(part["chunk"]["bytes"]) for part in response["body"]]
    assert events[0]["type"] == "message_start"
    assert events[-1]["type"] == "message_stop"
    assert "amazon-bedrock-invocationMetrics" in events[-1]


def test_bedrock_refuses_a_wrong_secret(bedrock: FakeBedrock) -> None:
    wrong = AwsCredentials(CREDENTIALS.access_key_id, "not-the-secret", CREDENTIALS.session_token)
    with pytest.raises(Exception, match="InvalidSignatureException"):
        botocore_client(bedrock, wrong).invoke_model(modelId=MODEL, body=json.dumps(BODY))
    assert bedrock.signature_problems == ["signature mismatch"]


def test_bedrock_refuses_what_invoke_model_refuses(bedrock: FakeBedrock) -> None:
    client = botocore_client(bedrock)
    with pytest.raises(Exception, match=r"extraneous key \[model\]"):
        client.invoke_model(modelId=MODEL, body=json.dumps({**BODY, "model": "x"}))
    with pytest.raises(Exception, match="anthropic_version"):
        client.invoke_model(
            modelId=MODEL, body=json.dumps({**BODY, "anthropic_version": "2023-06-01"})
        )


def test_signature_checks_cover_scope_date_and_token(bedrock: FakeBedrock) -> None:
    botocore_client(bedrock).invoke_model(modelId=MODEL, body=json.dumps(BODY))
    (request,) = bedrock.requests
    assert sigv4_problem(request, CREDENTIALS, "us-west-2") is None
    assert (
        sigv4_problem(request, CREDENTIALS, "us-east-1")
        == "scope names us-west-2/bedrock, expected us-east-1/bedrock"
    )
    other_token = AwsCredentials(CREDENTIALS.access_key_id, CREDENTIALS.secret_access_key, "other")
    assert sigv4_problem(request, other_token, "us-west-2") == "wrong session token"


def gemini_client(gemini: FakeGemini) -> httpx.Client:
    return httpx.Client(
        verify=ssl.create_default_context(cafile=str(gemini.ca_pem_path)),
        trust_env=False,
        timeout=5,
    )


def test_gemini_native_needs_a_key_and_streams_sse_or_a_json_array(gemini: FakeGemini) -> None:
    url = f"{gemini.origin}/v1beta/models/gemini-2.5-flash"
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    with gemini_client(gemini) as client:
        assert client.post(f"{url}:generateContent", json=body).status_code == 403
        whole = client.post(f"{url}:generateContent?key=k", json=body).json()
        assert whole["candidates"][0]["content"]["parts"][0]["text"] == reply_text()
        sse = client.post(
            f"{url}:streamGenerateContent?alt=sse", json=body, headers={"x-goog-api-key": "k"}
        )
        assert sse.headers["content-type"] == "text/event-stream"
        chunks = [json.loads(line[6:]) for line in sse.text.split("\r\n\r\n") if line]
        array = client.post(
            f"{url}:streamGenerateContent", json=body, headers={"x-goog-api-key": "k"}
        ).json()
    assert chunks == array
    assert (
        "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == reply_text()
    )
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"


def test_gemini_openai_compatible_needs_a_bearer_key_and_gates_streams(gemini: FakeGemini) -> None:
    url = f"{gemini.origin}/v1beta/openai/chat/completions"
    body = {
        "model": "gemini-2.5-flash",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    state = gemini.gate("compat")
    with gemini_client(gemini) as client:
        assert client.post(url, json=body, headers={"x-goog-api-key": "k"}).status_code == 401
        with client.stream(
            "POST",
            url,
            json=body,
            headers={"authorization": "Bearer k", HEADER_STREAM_ID: "compat"},
        ) as response:
            state.release()
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert state.sent == 1  # nothing more leaves before the next release
            state.open_gate()
            assert [line for line in lines if line.startswith("data:")][-1] == "data: [DONE]"
    assert state.wait_finished() == "completed"


def test_gemini_answers_with_a_function_call_and_thoughts_when_asked(gemini: FakeGemini) -> None:
    from .tool_content import HEADER_THINKING, HEADER_TOOL_CALL, THOUGHT, TOOL_ARGUMENTS, TOOL_NAME

    url = f"{gemini.origin}/v1beta/models/gemini-2.5-flash"
    headers = {"x-goog-api-key": "k", HEADER_TOOL_CALL: "1", HEADER_THINKING: "1"}
    with gemini_client(gemini) as client:
        whole = client.post(f"{url}:generateContent", headers=headers, json={}).json()
        array = client.post(f"{url}:streamGenerateContent", headers=headers, json={}).json()
    parts = whole["candidates"][0]["content"]["parts"]
    assert parts[0] == {"text": THOUGHT, "thought": True}
    assert parts[-1]["functionCall"]["name"] == TOOL_NAME
    assert parts[-1]["functionCall"]["args"] == json.loads(TOOL_ARGUMENTS)
    streamed = [chunk["candidates"][0]["content"]["parts"][0] for chunk in array]
    assert "".join(p["text"] for p in streamed if p.get("thought")) == THOUGHT
