"""What the proxy does with each chunk of a streamed answer, for tests that run the addons without
the proxy: mitmproxy's ``HttpStream`` applies ``response.stream`` when it is a transform and sends
every piece it returns, and our stream layer (``mitm.http_layer.AIBridgeHttpStream``) then hands
each piece sent (never an empty one) to the recording's chunk tap."""

from __future__ import annotations

from collections.abc import Iterable

from mitmproxy import http

from aibridgeproxyd.interception.state import request_context


def deliver(flow: http.HTTPFlow, chunks: Iterable[bytes]) -> bytes:
    """Stream ``chunks`` and then the end (``b""``) of ``flow``'s answer; returns what the client
    got."""
    assert flow.response is not None
    stream = flow.response.stream
    ctx = request_context(flow)
    tap = ctx.recording.chunk_tap if ctx is not None else None
    got = bytearray()
    for chunk in [*chunks, b""]:
        if callable(stream):
            out = stream(chunk)
            pieces = [out] if isinstance(out, bytes) else list(out)
        else:
            pieces = [chunk]
        for piece in pieces:
            if piece:
                got += piece
                if tap is not None:
                    tap(piece)
    return bytes(got)
