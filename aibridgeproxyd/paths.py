"""Request paths a MITM'd request may not carry (section 6.5).

A path with dot-segments (RFC 3986 section 3.3: ``.`` and ``..``) would be resolved by the
upstream or a gateway in front of it, so a request sent with the central key could reach a
path outside the provider's API (``/v1/../../admin``), or outside a ``base_url`` path prefix on
a shared gateway. Such a request is refused before any key is injected, in every spelling a
server might resolve: percent-encoded (``%2e%2e``, ``%2E``, also encoded twice, ``%252e``), and
with ``\\`` or ``%5c`` as a separator (Windows servers and some frameworks treat it as ``/``).
"""

from __future__ import annotations

from urllib.parse import unquote

DOT_SEGMENTS = frozenset({".", ".."})
# Percent-decoding rounds: a proxy or framework in front of the upstream may decode once more.
_DECODE_ROUNDS = 3


def dot_segment_path(path: str) -> bool:
    """Whether the path part of a request target (``path?query``; the query is not looked at)
    has a ``.`` or ``..`` segment in any spelling above. ``/v1/chat.completions`` and
    ``/v1/...`` are fine: only whole segments count."""
    path = path.partition("?")[0].partition("#")[0]
    for _ in range(_DECODE_ROUNDS):
        if _has_dot_segment(path):
            return True
        decoded = unquote(path, errors="replace")
        if decoded == path:
            return False
        path = decoded
    return _has_dot_segment(path)


def _has_dot_segment(path: str) -> bool:
    return not DOT_SEGMENTS.isdisjoint(path.replace("\\", "/").split("/"))
