"""Control characters that must never reach an upstream inside a request head.

A bare CR, a LF or a NUL inside a header name or value (or the request target) lets one header
be read as two by some parser on the way (request or response splitting, RFC 9112 section 2.2,
RFC 9110 section 5.5, RFC 9113 section 8.2.1). mitmproxy's HTTP/1 parser keeps a bare CR and a NUL
inside a value, and joins an obsolete folded line (obs-fold) with ``\\r\\n `` into the value it
forwards; so every request head is checked once here, and refused with 400 when it carries one.
"""

from __future__ import annotations

from collections.abc import Iterable

FORBIDDEN_BYTES = frozenset(b"\r\n\x00")


def _has_forbidden(data: bytes) -> bool:
    return not FORBIDDEN_BYTES.isdisjoint(data)


def invalid_field(fields: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The name of the first header field whose name or value holds a CR, LF or NUL, else None.

    ``fields`` are raw ``(name, value)`` pairs (``Headers.fields``). The name returned is for a
    log line: its control characters are escaped, and the value is never returned (it may be a
    credential)."""
    for name, value in fields:
        if _has_forbidden(name) or _has_forbidden(value):
            return name.decode("latin-1").encode("unicode_escape").decode("ascii")[:64]
    return None


def invalid_target(*parts: bytes | str) -> bool:
    """True when a part of the request line (method, target, authority) holds a CR, LF or NUL."""
    for part in parts:
        data = part.encode("utf-8", "surrogateescape") if isinstance(part, str) else part
        if _has_forbidden(data):
            return True
    return False
