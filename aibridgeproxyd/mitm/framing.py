"""Strict HTTP/1 request framing on every connection the proxy reads requests from.

mitmproxy's HTTP/1 server chooses how to read a request body (``expected_http_body_size``)
before its stream checks the head for request smuggling (``validate_headers``, RFC 9112
section 6.3). For a request with both ``Content-Length`` and ``Transfer-Encoding: chunked`` it
reads the body as chunked, and when the stream then refuses the request, the bytes behind the
chunked body (what ``Content-Length`` would have framed differently) are parsed as the next
request. Its refusals are HTML pages that echo the request line.

``FramingHttp1Server`` decides the framing once, strictly, when the head arrives:

- the head must parse (request line, header lines), header names must be tokens, and the
  framing headers must be unambiguous: no ``Content-Length`` next to ``Transfer-Encoding``, one
  of each at most, ``Transfer-Encoding`` only on HTTP/1.1 and only ending in ``chunked``,
  ``Content-Length`` a plain decimal number, neither folded over lines (obs-fold);
- a request that breaks any of these is answered ``400`` and the connection is closed at once,
  so no byte after the bad head is ever read as a request; a chunked body whose framing breaks
  (chunk size, chunk end) gets the same answer if no response has started;
- every error answer of the connection (mitmproxy's ``ResponseProtocolError``) is ours: the
  client format's JSON shape on a MITM'd host (``error_format``), a one-line plain text on the
  proxy's own listener, never mitmproxy's HTML page, never an echo of what the client sent.

Responses: mitmproxy already closes an upstream connection whose answer has broken framing
(unparseable head or length: ``Http1Client.read_headers``; contradicting headers:
``HttpStream.check_invalid``; a broken chunk: ``read_body``), so it is never reused. A 1xx,
204 or 304 answer leaves without ``Transfer-Encoding`` (``headless_framing``).

Sources: RFC 9112 sections 2.2, 5.2, 6.1 and 6.3; mitmproxy 12.3
``proxy/layers/http/_http1.py`` and ``net/http/validate.py``, whose methods are mirrored here.
"""

from __future__ import annotations

import logging
import re

from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1, validate
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    RequestHeaders,
    RequestProtocolError,
    ResponseData,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import HttpEvent
from mitmproxy.proxy.layers.http._http1 import Http1Server, make_body_reader

from aibridgeproxyd.errors import (
    PROXY_REFUSED,
    SHOULD_RETRY_HEADER,
    error_response,
    reason_phrase,
)
from aibridgeproxyd.mitm.responses import http1_bytes
from aibridgeproxyd.model import ApiFormat

log = logging.getLogger("aibridgeproxyd.framing")

# The machine-readable code of every framing refusal.
INVALID_REQUEST = "invalid_request"

# Transfer codings a request may declare (RFC 9112 section 6.1: chunked must be the final one);
# the same set mitmproxy forwards, normalised as ``validate.parse_transfer_encoding`` does.
_REQUEST_TRANSFER_ENCODINGS = frozenset(
    {"chunked", "compress,chunked", "deflate,chunked", "gzip,chunked"}
)

# What the client is told for mitmproxy's own error answers (the codes that have an HTTP
# status); mitmproxy's message may quote the request or the upstream's bytes, so it is not sent.
_PROTOCOL_ERRORS: dict[ErrorCode, str] = {
    ErrorCode.DESTINATION_UNKNOWN: (
        "The request names no destination: an origin-form request needs a Host header."
    ),
    ErrorCode.REQUEST_VALIDATION_FAILED: "The request's framing headers are not valid.",
    ErrorCode.GENERIC_CLIENT_ERROR: "The request is not valid HTTP.",
    ErrorCode.REQUEST_TOO_LARGE: "The request is too large for this proxy.",
    ErrorCode.CONNECT_FAILED: "The proxy could not connect to the destination.",
    ErrorCode.RESPONSE_VALIDATION_FAILED: "The upstream's answer had invalid framing headers.",
    ErrorCode.GENERIC_SERVER_ERROR: "The upstream's answer was not valid HTTP.",
    ErrorCode.RESPONSE_TOO_LARGE: "The upstream's answer is too large for this proxy.",
}
# How the error of a dial closed at upstream_connect_timeout ends (client_bounds.dial_timed_out).
_TIMED_OUT = ": timed out"
# The end of an HTTP/1 head, as h11 finds it (a blank line, with or without CR).
HEAD_END = re.compile(rb"\n\r?\n")
# mitmproxy's messages for these codes are its own fixed text, never quoted bytes: safe to log.
_FIXED_TEXT_CODES = frozenset({ErrorCode.DESTINATION_UNKNOWN, ErrorCode.CONNECT_FAILED})


def _client_message(event: ResponseProtocolError, status: int) -> str:
    """What the client is told for mitmproxy's error answer ``event``: fixed text per code, or
    a corporate proxy's refusal as ours (``errors.proxy_refusal``: its status, not its text)."""
    if event.code is ErrorCode.CONNECT_FAILED and event.message.startswith(PROXY_REFUSED):
        return f"The {event.message}."
    return _PROTOCOL_ERRORS.get(event.code, reason_phrase(status) + ".")


class FramingError(ValueError):
    """A request head whose framing cannot be trusted. ``str()`` is a one-line reason for the
    client, naming the problem without quoting any byte the client sent."""


def request_framing_error(request: http.Request) -> str | None:
    """Why ``request``'s head (as parsed by mitmproxy) frames its body ambiguously, or None.

    Checks what RFC 9112 section 6.3 makes a server refuse with 400 and close, plus header names
    that are not tokens (``Transfer-Encoding :`` is not ``Transfer-Encoding``, section 5.1)."""
    te: list[bytes] = []
    cl: list[bytes] = []
    for name, value in request.headers.fields:
        # mitmproxy's private token pattern: our check and its parser agree on a header name.
        if not validate._valid_header_name.match(name):
            return "A header name is not a valid token (no spaces before the colon)."
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            te.append(value)
        elif lowered == b"content-length":
            cl.append(value)
    for what, values in (("Transfer-Encoding", te), ("Content-Length", cl)):
        if any(b"\r" in v or b"\n" in v for v in values):
            return f"The {what} header is folded over several lines (obs-fold)."
    if te and cl:
        return "The request has both Content-Length and Transfer-Encoding."
    if len(te) > 1:
        return "The request has more than one Transfer-Encoding header."
    if len(cl) > 1:
        return "The request has more than one Content-Length header."
    if te:
        if not request.is_http11:
            return "Transfer-Encoding is only allowed in an HTTP/1.1 request."
        try:
            coding = validate.parse_transfer_encoding(te[0])
        except ValueError:
            coding = None
        if coding not in _REQUEST_TRANSFER_ENCODINGS:
            return "The request's Transfer-Encoding must be chunked (as the final coding)."
    if cl:
        try:
            validate.parse_content_length(cl[0])
        except ValueError:
            return "The Content-Length header is not a decimal number."
    return None


def request_body_size(request: http.Request) -> int | None:
    """The body length of a request head (bytes), or None for a chunked body.

    Raises:
        FramingError: the framing is ambiguous (``request_framing_error``)."""
    reason = request_framing_error(request)
    if reason is not None:
        raise FramingError(reason)
    size = http1.expected_http_body_size(request)
    if size is not None and size < 0:  # only for codings refused above; never read to EOF
        raise FramingError("The request's length cannot be determined.")
    return size


def head_error_reason(head_line: bytes, error: ValueError) -> str:
    """The client's reason for a head mitmproxy's parser refused (``error`` quotes the bytes)."""
    text = str(error)
    if text.startswith("Bad HTTP request line"):
        if head_line.startswith(b"CONNECT "):
            return "The CONNECT target must be host:port (no path, no user information)."
        return "The request line is not valid (method, target, HTTP version)."
    return "A header line is not valid (expected name: value)."


def framing_refusal(api_format: ApiFormat | None, status: int, message: str) -> bytes:
    """A complete HTTP/1.1 answer that announces the close: the client format's JSON shape on
    a MITM'd host, the one-line ``message`` as plain text on the proxy's own listener. No
    ``Server`` header; nothing of the request is quoted."""
    code = INVALID_REQUEST if status < 500 else "upstream_error"
    headers = {"Connection": "close"}
    if status < 500:  # resending the same bytes cannot cure it; an upstream failure may pass
        headers[SHOULD_RETRY_HEADER] = "false"
    response = error_response(api_format, status, message, code, headers, should_retry_header=False)
    return http1_bytes(response)


def peer_address(connection: object) -> str:
    """``host:port`` of a connection's peer, for log lines (empty when it has none)."""
    peer = getattr(connection, "peername", None)
    return f"{peer[0]}:{peer[1]}" if peer else ""


# Answers that end with their head whatever they say (RFC 9112 section 6.3): 1xx, 204, 304.
_BODILESS = frozenset((*range(100, 200), 204, 304))


def headless_framing(event: ResponseHeaders) -> ResponseHeaders:
    """``event`` without ``Transfer-Encoding`` on its (copied) response, which has no body.
    mitmproxy ends a response whose head says chunked with ``0\r\n\r\n``; after a 204 or 304,
    which end with their head, the client reads those bytes as the start of the next answer on
    the connection, and that answer is lost (an upstream sent ``304`` with
    ``Transfer-Encoding: chunked``). RFC 9112 section 6.1: no 1xx or 204 carries it."""
    if "transfer-encoding" not in event.response.headers:
        return event
    return _without_transfer_encoding(event)


def http10_framing(event: ResponseHeaders) -> ResponseHeaders:
    """``event`` for an HTTP/1.0 client: a chunked body (an HTTP/1.1 upstream's) is sent as it
    is decoded, delimited by the close of the connection, which the copied response's
    ``Connection: close`` asks for. RFC 9112 section 6.1: a server must not send a chunked
    body to an HTTP/1.0 request."""
    if not _chunked(event.response):
        return event
    return _without_transfer_encoding(event, connection="close")


def _chunked(response: http.Response) -> bool:
    """Whether ``response``'s head says its body is chunked, as mitmproxy's send reads it."""
    return "chunked" in response.headers.get("transfer-encoding", "").lower()


def _without_transfer_encoding(event: ResponseHeaders, connection: str = "") -> ResponseHeaders:
    response = event.response.copy()
    del response.headers["transfer-encoding"]
    if connection:
        response.headers["connection"] = connection
    return ResponseHeaders(event.stream_id, response, event.end_stream)


class FramingHttp1Server(Http1Server):
    """mitmproxy's HTTP/1 server connection with strict request framing and our own error
    answers (see the module docstring). ``error_format`` is the client format of a MITM'd host,
    None on the proxy's own listener."""

    error_format: ApiFormat | None = None
    # Whether the response being sent has a chunked body, read from its head once (``send``).
    _chunked_response = False

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        """mitmproxy's ``Http1Server.read_headers``, with the framing decided strictly."""
        if not isinstance(event, events.DataReceived):
            yield from super().read_headers(event)
            return
        request_head = self.buf.maybe_extract_lines()
        if not request_head:
            return
        lines = [bytes(x) for x in request_head]
        try:
            self.request = http1.read_request_head(lines)
        except ValueError as e:
            yield from self._refuse_framing(head_error_reason(lines[0], e))
            return
        try:
            expected_body_size = request_body_size(self.request)
        except FramingError as e:
            yield from self._refuse_framing(str(e))
            return
        yield ReceiveHttp(RequestHeaders(self.stream_id, self.request, expected_body_size == 0))
        self.body_reader = make_body_reader(expected_body_size)
        self.state = self.read_body
        yield from self.state(event)

    def read_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        """mitmproxy's body reader; a body whose framing breaks (a bad chunk size, a chunk
        without its CRLF) is answered 400 before the close, if no response has started.
        Trailers on a chunked request body, which mitmproxy 12.3 cannot relay (it raises), are
        answered 400 the same way."""
        try:
            yield from self._read_body_strictly(event)
        except NotImplementedError:
            log.info(
                "request refused: trailers on a chunked request body",
                extra={"client": peer_address(self.conn)},
            )
            reason = "Trailers on a chunked request body are not supported."
            yield commands.SendData(self.conn, self._refusal(400, reason))
            yield commands.CloseConnection(self.conn)
            self.buf.maybe_extract_at_most(len(self.buf))
            # The head went to the stream already: only its end, as an error, is left to say.
            yield ReceiveHttp(
                RequestProtocolError(self.stream_id, reason, ErrorCode.GENERIC_CLIENT_ERROR)
            )
            self.state = self.done

    def _read_body_strictly(self, event: events.Event) -> layer.CommandGenerator[None]:
        for command in super().read_body(event):
            if (
                isinstance(command, commands.CloseConnection)
                and command.connection is self.conn
                and isinstance(event, events.DataReceived)
                and self.response is None
            ):
                log.info(
                    "request refused: the body's chunked framing is broken",
                    extra={"client": peer_address(self.conn)},
                )
                message = "The request body's chunked framing is not valid."
                yield commands.SendData(self.conn, self._refusal(400, message))
            yield command

    def send(self, event: HttpEvent) -> layer.CommandGenerator[None]:
        """mitmproxy's ``send``, except that an error answer is ours instead of its HTML page,
        an answer that ends with its head does not say ``Transfer-Encoding: chunked``
        (``headless_framing``), nor one to an HTTP/1.0 request (``http10_framing``). Not a
        generator itself: each chunk of a streamed response passes here, and takes
        ``_send_chunk``."""
        if type(event) is ResponseData:
            return self._send_chunk(event)
        if isinstance(event, ResponseProtocolError):
            return self._send_protocol_error(event)
        if isinstance(event, ResponseHeaders):
            if event.response.status_code in _BODILESS:
                event = headless_framing(event)
            elif self.request is not None and self.request.http_version == "HTTP/1.0":
                event = http10_framing(event)
            self._chunked_response = _chunked(event.response)
        return super().send(event)

    def _send_chunk(self, event: ResponseData) -> layer.CommandGenerator[None]:
        """mitmproxy's ``ResponseData`` branch of ``Http1Server.send`` (copied: pinned in
        tests/unit/test_mitm_digests.py), except that whether the body is chunked was read
        from the head when it was sent, not from the headers again for every chunk: the head
        on the wire decides the framing."""
        assert event.stream_id == self.stream_id and self.response
        data = event.data
        raw = b"%x\r\n%s\r\n" % (len(data), data) if self._chunked_response else data
        if raw:
            yield commands.SendData(self.conn, raw)

    def _send_protocol_error(self, event: ResponseProtocolError) -> layer.CommandGenerator[None]:
        if not (self.conn.state & ConnectionState.CAN_WRITE):
            return
        status = event.code.http_status_code()
        if self.response is None and status is not None:
            message = _client_message(event, status)
            if event.code is ErrorCode.CONNECT_FAILED and event.message.endswith(_TIMED_OUT):
                # A dial closed at upstream_connect_timeout (client_bounds.dial_timed_out).
                status, message = 504, "The proxy could not connect to the destination in time."
            # Other messages may quote what the client or the upstream sent (a credential).
            detail = event.message if event.code in _FIXED_TEXT_CODES else ""
            log.info(
                "answered %d (%s) %s",
                status,
                event.code.name.lower(),
                detail,
                extra={"client": peer_address(self.conn)},
            )
            yield commands.SendData(self.conn, self._refusal(status, message))
        yield commands.CloseConnection(self.conn)

    def _refuse_framing(self, reason: str) -> layer.CommandGenerator[None]:
        """Answer 400 with ``reason`` and close: nothing after this head is read. mitmproxy's
        parser text is not logged either: it quotes the bad line, which may hold a credential."""
        log.info("request refused: %s", reason, extra={"client": peer_address(self.conn)})
        yield commands.SendData(self.conn, self._refusal(400, reason))
        yield commands.CloseConnection(self.conn)
        self.buf.maybe_extract_at_most(len(self.buf))
        if self.request is not None:
            # The flow is recorded as refused, as mitmproxy does for an unparseable length.
            yield ReceiveHttp(RequestHeaders(self.stream_id, self.request, False))
            yield ReceiveHttp(
                RequestProtocolError(self.stream_id, reason, ErrorCode.GENERIC_CLIENT_ERROR)
            )
        self.state = self.done

    def _refusal(self, status: int, message: str) -> bytes:
        return framing_refusal(self.error_format, status, message)


__all__ = [
    "FramingError",
    "FramingHttp1Server",
    "framing_refusal",
    "head_error_reason",
    "peer_address",
    "request_body_size",
    "request_framing_error",
]
