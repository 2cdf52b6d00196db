"""What the Bedrock and Gemini fakes share: a TLS server on loopback with its own CA, a log of
requests as received, and paced or gated streams whose every event is timestamped.

Streams reuse `StreamState` from the OpenAI/Anthropic fake, so tests gate and release them the
same way: `fake.gate(stream_id)`, or `fake.gate_all_streams = True` and `fake.streams[-1]`.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from .tls import (
    DEFAULT_HOSTNAMES,
    LOOPBACK,
    BackgroundServer,
    Receive,
    RecordedRequest,
    RequestLog,
    Scope,
    Send,
    ServedFake,
    TlsIdentity,
)
from .upstream import HEADER_DELAY_MS, HEADER_GATE, HEADER_STREAM_ID, StreamState


class ProviderFake(ServedFake):
    """Subclasses implement `handle(scope, receive, send)` and use `send_stream` for streams."""

    name = "provider-fake"

    def __init__(self, *, http2: bool = True, hostnames: Iterable[str] = DEFAULT_HOSTNAMES) -> None:
        # Defaults for streams whose request does not steer them with x-fake-* headers (a
        # Bedrock request cannot: the proxy signs only the headers Bedrock needs).
        self.event_delay = 0.0
        self.gate_all_streams = False
        self._directory = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.identity = TlsIdentity.create(self._directory, hostnames)
        self._log = RequestLog()
        self._lock = threading.Lock()
        self._streams: dict[str, StreamState] = {}
        self._ids = itertools.count(1)
        self._server = BackgroundServer(
            self.handle, identity=self.identity, http2=http2, name=self.name
        )

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError

    # -- lifecycle

    # -- where it is and what it saw

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def origin(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    @property
    def ca_pem_path(self) -> Path:
        return self.identity.ca_pem_path

    @property
    def requests(self) -> list[RecordedRequest]:
        return self._log.snapshot()

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        return self._log.wait_for(count, timeout)

    def record(self, request: RecordedRequest) -> None:
        self._log.append(request)

    def reset(self) -> None:
        self._log.clear()
        with self._lock:
            self._streams.clear()
        self.gate_all_streams = False
        self.event_delay = 0.0

    # -- streams

    @property
    def streams(self) -> list[StreamState]:
        with self._lock:
            return list(self._streams.values())

    def stream(self, stream_id: str) -> StreamState:
        with self._lock:
            state = self._streams.get(stream_id)
            if state is None:
                state = self._streams[stream_id] = StreamState(stream_id)
            return state

    def gate(self, stream_id: str) -> StreamState:
        state = self.stream(stream_id)
        state.gated = True
        return state

    async def send_stream(
        self,
        send: Send,
        receive: Receive,
        request: RecordedRequest,
        content_type: str,
        frames: list[bytes],
    ) -> None:
        """200 with `frames` written one by one (paced or gated). A client that goes away
        mid-stream marks the stream `aborted`."""
        headers = request.headers
        state = self.stream(headers.get(HEADER_STREAM_ID) or f"stream-{next(self._ids)}")
        state.request = request
        gate_header = headers.get(HEADER_GATE, "").lower() in ("1", "true", "yes")
        state.gated = state.gated or gate_header or self.gate_all_streams
        delay_ms = headers.get(HEADER_DELAY_MS)
        delay = float(delay_ms) / 1000 if delay_ms is not None else self.event_delay
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type.encode())],
            }
        )
        state._set_outcome("open")
        pump = asyncio.create_task(_pump(send, frames, state, delay))
        disconnect = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({pump, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, disconnect):
                task.cancel()
            await asyncio.gather(pump, disconnect, return_exceptions=True)
        if pump in done:
            pump.result()
            state._set_outcome("completed")
        else:
            state._set_outcome("aborted")


async def _pump(send: Send, frames: list[bytes], state: StreamState, delay: float) -> None:
    for index, frame in enumerate(frames):
        if state.gated:
            await state._wait_turn()
        elif delay and index > 0:
            await asyncio.sleep(delay)  # pacing, not synchronisation
        state._mark_sent()
        await send({"type": "http.response.body", "body": frame, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
