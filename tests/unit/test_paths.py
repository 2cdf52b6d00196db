"""Dot-segment paths are refused before any key is injected (aibridgeproxyd.paths)."""

from __future__ import annotations

import pytest

from aibridgeproxyd.paths import dot_segment_path


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../../../secret",  # the tester's exact input
        "/v1/./models",
        "/..",
        "/v1/..",
        "/v1/%2e%2e/secret",
        "/v1/%2E%2E/secret",
        "/v1/.%2e/secret",
        "/v1/%2e/models",
        "/v1/%252e%252e/secret",  # encoded twice
        "/v1/..\\secret",
        "/v1\\..\\..\\secret",
        "/v1/%5c..%5csecret",
        "/v1/..%2fsecret",
        "/v1/../secret?x=1",
    ],
)
def test_dot_segments_in_any_spelling_are_found(path: str) -> None:
    assert dot_segment_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/v1/chat.completions",
        "/v1/.../x",
        "/v1/..x/y",
        "/v1/models/gpt-4o.1",
        "/v1/models?next=../x",  # the query is not a path
        "/v1beta/models/gemini-2.0-flash:generateContent",
        "/",
        "",
    ],
)
def test_other_paths_pass(path: str) -> None:
    assert not dot_segment_path(path)
