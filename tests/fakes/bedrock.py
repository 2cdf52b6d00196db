"""A fake Amazon Bedrock runtime: InvokeModel and InvokeModelWithResponseStream for Claude.

It checks every request the way Bedrock does before answering: the SigV4 signature is
recomputed with botocore from the same credentials (a mismatch is a 403
InvalidSignatureException), and the body must be a Bedrock Anthropic body (a 400
ValidationException otherwise). Streams go out as a real AWS event-stream, frame by frame:

    with FakeBedrock(credentials=CREDENTIALS, region="us-east-1") as bedrock:
        # provider: type bedrock, base_url=bedrock.origin, settings from CREDENTIALS
        ...
        (request,) = bedrock.requests
        assert request.path == "/model/anthropic.claude-sonnet-4-5-v1%3A0/invoke"

The frame encoder below follows the public event-stream format (prelude with lengths and a
CRC32, typed headers, payload, message CRC32), so unit tests can feed real frames too.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hmac
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from .provider_fake import ProviderFake
from .tls import Receive, RecordedRequest, Scope, Send, read_request, send_json
from .upstream import DEFAULT_EVENTS, messages

EVENT_STREAM_CONTENT_TYPE = "application/vnd.amazon.eventstream"
_STRING_HEADER = 7  # the event-stream header value type for UTF-8 strings
_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<signature>[0-9a-f]{64})"
)
_INVOKE_PATH = re.compile(
    r"/model/(?P<model>[^/]+)/(?P<operation>invoke|invoke-with-response-stream)"
)
# Clock skew Bedrock tolerates on X-Amz-Date.
MAX_SKEW = datetime.timedelta(minutes=5)
# Fields a Bedrock Anthropic body may carry (the rest are "extraneous keys").
BEDROCK_BODY_FIELDS = frozenset(
    {
        "anthropic_version",
        "anthropic_beta",
        "max_tokens",
        "system",
        "messages",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "stop_sequences",
        "thinking",
        "metadata",
        "output_config",
        "context_management",
    }
)


# --- the event-stream wire format ----------------------------------------------------------------


def encode_event_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (total length, headers length, CRC32 of both),
    string-typed headers, payload, and the CRC32 of everything before it."""
    encoded_headers = b"".join(
        struct.pack("B", len(name.encode()))
        + name.encode()
        + struct.pack("!BH", _STRING_HEADER, len(value.encode()))
        + value.encode()
        for name, value in headers.items()
    )
    total_length = 12 + len(encoded_headers) + len(payload) + 4
    prelude = struct.pack("!II", total_length, len(encoded_headers))
    prelude += struct.pack("!I", binascii.crc32(prelude))
    message = prelude + encoded_headers + payload
    return message + struct.pack("!I", binascii.crc32(message))


def chunk_message(event: Mapping[str, Any], padding: str = "abcdefghij") -> bytes:
    """A `chunk` event carrying one Anthropic stream event, padded like Bedrock pads them."""
    encoded = base64.b64encode(json.dumps(event, separators=(",", ":")).encode()).decode()
    payload = json.dumps({"bytes": encoded, "p": padding}).encode()
    headers = {
        ":event-type": "chunk",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return encode_event_message(headers, payload)


def exception_message(exception_type: str, message: str) -> bytes:
    headers = {
        ":exception-type": exception_type,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return encode_event_message(headers, json.dumps({"message": message}).encode())


def anthropic_stream_events(model: str, events: int = DEFAULT_EVENTS) -> list[dict[str, Any]]:
    """The Messages stream events the Anthropic fake sends, with Bedrock's invocation metrics
    on the last one, as Bedrock adds them."""
    frames = messages({"model": model, "stream": True}, events, 1)
    assert isinstance(frames, list)
    decoded = [json.loads(frame.split(b"data: ", 1)[1]) for frame in frames]
    decoded[-1]["amazon-bedrock-invocationMetrics"] = {
        "inputTokenCount": 11,
        "outputTokenCount": events,
        "invocationLatency": 42,
        "firstByteLatency": 7,
    }
    return decoded


# --- SigV4 verification --------------------------------------------------------------------------


@dataclass(frozen=True)
class AwsCredentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def as_settings(self) -> dict[str, str]:
        settings = {
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
        }
        if self.session_token:
            settings["session_token"] = self.session_token
        return settings


def sigv4_problem(
    request: RecordedRequest,
    credentials: AwsCredentials,
    region: str,
    service: str = "bedrock",
    now: datetime.datetime | None = None,
) -> str | None:
    """Why the request's SigV4 signature is not valid for these credentials, or None.

    As AWS does it: the scope must name our key, region and service; host, x-amz-date (and the
    session token, when there is one) must be signed; the signature is recomputed over exactly
    the headers the client listed, the raw path and the body, and compared in constant time.
    """
    authorization = request.headers.get("authorization", "")
    match = _AUTHORIZATION.fullmatch(authorization)
    if match is None:
        return f"malformed Authorization header {authorization!r}"
    amz_date = request.headers.get("x-amz-date", "")
    if match["key"] != credentials.access_key_id:
        return f"unknown access key {match['key']!r}"
    if (match["region"], match["service"]) != (region, service):
        return f"scope names {match['region']}/{match['service']}, expected {region}/{service}"
    if match["date"] != amz_date[:8]:
        return "the credential scope date does not match X-Amz-Date"
    try:
        signed_at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.UTC
        )
    except ValueError:
        return f"malformed X-Amz-Date {amz_date!r}"
    if abs((now or datetime.datetime.now(datetime.UTC)) - signed_at) > MAX_SKEW:
        return f"X-Amz-Date {amz_date} is too far from now"
    signed = match["signed"].split(";")
    required = {"host", "x-amz-date"} | (
        {"x-amz-security-token"} if credentials.session_token else set()
    )
    if missing := required - set(signed):
        return f"headers not signed: {sorted(missing)}"
    if (
        credentials.session_token
        and request.headers.get("x-amz-security-token") != credentials.session_token
    ):
        return "wrong session token"
    absent = [name for name in signed if name not in request.headers]
    if absent:
        return f"signed headers missing from the request: {absent}"
    aws_request = AWSRequest(
        method=request.method,
        url=f"https://{request.headers['host']}{request.path}",
        data=request.body,
        headers={name: request.headers[name] for name in signed},
    )
    aws_request.context["timestamp"] = amz_date
    signer = SigV4Auth(
        Credentials(
            credentials.access_key_id, credentials.secret_access_key, credentials.session_token
        ),
        service,
        region,
    )
    canonical = signer.canonical_request(aws_request)
    expected = signer.signature(signer.string_to_sign(aws_request, canonical), aws_request)
    if not hmac.compare_digest(expected, match["signature"]):
        return "signature mismatch"
    return None


# --- the fake ------------------------------------------------------------------------------------


class FakeBedrock(ProviderFake):
    """A TLS fake of bedrock-runtime on 127.0.0.1:<free port> (h2 and HTTP/1.1)."""

    name = "fake-bedrock"

    def __init__(
        self, *, credentials: AwsCredentials, region: str = "us-east-1", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.credentials = credentials
        self.region = region
        self.stream_events = DEFAULT_EVENTS
        # Frames appended after the Anthropic events of every stream (e.g. an exception).
        self.trailing_frames: list[bytes] = []
        self.signature_problems: list[str] = []
        # (status, x-amzn-ErrorType, message): answer every valid request with this error.
        self.forced_error: tuple[int, str, str] | None = None

    def reset(self) -> None:
        super().reset()
        self.stream_events = DEFAULT_EVENTS
        self.trailing_frames = []
        self.signature_problems.clear()
        self.forced_error = None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = await read_request(scope, receive)
        self.record(request)
        match = _INVOKE_PATH.fullmatch(request.path)  # no query: Bedrock's paths take none
        if request.method != "POST" or match is None:
            await _aws_error(
                send,
                404,
                "UnknownOperationException",
                f"no route for {request.method} {request.path}",
            )
            return
        problem = sigv4_problem(request, self.credentials, self.region)
        if problem is not None:
            self.signature_problems.append(problem)
            await _aws_error(
                send,
                403,
                "InvalidSignatureException",
                f"The request signature we calculated does not match the signature you provided ({problem}).",
            )
            return
        if self.forced_error is not None:
            await _aws_error(send, *self.forced_error)
            return
        body_problem = _body_problem(request.body)
        if body_problem is not None:
            await _aws_error(send, 400, "ValidationException", body_problem)
            return
        model = unquote(match["model"])
        if match["operation"] == "invoke":
            await send_json(send, 200, messages({"model": model}, self.stream_events, 1))
            return
        frames = [
            chunk_message(event) for event in anthropic_stream_events(model, self.stream_events)
        ]
        await self.send_stream(
            send, receive, request, EVENT_STREAM_CONTENT_TYPE, frames + self.trailing_frames
        )


def _body_problem(body: bytes) -> str | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return "Malformed input request: the body is not JSON"
    if not isinstance(payload, dict):
        return "Malformed input request: expected a JSON object"
    if extraneous := sorted(set(payload) - BEDROCK_BODY_FIELDS):
        return f"Malformed input request: #: extraneous key [{extraneous[0]}] is not permitted"
    if payload.get("anthropic_version") != "bedrock-2023-05-31":
        return "Malformed input request: anthropic_version must be bedrock-2023-05-31"
    return None


async def _aws_error(send: Send, status: int, error_type: str, message: str) -> None:
    # As AWS sends them: the type with its namespace, and a request id on every answer.
    await send_json(
        send,
        status,
        {"message": message},
        [
            (
                "x-amzn-errortype",
                f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/",
            ),
            ("x-amzn-requestid", "00000000-0000-4000-8000-000000000000"),
        ],
    )
