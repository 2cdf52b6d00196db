"""A hostile or broken upstream through the real daemon, recording on: compressed answers that
lie or explode when decoded, usage values no provider sends, answers HTTP forbids a body for,
and an upstream that trickles. The client gets the upstream's bytes or a clean error in its
provider's shape; the daemon's memory and CPU stay bounded and the record is written.

The upstream is ``ScriptedUpstream``: every byte and every write is the test's.
"""

from __future__ import annotations

import bz2
import contextlib
import json
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import brotli
import httpx
import pytest

from aibridgeproxyd.adapters.base import MAX_DECODED_REQUEST_BODY
from tests.fakes.scripted import CLOSE, ScriptedUpstream
from tests.harness import DaemonProcess, open_tls_tunnel, trust

try:
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from backports import zstd  # type: ignore[no-redef,unused-ignore]

OPENAI = "api.openai.com"
MiB = 1024 * 1024
# What a bomb decodes to; far more than the daemon may hold for one answer.
BOMB_SIZE = 512 * MiB
# How much the daemon's peak resident set may grow while it passes one bomb.
RSS_ALLOWANCE = 48 * MiB


def _zeros(compressor: Any, finish: Callable[[], bytes], size: int) -> bytes:
    block = b"\0" * MiB
    return b"".join(compressor(block) for _ in range(size // MiB)) + finish()


def gzip_bomb(size: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return _zeros(c.compress, c.flush, size)


def zstd_bomb(size: int) -> bytes:
    c = zstd.ZstdCompressor(level=3)
    return _zeros(c.compress, c.flush, size)


def br_bomb(size: int) -> bytes:
    c = brotli.Compressor(quality=1)
    return _zeros(c.process, c.finish, size)


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream(pause=0.001) as fake:
        yield fake


@pytest.fixture(scope="module")
def daemon(scripted: ScriptedUpstream) -> Iterator[DaemonProcess]:
    config = {
        "upstream_ca_file": scripted.ca_pem_path,
        "auth": "none",
        "upstream_connect_timeout": "2s",
        "upstream_response_timeout": "2s",
        "upstream_idle_timeout": "2s",
    }
    with DaemonProcess(config) as d:
        d.edit_provider("openai", scripted.base_url + "/v1", "sk-openai-central-0123456789")
        d.edit_provider("anthropic", scripted.base_url, "sk-ant-central-0123456789")
        d.reload_and_wait()
        yield d


@pytest.fixture(autouse=True)
def clean(scripted: ScriptedUpstream) -> None:
    scripted.reset()


def client(daemon: DaemonProcess) -> httpx.Client:
    return httpx.Client(proxy=daemon.proxy_url, verify=trust(daemon.ca_cert_path), timeout=30)


def raw_post(
    http: httpx.Client, body: dict[str, Any], host: str = OPENAI
) -> tuple[int, bytes, str]:
    """POST to the chat API; (status, the body exactly as it came, undecoded, request id)."""
    path = "/v1/messages" if "anthropic" in host else "/v1/chat/completions"
    headers = {"anthropic-version": "2023-06-01"} if "anthropic" in host else {}
    with http.stream("POST", f"https://{host}{path}", json=body, headers=headers) as response:
        raw = b"".join(response.iter_raw())
        return response.status_code, raw, response.headers.get("x-aibridge-request-id", "")


def record_of(daemon: DaemonProcess, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        listed = json.loads(daemon.cli("interceptions", "list", check=True).stdout)
        return next((r for r in listed if r["id"] == request_id), None)

    return daemon.wait_for(find, timeout=20, message=f"record {request_id}")


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def reset_peak_rss(pid: int) -> int:
    """Resets the process's peak resident set (``VmHWM``) to its current one, so that a test
    measures its own peak, not an earlier test's (proc(5), ``clear_refs``); returns it."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return proc_status(pid, "VmHWM")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def head(status: str, content_type: str, encoding: str, length: int | None) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Encoding: %s\r\n%s\r\n\r\n" % (
        status.encode(),
        content_type.encode(),
        encoding.encode(),
        framing,
    )


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def bz2_bomb(size: int) -> bytes:
    """No HTTP coding, but mitmproxy's ``get_content`` decoded any Python codec it was named."""
    c = bz2.BZ2Compressor(9)
    return _zeros(c.compress, c.flush, size)


BOMBS = {"gzip": gzip_bomb, "zstd": zstd_bomb, "br": br_bomb, "bz2": bz2_bomb}


STATUSES = ["200 OK", "400 Bad Request", "500 Internal Server Error"]


@pytest.mark.parametrize(
    ("encoding", "status"),
    [
        *((e, s) for e in ("zstd", "br") for s in STATUSES),
        ("bz2", "200 OK"),
        ("bz2", "400 Bad Request"),
    ],
)
def test_a_buffered_answer_that_decodes_to_half_a_gigabyte_passes_untouched_in_bounded_memory(
    daemon: DaemonProcess, scripted: ScriptedUpstream, encoding: str, status: str
) -> None:
    """A small answer with a Content-Length is buffered whole (``addons/streaming.py``), then
    read for usage and tool calls (2xx) or redacted and logged (an error): a few kilobytes of
    zstd or brotli (or 400 bytes of bz2) that decode to 512 MiB must not be decoded whole.
    mitmproxy's ``get_content`` decoded them in one call, and kept the last one decoded."""
    # A bomb of its own size for each case: mitmproxy caches the last body it decoded.
    bomb = BOMBS[encoding](BOMB_SIZE + int(status[:3]) * MiB)
    assert len(bomb) < 200 * 1024
    scripted.script([head(status, "application/json", encoding, len(bomb)), bomb])
    before = reset_peak_rss(daemon.pid)
    with client(daemon) as http:
        code, raw, request_id = raw_post(http, {"model": "gpt-4o", "messages": []})
    assert code == int(status[:3]), daemon.logs()[-3000:]
    grown = proc_status(daemon.pid, "VmHWM") - before
    assert grown < RSS_ALLOWANCE, f"peak RSS grew {grown // MiB} MiB"
    if code == 200:
        assert raw == bomb  # the upstream's bytes, untouched
    record = record_of(daemon, request_id)
    assert record["status"] == code
    assert record["input_tokens"] is None and record["output_tokens"] is None
    assert "Traceback" not in daemon.logs()


@pytest.mark.parametrize("status", ["200 OK", "400 Bad Request"])
def test_a_chunked_answer_that_decodes_to_half_a_gigabyte_passes_in_bounded_memory(
    daemon: DaemonProcess, scripted: ScriptedUpstream, status: str
) -> None:
    """Streamed: a 2xx is read by the taps piece by piece; an error is kept (64 KiB at most)
    and decoded up to ``errors.MAX_DECODED_ERROR_BODY`` to be redacted, so this one leaves
    with an empty body (nothing of it could be checked)."""
    bomb = zstd_bomb(BOMB_SIZE + 7 * MiB)
    scripted.script([head(status, "application/json", "zstd", None), chunked(*cut(bomb, 4096))])
    before = reset_peak_rss(daemon.pid)
    with client(daemon) as http:
        code, raw, request_id = raw_post(http, {"model": "gpt-4o", "messages": []})
    grown = proc_status(daemon.pid, "VmHWM") - before
    assert code == int(status[:3])
    assert grown < RSS_ALLOWANCE, f"peak RSS grew {grown // MiB} MiB"
    assert raw == (bomb if code == 200 else b"")
    assert record_of(daemon, request_id)["status"] == code
    assert "Traceback" not in daemon.logs()


USAGE = {"prompt_tokens": 31, "completion_tokens": 17, "total_tokens": 48}


def sse_events(usage: Any = USAGE) -> bytes:
    first = {"id": "c1", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    last = {"id": "c1", "model": "gpt-4o", "choices": [], "usage": usage}
    return b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in (first, last)) + (
        b"data: [DONE]\n\n"
    )


def compress(encoding: str, data: bytes) -> bytes:
    if encoding == "gzip":
        c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return c.compress(data) + c.flush()
    if encoding == "br":
        return bytes(brotli.compress(data))
    return bytes(zstd.compress(data))


SSE = "text/event-stream"
CHAT = {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}


def cut(data: bytes, size: int) -> list[bytes]:
    return [data[at : at + size] for at in range(0, len(data), size)]


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_a_compressed_sse_answer_is_read_for_usage_and_passes_untouched(
    daemon: DaemonProcess, scripted: ScriptedUpstream, encoding: str
) -> None:
    body = compress(encoding, sse_events())
    scripted.script([head("200 OK", SSE, encoding, None), *cut(chunked(*cut(body, 7)), 50)])
    with client(daemon) as http:
        code, raw, request_id = raw_post(http, CHAT)
    assert (code, raw) == (200, body)
    record = record_of(daemon, request_id)
    assert (record["input_tokens"], record["output_tokens"]) == (31, 17), record


def test_a_streamed_decompression_bomb_costs_the_daemon_little_cpu(
    daemon: DaemonProcess, scripted: ScriptedUpstream
) -> None:
    """256 KiB of zstd that decode to 8 GiB, streamed: the taps would decode and scan all of it
    on the event loop (seconds per 64 KiB read). They stop at the decoding ratio's bound
    (``usage.MAX_DECODING_RATIO``); the client still gets every byte."""
    bomb = zstd_bomb(8 * 1024 * MiB)
    scripted.script([head("200 OK", SSE, "zstd", None), *cut(chunked(*cut(bomb, 16 * 1024)), MiB)])
    before = cpu_seconds(daemon.pid)
    with client(daemon) as http:
        code, raw, request_id = raw_post(http, CHAT)
    spent = cpu_seconds(daemon.pid) - before
    assert (code, raw == bomb) == (200, True)
    assert spent < 2.0, f"the daemon spent {spent:.1f} s of CPU on a 256 KiB answer"
    record = record_of(daemon, request_id)
    assert record["status"] == 200 and record["input_tokens"] is None


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        pytest.param(
            "gzip, br", lambda: compress("br", compress("gzip", sse_events())), id="stacked"
        ),
        pytest.param("x-unknown", sse_events, id="unknown"),
        pytest.param("gzip", sse_events, id="says-gzip-is-plain"),
        pytest.param("gzip", lambda: compress("gzip", sse_events())[:-20], id="gzip-truncated"),
        pytest.param("br", lambda: b"\xff" * 300, id="br-garbage"),
    ],
)
@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_an_answer_whose_encoding_cannot_be_read_passes_untouched_and_is_recorded_without_usage(
    daemon: DaemonProcess,
    scripted: ScriptedUpstream,
    encoding: str,
    body: Callable[[], bytes],
    framing: str,
) -> None:
    data = body()
    if framing == "chunked":
        script = [head("200 OK", SSE, encoding, None), chunked(*cut(data, 40))]
    else:
        script = [head("200 OK", "application/json", encoding, len(data)), data]
    scripted.script(script)
    with client(daemon) as http:
        code, raw, request_id = raw_post(http, CHAT)
    assert (code, raw) == (200, data)
    record = record_of(daemon, request_id)
    assert record["status"] == 200 and record["output_tokens"] is None, record
    assert "Traceback" not in daemon.logs()


def test_a_compressed_request_of_a_user_under_a_budget_is_not_decoded_whole(
    scripted: ScriptedUpstream,
) -> None:
    """A user under a budget gets ``stream_options.include_usage`` added to an OpenAI stream
    (``policing.ask_for_stream_usage``), which read the request body with mitmproxy's
    unbounded ``get_content``: 16 KiB of zstd from the client decoded to 512 MiB."""
    with DaemonProcess({"upstream_ca_file": scripted.ca_pem_path}) as d:
        d.edit_provider("openai", scripted.base_url + "/v1", "sk-openai-central-0123456789")
        token = d.create_token("budgeted", reload=False)
        d.cli(
            "policies",
            "set",
            "--user",
            "budgeted",
            "--budget-usd",
            "5",
            "--period",
            "day",
            check=True,
        )
        d.reload_and_wait()
        bomb = zstd_bomb(BOMB_SIZE)
        answer = b'{"choices": []}'
        scripted.script(
            [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)]
        )  # fmt: skip
        before = reset_peak_rss(d.pid)
        with httpx.Client(
            proxy=d.proxy_url_for(token), verify=trust(d.ca_cert_path), timeout=30
        ) as http:
            response = http.post(
                f"https://{OPENAI}/v1/chat/completions",
                content=bomb,
                headers={"content-type": "application/json", "content-encoding": "zstd"},
            )
        grown = proc_status(d.pid, "VmHWM") - before
        assert response.status_code in (200, 400, 413), response.text
        # A request body is decoded up to MAX_DECODED_REQUEST_BODY (the bytearray, then bytes).
        allowed = 2 * MAX_DECODED_REQUEST_BODY + RSS_ALLOWANCE
        assert grown < allowed, f"peak RSS grew {grown // MiB} MiB"
        assert "Traceback" not in d.logs()


KEY = "sk-openai-central-0123456789"


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("encoding", ["gzip, br", "x-unknown", "gzip"])
def test_an_error_echoing_the_key_in_a_coding_the_proxy_cannot_read_never_hands_it_over(
    daemon: DaemonProcess, scripted: ScriptedUpstream, encoding: str, framing: str
) -> None:
    """An error answer is redacted before it leaves (``addons/error_answers.py``). One in a
    stacked coding mitmproxy cannot undo went out as it came, and the client (httpx decodes
    "gzip, br") read the echoed key; the "gzip" case is a gzip header on a plain body."""
    echo = json.dumps({"error": {"message": f"bad key {KEY}"}}).encode()
    data = compress("br", compress("gzip", echo)) if encoding == "gzip, br" else echo
    length = None if framing == "chunked" else len(data)
    wire = chunked(data) if framing == "chunked" else data
    scripted.script([head("400 Bad Request", "application/json", encoding, length), wire])
    with client(daemon) as http:
        response = http.post(f"https://{OPENAI}/v1/chat/completions", json=CHAT)
    assert response.status_code == 400
    assert KEY not in response.content.decode("latin-1")
    assert KEY not in daemon.logs()


# --- usage values no provider sends ---------------------------------------------------------------

HOSTILE_VALUES = [10**30, 2**63, -5, 1.5, 1e308, "12", {"n": 1}, [3], True, None]


def hostile_answers(value: Any) -> list[tuple[str, str, bytes]]:
    """(host, content type, body) of answers whose every count is ``value``: OpenAI chat and
    Responses, and Anthropic's message_start and message_delta, streamed and whole."""
    chat_usage = {
        "prompt_tokens": value,
        "completion_tokens": value,
        "prompt_tokens_details": {"cached_tokens": value},
        "completion_tokens_details": {"reasoning_tokens": value},
    }
    responses_usage = {
        "input_tokens": value,
        "output_tokens": value,
        "input_tokens_details": {"cached_tokens": value},
    }
    anthropic_usage = {
        "input_tokens": value,
        "output_tokens": value,
        "cache_read_input_tokens": value,
        "cache_creation_input_tokens": value,
    }
    start = {"type": "message_start", "message": {"model": "claude-x", "usage": anthropic_usage}}
    delta = {"type": "message_delta", "usage": {"output_tokens": value}}
    done = {"type": "response.completed", "response": {"model": "gpt-4o", "usage": responses_usage}}

    def sse(*events: Any) -> bytes:
        return b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in events)

    return [
        (OPENAI, "application/json", json.dumps({"model": "gpt-4o", "usage": chat_usage}).encode()),
        (OPENAI, SSE, sse_events(chat_usage)),
        (OPENAI, SSE, sse(done)),
        ("api.anthropic.com", SSE, sse(start, delta)),
        ("api.anthropic.com", "application/json", json.dumps(start["message"]).encode()),
    ]


def test_hostile_usage_values_are_recorded_as_unknown_and_break_no_metric(
    daemon: DaemonProcess, scripted: ScriptedUpstream
) -> None:
    """Counts are integers from 0 to 10**12 (``usage.MAX_TOKEN_COUNT``); anything else a
    provider says is no count: the record is stored with it null, cost and metrics stay sane."""
    sent = []
    with client(daemon) as http:
        for value in HOSTILE_VALUES:
            for host, content_type, body in hostile_answers(value):
                length = None if content_type == SSE else len(body)
                wire = chunked(body) if length is None else body
                scripted.script([head("200 OK", content_type, "identity", length), wire])
                code, raw, request_id = raw_post(http, {"model": "m", "messages": []}, host)
                assert (code, raw) == (200, body)
                sent.append(request_id)

    def all_stored() -> list[dict[str, Any]] | None:
        listed = json.loads(daemon.cli("interceptions", "list", check=True).stdout)
        records = [r for r in listed if r["id"] in sent]
        return records if len(records) == len(sent) else None

    for record in daemon.wait_for(all_stored, timeout=20, message="every record"):
        for field in ("input_tokens", "output_tokens", "cache_read_input_tokens"):
            assert record[field] is None or 0 <= record[field] <= 10**12, record
        assert record["cost_micros"] is None or record["cost_micros"] >= 0, record
    assert daemon.admin_get("/metrics").status_code == 200
    assert "Traceback" not in daemon.logs()


# --- recursion bombs and endless lines ------------------------------------------------------------

DEEP = 1_000_000


def deep_events() -> bytes:
    nested = b"[" * DEEP + b"]" * DEEP
    return (
        b'data: {"choices": [{"delta": {"tool_calls": ' + nested + b"}}]}\n\n"
        b'data: {"choices": [], "usage": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}\n\n"
        b'data: {"choices": [], "usage": ' + nested + b"}\n\n" + sse_events()
    )


def endless_line() -> bytes:
    start = b'data: {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "'
    return start + b"a" * (50 * MiB) + b'"}}]}}]}\n\n' + sse_events()


@pytest.mark.parametrize("body", [deep_events, endless_line], ids=["deep", "50-MB-line"])
@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_a_recursion_bomb_or_a_50_mb_line_passes_whole_and_the_usage_after_it_is_read(
    daemon: DaemonProcess, scripted: ScriptedUpstream, body: Callable[[], bytes], framing: str
) -> None:
    data = body()
    if framing == "chunked":
        script = [head("200 OK", SSE, "identity", None), *cut(chunked(*cut(data, 256 * 1024)), MiB)]
    else:
        script = [
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n",
            *cut(data, MiB),
            CLOSE,
        ]
    scripted.script(script)
    before = reset_peak_rss(daemon.pid)
    with client(daemon) as http:
        code, raw, request_id = raw_post(http, CHAT)
    grown = proc_status(daemon.pid, "VmHWM") - before
    assert code == 200 and raw == data
    assert grown < RSS_ALLOWANCE, f"peak RSS grew {grown // MiB} MiB"
    record = record_of(daemon, request_id)
    assert (record["input_tokens"], record["output_tokens"]) == (31, 17), record
    assert "Traceback" not in daemon.logs()


# --- answers HTTP forbids a body for -------------------------------------------------------------

JSON_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@pytest.mark.parametrize(
    ("method", "answer", "status"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsmuggled!", 200),
        (
            "HEAD",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nsmuggled!\r\n0\r\n\r\n",
            200,
        ),
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\nsmuggled!", 204),
        (
            "GET",
            b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nsmuggled!\r\n0\r\n\r\n",
            304,
        ),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n" + JSON_OK.replace(b"{}", b"[]"), 204),
    ],
    ids=["head-length", "head-chunked", "204-length", "304-chunked", "204-then-an-answer"],
)
def test_a_body_on_an_answer_that_may_have_none_never_becomes_the_next_answer(
    daemon: DaemonProcess, scripted: ScriptedUpstream, method: str, answer: bytes, status: int
) -> None:
    """RFC 9112 section 6.3: an answer to HEAD, a 204 and a 304 end with their head, whatever
    they say. The bytes an upstream sends after one must not answer the next request."""
    scripted.script([answer], [JSON_OK])
    with client(daemon) as http:
        first = http.request(method, f"https://{OPENAI}/v1/models")
        second = http.get(f"https://{OPENAI}/v1/models")
    assert first.status_code == status
    assert first.content == b""
    assert (second.status_code, second.content) == (200, b"{}"), second.text
    assert "Traceback" not in daemon.logs()


@pytest.mark.parametrize("status", [b"304 Not Modified"])
def test_a_bodiless_answer_said_to_be_chunked_leaves_without_a_chunked_end(
    daemon: DaemonProcess, scripted: ScriptedUpstream, status: bytes
) -> None:
    """mitmproxy ended such an answer with ``0\r\n\r\n``, which the client, knowing a 304
    has no body, read as the start of its next answer (``framing.headless_framing``). A 204 may
    not say chunked at all: mitmproxy's header validation answers it 502."""
    scripted.script(
        [b"HTTP/1.1 %s\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % status], [JSON_OK]
    )
    context = trust(daemon.ca_cert_path)
    with open_tls_tunnel(daemon.proxy_host, daemon.proxy_port, f"{OPENAI}:443", context) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
        got = b""
        while b"\r\n\r\n" not in got:
            got += sock.recv(65536)
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            got += sock.recv(65536)  # nothing after the head
        assert got.startswith(b"HTTP/1.1 " + status) and got.endswith(b"\r\n\r\n"), got
        assert b"transfer-encoding" not in got.lower()
        sock.settimeout(10)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK"), "the next answer is intact"


@pytest.mark.parametrize(
    "asked", [{}, {"upgrade": "h2c", "connection": "Upgrade"}], ids=["no-upgrade", "h2c"]
)
def test_a_101_that_is_no_websocket_handshake_is_a_clean_error(
    daemon: DaemonProcess, scripted: ScriptedUpstream, asked: dict[str, str]
) -> None:
    """mitmproxy passed such a 101 on, then relayed raw TCP between client and upstream: the
    client's later bytes went upstream unrecorded and unpoliced (``mitm/http_layer.py``,
    ``_refuse_unasked_switch``)."""
    scripted.script(
        [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
         b"\x81\x05hello"],
        [JSON_OK],
    )  # fmt: skip
    with client(daemon) as http:
        first = http.post(f"https://{OPENAI}/v1/chat/completions", json=CHAT, headers=asked)
        second = http.get(f"https://{OPENAI}/v1/models")
    assert first.status_code == 502, first.text
    assert first.json()["error"]["type"]
    assert (second.status_code, second.content) == (200, b"{}"), second.text
    record = record_of(daemon, first.headers["x-aibridge-request-id"])
    assert record["status"] == 502, record
    assert "Traceback" not in daemon.logs()


# --- an answer before the request body was sent ----------------------------------------------------


class HeadOnlyUpstream(ScriptedUpstream):
    """Reads a request's head only, then plays its script: an early answer (or a close) while
    the proxy is still sending the body."""

    name = "head-only"

    def _one_exchange(self, sock: socket.socket, number: int) -> bool:
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data:
                return False
            head += data
        with self._lock:
            self.requests.append((number, head.split(b"\r\n", 1)[0].decode("latin-1")))
            script = self._scripts.popleft() if self._scripts else [CLOSE]
        for write in script:
            if write is CLOSE:
                return False
            sock.sendall(write)
        return False  # the unread body makes the connection unusable


@pytest.fixture(scope="module")
def head_only() -> Iterator[HeadOnlyUpstream]:
    with HeadOnlyUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def early_daemon(head_only: HeadOnlyUpstream) -> Iterator[DaemonProcess]:
    config = {"upstream_ca_file": head_only.ca_pem_path, "auth": "none"}
    with DaemonProcess(config) as d:
        d.edit_provider("openai", head_only.base_url + "/v1", "sk-openai-central-0123456789")
        d.reload_and_wait()
        yield d


TOO_LARGE = json.dumps({"error": {"message": "too large", "type": "invalid_request_error"}})


@pytest.mark.parametrize(
    "script",
    [
        [b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(TOO_LARGE), TOO_LARGE.encode()),
         CLOSE],
        [b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(TOO_LARGE), TOO_LARGE.encode())],
        [CLOSE],
    ],
    ids=["413-then-close", "413-kept-open", "close-mid-body"],
)  # fmt: skip
def test_an_upstream_that_answers_or_closes_before_the_request_body_is_sent_gives_a_clean_answer(
    early_daemon: DaemonProcess, head_only: HeadOnlyUpstream, script: list[bytes]
) -> None:
    head_only.reset()
    head_only.script(script)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (20 * MiB)}]}
    with client(early_daemon) as http:
        response = http.post(f"https://{OPENAI}/v1/chat/completions", json=body)
    if response.status_code == 413:
        assert response.json()["error"]["message"] == "too large"
    else:
        assert response.status_code == 502, response.text
        assert response.json()["error"]["type"]
    assert "Traceback" not in early_daemon.logs()
    head_only.script([JSON_OK])  # the daemon serves the next request
    with client(early_daemon) as http:
        assert http.get(f"https://{OPENAI}/v1/models").content == b"{}"


# --- a slow upstream (the daemon here: upstream_response_timeout and upstream_idle_timeout 2s) -----


@pytest.fixture
def slow(scripted: ScriptedUpstream) -> Iterator[ScriptedUpstream]:
    scripted.pause = 0.4
    yield scripted
    scripted.pause = 0.001


def test_a_response_head_trickled_a_byte_at_a_time_gets_504_at_the_response_timeout(
    daemon: DaemonProcess, slow: ScriptedUpstream
) -> None:
    """Each byte is progress on the connection, but no response head arrived: the deadline
    counts from the request, not from the last byte."""
    slow.script([bytes([b]) for b in JSON_OK])
    started = time.monotonic()
    with client(daemon) as http:
        response = http.post(f"https://{OPENAI}/v1/chat/completions", json=CHAT)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 6
    record = record_of(daemon, response.headers["x-aibridge-request-id"])
    assert record["status"] == 504


def test_a_body_trickled_slower_than_nothing_but_never_silent_reaches_the_client_whole(
    daemon: DaemonProcess, slow: ScriptedUpstream
) -> None:
    """upstream_idle_timeout is silence: a byte every 0.4 s for 4 s is no silence of 2 s."""
    body = sse_events()
    frames = [chunked(body)[:-5][at : at + 40] for at in range(0, len(chunked(body)) - 5, 40)]
    slow.script(
        [head("200 OK", SSE, "identity", None), *frames[:10], b"".join(frames[10:]) + b"0\r\n\r\n"]
    )
    with client(daemon) as http:
        code, raw, request_id = raw_post(http, CHAT)
    assert (code, raw) == (200, body)
    assert record_of(daemon, request_id)["output_tokens"] == 17


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_an_upstream_silent_mid_body_is_cut_off_at_the_idle_timeout(
    daemon: DaemonProcess, scripted: ScriptedUpstream, framing: str
) -> None:
    body = sse_events()
    if framing == "chunked":
        script = [head("200 OK", SSE, "identity", None) + chunked(body[:30])[:-5]]
    else:
        script = [head("200 OK", "application/json", "identity", len(body)) + body[:30]]
    scripted.script(script)
    started = time.monotonic()
    with client(daemon) as http:
        try:
            code = raw_post(http, CHAT)[0]
        except httpx.HTTPError:
            code = 0  # the stream broke off after its head: what a client sees
    assert time.monotonic() - started < 8
    if framing == "length":
        assert code == 504
    assert "Traceback" not in daemon.logs()


# --- Bedrock: the adapter turns the event stream into SSE -----------------------------------------

BEDROCK_HOST = "bedrock.hostile.test"


@pytest.fixture(scope="module")
def bedrock(daemon: DaemonProcess, scripted: ScriptedUpstream) -> str:
    settings = {"region": "us-east-1", "model": "anthropic.claude-x", "access_key_id": "AKIDHOSTILE",
                "secret_access_key": "hostile/secret/0123456789"}  # fmt: skip
    options = [f"--set={name}={value}" for name, value in settings.items()]
    daemon.cli(
        "providers", "add", "bedrock-hostile", "--type", "bedrock", "--base-url",
        scripted.base_url, "--host", BEDROCK_HOST, *options, check=True,
    )  # fmt: skip
    daemon.reload_and_wait()
    return BEDROCK_HOST


def bedrock_frames() -> bytes:
    from tests.fakes.bedrock import anthropic_stream_events, chunk_message

    return b"".join(chunk_message(e) for e in anthropic_stream_events("claude-x", 3))


EVENT_STREAM = "application/vnd.amazon.eventstream"


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        pytest.param("gzip", lambda: compress("gzip", bedrock_frames()), id="gzip"),
        pytest.param("br", lambda: compress("br", bedrock_frames()), id="br"),
        pytest.param("gzip", bedrock_frames, id="says-gzip-is-plain"),
        pytest.param("identity", lambda: b"\x01\x00\x00\x00" + b"\0" * 64, id="16MB-frame-cut"),
    ],
)
def test_a_bedrock_stream_in_a_content_coding_reaches_the_client_readable(
    daemon: DaemonProcess,
    scripted: ScriptedUpstream,
    bedrock: str,
    encoding: str,
    body: Callable[[], bytes],
    request: pytest.FixtureRequest,
) -> None:
    """The adapter's transform sends plain SSE whatever came in: it undoes the upstream's
    Content-Encoding (in bounded pieces), and the answer no longer names it (the client's
    decoder failed on SSE said to be gzip); a stream it cannot read ends in an error event."""
    scripted.script([head("200 OK", EVENT_STREAM, encoding, None), chunked(*cut(body(), 100))])
    payload = {"model": "claude-x", "max_tokens": 5, "stream": True, "messages": []}
    with client(daemon) as http:
        response = http.post(
            f"https://{bedrock}/v1/messages",
            json=payload,
            headers={"anthropic-version": "2023-06-01"},
        )
    assert response.status_code == 200
    assert response.headers.get("content-encoding", "identity") == "identity"
    assert b"event: " in response.content, response.content[:300]
    record = record_of(daemon, response.headers["x-aibridge-request-id"])
    assert record["status"] == 200
    if request.node.callspec.id in ("gzip", "br"):
        assert b"message_stop" in response.content  # decoded, then converted whole
        assert record["input_tokens"] == 11, record
    else:
        assert b'event: error\ndata: {"type": "error"' in response.content  # Anthropic's shape
    assert "Traceback" not in daemon.logs()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Upgrade\r\nKeep-Alive: timeout=5\r\n"
        b"Upgrade: h2c\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Space:  \r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\x7fc\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["304-chunked", "connection-headers", "empty-values", "control-bytes"],
)
def test_an_http2_client_gets_an_answer_whose_head_http2_forbids_cleanly(
    daemon: DaemonProcess, scripted: ScriptedUpstream, answer: bytes
) -> None:
    """HTTP/2 forbids connection-specific header fields (RFC 9113 section 8.2.2); an HTTP/1
    upstream may send any. The HTTP/2 client gets the answer without them, or a clean error."""
    from tests.test_e2e_chunked_upstream import h2_get

    scripted.script([answer])
    headers, body = h2_get(daemon)
    assert headers[":status"] in ("200", "304", "502"), headers
    assert body in (b"{}", b"") or headers[":status"] == "502", body
    assert not {"connection", "keep-alive", "upgrade", "transfer-encoding"} & set(headers)
    assert "Traceback" not in daemon.logs()


def test_absurd_usage_on_postgresql_is_stored_and_the_counters_stay_in_64_bits(
    scripted: ScriptedUpstream, postgres_server: Any
) -> None:
    """On PostgreSQL, with a price and a policy: 10**12 tokens a response (the most a count may
    be, ``usage.MAX_TOKEN_COUNT``) at $1 a token is 1e18 micros a type. The shared counter's
    cost passed 64 bits on the fifth request, and PostgreSQL refused that sync and every later
    one ("bigint out of range"); the counter stops at ``store.COUNTER_CAP``."""
    price = {"input": 1_000_000, "output": 1_000_000}  # USD per million tokens: $1 a token
    config = {
        "database_url": postgres_server.create_database(),
        "upstream_ca_file": scripted.ca_pem_path,
        "prices": {"gpt-4o": price},
    }
    env = {"AIBRIDGEPROXYD_ENCRYPTION_KEYS": "UFFSU1RVVldYWVpbXF1eX2BhYmNkZWZnaGlqa2xtbm8="}
    with DaemonProcess(config, env=env) as d:
        d.edit_provider("openai", scripted.base_url + "/v1", "sk-openai-central-0123456789")
        token = d.create_token("absurd", reload=False)
        d.cli("policies", "set", "--user", "absurd", "--rpm", "1000", check=True)
        d.reload_and_wait()
        usage = {"prompt_tokens": 10**12, "completion_tokens": 10**12}
        body = json.dumps({"model": "gpt-4o", "usage": usage}).encode()
        answer = head("200 OK", "application/json", "identity", len(body)) + body
        with httpx.Client(proxy=d.proxy_url_for(token), verify=trust(d.ca_cert_path)) as http:
            for _ in range(6):
                scripted.script([answer])
                response = http.post(f"https://{OPENAI}/v1/chat/completions", json=CHAT)
                assert response.status_code == 200, response.text
                time.sleep(1.2)  # a counter sync (about 1 s) after each request
        listed = json.loads(d.cli("interceptions", "list", check=True).stdout)
        assert [r["output_tokens"] for r in listed] == [10**12] * 6, listed
        assert "out of range" not in d.logs() and "Traceback" not in d.logs()


@pytest.mark.parametrize("silent_after", [b"", b"\x16\x03\x01"], ids=["accept-only", "half-hello"])
def test_an_upstream_that_never_finishes_the_tls_handshake_gets_504(
    daemon: DaemonProcess, silent_after: bytes
) -> None:
    """Accepts the connection, then (nearly) nothing: the request was never sent, so
    ``upstream_response_timeout`` never started, and the client waited for ever. Now the
    connection is closed ``upstream_connect_timeout`` after its connect began
    (``AIBridgeHttpLayer._close_stalled_dials``)."""
    import socket as sockets
    import threading

    listener = sockets.create_server(("127.0.0.1", 0))
    held: list[sockets.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                conn.sendall(silent_after)
                held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    daemon.cli(
        "providers", "add", f"silent-{port}", "--type", "openai-compat", "--base-url",
        f"https://127.0.0.1:{port}/v1", "--host", f"silent{port}.test", "--key", KEY, check=True,
    )  # fmt: skip
    daemon.reload_and_wait()
    started = time.monotonic()
    try:
        with client(daemon) as http:
            response = http.post(f"https://silent{port}.test/v1/chat/completions", json=CHAT)
    finally:
        listener.close()
        for conn in held:
            conn.close()
    assert time.monotonic() - started < 6, "the client waited on a silent TLS handshake"
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert "Traceback" not in daemon.logs()


def test_a_tcp_connect_that_is_never_answered_gets_504_after_the_connect_timeout(
    daemon: DaemonProcess, scripted: ScriptedUpstream
) -> None:
    """A listener whose accept queue is full drops every new SYN, so a connect to it is never
    answered: the system would retry for about two minutes. ``upstream_connect_timeout`` (2s
    here) ends it with a 504 in the provider's shape, and the next request is served."""
    import socket as sockets

    listener = sockets.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    queued = sockets.create_connection(("127.0.0.1", port))  # fills the accept queue
    daemon.cli(
        "providers", "add", f"unanswered-{port}", "--type", "openai-compat", "--base-url",
        f"https://127.0.0.1:{port}/v1", "--host", f"unanswered{port}.test", "--key", KEY,
        check=True,
    )  # fmt: skip
    daemon.reload_and_wait()
    body = json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode()
    scripted.script([head("200 OK", "application/json", "identity", len(body)), body])
    log_start = len(daemon.logs())
    started = time.monotonic()
    try:
        with client(daemon) as http:
            response = http.post(f"https://unanswered{port}.test/v1/chat/completions", json=CHAT)
            waited = time.monotonic() - started
            answered = http.post(f"https://{OPENAI}/v1/chat/completions", json=CHAT)
    finally:
        queued.close()
        listener.close()
    assert waited < 30, f"the client waited {waited:.1f}s on an unanswered connect"
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_timeout", error
    assert f"unanswered-{port}" in error["message"] and KEY not in response.text
    logs = daemon.logs()[log_start:]
    assert "no upstream connection within 2s: timed out" in logs, logs[-2000:]
    assert answered.status_code == 200, answered.text
    assert "Traceback" not in daemon.logs()


def test_a_stalled_dial_whose_http2_stream_was_reset_is_still_closed_after_the_connect_timeout(
    daemon: DaemonProcess,
) -> None:
    """An HTTP/2 client resets its only stream while the upstream's TLS handshake stalls, and
    keeps its connection. The dial's deadline was checked only while a stream waited, so the
    upstream connection stayed open until the client left; now it is closed
    ``upstream_connect_timeout`` (2s) after its connect began, like any stalled dial."""
    import threading

    import h2.config
    import h2.connection
    import h2.errors

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    host = f"reset{port}.test"
    daemon.cli(
        "providers", "add", f"reset-{port}", "--type", "openai-compat", "--base-url",
        f"https://127.0.0.1:{port}/v1", "--host", host, "--key", KEY, check=True,
    )  # fmt: skip
    daemon.reload_and_wait()
    context = trust(daemon.ca_cert_path)
    context.set_alpn_protocols(["h2"])
    sock = open_tls_tunnel(daemon.proxy_host, daemon.proxy_port, f"{host}:443", context)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    head = [(":method", "GET"), (":path", "/v1/models"), (":scheme", "https"), (":authority", host)]
    conn.send_headers(1, head, end_stream=True)
    sock.sendall(conn.data_to_send())
    try:
        deadline = time.monotonic() + 5
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert accepted, "the daemon never dialled the upstream"
        conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        sock.sendall(conn.data_to_send())
        upstream = accepted[0]
        upstream.settimeout(6)  # 2s of connect timeout, and a deadline check's round
        try:
            while upstream.recv(65536):  # the ClientHello, then the daemon's close
                pass
        except TimeoutError:
            pytest.fail("the stalled dial of a reset stream was never closed")
    finally:
        sock.close()
        listener.close()
        for held in accepted:
            held.close()
    assert "Traceback" not in daemon.logs()
