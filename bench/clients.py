"""Load generators: httpx (keep-alive, like a real SDK) for JSON and SSE, raw sockets where the
client's own cost must stay out of the way (new connection per request, bulk, bare CONNECTs,
1,000 open streams)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from bench.lab import Target
from bench.procs import LOOPBACK

CHAT_PATH = "/v1/chat/completions"
_STAMP = re.compile(rb'"bench_t":(\d+)')


def chat_body(stream: bool) -> bytes:
    return json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Say hello in five words, please."},
            ],
            "stream": stream,
        }
    ).encode()


JSON_BODY = chat_body(False)
STREAM_BODY = chat_body(True)


# --- "recording on": an agent's request ---------------------------------------------------------

_SOURCE_LINES = [
    "def handle_request(request: Request, deadline: float) -> Response:",
    '    """Answer one request before ``deadline``; retries an idempotent call once."""',
    "    for attempt in range(2):",
    "        try:",
    "            return dispatch(request, timeout=deadline - time.monotonic())",
    "        except UpstreamTimeout as error:",
    '            log.warning("attempt %d timed out: %s", attempt, error)',
    "            if not request.idempotent:",
    "                raise",
    "    raise RetriesExhausted(request.path)",
    "",
]
_INSTRUCTIONS = (
    "You are an interactive CLI tool that helps users with software engineering tasks. Use the "
    "instructions below and the tools available to you to assist the user. Read files before "
    "editing them, keep changes minimal, run the tests that cover your change, and never commit "
    "secrets. When you call a tool, explain in one sentence why. "
)
AGENT_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name}: {_INSTRUCTIONS[:300]}",
            "parameters": {
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "what to run or read"},
                    "description": {"type": "string", "description": "why, in 5-10 words"},
                    "timeout": {"type": "number", "description": "milliseconds"},
                },
                "required": ["command"],
            },
        },
    }
    for name in ("Bash", "Read", "Edit", "Grep", "Glob", "WebFetch")
]
LAST_PROMPT = (
    "The retry test still fails on CI with a timeout after the second attempt. Find out why "
    "handle_request retries a non-idempotent POST, fix it, and run the handler tests."
)


def _source_file(lines: int, salt: int) -> str:
    """A tool result: ``lines`` numbered lines of a Python source file."""
    body = (_SOURCE_LINES * (lines // len(_SOURCE_LINES) + 1))[:lines]
    return "\n".join(f"{i + 1:>6}\t{line}  # r{salt}" for i, line in enumerate(body))


def agent_messages(turns: int = 4, file_lines: int = 90) -> list[dict[str, object]]:
    """An agent conversation in OpenAI chat shape: a long system prompt, a first user prompt,
    ``turns`` rounds of assistant tool call + tool result (a source file), and the last user
    prompt (what the recording keeps)."""
    messages: list[dict[str, object]] = [
        {"role": "system", "content": _INSTRUCTIONS * 24},
        {"role": "user", "content": "Look at src/server/handlers.py and its tests."},
    ]
    for turn in range(turns):
        call_id = f"call_hist{turn:04d}"
        messages.append(
            {
                "role": "assistant",
                "content": f"Reading the file, part {turn + 1}.",
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": "Read",
                            "arguments": json.dumps({"command": "src/server/handlers.py"}),
                        },
                    }
                ],
            }
        )
        messages.append(
            {"role": "tool", "tool_call_id": call_id, "content": _source_file(file_lines, turn)}
        )
    messages.append({"role": "user", "content": LAST_PROMPT})
    return messages


def agent_body(stream: bool) -> bytes:
    """A Claude-Code-like turn as an OpenAI chat request: ~30 KB, tools declared, several
    messages, the user's prompt last."""
    payload: dict[str, object] = {
        "model": "gpt-4o-mini",
        "messages": agent_messages(),
        "tools": AGENT_TOOLS,
        "stream": stream,
    }
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return json.dumps(payload).encode()


AGENT_JSON_BODY = agent_body(False)
AGENT_STREAM_BODY = agent_body(True)
# Tool calls in each "recording on" answer (the upstream's x-bench-tools).
AGENT_TOOL_CALLS = 3


class BenchError(RuntimeError):
    """A response that was not what the upstream sends: the run is invalid, not slow."""


async def run_for[T](seconds: float, one: Callable[[], Awaitable[T]]) -> list[T]:
    """Closed loop: call ``one`` back to back until ``seconds`` have passed."""
    results: list[T] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        results.append(await one())
    return results


# --- httpx --------------------------------------------------------------------------------------


async def json_request(
    client: httpx.AsyncClient, target: Target, body: bytes = JSON_BODY, tools: int = 0
) -> float:
    """One chat completion (``tools``: tool calls the answer makes); returns the latency in ms."""
    headers = target.headers(**({"x-bench-tools": str(tools)} if tools else {}))
    started = time.perf_counter()
    response = await client.post(target.origin + CHAT_PATH, content=body, headers=headers)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200 or b'"choices"' not in response.content:
        raise BenchError(
            f"{target.name}: JSON request got {response.status_code}: {response.text[:200]}"
        )
    return elapsed


@dataclass
class StreamResult:
    ttfe_ms: float
    total_ms: float
    events: int
    delays_ms: list[float] = field(default_factory=list)  # upstream send -> client arrival


async def sse_request(
    client: httpx.AsyncClient,
    target: Target,
    events: int,
    delay_ms: float,
    body: bytes = STREAM_BODY,
    tools: int = 0,
) -> StreamResult:
    """One stream of ``events`` events ``delay_ms`` apart (``tools``: tool calls streamed, with
    argument deltas, in those events)."""
    extra = {"x-bench-events": str(events), "x-bench-delay-ms": str(delay_ms)}
    if tools:
        extra["x-bench-tools"] = str(tools)
    headers = target.headers(**extra)
    started = time.monotonic_ns()
    first = 0
    seen = 0
    done = False
    delays: list[float] = []
    buffer = b""
    async with client.stream(
        "POST", target.origin + CHAT_PATH, content=body, headers=headers
    ) as response:
        if response.status_code != 200:
            raise BenchError(f"{target.name}: stream got {response.status_code}")
        async for piece in response.aiter_raw():
            arrived = time.monotonic_ns()
            buffer += piece
            cut = buffer.rfind(b"\n\n")
            if cut < 0:
                continue
            complete, buffer = buffer[: cut + 2], buffer[cut + 2 :]
            stamps = _STAMP.findall(complete)
            if stamps and not first:
                first = arrived
            seen += len(stamps)
            delays.extend((arrived - int(stamp)) / 1e6 for stamp in stamps)
            if b"data: [DONE]" in complete:
                done = True
    ended = time.monotonic_ns()
    if seen != events or not done:
        raise BenchError(f"{target.name}: stream ended after {seen}/{events} events, done={done}")
    return StreamResult((first - started) / 1e6, (ended - started) / 1e6, seen, delays)


# --- raw sockets (blocking) --------------------------------------------------------------------


def _read_head(sock: socket.socket | ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise BenchError(f"connection closed before a response head: {data[:200]!r}")
        data += piece
    raw_head, _, rest = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def proxy_connect(proxy_port: int, authority: str) -> tuple[socket.socket, int]:
    """A TCP connection to the proxy that sent ``CONNECT authority``; returns (socket, status)."""
    sock = socket.create_connection((LOOPBACK, proxy_port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    status, _, rest = _read_head(sock)
    if rest:
        raise BenchError(f"unexpected bytes after the CONNECT answer: {rest[:50]!r}")
    return sock, status


def open_tls(
    target: Target, connect_to: str | None = None, verify: ssl.SSLContext | None = None
) -> ssl.SSLSocket:
    """A fresh TLS connection to ``connect_to`` (default: the target's), via the target's proxy."""
    authority = connect_to or target.connect_to
    if target.proxy_port:
        sock, status = proxy_connect(target.proxy_port, authority)
        if status != 200:
            sock.close()
            raise BenchError(f"{target.name}: CONNECT {authority} answered {status}")
    else:
        host, _, port = authority.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tls_host = authority.rpartition(":")[0] if connect_to else target.tls_host
    try:
        return (verify or target.verify).wrap_socket(sock, server_hostname=tls_host)
    except BaseException:
        sock.close()
        raise


def read_body(sock: ssl.SSLSocket, headers: dict[str, str], rest: bytes) -> int:
    """Read a Content-Length body into a reused buffer; returns the byte count."""
    length = int(headers["content-length"])
    received = len(rest)
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    while received < length:
        n = sock.recv_into(view)
        if not n:
            raise BenchError(f"body ended after {received} of {length} bytes")
        received += n
    return received


def one_shot_json(target: Target) -> float:
    """New TCP (+ CONNECT) + TLS + one JSON request + close; returns ms."""
    started = time.perf_counter()
    with open_tls(target) as sock:
        host = target.origin.removeprefix("https://")
        sock.sendall(
            (
                f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {target.api_key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(JSON_BODY)}\r\nConnection: close\r\n\r\n"
            ).encode()
            + JSON_BODY
        )
        status, headers, rest = _read_head(sock)
        read_body(sock, headers, rest)
    elapsed = (time.perf_counter() - started) * 1000
    if status != 200:
        raise BenchError(f"{target.name}: one-shot request got {status}")
    return elapsed


def bulk_get(target: Target, authority: str, verify: ssl.SSLContext, size: int) -> float:
    """GET /bulk?bytes=size through a tunnel to ``authority``; returns seconds from the request
    to the last byte (the handshake excluded)."""
    with open_tls(target, authority, verify) as sock:
        started = time.perf_counter()
        sock.sendall(f"GET /bulk?bytes={size} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        status, headers, rest = _read_head(sock)
        if status != 200:
            raise BenchError(f"{target.name}: bulk got {status}")
        got = read_body(sock, headers, rest)
        elapsed = time.perf_counter() - started
    if got != size:
        raise BenchError(f"{target.name}: bulk got {got} of {size} bytes")
    return elapsed


def bare_connect(proxy_port: int, authority: str) -> float:
    """CONNECT, read the answer, close; returns ms. The classification cost, nothing more."""
    started = time.perf_counter()
    sock, status = proxy_connect(proxy_port, authority)
    elapsed = (time.perf_counter() - started) * 1000
    sock.close()
    if status != 200:
        raise BenchError(f"CONNECT {authority} answered {status}")
    return elapsed


# --- raw asyncio: many open streams ------------------------------------------------------------


@dataclass
class HeldStream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


async def open_held_stream(target: Target) -> HeldStream:
    """Open a stream the upstream holds after its first event; return once that event arrived."""
    if target.proxy_port:
        reader, writer = await asyncio.open_connection(LOOPBACK, target.proxy_port)
        authority = target.connect_to
        writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        answer = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in answer.split(b"\r\n", 1)[0] + b" ":
            writer.close()
            raise BenchError(f"{target.name}: CONNECT answered {answer[:60]!r}")
        await writer.start_tls(target.verify, server_hostname=target.tls_host)
    else:
        host, _, port = target.connect_to.rpartition(":")
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=target.verify, server_hostname=target.tls_host
        )
    host = target.origin.removeprefix("https://")
    writer.write(
        (
            f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {target.api_key}\r\nContent-Type: application/json\r\n"
            f"x-bench-hold: 1\r\nx-bench-events: 3\r\n"
            f"Content-Length: {len(STREAM_BODY)}\r\n\r\n"
        ).encode()
        + STREAM_BODY
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        writer.close()
        raise BenchError(f"{target.name}: held stream answered {head[:60]!r}")
    await reader.readuntil(b"\n\n")  # the first event
    return HeldStream(reader, writer)


async def finish_held_stream(stream: HeldStream) -> bool:
    """Read to the end of the chunked body (after /release); True if it ended cleanly."""
    try:
        await stream.reader.readuntil(b"0\r\n\r\n")
        return True
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    finally:
        stream.writer.close()


async def abort_held_stream(stream: HeldStream) -> None:
    """The client goes away mid-stream."""
    stream.writer.close()
    with contextlib.suppress(TimeoutError, OSError, ssl.SSLError):
        await asyncio.wait_for(stream.writer.wait_closed(), 5)
