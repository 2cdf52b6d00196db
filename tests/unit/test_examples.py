"""The files in examples/ are valid: the config loads, the alert rules and the dashboard only use
metrics the daemon exports, the systemd unit drains longer than the daemon does, and the
workspace snippet sets the proxy and CA variables every runtime reads.

When promtool is installed (Debian: ``apt-get install prometheus``), the alert rules are also
checked and unit-tested by it (tests/promtool/prometheus-alerts.test.yaml).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from aibridgeproxyd.config import Config, load_config, parse_duration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PROMTOOL_TESTS = ROOT / "tests" / "promtool" / "prometheus-alerts.test.yaml"

PREFIX = "coder_aibridgeproxyd_"
# The metrics the examples read, without the prefix (README.md#metrics lists every metric).
COUNTERS_AND_GAUGES = {
    "provider_info",
    "providers_last_reload_timestamp_seconds",
    "providers_last_reload_success_timestamp_seconds",
    "connect_sessions_total",
    "mitm_requests_total",
    "inflight_mitm_requests",
    "mitm_responses_total",
    "tokens_total",
    "cost_micros_total",
    "unpriced_token_usage_records_total",
    "blocked_connections_total",
    "proxy_auth_failures_total",
    "interception_records_dropped_total",
}
HISTOGRAMS = {"upstream_ttfb_seconds", "upstream_duration_seconds"}
FAMILIES = {PREFIX + name for name in COUNTERS_AND_GAUGES | HISTOGRAMS}
SERIES = {PREFIX + name for name in COUNTERS_AND_GAUGES} | {
    PREFIX + name + suffix for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}
# Series Prometheus itself adds to every target.
BUILTIN_SERIES = {"up"}
# Read by the alerts only: per-user series, not a dashboard panel.
ALERT_ONLY_SERIES = {PREFIX + "policy_budget_used_ratio"}

_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (functions, label names and keywords removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word = match.group()
        if expr[match.end() :].lstrip().startswith("(") or word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def family(series: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series[: -len(suffix)] in FAMILIES:
            return series[: -len(suffix)]
    return series


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, provider) (rate(coder_aibridgeproxyd_upstream_ttfb_"
        'seconds_bucket{instance=~"$instance", code=~"5.."}[$__rate_interval]))) > 1 and on '
        "(instance) up == 0 or vector(0)"
    )
    assert metric_names(expr) == {PREFIX + "upstream_ttfb_seconds_bucket", "up"}


# --- config.yaml ---------------------------------------------------------------------------------


def test_example_config_loads_and_spells_out_every_key_with_its_default() -> None:
    path = EXAMPLES / "config.yaml"
    assert load_config(path, environ={}) == load_config(environ={})
    keys = set(yaml.safe_load(path.read_text()))
    assert keys == {field.name for field in dataclasses.fields(Config)}


def test_every_example_config_key_is_annotated() -> None:
    lines = (EXAMPLES / "config.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^[a-z_]+:", line):
            above = lines[index - 1] if index else ""
            assert above.startswith("#") or "#" in line, f"no comment for {line!r}"


# --- prometheus-alerts.yaml ----------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((EXAMPLES / "prometheus-alerts.yaml").read_text())
    assert isinstance(document, dict) and set(document) == {"groups"}
    rules = []
    for group in document["groups"]:
        assert isinstance(group["name"], str) and group["name"]
        assert group["rules"], f"group {group['name']} has no rules"
        rules.extend(group["rules"])
    return rules


def test_alert_rules_are_well_formed() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert set(rule["annotations"]) == {"summary", "description"}
        assert all(text.strip() for text in rule["annotations"].values())


def test_alert_rules_use_only_metrics_the_daemon_exports() -> None:
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        unknown = names - SERIES - BUILTIN_SERIES - ALERT_ONLY_SERIES
        assert not unknown, f"{rule['alert']} uses unknown metrics {unknown}"


def test_alert_rules_include_the_seed_alerts() -> None:
    expressions = {rule["alert"]: " ".join(rule["expr"].split()) for rule in alert_rules()}
    assert (
        'coder_aibridgeproxyd_provider_info{status="error"}'
        in expressions["AIBridgeProxyProviderError"]
    )
    assert (
        "( coder_aibridgeproxyd_providers_last_reload_timestamp_seconds - "
        "coder_aibridgeproxyd_providers_last_reload_success_timestamp_seconds ) > 300"
    ) in expressions["AIBridgeProxyProviderReloadFailing"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_and_unit_tests_the_alert_rules() -> None:
    checked = subprocess.run(
        ["promtool", "check", "rules", str(EXAMPLES / "prometheus-alerts.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        ["promtool", "test", "rules", PROMTOOL_TESTS.name],
        cwd=PROMTOOL_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_promtool_unit_test() -> None:
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in alert_rules()}


# --- grafana-dashboard.json ----------------------------------------------------------------------


def dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    targets = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            targets.append((panel["title"], target["expr"]))
    return targets


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "instance", "provider"} <= variables
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_dashboard_uses_only_exported_metrics_and_shows_all_of_them() -> None:
    used = set()
    for title, expr in dashboard_targets():
        names = metric_names(expr)
        unknown = names - SERIES
        assert not unknown, f"panel {title!r} uses unknown metrics {unknown}"
        used |= {family(name) for name in names}
    assert used == FAMILIES


# --- aibridgeproxyd.service ----------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """systemd directives: repeated keys kept, backslash continuations joined."""
    text = (EXAMPLES / "aibridgeproxyd.service").read_text().replace("\\\n", " ")
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value.strip())
    return settings


def test_systemd_unit_is_hardened_and_outlasts_the_drain() -> None:
    settings = unit_settings()
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["KillSignal"] == ["SIGTERM"]
    assert "kill -HUP $MAINPID" in settings["ExecReload"][0]
    # systemd must not SIGKILL streams that are still draining.
    assert parse_duration(settings["TimeoutStopSec"][0]) > Config().drain_timeout
    # The data directory given to the daemon is the writable one; the CA lives inside it.
    exec_start = settings["ExecStart"][0].split()
    data_dir = exec_start[exec_start.index("--data-dir") + 1]
    writable = settings["ReadWritePaths"][0].split()
    assert data_dir in writable
    environment = dict(value.split("=", 1) for value in settings["Environment"])
    assert environment["AIBRIDGEPROXYD_CERTS_DIR"].startswith(data_dir + "/")
    assert exec_start[exec_start.index("--config") + 1].startswith("/etc/aibridgeproxyd/")


# --- workspace snippet ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_workspace_profile_sets_the_proxy_and_every_runtime_trust_variable(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "aibridgeproxyd.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    script = EXAMPLES / "workspace" / "proxy-env.sh"
    result = subprocess.run(
        ["sh", "-c", f". {script} && env"],
        env={
            "PATH": "/usr/bin:/bin",
            "AIBRIDGE_PROXY_TOKEN": "abp_token",
            "AIBRIDGE_PROXY_ADDR": "proxy.internal:8888",
            "AIBRIDGE_PROXY_CA": str(ca),
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    environment = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert environment["HTTPS_PROXY"] == "http://workspace:abp_token@proxy.internal:8888"
    assert environment["https_proxy"] == environment["HTTPS_PROXY"]
    assert environment["NODE_EXTRA_CA_CERTS"] == str(ca)
    if Path("/etc/ssl/certs/ca-certificates.crt").exists():
        # Replacing variables point at the full system bundle, never at the proxy CA alone.
        for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            assert environment[name] == "/etc/ssl/certs/ca-certificates.crt"


def test_workspace_profile_without_a_token_sets_no_proxy() -> None:
    script = EXAMPLES / "workspace" / "proxy-env.sh"
    result = subprocess.run(
        ["sh", "-c", f". {script} && env"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "HTTPS_PROXY=" not in result.stdout


def test_dockerfile_snippet_trusts_the_ca_system_wide_and_per_runtime() -> None:
    text = (EXAMPLES / "workspace" / "Dockerfile.snippet").read_text()
    assert "update-ca-certificates" in text
    assert "/usr/local/share/ca-certificates/aibridgeproxyd.crt" in text
    for name in ("NODE_EXTRA_CA_CERTS", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        assert f"{name}=" in text
    assert "/etc/profile.d/aibridgeproxyd.sh" in text
    # The proxy token belongs to the running workspace, never to an image layer.
    assert "AIBRIDGE_PROXY_TOKEN=" not in text
