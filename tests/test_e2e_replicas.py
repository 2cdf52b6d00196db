"""End to end: two daemons (replicas) on one real PostgreSQL database (CONTRACT 14). A change
made through either replica, through its API or the CLI, applies on both within a second (the
reload timer is a minute long, so only the LISTEN/NOTIFY path can do it); both serve one shared
CA; the records of both are visible through either API; killing one replica mid-stream leaves
the other's stream alone; a database restart under traffic turns /readyz 503 and back while
routing never stops, and every record is written once the database is back."""

from __future__ import annotations

import base64
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, basic_auth
from tests.postgres import PostgresServer

pytestmark = pytest.mark.usefixtures("clean_upstream")

PROVIDERS = "/api/v2/ai/providers"
PROXY_TOKENS = "/api/v2/ai/proxy-tokens"
INTERCEPTIONS = "/api/v2/aibridge/interceptions"
ENCRYPTION_KEY = base64.b64encode(bytes(range(40, 72))).decode()
CENTRAL_KEY = "sk-replica-CENTRAL-KEY-0001"


def replica_config(upstream: FakeUpstream, database_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "database_url": database_url,
        "upstream_ca_file": upstream.ca_pem_path,
        "allowed_private_cidrs": ["127.0.0.0/8"],
        # Long: a change reaching the other replica within a second is the notification's doing.
        "reload_interval": "60s",
        **extra,
    }


def replica(config: dict[str, Any]) -> DaemonProcess:
    return DaemonProcess(config, env={"AIBRIDGEPROXYD_ENCRYPTION_KEYS": ENCRYPTION_KEY})


@pytest.fixture(scope="module")
def database_url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()


@pytest.fixture(scope="module")
def replicas(upstream: FakeUpstream, database_url: str) -> Iterator[tuple[DaemonProcess, ...]]:
    with (
        replica(replica_config(upstream, database_url)) as first,
        replica(replica_config(upstream, database_url)) as second,
    ):
        yield first, second


@pytest.fixture(scope="module")
def admin_token(replicas: tuple[DaemonProcess, ...]) -> str:
    result = replicas[0].cli("admin-tokens", "create", "root", "--role", "admin", check=True)
    return result.stdout.strip()


def api(daemon: DaemonProcess, token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    with httpx.Client(base_url=daemon.admin_url, trust_env=False, timeout=10.0) as client:
        return client.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)


def proxied_chat(
    daemon: DaemonProcess, token: str, host: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    """One chat completion to ``host`` through ``daemon``, on a new connection."""
    with daemon.httpx_client(token, timeout=5.0) as client:
        return client.post(
            f"https://{host}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            headers=headers or {},
        )


def within(seconds: float, check: Callable[[], bool], what: str) -> float:
    """Poll ``check`` until it holds; the seconds it took. AssertionError after ``seconds``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"{what}: not within {seconds}s"
        time.sleep(0.02)  # polling interval, not synchronisation
    return time.monotonic() - started


def succeeds(attempt: Callable[[], httpx.Response]) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return attempt().status_code == 200
        except httpx.HTTPError:
            return False

    return check


def new_provider(api_of: DaemonProcess, admin: str, upstream: FakeUpstream, name: str) -> str:
    host = f"{name}.corp.example"
    body = {
        "name": name,
        "type": "openai-compat",
        "base_url": upstream.base_url,
        "hosts": [host],
        "api_keys": [{"api_key": CENTRAL_KEY}],
    }
    response = api(api_of, admin, "POST", PROVIDERS, json=body)
    assert response.status_code == 201, response.text
    return host


def test_replicas_share_one_ca_kept_in_the_database(replicas: tuple[DaemonProcess, ...]) -> None:
    first, second = replicas
    pems = [d.admin_get("/ca-cert.pem").content for d in replicas]
    assert pems[0].startswith(b"-----BEGIN CERTIFICATE-----") and pems[0] == pems[1]
    assert first.ca_cert_path.read_bytes() == second.ca_cert_path.read_bytes()


def test_a_provider_created_through_one_replica_routes_on_both_within_a_second(
    replicas: tuple[DaemonProcess, ...], admin_token: str, upstream: FakeUpstream
) -> None:
    first, second = replicas
    token = first.create_token("alice", reload=False)
    within(1.0, succeeds(lambda: raw_ok(second, token)), "the new token on the other replica")
    host = new_provider(first, admin_token, upstream, "corp-one")
    for daemon in (second, first):
        within(1.0, succeeds(lambda d=daemon: proxied_chat(d, token, host)), "routing")
    assert all(r.headers["authorization"] == f"Bearer {CENTRAL_KEY}" for r in upstream.requests)


def raw_ok(daemon: DaemonProcess, token: str) -> httpx.Response:
    status = daemon.raw_connect("api.openai.com:443", basic_auth(token)).status_code
    return httpx.Response(status)


def test_a_token_made_and_revoked_through_either_replica_applies_on_both_within_a_second(
    replicas: tuple[DaemonProcess, ...], admin_token: str
) -> None:
    first, second = replicas
    created = api(second, admin_token, "POST", PROXY_TOKENS, json={"name": "bob"})
    assert created.status_code == 201
    token = created.json()["token"]
    for daemon in replicas:
        within(1.0, succeeds(lambda d=daemon: raw_ok(d, token)), "a new token")
    assert api(second, admin_token, "DELETE", f"{PROXY_TOKENS}/bob").status_code == 204
    for daemon in replicas:
        within(1.0, lambda d=daemon: raw_ok(d, token).status_code == 407, "a revoked token")
    # The CLI (another process, writing to the database directly) notifies the replicas too.
    cli_token = first.cli("tokens", "create", "carol", check=True).stdout.strip()
    for daemon in replicas:
        within(1.0, succeeds(lambda d=daemon: raw_ok(d, cli_token)), "a token made by the CLI")
    first.cli("tokens", "revoke", "carol", check=True)
    for daemon in replicas:
        within(1.0, lambda d=daemon: raw_ok(d, cli_token).status_code == 407, "a CLI revocation")


def test_records_of_every_replica_are_visible_through_either_api(
    replicas: tuple[DaemonProcess, ...], admin_token: str, upstream: FakeUpstream
) -> None:
    first, second = replicas
    token = first.create_token("dave", reload=False)
    host = new_provider(second, admin_token, upstream, "corp-two")
    request_ids = []
    for daemon in replicas:
        within(1.0, succeeds(lambda d=daemon: raw_ok(d, token)), "the token")
        within(1.0, succeeds(lambda d=daemon: proxied_chat(d, token, host)), "routing")
        request_ids.append(proxied_chat(daemon, token, host).headers["x-aibridge-request-id"])

    def listed(daemon: DaemonProcess) -> set[str]:
        page = api(daemon, admin_token, "GET", INTERCEPTIONS, params={"q": "initiator:dave"})
        return {record["id"] for record in page.json()["results"]}

    for daemon in replicas:
        daemon.wait_for(lambda d=daemon: set(request_ids) <= listed(d), timeout=10.0)


def test_killing_one_replica_mid_stream_leaves_the_other_replicas_stream_alone(
    upstream: FakeUpstream, database_url: str
) -> None:
    with (
        replica(replica_config(upstream, database_url)) as doomed,
        replica(replica_config(upstream, database_url)) as survivor,
    ):
        token = doomed.create_token("erin", reload=False)
        doomed.edit_provider("openai", upstream.base_url, CENTRAL_KEY)
        within(2.0, succeeds(lambda: proxied_chat(survivor, token, "api.openai.com")), "routing")
        outcomes: dict[str, Any] = {}

        def stream(name: str, daemon: DaemonProcess) -> None:
            headers = {"x-fake-stream-id": name, "x-fake-events": "30", "x-fake-delay-ms": "50"}
            try:
                with daemon.httpx_client(token, timeout=20.0) as client:
                    body = {"model": "gpt-4o", "stream": True, "messages": []}
                    url = "https://api.openai.com/v1/chat/completions"
                    with client.stream("POST", url, json=body, headers=headers) as response:
                        outcomes[name] = "".join(response.iter_text())
            except httpx.HTTPError as error:
                outcomes[name] = error

        threads = [
            threading.Thread(target=stream, args=("doomed", doomed)),
            threading.Thread(target=stream, args=("survivor", survivor)),
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # both streams are under way (30 events, 50 ms apart)
        doomed.send_signal(signal.SIGKILL)
        for thread in threads:
            thread.join(30)
        assert isinstance(outcomes["doomed"], httpx.HTTPError)
        assert outcomes["survivor"].rstrip().endswith("data: [DONE]")


def test_a_database_restart_under_traffic_keeps_routing_and_loses_no_record(
    upstream: FakeUpstream, postgres_server: PostgresServer
) -> None:
    database_url = postgres_server.create_database()
    config = replica_config(upstream, database_url, reload_interval="1s")
    with replica(config) as daemon:
        token = daemon.create_token("frank", reload=False)
        daemon.edit_provider("openai", upstream.base_url, CENTRAL_KEY)
        daemon.reload_and_wait()
        statuses: list[int] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                statuses.append(proxied_chat(daemon, token, "api.openai.com").status_code)
                time.sleep(0.05)  # pacing, not synchronisation

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            within(5.0, lambda: len(statuses) >= 5, "traffic before the restart")
            readiness = []
            with postgres_server.stopped():
                daemon.wait_for(lambda: daemon.admin_get("/readyz").status_code == 503, 10.0)
                readiness.append(503)
                during = len(statuses)
                within(10.0, lambda: len(statuses) >= during + 10, "traffic while it is down")
            daemon.wait_for(lambda: daemon.admin_get("/readyz").status_code == 200, 15.0)
            after = len(statuses)
            within(10.0, lambda: len(statuses) >= after + 5, "traffic after the restart")
        finally:
            stop.set()
            worker.join(30)
        assert readiness == [503] and set(statuses) == {200}, statuses
        admin = daemon.cli("admin-tokens", "create", "ops", "--role", "auditor", check=True)

        def recorded() -> int:
            page = api(
                daemon,
                admin.stdout.strip(),
                "GET",
                INTERCEPTIONS,
                params={"q": "initiator:frank", "limit": "1"},
            )
            return int(page.json()["count"])

        daemon.wait_for(lambda: recorded() == len(statuses), timeout=15.0)
        assert not daemon.metric("interception_records_dropped_total")


def test_concurrent_migrations_migrate_once_and_name_the_database_without_its_password(
    upstream: FakeUpstream, postgres_server: PostgresServer
) -> None:
    url = postgres_server.create_database()
    with_password = url.replace("postgres@", "postgres:hunter2-secret@")
    nodes = [replica(replica_config(upstream, with_password)) for _ in range(3)]
    outcomes: list[Any] = [None] * len(nodes)

    def migrate(index: int) -> None:
        outcomes[index] = nodes[index].cli("migrate")

    threads = [threading.Thread(target=migrate, args=(i,)) for i in range(len(nodes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for result in outcomes:
        assert result.returncode == 0, result.stderr
        assert "postgres:***@" in result.stdout and "hunter2" not in result.stdout + result.stderr
    name = url.rsplit("/", 1)[1]
    rows = postgres_server.psql("SELECT version FROM schema_version ORDER BY version", name)
    versions = [int(line) for line in rows.split() if line.strip().isdigit()]
    assert versions == list(range(1, len(versions) + 1)) and len(versions) >= 9


def test_a_replica_started_before_its_database_waits_for_it(
    upstream: FakeUpstream, postgres_server: PostgresServer
) -> None:
    url = postgres_server.create_database()
    daemon = replica(replica_config(upstream, url))
    started: list[BaseException | None] = []

    def start() -> None:
        try:
            daemon.start()
            started.append(None)
        except BaseException as error:  # reported below, in the test's thread
            started.append(error)

    try:
        with postgres_server.stopped():
            thread = threading.Thread(target=start)
            thread.start()
            daemon.wait_for(lambda: "waiting for the database" in daemon.logs(), timeout=15.0)
        thread.join(60)
        assert started == [None]
        assert daemon.admin_get("/readyz").status_code == 200
    finally:
        daemon.close()
