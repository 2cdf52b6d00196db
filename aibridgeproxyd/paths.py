"""Request paths a MITM'd request may not carry
(docs/security.md#what-a-mitmd-request-may-carry-upstream).

A path with dot-segments (RFC 3986 section 3.3: ``.`` and ``..``) would be resolved by the
upstream or a gateway in front of it, so a request sent with the central key could reach a
path outside the provider's API (``/v1/../../admin``), or outside a ``base_url`` path prefix on
a shared gateway. Such a request is refused before any key is injected, in every spelling a
server might resolve: percent-encoded (``%2e%2e``, ``%2E``, also encoded twice, ``%252e``), and
with ``\\`` or ``%5c`` as a separator (Windows servers and some frameworks treat it as ``/``),
with path parameters (``..;/``, which Tomcat and Spring resolve as ``..``), with trailing
whitespace or NUL (``..%00``, ``..%20``), as full-width or other compatibility dots (NFKC), as
any run of dots (``...``, which Windows trims), or as overlong UTF-8 (``%c0%ae``: a path that is
not UTF-8 once decoded is refused whole).
"""

from __future__ import annotations

import unicodedata
from urllib.parse import unquote

# Percent-decoding rounds: a proxy or framework in front of the upstream may decode once more.
_DECODE_ROUNDS = 3


def dot_segment_path(path: str) -> bool:
    """Whether the path part of a request target (``path?query``; the query is not looked at)
    has a dot-segment in any spelling above. ``/v1/chat.completions`` and ``/v1/.well-known``
    are fine: only whole segments of dots count."""
    path = path.partition("?")[0].partition("#")[0]
    if path.isascii() and "." not in path and "%" not in path:
        # Nothing to decode and nothing NFKC could turn into a dot: no dot-segment. Most API
        # paths (``/v1/chat/completions``) stop here, before the per-segment normalisation.
        return False
    for _ in range(_DECODE_ROUNDS):
        if _has_dot_segment(path):
            return True
        decoded = unquote(path, errors="replace")
        if "\ufffd" in decoded and "\ufffd" not in path:
            return True  # not UTF-8 once decoded: overlong dots and the like
        if decoded == path:
            return False
        path = decoded
    return _has_dot_segment(path)


def _has_dot_segment(path: str) -> bool:
    return any(_dots_only(segment) for segment in path.replace("\\", "/").split("/"))


def _dots_only(segment: str) -> bool:
    """A segment a server may resolve as ``.`` or ``..``."""
    segment = segment.partition(";")[0]  # path parameters: `..;x=1`
    segment = unicodedata.normalize("NFKC", segment).strip(" \t\r\n\x00\x0b\x0c")
    return bool(segment) and segment.strip(".") == ""
