"""End to end: ``workers: 2``, the real daemon (a main process and two worker processes) and
real clients. Requests land on both workers, ``/metrics`` sums them, SIGTERM drains every
worker, and a worker killed with SIGKILL is restarted and serves again (README.md#workers)."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, DaemonStartError

CHAT = "https://api.openai.com/v1/chat/completions"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}

pytestmark = pytest.mark.usefixtures("clean_upstream")


def workers_config(upstream: FakeUpstream, **extra: Any) -> dict[str, Any]:
    return {
        "workers": 2,
        "upstream_ca_file": upstream.ca_pem_path,
        "auth": "none",
        "log_format": "json",
        "log_interceptions": True,
        **extra,
    }


@pytest.fixture(scope="module")
def daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    with DaemonProcess(workers_config(upstream), ready_timeout=40) as d:
        d.edit_provider("openai", upstream.base_url, "sk-central")
        d.reload_and_wait()
        yield d


def one_request(daemon: DaemonProcess) -> int:
    """One chat completion on a connection of its own (a new CONNECT, so a new accept)."""
    with daemon.httpx_client() as client:
        return client.post(CHAT, json=BODY).status_code


def send(daemon: DaemonProcess, count: int) -> list[int]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda _: one_request(daemon), range(count)))


def worker_pids(daemon: DaemonProcess) -> dict[int, int]:
    """Slot -> pid of the latest ``worker listening`` line of each slot."""
    return {
        record["worker"]: record["pid"]
        for record in daemon.json_logs()
        if record.get("message") == "worker listening"
    }


def serving_workers(daemon: DaemonProcess, after: int = 0) -> list[int]:
    """The worker slot of each ``interception_end`` log record, from log record ``after`` on."""
    return [
        record["worker"]
        for record in daemon.json_logs()[after:]
        if record.get("record_type") == "interception_end"
    ]


def test_requests_land_on_both_workers_and_metrics_are_their_sum(daemon: DaemonProcess) -> None:
    before = daemon.metric("mitm_requests_total", provider="openai") or 0
    assert set(send(daemon, 40)) == {200}
    served = daemon.wait_for(
        lambda: (lambda s: s if len(s) >= 40 else None)(serving_workers(daemon)),
        message="an interception_end record for each request",
    )
    assert set(served) == {0, 1}, f"requests per worker: {[served.count(0), served.count(1)]}"
    assert daemon.metric("mitm_requests_total", provider="openai") == before + 40
    assert daemon.metric("mitm_responses_total", code="200", provider="openai") == before + 40
    assert daemon.metric("upstream_ttfb_seconds_count", provider="openai") == before + 40
    assert daemon.metric("inflight_mitm_requests", provider="openai") == 0
    assert daemon.metric("connect_sessions_total", type="mitm") >= 40
    assert daemon.metric("provider_info", provider_name="openai", status="enabled") == 1
    health = daemon.admin_get("/healthz").json()
    ready = daemon.admin_get("/readyz").json()
    assert (health["workers"], ready["workers_ready"], ready["ready"]) == (2, 2, True)
    # The fields a single process reports, over its workers.
    assert (ready["database_reachable"], ready["reload_failing"]) == (True, False)


def test_sighup_reloads_every_worker(daemon: DaemonProcess) -> None:
    """The reload timestamps are the oldest worker's: advancing means both reloaded."""
    daemon.reload_and_wait()
    asked = "reloading providers: asked by the main process"
    reloads = [r for r in daemon.json_logs() if r.get("message") == asked]
    assert {r["worker"] for r in reloads} == {0, 1}


def test_a_killed_worker_is_restarted_and_serves_again(daemon: DaemonProcess) -> None:
    assert set(send(daemon, 10)) == {200}
    counted = daemon.metric("mitm_requests_total", provider="openai") or 0
    victim_slot, victim_pid = sorted(worker_pids(daemon).items())[1]
    main_pid = daemon.pid
    os.kill(victim_pid, signal.SIGKILL)
    new_pid = daemon.wait_for(
        lambda: (lambda p: p if p != victim_pid else None)(worker_pids(daemon)[victim_slot]),
        timeout=30,
        message="the killed worker is started again",
    )
    assert f"worker {victim_slot} (pid {victim_pid}) exited (killed by SIGKILL)" in daemon.logs()
    daemon.wait_for(lambda: daemon.admin_get("/readyz").status_code == 200, timeout=30)
    assert daemon.pid == main_pid and daemon.returncode is None and new_pid != victim_pid
    # Counters never go down: the dead worker's last reported values stay in the sum.
    assert (daemon.metric("mitm_requests_total", provider="openai") or 0) >= counted
    start = len(daemon.json_logs())

    def new_worker_served() -> bool:
        assert set(send(daemon, 6)) == {200}
        return victim_slot in serving_workers(daemon, start)

    daemon.wait_for(new_worker_served, timeout=30, message="the restarted worker serves")
    assert (daemon.metric("mitm_requests_total", provider="openai") or 0) >= counted + 6


def test_sigterm_drains_every_worker_then_exits(upstream: FakeUpstream) -> None:
    config = workers_config(upstream, drain_timeout="20s")
    with DaemonProcess(config, ready_timeout=40) as d:
        d.edit_provider("openai", upstream.base_url, "k")
        d.reload_and_wait()
        pids = worker_pids(d)
        streams = [upstream.gate(f"drain-{n}") for n in range(2)]
        with (
            d.httpx_client() as first,
            d.httpx_client() as second,
            first.stream(
                "POST",
                CHAT,
                json={"model": "m", "stream": True, "messages": []},
                headers={"x-fake-stream-id": "drain-0", "x-fake-events": "3"},
            ) as one,
            second.stream(
                "POST",
                CHAT,
                json={"model": "m", "stream": True, "messages": []},
                headers={"x-fake-stream-id": "drain-1", "x-fake-events": "3"},
            ) as two,
        ):
            lines = [one.iter_lines(), two.iter_lines()]
            for state, stream_lines in zip(streams, lines, strict=True):
                state.release()
                assert next(line for line in stream_lines if line.startswith("data:"))
            d.send_signal(signal.SIGTERM)
            d.wait_for(lambda: d.admin_get("/readyz").status_code == 503)
            d.wait_for(lambda: refuses_connections(d), message="no worker accepts any more")
            for state in streams:
                state.open_gate()
            rest = [[line for line in ls if line.startswith("data:")] for ls in lines]
        assert [r[-1] for r in rest] == ["data: [DONE]", "data: [DONE]"]
        d.wait_for(lambda: d.returncode is not None, timeout=30, message="exits after the drain")
        assert d.returncode == 0
        stopped = [
            r.get("worker") for r in d.json_logs() if r["message"] == "aibridgeproxyd stopped"
        ]
        assert sorted(stopped, key=str) == [0, 1, None]  # both workers, then the main process
        for pid in pids.values():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def refuses_connections(daemon: DaemonProcess) -> bool:
    try:
        httpx.get(daemon.proxy_url, timeout=2)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


def open_gated_stream(d: DaemonProcess, client: httpx.Client, stream_id: str) -> Any:
    return client.stream(
        "POST",
        CHAT,
        json={"model": "m", "stream": True, "messages": []},
        headers={"x-fake-stream-id": stream_id, "x-fake-events": "3"},
    )


def test_a_workers_own_sigterm_after_the_main_processs_stop_still_drains(
    upstream: FakeUpstream,
) -> None:
    """Ctrl-C and systemd signal every process of the group, so a worker gets the signal and
    the main process's stop request, in either order: together they are one stop, not two. The
    order where the request comes first is forced here."""
    config = workers_config(upstream, drain_timeout="20s")
    with DaemonProcess(config, ready_timeout=40) as d:
        d.edit_provider("openai", upstream.base_url, "k")
        d.reload_and_wait()
        pids = worker_pids(d)
        state = upstream.gate("group")
        with d.httpx_client() as client, open_gated_stream(d, client, "group") as response:
            state.release()
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            d.send_signal(signal.SIGTERM)
            d.wait_for(lambda: len(draining(d)) == 2, message="both workers drain")
            for pid in pids.values():
                os.kill(pid, signal.SIGTERM)
            d.wait_for(lambda: refuses_connections(d), message="no worker accepts any more")
            state.open_gate()
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        d.wait_for(lambda: d.returncode is not None, timeout=30, message="exits after the drain")
        assert d.returncode == 0
        assert "second stop signal" not in d.logs()


def draining(daemon: DaemonProcess) -> set[int]:
    return {
        r["worker"]
        for r in daemon.json_logs()
        if r.get("message") == "stopping: draining open streams" and "worker" in r
    }


def test_a_second_sigterm_closes_every_workers_streams_now(upstream: FakeUpstream) -> None:
    """The gated stream would hold a 10-minute drain; the second SIGTERM ends it now."""
    config = workers_config(upstream, drain_timeout="10m")
    with DaemonProcess(config, ready_timeout=40) as d:
        d.edit_provider("openai", upstream.base_url, "k")
        d.reload_and_wait()
        state = upstream.gate("second")
        with d.httpx_client() as client, open_gated_stream(d, client, "second") as response:
            state.release()
            assert next(line for line in response.iter_lines() if line.startswith("data:"))
            d.send_signal(signal.SIGTERM)
            d.wait_for(lambda: d.admin_get("/readyz").status_code == 503)
            d.send_signal(signal.SIGTERM)
            d.wait_for(lambda: d.returncode is not None, timeout=30, message="daemon exits")
            state.open_gate()
        assert d.returncode == 0
        assert "second stop signal: every worker closes its open streams now" in d.logs()


def test_a_taken_listen_port_is_refused_once_naming_the_key(upstream: FakeUpstream) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = workers_config(upstream, listen=f"127.0.0.1:{port}", admin_listen="127.0.0.1:0")
        d = DaemonProcess(config, ready_timeout=40)
        try:
            with pytest.raises(DaemonStartError):
                d.start()
            assert d.returncode == 2
            lines = [r["message"] for r in d.json_logs() if r["level"] == "error"]
            assert lines == [
                f"cannot start: cannot listen on 127.0.0.1:{port} (listen): address already in "
                "use; choose another address with --listen HOST:PORT or config key 'listen'"
            ]
            assert "worker listening" not in d.logs()
        finally:
            d.close()
