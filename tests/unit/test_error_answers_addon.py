"""The error-answer addon on its own: buffered and streamed upstream errors, converted
(Bedrock) and redacted, driven with mitmproxy's test flows."""

from __future__ import annotations

import gzip
import json

from aibridgeproxyd.addons.error_answers import UpstreamErrorAnswers
from mitmproxy import http
from mitmproxy.test import tflow

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.errors import SecretRedactor, error_answer, redact_headers
from aibridgeproxyd.interception.state import METADATA_KEY, ConnectInfo, RequestContext
from aibridgeproxyd.mitm.http_layer import RESEND
from tests.unit.test_adapters_common import routed

KEY = "sk-central-unit-0123456789abcdef"
AWS_SETTINGS = {
    "region": "us-east-1",
    "access_key_id": "AKIDUNITEXAMPLE",
    "secret_access_key": "unit/secret+key/abcdef012345",
    "session_token": "unit-session-token-000111",
    "model": "m",
}


def flow_for(provider_type: str, status: int, body: bytes, headers: dict[str, str], **fields):  # type: ignore[no-untyped-def]
    provider = routed(provider_type, **fields)
    flow = tflow.tflow(resp=True)
    flow.response = http.Response.make(status, body, headers)
    flow.metadata[METADATA_KEY] = RequestContext(
        request_id="r",
        connect=ConnectInfo("h", 443),
        provider=provider,
        adapter=ADAPTERS[provider_type],
    )
    return flow


def streamed(flow: http.HTTPFlow, chunks: list[bytes]) -> bytes:
    stream = flow.response.stream  # type: ignore[union-attr]
    assert callable(stream)
    out = b""
    for chunk in [*chunks, b""]:
        result = stream(chunk)
        out += result if isinstance(result, bytes) else b"".join(result)
    return out


def test_a_buffered_echo_loses_the_key() -> None:
    body = json.dumps({"error": {"echo": f"Bearer {KEY}"}}).encode()
    flow = flow_for("openai", 400, body, {"content-type": "application/json"}, keys=(KEY,))
    UpstreamErrorAnswers().response(flow)
    assert flow.response is not None
    assert KEY.encode() not in (flow.response.content or b"")
    assert flow.response.headers["content-length"] == str(len(flow.response.content or b""))


def test_a_streamed_echo_split_anywhere_loses_the_key() -> None:
    body = json.dumps({"error": {"echo": f"Bearer {KEY}"}}).encode()
    flow = flow_for("openai", 400, b"", {"content-type": "application/json"}, keys=(KEY,))
    assert flow.response is not None
    flow.response.stream = True
    UpstreamErrorAnswers().responseheaders(flow)
    out = streamed(flow, [body[i : i + 3] for i in range(0, len(body), 3)])
    assert KEY.encode() not in out and b"***" in out
    assert json.loads(out)["error"]["echo"] == "Bearer ***"


def test_a_streamed_gzip_error_is_decoded_before_redaction() -> None:
    body = gzip.compress(json.dumps({"echo": KEY}).encode())
    flow = flow_for("openai", 401, b"", {"content-encoding": "gzip"}, keys=(KEY,))
    assert flow.response is not None
    flow.response.stream = True
    UpstreamErrorAnswers().responseheaders(flow)
    assert "content-encoding" not in flow.response.headers
    assert json.loads(streamed(flow, [body[:5], body[5:]])) == {"echo": "***"}


def test_a_buffered_bedrock_error_becomes_an_anthropic_error_without_secrets() -> None:
    message = f"bad: {AWS_SETTINGS['secret_access_key']} {AWS_SETTINGS['session_token']}"
    flow = flow_for(
        "bedrock",
        503,
        json.dumps({"message": message}).encode(),
        {"x-amzn-errortype": "ServiceUnavailableException", "content-type": "application/json"},
        settings=AWS_SETTINGS,
    )
    UpstreamErrorAnswers().response(flow)
    assert flow.response is not None and flow.response.status_code == 529
    assert json.loads(flow.response.content or b"") == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "bad: *** ***"},
    }


def test_a_streamed_bedrock_error_gets_its_status_before_the_headers_leave() -> None:
    flow = flow_for(
        "bedrock", 400, b"", {"x-amzn-errortype": "ThrottlingException"}, settings=AWS_SETTINGS
    )
    assert flow.response is not None
    flow.response.stream = True
    UpstreamErrorAnswers().responseheaders(flow)
    assert flow.response.status_code == 429
    out = streamed(flow, [b'{"message":', b'"slow down"}'])
    assert json.loads(out)["error"] == {"type": "rate_limit_error", "message": "slow down"}


def test_successful_answers_and_unrouted_flows_are_left_alone() -> None:
    flow = flow_for("openai", 200, KEY.encode(), {}, keys=(KEY,))
    UpstreamErrorAnswers().response(flow)
    assert flow.response is not None and flow.response.content == KEY.encode()
    plain = tflow.tflow(resp=True)
    UpstreamErrorAnswers().response(plain)
    UpstreamErrorAnswers().responseheaders(plain)


def test_an_echo_in_a_response_header_loses_the_key() -> None:
    flow = flow_for("openai", 400, b"{}", {"x-echo": f"authorization=Bearer {KEY}"}, keys=(KEY,))
    UpstreamErrorAnswers().responseheaders(flow)
    assert flow.response is not None
    assert flow.response.headers["x-echo"] == "authorization=Bearer ***"


def test_an_answer_discarded_for_key_failover_is_left_alone() -> None:
    flow = flow_for("openai", 401, b"", {"x-echo": KEY}, keys=(KEY,))
    assert flow.response is not None
    flow.response.stream = True
    flow.metadata[RESEND] = True
    UpstreamErrorAnswers().responseheaders(flow)
    assert flow.response.headers["x-echo"] == KEY and flow.response.stream is True


def test_a_streamed_error_without_secrets_or_conversion_streams_untouched() -> None:
    flow = flow_for("openai-compat", 400, b"", {}, base_url="http://h/v1")
    assert flow.response is not None
    flow.response.stream = True
    flow.response.headers["content-length"] = "2"
    UpstreamErrorAnswers().responseheaders(flow)
    assert flow.response.stream is True and flow.response.headers["content-length"] == "2"


# --- the body and header rules (aibridgeproxyd.errors) ---------------------------------------


def test_error_answer_decodes_redacts_and_converts_twice_redacted() -> None:
    redactor = SecretRedactor([KEY])
    assert error_answer(f"echo {KEY}".encode(), redactor) == b"echo ***"
    gzipped = gzip.compress(f"echo {KEY}".encode())
    assert error_answer(gzipped, redactor, content_encoding="gzip") == b"echo ***"
    # Cut short or not what it claims: nothing of it can be checked, so nothing is sent.
    assert error_answer(gzipped[:10], redactor, content_encoding="gzip") == b""
    seen: list[bytes] = []

    def convert(body: bytes) -> bytes:
        seen.append(body)
        return body + b" and " + KEY.encode()  # a conversion that un-escapes a secret

    assert error_answer(KEY.encode(), redactor, convert) == b"*** and ***"
    assert seen == [b"***"]


def test_redact_headers_rewrites_only_values_with_a_secret() -> None:
    headers = http.Headers(((b"x-echo", f"k={KEY}".encode()), (b"x-ok", b"fine")))
    redact_headers(headers, SecretRedactor([KEY]))
    assert headers["x-echo"] == "k=***" and headers["x-ok"] == "fine"
    untouched = http.Headers(((b"x-echo", KEY.encode()),))
    redact_headers(untouched, SecretRedactor([]))
    assert untouched["x-echo"] == KEY
