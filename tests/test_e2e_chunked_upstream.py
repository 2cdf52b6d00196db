"""An upstream's chunked answer through the real daemon, cut into reads every which way
(``aibridgeproxyd.mitm.body_chunks`` coalesces the chunks one read holds; the recording's taps read
each piece once sent): the client gets the same bytes, the record the exact usage, tool call and
thought, a keep-alive upstream connection serves the next answer, and a broken or hostile
chunked answer is cut off cleanly, never with a traceback.

The upstream is ``ScriptedUpstream``: every byte and every write is the test's.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from tests.fakes import tool_content
from tests.fakes.scripted import CLOSE, ScriptedUpstream
from tests.harness import DaemonProcess, open_tls_tunnel, trust

OPENAI = "api.openai.com"
USAGE = {"prompt_tokens": 31, "completion_tokens": 17, "total_tokens": 48}
CONTENT = tool_content.FakeContent(tool_call=True, thinking=True)
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream(pause=0.005) as fake:
        yield fake


@pytest.fixture(scope="module")
def daemon(scripted: ScriptedUpstream) -> Iterator[DaemonProcess]:
    with DaemonProcess({"upstream_ca_file": scripted.ca_pem_path, "auth": "none"}) as d:
        d.edit_provider("openai", scripted.base_url + "/v1", "sk-openai-central")
        d.edit_provider("anthropic", scripted.base_url, "sk-ant-first", "sk-ant-second")
        d.reload_and_wait()
        yield d


@pytest.fixture(autouse=True)
def clean(scripted: ScriptedUpstream) -> None:
    scripted.reset()


def sse_frames() -> list[bytes]:
    payload = {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}
    frames = tool_content.chat_completions(payload, 1, CONTENT, USAGE)
    assert isinstance(frames, list)
    return frames


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def cut(wire: bytes, sizes: list[int]) -> list[bytes]:
    """``wire`` in writes of ``sizes`` bytes, cycling, the rest in the last."""
    writes, at, i = [], 0, 0
    while at < len(wire):
        size = sizes[i % len(sizes)]
        writes.append(wire[at : at + size])
        at, i = at + size, i + 1
    return writes


def client(daemon: DaemonProcess, **kwargs: Any) -> httpx.Client:
    return httpx.Client(
        proxy=daemon.proxy_url, verify=trust(daemon.ca_cert_path), timeout=20, **kwargs
    )


def chat(http: httpx.Client) -> httpx.Response:
    body = {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}
    return http.post(f"https://{OPENAI}/v1/chat/completions", json=body)


def record_of(daemon: DaemonProcess, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        listed = json.loads(daemon.cli("interceptions", "list", check=True).stdout)
        return next((r for r in listed if r["id"] == request_id), None)

    return daemon.wait_for(find, message=f"record {request_id}")


def assert_recorded_exactly(daemon: DaemonProcess, response: httpx.Response) -> None:
    record = record_of(daemon, response.headers["x-aibridge-request-id"])
    assert (record["input_tokens"], record["output_tokens"]) == (31, 17), record
    calls = [(c["tool_call_id"], c["tool"], c["input"]) for c in record["tool_calls"]]
    assert calls == [
        (tool_content.TOOL_CALL_ID, tool_content.TOOL_NAME, json.loads(tool_content.TOOL_ARGUMENTS))
    ] or calls == [
        (tool_content.TOOL_CALL_ID, tool_content.TOOL_NAME, tool_content.TOOL_ARGUMENTS)
    ], calls
    assert list(record["thoughts"]) == [tool_content.THOUGHT], record["thoughts"]


@pytest.mark.parametrize("sizes", [[1], [2, 3], [7], [13, 1], [64], [4096]])
def test_a_chunked_sse_answer_cut_into_any_reads_reaches_the_client_and_the_record_exactly(
    daemon: DaemonProcess, scripted: ScriptedUpstream, sizes: list[int]
) -> None:
    frames = sse_frames()
    wire = chunked(*frames)
    scripted.script([SSE_HEAD, *cut(wire, sizes)])
    with client(daemon) as http:
        response = chat(http)
    assert response.status_code == 200
    assert response.content == b"".join(frames)
    assert_recorded_exactly(daemon, response)


def test_each_event_its_own_chunk_all_in_one_read_after_the_head(
    daemon: DaemonProcess, scripted: ScriptedUpstream
) -> None:
    frames = sse_frames()
    scripted.script([SSE_HEAD + chunked(frames[0])[:-5], chunked(*frames[1:])])
    with client(daemon) as http:
        response = chat(http)
    assert response.content == b"".join(frames)
    assert_recorded_exactly(daemon, response)


def h2_tunnel(daemon: DaemonProcess) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    context = trust(daemon.ca_cert_path)
    context.set_alpn_protocols(["h2"])
    sock = open_tls_tunnel(daemon.proxy_host, daemon.proxy_port, f"{OPENAI}:443", context)
    assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    body = json.dumps(
        {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}
    ).encode()
    conn.send_headers(
        1,
        [(":method", "POST"), (":path", "/v1/chat/completions"), (":scheme", "https"),
         (":authority", OPENAI), ("content-type", "application/json"),
         ("content-length", str(len(body)))],
    )  # fmt: skip
    conn.send_data(1, body, end_stream=True)
    sock.sendall(conn.data_to_send())
    return sock, conn


def h2_get(daemon: DaemonProcess) -> tuple[dict[str, str], bytes]:
    sock, conn = h2_tunnel(daemon)
    headers: dict[str, str] = {}
    body = b""
    with sock:
        while True:
            data = sock.recv(65536)
            assert data, "the proxy closed before the stream ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return headers, body
            sock.sendall(conn.data_to_send())


def test_an_http2_client_gets_a_coalesced_answer_and_the_record_is_exact(
    daemon: DaemonProcess, scripted: ScriptedUpstream
) -> None:
    frames = sse_frames()
    scripted.script([SSE_HEAD, *cut(chunked(*frames), [5, 300])])
    headers, body = h2_get(daemon)
    assert headers[":status"] == "200"
    assert body == b"".join(frames)
    record = record_of(daemon, headers["x-aibridge-request-id"])
    assert (record["input_tokens"], record["output_tokens"]) == (31, 17), record
    assert [c["tool"] for c in record["tool_calls"]] == [tool_content.TOOL_NAME]
    assert list(record["thoughts"]) == [tool_content.THOUGHT]


def test_the_upstream_connection_serves_the_next_answers_after_a_coalesced_one(
    daemon: DaemonProcess, scripted: ScriptedUpstream
) -> None:
    frames = sse_frames()
    json_body = b'{"object":"list","data":[]}'
    scripted.script(
        [SSE_HEAD, *cut(chunked(*frames), [3, 500])],
        [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
         b"Content-Length: %d\r\n\r\n" % len(json_body), json_body],
        [SSE_HEAD, chunked(*frames)],
        [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n" + chunked(json_body[:5])[:-5],
         chunked(json_body[5:])],
    )  # fmt: skip
    with client(daemon) as http:
        first = chat(http)
        second = http.get(f"https://{OPENAI}/v1/models")
        third = chat(http)
        fourth = http.get(f"https://{OPENAI}/v1/models")
    assert first.content == third.content == b"".join(frames)
    assert second.content == fourth.content == json_body
    assert scripted.connections == 1, scripted.requests  # one upstream connection, kept alive
    assert_recorded_exactly(daemon, third)


def test_bytes_after_the_last_chunk_never_become_the_next_answer(
    daemon: DaemonProcess, scripted: ScriptedUpstream
) -> None:
    """A hostile upstream sends an unasked-for response behind the last chunk: it is not read as
    the answer to the next request (which gets its own, from a new connection)."""
    frames = sse_frames()
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsmuggled!"
    wire = chunked(*frames)
    scripted.script(
        [SSE_HEAD + wire[:10], wire[10:] + smuggled],
        [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"],
    )
    with client(daemon) as http:
        first = chat(http)
        second = http.get(f"https://{OPENAI}/v1/models")
    assert first.content == b"".join(frames)
    assert second.content == b"{}"
    assert [line for _, line in scripted.requests][-1].startswith("GET /v1/models")


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(lambda w: w[: w.index(b"data: [DONE]") + 3], id="cut-mid-chunk"),
        pytest.param(lambda w: w[:-5], id="cut-before-last-chunk"),
        pytest.param(lambda w: w[:-2], id="cut-inside-last-chunk"),
        pytest.param(lambda w: w[: w.index(b"data: [DONE]") - 2] + b"zz\r\n", id="bad-size"),
        pytest.param(lambda w: w[: w.index(b"data: [DONE]") - 3] + b"\r\n", id="bad-footer"),
    ],
)
def test_a_broken_chunked_answer_gives_the_client_what_came_then_cuts_it_off(
    daemon: DaemonProcess, scripted: ScriptedUpstream, tail: Any
) -> None:
    frames = sse_frames()
    wire = chunked(*frames)
    broken = tail(wire)
    scripted.script([SSE_HEAD + wire[:40], broken[40:], CLOSE])
    got = b""
    with client(daemon) as http, pytest.raises(httpx.HTTPError):
        body = {"model": "gpt-4o", "stream": True}
        with http.stream("POST", f"https://{OPENAI}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for piece in r.iter_raw():
                got += piece
    assert b"".join(frames).startswith(got)
    assert b"".join(frames[:-2]) in got or len(got) > 0
    assert "Traceback" not in daemon.logs()


@pytest.mark.parametrize("first_read", [10, 10**6], ids=["later-read", "all-in-the-first-read"])
def test_an_answer_with_trailer_fields_reaches_the_client_whole_and_the_next_one_too(
    daemon: DaemonProcess, scripted: ScriptedUpstream, first_read: int
) -> None:
    """mitmproxy's HTTP/1 layer raises NotImplementedError for trailers, which ended the whole
    client connection with a traceback; they are discarded (RFC 9112 section 7.1.2)."""
    frames = sse_frames()
    wire = chunked(*frames)[:-2] + b"X-Checksum: abc\r\n\r\n"
    whole = SSE_HEAD + wire
    scripted.script(
        [whole[:first_read], whole[first_read:]] if first_read < len(whole) else [whole],
        [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"],
    )
    with client(daemon) as http:
        response = chat(http)
        assert response.content == b"".join(frames)
        assert http.get(f"https://{OPENAI}/v1/models").content == b"{}"
    assert_recorded_exactly(daemon, response)
    assert scripted.connections == 1
    assert "Traceback" not in daemon.logs()


def test_thousands_of_tiny_chunks_in_one_read_and_a_huge_chunk_pass_whole(
    daemon: DaemonProcess, scripted: ScriptedUpstream
) -> None:
    tiny = [bytes([65 + i % 26]) for i in range(20000)]
    huge = bytes(range(256)) * 8192  # 2 MiB
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    tiny_wire = chunked(*tiny)
    scripted.script(
        [head, tiny_wire],
        [head, chunked(huge)],
    )
    with client(daemon) as http:
        first = http.get(f"https://{OPENAI}/v1/files/x/content")
        second = http.get(f"https://{OPENAI}/v1/files/y/content")
    assert first.content == b"".join(tiny)
    assert second.content == huge
    assert scripted.connections == 1


def test_http10_and_content_length_answers_are_untouched(
    daemon: DaemonProcess, scripted: ScriptedUpstream
) -> None:
    body = b"data: " + b"x" * 100000 + b"\n\n"
    scripted.script(
        [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
         b"Content-Length: %d\r\n\r\n" % len(body), *cut(body, [777])],
        [b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n", *cut(body, [999]), CLOSE],
    )  # fmt: skip
    with client(daemon) as http:
        first = http.get(f"https://{OPENAI}/v1/a")
        second = http.get(f"https://{OPENAI}/v1/b")
    assert first.content == body
    assert second.content == body


def h2_stream_then_reset(daemon: DaemonProcess) -> None:
    sock, conn = h2_tunnel(daemon)
    with sock:
        got_data = False
        while not got_data:
            data = sock.recv(65536)
            assert data
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    got_data = True
            sock.sendall(conn.data_to_send())
        conn.reset_stream(1)
        sock.sendall(conn.data_to_send())
        sock.settimeout(1)
        try:
            while sock.recv(65536):
                pass
        except (TimeoutError, ssl.SSLError, OSError):
            pass


def test_a_client_that_resets_mid_coalesced_stream_leaves_the_proxy_serving(
    daemon: DaemonProcess, scripted: ScriptedUpstream
) -> None:
    frames = sse_frames()
    wire = chunked(*frames)
    scripted.script([SSE_HEAD + wire[:30], *cut(wire[30:], [2])])
    h2_stream_then_reset(daemon)
    scripted.script(
        [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"]
    )
    with client(daemon) as http:
        assert http.get(f"https://{OPENAI}/v1/models").content == b"{}"
    assert "Traceback" not in daemon.logs()


def test_a_chunked_401_read_across_reads_is_discarded_and_the_next_key_answers_on_the_same_connection(
    daemon: DaemonProcess, scripted: ScriptedUpstream
) -> None:
    """Key failover (``AIBridgeHttpStream.state_discard_response``) reads the refused answer, in
    coalesced pieces, to its end: the connection serves the resend, the client sees only it."""
    refusal = json.dumps({"type": "error", "error": {"type": "authentication_error"}}).encode()
    refused = (
        b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + chunked(*[refusal[i : i + 5] for i in range(0, len(refusal), 5)])
    )
    usage = {"input_tokens": 12, "output_tokens": 9}
    payload = {"model": "claude-sonnet-4-5", "stream": True, "max_tokens": 10, "messages": []}
    frames = tool_content.messages(payload, 7, CONTENT, usage)
    assert isinstance(frames, list)
    scripted.script(cut(refused, [60, 9, 200]), [SSE_HEAD, *cut(chunked(*frames), [11, 700])])
    with client(daemon) as http:
        response = http.post(
            "https://api.anthropic.com/v1/messages",
            json=payload,
            headers={"anthropic-version": "2023-06-01"},
        )
    assert response.status_code == 200, response.text
    assert response.content == b"".join(frames)
    assert scripted.connections == 1, scripted.requests
    record = record_of(daemon, response.headers["x-aibridge-request-id"])
    assert (record["input_tokens"], record["output_tokens"]) == (12, 9), record
    assert [c["tool"] for c in record["tool_calls"]] == [tool_content.TOOL_NAME]
    assert list(record["thoughts"]) == [tool_content.THOUGHT]


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize(
    "flood",
    [
        pytest.param(lambda n: b"f" * n, id="chunk-size-line"),
        pytest.param(lambda n: b"0\r\nX-Trailer: " + b"y" * n, id="trailer-section"),
    ],
)
def test_a_chunk_size_line_or_trailer_section_that_never_ends_is_cut_off_not_buffered(
    daemon: DaemonProcess, scripted: ScriptedUpstream, flood: Any
) -> None:
    """h11 buffers a chunk-size line or trailer section until its line ends; an upstream that
    never ends one must not grow the proxy's memory by what it sends."""
    frames = sse_frames()
    size = 96 * 1024 * 1024
    scripted.script([SSE_HEAD + chunked(frames[0])[:-5], *cut(flood(size), [1024 * 1024]), CLOSE])
    before = peak_rss(daemon.pid)
    got = b""
    with client(daemon) as http, pytest.raises(httpx.HTTPError):
        body = {"model": "gpt-4o", "stream": True}
        with http.stream("POST", f"https://{OPENAI}/v1/chat/completions", json=body) as r:
            for piece in r.iter_raw():
                got += piece
    assert got == frames[0]
    assert peak_rss(daemon.pid) - before < 32 * 1024 * 1024
    assert "Traceback" not in daemon.logs()


def test_a_response_head_that_never_ends_is_cut_off_not_buffered(
    daemon: DaemonProcess, scripted: ScriptedUpstream
) -> None:
    flood = b"HTTP/1.1 200 OK\r\nX-Flood: " + b"z" * (96 * 1024 * 1024)
    scripted.script([*cut(flood, [1024 * 1024]), CLOSE])
    before = peak_rss(daemon.pid)
    with client(daemon) as http:
        response = chat(http)
    assert response.status_code == 502, response.text
    assert peak_rss(daemon.pid) - before < 32 * 1024 * 1024
    assert "upstream response head over" in daemon.logs()
    assert "Traceback" not in daemon.logs()


INFORMATIONAL = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"


def test_informational_answers_before_the_answer_are_passed_over(
    daemon: DaemonProcess, scripted: ScriptedUpstream
) -> None:
    """An upstream may send 1xx heads before its answer (RFC 9110 section 15.2). mitmproxy took
    the first for the answer: the client got a lone 1xx and hung waiting for the real one."""
    frames = sse_frames()
    wire = INFORMATIONAL * 40 + SSE_HEAD + chunked(*frames)
    scripted.script(cut(wire, [7, 300]), [SSE_HEAD + chunked(*frames)])
    with client(daemon) as http:
        first = chat(http)
        assert first.status_code == 200, first.text
        assert first.content == b"".join(frames)
        second = chat(http)  # the same upstream connection serves the next answer
    assert second.content == b"".join(frames)
    assert scripted.connections == 1
    assert_recorded_exactly(daemon, first)
    assert "Traceback" not in daemon.logs()


def test_informational_answers_that_never_end_break_the_answer_off(
    daemon: DaemonProcess, scripted: ScriptedUpstream
) -> None:
    scripted.script([*cut(INFORMATIONAL * 20_000, [64 * 1024]), CLOSE])
    with client(daemon) as http:
        response = chat(http)
    assert response.status_code == 502, response.text
    assert response.json()["error"]["type"]  # the provider's error shape, not mitmproxy's page
    assert "informational" in daemon.logs()
    assert "Traceback" not in daemon.logs()


ERROR_HEAD = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
# An upstream echoing the request: the provider's key, which the redaction holds back a few
# bytes of at each chunk (the returned piece may be empty) until it knows no key starts there.
ECHO = b'{"error": {"message": "bad request from key sk-openai-central, see docs", "type": "x"}}'


@pytest.mark.parametrize("sizes", [[1], [3], [7, 2]])
@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_a_streamed_error_redacted_chunk_by_chunk_reaches_the_client_whole_when_each_chunk_is_its_own_read(
    daemon: DaemonProcess, scripted: ScriptedUpstream, sizes: list[int], http2: bool
) -> None:
    """Each tiny chunk is one read (``ScriptedUpstream`` pauses between writes), so each goes
    through ``AIBridgeHttpStream._stream_chunk`` alone and the redaction returns nothing for
    most of them: an empty piece must not be sent (to an HTTP/1.1 client in chunked encoding
    it would end the body early), and what was held back is sent at the end."""
    pieces = cut(ECHO, sizes)
    scripted.script([ERROR_HEAD, *(chunked(piece)[:-5] for piece in pieces), b"0\r\n\r\n"])
    if http2:
        headers, body = h2_get(daemon)
        status = int(headers[":status"])
    else:
        with client(daemon) as http:
            response = chat(http)
        status, body = response.status_code, response.content
    assert status == 400
    assert body == ECHO.replace(b"sk-openai-central", b"***")
    assert "Traceback" not in daemon.logs()
