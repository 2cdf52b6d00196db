"""The proxy's error answers: retry hints, mitmproxy's failures told without detail, and the
redaction of secrets from error bodies (whole and streamed)."""

from __future__ import annotations

import base64
import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.http import Headers

from aibridgeproxyd.errors import (
    SHOULD_RETRY_HEADER,
    SecretRedactor,
    error_response,
    redaction_secrets,
    should_retry,
    upstream_failure,
)
from aibridgeproxyd.model import ApiFormat

KEY = "sk-central-0123456789abcdefXYZ"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY+q"


# --- refusals ---------------------------------------------------------------------------------


def test_an_answer_on_the_listener_is_one_line_of_text() -> None:
    response = error_response(
        None,
        413,
        "Too big.",
        "request_too_large",
        {"Connection": "close"},
        should_retry_header=False,
    )
    assert response.content == b"Too big.\n"
    assert list(response.headers.items()) == [
        ("Content-Type", "text/plain"),
        ("Connection", "close"),
        ("content-length", "9"),
    ]


def test_an_answer_on_a_mitmd_host_is_in_the_client_format_without_a_retry_hint() -> None:
    response = error_response(
        ApiFormat.ANTHROPIC, 413, "Too big.", "request_too_large", should_retry_header=False
    )
    assert response.headers["Content-Type"] == "application/json"
    assert SHOULD_RETRY_HEADER not in response.headers
    assert json.loads(response.content)["error"]["message"] == "Too big."


def test_a_retryable_answer_on_the_listener_carries_no_retry_hint() -> None:
    response = error_response(None, 503, "Busy; retry.", "proxy_overloaded")
    assert (response.content, SHOULD_RETRY_HEADER in response.headers) == (b"Busy; retry.\n", False)


# --- retry hints ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "retry"),
    [
        (403, "no_key_configured", False),
        (403, "byok_not_allowed", False),
        (413, "request_too_large", False),
        (404, "unsupported_endpoint", False),
        (400, "invalid_request_body", False),
        (502, "all_keys_rejected", False),
        (502, "upstream_certificate_untrusted", False),
        (429, "all_keys_rate_limited", True),
        (502, "upstream_unreachable", True),
        (502, "upstream_closed", True),
        (504, "upstream_timeout", True),
    ],
)
def test_permanent_refusals_tell_sdks_not_to_retry(status: int, code: str, retry: bool) -> None:
    assert should_retry(status, code) is retry
    response = error_response(ApiFormat.ANTHROPIC, status, "m", code)
    assert response.status_code == status
    assert response.headers.get(SHOULD_RETRY_HEADER) == (None if retry else "false")
    assert json.loads(response.content or b"")["error"]["message"] == "m"


# --- mitmproxy's failures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("detail", "connect_failed", "status", "code"),
    [
        ("connection to ('10.1.2.3', 443) timed out", True, 504, "upstream_timeout"),
        (
            "Certificate verify failed: unable to get local issuer certificate",
            True,
            502,
            "upstream_certificate_untrusted",
        ),
        ("The remote server does not speak TLS.", True, 502, "upstream_tls_error"),
        ("[Errno 111] Connect call failed ('127.0.0.1', 9)", True, 502, "upstream_unreachable"),
        ("server closed connection", False, 502, "upstream_closed"),
        (
            "HTTP/1 protocol error: peer closed connection without sending complete message body",
            False,
            502,
            "upstream_closed",
        ),
        ("Cannot parse HTTP response: b'garbage'", False, 502, "upstream_bad_response"),
        (
            "Response body exceeds mitmproxy's body_size_limit.",
            False,
            502,
            "upstream_response_too_large",
        ),
    ],
)
def test_mitmproxy_failures_are_classified(
    detail: str, connect_failed: bool, status: int, code: str
) -> None:
    failure = upstream_failure(detail, connect_failed=connect_failed)
    assert (failure.status, failure.code) == (status, code)
    for internal in ("127.0.0.1", "10.1.2.3", "Errno", "garbage", "mitmproxy", "OpenSSL"):
        assert internal not in failure.message


def test_client_faults_keep_their_status() -> None:
    assert (
        upstream_failure(
            "Request body exceeds mitmproxy's body_size_limit.",
            connect_failed=False,
            client_error=413,
        ).status
        == 413
    )
    assert (
        upstream_failure("Invalid header b'x\\x00'", connect_failed=False, client_error=400).code
        == "invalid_request"
    )


# --- redaction ----------------------------------------------------------------------------------


def echo_forms(secret: str) -> list[bytes]:
    """The ways gateways were seen to quote a header back."""
    return [
        f"Authorization: Bearer {secret}".encode(),
        json.dumps({"headers": {"x-api-key": secret}}).encode(),
        json.dumps({"echo": secret}).replace("/", "\\/").encode(),
        b"Basic " + base64.b64encode(f"user:{secret}".encode()),
        b"Basic " + base64.b64encode(f"u:{secret}".encode()),
        b"Basic " + base64.b64encode(f":{secret}".encode()),
        b"?key=" + secret.replace("/", "%2F").replace("+", "%2B").encode(),
    ]


def assert_clean(body: bytes, secret: str) -> None:
    assert secret.encode() not in body
    assert json.dumps(secret)[1:-1].encode() not in body
    # No run of 12 characters of the secret survives, in any form checked above.
    for start in range(len(secret) - 12):
        assert secret[start : start + 12].encode() not in body


@pytest.mark.parametrize("secret", [KEY, AWS_SECRET])
def test_every_echoed_form_is_redacted(secret: str) -> None:
    redactor = SecretRedactor([secret])
    for form in echo_forms(secret):
        out = redactor.redact(b"before " + form + b" after")
        assert_clean(out, secret)
        assert out.startswith(b"before ") and out.endswith(b" after") and b"***" in out
        if b"Basic " in form:
            # Only the few characters that mix the key with its neighbours are left.
            encoded = out.split(b" ")[2]
            assert len(encoded.replace(b"***", b"")) <= 12, encoded


@pytest.mark.parametrize("secret", [KEY, AWS_SECRET])
def test_secrets_split_across_chunks_are_redacted(secret: str) -> None:
    body = b"".join(b"filler %d " % i + form for i, form in enumerate(echo_forms(secret))) + b" end"
    expected = SecretRedactor([secret]).redact(body)
    rng = random.Random(1)
    for chunk_size in (1, 2, 3, 7, 16, 33, len(body)):
        redactor = SecretRedactor([secret])
        out = b""
        position = 0
        while position < len(body):
            size = rng.randint(1, chunk_size)
            out += redactor.feed(body[position : position + size])
            position += size
        out += redactor.feed(b"")
        assert out == expected, chunk_size
        assert_clean(out, secret)


def test_streamed_redaction_holds_back_only_the_overlap() -> None:
    redactor = SecretRedactor([KEY])
    out = redactor.feed(b"x" * 10_000)
    assert len(out) > 10_000 - 200 and set(out) == {ord("x")}
    assert redactor.feed(b"") == b"x" * (10_000 - len(out))


def test_short_or_empty_values_are_not_secrets() -> None:
    redactor = SecretRedactor(["", "ab", "12345"])
    assert not redactor
    assert redactor.redact(b"ab 12345") == b"ab 12345"
    assert redactor.feed(b"ab") == b"ab"


def test_redaction_secrets_gather_keys_request_credentials_and_the_proxy_token() -> None:
    headers = Headers(authorization="Bearer sk-user-own-key-123", x_api_key="another-key-456")
    secrets = redaction_secrets([KEY, ""], headers, "abp_proxy_token_789")
    assert secrets == [KEY, "sk-user-own-key-123", "another-key-456", "abp_proxy_token_789"]


def test_redact_text_takes_a_lone_surrogate_and_still_redacts() -> None:
    # A prompt read from JSON may hold "\ud800" (JavaScript writes them): it raised
    # UnicodeEncodeError, and the interception's record was lost.
    redactor = SecretRedactor(["sk-live-0123456789"])
    assert redactor.redact_text("x\ud800 sk-live-0123456789") == "x\ufffd\ufffd\ufffd ***"
    assert redactor.redact_text("x\ud800 nothing") == "x\ud800 nothing"  # untouched


@given(st.text(alphabet="ab-k01", max_size=60))
def test_the_no_secret_fast_path_gives_what_the_pattern_gives(text: str) -> None:
    redactor = SecretRedactor(["ab-k01ab"])
    data = text.encode()
    expected = redactor._pattern.sub(b"***", data) if redactor._pattern else data  # type: ignore[union-attr]
    assert redactor.redact(data) == expected


@given(
    st.lists(
        st.text(alphabet=st.sampled_from("ab-k01 \x00\udcc3\udca9\ud800é"), max_size=20),
        max_size=5,
    )
)
def test_texts_said_to_hold_no_secret_are_left_as_they_are_by_redact_text(
    texts: list[str],
) -> None:
    for redactor in (SecretRedactor(["ab-k01ab"]), SecretRedactor(["k01é-ab-"])):
        if redactor.leaves_unchanged(texts):
            assert [redactor.redact_text(text) for text in texts] == texts


def test_a_secret_in_any_one_of_several_texts_is_found() -> None:
    redactor = SecretRedactor([KEY])
    texts = ["a prompt", '{"command": "ls"}', "OpenAI/Python 1.0"]
    assert redactor.leaves_unchanged(texts)
    for position in range(len(texts)):
        pasted = [*texts]
        pasted[position] += f" {KEY}"
        assert not redactor.leaves_unchanged(pasted)
    assert SecretRedactor([]).leaves_unchanged([KEY])


def test_escaped_bytes_of_a_secret_are_found_as_redact_text_finds_them() -> None:
    # surrogateescape turns "\udcc3\udca9" into the UTF-8 bytes of "é", as redact_text reads it.
    redactor = SecretRedactor(["k01é-ab-xyz"])
    text = "k01\udcc3\udca9-ab-xyz"
    assert redactor.redact_text(text) == "***"
    assert not redactor.leaves_unchanged(["x", text])
    assert not redactor.leaves_unchanged(["\ud800", "nothing"])  # then read text by text
