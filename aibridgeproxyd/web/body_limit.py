"""A cap on request bodies: the admin application reads JSON and form bodies into memory, so
one is refused with 413 once it is larger than ``limit`` bytes, declared or counted."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aibridgeproxyd.web.problems import ApiError, error_response

# The largest management request (a provider with five keys and its settings) is a few KiB.
MAX_BODY_BYTES = 1024 * 1024


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes (``Content-Length`` checked before
    reading; a chunked body counted as it arrives)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await error_response(self._too_large())(scope, receive, send)
            return
        seen = 0
        exceeded = False

        async def counted() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                exceeded = True
                raise self._too_large()
            return message

        async def answered(message: Message) -> None:
            # Whatever the application made of the interrupted read (FastAPI answers 400 "error
            # parsing the body"), the client is told what happened: 413.
            if not exceeded:
                await send(message)
            elif message["type"] == "http.response.start":
                await error_response(self._too_large())(scope, receive, send)

        await self.app(scope, counted, answered)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"request body larger than {self.limit} bytes")


def _content_length(scope: Scope) -> int | None:
    headers: Any = scope.get("headers", ())
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
