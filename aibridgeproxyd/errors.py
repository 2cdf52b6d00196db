"""Errors the proxy returns on MITM'd requests, in the client format's own JSON shape
(docs/providers.md#keys-byok-and-the-proxys-own-errors), so SDKs surface a useful message; and
what every error body sent to a client or a log goes through: no internal detail, no secret.

- ``error_body`` / ``error_response``: the proxy's own answers, with ``X-Should-Retry: false``
  for conditions a retry cannot cure (the official OpenAI and Anthropic SDKs honour it before
  their status rules: they retry 408, 409, 429 and every 5xx otherwise).
- ``upstream_failure``: what a client is told when mitmproxy itself gives up on an upstream
  (dial, TLS, a broken or unparseable answer), without mitmproxy's detail text.
- ``SecretRedactor``: removes configured secrets from upstream error bodies, also when they are
  streamed in chunks, JSON-escaped, percent-encoded or inside base64 (``Basic user:key``);
  ``redact_headers`` and ``error_answer`` apply it to an upstream's error answer.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import quote

from aibridgeproxyd.credentials import credential_values
from aibridgeproxyd.model import ApiFormat

if TYPE_CHECKING:
    from mitmproxy import http

REQUEST_ID_HEADER = "X-AIBridge-Request-Id"
# Not a standard header; the Stainless-generated SDKs (openai, anthropic, in every language)
# obey it before any status rule.
SHOULD_RETRY_HEADER = "X-Should-Retry"

# Anthropic's documented error types by status
# (https://docs.anthropic.com/en/api/errors); OpenAI-format errors reuse them as `type`.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# Codes of the proxy's own answers whose condition a retry cannot cure, whatever their status:
# a retry would only repeat the same answer (and, for a 5xx, make SDKs wait and try 2-3 times).
PERMANENT_CODES = frozenset(
    {
        "no_key_configured",  # an operator must add a key
        "all_keys_rejected",  # every central key got 401; each rests 300 s anyway
        "upstream_certificate_untrusted",  # an operator must fix upstream_ca_file
    }
)


def anthropic_error_type(status: int) -> str:
    """The Anthropic error ``type`` for an HTTP status; unknown 4xx are invalid requests."""
    if status in _ANTHROPIC_TYPES:
        return _ANTHROPIC_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(api_format: ApiFormat, status: int, message: str, code: str) -> bytes:
    """The JSON body for an error the proxy originates. ``code`` is a stable machine-readable
    reason such as ``byok_not_allowed`` or ``upstream_unreachable``."""
    if api_format is ApiFormat.ANTHROPIC:
        payload: dict[str, object] = {
            "type": "error",
            "error": {"type": anthropic_error_type(status), "message": message},
        }
    elif api_format is ApiFormat.GEMINI:
        payload = {
            "error": {
                "code": status,
                "message": message,
                "status": _gemini_status(status),
            }
        }
    else:
        payload = {
            "error": {
                "message": message,
                "type": anthropic_error_type(status),
                "code": code,
            }
        }
    return json.dumps(payload).encode()


def should_retry(status: int, code: str) -> bool:
    """Whether a client may cure this answer of the proxy by sending the request again: the SDKs'
    own rule (408, 409, 429, 5xx), minus the codes known to be permanent."""
    if code in PERMANENT_CODES:
        return False
    return status in (408, 409, 429) or status >= 500


def error_response(
    api_format: ApiFormat | None,
    status: int,
    message: str,
    code: str,
    headers: Mapping[str, str] | None = None,
    *,
    should_retry_header: bool = True,
) -> http.Response:
    """The proxy's own answer: ``error_body`` as JSON on a MITM'd host, ``message`` as one line
    of text where there is no client format (``api_format`` None: the proxy's own listener).
    ``headers`` follow ``Content-Type``.

    With ``X-Should-Retry: false`` when a retry cannot help, so the openai/anthropic SDKs do not
    re-send it (they retry every 5xx, 408, 409 and 429 otherwise, and their users wait through
    the back-off for the same answer); ``should_retry_header=False`` leaves it to the caller
    (which sets its own, or answers a status the SDKs never retry)."""
    # Imported here so the CLI, which imports this module through the adapters, does not load
    # mitmproxy.
    from mitmproxy import http

    response_headers = dict(headers or {})
    if should_retry_header and not should_retry(status, code):
        response_headers[SHOULD_RETRY_HEADER] = "false"
    if api_format is None:
        body, content_type = f"{message}\n".encode(), "text/plain"
    else:
        body, content_type = error_body(api_format, status, message, code), "application/json"
    return http.Response.make(status, body, {"Content-Type": content_type, **response_headers})


def _gemini_status(status: int) -> str:
    return {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        413: "INVALID_ARGUMENT",
        429: "RESOURCE_EXHAUSTED",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }.get(status, "INTERNAL")


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# How the daemon tells that the corporate proxy (upstream_proxy) refused: its status and that
# status's standard phrase, never the proxy's own reason, headers or page, which may quote the
# request and so the Proxy-Authorization the daemon added.
PROXY_REFUSED = "upstream proxy refused the "


def proxy_refusal(what: str, status: int) -> str:
    """``upstream proxy refused the connection: 403 Forbidden`` (``what``: ``connection`` for a
    CONNECT, ``request`` for a plain-HTTP request)."""
    return f"{PROXY_REFUSED}{what}: {status} {reason_phrase(status)}"


# --- mitmproxy's own failures, told without its detail ---------------------------------------


@dataclass(frozen=True)
class UpstreamFailure:
    """What the client is told when the proxy could not get an answer from the upstream (or
    could not read the client's request). ``message`` names no address, OS or parser text; the
    caller adds the provider name. ``status`` 504 for timeouts, 502 for the upstream's faults,
    4xx for a request mitmproxy refused to parse."""

    status: int
    code: str
    message: str


def upstream_failure(
    detail: str, *, connect_failed: bool, client_error: int | None = None
) -> UpstreamFailure:
    """Classify mitmproxy's error text ``detail`` (logged, never sent). ``connect_failed``: the
    connection or its TLS handshake failed (mitmproxy's ``CONNECT_FAILED``). ``client_error``:
    the status mitmproxy chose for a fault of the client's request (400 or 413), if it was one."""
    text = detail.lower()
    if client_error == 413:
        return UpstreamFailure(
            413, "request_too_large", "The request body is too large for this proxy."
        )
    if client_error is not None:
        return UpstreamFailure(400, "invalid_request", "The request is not valid HTTP.")
    if "timed out" in text or "timeout" in text:
        return UpstreamFailure(504, "upstream_timeout", "timed out")
    if connect_failed and "certificate" in text:
        return UpstreamFailure(
            502,
            "upstream_certificate_untrusted",
            "presented a TLS certificate this proxy does not trust (see upstream_ca_file)",
        )
    if connect_failed and any(word in text for word in ("tls", "ssl", "handshake")):
        return UpstreamFailure(502, "upstream_tls_error", "failed the TLS handshake")
    if connect_failed and detail.startswith(PROXY_REFUSED):
        # Our own text (proxy_refusal): the proxy's status, nothing the proxy wrote.
        return UpstreamFailure(502, "upstream_unreachable", f"could not be reached: {detail}")
    if connect_failed:
        return UpstreamFailure(502, "upstream_unreachable", "could not be reached")
    if "too large" in text or "body_size_limit" in text:
        return UpstreamFailure(
            502, "upstream_response_too_large", "sent an answer too large to relay"
        )
    if "closed" in text or "reset" in text or "eof" in text:
        return UpstreamFailure(
            502, "upstream_closed", "closed the connection before its answer was complete"
        )
    return UpstreamFailure(502, "upstream_bad_response", "sent an answer that is not valid HTTP")


# --- secrets in error bodies ------------------------------------------------------------------

REDACTED = b"***"
# Shorter values would turn ordinary words of a body into "***"; real keys are far longer.
MIN_SECRET_LENGTH = 6
# A base64 core shorter than this matches too easily by chance.
_MIN_BASE64_CORE = 8


def secret_forms(secret: str) -> set[bytes]:
    """Every spelling of ``secret`` an echoing upstream may use: raw, JSON-escaped (with and
    without ``\\/``), percent-encoded, and the parts of its base64 that do not depend on the
    neighbouring bytes, at each of the three alignments (so ``Basic base64(user:key)`` and any
    other base64 carrying the key lose the key)."""
    if len(secret) < MIN_SECRET_LENGTH:
        return set()
    raw = secret.encode()
    escaped = json.dumps(secret)[1:-1]
    forms = {raw, escaped.encode(), escaped.replace("/", "\\/").encode()}
    forms.add(quote(secret, safe="").encode())
    for skip in range(3):
        tail = raw[skip:]
        whole_groups = len(tail) // 3 * 4  # characters fixed by these bytes alone
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            core = encode(tail)[:whole_groups]
            if len(core) >= _MIN_BASE64_CORE:
                forms.add(core)
    return forms


@functools.lru_cache(maxsize=256)
def _redaction_pattern(
    secrets: frozenset[str],
) -> tuple[re.Pattern[bytes] | None, int, tuple[bytes, ...]]:
    """The pattern matching every form of ``secrets``, the longest form's length - 1, and the
    forms. Cached: a request's secrets (its provider's keys, its caller's token) repeat from
    one request to the next, and building the forms and the pattern costs about 75 us."""
    forms: set[bytes] = set()
    for secret in secrets:
        forms |= secret_forms(secret)
    ordered = sorted(forms, key=len, reverse=True)  # longest first: alternation is ordered
    pattern = re.compile(b"|".join(re.escape(form) for form in ordered)) if ordered else None
    return pattern, max((len(form) for form in ordered), default=1) - 1, tuple(ordered)


class SecretRedactor:
    """Replaces every form of the given secrets (``secret_forms``) with ``***``.

    ``redact`` works on a whole body. ``feed`` works on a body that arrives in chunks: it holds
    back the last ``longest form - 1`` bytes, which may be the start of a secret the next chunk
    completes, and ``feed(b"")`` releases them at the end. Memory per stream is that overlap.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        self._pattern, self._overlap, self._forms = _redaction_pattern(
            frozenset(s for s in secrets if s)
        )
        self._pending = b""

    def __bool__(self) -> bool:
        return self._pattern is not None

    def redact(self, data: bytes) -> bytes:
        if self._pattern is None:
            return data
        # Most texts hold no secret: a substring search per form (C speed) rules that out about
        # fifty times faster than the alternation (36 KB: 4 us against 220).
        if not any(form in data for form in self._forms):
            return data
        return self._pattern.sub(REDACTED, data)

    def finds(self, data: bytes) -> bool:
        """True when ``data`` holds a form of a secret (``redact`` would change it)."""
        return self._pattern is not None and any(form in data for form in self._forms)

    def leaves_unchanged(self, texts: Iterable[str]) -> bool:
        """True when ``redact_text`` would give back each of ``texts`` as it is: no form of a
        secret is in any of them. One search per form over the texts joined (a form across a
        join only sends the caller to ``redact_text``), instead of one per form and text."""
        if self._pattern is None:
            return True
        try:
            data = "\0".join(texts).encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate: redact_text reads that text its own way
            return False
        return not any(form in data for form in self._forms)

    def redact_text(self, text: str) -> str:
        try:
            data = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
            data = text.encode("utf-8", "surrogatepass")
        redacted = self.redact(data)
        return text if redacted is data else redacted.decode("utf-8", "replace")

    def feed(self, chunk: bytes) -> bytes:
        if self._pattern is None:
            return chunk
        data = self._pending + chunk
        if not chunk:  # end of the body
            self._pending = b""
            return self.redact(data)
        cut = max(0, len(data) - self._overlap)
        out = []
        position = 0
        for match in self._pattern.finditer(data):
            if match.start() >= cut:
                break
            out.append(data[position : match.start()])
            out.append(REDACTED)
            position = match.end()
        cut = max(cut, position)  # a match across the cut is already replaced whole
        out.append(data[position:cut])
        self._pending = data[cut:]
        return b"".join(out)


def redaction_secrets(
    provider_secrets: Iterable[str], request_headers: http.Headers | None, proxy_token: str | None
) -> list[str]:
    """Everything an upstream error body must not hand on: the provider's configured secrets
    (keys, secret settings), the credentials the request carried upstream (the injected key, a
    BYOK key) and the caller's proxy token."""
    secrets = [secret for secret in provider_secrets if secret]
    if request_headers is not None:
        secrets.extend(value for _, value in credential_values(request_headers) if value)
    if proxy_token:
        secrets.append(proxy_token)
    return secrets


def redact_headers(headers: http.Headers, redactor: SecretRedactor) -> None:
    """Redact every header value in place: an echo can come back in a header as well
    (``x-debug-request-headers: ...``). Values without a secret are left as they are."""
    if not redactor:
        return
    for name in list(headers.keys()):
        values = headers.get_all(name)
        redacted = [redactor.redact_text(value) for value in values]
        if redacted != values:
            headers.set_all(name, redacted)


def error_answer(
    body: bytes,
    redactor: SecretRedactor,
    convert: Callable[[bytes], bytes] | None = None,
    content_encoding: str = "identity",
) -> bytes:
    """The error body a client gets for an upstream's whole error ``body``: decoded from
    ``content_encoding`` (to ``b""`` if it does not decode: nothing of it can be checked),
    redacted, and turned into the client's format by ``convert`` when the upstream speaks
    another (an adapter's ``UpstreamErrorAnswer.body``)."""
    if content_encoding != "identity":
        # Cut short by the proxy's bound on error bodies, or not what it claims: nothing of it
        # can be checked.
        body = decoded_error_body(body, content_encoding) or b""
    body = redactor.redact(body)
    if convert is not None:
        # Redacted before (the conversion parses the body) and after (it un-escapes JSON).
        body = redactor.redact(convert(body))
    return body


# An upstream error body that decodes to more than this is no error message: nothing of it is
# passed on (a few kilobytes of zstd or brotli can decode to gigabytes).
MAX_DECODED_ERROR_BODY = 1024 * 1024


def decoded_error_body(body: bytes, content_encoding: str | None) -> bytes | None:
    """An upstream's error ``body`` decoded from ``content_encoding`` (a header value, or None),
    in bounded memory (``content_coding.decode_bounded``); ``body`` itself when it is not
    encoded. None when it cannot be checked: an unknown or stacked coding, data that is not what
    the header says or is cut short, or more than ``MAX_DECODED_ERROR_BODY`` bytes decoded."""
    from aibridgeproxyd.content_coding import UndecodableBody, decode_bounded

    if (content_encoding or "identity").strip().lower() in ("identity", "none", ""):
        return body
    try:
        decoded = decode_bounded(body, content_encoding, MAX_DECODED_ERROR_BODY)
    except UndecodableBody:
        return None
    return decoded.data if decoded.complete else None
