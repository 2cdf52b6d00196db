"""Per-chunk cost of the taps on a text-only SSE stream, in process (no proxy):
``python -m bench.content_tap``. Prints, for chat, Anthropic and Responses streams of text deltas
(the common case), the nanoseconds per chunk of the usage tap alone and of the content tap
(``aibridgeproxyd.response_content``) alone, with one event per chunk and 20 events per chunk.
Best of ``REPS`` runs; reports only, asserts nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from aibridgeproxyd.response_content import ContentSwitches, ContentTap
from aibridgeproxyd.usage import ApiKind, UsageTap

EVENTS = 20_000
REPS = 15


def _sse(event: dict[str, Any], name: str | None = None) -> bytes:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(event)}\n\n".encode()


def chat(i: int) -> bytes:
    choice = {"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return _sse({**base, "choices": [choice]})


def anthropic(i: int) -> bytes:
    delta = {"type": "text_delta", "text": f"word{i} "}
    return _sse({"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta")


def responses(i: int) -> bytes:
    name = "response.output_text.delta"
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    return _sse({"type": name, "sequence_number": i, **where, "delta": f"word{i} "}, name)


def per_chunk_ns(make: Callable[[], Any], chunks: list[bytes]) -> float:
    best = float("inf")
    for _ in range(REPS):
        started = time.perf_counter()
        tap = make()
        for chunk in chunks:
            tap.feed(chunk)
        tap.finish()
        best = min(best, time.perf_counter() - started)
    return best / len(chunks) * 1e9


def main() -> None:
    formats = (
        ("chat", ApiKind.OPENAI_CHAT_COMPLETIONS, chat),
        ("anthropic", ApiKind.ANTHROPIC_MESSAGES, anthropic),
        ("responses", ApiKind.OPENAI_RESPONSES, responses),
    )
    print("| stream | chunking | usage tap ns/chunk | content tap ns/chunk |")
    print("|---|---|---|---|")
    for name, kind, event in formats:
        single = [event(i) for i in range(EVENTS)]
        batched = [b"".join(single[i : i + 20]) for i in range(0, EVENTS, 20)]
        for label, chunks in (("1 event/chunk", single), ("20 events/chunk", batched)):
            usage = per_chunk_ns(lambda: UsageTap(kind), chunks)  # noqa: B023
            content = per_chunk_ns(lambda: ContentTap(kind, ContentSwitches()), chunks)  # noqa: B023
            print(f"| {name} | {label} | {usage:.0f} | {content:.0f} |")


if __name__ == "__main__":
    main()
