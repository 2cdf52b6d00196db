"""The tiny addon bare mitmdump runs with (perf-anchors.md): JSON stays buffered, SSE streams."""

from mitmproxy import http


class StreamSSE:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
            flow.response.stream = True


addons = [StreamSSE()]
