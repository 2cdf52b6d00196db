from decimal import Decimal
from pathlib import Path

import pytest
import trustme

from aibridgeproxyd.config import ConfigError, HostPort, load_config, parse_duration, parse_workers
from aibridgeproxyd.pricing import ModelPrices
from aibridgeproxyd.upstream_proxy import NoProxy, UpstreamProxy


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_relative_paths_are_relative_to_the_working_directory_not_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # README "Configuration" says so: the CLI run elsewhere with the same --config opens another
    # database, which is why the commands must run where the daemon runs.
    (tmp_path / "etc").mkdir()
    (tmp_path / "elsewhere").mkdir()
    path = write(tmp_path / "etc", "data_dir: ./data\ncerts_dir: certs\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = load_config(path, environ={})
    assert config.data_dir == tmp_path / "elsewhere" / "data"
    assert config.certs_dir == tmp_path / "elsewhere" / "certs"


def test_defaults_match_the_contract() -> None:
    config = load_config(environ={})
    assert config.listen == HostPort("127.0.0.1", 8888)
    assert config.admin_listen == HostPort("127.0.0.1", 8889)
    assert config.data_dir == Path("data").absolute()
    assert config.certs_dir == Path("certs").absolute()
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
        ("retention: 60", "retention"),
        ("drain_timeout: '30'", "drain_timeout"),
        ("upstream_no_proxy: ['bad entry!']", "upstream_no_proxy"),
        ("upstream_no_proxy: ['10.0.0.0/33']", "upstream_no_proxy"),
        ("auth: maybe", "auth"),
        ("auth_tunneled: perhaps", "auth_tunneled"),
        ("tracing: jaeger", "tracing"),
        ("log_format: xml", "log_format"),
        ("upstream_proxy: ftp://proxy:21", "upstream_proxy"),
        ("metrics_prefix: 'bad prefix'", "metrics_prefix"),
        ("providers: {a: 1}", "providers"),
        ("data_dir: [1]", "data_dir"),
        ("tls_cert_file: {a: b}", "tls_cert_file"),
        ("central_key_placeholder: [x]", "central_key_placeholder"),
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


def test_trace_logs_needs_tracing() -> None:
    with pytest.raises(ConfigError, match="'trace_logs' is true but 'tracing' is none"):
        load_config(flags={"trace_logs": "true"}, environ={})
    assert load_config(flags={"trace_logs": "true", "tracing": "console"}, environ={}).trace_logs


def test_record_max_bytes_is_a_size_of_at_most_a_mebibyte() -> None:
    assert load_config(flags={"record_max_bytes": "1MiB"}, environ={}).record_max_bytes == 2**20
    with pytest.raises(ConfigError, match=r"'record_max_bytes'.*at most 1MiB"):
        load_config(flags={"record_max_bytes": "1GiB"}, environ={})


# --- durations need a unit ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [60, 60.5, "60", " 60 ", "1.5", 0])
def test_a_duration_without_a_unit_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="needs a unit"):
        parse_duration(value)


def test_bare_number_retention_is_refused_naming_key_and_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'retention' \(.*config.yaml: retention\).*unit"):
        load_config(write(tmp_path, "retention: 60\n"), environ={})
    with pytest.raises(ConfigError, match=r"'reload_interval' \(AIBRIDGEPROXYD_RELOAD_INTERVAL\)"):
        load_config(environ={"AIBRIDGEPROXYD_RELOAD_INTERVAL": "10"})


# --- values are parsed once, at load --------------------------------------------------------


def test_upstream_proxy_and_no_proxy_are_parsed_into_values_at_load() -> None:
    config = load_config(
        environ={
            "AIBRIDGEPROXYD_UPSTREAM_PROXY": "http://proxy.corp:3128",
            "AIBRIDGEPROXYD_UPSTREAM_NO_PROXY": "llm.corp.example, 10.0.0.0/8",
        }
    )
    assert config.upstream_proxy == UpstreamProxy("http", "proxy.corp", 3128)
    assert config.upstream_no_proxy == NoProxy(["llm.corp.example", "10.0.0.0/8"])
    assert config.upstream_no_proxy.matches("api.llm.corp.example")
    assert config.upstream_no_proxy.matches("10.1.2.3")
    assert load_config(environ={}).upstream_no_proxy == NoProxy(())


def test_bad_upstream_no_proxy_is_refused_even_without_an_upstream_proxy() -> None:
    with pytest.raises(ConfigError, match=r"'upstream_no_proxy'.*'bad entry!'"):
        load_config(flags={"upstream_no_proxy": ["bad entry!"]}, environ={})


# --- files the configuration names are read at load -----------------------------------------


@pytest.fixture(scope="module")
def pem_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(certificate, its key, an unrelated key) as PEM files."""
    directory = tmp_path_factory.mktemp("pem")
    leaf = trustme.CA().issue_cert("127.0.0.1")
    other = trustme.CA().issue_cert("127.0.0.1")
    cert, key, wrong = directory / "cert.pem", directory / "key.pem", directory / "wrong.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    other.private_key_pem.write_to_path(str(wrong))
    return cert, key, wrong


def test_listener_tls_files_are_checked_at_load(
    tmp_path: Path, pem_pair: tuple[Path, Path, Path]
) -> None:
    cert, key, wrong = pem_pair
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    good = load_config(flags={"tls_cert_file": cert, "tls_key_file": key}, environ={})
    assert good.tls_cert_file == cert
    cases = [
        (
            {"tls_cert_file": junk, "tls_key_file": key},
            r"'tls_cert_file'.*holds no PEM certificate",
        ),
        ({"tls_cert_file": cert, "tls_key_file": junk}, r"'tls_key_file'.*no unencrypted PEM"),
        ({"tls_cert_file": cert, "tls_key_file": wrong}, r"'tls_key_file'.*does not match"),
        (
            {"tls_cert_file": tmp_path / "missing.pem", "tls_key_file": key},
            r"'tls_cert_file'.*cannot read .*missing.pem",
        ),
    ]
    for flags, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(flags=flags, environ={})


def test_operator_ca_and_upstream_ca_files_are_checked_at_load(
    tmp_path: Path, pem_pair: tuple[Path, Path, Path]
) -> None:
    cert, _key, wrong = pem_pair
    with pytest.raises(ConfigError, match=r"'ca_key_file'.*does not match"):
        load_config(flags={"ca_cert_file": cert, "ca_key_file": wrong}, environ={})
    junk = tmp_path / "junk.pem"
    junk.write_text("nothing\n")
    with pytest.raises(ConfigError, match=r"'upstream_ca_file'.*holds no PEM certificate"):
        load_config(flags={"upstream_ca_file": junk}, environ={})
    with pytest.raises(ConfigError, match=r"'upstream_proxy_ca'.*cannot read"):
        load_config(
            flags={"upstream_proxy": "https://proxy:3128", "upstream_proxy_ca": tmp_path / "nope"},
            environ={},
        )
    assert load_config(flags={"upstream_ca_file": cert}, environ={}).upstream_ca_file == cert


# --- the environment and the file itself -------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["AIBRIDGEPROXYD_LISTN", "AIBRIDGEPROXYD_TOKEN", "AIBRIDGEPROXYD_"]
)
def test_unknown_environment_key_is_refused_by_name(name: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown environment variable {name}:"):
        load_config(environ={name: "x"})


def test_lower_case_environment_key_is_refused_with_the_right_spelling() -> None:
    with pytest.raises(ConfigError, match="write it in upper case, AIBRIDGEPROXYD_LISTEN"):
        load_config(environ={"AIBRIDGEPROXYD_listen": "127.0.0.1:1"})


def test_yaml_only_key_in_the_environment_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"AIBRIDGEPROXYD_PROVIDERS.*YAML"):
        load_config(environ={"AIBRIDGEPROXYD_PROVIDERS": "[]"})


def test_nul_in_the_config_file_is_one_line_with_its_position(tmp_path: Path) -> None:
    path = tmp_path / "nul.yaml"
    path.write_bytes(b"listen: 127.0.0.1:1\x00\n")
    with pytest.raises(
        ConfigError, match=r"not valid YAML: unacceptable character .* at position 19$"
    ):
        load_config(path, environ={})


def test_config_file_that_is_not_utf8_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# café\nlisten: 127.0.0.1:1\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"config file {path} is not UTF-8.*0xe9"):
        load_config(path, environ={})


def test_proxy_credentials_are_not_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(flags={"upstream_proxy": "http://user:s3cret@proxy:99999"}, environ={})
    assert "s3cret" not in str(info.value)


def test_malformed_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "listen: [unclosed"), environ={})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("5m", 300), ("1.5h", 5400), ("60d", 5184000), ("250ms", 0.25), (" 7 s ", 7)],
)
def test_durations_with_a_unit_are_seconds(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_ipv6_listen_address() -> None:
    assert load_config(flags={"listen": "[::1]:8888"}, environ={}).listen.is_loopback


def test_every_aibridgeproxyd_variable_in_docs_and_examples_is_a_config_key() -> None:
    """Documentation must not teach a variable that the daemon refuses at start."""
    import re

    from aibridgeproxyd.config import _PARSERS, _YAML_ONLY

    root = Path(__file__).resolve().parents[2]
    files = [root / "README.md", *root.glob("docs/**/*.md"), *root.glob("examples/**/*")]
    allowed = {f"AIBRIDGEPROXYD_{key.upper()}" for key in _PARSERS if key not in _YAML_ONLY}
    unknown = {
        f"{path.relative_to(root)}: {name}"
        for path in files
        if path.is_file()
        for name in re.findall(r"\bAIBRIDGEPROXYD_[A-Z0-9_]+\b", path.read_text(errors="replace"))
        if name not in allowed
    }
    assert not unknown


def test_a_key_written_twice_in_the_file_is_refused_at_any_depth(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'listen' appears twice \(line 2, column 1\)$"):
        load_config(write(tmp_path, "listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n"), environ={})
    seeds = "providers:\n  - name: a\n    type: openai\n    type: anthropic\n"
    with pytest.raises(ConfigError, match="key 'type' appears twice"):
        load_config(write(tmp_path, seeds), environ={})


@pytest.mark.parametrize("value", ["3651d", "1" + "0" * 400 + "s"])
def test_an_absurdly_long_duration_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="at most 3650d"):
        parse_duration(value)


def test_failed_auth_bounds_have_safe_defaults_and_parse() -> None:
    defaults = load_config(environ={})
    assert defaults.auth_failure_limit == 20
    assert defaults.auth_failure_window == 60.0
    assert defaults.auth_failure_cooldown == 60.0
    assert defaults.auth_failure_log_interval == 10.0
    config = load_config(
        environ={
            "AIBRIDGEPROXYD_AUTH_FAILURE_LIMIT": "5",
            "AIBRIDGEPROXYD_AUTH_FAILURE_WINDOW": "2m",
            "AIBRIDGEPROXYD_AUTH_FAILURE_COOLDOWN": "15m",
            "AIBRIDGEPROXYD_AUTH_FAILURE_LOG_INTERVAL": "30s",
        }
    )
    assert (config.auth_failure_limit, config.auth_failure_window) == (5, 120.0)
    assert (config.auth_failure_cooldown, config.auth_failure_log_interval) == (900.0, 30.0)


@pytest.mark.parametrize("value", ["0", "-1", "many", "2.5", "²", "true"])
def test_auth_failure_limit_must_be_a_whole_number_of_at_least_one(value: str) -> None:
    with pytest.raises(ConfigError, match="auth_failure_limit"):
        load_config(environ={"AIBRIDGEPROXYD_AUTH_FAILURE_LIMIT": value})


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_durations_must_be_finite(tmp_path: Path, value: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"auth_failure_cooldown: {value}\n")
    with pytest.raises(ConfigError, match="auth_failure_cooldown"):
        load_config(path, environ={})


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


def test_a_cidr_with_host_bits_is_refused_naming_the_network_it_meant(tmp_path: Path) -> None:
    """Regression: `10.0.0.1/8` was accepted silently as 10.0.0.0/8."""
    path = write(tmp_path, 'allowed_private_cidrs: ["10.0.0.1/8"]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert "allowed_private_cidrs" in message and "'10.0.0.1/8'" in message
    assert "'10.0.0.0/8'" in message and "'10.0.0.1/32'" in message
    path = write(tmp_path, 'allowed_private_cidrs: ["fd00::1/8", "10.0.0.0/8", "10.1.2.3"]\n')
    with pytest.raises(ConfigError, match="'fd00::/8'"):
        load_config(path, environ={})
    path = write(tmp_path, 'allowed_private_cidrs: ["10.0.0.0/8", "10.1.2.3", "fd00::/8"]\n')
    config = load_config(path, environ={})
    assert [str(n) for n in config.allowed_private_cidrs] == [
        "10.0.0.0/8",
        "10.1.2.3/32",
        "fd00::/8",
    ]


def test_prices_are_parsed_per_model_with_cache_rates_optional(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "prices:\n"
        "  my-model: {input: 3, output: 15, cache_read: 0.3, cache_creation: '3.75'}\n"
        "  other: {input: 1, output: 2}\n",
    )
    prices = load_config(path, environ={}).prices
    assert prices["my-model"] == ModelPrices(
        input=Decimal(3), output=Decimal(15), cache_read=Decimal("0.3"),
        cache_creation=Decimal("3.75"),
    )  # fmt: skip
    assert prices["other"] == ModelPrices(input=Decimal(1), output=Decimal(2))
    assert load_config(None, environ={}).prices == {}


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("prices: [1]", "expected a mapping of model names"),
        ("prices: {m: 3}", "model 'm': expected a mapping"),
        ("prices: {m: {input: 1}}", "model 'm': missing rate 'output'"),
        ("prices: {m: {input: 1, output: 2, cached: 1}}", "model 'm': unknown rate 'cached'"),
        ("prices: {m: {input: -1, output: 2}}", "model 'm': input: expected a non-negative"),
        ("prices: {m: {input: 1, output: lots}}", "model 'm': output: expected a number"),
        ("prices: {m: {input: 1, output: .nan}}", "model 'm': output: expected a non-negative"),
        ("prices: {m: {input: true, output: 1}}", "model 'm': input: expected a number"),
        ("prices: {m: {input: 1e19, output: 1}}", "model 'm': input: expected at most 1000000"),
    ],
)
def test_a_bad_price_is_refused_naming_the_key_model_and_rate(
    tmp_path: Path, yaml_text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match="'prices'") as raised:
        load_config(write(tmp_path, yaml_text + "\n"), environ={})
    assert message in str(raised.value)


def test_prices_cannot_come_from_the_environment() -> None:
    with pytest.raises(ConfigError, match="only be set in the YAML file"):
        load_config(None, environ={"AIBRIDGEPROXYD_PRICES": "{}"})


def test_workers_default_to_one_process() -> None:
    assert load_config(environ={}).workers == 1


def test_workers_take_a_number_from_yaml_or_the_environment(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "workers: 4"), environ={}).workers == 4
    assert load_config(environ={"AIBRIDGEPROXYD_WORKERS": "2"}).workers == 2


def test_workers_auto_is_the_number_of_cores_within_the_bounds() -> None:
    assert parse_workers("auto", lambda: 8) == 8
    assert parse_workers(" AUTO ", lambda: 200) == 64
    assert parse_workers("auto", lambda: None) == 1


@pytest.mark.parametrize("value", ["0", "65", "-1", "two", "1.5", "true", ""])
def test_bad_workers_value_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"'workers'.*AIBRIDGEPROXYD_WORKERS.*auto or a whole"):
        load_config(environ={"AIBRIDGEPROXYD_WORKERS": value})
