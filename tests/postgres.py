"""A real PostgreSQL server for the test suite: one per session, a fresh database per test.

    def test_something(postgres_url: str) -> None:          # a new empty database, dropped after
        daemon = DaemonProcess({"database_url": postgres_url})

    def test_restart(postgres_server: PostgresServer) -> None:
        url = postgres_server.create_database()
        postgres_server.restart(downtime_seconds=2.0)    # stop (fast), wait, start on the same port
        with postgres_server.stopped():                  # down inside the block, up again after
            ...

The server is Debian's PostgreSQL (package ``postgresql``: ``/usr/lib/postgresql/<major>/bin``,
else ``initdb``/``pg_ctl`` on PATH). ``initdb`` writes a cluster into a temporary directory with
``--auth=trust``; the server listens on 127.0.0.1 only, on a free port, with its Unix socket in that
directory and ``fsync=off`` (a test database need not survive a power cut). PostgreSQL refuses to
run as root, so under root the server runs as the ``postgres`` user (``runuser``) and the directory
belongs to it. The server stops at the end of the session, whatever the outcome, and at interpreter
exit as a last resort.

Without PostgreSQL the fixtures skip with the reason, except under CI (``CI=true``), where
``.ci/run`` installs it and its absence fails the run.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from tests.harness import LOOPBACK, free_port

SUPERUSER = "postgres"
# Settings for speed and isolation; a test database is thrown away, so durability is not needed.
_SERVER_SETTINGS = {
    "listen_addresses": f"'{LOOPBACK}'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}
_START_TIMEOUT_SECONDS = 30
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresUnavailable(RuntimeError):
    """No usable PostgreSQL on this machine (binaries missing, or no ``postgres`` user under root)."""


def find_bin_dir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``psql``: the newest Debian major version
    under /usr/lib/postgresql, else wherever PATH finds ``pg_ctl``.

    Raises PostgresUnavailable when neither has all three programs.
    """
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for candidate in candidates:
        if all((Path(candidate) / name).is_file() for name in ("initdb", "pg_ctl", "psql")):
            return Path(candidate)
    raise PostgresUnavailable(
        "PostgreSQL is not installed (no initdb/pg_ctl/psql in /usr/lib/postgresql/*/bin or on "
        "PATH); install Debian's postgresql package (apt-get install postgresql)"
    )


def _run_as() -> list[str]:
    """The command prefix that runs a server program as a non-root user: ``runuser -u postgres --``
    under root, nothing otherwise. Raises PostgresUnavailable under root without that user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError as error:
        raise PostgresUnavailable(
            "running as root, and PostgreSQL refuses root, but there is no 'postgres' user"
        ) from error
    return ["runuser", "-u", SUPERUSER, "--"]


def _clean_environment() -> dict[str, str]:
    """This process's environment without PG* variables, so a developer's PGHOST, PGPORT or
    PGDATA cannot point the test programs elsewhere; messages in English (LC_ALL=C)."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    environment["LC_ALL"] = "C"
    return environment


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, listening on ``host``:``port``.

    ``start()`` runs initdb on first use; ``stop()``/``start()`` and ``restart()`` take the same
    cluster down and up again on the same port (databases and data survive), for tests of a
    database outage. ``close()`` stops it and removes the directory. Raises PostgresUnavailable
    (no binaries) or RuntimeError (initdb or pg_ctl failed, with their output) from start().
    """

    def __init__(self) -> None:
        self.bin_dir = find_bin_dir()
        self.host = LOOPBACK
        self.port = 0
        self.user = SUPERUSER
        self._run_as = _run_as()
        self._root = Path(tempfile.mkdtemp(prefix="aibridgeproxyd-pg-"))
        self._data = self._root / "data"
        self._log = self._root / "server.log"
        self._initialised = False
        self.running = False
        if self._run_as:
            shutil.chown(self._root, user=SUPERUSER, group=SUPERUSER)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server (initdb first, the first time) and wait until it accepts connections.
        A port taken in the meantime is retried on another port, before the first start only."""
        if self.running:
            return
        if not self._initialised:
            self._initdb()
        # Before the first start a port taken meanwhile is retried on another; later, the same
        # port is kept (clients reconnect to where the database was).
        for _attempt in range(1 if self._started_once else 3):
            if not self._started_once:
                self.port = free_port()
            if self._pg_ctl_start():
                self.running = self._started_once = True
                return
        raise RuntimeError(f"PostgreSQL did not start; its log:\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server. ``mode`` is pg_ctl's: "fast" (clients are disconnected, a clean
        shutdown), "immediate" (as a crash: no checkpoint) or "smart" (waits for clients)."""
        if not self.running:
            return
        self._pg_ctl("stop", "-m", mode, "-w", "-t", str(_START_TIMEOUT_SECONDS))
        self.running = False

    def restart(self, downtime_seconds: float = 0.0, mode: str = "fast") -> None:
        """Stop the server, stay down ``downtime_seconds`` (seconds), start it on the same port."""
        self.stop(mode)
        time.sleep(downtime_seconds)  # the outage a test asked for, not synchronisation
        self.start()

    @contextlib.contextmanager
    def stopped(self, mode: str = "fast") -> Iterator[None]:
        """Down inside the ``with`` block, started again on leaving it (even on an exception)."""
        self.stop(mode)
        try:
            yield
        finally:
            self.start()

    def close(self) -> None:
        """Stop the server (immediately: nothing of it is kept) and remove its directory."""
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self._root, ignore_errors=True)

    # --- databases ----------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:PORT/<database>`` (no password: trust on loopback)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (from template0; a unique name unless given) and return its
        URL. Raises ValueError for a name that is not a plain lower-case identifier."""
        name = name or f"test_{uuid.uuid4().hex[:16]}"
        _check_identifier(name)
        self.psql(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop the database if it exists, disconnecting its clients first (WITH (FORCE))."""
        _check_identifier(name)
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql as the superuser; return its unaligned, tuples-only output
        (one row a line, columns separated by ``|``). Raises RuntimeError with psql's message."""
        command = [str(self.bin_dir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-A", "-t"]
        command += ["-h", self.host, "-p", str(self.port), "-U", self.user, "-d", database]
        result = subprocess.run(
            [*command, "-c", sql],
            capture_output=True,
            text=True,
            env=_clean_environment(),
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed ({sql!r}): {result.stderr.strip()}")
        return result.stdout

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log (for failure messages)."""
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    # --- internals ----------------------------------------------------------------------------

    _started_once = False

    def _initdb(self) -> None:
        """Create the cluster: trust authentication, UTF-8, C locale, no fsync during initdb."""
        self._server_command(
            "initdb",
            "-D",
            str(self._data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        settings = {**_SERVER_SETTINGS, "unix_socket_directories": f"'{self._root}'"}
        with (self._data / "postgresql.conf").open("a") as conf:
            conf.write("\n# aibridgeproxyd tests\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self._initialised = True

    def _pg_ctl_start(self) -> bool:
        """``pg_ctl start`` on ``self.port``, waiting until ready; False if it did not start."""
        try:
            self._pg_ctl(
                "start", "-w", "-t", str(_START_TIMEOUT_SECONDS), "-l", str(self._log),
                "-o", f"-p {self.port}",
            )  # fmt: skip
        except RuntimeError:
            return False
        return True

    def _pg_ctl(self, *arguments: str) -> None:
        self._server_command("pg_ctl", "-D", str(self._data), *arguments)

    def _server_command(self, program: str, *arguments: str) -> None:
        """Run a server program (as ``postgres`` under root); RuntimeError with its output."""
        command = [*self._run_as, str(self.bin_dir / program), *arguments]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=_clean_environment(),
            cwd=self._root,
            timeout=_START_TIMEOUT_SECONDS + 30,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise RuntimeError(f"{program} {arguments[0]} failed: {output}")


def _check_identifier(name: str) -> None:
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"not a plain database name (a-z, 0-9, _; 63 at most): {name!r}")


def _unavailable(reason: str) -> NoReturn:
    """Skip the test for ``reason``; under CI (CI=true), where .ci/run installs PostgreSQL,
    fail it instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required under CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server, started once (initdb takes 2-3 s) and stopped at the end.

    A test that stops it must start it again (``stopped()`` and ``restart()`` do) or later tests
    will fail to connect."""
    try:
        server = PostgresServer()
    except PostgresUnavailable as error:
        _unavailable(str(error))
    atexit.register(server.close)
    try:
        server.start()
        yield server
    finally:
        server.close()
        atexit.unregister(server.close)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh empty database for this test, ``postgresql://postgres@127.0.0.1:PORT/NAME``;
    dropped afterwards (with any connection still open to it)."""
    postgres_server.start()  # an earlier test may have left it stopped
    url = postgres_server.create_database()
    yield url
    if postgres_server.running:
        postgres_server.drop_database(url.rsplit("/", 1)[1])
