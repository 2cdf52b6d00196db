"""A lean benchmark upstream: raw asyncio HTTP/1.1 over TLS, in its own process.

    python -m bench.upstream --cert server.pem --key server-key.pem

prints one JSON line, ``{"port": P, "bulk_port": B, "pid": N}``, once both listeners are bound,
and runs until SIGTERM/SIGINT or until its stdin is closed (so it dies with the bench even when
the bench is killed). It is deliberately not the test suite's hypercorn ``FakeUpstream``: that
one runs in a thread of the test process and spends 0.3-0.6 ms of CPU per request in hypercorn,
which competes with the proxy for the box's two cores. This one does the minimum a benchmark
needs, so the numbers move with the proxy rather than with the upstream.

Routes (any path prefix, so ``/v1/chat/completions`` and ``/paced/v1/chat/completions`` both
work):

- ``POST .../chat/completions`` with ``"stream": false``: a fixed ~320-byte chat.completion.
- ``POST .../chat/completions`` with ``"stream": true``: ``text/event-stream``, chunked, a role
  chunk, content chunks and a finish chunk (``x-bench-events`` in total, default 100), then
  ``data: [DONE]``. ``x-bench-delay-ms`` paces them (first event at once, then one every N ms on
  an absolute schedule). Every event carries ``"bench_t": <CLOCK_MONOTONIC ns>`` taken right
  before it is written, so a client on the same machine can compute the one-way delay.
  ``x-bench-hold: 1`` sends the first event, then holds the stream open until ``POST /release``
  or until the client goes away.
- ``x-bench-tools: N`` (N >= 1, "recording on" scenarios): the answer calls N tools, shaped as
  OpenAI's chat completions API reference documents them
  (https://platform.openai.com/docs/api-reference/chat-streaming). Not streamed: a
  chat.completion whose message has ``tool_calls`` (id, ``type: function``, name, JSON
  ``arguments``), ``finish_reason: tool_calls``. Streamed: the role chunk, then per tool call a
  first chunk with ``delta.tool_calls[0]`` = ``{index, id, type, function: {name,
  arguments: ""}}`` followed by chunks carrying only ``{index, function: {arguments: <piece>}}``
  (the arguments' JSON text cut into pieces), a finish chunk (``finish_reason: tool_calls``) and
  a usage chunk (``choices: []``, as with ``stream_options.include_usage``); ``x-bench-events``
  still counts every event, each stamped.
- ``GET /bulk?bytes=N``: N bytes of ``application/octet-stream`` with a Content-Length.
- ``POST /release``: finishes every held stream. ``GET /stats``: ``{"held": n, "requests": n,
  "aborted_holds": n}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import threading
import time
from urllib.parse import parse_qs

BULK_BLOCK = b"x" * (256 * 1024)
CHAT_JSON = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1764000000,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27},
    },
    separators=(",", ":"),
).encode()

_CHUNK_HEAD = (
    '{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1764000000,'
    '"model":"gpt-4o-mini","system_fingerprint":"fp_bench","choices":[{"index":0,"delta":'
)
ROLE_DELTA = '{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
TEXT_DELTA = '{"content":" token"},"logprobs":null,"finish_reason":null}]'
FINISH_DELTA = '{},"logprobs":null,"finish_reason":"stop"}]'
DONE = b"data: [DONE]\n\n"

# --- tool calls ("recording on" scenarios) ---

TOOL_NAMES = ("Bash", "Read", "Edit", "Grep")
# Argument text an agent's tool call carries: a shell command, a path, an edit.
_ARGUMENT_TEXT = (
    "rg -n 'def handle_request' src/ --type py && sed -n 1,120p src/server/handlers.py; "
    "pytest tests/unit/test_handlers.py -x -q -k 'timeout or retry' "
)


def tool_arguments(index: int, pieces: int) -> str:
    """The JSON text of tool call ``index``'s arguments: long enough to cut into ``pieces``
    pieces of about 12 characters (a model streams arguments a few tokens at a time)."""
    text = (_ARGUMENT_TEXT * (1 + pieces * 12 // len(_ARGUMENT_TEXT)))[: max(8, pieces * 12)]
    return json.dumps({"command": text, "description": f"step {index}", "timeout": 120000})


def cut(text: str, pieces: int) -> list[str]:
    """``text`` in ``pieces`` consecutive parts (the last ones possibly empty when short)."""
    size = -(-len(text) // max(1, pieces))
    return [text[i * size : (i + 1) * size] for i in range(pieces)]


def tool_call_json(tools: int) -> bytes:
    """A non-streamed chat.completion calling ``tools`` tools."""
    calls = [
        {
            "id": f"call_bench{index:04d}",
            "type": "function",
            "function": {
                "name": TOOL_NAMES[index % len(TOOL_NAMES)],
                "arguments": tool_arguments(index, 20),
            },
        }
        for index in range(tools)
    ]
    body = json.loads(CHAT_JSON)
    body["choices"][0]["message"] = {
        "role": "assistant", "content": None, "tool_calls": calls, "refusal": None,
    }  # fmt: skip
    body["choices"][0]["finish_reason"] = "tool_calls"
    body["usage"] = {"prompt_tokens": 12000, "completion_tokens": 180, "total_tokens": 12180}
    return json.dumps(body, separators=(",", ":")).encode()


def tool_call_deltas(events: int, tools: int) -> list[str]:
    """The ``delta`` (and what follows it in the choice) of each event of a streamed answer
    calling ``tools`` tools in ``events`` events, the usage chunk's whole ``choices`` last."""
    middle = max(tools * 2, events - 3)  # role, finish and usage chunks around them
    per_tool = [middle // tools + (1 if i < middle % tools else 0) for i in range(tools)]
    deltas = [ROLE_DELTA]
    for index, count in enumerate(per_tool):
        name = TOOL_NAMES[index % len(TOOL_NAMES)]
        start = {
            "index": index, "id": f"call_bench{index:04d}", "type": "function",
            "function": {"name": name, "arguments": ""},
        }  # fmt: skip
        deltas.append(_tool_delta(start))
        for piece in cut(tool_arguments(index, count - 1), count - 1):
            deltas.append(_tool_delta({"index": index, "function": {"arguments": piece}}))
    deltas.append('{},"logprobs":null,"finish_reason":"tool_calls"}]')
    return deltas


def _tool_delta(call: dict[str, object]) -> str:
    call_json = json.dumps(call, separators=(",", ":"))
    return f'{{"tool_calls":[{call_json}]}},"logprobs":null,"finish_reason":null}}]'


USAGE_EVENT = (
    '{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1764000000,'
    '"model":"gpt-4o-mini","system_fingerprint":"fp_bench","choices":[],"usage":'
    '{"prompt_tokens":12000,"completion_tokens":180,"total_tokens":12180,'
    '"prompt_tokens_details":{"cached_tokens":11264}}'
)


def sse_event(delta: str, stamp_ns: int) -> bytes:
    return f'data: {_CHUNK_HEAD}{delta},"bench_t":{stamp_ns}}}\n\n'.encode()


def usage_event(stamp_ns: int) -> bytes:
    return f'data: {USAGE_EVENT},"bench_t":{stamp_ns}}}\n\n'.encode()


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunked-encoding frame."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Upstream:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = 0
        self.aborted_holds = 0
        self.requests = 0
        self.tool_answers: dict[int, bytes] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    break
                lines = raw.split(b"\r\n")
                method, target, _ = lines[0].split(b" ", 2)
                headers: dict[bytes, bytes] = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(b":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get(b"content-length", b"0"))
                body = await reader.readexactly(length) if length else b""
                self.requests += 1
                keep_alive = headers.get(b"connection", b"").lower() != b"close"
                finished = await self.route(method, target.decode(), headers, body, reader, writer)
                if not (keep_alive and finished):
                    break
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def route(
        self,
        method: bytes,
        target: str,
        headers: dict[bytes, bytes],
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request; False when the connection must not be reused."""
        path, _, query = target.partition("?")
        if method == b"POST" and path.endswith("/chat/completions"):
            payload = json.loads(body or b"{}")
            tools = int(headers.get(b"x-bench-tools", b"0"))
            if not payload.get("stream"):
                answer = self.tool_answers.get(tools) if tools else CHAT_JSON
                if answer is None:
                    answer = self.tool_answers[tools] = tool_call_json(tools)
                writer.write(
                    head(
                        200,
                        [
                            ("content-type", "application/json"),
                            ("content-length", str(len(answer))),
                        ],
                    )
                    + answer
                )
                await writer.drain()
                return True
            return await self.stream(headers, reader, writer)
        if method == b"GET" and path == "/bulk":
            size = int(parse_qs(query).get("bytes", ["1048576"])[0])
            writer.write(
                head(
                    200,
                    [("content-type", "application/octet-stream"), ("content-length", str(size))],
                )
            )
            view = memoryview(BULK_BLOCK)
            while size > 0:
                piece = view[: min(size, len(view))]
                writer.write(piece)
                size -= len(piece)
                await writer.drain()
            return True
        if path == "/release":
            self.release.set()
            self.release = asyncio.Event()
            return self.small(writer, 200, b'{"released":true}')
        if path == "/stats":
            stats = {"held": self.held, "requests": self.requests}
            stats["aborted_holds"] = self.aborted_holds
            return self.small(writer, 200, json.dumps(stats).encode())
        return self.small(writer, 404, b'{"error":"not found"}')

    def small(self, writer: asyncio.StreamWriter, status: int, body: bytes) -> bool:
        writer.write(
            head(status, [("content-type", "application/json"), ("content-length", str(len(body)))])
            + body
        )
        return True

    async def stream(
        self,
        headers: dict[bytes, bytes],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        events = max(2, int(headers.get(b"x-bench-events", b"100")))
        delay = float(headers.get(b"x-bench-delay-ms", b"0")) / 1000
        hold = headers.get(b"x-bench-hold", b"") == b"1"
        tools = int(headers.get(b"x-bench-tools", b"0"))
        tool_deltas = tool_call_deltas(events, tools) if tools else None
        if tool_deltas is not None:
            events = len(tool_deltas) + 1  # and the usage chunk
        writer.write(
            head(
                200,
                [
                    ("content-type", "text/event-stream; charset=utf-8"),
                    ("cache-control", "no-cache"),
                    ("transfer-encoding", "chunked"),
                ],
            )
        )
        await writer.drain()
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index in range(events):
            if index and delay:
                wait = start + index * delay - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # pacing on an absolute schedule
            if tool_deltas is not None:
                event = (
                    sse_event(tool_deltas[index], time.monotonic_ns())
                    if index < len(tool_deltas)
                    else usage_event(time.monotonic_ns())
                )
            else:
                if index == 0:
                    delta = ROLE_DELTA
                elif index == events - 1:
                    delta = FINISH_DELTA
                else:
                    delta = TEXT_DELTA
                # The stamp is taken immediately before the write that sends it.
                event = sse_event(delta, time.monotonic_ns())
            writer.write(chunk(event))
            await writer.drain()
            if index == 0 and hold and not await self.hold(reader):
                return False
        writer.write(chunk(DONE) + b"0\r\n\r\n")
        await writer.drain()
        return True

    async def hold(self, reader: asyncio.StreamReader) -> bool:
        """Wait for /release (True) or for the client to go away (False)."""
        self.held += 1
        release = asyncio.ensure_future(self.release.wait())
        gone = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait({release, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.held -= 1
            for task in (release, gone):
                task.cancel()
        if release.done() and not release.cancelled():
            return True
        self.aborted_holds += 1
        return False


async def serve(args: argparse.Namespace) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols(["http/1.1"])
    upstream = Upstream()
    servers = [
        await asyncio.start_server(
            upstream.handle, args.host, port, ssl=context, backlog=4096, limit=1 << 20
        )
        for port in (args.port, args.bulk_port)
    ]
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    print(json.dumps({"port": ports[0], "bulk_port": ports[1], "pid": os.getpid()}), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def watch_stdin() -> None:
        # The bench holds our stdin open; EOF means it is gone, whatever way it went.
        # os.read, not sys.stdin: a buffered reader's lock held by a daemon thread aborts the
        # interpreter at shutdown.
        with contextlib.suppress(Exception):
            while os.read(0, 4096):
                pass
        with contextlib.suppress(RuntimeError):  # the loop may already be closed
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", required=True, help="server certificate chain (PEM)")
    parser.add_argument("--key", required=True, help="server private key (PEM)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bulk-port", type=int, default=0)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
