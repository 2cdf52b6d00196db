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


@pytest.mark.parametrize(
    "path",
    [
        # The second tester's finds: each reached the upstream with the central key.
        "/v1/%2e%2e;/x",
        "/v1/%c0%ae%c0%ae/x",
        "/v1/%ef%bc%8e%ef%bc%8e/x",
        "/v1/..%00/x",
        "/v1/..%20/x",
        "/v1/..%09/x",
        "/v1/...//x",
        "/v1/..;jsessionid=1/x",
    ],
)
def test_dot_segments_in_server_specific_spellings_are_refused(path: str) -> None:
    assert dot_segment_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        "/v1/files/file-abc.jsonl",
        "/v1/.well-known/x",
        "/v1/models/caf%C3%A9",
    ],
)
def test_ordinary_api_paths_pass(path: str) -> None:
    assert not dot_segment_path(path)
