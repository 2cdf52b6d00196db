"""The one place that reads and removes client credentials from request headers
(docs/providers.md, "Keys, BYOK and the proxy's own errors").

A credential header counts as *central* (the proxy injects the provider's key) when it is
empty or carries the caller's proxy token or the ``central_key_placeholder``, in any spelling a
client may use: the bare value, ``Bearer <value>``, or ``Basic base64(user:<value>)`` /
``Basic base64(<value>)`` (RFC 7617). Central credentials are removed before a request goes
upstream, so the proxy token never reaches a provider; ``scrub_proxy_token`` removes it from
every other header and query parameter as a last line.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from enum import StrEnum
from typing import TYPE_CHECKING

from aibridgeproxyd.header_fields import drop_headers

if TYPE_CHECKING:
    from mitmproxy import http
    from mitmproxy.http import Headers

# Every header a client may carry a provider credential in.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key")
_CREDENTIAL_NAMES = frozenset(name.encode() for name in CREDENTIAL_HEADERS)


class CredentialMode(StrEnum):
    """How a routed request is authenticated upstream: the one credential vocabulary of the
    proxy. Adapters declare the modes they accept (``Adapter.credential_modes``); each routed
    request is given one (``RequestContext.routing.credential_mode``). The values appear in
    traces and logs, so they never change."""

    CENTRAL = "central"  # the proxy injects one of the provider's keys
    BYOK = "byok"  # the client's own key is passed through
    SIGNED = "signed"  # the adapter signs with credentials from the settings (Bedrock)


def lenient_base64_text(encoded: str) -> str | None:
    """``encoded`` decoded as base64 (standard or URL-safe alphabet) to UTF-8 text, or None.

    As lenient as the decoders upstream servers use (Go's ``RawStdEncoding``, Node's
    ``Buffer.from(..., "base64")``): whitespace anywhere and missing ``=`` padding are
    accepted, so a token spelled that way is still recognised as the proxy token."""
    compact = "".join(encoded.split()).rstrip("=")
    if not compact or len(compact) % 4 == 1:
        return None
    padded = compact + "=" * (-len(compact) % 4)
    for alphabet in (None, b"-_"):
        try:
            raw = base64.b64decode(padded, altchars=alphabet, validate=True)
            return raw.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
    return None


def _basic_values(encoded: str) -> tuple[str, ...]:
    """The credentials a ``Basic`` value may carry: its password (the part after the first
    ``:`` of the decoded ``user:password``, RFC 7617) and the whole decoded text. Empty when it
    is not base64 of UTF-8 text."""
    decoded = lenient_base64_text(encoded)
    if decoded is None:
        return ()
    _, colon, password = decoded.partition(":")
    return tuple(value for value in (password if colon else "", decoded) if value)


def _credentials(headers: Headers) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(header name, the credentials one header value may carry) for every credential header
    value: ``Bearer X`` carries X; ``Basic base64(user:X)`` carries X and ``user:X``; an
    undecodable ``Basic`` value or any other value carries itself (stripped)."""
    for name, value in _credential_fields(headers):
        value = value.strip()
        if name == "authorization":
            scheme = value[:7].lower()
            if scheme in ("bearer ", "bearer\t"):
                yield name, (value[7:].strip(),)
                continue
            if scheme[:6] in ("basic ", "basic\t"):
                decoded = _basic_values(value[6:])
                if decoded:
                    yield name, decoded
                    continue
        yield name, (value,)


def _credential_fields(headers: Headers) -> Iterator[tuple[str, str]]:
    """(lower-case name, value) of every credential header, in ``CREDENTIAL_HEADERS`` order and
    then in the request's order, as ``headers.get_all(name)`` per name gives them: one pass over
    the header fields instead of one per name."""
    found: dict[bytes, list[bytes]] = {}
    for raw_name, raw_value in headers.fields:
        lowered = raw_name.lower()
        if lowered in _CREDENTIAL_NAMES:
            found.setdefault(lowered, []).append(raw_value)
    for name in CREDENTIAL_HEADERS:
        for value in found.get(name.encode(), ()):
            yield name, value.decode("utf-8", "surrogateescape")


def credential_values(headers: Headers) -> Iterator[tuple[str, str]]:
    """(header name, credential) pairs; ``Authorization: Bearer X`` yields X, ``Authorization:
    Basic base64(user:X)`` yields X and then ``user:X``."""
    for name, values in _credentials(headers):
        for value in values:
            yield name, value


def credential_mode(headers: Headers, proxy_token: str | None, placeholder: str) -> CredentialMode:
    """Central when every credential header value is empty, or carries the caller's proxy
    token or the placeholder (in any spelling above)."""
    central_values = {"", placeholder}
    if proxy_token:
        central_values.add(proxy_token)
    for _, values in _credentials(headers):
        if central_values.isdisjoint(values):
            return CredentialMode.BYOK
    return CredentialMode.CENTRAL


# A secret longer than this shows its first 3 and last 4 characters in a hint; one this long or
# shorter shows at most its last 2 (and one shorter than 8, nothing).
SHORT_SECRET = 12
HINT_ELLIPSIS = "\u2026"


def mask_secret(secret: str) -> str:
    """A credential's masked form for records (CONTRACT 10.1 ``credential_hint``):
    ``sk-proj-abcdWXYZ`` -> ``sk-…WXYZ``; ``abcdefgh12`` -> ``…12``; ``short`` -> ``…``.
    Never more than 4 characters of each end, so no 5 consecutive characters of the secret
    appear. A secret holding the ellipsis itself (no header value can: they are latin-1) shows
    nothing, so that no window across the ellipsis could match the secret."""
    if HINT_ELLIPSIS in secret or len(secret) < 8:
        return HINT_ELLIPSIS
    if len(secret) <= SHORT_SECRET:
        return HINT_ELLIPSIS + secret[-2:]
    return secret[:3] + HINT_ELLIPSIS + secret[-4:]


def client_credential_hint(headers: Headers) -> str | None:
    """The masked form of the first credential ``headers`` carry (``credential_values``), or
    None when they carry none."""
    for _, value in credential_values(headers):
        if value:
            return mask_secret(value)
    return None


def remove_all_credentials(headers: Headers) -> None:
    """Drop every credential header (``CREDENTIAL_HEADERS``, any case, every occurrence)."""
    drop_headers(headers, _CREDENTIAL_NAMES)


def remove_proxy_credentials(headers: Headers, proxy_token: str | None, placeholder: str) -> None:
    """Drop any credential header that carries the proxy token or the placeholder, so the
    proxy token never reaches an upstream even when the client mixes it with its own key."""
    doomed = {placeholder} | ({proxy_token} if proxy_token else set())
    for name, values in list(_credentials(headers)):
        if not doomed.isdisjoint(values):
            headers.pop(name, None)


def _carries_encoded(value: str, token: str) -> bool:
    """Whether ``value`` carries ``token`` in base64: whole, after a scheme word (``Basic x``,
    ``Bearer x``) or as its first word, with any whitespace inside the base64. A value shorter
    than the token cannot (base64 is longer than what it encodes): most headers stop there."""
    if len(value) < len(token):
        return False
    first, _, rest = value.strip().partition(" ")
    candidates = {value, first, rest} - {""}
    return any(token in text for candidate in candidates for text in _basic_values(candidate))


def scrub_proxy_token(request: http.Request, proxy_token: str | None) -> list[str]:
    """Remove the caller's proxy token from everything else that goes upstream: any header
    whose value contains it (also inside a ``Basic`` value) and any query parameter whose name
    or value contains it. Run after the credential headers are handled; returns what was
    removed (``header <name>``, ``query parameter <name>``), for the log. Never the path: a
    path is the API's, and a token in it reaches the upstream as the client wrote it."""
    if not proxy_token:
        return []
    removed: list[str] = []
    headers = request.headers
    for name in {name.lower() for name in headers}:
        for value in headers.get_all(name):
            if proxy_token in value or _carries_encoded(value, proxy_token):
                headers.pop(name, None)
                removed.append(f"header {name}")
                break
    if "?" in request.path:
        query = request.query
        names = {name for name, value in query.items(multi=True) if proxy_token in name + value}
        for name in sorted(names):
            del query[name]
            removed.append(f"query parameter {name}")
    return removed
