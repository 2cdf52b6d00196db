"""Amazon Bedrock: Anthropic Messages in, Bedrock InvokeModel out, signed with AWS SigV4.

Claude clients keep talking to ``api.anthropic.com``. A ``POST /v1/messages`` becomes
``POST /model/<id>/invoke`` (or ``/invoke-with-response-stream``) with the body reshaped for
Bedrock, and the AWS event-stream answer is turned back into Anthropic SSE as each event
completes. The client's credentials never matter: ``interception.routing.route_request``
removes them, and the request is signed with the provider's AWS credentials from settings.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer, EventStreamMessage, ParserError

from aibridgeproxyd.adapters.base import (
    Adapter,
    DecodedBodyTooLarge,
    RouteRefusal,
    decoded_request_body,
    parsed_body_model,
    point_at,
    setting_text,
)
from aibridgeproxyd.credentials import CredentialMode
from aibridgeproxyd.errors import error_body
from aibridgeproxyd.model import ApiFormat, Provider, ProviderRecord, Upstream
from aibridgeproxyd.usage import BodyDecoder

if TYPE_CHECKING:
    from mitmproxy import http

# botocore logs the canonical request at debug level, and it carries the session token: a
# daemon run with --log-level debug must still never write a credential.
logging.getLogger("botocore.auth").setLevel(logging.INFO)

BEDROCK_ANTHROPIC_VERSION = "bedrock-2023-05-31"
SIGNING_SERVICE = "bedrock"
MESSAGES_PATH = "/v1/messages"
# bedrock-runtime.<region>.amazonaws.com, its -fips twin, and VPC endpoint names
# (vpce-…​.bedrock-runtime.<region>.vpce.amazonaws.com).
_REGION_IN_HOST = re.compile(r"(?:^|\.)bedrock-runtime(?:-fips)?\.([a-z]{2}(?:-[a-z]+)+-\d+)\.")
# Request headers that survive: every other one would either be signed by accident (and break
# when a hop changes it) or mean nothing to Bedrock (anthropic-*, x-stainless-*, proxy headers).
_KEPT_HEADERS = frozenset({"host", "user-agent"})
# Bedrock's error types (the bedrock-runtime service model's errors, plus the AWS-wide
# authentication errors) by the Anthropic error status they mean for a Claude client
# (https://docs.anthropic.com/en/api/errors). Keys are lower-case: stream exception frames spell
# them in camelCase (throttlingException), HTTP answers in PascalCase (ThrottlingException).
# Authentication failures are the proxy's own AWS credentials, never the client's: a 401 would
# make Claude clients ask their user to log in again, so they are a permission error.
BEDROCK_ERROR_STATUS = {
    "validationexception": 400,
    "accessdeniedexception": 403,
    "unrecognizedclientexception": 403,
    "invalidsignatureexception": 403,
    "incompletesignatureexception": 403,
    "missingauthenticationtokenexception": 403,
    "expiredtokenexception": 403,
    "invalidclienttokenid": 403,
    "resourcenotfoundexception": 404,
    "throttlingexception": 429,
    "servicequotaexceededexception": 429,
    "internalserverexception": 500,
    "modelerrorexception": 500,
    "modelstreamerrorexception": 500,
    "modeltimeoutexception": 504,
    "modelnotreadyexception": 529,
    "serviceunavailableexception": 529,
}
# Bedrock HTTP statuses without a known error type, by the Anthropic status they mean.
_BEDROCK_STATUS = {401: 403, 408: 504, 424: 500, 503: 529}
# An error body larger than this is not Bedrock's JSON error: it is cut to this many bytes.
MAX_ERROR_BODY = 64 * 1024
_MAX_MESSAGE = 4096


def anthropic_status(error_type: str | None, bedrock_status: int) -> int:
    """The Anthropic status for a Bedrock error: by its type (``x-amzn-ErrorType``, or the
    stream frame's ``:exception-type``; a ``:<namespace>`` suffix is ignored), else by its HTTP
    status (an unknown 4xx is an invalid request, an unknown 5xx an api_error)."""
    name = (error_type or "").split(":", 1)[0].strip().lower()
    if name in BEDROCK_ERROR_STATUS:
        return BEDROCK_ERROR_STATUS[name]
    if bedrock_status in _BEDROCK_STATUS:
        return _BEDROCK_STATUS[bedrock_status]
    if bedrock_status in (400, 403, 404, 413, 429, 500, 502, 504, 529):
        return bedrock_status
    return 400 if 400 <= bedrock_status < 500 else 500


def anthropic_error_json(
    error_type: str | None, bedrock_status: int, payload: bytes
) -> tuple[int, bytes]:
    """A Bedrock error answer (``{"message": ...}``, the type in ``x-amzn-ErrorType``) as an
    Anthropic one: ``(status, {"type": "error", "error": {"type", "message"}})``. A body that
    is already an Anthropic error keeps its type and message."""
    status = anthropic_status(error_type, bedrock_status)
    message = _message_of(payload[:MAX_ERROR_BODY])
    try:
        decoded = json.loads(payload[:MAX_ERROR_BODY])
    except (ValueError, RecursionError):
        decoded = None
    if isinstance(decoded, dict) and decoded.get("type") == "error":
        error = decoded.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
    if not message.strip():
        name = (error_type or "").split(":", 1)[0].strip() or f"HTTP {bedrock_status}"
        message = f"Amazon Bedrock answered {name}."
    return status, error_body(ApiFormat.ANTHROPIC, status, message, "bedrock_error")


class BedrockErrorAnswer:
    """An error answer of Bedrock (status >= 400) on its way to a Claude client. ``status``
    replaces the response's status before its headers go out; ``body`` turns the whole
    (bounded) Bedrock body into the Anthropic error JSON."""

    def __init__(self, error_type: str | None, bedrock_status: int) -> None:
        self.error_type = error_type
        self.bedrock_status = bedrock_status
        self.status = anthropic_status(error_type, bedrock_status)

    def body(self, payload: bytes) -> bytes:
        return anthropic_error_json(self.error_type, self.bedrock_status, payload)[1]


def bedrock_region(settings: Mapping[str, Any], upstream_host: str) -> str:
    """The signing region: ``settings.region``, else the one named in the endpoint host."""
    region = setting_text(settings, "region")
    if region:
        return region
    match = _REGION_IN_HOST.search(upstream_host)
    return match.group(1) if match else ""


def model_id(requested_model: str | None, settings: Mapping[str, Any]) -> str:
    """``small_fast_model`` for a model name containing ``haiku`` (when set), else ``model``:
    the client names Anthropic models, the operator decides which Bedrock ids serve them."""
    if requested_model is not None and "haiku" in requested_model.lower():
        return setting_text(settings, "small_fast_model") or setting_text(settings, "model")
    return setting_text(settings, "model")


def split_betas(values: Iterable[Any]) -> list[str]:
    """Beta names from ``anthropic-beta`` header values (comma-separated) and body lists."""
    betas: list[str] = []
    for value in values:
        if isinstance(value, str):
            betas.extend(part.strip() for part in value.split(",") if part.strip())
    return list(dict.fromkeys(betas))


class BedrockAdapter(Adapter):
    """Claude on Amazon Bedrock, for clients that talk to ``api.anthropic.com`` (see the module)."""

    type_name = "bedrock"
    genai_provider_name = "aws.bedrock"
    client_format = ApiFormat.ANTHROPIC
    default_hosts = ("api.anthropic.com",)
    version_prefix = ""
    secret_settings = frozenset({"secret_access_key", "session_token"})
    known_settings = frozenset(
        {
            "region",
            "access_key_id",
            "secret_access_key",
            "session_token",
            "model",
            "small_fast_model",
            "allowed_betas",
        }
    )
    credential_modes = frozenset({CredentialMode.SIGNED})
    no_keys_because = "it signs requests with the BEDROCK_* credentials"
    usage_formats = frozenset({ApiFormat.ANTHROPIC})  # clients speak only Messages
    environment_settings: ClassVar[Mapping[str, str]] = {
        "BEDROCK_REGION": "region",
        "BEDROCK_ACCESS_KEY": "access_key_id",
        "BEDROCK_ACCESS_KEY_SECRET": "secret_access_key",
        "BEDROCK_MODEL": "model",
        "BEDROCK_SMALL_FAST_MODEL": "small_fast_model",
    }
    credential_settings = frozenset({"access_key_id", "secret_access_key", "session_token"})
    # Top-level fields of an Anthropic request that InvokeModel rejects as extraneous keys:
    # model and stream live in the path; the rest are features of the first-party API only.
    rejected_body_fields: ClassVar[frozenset[str]] = frozenset(
        {"model", "stream", "service_tier", "container", "mcp_servers", "inference_geo"}
    )
    # Beta flags Bedrock accepts. Any other one (Claude Code always sends claude-code-*, and
    # oauth-* under a subscription) makes Bedrock answer 400 "invalid beta flag", so they are
    # dropped. Operators can replace the list with the ``allowed_betas`` setting.
    allowed_betas: ClassVar[frozenset[str]] = frozenset(
        {
            "computer-use-2024-10-22",
            "computer-use-2025-01-24",
            "computer-use-2025-11-24",
            "token-efficient-tools-2025-02-19",
            "interleaved-thinking-2025-05-14",
            "output-128k-2025-02-19",
            "dev-full-thinking-2025-05-14",
            "context-1m-2025-08-07",
            "context-management-2025-06-27",
            "effort-2025-11-24",
            "tool-search-tool-2025-10-19",
            "tool-examples-2025-10-29",
            "fine-grained-tool-streaming-2025-05-14",
            "compact-2026-01-12",
        }
    )

    # Derived from the region; a row without either is stored and shows status error.
    requires_base_url = False

    def base_url_default(self, record: ProviderRecord) -> str | None:
        region = setting_text(record.settings, "region")
        return f"https://bedrock-runtime.{region}.amazonaws.com" if region else None

    def base_url_problem(self, record: ProviderRecord) -> str:
        return (
            "bedrock region is not set: add the setting region (the AWS region, such as "
            "us-east-1) or a bedrock-runtime base_url"
        )

    def problem(self, record: ProviderRecord, upstream: Upstream) -> str | None:
        settings = record.settings
        if not bedrock_region(settings, upstream.host):
            return (
                f"bedrock region is not set and base_url host {upstream.host!r} names none: "
                "add the setting region (the AWS region, such as us-east-1)"
            )
        if not (
            setting_text(settings, "access_key_id") and setting_text(settings, "secret_access_key")
        ):
            return "bedrock credentials are missing: set both access_key_id and secret_access_key"
        if not setting_text(settings, "model"):
            return (
                "bedrock model is not set: add the setting model "
                "(a Bedrock model id or inference profile ARN)"
            )
        return None

    def secrets(self, provider: Provider) -> tuple[str, ...]:
        # The key id is not secret alone, but it names the account: never echoed either.
        return (*super().secrets(provider), setting_text(provider.settings, "access_key_id"))

    def request_model(self, request: http.Request) -> str | None:
        # Parsed whole, since it picks the Bedrock model id (haiku or not).
        return parsed_body_model(request)

    def upstream_error(self, status: int, headers: http.Headers) -> BedrockErrorAnswer | None:
        """Bedrock's own error answers (every AWS answer carries ``x-amzn-RequestId``; errors
        ``x-amzn-ErrorType``) become Anthropic errors. Anything else, such as the proxy's own
        refusals, is already in the client's format."""
        if "x-amzn-errortype" not in headers and "x-amzn-requestid" not in headers:
            return None
        return BedrockErrorAnswer(headers.get("x-amzn-errortype"), status)

    def rewrite(
        self, request: http.Request, provider: Provider, key: str | None
    ) -> EventStreamToSse | None:
        # The query is dropped: Claude Code adds ?beta=true, which means nothing to Bedrock.
        path = request.path.partition("?")[0]
        if request.method != "POST" or path != MESSAGES_PATH:
            raise RouteRefusal(
                404,
                f"Provider '{provider.name}' sends requests to Amazon Bedrock, which serves only "
                f"POST {MESSAGES_PATH}; {request.method} {path} is not available.",
                "unsupported_endpoint",
            )
        body = _json_object(request)
        upstream = self.upstream_for(request, provider)
        settings = provider.settings
        streaming = body.get("stream") is True
        invoke_body = self.invoke_body(body, request.headers.get_all("anthropic-beta"), settings)
        operation = "invoke-with-response-stream" if streaming else "invoke"
        # Percent-encoded like botocore does it: ids and ARNs carry ':' and '/'.
        # From the body parsed above, not parsed again (``request_model`` reads the same field).
        named = body.get("model")
        model = quote(model_id(named if isinstance(named, str) else None, settings), safe="")
        target = f"{upstream.path}/model/{model}/{operation}"

        for name in {name.lower() for name in request.headers}:
            if name not in _KEPT_HEADERS:
                del request.headers[name]
        point_at(request, upstream, target)
        request.headers["content-type"] = "application/json"
        # As botocore sends them: the body's format is asked with Accept, or with
        # X-Amzn-Bedrock-Accept when Accept describes the event-stream around it.
        request.headers["x-amzn-bedrock-accept" if streaming else "accept"] = "application/json"
        request.content = json.dumps(
            invoke_body, separators=(",", ":"), ensure_ascii=False
        ).encode()
        self.sign(request, upstream, settings)
        return EventStreamToSse() if streaming else None

    def invoke_body(
        self, body: Mapping[str, Any], beta_headers: Iterable[str], settings: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The InvokeModel body: rejected fields dropped, betas from the header moved into
        ``anthropic_beta`` (Bedrock ignores the header) and filtered, the version set."""
        allowed = _allowed_betas(settings, self.allowed_betas)
        body_betas = body.get("anthropic_beta")
        requested = split_betas(
            [*beta_headers, *(body_betas if isinstance(body_betas, list) else [])]
        )
        betas = [beta for beta in requested if beta in allowed]
        invoke_body = {
            name: value
            for name, value in body.items()
            if name not in self.rejected_body_fields
            and name not in ("anthropic_version", "anthropic_beta")
        }
        invoke_body["anthropic_version"] = BEDROCK_ANTHROPIC_VERSION
        if betas:
            invoke_body["anthropic_beta"] = betas
        return invoke_body

    def sign(self, request: http.Request, upstream: Upstream, settings: Mapping[str, Any]) -> None:
        """SigV4 over exactly what will be sent: method, path, body, and the headers set above.
        Host is the value mitmproxy writes into the Host header or the h2 authority."""
        # Imported here so the CLI, which reads the adapter registry, does not load mitmproxy.
        from mitmproxy.net.http import url

        credentials = Credentials(
            setting_text(settings, "access_key_id"),
            setting_text(settings, "secret_access_key"),
            setting_text(settings, "session_token") or None,
        )
        signed_headers = {
            name: request.headers[name]
            for name in ("content-type", "accept", "x-amzn-bedrock-accept")
            if name in request.headers
        }
        signed_headers["host"] = url.hostport(upstream.scheme, upstream.host, upstream.port)
        aws_request = AWSRequest(
            method=request.method,
            url=f"{upstream.origin}{request.path}",
            data=request.raw_content,
            headers=signed_headers,
        )
        SigV4Auth(credentials, SIGNING_SERVICE, bedrock_region(settings, upstream.host)).add_auth(
            aws_request
        )
        for name in ("X-Amz-Date", "X-Amz-Security-Token", "Authorization"):
            if name in aws_request.headers:
                request.headers[name.lower()] = aws_request.headers[name]


class EventStreamToSse:
    """AWS event-stream frames in, Anthropic SSE out, one event per completed frame.

    Each ``chunk`` event carries ``{"bytes": base64(<Anthropic stream event JSON>)}``; it leaves
    as ``event: <type>`` / ``data: <json>``. Stream exceptions become an Anthropic ``error``
    event. Only the unfinished frame is buffered, so the work per chunk does not grow with the
    length of the stream.
    """

    def __init__(self) -> None:
        self._frames = EventStreamBuffer()
        self._pending = 0  # bytes fed but not yet part of a completed frame
        self._failed = False
        # The upstream's Content-Encoding, undone in bounded pieces (``usage.BodyDecoder``):
        # what leaves is plain SSE, so the header goes (the client's decoder failed on it).
        self._decoder: BodyDecoder | None = None
        self._undecodable: str | None = None

    def start(self, response: http.Response) -> None:
        response.headers["content-type"] = "text/event-stream"
        response.headers.pop("content-length", None)
        encoding = (response.headers.pop("content-encoding", "") or "").strip().lower()
        if encoding and encoding != "identity":
            try:
                self._decoder = BodyDecoder(encoding)
            except (ValueError, ImportError):
                self._undecodable = encoding

    def feed(self, chunk: bytes) -> bytes:
        if self._failed:
            return b""
        if self._undecodable is not None:
            return self._fail(f"Bedrock sent an event stream in {self._undecodable!r} coding.")
        out, pieces = [], self._decoded(chunk)
        while not self._failed:
            try:
                piece = next(pieces, None)
            except Exception:  # zlib.error, brotli.error, ZstdError, DecodingRatioExceeded
                out.append(self._fail("Bedrock sent an event stream that cannot be decoded."))
                break
            if piece is None:
                break
            out.append(self._frames_of(piece))
        if not chunk and self._pending and not self._failed:
            out.append(self._fail("The Bedrock stream ended in the middle of an event."))
        return b"".join(out)

    def _decoded(self, chunk: bytes) -> Iterator[bytes]:
        """``chunk`` as the event-stream parser reads it; b"" (the end) flushes the decoder."""
        if self._decoder is None:
            yield chunk
        elif chunk:
            yield from self._decoder.decode(chunk)
        else:
            yield self._decoder.flush()

    def _frames_of(self, data: bytes) -> bytes:
        """The SSE events of the frames ``data`` completes."""
        if not data:
            return b""
        self._frames.add_data(data)
        self._pending += len(data)
        out = []
        try:
            for message in self._frames:
                self._pending -= message.prelude.total_length
                out.append(self._convert(message))
        except (ParserError, ValueError, binascii.Error, RecursionError):
            # RecursionError: an event nested deeper than json can parse.
            out.append(self._fail("Bedrock sent a malformed event stream."))
        return b"".join(out)

    def _convert(self, message: EventStreamMessage) -> bytes:
        headers = message.headers
        message_type = headers.get(":message-type")
        if message_type == "exception":
            # Bedrock's ResponseStream exceptions, typed like its HTTP errors.
            _, body = anthropic_error_json(
                str(headers.get(":exception-type", "")), 500, message.payload
            )
            return b"event: error\ndata: " + body + b"\n\n"
        if message_type == "error":
            code = str(headers.get(":error-code", "error"))
            return _error_event(500, f"{code}: {headers.get(':error-message', '')}")
        if headers.get(":event-type") != "chunk":
            return b""  # e.g. initial-response: nothing an Anthropic client expects
        part = json.loads(message.payload)
        encoded = part.get("bytes") if isinstance(part, dict) else None
        if not isinstance(encoded, str):
            return b""
        return _sse_event(base64.b64decode(encoded, validate=True))

    def _fail(self, message: str) -> bytes:
        # After a framing error nothing later can be trusted: say so once, then stay silent.
        self._failed = True
        return _error_event(500, message)


def _sse_event(event_json: bytes) -> bytes:
    event = json.loads(event_json)
    if b"\n" in event_json or b"\r" in event_json:
        event_json = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    name = event.get("type") if isinstance(event, dict) else None
    prefix = f"event: {name}\n".encode() if isinstance(name, str) else b""
    return prefix + b"data: " + event_json + b"\n\n"


def _error_event(status: int, message: str) -> bytes:
    return (
        b"event: error\ndata: "
        + error_body(ApiFormat.ANTHROPIC, status, message, "bedrock_stream_error")
        + b"\n\n"
    )


def _message_of(payload: bytes) -> str:
    """The ``message`` (or ``Message``) of a Bedrock error body, else its text, shortened."""
    try:
        decoded = json.loads(payload)
    except (ValueError, RecursionError):
        decoded = None
    message = (
        decoded.get("message") or decoded.get("Message") if isinstance(decoded, dict) else None
    )
    text = str(message) if message else payload.decode("utf-8", "replace").strip()
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


def _allowed_betas(settings: Mapping[str, Any], default: frozenset[str]) -> frozenset[str]:
    configured = settings.get("allowed_betas")
    if isinstance(configured, list | str):
        return frozenset(split_betas(configured if isinstance(configured, list) else [configured]))
    return default


def _json_object(request: http.Request) -> dict[str, Any]:
    try:
        body = json.loads(decoded_request_body(request) or b"")
    except DecodedBodyTooLarge as exc:
        raise RouteRefusal(
            413,
            "The request body decodes to more than this proxy reads "
            f"({exc.limit} bytes once its Content-Encoding is undone).",
            "request_too_large",
        ) from None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can parse
        body = None  # UndecodableBody (a ValueError) included
    if not isinstance(body, dict):
        raise RouteRefusal(
            400,
            "The request body must be a JSON object (Anthropic Messages).",
            "invalid_request_body",
        )
    return body
