"""Run the real daemon as a subprocess for end-to-end tests, and talk to it like a client would.

    with FakeUpstream() as up, DaemonProcess({"upstream_ca_file": up.ca_pem_path}) as daemon:
        daemon.cli("providers", "edit", "openai", "--base-url", up.base_url, "--key", "sk-central")
        daemon.reload_and_wait()
        token = daemon.create_token("alice")
        with daemon.httpx_client(token) as client:
            client.post("https://api.openai.com/v1/chat/completions", json={...})
        assert daemon.metric("mitm_requests_total", provider="openai") == 1

Everything listens on loopback ports picked at random, lives in a temporary directory and is
removed on exit. The daemon's environment drops proxy variables and AIBRIDGEPROXYD_* settings
from the caller's environment, so a developer's shell cannot change what a test sees.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Self
from urllib.parse import quote, urlsplit, urlunsplit

import h11
import httpx
import yaml

from tests.metric_samples import MetricKey, parse_samples, sample_value

if TYPE_CHECKING:
    import anthropic
    import openai

REPO_ROOT = Path(__file__).resolve().parent.parent
# The API key a client sends when the proxy is to inject the provider's central key.
PLACEHOLDER_KEY = "aibridgeproxyd"
DEFAULT_METRICS_PREFIX = "coder_aibridgeproxyd_"
LOOPBACK = "127.0.0.1"
# Environment variables of the caller that must not leak into the daemon under test.
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
_DROPPED_PREFIXES = ("AIBRIDGEPROXYD_", "CODER_AI_GATEWAY_PROVIDER_")
_ADDRESS_IN_USE = ("address already in use", "errno 98")


class DaemonStartError(RuntimeError):
    """The daemon exited, or did not become ready, during start-up."""


def free_port() -> int:
    """A loopback port that was free a moment ago (the daemon binds it shortly after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_until[T](
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    message: str = "",
    interval: float = 0.02,
) -> T:
    """Poll `predicate` until it returns something truthy, and return that; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(message or f"condition not met within {timeout}s")
        time.sleep(interval)  # polling interval, not synchronisation


def avoid_minute_boundary(seconds_needed: float) -> None:
    """Wait until a UTC minute has at least ``seconds_needed`` left, so a test of the policies'
    fixed UTC-minute windows (rpm, tpm, ``this_minute``) starts and ends in the same window."""
    while (now := datetime.now(UTC)).second + now.microsecond / 1e6 > 60 - seconds_needed:
        time.sleep(0.2)  # waiting for the clock, not for the daemon


def trust(*pem_paths: Path | str) -> ssl.SSLContext:
    """An SSL context trusting exactly these CA files (e.g. the daemon's CA and a fake's CA)."""
    context = ssl.create_default_context(cafile=str(pem_paths[0]))
    for path in pem_paths[1:]:
        context.load_verify_locations(cafile=str(path))
    return context


def ca_bundle(path: Path, *pem_paths: Path | str) -> Path:
    """Write these CA files, concatenated, to ``path`` and return it: one ``upstream_ca_file``
    that trusts several fakes."""
    path.write_text("".join(Path(pem).read_text() for pem in pem_paths))
    return path


def basic_auth(token: str, user: str = "ignored") -> str:
    """The Proxy-Authorization value carrying `token` as the password."""
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def proxy_url_with_token(proxy_url: str, token: str, user: str = "ignored") -> str:
    """`http://ignored:<token>@127.0.0.1:PORT`, the form HTTPS_PROXY takes."""
    parts = urlsplit(proxy_url)
    netloc = f"{quote(user, safe='')}:{quote(token, safe='')}@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# --- raw CONNECT -------------------------------------------------------------------------------


class ConnectResponse(NamedTuple):
    status_code: int
    headers: httpx.Headers
    body: bytes


def _connect(
    sock: socket.socket,
    target: str,
    proxy_auth: str | None,
    extra_headers: Iterable[tuple[str, str]],
) -> tuple[ConnectResponse, bytes]:
    """Send CONNECT on `sock` and read the reply; also return bytes that followed a 2xx head."""
    connection = h11.Connection(h11.CLIENT)
    headers = [("Host", target), *extra_headers]
    if proxy_auth is not None:
        headers.append(("Proxy-Authorization", proxy_auth))
    sock.sendall(connection.send(h11.Request(method="CONNECT", target=target, headers=headers)))
    sock.sendall(connection.send(h11.EndOfMessage()) or b"")
    head: h11.Response | None = None
    body = b""
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as error:
            raise ConnectionError(f"bad or missing answer to CONNECT {target}: {error}") from None
        if event is h11.NEED_DATA:
            connection.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif event is h11.PAUSED or isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if head is None:
        raise ConnectionError(f"proxy closed the connection without answering CONNECT {target}")
    response_headers = httpx.Headers([(k.decode(), v.decode()) for k, v in head.headers])
    trailing = connection.trailing_data[0] if event is h11.PAUSED else b""
    return ConnectResponse(head.status_code, response_headers, body), trailing


def raw_connect(
    proxy_host: str,
    proxy_port: int,
    target: str,
    proxy_auth: str | None = None,
    *,
    extra_headers: Iterable[tuple[str, str]] = (),
    timeout: float = 10.0,
) -> ConnectResponse:
    """Send `CONNECT target HTTP/1.1` over a plain socket and return the proxy's answer.

    For refusals (407, 403, 502): `status, headers, body = raw_connect(...)`.
    """
    with socket.create_connection((proxy_host, proxy_port), timeout=timeout) as sock:
        response, _ = _connect(sock, target, proxy_auth, extra_headers)
        return response


def open_tunnel(
    proxy_host: str,
    proxy_port: int,
    target: str,
    proxy_auth: str | None = None,
    *,
    timeout: float = 10.0,
) -> socket.socket:
    """A socket on which CONNECT succeeded; the caller owns (and closes) it."""
    sock = socket.create_connection((proxy_host, proxy_port), timeout=timeout)
    try:
        response, trailing = _connect(sock, target, proxy_auth, ())
        if not 200 <= response.status_code < 300:
            raise ConnectionError(
                f"CONNECT {target} refused: {response.status_code} {response.body!r}"
            )
        if trailing:
            raise ConnectionError(f"proxy sent {len(trailing)} unexpected bytes after CONNECT")
    except BaseException:
        sock.close()
        raise
    return sock


def open_tls_tunnel(
    proxy_host: str,
    proxy_port: int,
    target: str,
    context: ssl.SSLContext,
    proxy_auth: str | None = None,
    *,
    server_hostname: str | None = None,
    timeout: float = 10.0,
) -> ssl.SSLSocket:
    """CONNECT, then a TLS handshake inside the tunnel. getpeercert() shows who answered."""
    sock = open_tunnel(proxy_host, proxy_port, target, proxy_auth, timeout=timeout)
    try:
        return context.wrap_socket(
            sock, server_hostname=server_hostname or target.rsplit(":", 1)[0]
        )
    except BaseException:
        sock.close()
        raise


# --- the daemon --------------------------------------------------------------------------------


def _yaml_ready(value: Any) -> Any:
    """Paths become strings, so a FakeUpstream's ca_pem_path can go straight into a config."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {key: _yaml_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_yaml_ready(item) for item in value]
    return value


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class DaemonProcess:
    """`python -m aibridgeproxyd run --config <tmp>/config.yaml`, ready when /readyz says 200.

    `config` is the YAML content. `listen` and `admin_listen` default to free loopback ports,
    `data_dir` and `certs_dir` to directories inside the temporary working directory (which is
    also the daemon's cwd). `env` is added to the daemon's (and the CLI's) environment.
    `admin_ca` is the CA file that signed `admin_tls_cert_file`, when the config sets one: the
    admin listener is then reached over https, trusting it.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        *,
        ready_timeout: float = 20.0,
        stop_timeout: float = 10.0,
        admin_ca: Path | str | None = None,
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="aibridgeproxyd-e2e-"))
        self._requested_config = dict(config or {})
        self._picks_ports = not {"listen", "admin_listen"} & set(self._requested_config)
        self.config: dict[str, Any] = {}
        self.config_path = self.workdir / "config.yaml"
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"
        self.env = self._child_env(env or {})
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.admin_verify: ssl.SSLContext | bool = trust(admin_ca) if admin_ca else True
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config()

    # -- lifecycle

    def start(self) -> None:
        attempts = 3 if self._picks_ports else 1
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                return
            except DaemonStartError as error:
                # A port picked by free_port() can be taken before the daemon binds it.
                port_clash = any(s in str(error).lower() for s in _ADDRESS_IN_USE)
                if not port_clash or attempt == attempts:
                    raise
                self._write_config(new_ports=True)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after `stop_timeout`. Returns the exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            # Shown by pytest under "Captured stderr" next to the failure.
            print(
                f"--- aibridgeproxyd logs ({self.workdir}) ---\n{self.logs()[-8000:]}",
                file=sys.stderr,
            )
        self.close()

    def close(self) -> None:
        """Stop the daemon and remove the working directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def pid(self) -> int:
        assert self._process is not None, "daemon not started"
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def send_signal(self, signum: int) -> None:
        assert self._process is not None, "daemon not started"
        self._process.send_signal(signum)

    # -- where it is

    @property
    def proxy_host(self) -> str:
        return _host_port(self.config["listen"])[0]

    @property
    def proxy_port(self) -> int:
        return _host_port(self.config["listen"])[1]

    @property
    def proxy_url(self) -> str:
        scheme = "https" if self.config.get("tls_cert_file") else "http"
        return f"{scheme}://{self.config['listen']}"

    def proxy_url_for(self, token: str) -> str:
        return proxy_url_with_token(self.proxy_url, token)

    @property
    def admin_url(self) -> str:
        scheme = "https" if self.config.get("admin_tls_cert_file") else "http"
        return f"{scheme}://{self.config['admin_listen']}"

    @property
    def data_dir(self) -> Path:
        return Path(self.config["data_dir"])

    @property
    def certs_dir(self) -> Path:
        return Path(self.config["certs_dir"])

    @property
    def ca_cert_path(self) -> Path:
        if "ca_cert_file" in self.config:
            return Path(self.config["ca_cert_file"])
        return self.certs_dir / "ca-cert.pem"

    @property
    def metrics_prefix(self) -> str:
        return str(self.config.get("metrics_prefix", DEFAULT_METRICS_PREFIX))

    # -- logs

    def logs(self) -> str:
        """Everything the daemon wrote so far: stderr, then stdout."""
        return "".join(
            path.read_text(errors="replace")
            for path in (self.stderr_path, self.stdout_path)
            if path.exists()
        )

    def json_logs(self) -> list[dict[str, Any]]:
        """Log lines that parse as JSON objects (log_format: json)."""
        records = []
        for line in self.logs().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    # -- the CLI

    def cli(
        self, *args: str, input: str | None = None, timeout: float = 30.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """`python -m aibridgeproxyd <args> --config <this daemon's config>`."""
        command = [sys.executable, "-m", "aibridgeproxyd", *args, "--config", str(self.config_path)]
        result = subprocess.run(
            command,
            cwd=self.workdir,
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def edit_provider(
        self, name: str, base_url: str, *keys: str, options: Iterable[str] = ()
    ) -> None:
        """``providers edit NAME --base-url URL --key KEY...`` and ``options``; AssertionError if
        it fails. A running daemon routes with the change after ``reload_and_wait()``."""
        keys_options = [option for key in keys for option in ("--key", key)]
        self.cli(
            "providers", "edit", name, "--base-url", base_url, *keys_options, *options, check=True
        )

    def create_token(self, name: str, *, reload: bool = True) -> str:
        """Create a proxy token; with reload=True it is usable as soon as this returns."""
        token = self.cli("tokens", "create", name, check=True).stdout.strip()
        if reload and self._process is not None:
            self.reload_and_wait()
        return token

    # -- admin endpoints and metrics

    def admin_get(self, path: str, timeout: float = 5.0) -> httpx.Response:
        with httpx.Client(trust_env=False, timeout=timeout, verify=self.admin_verify) as client:
            return client.get(self.admin_url + path)

    def metrics(self) -> dict[MetricKey, float]:
        """Every sample on /metrics, keyed by (sample name, frozenset of label pairs)."""
        response = self.admin_get("/metrics")
        response.raise_for_status()
        return parse_samples(response.text)

    def metric(self, name: str, **labels: str) -> float | None:
        """The sum of samples named `name` (prefix optional) whose labels include `labels`.

        None when no sample matches, so a vanished series can be told from a zero.
        """
        full_name = name if name.startswith(self.metrics_prefix) else self.metrics_prefix + name
        return sample_value(self.metrics(), full_name, **labels)

    def wait_for[T](
        self, predicate: Callable[[], T | None], timeout: float = 10.0, message: str = ""
    ) -> T:
        """Poll `predicate` until truthy; on timeout the error carries the end of the logs."""
        try:
            return wait_until(predicate, timeout, message)
        except TimeoutError as error:
            raise TimeoutError(f"{error}\n--- daemon logs ---\n{self.logs()[-4000:]}") from None

    def reload_and_wait(self, timeout: float = 10.0, *, require_success: bool = True) -> None:
        """SIGHUP, then wait until a reload newer than the signal is reported in /metrics."""
        attempted = "providers_last_reload_timestamp_seconds"
        succeeded = "providers_last_reload_success_timestamp_seconds"
        attempted_before = self.metric(attempted) or 0.0
        succeeded_before = self.metric(succeeded) or 0.0
        self.send_signal(signal.SIGHUP)
        self.wait_for(
            lambda: (self.metric(attempted) or 0.0) > attempted_before,
            timeout,
            f"{attempted} did not advance after SIGHUP",
        )
        if require_success:
            self.wait_for(
                lambda: (self.metric(succeeded) or 0.0) > succeeded_before,
                timeout,
                f"{succeeded} did not advance after SIGHUP: the reload failed",
            )

    # -- clients

    def httpx_client(
        self, token: str | None = None, *, extra_ca: Iterable[Path | str] = (), **kwargs: Any
    ) -> httpx.Client:
        """An httpx client that uses this proxy (with `token`) and trusts its CA plus `extra_ca`."""
        proxy = self.proxy_url_for(token) if token is not None else self.proxy_url
        verify = trust(self.ca_cert_path, *extra_ca)
        kwargs.setdefault("timeout", 10.0)
        return httpx.Client(proxy=proxy, verify=verify, trust_env=False, **kwargs)

    def openai_client(
        self,
        token: str | None = None,
        *,
        http_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> openai.OpenAI:
        """The official OpenAI SDK set up the HTTPS_PROXY way: through this proxy (with `token`),
        trusting its CA. `options` go to `openai.OpenAI` (`api_key` defaults to the placeholder,
        `max_retries` to 0); `http_options` to its `httpx.Client`."""
        import openai

        http_client = httpx.Client(
            proxy=self.proxy_url_for(token) if token is not None else self.proxy_url,
            verify=trust(self.ca_cert_path),
            trust_env=False,
            **(http_options or {}),
        )
        options.setdefault("api_key", PLACEHOLDER_KEY)
        options.setdefault("max_retries", 0)
        return openai.OpenAI(http_client=http_client, **options)

    def anthropic_client(
        self,
        token: str | None = None,
        *,
        http_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> anthropic.Anthropic:
        """The official Anthropic SDK set up like `openai_client`; `api_key` defaults to the
        placeholder unless `auth_token` is given."""
        import anthropic

        # The anthropic SDK brings its own httpx fork; its DefaultHttpxClient is that.
        http_client = anthropic.DefaultHttpxClient(
            proxy=self.proxy_url_for(token) if token is not None else self.proxy_url,
            verify=trust(self.ca_cert_path),
            trust_env=False,
            **(http_options or {}),
        )
        if "api_key" not in options and "auth_token" not in options:
            options["api_key"] = PLACEHOLDER_KEY
        options.setdefault("max_retries", 0)
        return anthropic.Anthropic(http_client=http_client, **options)

    def raw_connect(self, target: str, proxy_auth: str | None = None) -> ConnectResponse:
        return raw_connect(self.proxy_host, self.proxy_port, target, proxy_auth)

    # -- internals

    def _child_env(self, extra: Mapping[str, str]) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if key.lower() not in _PROXY_VARIABLES and not key.startswith(_DROPPED_PREFIXES)
        }
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def _write_config(self, *, new_ports: bool = False) -> None:
        config = _yaml_ready(self._requested_config)
        if new_ports or "listen" not in config:
            config["listen"] = f"{LOOPBACK}:{free_port()}"
        if new_ports or "admin_listen" not in config:
            config["admin_listen"] = f"{LOOPBACK}:{free_port()}"
        config.setdefault("data_dir", str(self.workdir / "data"))
        config.setdefault("certs_dir", str(self.workdir / "certs"))
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def _start_once(self) -> None:
        command = [sys.executable, "-m", "aibridgeproxyd", "run", "--config", str(self.config_path)]
        with self.stdout_path.open("wb") as stdout, self.stderr_path.open("wb") as stderr:
            self._process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=self.env,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        process = self._process

        def ready() -> bool:
            if process.poll() is not None:
                raise DaemonStartError(
                    f"aibridgeproxyd exited with {process.returncode} before it was ready:\n"
                    f"{self.logs()[-4000:]}"
                )
            try:
                return self.admin_get("/readyz", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_until(ready, self.ready_timeout)
        except TimeoutError:
            self.stop()
            raise DaemonStartError(
                f"aibridgeproxyd not ready within {self.ready_timeout}s:\n{self.logs()[-4000:]}"
            ) from None
