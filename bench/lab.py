"""The lab: certificates, the upstream process, bare mitmdump and our daemon, side by side.

Everything listens on 127.0.0.1, lives in one temporary directory and is stopped by PID on exit.
Both proxies use the same MITM CA (EC P-256, like the daemon's generated one), so leaf
certificates and handshakes cost the same on both.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import trustme
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import LOOPBACK, Processes, clean_env, free_port, port_open, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
METRICS_PREFIX = "coder_aibridgeproxyd_"
CENTRAL_KEY_PLACEHOLDER = "aibridgeproxyd"
OPENAI_HOST = "api.openai.com"


def tool(name: str) -> str:
    """A console script of the running interpreter's environment (the repo's .venv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH")
    return found


@dataclass
class Target:
    """One way for the client to reach the upstream: direct, through mitmdump, or through ours."""

    name: str
    pid: int | None  # the proxy's PID, None for direct
    proxy_port: int | None
    origin: str  # what the client asks for: https://127.0.0.1:P or https://api.openai.com
    connect_to: str  # host:port in the CONNECT (for a proxy) or the TCP peer (direct)
    tls_host: str  # server_hostname for the TLS handshake
    verify: ssl.SSLContext
    api_key: str

    @property
    def proxy_url(self) -> str | None:
        return f"http://{LOOPBACK}:{self.proxy_port}" if self.proxy_port else None

    def headers(self, **extra: str) -> dict[str, str]:
        return {
            "authorization": f"Bearer {self.api_key}",
            "content-type": "application/json",
            **extra,
        }

    def async_client(self, connections: int = 10, timeout: float = 60.0) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(
            proxy=self.proxy_url,
            verify=self.verify,
            trust_env=False,
            timeout=timeout,
            limits=limits,
        )


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    config_path: Path
    config: dict[str, Any]
    stderr_path: Path
    admin: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    ready_seconds: float = 0.0
    _admin_client: httpx.Client | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def database_path(self) -> Path:
        return Path(self.config["data_dir"]) / "aibridgeproxyd.db"

    def admin_get(self, path: str) -> httpx.Response:
        # One plain-HTTP client for the admin listener: creating a client per call costs tens of
        # milliseconds (SSL context set-up) and would swamp the scrape time being measured.
        if self._admin_client is None:
            self._admin_client = httpx.Client(trust_env=False, timeout=30)
        return self._admin_client.get(self.admin + path)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        response = self.admin_get("/metrics")
        response.raise_for_status()
        samples = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    def metric(self, name: str, samples: Any = None) -> float | None:
        samples = self.metrics() if samples is None else samples
        values = [v for (n, _), v in samples.items() if n == METRICS_PREFIX + name]
        return sum(values) if values else None

    def log_size(self) -> int:
        return self.stderr_path.stat().st_size if self.stderr_path.exists() else 0

    def log_since(self, offset: int) -> str:
        with self.stderr_path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")

    def log_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "aibridgeproxyd", "--config", str(self.config_path), *args],
            env=self.env,
            # Not the repository root: ``-m`` puts the working directory first on sys.path.
            cwd=self.config_path.parent,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"aibridgeproxyd {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout


class Lab:
    """Starts the upstream, then (as asked) mitmdump and the daemon. A context manager: every
    process is stopped and the directory removed on exit, also after a failure."""

    def __init__(self, *, keep: bool = False, proxy_env: dict[str, str] | None = None) -> None:
        self.proxy_env = dict(proxy_env or {})  # extra environment for both proxies
        self.dir = Path(tempfile.mkdtemp(prefix="aibridgeproxyd-bench-"))
        self.keep = keep
        self.procs = Processes()
        self.targets: dict[str, Target] = {}
        self.daemon: Daemon | None = None  # the one in the side-by-side scenarios
        self.daemons: dict[str, Daemon] = {}
        self.mitmdump: subprocess.Popen[bytes] | None = None
        self.upstream: subprocess.Popen[bytes] | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self._certificates()
            self._start_upstream()
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
        if exc is not None and self.daemon is not None:
            print(f"--- daemon log tail ---\n{self.daemon.log_text()[-3000:]}", file=sys.stderr)
        self.close()

    def close(self) -> None:
        try:
            self.procs.stop_all()
        finally:
            if not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)

    # --- pieces -----------------------------------------------------------------------------

    def _certificates(self) -> None:
        self.upstream_ca = trustme.CA()  # ECDSA P-256
        server = self.upstream_ca.issue_cert(LOOPBACK, "localhost")
        self.upstream_ca_path = self.dir / "upstream-ca.pem"
        self.upstream_ca.cert_pem.write_to_path(str(self.upstream_ca_path))
        self.server_cert_path = self.dir / "upstream-cert.pem"
        self.server_key_path = self.dir / "upstream-key.pem"
        server.cert_chain_pems[0].write_to_path(str(self.server_cert_path))
        for extra in server.cert_chain_pems[1:]:
            extra.write_to_path(str(self.server_cert_path), append=True)
        server.private_key_pem.write_to_path(str(self.server_key_path))

        # One MITM CA for both proxies: the daemon gets it as ca_cert_file/ca_key_file, mitmdump
        # as confdir/mitmproxy-ca.pem (key + certificate).
        mitm_ca = trustme.CA(organization_name="aibridgeproxyd bench")
        self.mitm_ca_cert = self.dir / "mitm-ca-cert.pem"
        self.mitm_ca_key = self.dir / "mitm-ca-key.pem"
        mitm_ca.cert_pem.write_to_path(str(self.mitm_ca_cert))
        mitm_ca.private_key_pem.write_to_path(str(self.mitm_ca_key))
        self.mitmdump_confdir = self.dir / "mitmdump-conf"
        self.mitmdump_confdir.mkdir(mode=0o700)
        (self.mitmdump_confdir / "mitmproxy-ca.pem").write_bytes(
            mitm_ca.private_key_pem.bytes() + mitm_ca.cert_pem.bytes()
        )
        self.upstream_context = ssl.create_default_context(cafile=str(self.upstream_ca_path))
        self.mitm_context = ssl.create_default_context(cafile=str(self.mitm_ca_cert))

    def _start_upstream(self) -> None:
        env = clean_env({"PYTHONPATH": str(REPO_ROOT)})
        log = (self.dir / "upstream.log").open("wb")
        self.upstream = self.procs.start(
            "upstream",
            [
                sys.executable,
                "-m",
                "bench.upstream",
                "--cert",
                str(self.server_cert_path),
                "--key",
                str(self.server_key_path),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,  # closed by stop(): the upstream exits on EOF too
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        assert self.upstream.stdout is not None
        line = self.upstream.stdout.readline()
        if not line:
            raise RuntimeError("bench upstream exited before it was ready")
        info = json.loads(line)
        self.upstream_port = int(info["port"])
        self.bulk_port = int(info["bulk_port"])
        self.targets["direct"] = Target(
            name="direct",
            pid=None,
            proxy_port=None,
            origin=f"https://{LOOPBACK}:{self.upstream_port}",
            connect_to=f"{LOOPBACK}:{self.upstream_port}",
            tls_host=LOOPBACK,
            verify=self.upstream_context,
            api_key="k",
        )

    def start_mitmdump(self) -> Target:
        port = free_port()
        log = (self.dir / "mitmdump.log").open("wb")
        self.mitmdump = self.procs.start(
            "mitmdump",
            [
                tool("mitmdump"),
                "-q",
                "--listen-host",
                LOOPBACK,
                "-p",
                str(port),
                "--set",
                f"confdir={self.mitmdump_confdir}",
                "--set",
                f"ssl_verify_upstream_trusted_ca={self.upstream_ca_path}",
                # Tunnel (do not decrypt) the bulk port only, like ours does for a non-provider
                # host; everything else is MITM'd.
                "--set",
                rf"ignore_hosts=^127\.0\.0\.1:{self.bulk_port}$",
                "-s",
                str(BENCH_DIR / "stream_sse.py"),
            ],
            cwd=self.dir,
            env=clean_env(self.proxy_env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        process = self.mitmdump
        wait_until(lambda: process.poll() is not None or port_open(port), 30, "mitmdump listening")
        if process.poll() is not None:
            raise RuntimeError(
                "mitmdump exited: " + (self.dir / "mitmdump.log").read_text(errors="replace")
            )
        target = Target(
            name="mitmdump",
            pid=process.pid,
            proxy_port=port,
            origin=f"https://{LOOPBACK}:{self.upstream_port}",
            connect_to=f"{LOOPBACK}:{self.upstream_port}",
            tls_host=LOOPBACK,
            verify=self.mitm_context,
            api_key="k",
        )
        self.targets["mitmdump"] = target
        return target

    def start_daemon(
        self,
        name: str = "ours",
        *,
        before_start: Callable[[Daemon], None] | None = None,
        register: bool = True,
        code: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> Target:
        """Start an aibridgeproxyd with its own data directory; ``before_start`` may fill its
        database first. ``register`` makes it *the* daemon the side-by-side scenarios use (or,
        with ``code``, one more column beside it). ``code``: a source tree (``export_revision``)
        the daemon and its CLI run instead of the installed worktree; ``extra_env``: more
        environment for this daemon alone."""
        workdir = self.dir / name
        workdir.mkdir(exist_ok=True)
        config_path = workdir / "config.yaml"
        env = clean_env({**self.proxy_env, **(extra_env or {})})
        if code is not None:
            site = Path(__file__).resolve().parent / "base_code"
            env["PYTHONPATH"] = os.pathsep.join([str(site), str(code)])
            env["BENCH_BASE_CODE"] = str(code)
        for attempt in range(3):
            port, admin_port = free_port(), free_port()
            config: dict[str, Any] = {
                "listen": f"{LOOPBACK}:{port}",
                "admin_listen": f"{LOOPBACK}:{admin_port}",
                "data_dir": str(workdir / "data"),
                "certs_dir": str(workdir / "certs"),
                "ca_cert_file": str(self.mitm_ca_cert),
                "ca_key_file": str(self.mitm_ca_key),
                "upstream_ca_file": str(self.upstream_ca_path),
                "allowed_private_cidrs": ["127.0.0.0/8"],
                "allowed_ports": [443, self.upstream_port, self.bulk_port],
                "auth": "none",
                "log_level": "info",
                # Reloads happen only when the bench asks (SIGHUP) or writes (generation probe).
                "reload_interval": "1h",
            }
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            stderr_path = workdir / "stderr.log"
            daemon = Daemon(
                process=None,  # type: ignore[arg-type]
                config_path=config_path,
                config=config,
                stderr_path=stderr_path,
                admin=f"http://{LOOPBACK}:{admin_port}",
                port=port,
                env=env,
            )
            if attempt == 0:
                daemon.cli(
                    "providers",
                    "edit",
                    "openai",
                    "--base-url",
                    f"https://{LOOPBACK}:{self.upstream_port}/v1",
                    "--key",
                    "k",
                )
                if before_start is not None:
                    before_start(daemon)
            started = time.monotonic()
            with stderr_path.open("ab") as stderr:
                daemon.process = self.procs.start(
                    "aibridgeproxyd",
                    [sys.executable, "-m", "aibridgeproxyd", "run", "--config", str(config_path)],
                    cwd=workdir,
                    env=env,
                    stdout=stderr,
                    stderr=stderr,
                )
            try:
                wait_until(lambda d=daemon: self._ready(d), 60, "aibridgeproxyd ready")
            except (TimeoutError, RuntimeError) as error:
                self.procs.stop(daemon.process)
                if "address already in use" in daemon.log_text().lower() and attempt < 2:
                    continue
                raise RuntimeError(f"{error}\n{daemon.log_text()[-3000:]}") from None
            daemon.ready_seconds = time.monotonic() - started
            break
        self.daemons[name] = daemon
        target = Target(
            name=name,
            pid=daemon.pid,
            proxy_port=port,
            origin=f"https://{OPENAI_HOST}",
            connect_to=f"{OPENAI_HOST}:443",
            tls_host=OPENAI_HOST,
            verify=self.mitm_context,
            api_key=CENTRAL_KEY_PLACEHOLDER,
        )
        if code is not None:
            self.targets[name] = target
        elif register:
            self.daemon = daemon
            self.targets[name] = target
        return target

    def export_revision(self, revision: str) -> Path:
        """The repository's tree at ``revision`` (``git archive``), for ``start_daemon(code=)``:
        an A/B of two revisions in one run, each daemon on its own code."""
        root = Path(__file__).resolve().parent.parent
        out = self.dir / "base-code"
        out.mkdir()
        archive = subprocess.run(
            ["git", "archive", "--format=tar", revision],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
        return out

    def stop_daemon(self, name: str) -> None:
        daemon = self.daemons.pop(name)
        self.procs.stop(daemon.process)

    @staticmethod
    def _ready(daemon: Daemon) -> bool:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"aibridgeproxyd exited with {daemon.process.returncode}")
        try:
            return (
                httpx.get(daemon.admin + "/readyz", timeout=1, trust_env=False).status_code == 200
            )
        except httpx.TransportError:
            return False

    def upstream_stats(self) -> dict[str, int]:
        response = httpx.get(
            f"https://{LOOPBACK}:{self.upstream_port}/stats",
            verify=self.upstream_context,
            trust_env=False,
        )
        return dict(response.json())

    def release_held_streams(self) -> None:
        httpx.post(
            f"https://{LOOPBACK}:{self.upstream_port}/release",
            verify=self.upstream_context,
            trust_env=False,
        ).raise_for_status()


def settle(seconds: float) -> None:
    """Let the box calm down between measurements (not synchronisation)."""
    time.sleep(seconds)
