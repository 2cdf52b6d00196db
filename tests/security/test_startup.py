"""Start-up failures of the real daemon (``python -m aibridgeproxyd run``): one line, exit code 2
for anything the configuration must fix, never a traceback, never mitmproxy's own hints.

Each case also runs a CLI command with the same configuration where the loader is what refuses:
a value that stops the daemon stops ``providers list`` too.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.harness import LOOPBACK, DaemonProcess, DaemonStartError

EXIT_CONFIG = 2


@pytest.fixture
def occupied_port() -> Iterator[int]:
    """A loopback port with a listening socket on it for the duration of the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _failed_start(config: dict[str, Any]) -> tuple[DaemonProcess, str]:
    """Start a daemon that must not come up; returns it (closed later by the caller) and its
    stderr."""
    daemon = DaemonProcess(config, ready_timeout=20)
    with pytest.raises(DaemonStartError):
        daemon.start()
    return daemon, daemon.stderr_path.read_text()


def _assert_one_clean_line(stderr: str, *fragments: str) -> str:
    assert "Traceback" not in stderr, stderr
    assert "Event loop is closed" not in stderr, stderr
    assert "--mode" not in stderr, stderr  # mitmproxy's option, not ours
    errors = [line for line in stderr.splitlines() if "ERROR" in line or "error:" in line]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_admin_port_in_use_is_one_line_naming_admin_listen_and_exit_2(occupied_port: int) -> None:
    daemon, stderr = _failed_start({"admin_listen": f"{LOOPBACK}:{occupied_port}"})
    try:
        assert daemon.returncode == EXIT_CONFIG
        _assert_one_clean_line(
            stderr,
            "cannot start: cannot listen on",
            f":{occupied_port} (admin_listen): address already in use",
            "--admin-listen",
        )
    finally:
        daemon.close()


def test_proxy_port_in_use_is_one_line_naming_listen_and_exit_2(occupied_port: int) -> None:
    daemon, stderr = _failed_start({"listen": f"{LOOPBACK}:{occupied_port}"})
    try:
        assert daemon.returncode == EXIT_CONFIG
        line = _assert_one_clean_line(
            stderr, f":{occupied_port} (listen): address already in use", "with --listen"
        )
        assert "--admin-listen" not in line
    finally:
        daemon.close()


@pytest.mark.parametrize(
    ("key", "flag"), [("listen", "--listen"), ("admin_listen", "--admin-listen")]
)
def test_address_not_on_this_machine_is_one_line_naming_the_flag(key: str, flag: str) -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never an address of this machine.
    daemon, stderr = _failed_start({key: "192.0.2.1:8888"})
    try:
        assert daemon.returncode == EXIT_CONFIG
        _assert_one_clean_line(stderr, f"cannot listen on 192.0.2.1:8888 ({key})", flag)
    finally:
        daemon.close()


def test_bad_upstream_no_proxy_refuses_run_and_providers_list_alike() -> None:
    config = {"upstream_proxy": "http://127.0.0.1:3128", "upstream_no_proxy": ["bad entry!"]}
    daemon, stderr = _failed_start(config)
    try:
        assert daemon.returncode == EXIT_CONFIG
        line = _assert_one_clean_line(stderr, "'upstream_no_proxy'", "'bad entry!'")
        listed = daemon.cli("providers", "list")
        assert listed.returncode == EXIT_CONFIG
        assert listed.stderr == line + "\n"
        assert not daemon.data_dir.exists()  # refused before anything was created
    finally:
        daemon.close()


def _listener_tls_cases(tmp_path: Path) -> list[tuple[dict[str, Any], str]]:
    leaf = trustme.CA().issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    wrong = tmp_path / "wrong.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(wrong))
    return [
        ({"tls_cert_file": junk, "tls_key_file": key}, "'tls_cert_file'"),
        ({"tls_cert_file": cert, "tls_key_file": junk}, "'tls_key_file'"),
        ({"tls_cert_file": cert, "tls_key_file": wrong}, "does not match"),
        ({"tls_cert_file": tmp_path / "absent.pem", "tls_key_file": key}, "cannot read"),
    ]


def test_bad_listener_tls_files_refuse_run_and_providers_list_alike(tmp_path: Path) -> None:
    for config, fragment in _listener_tls_cases(tmp_path):
        daemon, stderr = _failed_start(config)
        try:
            assert daemon.returncode == EXIT_CONFIG, stderr
            line = _assert_one_clean_line(stderr, fragment)
            listed = daemon.cli("providers", "list")
            assert (listed.returncode, listed.stderr) == (EXIT_CONFIG, line + "\n")
        finally:
            daemon.close()


def test_unusable_data_dir_is_one_line_naming_the_path(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    daemon, stderr = _failed_start({"certs_dir": not_a_directory / "certs"})
    try:
        assert daemon.returncode == 1  # not the configuration's syntax: the filesystem
        _assert_one_clean_line(stderr, "cannot start", str(not_a_directory))
    finally:
        daemon.close()


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        (
            {"AIBRIDGEPROXYD_LISTN": "127.0.0.1:1"},
            "unknown environment variable AIBRIDGEPROXYD_LISTN",
        ),
        ({"AIBRIDGEPROXYD_RETENTION": "60"}, "'retention' (AIBRIDGEPROXYD_RETENTION)"),
    ],
)
def test_environment_mistakes_refuse_to_start(environ: dict[str, str], fragment: str) -> None:
    daemon = DaemonProcess(env=environ)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "aibridgeproxyd", "run", "--config", str(daemon.config_path)],
            cwd=daemon.workdir,
            env=daemon.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == EXIT_CONFIG
        _assert_one_clean_line(result.stderr, fragment)
        assert not daemon.data_dir.exists()
    finally:
        daemon.close()


def test_config_file_that_is_not_utf8_is_one_line_naming_the_file() -> None:
    daemon = DaemonProcess()
    try:
        daemon.config_path.write_bytes(
            daemon.config_path.read_bytes() + "# café\n".encode("latin-1")
        )
        for command in (["run"], ["providers", "list"]):
            result = daemon.cli(*command)
            assert result.returncode == EXIT_CONFIG
            _assert_one_clean_line(result.stderr, str(daemon.config_path), "not UTF-8")
    finally:
        daemon.close()


def test_first_start_names_the_new_database_and_the_cli_prints_absolute_paths() -> None:
    # Relative paths, resolved against the daemon's working directory (the harness's workdir).
    with DaemonProcess({"data_dir": "data", "certs_dir": "certs"}) as daemon:
        workdir = daemon.workdir.resolve()  # what the daemon's getcwd() reports
        database = workdir / "data" / "aibridgeproxyd.db"
        assert f"created a new database {database}" in daemon.logs()
        printed = daemon.cli("ca", "path", check=True).stdout
        assert printed == f"{workdir / 'certs' / 'ca-cert.pem'}\n"
        listed = daemon.cli("providers", "list", check=True)
        assert listed.stderr == ""  # the database exists: nothing to announce
