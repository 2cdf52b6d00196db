"""End to end: a slow API read never delays a stream (issue 11, section 1).

The daemon serves the proxy and the admin application on one event loop. Over a store of
``RECORDS`` interceptions, reader threads call the data API's heaviest reads without pause
(usage over everything, the unfiltered session list, pages of 1,000 interceptions with their
prompts, tool calls and thoughts) while a paced SSE stream flows through the proxy. The stream
must deliver every event and finish. The gaps between events are measured, quiet and under
the reads, and printed (``-s`` shows them); no timing threshold is asserted, on a shared
machine it would only be noise. ``bench`` measures the same with a stamped upstream.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from aibridgeproxyd.model import InterceptionRecord, ToolCall
from aibridgeproxyd.store import Store
from aibridgeproxyd.tokens import hash_token
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess
from tests.test_store import interception

pytestmark = pytest.mark.usefixtures("clean_upstream")

RECORDS = 40_000
BATCH = 500
EVENTS = 100
EVENT_DELAY_MS = 20
READERS = 3
HEAVY_READS = (
    "/api/v2/aibridge/usage?group_by=initiator",
    "/api/v2/aibridge/usage?group_by=day",
    "/api/v2/aibridge/sessions?limit=1000",
    "/api/v2/aibridge/interceptions?limit=1000",
    "/api/v2/ai-gateway/models",
)


def batch(start: int) -> list[InterceptionRecord]:
    """BATCH records with a prompt, a tool call and a thought each, 50 users, sessions of 50."""
    return [
        interception(
            f"fill-{n}", f"2026-{1 + n // 20000:02d}-01T00:00:00.000Z", initiator=f"user{n % 50}",
            client_session_id=f"session-{n // 50}", cost_micros=n, prompt="Read the README " * 8,
            tool_calls=(ToolCall(f"call-{n}", "Read", '{"file_path": "README.md"}'),),
            thoughts=("Read the file first.",),
        )
        for n in range(start, start + BATCH)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path}) as d:
        d.edit_provider("openai", upstream.base_url, "sk-openai-central")
        d.reload_and_wait()
        yield d


@pytest.fixture(scope="module")
def admin_token(daemon: DaemonProcess) -> str:
    """An admin token, over a store filled with RECORDS interceptions."""
    token = "abp_admin_" + secrets.token_urlsafe(24)

    async def fill() -> None:
        async with await Store.open(daemon.data_dir / "aibridgeproxyd.db") as store:
            await store.insert_admin_token("reader", hash_token(token), "admin")
            for start in range(0, RECORDS, BATCH):
                await store.insert_interceptions(batch(start))
            await store.checkpoint()

    asyncio.run(fill())
    return token


def event_gaps(daemon: DaemonProcess, token: str, name: str) -> tuple[list[float], bool]:
    """One paced stream through the proxy: the milliseconds between its events as they
    arrived, and whether it ended with ``[DONE]``."""
    arrivals: list[float] = []
    done = False
    with (
        daemon.httpx_client(token, timeout=30) as client,
        client.stream(
            "POST",
            "https://api.openai.com/v1/chat/completions",
            json={"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-fake-stream-id": name, "x-fake-events": str(EVENTS),
                     "x-fake-delay-ms": str(EVENT_DELAY_MS)},
        ) as response,
    ):  # fmt: skip
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.perf_counter() * 1000)
                done = done or line == "data: [DONE]"
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)], done


def read_until(
    daemon: DaemonProcess, token: str, stop: threading.Event, done: list[float], failed: list[str]
) -> None:
    """Call the heavy reads one after another until ``stop``; each read's milliseconds into
    ``done``, a failed one into ``failed``. Bodies are read, not parsed (this process's CPU is
    the stream's too)."""
    headers = {"Coder-Session-Token": token}
    with httpx.Client(trust_env=False, timeout=60) as client:
        while not stop.is_set():
            for path in HEAVY_READS:
                started = time.perf_counter()
                response = client.get(daemon.admin_url + path, headers=headers)
                if response.status_code != 200:
                    failed.append(f"{path}: {response.status_code} {response.text[:300]}")
                done.append((time.perf_counter() - started) * 1000)


def summary(gaps: list[float]) -> str:
    return (
        f"gap p50 {statistics.median(gaps):.1f} ms, max {max(gaps):.1f} ms "
        f"(paced {EVENT_DELAY_MS} ms)"
    )


def test_a_stream_keeps_flowing_while_heavy_api_reads_run(
    daemon: DaemonProcess, admin_token: str, token: str
) -> None:
    quiet, quiet_done = event_gaps(daemon, token, "quiet")
    stop = threading.Event()
    reads: list[float] = []
    failed: list[str] = []
    readers = [
        threading.Thread(target=read_until, args=(daemon, admin_token, stop, reads, failed))
        for _ in range(READERS)
    ]
    for reader in readers:
        reader.start()
    try:
        daemon.wait_for(lambda: len(reads) >= READERS, 60, "the first reads")  # reads under way
        loaded, loaded_done = event_gaps(daemon, token, "under-reads")
    finally:
        stop.set()
        for reader in readers:
            reader.join(120)
    # Every delta, then the fake's closing events: [DONE] last.
    assert (len(quiet) >= EVENTS, quiet_done) == (True, True)
    assert (len(loaded) >= EVENTS, loaded_done) == (True, True)
    assert not failed, failed[:3]
    print(
        f"\n{RECORDS:,} records; quiet stream: {summary(quiet)}; under {READERS} readers "
        f"({len(reads)} reads, median {statistics.median(reads):.0f} ms, max "
        f"{max(reads):.0f} ms): {summary(loaded)}"
    )
