"""The deployment examples fit together and fit the daemon: examples/docker-compose.yaml (two
replicas, PostgreSQL, Prometheus), examples/prometheus.yml, examples/kubernetes/ and the
Dockerfile. Each file is loaded as YAML and its structure checked: replica counts, probes on the
admin listener's real paths and port, Secret keys the Deployment reads, environment variables that
are real configuration keys with values the daemon accepts, migrations before the daemons.

``docker compose config`` and ``kubectl kustomize`` also check them when those tools are here.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from aibridgeproxyd.config import _PARSERS, Config, load_config, parse_duration, parse_host_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
KUBERNETES = EXAMPLES / "kubernetes"
ENV_PREFIX = "AIBRIDGEPROXYD_"
# Configuration keys of CONTRACT section 14 that other branches add to config._PARSERS; once
# merged they are checked like every other key.
SCALE_OUT_KEYS = {"database_url", "workers"}
CONFIG_KEYS = set(_PARSERS) | SCALE_OUT_KEYS
REPLICAS = ("aibridgeproxyd-1", "aibridgeproxyd-2")
# What `docker compose` would take from examples/.env when interpolating.
SAMPLE_ENV = {
    "POSTGRES_PASSWORD": "0123456789abcdef",
    "AIBRIDGEPROXYD_ENCRYPTION_KEYS": base64.b64encode(bytes(range(32))).decode(),
}
_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")


def interpolate(value: str) -> str:
    """Compose's ``${NAME}``, ``${NAME:?message}`` and ``${NAME:-default}``, from SAMPLE_ENV."""
    return _INTERPOLATION.sub(lambda match: SAMPLE_ENV[match["name"]], value)


def compose() -> dict[str, Any]:
    document = yaml.safe_load((EXAMPLES / "docker-compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def compose_environment(service: str) -> dict[str, str]:
    environment = compose()["services"][service].get("environment", {})
    assert isinstance(environment, dict), f"{service}: environment as a mapping"
    return {name: interpolate(str(value)) for name, value in environment.items()}


def kubernetes_documents() -> dict[str, dict[str, Any]]:
    """Every manifest of examples/kubernetes/, by kind (one object of each kind)."""
    documents: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in documents, f"two {document['kind']} manifests"
            documents[document["kind"]] = document
    return documents


def configmap_config(tmp_path: Path) -> Config:
    """The ConfigMap's config.yaml loaded by the daemon's own loader (keys another branch adds are
    left out until config._PARSERS knows them)."""
    text = kubernetes_documents()["ConfigMap"]["data"]["config.yaml"]
    settings = yaml.safe_load(text)
    assert set(settings) <= CONFIG_KEYS, set(settings) - CONFIG_KEYS
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in settings.items() if k in _PARSERS}))
    return load_config(path, environ={})


def check_environment_variable(name: str, value: str | None) -> None:
    """``name`` is AIBRIDGEPROXYD_<KEY> for a real key; a literal value is one the key accepts."""
    assert name.startswith(ENV_PREFIX), name
    key = name.removeprefix(ENV_PREFIX).lower()
    assert name == ENV_PREFIX + key.upper()
    assert key in CONFIG_KEYS, f"{name}: no configuration key {key!r}"
    if value is not None and key in _PARSERS:
        _PARSERS[key](value)  # raises ValueError for a value the daemon refuses


def deployment_pod() -> dict[str, Any]:
    return kubernetes_documents()["Deployment"]["spec"]["template"]["spec"]


def daemon_container() -> dict[str, Any]:
    (container,) = deployment_pod()["containers"]
    return container


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or a Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


# --- docker-compose.yaml -------------------------------------------------------------------------


def test_compose_runs_two_replicas_on_postgres_after_one_migration() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "migrate", *REPLICAS, "prometheus"}
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    for replica in REPLICAS:
        assert services[replica]["command"] == ["run"]
        condition = services[replica]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully"
        assert services[replica]["image"] == services["migrate"]["image"]


def test_compose_replicas_share_one_database_url_and_the_encryption_keys() -> None:
    postgres = compose_environment("postgres")
    environments = [compose_environment(service) for service in ("migrate", *REPLICAS)]
    assert all(environment == environments[0] for environment in environments)
    url = urlsplit(environments[0][ENV_PREFIX + "DATABASE_URL"])
    assert (url.scheme, url.hostname, url.port) == ("postgresql", "postgres", 5432)
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"] == SAMPLE_ENV["POSTGRES_PASSWORD"]
    assert url.path == "/" + postgres["POSTGRES_DB"]
    keys = environments[0][ENV_PREFIX + "ENCRYPTION_KEYS"]
    assert keys == SAMPLE_ENV["AIBRIDGEPROXYD_ENCRYPTION_KEYS"]


def test_compose_secrets_come_from_the_environment_and_are_required() -> None:
    raw = compose()["services"][REPLICAS[0]]["environment"]
    assert "${POSTGRES_PASSWORD:?" in raw[ENV_PREFIX + "DATABASE_URL"]
    assert raw[ENV_PREFIX + "ENCRYPTION_KEYS"].startswith("${AIBRIDGEPROXYD_ENCRYPTION_KEYS:?")


def test_compose_environment_variables_are_config_keys_with_accepted_values() -> None:
    for service in ("migrate", *REPLICAS):
        for name, value in compose_environment(service).items():
            check_environment_variable(name, value)


def listen_ports(service: str) -> tuple[int, int]:
    environment = compose_environment(service)
    return (
        parse_host_port(environment[ENV_PREFIX + "LISTEN"]).port,
        parse_host_port(environment[ENV_PREFIX + "ADMIN_LISTEN"]).port,
    )


def published(service: str) -> dict[int, tuple[str, int]]:
    """Container port -> (host address, host port) of ``HOST:PORT:CONTAINER`` or ``PORT:CONTAINER``."""
    ports = {}
    for entry in compose()["services"][service]["ports"]:
        *host, container = str(entry).split(":")
        address = host[0] if len(host) == 2 else "0.0.0.0"
        ports[int(container)] = (address, int(host[-1]))
    return ports


def test_compose_publishes_each_replicas_listeners_and_the_admin_on_loopback_only() -> None:
    host_ports = []
    for replica in REPLICAS:
        proxy, admin = listen_ports(replica)
        ports = published(replica)
        assert set(ports) == {proxy, admin}
        assert ports[admin][0] == "127.0.0.1", f"{replica}: admin listener beyond loopback"
        host_ports += [ports[proxy][1], ports[admin][1]]
    assert len(host_ports) == len(set(host_ports))
    assert published("prometheus")[9090][0] == "127.0.0.1"


def test_compose_healthcheck_asks_readyz_on_the_admin_port() -> None:
    for replica in REPLICAS:
        check = " ".join(compose()["services"][replica]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{listen_ports(replica)[1]}/readyz" in check


def test_compose_stop_grace_outlasts_the_drain() -> None:
    for replica in REPLICAS:
        grace = parse_duration(compose()["services"][replica]["stop_grace_period"])
        assert grace > Config().drain_timeout


# --- prometheus.yml ------------------------------------------------------------------------------


def prometheus_config() -> dict[str, Any]:
    document = yaml.safe_load((EXAMPLES / "prometheus.yml").read_text())
    assert isinstance(document, dict)
    return document


def test_prometheus_scrapes_the_admin_listener_of_every_replica() -> None:
    (job,) = prometheus_config()["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {target for group in job["static_configs"] for target in group["targets"]}
    assert targets == {f"{replica}:{listen_ports(replica)[1]}" for replica in REPLICAS}
    assert set(compose()["services"]["prometheus"]["depends_on"]) == set(REPLICAS)


def test_prometheus_mounts_its_config_and_the_alert_rules_it_loads() -> None:
    mounts = {}
    for volume in compose()["services"]["prometheus"]["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = source
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    for rule_file in prometheus_config()["rule_files"]:
        assert (EXAMPLES / mounts[rule_file]).is_file(), rule_file
    assert "./prometheus-alerts.yaml" in mounts.values()


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="docker compose is not installed",
)
def test_docker_compose_accepts_the_file() -> None:
    result = subprocess.run(
        ["docker", "compose", "-f", str(EXAMPLES / "docker-compose.yaml"), "config", "--quiet"],
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", **SAMPLE_ENV},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- kubernetes/ ---------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    manifests = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    assert set(kubernetes_documents()) == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }


def test_deployment_runs_two_replicas_that_stay_two_during_an_upgrade() -> None:
    spec = kubernetes_documents()["Deployment"]["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_probes_ask_healthz_and_readyz_on_the_configured_admin_port(tmp_path: Path) -> None:
    config = configmap_config(tmp_path)
    container = daemon_container()
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    for probe in (readiness, liveness):
        assert container_port(container, probe["port"]) == config.admin_listen.port
    assert config.admin_listen.host == "0.0.0.0"  # the kubelet probes the pod's address


def test_service_sends_the_proxy_port_to_ready_pods_of_the_deployment(tmp_path: Path) -> None:
    config = configmap_config(tmp_path)
    documents = kubernetes_documents()
    pod_labels = documents["Deployment"]["spec"]["template"]["metadata"]["labels"]
    (port,) = documents["Service"]["spec"]["ports"]
    assert container_port(daemon_container(), port["targetPort"]) == config.listen.port
    assert documents["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert config.auth == "token"  # the proxy listens beyond loopback


def test_disruption_budget_keeps_a_replica_of_the_deployment() -> None:
    documents = kubernetes_documents()
    budget = documents["PodDisruptionBudget"]["spec"]
    pod_labels = documents["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    assert 1 <= budget["minAvailable"] < documents["Deployment"]["spec"]["replicas"]


def secret_references(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Environment variable -> (Secret name, key) of each ``secretKeyRef``."""
    references = {}
    for variable in container["env"]:
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            references[variable["name"]] = (ref["name"], ref["key"])
    return references


def test_the_database_url_and_encryption_keys_come_from_the_secret() -> None:
    secret = kubernetes_documents()["Secret"]
    references = secret_references(daemon_container())
    assert set(references) == {ENV_PREFIX + "DATABASE_URL", ENV_PREFIX + "ENCRYPTION_KEYS"}
    for name, key in references.values():
        assert name == secret["metadata"]["name"]
        assert key in secret["stringData"]
    url = secret["stringData"][references[ENV_PREFIX + "DATABASE_URL"][1]]
    assert urlsplit(url).scheme == "postgresql"


def test_container_environment_variables_are_config_keys() -> None:
    pod = deployment_pod()
    for container in [*pod["initContainers"], *pod["containers"]]:
        for variable in container["env"]:
            check_environment_variable(variable["name"], variable.get("value"))


def test_configmap_config_is_one_the_daemon_loads(tmp_path: Path) -> None:
    config = configmap_config(tmp_path)
    mounts = {mount["name"]: mount["mountPath"] for mount in daemon_container()["volumeMounts"]}
    args = daemon_container()["args"]
    assert args[0] == "run"
    assert args[args.index("--config") + 1] == mounts["config"] + "/config.yaml"
    assert config.data_dir.is_relative_to(mounts["state"])
    assert config.certs_dir.is_relative_to(mounts["state"])


def test_every_pod_migrates_before_its_daemon_starts_with_the_same_settings() -> None:
    (init,) = deployment_pod()["initContainers"]
    daemon = daemon_container()
    assert init["args"][0] == "migrate"
    assert init["image"] == daemon["image"]
    assert init["env"] == daemon["env"]
    assert init["args"][1:] == daemon["args"][1:]
    assert init["volumeMounts"] == daemon["volumeMounts"]


def test_termination_grace_outlasts_the_drain(tmp_path: Path) -> None:
    config = configmap_config(tmp_path)
    assert deployment_pod()["terminationGracePeriodSeconds"] > config.drain_timeout


def test_pods_run_as_the_images_non_root_user() -> None:
    pod = deployment_pod()
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^USER {pod['securityContext']['runAsUser']}$", dockerfile, re.M)
    for container in [*pod["initContainers"], *pod["containers"]]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_manifests() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    kinds = [document["kind"] for document in yaml.safe_load_all(result.stdout)]
    assert sorted(kinds) == sorted(kubernetes_documents())


# --- Dockerfile ----------------------------------------------------------------------------------


def test_image_runs_the_installed_command_and_exposes_the_default_ports() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert re.search(r'^ENTRYPOINT \["(\w+)"\]$', dockerfile, re.M)[1] in scripts  # type: ignore[index]
    exposed = re.search(r"^EXPOSE (.+)$", dockerfile, re.M)[1].split()  # type: ignore[index]
    assert {int(port) for port in exposed} == {8888, 8889}
    assert re.search(r"^FROM python:3\.1[2-9]", dockerfile, re.M)
    # The package data (dashboard templates) comes with a real install, not a source copy.
    assert re.search(r"^RUN pip install \.", dockerfile, re.M)
