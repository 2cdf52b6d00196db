"""Bounded decoding of a compressed body (``Content-Encoding``), for reading a request's JSON.

A client may compress its request body (RFC 9110 section 8.4: ``gzip``, ``deflate``, ``br``,
``zstd``). mitmproxy's ``get_content()`` undoes that, but in one call with no limit on the
output: a few kilobytes of zstd or brotli can decode to gigabytes. The request body is bounded
by ``max_request_body`` as it arrives, its decoded form is not, so every read of a request's
decoded body goes through ``decode_bounded`` instead, which stops once it has ``limit`` bytes.

Each decoder is fed the whole (already buffered) body and asked for at most the bytes still
missing (zlib ``max_length``, brotli ``output_buffer_limit``, zstd ``max_length``), so memory is
the input plus ``limit`` whatever the compression ratio.

Sources: RFC 9110 section 8.4.1 (content codings; ``x-gzip`` is ``gzip``), RFC 1952 (gzip,
members may be concatenated), RFC 1950/1951 (``deflate`` is zlib-wrapped; some senders omit the
wrapper, which mitmproxy also accepts), RFC 7932 (brotli), RFC 8878 (zstd, frames may be
concatenated).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import brotli  # a dependency of mitmproxy

try:
    from compression import zstd  # Python 3.14+
except ImportError:  # pragma: no cover - depends on the Python version
    from backports import zstd  # a dependency of mitmproxy

# A compressed body is fed to its decoder in pieces of this many bytes.
_FEED = 64 * 1024
# Concatenated gzip members or zstd frames in one body: senders use one, a few at most.
MAX_MEMBERS = 64
# Codings that leave the body as it is.
_IDENTITY = frozenset({"", "identity", "none"})


class UndecodableBody(ValueError):
    """The body cannot be decoded: an unknown or stacked coding, or corrupt data. The message
    names the coding."""


@dataclass(frozen=True, slots=True)
class Decoded:
    """The first bytes of a decoded body: ``data`` (at most the limit asked for), and whether it
    is the whole body (``complete``) or the body goes on beyond the limit."""

    data: bytes
    complete: bool


def decode_bounded(body: bytes, content_encoding: str | None, limit: int) -> Decoded:
    """``body`` decoded per ``content_encoding`` (a header value, any case), up to ``limit``
    bytes. Raises ``UndecodableBody``. Stacked codings (``gzip, br``) are refused rather than
    decoded stage by stage, since each stage would need its own bound; no client library sends
    them."""
    coding = (content_encoding or "").strip().lower()
    if not body or coding in _IDENTITY:  # an empty body is empty in every coding
        return Decoded(body[:limit], len(body) <= limit)
    decode = _DECODERS.get(coding)
    if decode is None:
        raise UndecodableBody(f"unsupported content-encoding {content_encoding!r}")
    try:
        data, complete = decode(body, limit)
    except (zlib.error, brotli.error, zstd.ZstdError, TypeError, ValueError) as exc:
        raise UndecodableBody(f"cannot decode {coding} body: {exc}") from None
    return Decoded(data, complete)


def _zlib(body: bytes, limit: int, wbits: int) -> tuple[bytes, bool]:
    """zlib-family members one after another (a gzip body may hold several)."""

    def decompress(decompressor: Any, data: bytes, room: int) -> bytes:
        return bytes(decompressor.decompress(data, room))

    return _members(body, limit, lambda: zlib.decompressobj(wbits), decompress)


def _gzip(body: bytes, limit: int) -> tuple[bytes, bool]:
    # 32 + MAX_WBITS: a gzip or zlib header, detected (mitmproxy accepts both too).
    return _zlib(body, limit, 32 + zlib.MAX_WBITS)


def _deflate(body: bytes, limit: int) -> tuple[bytes, bool]:
    # RFC 9110's deflate is zlib-wrapped; a raw stream has no valid zlib header (the first two
    # bytes of a zlib header are a multiple of 31, with method 8).
    wrapped = len(body) >= 2 and (body[0] * 256 + body[1]) % 31 == 0 and body[0] & 0x0F == 8
    return _zlib(body, limit, zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)


def _brotli(body: bytes, limit: int) -> tuple[bytes, bool]:
    decompressor: Any = brotli.Decompressor()
    out = bytearray(decompressor.process(body, output_buffer_limit=limit + 1))
    while len(out) <= limit and not decompressor.is_finished():
        if decompressor.can_accept_more_data():
            raise ValueError("truncated data")  # all input consumed, stream not finished
        more = decompressor.process(b"", output_buffer_limit=limit + 1 - len(out))
        if not more:
            raise ValueError("no progress")  # never expected: refuse rather than spin
        out += more
    if len(out) > limit:
        del out[limit:]  # in place: a slice would copy up to limit bytes once more
        return bytes(out), False
    return bytes(out), True


def _zstd(body: bytes, limit: int) -> tuple[bytes, bool]:
    """zstd frames one after another."""

    def decompress(decompressor: Any, data: bytes, room: int) -> bytes:
        out = bytearray(decompressor.decompress(data, room))
        # Output held back by the room left: drain it while there is room.
        while len(out) < room and not decompressor.eof and not decompressor.needs_input:
            out += decompressor.decompress(b"", room - len(out))
        return bytes(out)

    return _members(body, limit, zstd.ZstdDecompressor, decompress)


def _members(
    body: bytes,
    limit: int,
    new: Callable[[], Any],
    decompress: Callable[[Any, bytes, int], bytes],
) -> tuple[bytes, bool]:
    """Concatenated members (gzip) or frames (zstd), decoded up to ``limit`` bytes. The body is
    fed in ``_FEED``-byte pieces, so what a finished member leaves over (``unused_data``) is
    at most one piece: decoding costs one pass over the body, however many members it holds
    (a body of 100,000 empty members must not be copied 100,000 times). At most
    ``MAX_MEMBERS``: no client sends more than a few."""
    out = bytearray()
    view = memoryview(body)
    position, members = 0, 0
    decompressor: Any = None
    data = b""
    while True:
        if not data:
            if position >= len(view):
                break
            data = bytes(view[position : position + _FEED])
            position += len(data)
        if decompressor is None:
            members += 1
            if members > MAX_MEMBERS:
                raise ValueError(f"more than {MAX_MEMBERS} concatenated members")
            decompressor = new()
        out += decompress(decompressor, data, limit + 1 - len(out))
        if len(out) > limit:
            del out[limit:]  # in place: a slice would copy up to limit bytes once more
            return bytes(out), False
        data = b""
        if decompressor.eof:
            data, decompressor = decompressor.unused_data, None  # the next member starts there
    if decompressor is not None:
        raise ValueError("truncated data")
    return bytes(out), True


_DECODERS = {
    "gzip": _gzip,
    "x-gzip": _gzip,
    "deflate": _deflate,
    "br": _brotli,
    "zstd": _zstd,
}
