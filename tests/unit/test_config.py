from pathlib import Path

import pytest

from aibridgeproxyd.config import ConfigError, HostPort, load_config, parse_duration


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_match_the_contract() -> None:
    config = load_config(environ={})
    assert config.listen == HostPort("127.0.0.1", 8888)
    assert config.admin_listen == HostPort("127.0.0.1", 8889)
    assert config.data_dir == Path("./data")
    assert config.allowed_ports == (80, 443)
    assert config.allowed_private_cidrs == ()
    assert config.auth == "token"
    assert config.auth_tunneled is False
    assert config.central_key_placeholder == "aibridgeproxyd"
    assert config.reload_interval == 10
    assert config.metrics_prefix == "coder_aibridgeproxyd_"
    assert config.retention == 60 * 86400
    assert config.tracing == "none"
    assert (config.log_format, config.log_level) == ("text", "info")


def test_flags_beat_environment_beat_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path, "listen: 127.0.0.1:1000\nadmin_listen: 127.0.0.1:2000\nlog_level: debug\n"
    )
    env = {
        "AIBRIDGEPROXYD_LISTEN": "127.0.0.1:1001",
        "AIBRIDGEPROXYD_ADMIN_LISTEN": "127.0.0.1:2001",
    }
    config = load_config(path, flags={"listen": "127.0.0.1:1002"}, environ=env)
    assert config.listen.port == 1002
    assert config.admin_listen.port == 2001
    assert config.log_level == "debug"


def test_unknown_yaml_key_is_refused_by_name(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:1000\nlisten_adress: x\n")
    with pytest.raises(ConfigError, match="listen_adress"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("listen: nowhere", "listen"),
        ("allowed_ports: [443, 70000]", "allowed_ports"),
        ("allowed_private_cidrs: [10.0.0.0/33]", "allowed_private_cidrs"),
        ("reload_interval: soon", "reload_interval"),
        ("reload_interval: 0s", "reload_interval"),
        ("auth: maybe", "auth"),
        ("auth_tunneled: perhaps", "auth_tunneled"),
        ("tracing: jaeger", "tracing"),
        ("log_format: xml", "log_format"),
        ("upstream_proxy: ftp://proxy:21", "upstream_proxy"),
        ("metrics_prefix: 'bad prefix'", "metrics_prefix"),
        ("providers: {a: 1}", "providers"),
    ],
)
def test_invalid_value_is_refused_naming_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(write(tmp_path, yaml_text), environ={})


def test_invalid_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="AIBRIDGEPROXYD_ALLOWED_PORTS"):
        load_config(environ={"AIBRIDGEPROXYD_ALLOWED_PORTS": "443,https"})


def test_environment_lists_are_comma_separated() -> None:
    config = load_config(
        environ={
            "AIBRIDGEPROXYD_ALLOWED_PORTS": "443, 8443",
            "AIBRIDGEPROXYD_ALLOWED_PRIVATE_CIDRS": "127.0.0.0/8",
        }
    )
    assert config.allowed_ports == (443, 8443)
    assert [str(n) for n in config.allowed_private_cidrs] == ["127.0.0.0/8"]


def test_auth_none_is_only_allowed_on_loopback() -> None:
    assert load_config(flags={"auth": "none"}, environ={}).auth == "none"
    with pytest.raises(ConfigError, match="'auth'"):
        load_config(flags={"auth": "none", "listen": "0.0.0.0:8888"}, environ={})


def test_ca_files_must_come_together() -> None:
    with pytest.raises(ConfigError, match="ca_cert_file"):
        load_config(flags={"ca_cert_file": "/tmp/cert.pem"}, environ={})


def test_proxy_credentials_are_not_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(flags={"upstream_proxy": "http://user:s3cret@proxy:99999"}, environ={})
    assert "s3cret" not in str(info.value)


def test_malformed_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "listen: [unclosed"), environ={})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("5m", 300), ("1.5h", 5400), ("60d", 5184000), ("250ms", 0.25), (7, 7)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_ipv6_listen_address() -> None:
    assert load_config(flags={"listen": "[::1]:8888"}, environ={}).listen.is_loopback


def test_client_bounds_have_safe_defaults_and_parse_units(tmp_path: Path) -> None:
    defaults = load_config(environ={})
    assert defaults.max_request_head == 64 * 1024
    assert defaults.max_request_body == 64 * 1024 * 1024
    assert defaults.max_connections == 4096
    assert defaults.request_head_timeout == 30
    assert defaults.idle_timeout == 300
    config = load_config(
        write(
            tmp_path,
            "max_request_head: 8KiB\nmax_connections: 10\n"
            "request_head_timeout: 500ms\nidle_timeout: 2m\n",
        ),
        environ={},
    )
    assert config.max_request_head == 8 * 1024
    assert config.max_connections == 10
    assert config.request_head_timeout == 0.5
    assert config.idle_timeout == 120


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("max_request_head: huge", "max_request_head"),
        ("max_request_head: 0", "max_request_head"),
        ("max_connections: 0", "max_connections"),
        ("max_connections: many", "max_connections"),
        ("max_connections: true", "max_connections"),
        ("request_head_timeout: 0s", "request_head_timeout"),
        ("idle_timeout: forever", "idle_timeout"),
    ],
)
def test_invalid_client_bound_is_refused_naming_the_key(
    tmp_path: Path, yaml_text: str, key: str
) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(write(tmp_path, yaml_text), environ={})
