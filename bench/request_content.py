"""``python -m bench.request_content``: the CPU cost of reading a request's recorded content
(``aibridgeproxyd/request_content.py``) on Claude Code-shaped bodies, against a bare JSON parse.

A Claude Code body is mostly its history: a system prompt, some 18 tool schemas, and pairs of
assistant ``tool_use`` / user ``tool_result`` turns after the first prompt, which carries a
CLAUDE.md system reminder. The prompt is that first turn's typed text, so the read walks back
over every tool-result turn: the worst case for the prompt search.
"""

from __future__ import annotations

import gzip
import json
import random
import timeit
from collections.abc import Callable

import orjson

from aibridgeproxyd.request_content import request_content
from aibridgeproxyd.usage import ApiKind

_WORDS = ("the", "of", "and", "to", "in", "is", "file", "function", "return", "value", "import")


def claude_code_body(size: int, seed: int = 1) -> tuple[bytes, int]:
    """A Claude Code-shaped Messages body of about ``size`` bytes, and its message count."""
    rnd = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rnd.choice(_WORDS) for _ in range(words))

    reminder = f"<system-reminder>\n# claudeMd\n{text(800)}\n</system-reminder>"
    messages: list[dict[str, object]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": reminder},
                {"type": "text", "text": "Fix the failing test"},
            ],
        }
    ]
    session = json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": "s" * 36})
    properties = {f"p{j}": {"type": "string", "description": text(12)} for j in range(6)}
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32000,
        "stream": True,
        "system": [{"type": "text", "text": text(1500)}],
        "tools": [
            {"name": f"Tool{i}", "description": text(150), "input_schema": properties}
            for i in range(18)
        ],
        "metadata": {"user_id": session},
        "messages": messages,
    }
    turn = 0
    while len(json.dumps(body)) < size:
        tool_id = f"toolu_{turn:04d}{'x' * 20}"
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": text(60), "signature": "s" * 200},
                    {"type": "text", "text": text(30)},
                    {"type": "tool_use", "id": tool_id, "name": "Read", "input": {"path": "a"}},
                ],
            }
        )
        messages.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": text(300)}],
            }
        )
        turn += 1
    return json.dumps(body).encode(), len(messages)


def _ms(call: Callable[[], object], number: int = 20) -> float:
    """The best of seven runs of ``number`` calls, per call, in milliseconds."""
    return min(timeit.repeat(call, number=number, repeat=7)) / number * 1000


def report(size: int) -> None:
    """Print the cost of each read of one body of about ``size`` bytes."""
    kind = ApiKind.ANTHROPIC_MESSAGES
    body, count = claude_code_body(size)
    compressed = gzip.compress(body)
    print(f"Claude Code body: {len(body)} bytes, {count} messages")
    rows: dict[str, Callable[[], object]] = {
        "json.loads": lambda: json.loads(body),
        "orjson.loads": lambda: orjson.loads(body),
        "read, prompts on": lambda: request_content(kind, body, None, 32768, True),
        "read, prompts off": lambda: request_content(kind, body, None, None, True),
        "read, gzip body": lambda: request_content(kind, compressed, "gzip", 32768, True),
    }
    for name, call in rows.items():
        print(f"  {name:<20} {_ms(call):7.3f} ms")


def main() -> None:
    for size in (200_000, 1_000_000):
        report(size)


if __name__ == "__main__":
    main()
