"""Bounded decoding of compressed request bodies (``aibridgeproxyd/content_coding.py``): every
coding a client may send decodes to the same bytes as mitmproxy's unbounded decoder, and a
decompression bomb costs at most the limit asked for, in memory and in output."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from collections.abc import Callable

import brotli
import pytest
from mitmproxy.net import encoding as mitmproxy_encoding

from aibridgeproxyd.content_coding import Decoded, UndecodableBody, decode_bounded

try:
    from compression import zstd
except ImportError:
    from backports import zstd

BODY = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}' * 20
# Decodes to 256 MiB: kilobytes on the wire.
BOMB_SIZE = 256 * 1024 * 1024
LIMIT = 64 * 1024


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "deflate-raw": raw_deflate,  # sent as "deflate" without the zlib wrapper
    "br": brotli.compress,
    "zstd": zstd.compress,
}


def header(name: str) -> str:
    return "deflate" if name == "deflate-raw" else name


@pytest.mark.parametrize("name", ENCODERS)
def test_every_coding_decodes_to_the_original_body(name: str) -> None:
    encoded = ENCODERS[name](BODY)
    assert decode_bounded(encoded, header(name), 10 * len(BODY)) == Decoded(BODY, complete=True)
    assert decode_bounded(encoded, header(name).upper(), len(BODY)) == Decoded(BODY, True)


@pytest.mark.parametrize("name", ["gzip", "deflate", "br", "zstd"])
def test_the_decoded_body_is_what_mitmproxy_decodes(name: str) -> None:
    encoded = mitmproxy_encoding.encode(BODY, name)
    assert decode_bounded(encoded, name, len(BODY)).data == mitmproxy_encoding.decode(encoded, name)


@pytest.mark.parametrize("name", ENCODERS)
def test_a_limit_below_the_decoded_size_gives_the_prefix_marked_incomplete(name: str) -> None:
    decoded = decode_bounded(ENCODERS[name](BODY), header(name), 100)
    assert decoded == Decoded(BODY[:100], complete=False)


def test_concatenated_gzip_members_and_zstd_frames_are_all_decoded() -> None:
    assert decode_bounded(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", 10).data == b"abcd"
    assert decode_bounded(zstd.compress(b"ab") + zstd.compress(b"cd"), "zstd", 10).data == b"abcd"


def test_a_large_body_in_members_spanning_feed_pieces_decodes_whole() -> None:
    # Members larger than a feed piece (64 KiB), and member boundaries inside a piece.
    big = bytes(range(256)) * 1024  # 256 KiB, barely compressible in places
    parts = [big, b"x", big[:1000], b"", big]
    for compress, coding in ((gzip.compress, "gzip"), (zstd.compress, "zstd")):
        body = b"".join(compress(part) for part in parts)
        assert decode_bounded(body, coding, 10**7) == Decoded(b"".join(parts), True)


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_a_body_of_many_empty_members_is_refused_not_decoded_quadratically(coding: str) -> None:
    # 111,000 empty zstd frames (999 KB) once took 9.6 s of event loop: each frame copied the
    # rest of the body. Members are now fed in pieces, and more than 64 are refused.
    empty = gzip.compress(b"") if coding == "gzip" else zstd.compress(b"")
    with pytest.raises(UndecodableBody, match="more than 64 concatenated members"):
        decode_bounded(empty * 100_000, coding, LIMIT)
    assert decode_bounded(empty * 64, coding, LIMIT) == Decoded(b"", True)
    with pytest.raises(UndecodableBody):
        decode_bounded(empty * 65, coding, LIMIT)


@pytest.mark.parametrize("coding", [None, "", "identity", " Identity "])
def test_an_unencoded_body_is_returned_as_it_is_up_to_the_limit(coding: str | None) -> None:
    assert decode_bounded(BODY, coding, len(BODY)) == Decoded(BODY, True)
    assert decode_bounded(BODY, coding, 10) == Decoded(BODY[:10], False)


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd", "deflate", "compress"])
def test_an_empty_body_is_empty_in_every_coding(coding: str) -> None:
    assert decode_bounded(b"", coding, 10) == Decoded(b"", True)


@pytest.mark.parametrize(
    ("coding", "body"),
    [
        ("compress", b"x"),  # LZW: no client sends it, nothing decodes it
        ("gzip, br", brotli.compress(gzip.compress(BODY))),  # stacked codings
        ("gzip", BODY),  # declared but not compressed
        ("br", BODY),
        ("zstd", BODY),
        ("gzip", gzip.compress(BODY)[:-20]),  # cut short
        ("br", brotli.compress(BODY)[:-5]),
        ("zstd", zstd.compress(BODY)[:-5]),
        ("deflate", zlib.compress(BODY)[:-10]),
    ],
)
def test_an_undecodable_body_raises_naming_the_coding(coding: str, body: bytes) -> None:
    with pytest.raises(UndecodableBody, match=coding.split(",")[0]):
        decode_bounded(body, coding, 10 * len(BODY))


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    zeros = bytes(BOMB_SIZE)
    built = {
        "gzip": gzip.compress(zeros, compresslevel=9),
        "deflate": zlib.compress(zeros, 9),
        "br": brotli.compress(zeros, quality=1),
        "zstd": zstd.compress(zeros),
    }
    del zeros
    return built


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_a_decompression_bomb_costs_at_most_the_limit(bombs: dict[str, bytes], coding: str) -> None:
    bomb = bombs[coding]
    assert len(bomb) < 1024 * 1024  # well within any max_request_body
    tracemalloc.start()
    try:
        decoded = decode_bounded(bomb, coding, LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded == Decoded(bytes(LIMIT), complete=False)
    assert peak < 8 * LIMIT  # the output, a few copies of it at most; never the 256 MiB
