"""Upstream error answers on their way to the client
(docs/providers.md#keys-byok-and-the-proxys-own-errors).

Every error answer (status >= 400) of a routed request passes here, buffered or streamed:

- an upstream that speaks another format than the client has its errors converted (Bedrock's
  ``{"message"}`` + ``x-amzn-ErrorType`` become Anthropic errors, see the adapter's
  ``upstream_error``);
- every configured secret of the provider, the credentials the request carried upstream and the
  proxy token are redacted (``errors.SecretRedactor``): an upstream or gateway that echoes the
  request must not hand the central key to the client.

Runs after the route (whose failover may discard the answer) and the streaming decision, and
before the interception record, which logs buffered error bodies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mitmproxy import http

from aibridgeproxyd.adapters.base import UpstreamErrorAnswer
from aibridgeproxyd.errors import (
    SecretRedactor,
    decoded_error_body,
    error_answer,
    redact_headers,
)
from aibridgeproxyd.interception.recording import redactor_for
from aibridgeproxyd.interception.state import request_context
from aibridgeproxyd.mitm.http_layer import RESEND

# A streamed error body that must be read whole (to convert it, or to decompress it before
# redacting) is cut at this size: error bodies are small, and a larger one is no error message.
MAX_WHOLE_ERROR_BODY = 64 * 1024


class UpstreamErrorAnswers:
    """Converts and redacts upstream error answers: in ``responseheaders`` for streamed ones
    (status and headers leave before the body), in ``response`` for buffered ones."""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        response = flow.response
        if ctx is None or response is None or response.status_code < 400:
            return
        if flow.metadata.get(RESEND):
            return  # discarded: the request is sent again with the next key
        redactor = redactor_for(flow, ctx)
        redact_headers(response.headers, redactor)
        if response.stream:  # a buffered body is handled whole in `response`
            conversion = ctx.adapter.upstream_error(response.status_code, response.headers)
            _answer_streamed(response, conversion, redactor)

    def response(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        response = flow.response
        if ctx is None or response is None or response.status_code < 400 or response.stream:
            return
        conversion = ctx.adapter.upstream_error(response.status_code, response.headers)
        redactor = redactor_for(flow, ctx)
        if conversion is None and not redactor:
            return
        _answer_buffered(response, conversion, redactor)


def _answer_buffered(
    response: http.Response, conversion: UpstreamErrorAnswer | None, redactor: SecretRedactor
) -> None:
    """Convert and redact a buffered error answer, decoded within bounds
    (``errors.decoded_error_body``, never mitmproxy's unbounded ``get_content``)."""
    raw = response.raw_content or b""
    body = decoded_error_body(raw, response.headers.get("content-encoding"))
    answer = error_answer(body or b"", redactor, conversion.body if conversion else None)
    _convert_head(response, conversion)
    if body is None:
        # Undecodable, or a bomb: nothing of it can be checked, so nothing of it is sent.
        response.headers.pop("content-encoding", None)
        response.content = answer
    elif answer != body:
        response.content = answer  # re-encoded as the headers say; length updated


def _convert_head(response: http.Response, conversion: UpstreamErrorAnswer | None) -> None:
    if conversion is not None:
        response.status_code = conversion.status
        response.headers["content-type"] = "application/json"


def _answer_streamed(
    response: http.Response, conversion: UpstreamErrorAnswer | None, redactor: SecretRedactor
) -> None:
    """Set up a streamed error answer before its headers leave. To convert or to decompress it,
    the body is read whole (bounded) and answered at its end; otherwise secrets are redacted
    chunk by chunk. Either way its length changes: without one the client reads to the end."""
    content_encoding = response.headers.get("content-encoding", "identity").lower()
    if conversion is not None or content_encoding != "identity":
        _convert_head(response, conversion)
        response.headers.pop("content-length", None)
        response.headers.pop("content-encoding", None)
        convert = conversion.body if conversion is not None else None
        response.stream = _whole_body(
            lambda body: error_answer(body, redactor, convert, content_encoding)
        )
    elif redactor:
        response.headers.pop("content-length", None)
        response.stream = _chained(response.stream, redactor.feed)


def _whole_body(finish: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """A stream callable that keeps the body (up to MAX_WHOLE_ERROR_BODY) and sends
    ``finish(body)`` at its end."""
    parts: list[bytes] = []
    size = 0

    def feed(chunk: bytes) -> bytes:
        nonlocal size
        if chunk:
            room = MAX_WHOLE_ERROR_BODY - size
            if room > 0:
                parts.append(chunk[:room])
                size += min(room, len(chunk))
            return b""
        return finish(b"".join(parts))

    return feed


def _chained(
    stream: bool | Callable[[bytes], bytes | Iterable[bytes]], then: Callable[[bytes], bytes]
) -> Callable[[bytes], bytes]:
    if not callable(stream):
        return then
    first = stream

    def feed(chunk: bytes) -> bytes:
        out = first(chunk)
        data = out if isinstance(out, bytes) else b"".join(out)
        if not chunk:
            return then(data) + then(b"") if data else then(b"")
        return then(data)

    return feed
