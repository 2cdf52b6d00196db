"""Never buffer a stream: SSE, chunked and large responses are forwarded chunk by chunk.

Small responses with a known length stay buffered, exactly as a bare mitmproxy does: they
arrive in one piece anyway, and later stages can read them whole.
"""

from __future__ import annotations

from mitmproxy import http

from aibridgeproxyd.interception.state import request_context

BUFFER_LIMIT = 256 * 1024


def should_stream(headers: http.Headers) -> bool:
    content_type = headers.get("content-type", "").lower()
    if (
        content_type.startswith("text/event-stream")
        or "ndjson" in content_type
        or "eventstream" in content_type
    ):
        return True
    length = headers.get("content-length")
    # isascii: str.isdigit() also accepts digits such as '²' that int() refuses.
    if length is None or not (length.isascii() and length.isdigit()):
        return True  # chunked or read-until-close: could be endless
    return int(length) > BUFFER_LIMIT


class StreamResponses:
    """Decides, when the response headers arrive (``responseheaders``), whether a response is
    streamed, and starts the adapter's response transform on a 2xx answer."""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            return
        ctx = request_context(flow)
        if ctx is not None and ctx.transform is not None and 200 <= flow.response.status_code < 300:
            ctx.transform.start(flow.response)
            flow.response.stream = ctx.transform.feed
        elif should_stream(flow.response.headers):
            flow.response.stream = True
