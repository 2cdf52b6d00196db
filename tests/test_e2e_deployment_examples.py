"""The deployment examples' settings start a real daemon: the Kubernetes ConfigMap's config file
with the Secret's variables, and the Compose replicas' environment, each run through
`aibridgeproxyd migrate` first, as the examples do, then `run` until /readyz and /healthz answer
200, and a proxy token made with the CLI is what opens a provider host's CONNECT.

The listen addresses and directories are the harness's (free loopback ports, a temporary
directory) instead of the examples' 0.0.0.0 and container paths. The database is a fresh
PostgreSQL database (tests/postgres.py) once the configuration knows ``database_url``, the
embedded SQLite file before that.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
import yaml

from aibridgeproxyd.config import _PARSERS
from tests.harness import DaemonProcess, basic_auth
from tests.unit.test_deployment_examples import (
    ENV_PREFIX,
    REPLICAS,
    compose_environment,
    kubernetes_documents,
)

# Settings the harness gives every daemon (free loopback ports, its temporary directory).
_HARNESS_KEYS = {"listen", "admin_listen", "data_dir", "certs_dir"}


def _database_url(request: pytest.FixtureRequest) -> dict[str, str]:
    """AIBRIDGEPROXYD_DATABASE_URL of a fresh PostgreSQL database, when the configuration has
    the key; nothing (SQLite in the daemon's data directory) otherwise."""
    if "database_url" not in _PARSERS:
        return {}
    return {ENV_PREFIX + "DATABASE_URL": request.getfixturevalue("postgres_url")}


def kubernetes_settings() -> tuple[dict[str, Any], dict[str, str]]:
    """The ConfigMap's config (minus the harness's keys and keys not known yet) and the
    variables the Deployment takes from the Secret, with a real encryption key."""
    config = yaml.safe_load(kubernetes_documents()["ConfigMap"]["data"]["config.yaml"])
    config = {k: v for k, v in config.items() if k in _PARSERS and k not in _HARNESS_KEYS}
    key = base64.b64encode(os.urandom(32)).decode()
    return config, {ENV_PREFIX + "ENCRYPTION_KEYS": key}


def compose_settings() -> tuple[dict[str, Any], dict[str, str]]:
    """No config file; a Compose replica's environment minus the harness's keys (its
    DATABASE_URL names the Compose network's host: the test's own database replaces it)."""
    environment = compose_environment(REPLICAS[0])
    dropped = {ENV_PREFIX + key.upper() for key in _HARNESS_KEYS} | {ENV_PREFIX + "DATABASE_URL"}
    return {}, {name: value for name, value in environment.items() if name not in dropped}


@pytest.mark.parametrize("settings", [kubernetes_settings, compose_settings])
def test_example_settings_migrate_then_serve(settings: Any, request: pytest.FixtureRequest) -> None:
    config, env = settings()
    env |= _database_url(request)
    daemon = DaemonProcess(config, env)
    try:
        migrated = daemon.cli("migrate", check=True)
        assert "the latest" in migrated.stdout
        daemon.start()
        assert daemon.admin_get("/readyz").status_code == 200
        assert daemon.admin_get("/healthz").status_code == 200
        assert daemon.admin_get("/ca-cert.pem").text.startswith("-----BEGIN CERTIFICATE-----")
        assert daemon.raw_connect("api.openai.com:443").status_code == 407
        token = daemon.create_token("alice")
        answer = daemon.raw_connect("api.openai.com:443", proxy_auth=basic_auth(token))
        assert answer.status_code == 200
    finally:
        daemon.close()
