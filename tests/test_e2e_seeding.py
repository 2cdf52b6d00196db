"""End to end: one-time seeding from CODER_AI_GATEWAY_PROVIDER_* with the real daemon. The first
start seeds and routes with the seeded key, a second start changes nothing, a differing
environment refuses to start until the printed command resolves it, a deleted row is never
recreated, and a bad variable refuses to start naming it. Keys never reach the logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, DaemonStartError

P = "CODER_AI_GATEWAY_PROVIDER_"
SEEDED_KEYS = ("sk-SEEDED-one", "sk-SEEDED-two")
ROTATED_KEY = "sk-ROTATED-three"
AWS_SECRET = "aws-SEEDED-secret"
SECRETS = (*SEEDED_KEYS, ROTATED_KEY, AWS_SECRET)


def seed_environment(base_url: str, keys: str) -> dict[str, str]:
    return {
        f"{P}0_TYPE": "openai",
        f"{P}0_NAME": "corp",
        f"{P}0_BASE_URL": base_url,
        f"{P}0_KEYS": keys,
        f"{P}1_TYPE": "bedrock",
        f"{P}1_BEDROCK_REGION": "us-east-1",
        f"{P}1_BEDROCK_ACCESS_KEY": "AKIAEXAMPLE",
        f"{P}1_BEDROCK_ACCESS_KEY_SECRET": AWS_SECRET,
        f"{P}1_BEDROCK_MODEL": "anthropic.claude-sonnet-4-5",
    }


def listed(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    result = daemon.cli("providers", "list", "--json", check=True)
    return {row["name"]: row for row in json.loads(result.stdout)}


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def test_first_start_seeds_and_routes_and_a_second_start_changes_nothing(
    upstream: FakeUpstream,
) -> None:
    environ = seed_environment(upstream.base_url, ",".join(SEEDED_KEYS))
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path}, env=environ) as daemon:
        logs = daemon.logs()
        assert f"seeding providers from {P}* environment variables is deprecated" in logs
        assert f"seeded provider 'corp' from {P}0_*" in logs
        first = listed(daemon)
        assert set(first) == {"corp", "bedrock"}  # the seeds replace the default providers
        assert first["corp"]["key_count"] == 2
        assert first["corp"]["base_url"] == upstream.base_url
        assert first["bedrock"]["status"] == "enabled"
        assert first["bedrock"]["settings"]["region"] == "us-east-1"

        token = daemon.create_token("alice")
        with daemon.httpx_client(token, extra_ca=[upstream.ca_pem_path]) as client:
            response = client.post(
                "https://api.openai.com/v1/chat/completions",
                headers={"authorization": "Bearer aibridgeproxyd"},
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert response.status_code == 200, response.text
        (request,) = upstream.requests
        assert request.headers["authorization"] == f"Bearer {SEEDED_KEYS[0]}"

        daemon.stop()
        daemon.start()
        assert listed(daemon) == first  # same rows, same updated_at
        logs += daemon.logs()
        assert "seeded provider" not in daemon.logs()
        assert "is deprecated" in daemon.logs()  # said again while the variables remain
        assert_no_secrets(logs, json.dumps(first))


def test_drift_refuses_to_start_until_resolved_and_a_deleted_row_stays_deleted() -> None:
    daemon = DaemonProcess(env=seed_environment("https://llm.corp.example/v1", SEEDED_KEYS[0]))
    try:
        daemon.cli("providers", "list", check=True)  # the CLI seeds like the daemon does

        # An operator "rotates" the key in the deployment's environment.
        daemon.env[f"{P}0_KEYS"] = f"{SEEDED_KEYS[0]},{ROTATED_KEY}"
        with pytest.raises(DaemonStartError):
            daemon.start()
        assert daemon.returncode == 2  # configuration errors exit 2, as in the CLI
        logs = daemon.logs()
        (error,) = [line for line in logs.splitlines() if "cannot start" in line]
        assert f"{P}0_* differs from the stored provider 'corp' (keys)" in error
        assert f"remove the {P}* variables to keep the stored provider" in error
        assert "aibridgeproxyd providers edit corp" in error
        assert_no_secrets(logs)

        # The CLI still runs (with a warning), so the printed command resolves the drift.
        (command,) = re.findall(r"`([^`]+)`", error)
        resolved = run_in_shell(daemon, f"{command} --config {daemon.config_path}")
        assert resolved.returncode == 0, resolved.stderr
        assert f"{P}0_* differs from the stored provider 'corp'" in resolved.stderr
        assert_no_secrets(resolved.stdout, resolved.stderr)
        daemon.cli("providers", "delete", "bedrock", check=True)

        daemon.start()
        assert f"provider 'bedrock' from {P}1_* was deleted by an operator" in daemon.logs()
        rows = listed(daemon)
        assert set(rows) == {"corp"}
        assert rows["corp"]["key_count"] == 2
        assert_no_secrets(daemon.logs())
    except BaseException:
        print(f"--- aibridgeproxyd logs ---\n{daemon.logs()[-8000:]}", file=sys.stderr)
        raise
    finally:
        daemon.close()


def test_bad_environment_refuses_to_start_naming_the_variable() -> None:
    environ = {f"{P}0_TYPE": "openai", f"{P}2_TYPE": "anthropic", f"{P}2_KEY": SEEDED_KEYS[0]}
    daemon = DaemonProcess(env=environ)
    try:
        with pytest.raises(DaemonStartError):
            daemon.start()
        assert daemon.returncode == 2  # configuration errors exit 2, as in the CLI
        expected = (
            f"invalid environment variable {P}2_KEY: provider indices start at 0 and are "
            f"contiguous, but no {P}1_* variable is set"
        )
        assert f"cannot start: {expected}" in daemon.logs()
        cli = daemon.cli("providers", "list")
        assert (cli.returncode, cli.stderr) == (2, f"error: {expected}\n")
        assert not (daemon.data_dir / "aibridgeproxyd.db").exists()
        assert_no_secrets(daemon.logs(), cli.stderr)
    finally:
        daemon.close()


def run_in_shell(daemon: DaemonProcess, command: str) -> subprocess.CompletedProcess[str]:
    """Run a command line as an operator would: a shell with the daemon's environment, and the
    ``aibridgeproxyd`` console script of this interpreter on PATH."""
    environ = dict(daemon.env)
    environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")])
    return subprocess.run(
        ["sh", "-c", command],
        cwd=daemon.workdir,
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
