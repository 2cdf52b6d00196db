"""A fake Google Gemini API: native generateContent / streamGenerateContent and the
OpenAI-compatible endpoints under /v1beta/openai/, written from the public API reference.

    POST /v1beta/models/<m>:generateContent              GenerateContentResponse
    POST /v1beta/models/<m>:streamGenerateContent?alt=sse one response chunk per SSE event
    POST /v1beta/models/<m>:streamGenerateContent         the same chunks as one JSON array
    GET  /v1beta/models                                   a model list
    POST /v1beta/openai/chat/completions                  OpenAI chat completion (or its SSE)

Native requests must carry `x-goog-api-key` (or `?key=`), OpenAI-compatible ones a Bearer key,
as Google requires; otherwise the answer is Google's 401/403. Streams are paced or gated like
the other fakes' (x-fake-* headers, see tests.fakes.upstream).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .provider_fake import ProviderFake
from .tls import Receive, RecordedRequest, Scope, Send, read_request, send_json
from .tool_content import FakeContent, gemini_body, gemini_chunks
from .upstream import DEFAULT_EVENTS, HEADER_EVENTS, INPUT_TOKENS, chat_completions, text_deltas

_NATIVE = re.compile(r"/(?P<version>v1|v1beta|v1alpha)/models/(?P<model>[^/:]+):(?P<method>\w+)")
_OPENAI_PREFIX = "/v1beta/openai/"
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
}


def gemini_error(status: int, message: str) -> dict[str, Any]:
    return {
        "error": {
            "code": status,
            "message": message,
            "status": _STATUS_NAMES.get(status, "INTERNAL"),
        }
    }


def generate_content_chunk(model: str, text: str, *, last: bool, events: int) -> dict[str, Any]:
    """One GenerateContentResponse: a text part, and on the last chunk the finish reason."""
    candidate: dict[str, Any] = {
        "content": {"parts": [{"text": text}], "role": "model"},
        "index": 0,
    }
    if last:
        candidate["finishReason"] = "STOP"
    return {
        "candidates": [candidate],
        "usageMetadata": {
            "promptTokenCount": INPUT_TOKENS,
            "candidatesTokenCount": events,
            "totalTokenCount": INPUT_TOKENS + events,
        },
        "modelVersion": model,
        "responseId": "fake-gemini-response",
    }


class FakeGemini(ProviderFake):
    """A TLS fake of generativelanguage.googleapis.com on 127.0.0.1:<free port>."""

    name = "fake-gemini"

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = await read_request(scope, receive)
        self.record(request)
        path = request.path_only
        events = int(request.headers.get(HEADER_EVENTS, DEFAULT_EVENTS))
        if path.startswith(_OPENAI_PREFIX):
            await self._openai_compatible(send, receive, request, path, events)
            return
        if not (request.headers.get("x-goog-api-key") or request.query.get("key")):
            await send_json(
                send, 403, gemini_error(403, "Method doesn't allow unregistered callers.")
            )
            return
        if request.method == "GET" and path.endswith("/models"):
            models = [{"name": "models/gemini-2.5-flash", "displayName": "Gemini 2.5 Flash"}]
            await send_json(send, 200, {"models": models})
            return
        match = _NATIVE.fullmatch(path)
        if request.method != "POST" or match is None:
            await send_json(send, 404, gemini_error(404, f"no route for {request.method} {path}"))
            return
        model = match["model"]
        pieces = text_deltas(events)
        chunks = [
            generate_content_chunk(model, piece, last=index == len(pieces) - 1, events=events)
            for index, piece in enumerate(pieces)
        ]
        whole = generate_content_chunk(model, "".join(pieces), last=True, events=events)
        content = FakeContent.from_headers(request.headers)
        if content is not None:  # x-fake-tool-call / x-fake-thinking
            chunks = gemini_chunks(model, content, whole["usageMetadata"])
            whole = gemini_body(chunks)
        if match["method"] == "generateContent":
            await send_json(send, 200, whole)
        elif match["method"] == "streamGenerateContent" and request.query.get("alt") == ["sse"]:
            frames = [f"data: {json.dumps(chunk)}\r\n\r\n".encode() for chunk in chunks]
            await self.send_stream(send, receive, request, "text/event-stream", frames)
        elif match["method"] == "streamGenerateContent":
            # Without alt=sse Gemini streams one JSON array, element by element.
            frames = [
                (b"[" if i == 0 else b",\r\n") + json.dumps(c).encode()
                for i, c in enumerate(chunks)
            ]
            await self.send_stream(send, receive, request, "application/json", [*frames, b"]"])
        else:
            await send_json(send, 404, gemini_error(404, f"unknown method {match['method']}"))

    async def _openai_compatible(
        self, send: Send, receive: Receive, request: RecordedRequest, path: str, events: int
    ) -> None:
        authorization = request.headers.get("authorization", "")
        if not authorization.lower().startswith("bearer ") or len(authorization) <= 7:
            await send_json(
                send, 401, [gemini_error(401, "Missing or invalid Authorization header.")]
            )
            return
        if request.method != "POST" or not path.endswith("/chat/completions"):
            await send_json(send, 404, [gemini_error(404, f"no route for {request.method} {path}")])
            return
        reply = chat_completions(request.json(), events, 1)
        if isinstance(reply, list):
            await self.send_stream(send, receive, request, "text/event-stream", reply)
        else:
            await send_json(send, 200, reply)
