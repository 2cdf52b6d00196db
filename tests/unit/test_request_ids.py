"""Request ids: RFC 9562 version 7 UUIDs, ordered by the millisecond they were made."""

from __future__ import annotations

import time
import uuid

import pytest

from aibridgeproxyd import request_ids
from aibridgeproxyd.request_ids import new_request_id


def test_a_request_id_is_a_version_7_rfc_uuid_carrying_the_time_in_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    text = new_request_id()
    after = time.time_ns() // 1_000_000
    parsed = uuid.UUID(text)
    assert str(parsed) == text  # canonical lower-case text, 36 characters
    assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
    assert before <= parsed.int >> 80 <= after


def test_request_ids_of_later_milliseconds_sort_after_and_never_repeat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1_800_000_000_000_000_000]
    monkeypatch.setattr(request_ids.time, "time_ns", lambda: now[0])
    same_millisecond = {new_request_id() for _ in range(1000)}
    assert len(same_millisecond) == 1000  # 74 random bits apart
    now[0] += 1_000_000
    later = new_request_id()
    assert all(later > earlier for earlier in same_millisecond)
