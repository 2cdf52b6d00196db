"""Secrets at rest end to end (CONTRACT section 13): the real daemon and CLI sharing one data
directory, with the keys given by ``encryption_keys`` (YAML) or ``AIBRIDGEPROXYD_ENCRYPTION_KEYS``.

A provider added with the CLI routes traffic with its key while the database files never hold
it; a daemon whose keys do not include the one that sealed it refuses to start naming that
key id; ``keys rotate`` with a new first key lets the old key be removed.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from aibridgeproxyd.sealing import key_id
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, DaemonStartError

pytestmark = pytest.mark.usefixtures("clean_upstream")

KEY_ONE = bytes(range(32))
KEY_TWO = bytes(range(50, 82))
PROVIDER_KEY = "sk-e2e-SEALED-provider-key-0123456789"


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def database_bytes(data_dir: Path) -> bytes:
    """The database file and its -wal and -shm companions, as ``strings`` would read them."""
    return b"".join(
        path.read_bytes() for path in sorted(data_dir.glob("aibridgeproxyd.db*")) if path.is_file()
    )


def chat_through(daemon: DaemonProcess, token: str, upstream: FakeUpstream) -> str:
    """One chat completion through the daemon; the Authorization the upstream received."""
    client = daemon.openai_client(token)
    completion = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content
    (request,) = upstream.wait_for_requests(1)
    return str(request.headers["authorization"])


def test_keys_sealed_at_rest_refuse_an_unknown_key_and_rotate(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    data_dir, certs_dir = tmp_path / "data", tmp_path / "certs"
    base: dict[str, Any] = {
        "data_dir": data_dir,
        "certs_dir": certs_dir,
        "upstream_ca_file": upstream.ca_pem_path,
        "allowed_private_cidrs": ["127.0.0.0/8"],
        "reload_interval": "2s",
    }

    # 1. A provider added with the CLI routes with its key; the files never hold the key.
    with DaemonProcess({**base, "encryption_keys": [b64(KEY_ONE)]}) as daemon:
        daemon.cli("providers", "disable", "openai", check=True)
        daemon.cli(
            "providers", "add", "corp", "--type", "openai", "--base-url", upstream.base_url,
            "--key", PROVIDER_KEY, check=True,
        )  # fmt: skip
        token = daemon.create_token("alice")
        assert chat_through(daemon, token, upstream) == f"Bearer {PROVIDER_KEY}"
        assert PROVIDER_KEY.encode() not in database_bytes(data_dir)
        assert f"enc:v1:{key_id(KEY_ONE)}:".encode() in database_bytes(data_dir)
    assert PROVIDER_KEY.encode() not in database_bytes(data_dir)
    assert not (data_dir / "encryption.key").exists()  # keys came from the configuration
    upstream.reset()

    # 2. Without the key that sealed it: the CLI and the daemon refuse, naming its id.
    wrong = DaemonProcess({**base, "encryption_keys": [b64(KEY_TWO)]})
    try:
        listing = wrong.cli("providers", "list")
        assert listing.returncode == 1
        (line,) = listing.stderr.strip().splitlines()
        assert line.startswith("error: ") and key_id(KEY_ONE) in line
        with pytest.raises(DaemonStartError):
            wrong.start()
        assert wrong.returncode == 1
        refusals = [line for line in wrong.logs().splitlines() if "cannot start" in line]
        assert len(refusals) == 1 and key_id(KEY_ONE) in refusals[0], wrong.logs()[-2000:]
        assert "Traceback" not in wrong.logs()
    finally:
        wrong.close()

    # 3. keys rotate with a new first key (from the environment this time); then the old key
    # goes, and the daemon routes with the provider key as before.
    both = {"AIBRIDGEPROXYD_ENCRYPTION_KEYS": f"{b64(KEY_TWO)},{b64(KEY_ONE)}"}
    rotating = DaemonProcess(base, env=both)
    try:
        rotated = rotating.cli("keys", "rotate", check=True)
        assert f"with key {key_id(KEY_TWO)}" in rotated.stdout
    finally:
        rotating.close()
    data = database_bytes(data_dir)
    assert PROVIDER_KEY.encode() not in data and f"enc:v1:{key_id(KEY_ONE)}".encode() not in data
    with DaemonProcess({**base, "encryption_keys": [b64(KEY_TWO)]}) as daemon:
        assert chat_through(daemon, token, upstream) == f"Bearer {PROVIDER_KEY}"
        assert PROVIDER_KEY.encode() not in database_bytes(data_dir)


def test_without_encryption_keys_a_key_file_is_generated_and_used(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    config = {
        "data_dir": data_dir,
        "upstream_ca_file": upstream.ca_pem_path,
        "allowed_private_cidrs": ["127.0.0.0/8"],
    }
    with DaemonProcess(config) as daemon:
        daemon.edit_provider("openai", upstream.base_url, PROVIDER_KEY)
        token = daemon.create_token("bob")
        key_file = data_dir / "encryption.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = base64.b64decode(key_file.read_text())
        assert f"enc:v1:{key_id(key)}:".encode() in database_bytes(data_dir)
        assert chat_through(daemon, token, upstream) == f"Bearer {PROVIDER_KEY}"
        assert PROVIDER_KEY.encode() not in database_bytes(data_dir)


def test_a_rotation_to_a_key_a_running_daemon_lacks_is_refused_naming_it(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Newcomer review: a rotation the running daemons could not read would fail every later
    reload of theirs, so a token revoked meanwhile would keep working on them."""
    import httpx

    data_dir = tmp_path / "data"
    with DaemonProcess({"data_dir": data_dir}) as daemon:
        daemon.cli("providers", "edit", "openai", "--key", PROVIDER_KEY, check=True)
        admin = daemon.cli("admin-tokens", "create", "ops", "--role", "admin", check=True)
        headers = {"Authorization": f"Bearer {admin.stdout.strip()}"}
        old = (data_dir / "encryption.key").read_text().strip()
        daemon.env["AIBRIDGEPROXYD_ENCRYPTION_KEYS"] = f"{b64(KEY_TWO)},{old}"
        refused = daemon.cli("keys", "rotate")
        assert refused.returncode != 0
        assert f"pid {daemon.pid}" in refused.stderr and key_id(KEY_TWO) in refused.stderr
        answer = httpx.get(f"{daemon.admin_url}/api/v2/ai/providers/openai", headers=headers)
        assert answer.status_code == 200, answer.text  # nothing was sealed with the new key
        daemon.stop()
        daemon.start()  # now with both keys, the new one first
        rotated = daemon.cli("keys", "rotate", check=True)
        assert f"with key {key_id(KEY_TWO)}" in rotated.stdout
        answer = httpx.get(f"{daemon.admin_url}/api/v2/ai/providers/openai", headers=headers)
        assert answer.status_code == 200 and PROVIDER_KEY not in answer.text
        assert "Traceback" not in daemon.logs()


def test_a_provider_sealed_with_a_key_the_daemon_lacks_is_in_error_and_revocations_still_apply(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Attacker review: a CLI run with a newer key list than the running daemon's used to fail
    every later reload, so a token revoked afterwards kept working."""
    from tests.harness import basic_auth

    config = {"data_dir": tmp_path / "data", "encryption_keys": [b64(KEY_ONE)]}
    with DaemonProcess(config) as daemon:
        token = daemon.create_token("leaver")
        assert daemon.raw_connect("api.openai.com:443", basic_auth(token)).status_code == 200
        newer = {**daemon.env, "AIBRIDGEPROXYD_ENCRYPTION_KEYS": f"{b64(KEY_TWO)},{b64(KEY_ONE)}"}
        saved, daemon.env = daemon.env, newer
        daemon.cli("providers", "edit", "openai", "--key", PROVIDER_KEY, check=True)
        daemon.env = saved
        daemon.cli("tokens", "revoke", "leaver", check=True)
        # openai's row cannot be read now (its host is refused, fail closed); anthropic's
        # host still asks for a token, and the revoked one no longer passes.
        daemon.wait_for(
            lambda: (
                daemon.raw_connect("api.anthropic.com:443", basic_auth(token)).status_code == 407
            ),
            timeout=5.0,
        )
        listed = daemon.cli("providers", "list", "--json", check=False)
        assert PROVIDER_KEY not in listed.stdout + daemon.logs()
        assert key_id(KEY_TWO) in daemon.logs()  # the provider's error names the key
        assert daemon.admin_get("/readyz").status_code == 200
