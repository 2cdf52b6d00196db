from mitmproxy.test import tutils

from aibridgeproxyd.mitm.http_layer import as_http1


def test_http2_request_becomes_http1_with_host_and_length() -> None:
    request = tutils.treq(
        http_version=b"HTTP/2.0", authority=b"api.openai.com", content=b'{"a": 1}'
    )
    request.headers.pop("content-length", None)
    request.headers.pop("host", None)
    request.headers.add("cookie", "a=1")
    request.headers.add("cookie", "b=2")
    as_http1(request)
    assert request.http_version == "HTTP/1.1"
    assert request.headers["host"] == "api.openai.com"
    assert request.authority == ""
    assert request.headers["content-length"] == "8"
    assert request.headers["cookie"] == "a=1; b=2"


def test_http1_request_is_left_alone() -> None:
    request = tutils.treq(content=b"")
    before = request.copy()
    as_http1(request)
    assert request.data == before.data
