"""End to end: policies hold across two replicas on one real PostgreSQL database
(docs/policies.md#enforcement). A budget of N requests' cost admits N requests in all when the
traffic is split over both replicas (each sees the other's spend after reconciling), a user who
spent their budget on one replica is refused by the other, and an rpm limit holds globally
within the documented overshoot (what the other replica admits in about 2 seconds)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fakes.upstream import DEFAULT_OPENAI_MODEL, FakeUpstream
from tests.harness import DaemonProcess, avoid_minute_boundary
from tests.postgres import PostgresServer

pytestmark = pytest.mark.usefixtures("clean_upstream")

ENCRYPTION_KEY = base64.b64encode(bytes(range(50, 82))).decode()
PRICE = {"input": 1000, "output": 1000}  # USD per million tokens: $0.001 a token
# What the other replica may admit before it sees a count: its reconciliation and ours.
LAG_SECONDS = 2.5


@pytest.fixture(scope="module")
def replicas(
    upstream: FakeUpstream, postgres_server: PostgresServer
) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    config = {
        "database_url": postgres_server.create_database(),
        "upstream_ca_file": upstream.ca_pem_path,
        "prices": {DEFAULT_OPENAI_MODEL: PRICE},
    }
    env = {"AIBRIDGEPROXYD_ENCRYPTION_KEYS": ENCRYPTION_KEY}
    with DaemonProcess(config, env=env) as first, DaemonProcess(config, env=env) as second:
        first.edit_provider("openai", upstream.base_url, "sk-openai-central")
        for daemon in (first, second):
            daemon.reload_and_wait()
        yield first, second


def chat(daemon: DaemonProcess, token: str) -> httpx.Response:
    with daemon.httpx_client(token, timeout=5.0) as client:
        return client.post(
            "https://api.openai.com/v1/chat/completions",
            json={"model": DEFAULT_OPENAI_MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )


def code(response: httpx.Response) -> str | None:
    return None if response.status_code == 200 else str(response.json()["error"]["code"])


def budget_seen(daemon: DaemonProcess, user: str) -> float:
    return daemon.metric("policy_budget_used_ratio", user=user, provider="*") or 0.0


def test_a_budget_of_n_requests_admits_n_over_two_replicas(
    replicas: tuple[DaemonProcess, DaemonProcess],
) -> None:
    first, second = replicas
    token = first.create_token("split-budget")
    second.reload_and_wait()
    probe = chat(first, token)  # its cost is one request's cost, before any policy
    assert code(probe) is None
    cost = probe.json()["usage"]["prompt_tokens"] + probe.json()["usage"]["completion_tokens"]
    # A budget of exactly 4 requests (counted from now: the probe was made without a policy).
    first.cli(
        "policies", "set", "--user", "split-budget", "--budget-usd", str(4 * cost / 1000),
        "--period", "day", check=True,
    )  # fmt: skip
    admitted = 0
    for turn in range(6):
        serving, other = (first, second) if turn % 2 == 0 else (second, first)
        response = chat(serving, token)
        if code(response) is None:
            admitted += 1
            # The other replica has adopted this spend before the next request goes to it.
            other.wait_for(
                lambda o=other, n=admitted: budget_seen(o, "split-budget") >= n / 4 - 1e-9,
                timeout=LAG_SECONDS,
                message="the other replica's view of the spend",
            )
        else:
            assert code(response) == "budget_exceeded"
    assert admitted == 4


def test_spend_on_one_replica_is_refused_by_the_other(
    replicas: tuple[DaemonProcess, DaemonProcess],
) -> None:
    first, second = replicas
    token = first.create_token("one-sided")
    first.cli(
        "policies", "set", "--user", "one-sided", "--max-tokens", "1", "--period", "month",
        check=True,
    )  # fmt: skip
    second.reload_and_wait()
    assert code(chat(first, token)) is None
    assert code(chat(first, token)) == "budget_exceeded"
    refused = second.wait_for(
        lambda: code(chat(second, token)) == "budget_exceeded",
        timeout=LAG_SECONDS,
        message="the second replica refusing a budget spent on the first",
    )
    assert refused


def test_rpm_holds_across_replicas_within_the_documented_overshoot(
    replicas: tuple[DaemonProcess, DaemonProcess],
) -> None:
    first, second = replicas
    token = first.create_token("split-rpm")
    rpm = 8
    first.cli("policies", "set", "--user", "split-rpm", "--rpm", str(rpm), check=True)
    second.reload_and_wait()
    avoid_minute_boundary(seconds_needed=20)
    results: list[tuple[int, str | None]] = []
    started = time.monotonic()
    while time.monotonic() - started < 8 and not _both_refused(results):
        index = len(results) % 2
        results.append((index, code(chat(replicas[index], token))))
        time.sleep(0.3)  # the request rate of this test's client, not synchronisation
    admitted = sum(1 for _, result in results if result is None)
    assert _both_refused(results), results
    assert {result for _, result in results} <= {None, "rpm_exceeded"}
    # Each replica alone would admit rpm (2 x rpm in all); the other's lag adds at most what it
    # admits in LAG_SECONDS at one request per 0.6 s.
    assert rpm <= admitted <= rpm + int(LAG_SECONDS / 0.6) + 1, results


def _both_refused(results: list[tuple[int, str | None]]) -> bool:
    return {index for index, result in results if result is not None} == {0, 1}
