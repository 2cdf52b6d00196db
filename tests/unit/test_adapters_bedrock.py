"""Bedrock: the request rewrite, its SigV4 signature, and the event-stream to SSE transform."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from mitmproxy import http
from mitmproxy.http import Headers
from mitmproxy.net import encoding as mitmproxy_encoding

from aibridgeproxyd.adapters import ADAPTERS, RouteRefusal
from aibridgeproxyd.adapters.bedrock import BedrockAdapter, EventStreamToSse
from aibridgeproxyd.model import Status
from tests.fakes.bedrock import (
    AwsCredentials,
    anthropic_stream_events,
    chunk_message,
    encode_event_message,
    exception_message,
    sigv4_problem,
)
from tests.fakes.tls import RecordedRequest
from tests.unit.test_adapters_common import client_request, evaluated, header_items, routed

ADAPTER = ADAPTERS["bedrock"]
CREDENTIALS = AwsCredentials(
    "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "session-token-example"
)
SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
HAIKU = "us.anthropic.claude-haiku-4-5-20251001-v1:0"
SETTINGS = {
    "region": "us-east-1",
    "model": SONNET,
    "small_fast_model": HAIKU,
    **CREDENTIALS.as_settings(),
}
MESSAGES_URL = "https://api.anthropic.com/v1/messages?beta=true"
# What Claude Code sends, minus the credential that routing.route_request has already removed.
CLAUDE_CODE_HEADERS = {
    "user-agent": "claude-cli/2.0.14 (external, cli)",
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14, fine-grained-tool-streaming-2025-05-14",
    "anthropic-dangerous-direct-browser-access": "true",
    "x-app": "cli",
    "x-stainless-lang": "js",
    "x-stainless-retry-count": "0",
    "accept": "application/json",
    "accept-encoding": "gzip, deflate, br",
    "x-forwarded-for": "10.1.2.3",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "connection": "keep-alive",
}
BODY = {
    "model": "claude-sonnet-4-5-20250929",
    "max_tokens": 1024,
    "system": [{"type": "text", "text": "You are Claude Code."}],
    "messages": [{"role": "user", "content": "hi ✓"}],
    "metadata": {"user_id": "user_abc"},
    "service_tier": "auto",
    "stream": False,
}


def bedrock_request(
    body: dict[str, Any] | bytes = BODY, url: str = MESSAGES_URL, method: str = "POST"
) -> http.Request:
    return client_request(method, url, body, CLAUDE_CODE_HEADERS)


def provider(**settings: Any) -> Any:
    return routed("bedrock", settings={**SETTINGS, **settings})


def recorded(request: http.Request) -> RecordedRequest:
    """The request as the upstream would receive it (Host from the h2 authority or header)."""
    headers = httpx.Headers([(k, v) for k, v in header_items(request)])
    if "host" not in headers:
        headers["host"] = request.host_header or ""
    return RecordedRequest(request.method, request.path, headers, request.raw_content or b"", "1.1")


# --- the request -------------------------------------------------------------------------------


def test_messages_become_invoke_with_only_signed_bedrock_headers() -> None:
    request = bedrock_request()
    transform = ADAPTER.rewrite(request, provider(), None)
    assert transform is None  # a JSON answer passes through
    assert request.method == "POST"
    assert (
        request.url
        == f"https://bedrock-runtime.us-east-1.amazonaws.com/model/{quote(SONNET, safe='')}/invoke"
    )
    assert request.path == "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"
    assert [name for name, _ in header_items(request)] == [
        "host",
        "user-agent",
        "content-type",
        "accept",
        "content-length",
        "x-amz-date",
        "x-amz-security-token",
        "authorization",
    ]
    headers = request.headers
    assert headers["host"] == "bedrock-runtime.us-east-1.amazonaws.com"
    assert headers["user-agent"] == CLAUDE_CODE_HEADERS["user-agent"]
    assert (headers["content-type"], headers["accept"]) == ("application/json", "application/json")
    assert headers["content-length"] == str(len(request.raw_content or b""))
    assert headers["x-amz-security-token"] == CREDENTIALS.session_token
    assert re.fullmatch(
        r"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/\d{8}/us-east-1/bedrock/aws4_request, "
        r"SignedHeaders=accept;content-type;host;x-amz-date;x-amz-security-token, Signature=[0-9a-f]{64}",
        headers["authorization"],
    )


def test_body_drops_rejected_fields_moves_allowed_betas_in_and_sets_the_version() -> None:
    request = bedrock_request()
    ADAPTER.rewrite(request, provider(), None)
    expected = {
        "max_tokens": 1024,
        "system": [{"type": "text", "text": "You are Claude Code."}],
        "messages": [{"role": "user", "content": "hi ✓"}],
        "metadata": {"user_id": "user_abc"},
        "anthropic_version": "bedrock-2023-05-31",
        "anthropic_beta": [
            "interleaved-thinking-2025-05-14",
            "fine-grained-tool-streaming-2025-05-14",
        ],
    }
    assert (
        request.raw_content
        == json.dumps(expected, separators=(",", ":"), ensure_ascii=False).encode()
    )


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_a_compressed_body_is_decoded_and_sent_to_bedrock_uncompressed(coding: str) -> None:
    haiku_body = {**BODY, "model": "claude-haiku-4-5"}
    request = bedrock_request()
    request.headers["content-encoding"] = coding
    request.raw_content = mitmproxy_encoding.encode(json.dumps(haiku_body).encode(), coding)
    ADAPTER.rewrite(request, provider(), None)
    assert "content-encoding" not in request.headers
    assert request.path == f"/model/{quote(HAIKU, safe='')}/invoke"  # the model was read
    sent = json.loads(request.raw_content or b"")
    assert sent["anthropic_version"] == "bedrock-2023-05-31" and "model" not in sent


def test_betas_from_the_body_are_merged_and_allowed_betas_can_be_configured() -> None:
    body = {
        **BODY,
        "anthropic_beta": ["context-1m-2025-08-07", "oauth-2025-04-20"],
        "anthropic_version": "x",
    }
    request = bedrock_request(body)
    ADAPTER.rewrite(
        request, provider(allowed_betas=["claude-code-20250219", "oauth-2025-04-20"]), None
    )
    sent = json.loads(request.raw_content or b"")
    assert sent["anthropic_beta"] == ["claude-code-20250219", "oauth-2025-04-20"]
    assert sent["anthropic_version"] == "bedrock-2023-05-31"


def test_no_allowed_beta_means_no_anthropic_beta_field() -> None:
    request = client_request("POST", MESSAGES_URL, BODY, {"anthropic-beta": "claude-code-20250219"})
    ADAPTER.rewrite(request, provider(), None)
    assert "anthropic_beta" not in json.loads(request.raw_content or b"")


def test_stream_true_uses_invoke_with_response_stream_and_returns_the_transform() -> None:
    request = bedrock_request({**BODY, "stream": True})
    transform = ADAPTER.rewrite(request, provider(), None)
    assert isinstance(transform, EventStreamToSse)
    assert (
        request.path
        == "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke-with-response-stream"
    )
    # As botocore sends it: the body format goes in X-Amzn-Bedrock-Accept, not Accept.
    assert request.headers["x-amzn-bedrock-accept"] == "application/json"
    assert "accept" not in request.headers
    assert "stream" not in json.loads(request.raw_content or b"")
    assert (
        "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amzn-bedrock-accept,"
        in request.headers["authorization"]
    )


@pytest.mark.parametrize(
    ("requested", "settings", "model_id"),
    [
        ("claude-3-5-haiku-20241022", {}, HAIKU),
        ("claude-haiku-4-5", {}, HAIKU),
        ("CLAUDE-HAIKU", {}, HAIKU),
        ("claude-opus-4-1", {}, SONNET),
        (None, {}, SONNET),
        ("claude-haiku-4-5", {"small_fast_model": ""}, SONNET),
    ],
)
def test_haiku_models_use_the_small_fast_model(
    requested: str | None, settings: dict[str, str], model_id: str
) -> None:
    body = {k: v for k, v in BODY.items() if k != "model"} | (
        {"model": requested} if requested else {}
    )
    request = bedrock_request(body)
    ADAPTER.rewrite(request, provider(**settings), None)
    assert request.path == f"/model/{quote(model_id, safe='')}/invoke"


def test_arn_model_ids_are_percent_encoded_like_botocore_does() -> None:
    arn = "arn:aws:bedrock:eu-west-1:123456789012:application-inference-profile/a1b2c3"
    request = bedrock_request()
    ADAPTER.rewrite(request, provider(model=arn, region="eu-west-1"), None)
    assert (
        request.path
        == "/model/arn%3Aaws%3Abedrock%3Aeu-west-1%3A123456789012%3Aapplication-inference-profile%2Fa1b2c3/invoke"
    )
    assert sigv4_problem(recorded(request), CREDENTIALS, "eu-west-1") is None


def test_base_url_path_prefix_and_port_are_kept() -> None:
    relay = routed(
        "bedrock",
        base_url="https://bedrock-relay.internal:8443/aws",
        settings={**SETTINGS, "region": "us-west-2"},
    )
    request = bedrock_request()
    ADAPTER.rewrite(request, relay, None)
    assert (
        request.url
        == f"https://bedrock-relay.internal:8443/aws/model/{quote(SONNET, safe='')}/invoke"
    )
    assert request.headers["host"] == "bedrock-relay.internal:8443"
    assert sigv4_problem(recorded(request), CREDENTIALS, "us-west-2") is None


# --- the signature -----------------------------------------------------------------------------


def spec_signature(
    request: http.Request, credentials: AwsCredentials, region: str, service: str = "bedrock"
) -> str:
    """SigV4 computed from the AWS specification alone (no botocore): canonical request,
    string to sign, derived key. Non-S3 services encode the already-encoded path once more."""
    match = re.search(r"SignedHeaders=([^,]+)", request.headers["authorization"])
    assert match is not None
    signed = match.group(1).split(";")
    amz_date = request.headers["x-amz-date"]
    path, _, query = request.path.partition("?")
    canonical_request = "\n".join(
        [
            request.method,
            quote(path, safe="/~"),
            query,
            "".join(f"{name}:{' '.join(request.headers[name].split())}\n" for name in signed),
            ";".join(signed),
            hashlib.sha256(request.raw_content or b"").hexdigest(),
        ]
    )
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            amz_date,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = f"AWS4{credentials.secret_access_key}".encode()
    for part in (amz_date[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


@pytest.mark.parametrize("streaming", [False, True])
def test_signature_matches_the_aws_specification(streaming: bool) -> None:
    request = bedrock_request({**BODY, "stream": streaming})
    ADAPTER.rewrite(request, provider(), None)
    signature = request.headers["authorization"].rsplit("Signature=", 1)[1]
    assert signature == spec_signature(request, CREDENTIALS, "us-east-1")
    assert sigv4_problem(recorded(request), CREDENTIALS, "us-east-1") is None


def test_signature_without_a_session_token() -> None:
    credentials = AwsCredentials("AKIDPLAIN", "plain-secret")
    request = bedrock_request()
    ADAPTER.rewrite(
        request,
        routed(
            "bedrock",
            settings={"region": "us-east-1", "model": SONNET, **credentials.as_settings()},
        ),
        None,
    )
    assert "x-amz-security-token" not in request.headers
    assert "SignedHeaders=accept;content-type;host;x-amz-date, " in request.headers["authorization"]
    assert request.headers["authorization"].rsplit("Signature=", 1)[1] == spec_signature(
        request, credentials, "us-east-1"
    )


def test_any_change_after_signing_breaks_the_signature() -> None:
    request = bedrock_request()
    ADAPTER.rewrite(request, provider(), None)
    request.content = (request.raw_content or b"").replace(b"1024", b"2048")
    assert sigv4_problem(recorded(request), CREDENTIALS, "us-east-1") == "signature mismatch"
    assert "us-west-2/bedrock" in (sigv4_problem(recorded(request), CREDENTIALS, "us-west-2") or "")


# --- evaluation --------------------------------------------------------------------------------


def test_base_url_defaults_from_the_region_and_the_region_can_come_from_the_host() -> None:
    assert (
        routed("bedrock", settings=SETTINGS).base_url
        == "https://bedrock-runtime.us-east-1.amazonaws.com"
    )
    no_region = {k: v for k, v in SETTINGS.items() if k != "region"}
    for host, region in [
        ("bedrock-runtime.eu-central-1.amazonaws.com", "eu-central-1"),
        ("bedrock-runtime-fips.us-gov-west-1.amazonaws.com", "us-gov-west-1"),
        ("vpce-0a1b2c3d-xyz.bedrock-runtime.ap-southeast-2.vpce.amazonaws.com", "ap-southeast-2"),
    ]:
        found = routed("bedrock", base_url=f"https://{host}", settings=no_region)
        assert found.hosts == ("api.anthropic.com",)
        request = bedrock_request()
        ADAPTER.rewrite(request, found, None)
        assert f"/{region}/bedrock/aws4_request" in request.headers["authorization"]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (
            {"settings": {k: v for k, v in SETTINGS.items() if k != "region"}},
            "bedrock region is not set",
        ),
        (
            {
                "base_url": "https://bedrock.internal",
                "settings": {k: v for k, v in SETTINGS.items() if k != "region"},
            },
            "bedrock region is not set and base_url host 'bedrock.internal' names none",
        ),
        ({"settings": {**SETTINGS, "secret_access_key": ""}}, "bedrock credentials are missing"),
        ({"settings": {**SETTINGS, "access_key_id": None}}, "bedrock credentials are missing"),
        ({"settings": {**SETTINGS, "model": ""}}, "bedrock model is not set"),
    ],
)
def test_missing_region_credentials_or_model_is_status_error(
    fields: dict[str, Any], reason: str
) -> None:
    result = evaluated("bedrock", **fields)
    assert result.status is Status.ERROR
    assert result.status_reason.startswith(reason)
    # Shown by the dashboard and the API too: no CLI syntax in the reason.
    assert "--set" not in result.status_reason and "<" not in result.status_reason


def test_bedrock_rows_may_omit_base_url_and_mask_their_secrets() -> None:
    assert not ADAPTER.requires_base_url
    assert {"secret_access_key", "session_token"} <= ADAPTER.secret_settings


# --- requests Bedrock cannot serve -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "https://api.anthropic.com/v1/models"),
        ("POST", "https://api.anthropic.com/v1/messages/count_tokens"),
        ("POST", "https://api.anthropic.com/v1/messages/batches"),
        ("GET", "https://api.anthropic.com/v1/messages"),
    ],
)
def test_other_endpoints_are_refused_with_404_before_anything_changes(
    method: str, url: str
) -> None:
    request = bedrock_request(url=url, method=method)
    before = request.get_state()
    with pytest.raises(RouteRefusal) as refusal:
        ADAPTER.rewrite(request, provider(), None)
    assert (refusal.value.status, refusal.value.code) == (404, "unsupported_endpoint")
    assert "serves only POST /v1/messages" in refusal.value.message
    assert request.get_state() == before


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b""])
def test_a_body_that_is_not_a_json_object_is_a_400(body: bytes) -> None:
    with pytest.raises(RouteRefusal) as refusal:
        ADAPTER.rewrite(bedrock_request(body), provider(), None)
    assert refusal.value.status == 400


# --- the event stream --------------------------------------------------------------------------


def sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


EVENTS = anthropic_stream_events(SONNET, events=4)
FRAMES = [chunk_message(event) for event in EVENTS]
STREAM = b"".join(FRAMES)


def test_start_makes_the_response_an_event_stream_of_unknown_length() -> None:
    response = http.Response.make(
        200, b"", {"content-type": "application/vnd.amazon.eventstream", "content-length": "99"}
    )
    EventStreamToSse().start(response)
    assert response.headers["content-type"] == "text/event-stream"
    assert "content-length" not in response.headers


@pytest.mark.parametrize("piece_size", [1, 2, 3, 7, 12, 13, 64, 1000, len(STREAM)])
def test_frames_split_anywhere_become_the_exact_sse_sequence(piece_size: int) -> None:
    transform = EventStreamToSse()
    pieces = [STREAM[i : i + piece_size] for i in range(0, len(STREAM), piece_size)]
    out = b"".join(transform.feed(piece) for piece in pieces) + transform.feed(b"")
    assert out == b"".join(sse(event) for event in EVENTS)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize("piece_size", [1, 13, 100_000])
def test_a_compressed_event_stream_is_decoded_and_leaves_as_plain_sse(
    coding: str, piece_size: int
) -> None:
    """A Content-Encoding on the event stream is undone before the frames are read, and the
    answer no longer names it: what leaves is plain SSE."""
    response = http.Response.make(200, b"", {"content-encoding": coding})
    transform = EventStreamToSse()
    transform.start(response)
    assert "content-encoding" not in response.headers
    compressed = mitmproxy_encoding.encode(STREAM, coding)
    assert isinstance(compressed, bytes)
    pieces = [compressed[i : i + piece_size] for i in range(0, len(compressed), piece_size)]
    out = b"".join(transform.feed(piece) for piece in pieces) + transform.feed(b"")
    assert out == b"".join(sse(event) for event in EVENTS)


@pytest.mark.parametrize(
    ("coding", "body"), [("gzip", STREAM), ("x-unknown", STREAM), ("gzip, br", STREAM)]
)
def test_an_event_stream_that_cannot_be_decoded_ends_in_one_error_event(
    coding: str, body: bytes
) -> None:
    response = http.Response.make(200)
    response.headers["content-encoding"] = coding  # make() drops a coding it cannot apply
    transform = EventStreamToSse()
    transform.start(response)
    out = transform.feed(body[:50]) + transform.feed(body[50:]) + transform.feed(b"")
    assert out.startswith(b"event: error\n") and out.count(b"event: ") == 1, out


def test_each_event_leaves_as_soon_as_its_frame_is_complete() -> None:
    transform = EventStreamToSse()
    for frame, event in zip(FRAMES, EVENTS, strict=True):
        # Every byte but the last of a frame yields nothing; the last one yields the event.
        assert b"".join(transform.feed(frame[i : i + 1]) for i in range(len(frame) - 1)) == b""
        assert transform.feed(frame[-1:]) == sse(event)
    assert transform.feed(b"") == b""


def test_a_chunk_boundary_inside_the_prelude_of_the_next_frame() -> None:
    transform = EventStreamToSse()
    assert transform.feed(FRAMES[0] + FRAMES[1][:5]) == sse(EVENTS[0])
    assert transform.feed(FRAMES[1][5:] + FRAMES[2]) == sse(EVENTS[1]) + sse(EVENTS[2])


def test_a_long_stream_keeps_only_the_unfinished_frame() -> None:
    transform = EventStreamToSse()
    frame = FRAMES[3]
    for _ in range(2000):
        assert transform.feed(frame[:10]) == b""
        assert transform.feed(frame[10:]) == sse(EVENTS[3])
    assert transform._pending == 0  # nothing left over from 2000 events


@pytest.mark.parametrize(
    ("exception", "error_type"),
    [
        ("throttlingException", "rate_limit_error"),
        ("serviceUnavailableException", "overloaded_error"),
        ("validationException", "invalid_request_error"),
        ("modelStreamErrorException", "api_error"),
        ("internalServerException", "api_error"),
        ("modelTimeoutException", "timeout_error"),
        ("modelNotReadyException", "overloaded_error"),
        ("serviceQuotaExceededException", "rate_limit_error"),
        ("accessDeniedException", "permission_error"),
        ("somethingNewException", "api_error"),
    ],
)
def test_stream_exceptions_become_an_anthropic_error_event(exception: str, error_type: str) -> None:
    transform = EventStreamToSse()
    out = transform.feed(FRAMES[0] + exception_message(exception, "Too many tokens, please wait."))
    assert out.startswith(sse(EVENTS[0]))
    error = out[len(sse(EVENTS[0])) :]
    assert error.startswith(b"event: error\ndata: ") and error.endswith(b"\n\n")
    assert json.loads(error.split(b"data: ", 1)[1]) == {
        "type": "error",
        "error": {"type": error_type, "message": "Too many tokens, please wait."},
    }


# Every bedrock-runtime error type, as x-amzn-ErrorType names it, with the HTTP status Bedrock
# answers it with (its API reference), and the Anthropic status and type a Claude client gets.
BEDROCK_ERRORS = [
    ("ValidationException", 400, 400, "invalid_request_error"),
    ("AccessDeniedException", 403, 403, "permission_error"),
    ("UnrecognizedClientException", 403, 403, "permission_error"),
    ("InvalidSignatureException", 403, 403, "permission_error"),
    ("ExpiredTokenException", 403, 403, "permission_error"),
    ("ResourceNotFoundException", 404, 404, "not_found_error"),
    ("ThrottlingException", 429, 429, "rate_limit_error"),
    ("ServiceQuotaExceededException", 400, 429, "rate_limit_error"),
    ("ModelTimeoutException", 408, 504, "timeout_error"),
    ("ModelNotReadyException", 429, 529, "overloaded_error"),
    ("ModelErrorException", 424, 500, "api_error"),
    ("ModelStreamErrorException", 424, 500, "api_error"),
    ("ServiceUnavailableException", 503, 529, "overloaded_error"),
    ("InternalServerException", 500, 500, "api_error"),
    # The namespace suffix real answers carry after the type.
    (
        "ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/",
        400,
        400,
        "invalid_request_error",
    ),
    # Unknown types fall back on the status.
    ("BrandNewException", 413, 413, "request_too_large"),
    ("BrandNewException", 401, 403, "permission_error"),
    ("BrandNewException", 418, 400, "invalid_request_error"),
    ("BrandNewException", 599, 500, "api_error"),
]


@pytest.mark.parametrize(
    ("error_type", "bedrock_status", "status", "anthropic_type"), BEDROCK_ERRORS
)
def test_bedrock_error_answers_become_anthropic_errors(
    error_type: str, bedrock_status: int, status: int, anthropic_type: str
) -> None:
    headers = Headers([(b"x-amzn-ErrorType", error_type.encode()), (b"x-amzn-RequestId", b"r-1")])
    answer = BedrockAdapter().upstream_error(bedrock_status, headers)
    assert answer is not None and answer.status == status
    body = json.loads(answer.body(b'{"message":"Malformed input request: #: bad"}'))
    assert body == {
        "type": "error",
        "error": {"type": anthropic_type, "message": "Malformed input request: #: bad"},
    }


def test_bedrock_error_message_spellings() -> None:
    answer = BedrockAdapter().upstream_error(403, Headers(x_amzn_errortype="AccessDeniedException"))
    assert answer is not None
    # IAM spells it Message; a non-JSON body is its text; an empty one names the type.
    assert (
        json.loads(answer.body(b'{"Message":"User: arn:x is not authorized"}'))["error"]["message"]
        == "User: arn:x is not authorized"
    )
    assert json.loads(answer.body(b"<html>nope</html>"))["error"]["message"] == "<html>nope</html>"
    assert (
        json.loads(answer.body(b""))["error"]["message"]
        == "Amazon Bedrock answered AccessDeniedException."
    )
    huge = json.loads(answer.body(b"x" * 100_000))["error"]["message"]
    assert len(huge) < 5000


def test_answers_not_from_bedrock_are_left_alone() -> None:
    # The proxy's own refusals carry no AWS header: they are already Anthropic errors.
    assert BedrockAdapter().upstream_error(404, Headers(content_type="application/json")) is None


def test_an_anthropic_error_from_bedrock_keeps_its_message() -> None:
    answer = BedrockAdapter().upstream_error(400, Headers(x_amzn_requestid="r"))
    assert answer is not None
    body = b'{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}'
    assert json.loads(answer.body(body))["error"] == {
        "type": "invalid_request_error",
        "message": "bad",
    }


def test_bedrock_secrets_include_the_key_id() -> None:
    secrets = BedrockAdapter().secrets(provider())
    assert set(secrets) >= {CREDENTIALS.access_key_id, CREDENTIALS.secret_access_key}


def test_error_frames_and_unknown_events() -> None:
    error_frame = encode_event_message(
        {":message-type": "error", ":error-code": "InternalFailure", ":error-message": "boom"}, b""
    )
    initial = encode_event_message(
        {":message-type": "event", ":event-type": "initial-response"}, b"{}"
    )
    out = EventStreamToSse().feed(initial + error_frame)
    assert json.loads(out.split(b"data: ", 1)[1])["error"] == {
        "type": "api_error",
        "message": "InternalFailure: boom",
    }


def test_a_stream_cut_mid_frame_ends_with_an_error_event() -> None:
    transform = EventStreamToSse()
    assert transform.feed(FRAMES[0] + FRAMES[1][:20]) == sse(EVENTS[0])
    end = transform.feed(b"")
    assert end.startswith(b"event: error\n")
    assert b"ended in the middle of an event" in end


def test_a_corrupt_frame_is_reported_once_then_the_stream_stays_silent() -> None:
    corrupt = bytearray(FRAMES[1])
    corrupt[-1] ^= 0xFF  # message CRC no longer matches
    transform = EventStreamToSse()
    out = transform.feed(FRAMES[0] + bytes(corrupt))
    assert out.startswith(sse(EVENTS[0]) + b"event: error\n")
    assert b"malformed event stream" in out
    assert transform.feed(FRAMES[2]) == b""
    assert transform.feed(b"") == b""


def test_event_json_with_newlines_is_reencoded_onto_one_data_line() -> None:
    event_json = b'{\n "type": "ping"\n}'
    payload = json.dumps({"bytes": base64.b64encode(event_json).decode()}).encode()
    frame = encode_event_message({":message-type": "event", ":event-type": "chunk"}, payload)
    assert EventStreamToSse().feed(frame) == b'event: ping\ndata: {"type":"ping"}\n\n'
