"""End to end: a check that raises inside the real daemon refuses, it never lets through.

A fault is injected into the routing snapshot at the daemon's start-up (``faults/sitecustomize``,
on PYTHONPATH only for these daemons), as a bug in a look-up would raise. Before the fail-closed
guard, mitmproxy logged the exception and carried on: the CONNECT was answered 200 and the
request went upstream with the central key.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.upstream import FakeUpstream
from tests.harness import REPO_ROOT, DaemonProcess, basic_auth

FAULTS = Path(__file__).resolve().parent / "faults"
CENTRAL_KEY = "sk-central-fault"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


def faulty_daemon(upstream: FakeUpstream, fault: str) -> DaemonProcess:
    pythonpath = os.pathsep.join([str(FAULTS), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    return DaemonProcess(
        {"upstream_ca_file": upstream.ca_pem_path, "auth_tunneled": True},
        env={"ABP_TEST_FAULT": fault, "PYTHONPATH": pythonpath.rstrip(os.pathsep)},
    )


@pytest.mark.parametrize(
    ("fault", "status"),
    [("identity_for_token", 407), ("provider_for_host", 403)],
)
def test_a_check_that_raises_refuses_the_connect(
    upstream: FakeUpstream, fault: str, status: int
) -> None:
    with faulty_daemon(upstream, fault) as daemon:
        daemon.cli(
            "providers", "edit", "openai", "--base-url", upstream.base_url, "--key", CENTRAL_KEY,
            check=True,
        )  # fmt: skip
        token = daemon.create_token("alice")
        for target in ("api.openai.com:443", "tunneled.example.test:443"):
            response = daemon.raw_connect(target, basic_auth(token))
            assert response.status_code == status, (target, response)
            assert b"injected" not in response.body and b"Traceback" not in response.body
        assert upstream.requests == []
        logs = daemon.logs()
        assert "refused (fail closed)" in logs
        assert f"injected fault in Snapshot.{fault}" in logs
        assert (daemon.metric("hook_failures_total", role="check") or 0) >= 2
