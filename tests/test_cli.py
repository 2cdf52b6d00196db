"""The command line: output shapes, bad input, secret hygiene, and --config/--data-dir placement.

Most tests call ``main()`` in-process for speed; the ones about what a shell sees (stdout of
``tokens create``, no tracebacks, ``python -m``) run a real subprocess.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aibridgeproxyd.cli import main
from aibridgeproxyd.sealing import key_id

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET_KEYS = ("sk-SECRET-key-one", "sk-SECRET-key-two")
SECRET_SETTING = "SECRET-setting-value"


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run every command in an empty directory, with no AIBRIDGEPROXYD_* environment."""
    for name in list(os.environ):
        if name.startswith("AIBRIDGEPROXYD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield tmp_path


Cli = Callable[..., Result]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    def run(*args: str) -> Result:
        code = main(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def run_process(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIBRIDGEPROXYD_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "aibridgeproxyd", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def db_dump(data_dir: Path = Path("data")) -> list[str]:
    with sqlite3.connect(data_dir / "aibridgeproxyd.db") as connection:
        return list(connection.iterdump())


def listed(cli: Cli, *extra: str) -> dict[str, dict[str, Any]]:
    result = cli("providers", "list", "--json", *extra)
    assert result.code == 0, result.err
    return {item["name"]: item for item in json.loads(result.out)}


def assert_one_line_error(result: Result | subprocess.CompletedProcess[str]) -> None:
    code = result.code if isinstance(result, Result) else result.returncode
    err = result.err if isinstance(result, Result) else result.stderr
    assert code != 0
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err


# --- providers --------------------------------------------------------------------------------


def test_fresh_data_dir_lists_the_default_providers(cli: Cli) -> None:
    result = cli("providers", "list")
    assert result.code == 0
    header, *rows = result.out.splitlines()
    assert header.split() == ["NAME", "TYPE", "STATUS", "HOSTS", "BASE_URL", "KEYS", "REASON"]
    assert [row.split()[:3] for row in rows] == [
        ["anthropic", "anthropic", "enabled"],
        ["openai", "openai", "enabled"],
    ]
    assert (Path("data") / "aibridgeproxyd.db").exists()


def test_list_json_has_exactly_the_contract_fields(cli: Cli) -> None:
    openai = listed(cli)["openai"]
    assert set(openai) == {
        "name",
        "type",
        "display_name",
        "base_url",
        "hosts",
        "enabled",
        "allow_byok",
        "key_count",
        "settings",
        "status",
        "status_reason",
        "created_at",
        "updated_at",
    }
    assert openai["base_url"] == "https://api.openai.com/v1"  # effective, not the stored ""
    assert openai["hosts"] == ["api.openai.com"]
    assert openai["status"] == "enabled" and openai["status_reason"] == ""
    assert openai["enabled"] is True and openai["allow_byok"] is True and openai["key_count"] == 0


def test_secret_settings_are_masked(cli: Cli) -> None:
    result = cli(
        "providers", "add", "aws", "--type", "bedrock", "--host", "llm.corp.example",
        "--set", f"secret_access_key={SECRET_SETTING}",
        "--set", f"session_token={SECRET_SETTING}",
        "--set", "region=us-east-1",
    )  # fmt: skip
    assert result.code == 0, result.err
    result = cli(
        "providers", "add", "corp", "--type", "azure", "--base-url", "https://corp.example",
        "--set", f'deployments={{"password": "{SECRET_SETTING}", "gpt-4o": "prod"}}',
    )  # fmt: skip
    assert result.code == 0, result.err
    providers = listed(cli)
    assert providers["aws"]["settings"] == {
        "secret_access_key": "***",
        "session_token": "***",
        "region": "us-east-1",
    }
    assert providers["corp"]["settings"] == {"deployments": {"password": "***", "gpt-4o": "prod"}}


def test_set_values_are_json_when_valid_else_strings(cli: Cli) -> None:
    result = cli(
        "providers", "add", "corp", "--type", "bedrock", "--host", "llm.corp.example",
        "--set", 'allowed_betas=["a", "b"]', "--set", "region=3", "--set", "model=true",
        "--set", "small_fast_model=NaN", "--set", "access_key_id=a=b",
    )  # fmt: skip
    assert result.code == 0, result.err
    result = cli(
        "providers", "add", "az", "--type", "azure", "--base-url", "https://az.example",
        "--set", 'deployments={"gpt-4o": "prod"}', "--set", "api_version=2024-10-21",
    )  # fmt: skip
    assert result.code == 0, result.err
    with sqlite3.connect(Path("data") / "aibridgeproxyd.db") as connection:
        stored = dict(connection.execute("SELECT name, settings FROM providers").fetchall())
    corp = json.loads(stored["corp"])
    # A name that looks secret is stored encrypted (README.md#secrets-at-rest).
    assert corp.pop("access_key_id").startswith("enc:v1:")
    assert corp == {
        "allowed_betas": ["a", "b"],
        "region": 3,
        "model": True,
        "small_fast_model": "NaN",
    }
    assert json.loads(stored["az"]) == {
        "deployments": {"gpt-4o": "prod"},
        "api_version": "2024-10-21",
    }


def test_add_reports_status_and_reason(cli: Cli) -> None:
    result = cli(
        "providers", "add", "strict", "--type", "anthropic", "--no-byok", "--host", "x.example"
    )
    assert result.code == 0
    assert "status: error (no keys configured and BYOK is off)" in result.out
    strict = listed(cli)["strict"]
    assert strict["status"] == "error" and strict["allow_byok"] is False


def test_host_claimed_by_an_earlier_provider_shows_as_error(cli: Cli) -> None:
    result = cli("providers", "add", "corp", "--type", "openai", "--host", "api.openai.com")
    assert result.code == 0
    # Taking the host from a working provider is said, not silent.
    assert "warning: provider 'openai' is now in status error" in result.err
    openai = listed(cli)["openai"]
    assert openai["status"] == "error"
    assert "already claimed by provider 'corp'" in openai["status_reason"]


def test_edit_replaces_keys_and_hosts_and_merges_settings(cli: Cli) -> None:
    cli(
        "providers", "add", "corp", "--type", "azure", "--base-url", "https://corp.example",
        "--host", "a.example", "--host", "b.example", "--key", "k1", "--key", "k2",
        "--set", 'deployments={"gpt-4o": "prod"}', "--set", "api_version=2024-06-01",
    )  # fmt: skip
    result = cli(
        "providers", "edit", "corp", "--host", "c.example", "--key", "k3",
        "--set", "api_version=2024-10-21", "--unset", "deployments", "--display-name", "Corp LLM",
    )  # fmt: skip
    assert result.code == 0, result.err
    corp = listed(cli)["corp"]
    assert corp["hosts"] == ["c.example"]
    assert corp["key_count"] == 1
    assert corp["settings"] == {"api_version": "2024-10-21"}
    assert corp["display_name"] == "Corp LLM"


def test_edit_can_go_back_to_type_defaults(cli: Cli) -> None:
    cli("providers", "add", "corp", "--type", "openai", "--host", "a.example", "--key", "k1")
    assert cli("providers", "disable", "openai").code == 0
    result = cli("providers", "edit", "corp", "--clear-hosts", "--clear-keys", "--base-url", "")
    assert result.code == 0, result.err
    corp = listed(cli)["corp"]
    assert corp["hosts"] == ["api.openai.com"] and corp["key_count"] == 0
    assert corp["base_url"] == "https://api.openai.com/v1"


def test_enable_disable_and_delete(cli: Cli) -> None:
    assert "status: disabled" in cli("providers", "disable", "openai").out
    assert listed(cli)["openai"]["enabled"] is False
    assert "status: enabled" in cli("providers", "enable", "openai").out
    assert cli("providers", "delete", "openai").code == 0
    assert "openai" not in listed(cli)


def test_deleted_default_provider_stays_deleted(cli: Cli) -> None:
    cli("providers", "delete", "openai")
    assert set(listed(cli)) == {"anthropic"}


def test_show_prints_one_provider(cli: Cli) -> None:
    result = cli("providers", "show", "openai", "--json")
    assert result.code == 0
    assert json.loads(result.out) == listed(cli)["openai"]
    text = cli("providers", "show", "openai").out
    assert "base_url:      https://api.openai.com/v1 (type default)" in text


def test_keys_are_never_printed(cli: Cli) -> None:
    outputs = [
        cli(
            "providers", "add", "corp", "--type", "openai", "--host", "corp.example",
            "--key", SECRET_KEYS[0], "--key", SECRET_KEYS[1],
        ),
        cli("providers", "list"),
        cli("providers", "list", "--json"),
        cli("providers", "show", "corp"),
        cli("providers", "show", "corp", "--json"),
        cli("providers", "edit", "corp", "--key", SECRET_KEYS[0]),
        cli("providers", "disable", "corp"),
        cli("providers", "enable", "corp"),
        # Refused edits must not echo the keys either.
        cli("providers", "edit", "corp", *[f"--key={SECRET_KEYS[0]}{i}" for i in range(6)]),
        cli("providers", "add", "corp", "--type", "openai", "--key", SECRET_KEYS[0]),
        cli("providers", "edit", "corp", "--set", SECRET_SETTING),
        cli("providers", "edit", "corp", "--set", f"api_key={SECRET_SETTING}"),
    ]  # fmt: skip
    assert [r.code for r in outputs][:8] == [0] * 8
    for result in outputs:
        for secret in (*SECRET_KEYS, SECRET_SETTING):
            assert secret not in result.out + result.err


def test_keys_can_be_read_from_stdin(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{SECRET_KEYS[0]}\n\n{SECRET_KEYS[1]}\n"))
    result = cli(
        "providers", "add", "corp", "--type", "openai", "--host", "c.example", "--key-stdin"
    )
    assert result.code == 0, result.err
    assert listed(cli)["corp"]["key_count"] == 2


def test_empty_key_stdin_is_refused_and_keeps_every_key(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("providers", "edit", "openai", "--key", SECRET_KEYS[0], "--key", SECRET_KEYS[1])
    before = db_dump()
    for empty_input in ("", "\n  \n"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(empty_input))
        result = cli("providers", "edit", "openai", "--key-stdin")
        assert_one_line_error(result)
        assert result.code == 2
        assert "--key-stdin read no key" in result.err and "--clear-keys" in result.err
    assert db_dump() == before
    assert listed(cli)["openai"]["key_count"] == 2
    assert cli("providers", "edit", "openai", "--clear-keys").code == 0
    assert listed(cli)["openai"]["key_count"] == 0


def test_keys_that_are_not_visible_ascii_are_refused_without_echoing_them(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("providers", "list")
    before = db_dump()
    for stdin in (f"{SECRET_KEYS[0]}\n{SECRET_KEYS[1]} x\n", f"{SECRET_KEYS[0]}\udcff\n"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        result = cli("providers", "edit", "openai", "--key-stdin")
        assert_one_line_error(result)
        assert "key #" in result.err and "visible ASCII" in result.err
        assert SECRET_KEYS[0] not in result.err and SECRET_KEYS[1] not in result.err
    assert db_dump() == before


def test_arguments_that_are_not_utf8_are_one_line(tmp_path: Path) -> None:
    result = run_process("providers", "show", "\udcff", cwd=tmp_path)
    assert_one_line_error(result)
    assert "argument #3 is not valid UTF-8" in result.stderr


def test_key_stdin_together_with_key_is_refused(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{SECRET_KEYS[1]}\n"))
    for command in ("add", "edit"):
        result = cli(
            "providers",
            command,
            "openai",
            "--type",
            "openai",
            "--key",
            SECRET_KEYS[0],
            "--key-stdin",
        )
        assert_one_line_error(result)
        assert "--key and --key-stdin cannot be used together" in result.err
    assert listed(cli)["openai"]["key_count"] == 0


# --- bad input ------------------------------------------------------------------------------


BAD_INPUT = [
    (
        ("providers", "add", "x", "--type", "nope"),
        "unknown provider type 'nope'; valid types: anthropic, azure, bedrock, copilot, google, openai, openai-compat, openrouter, vercel",
    ),
    (
        ("providers", "add", "x", "--type", "openai", "--base-url", "ftp://x.example"),
        "'ftp://x.example'",
    ),
    (("providers", "add", "x", "--type", "openai", "--base-url", "not a url"), "'not a url'"),
    (
        ("providers", "add", "x", "--type", "openai", "--base-url", "https://exa mple.com"),
        "base_url 'https://exa mple.com' must not contain spaces",
    ),
    (
        ("providers", "edit", "openai", "--base-url", "https://x.example:0/v1"),
        "has an invalid port 0",
    ),
    (
        ("providers", "edit", "openai", "--base-url", "https://[zz]/v1"),
        "base_url 'https://[zz]/v1' is not a valid URL",
    ),
    (
        ("providers", "edit", "openai", "--base-url", "https://bad_host!.example/v1"),
        "invalid hostname 'bad_host!.example'",
    ),
    (
        ("providers", "add", "x", "--type", "openai", "--host", "*.x.test"),
        "invalid host '*.x.test': wildcards are not supported",
    ),
    (("providers", "edit", "openai", "--host", "b\u00fccher.example"), "xn-- form"),
    (("providers", "edit", "openai", "--host", "a b.example"), "invalid host 'a b.example'"),
    (
        ("providers", "add", "x", "--type", "openai", "--byok", "--no-byok"),
        "argument --no-byok: not allowed with argument --byok",
    ),
    (("providers", "edit", "openai", "--no-byok", "--byok"), "not allowed with argument"),
    (
        ("providers", "add", "x", "--type", "openai", "--type", "anthropic"),
        "--type given twice with different values",
    ),
    (
        ("providers", "edit", "openai", "--unset", "region"),
        "--unset region: provider 'openai' has no setting 'region' (its settings: none)",
    ),
    (
        ("providers", "add", "x", "--type", "openai", "--set", "region=eu"),
        "provider type 'openai' has no setting 'region'; it has no settings",
    ),
    (
        (
            "providers",
            "add",
            "x",
            "--type",
            "azure",
            "--base-url",
            "https://a.example",
            "--set",
            "deployment=x",
        ),
        "provider type 'azure' has no setting 'deployment'; its settings are: api_version, deployments",
    ),
    (
        ("providers", "edit", "anthropic", "--type", "bedrock", "--set", "regoin=us-east-1"),
        "provider type 'bedrock' has no setting 'regoin'; its settings are: access_key_id, "
        "allowed_betas, model, region, secret_access_key, session_token, small_fast_model",
    ),
    (("providers", "add", "openai", "--type", "openai"), "provider 'openai' already exists"),
    (("providers", "add", "Bad_Name", "--type", "openai"), "invalid provider name 'Bad_Name'"),
    (("providers", "add", "x", "--type", "openai", *["--key=k"] * 6), "6 keys; at most 5"),
    (
        ("providers", "add", "x", "--type", "openai", "--host", "a.example/v1"),
        "invalid host 'a.example/v1'",
    ),
    (("providers", "add", "x", "--type", "openai", "--key", ""), "a key is empty"),
    (
        ("providers", "add", "x", "--type", "openai", "--set", "novalue"),
        "--set argument #1 has no '='",
    ),
    (("providers", "add", "x", "--type", "openai", "--set", "=v"), "empty KEY"),
    (
        (
            "providers",
            "edit",
            "openai",
            "--type",
            "azure",
            "--set",
            "api_version=a",
            "--set",
            "api_version=b",
        ),
        "--set api_version is given twice (argument #2)",
    ),
    (("providers", "add", "x"), "required: --type"),
    (("providers", "edit", "ghost", "--disabled"), "provider 'ghost' does not exist"),
    (("providers", "edit", "openai"), "nothing to change"),
    (
        ("providers", "edit", "openai", "--host", "a.example", "--clear-hosts"),
        "cannot be used together",
    ),
    (("providers", "edit", "openai", "--type", "nope"), "unknown provider type 'nope'"),
    (("providers", "show", "ghost"), "provider 'ghost' does not exist"),
    (("providers", "enable", "ghost"), "provider 'ghost' does not exist"),
    (("providers", "disable", "ghost"), "provider 'ghost' does not exist"),
    (("providers", "delete", "ghost"), "provider 'ghost' does not exist"),
    (("tokens", "create", "alice"), "token 'alice' already exists"),
    (("tokens", "create", "has space"), "invalid token name 'has space'"),
    (("tokens", "revoke", "ghost"), "token 'ghost' does not exist"),
    (("providers",), "required: COMMAND"),
    (("frobnicate",), "invalid choice: 'frobnicate'"),
    (("providers", "list", "--config", "missing.yaml"), "missing.yaml"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_exits_nonzero_with_one_line_and_changes_nothing(
    cli: Cli, args: tuple[str, ...], message: str
) -> None:
    assert cli("tokens", "create", "alice").code == 0
    before = db_dump()
    result = cli(*args)
    assert_one_line_error(result)
    assert result.code == 2
    assert message in result.err
    assert db_dump() == before


def test_bad_add_on_a_new_data_dir_creates_nothing(cli: Cli) -> None:
    result = cli("providers", "add", "x", "--type", "nope", "--data-dir", "fresh")
    assert_one_line_error(result)
    assert not Path("fresh").exists()


def test_invalid_config_is_one_line_and_creates_nothing(cli: Cli) -> None:
    Path("bad.yaml").write_text("colour: red\n")
    result = cli("--config", "bad.yaml", "providers", "list")
    assert_one_line_error(result)
    assert "unknown config key 'colour'" in result.err
    Path("broken.yaml").write_text("listen: [unclosed\n")
    assert_one_line_error(cli("providers", "list", "--config", "broken.yaml"))
    assert not Path("data").exists()


def test_corrupt_database_is_one_line_naming_the_file(cli: Cli) -> None:
    Path("data").mkdir()
    (Path("data") / "aibridgeproxyd.db").write_bytes(b"garbage " * 200)
    result = cli("providers", "list")
    assert_one_line_error(result)
    assert result.code == 1
    assert "aibridgeproxyd.db" in result.err


def test_run_help_says_the_admin_listener_serves_the_dashboard_and_api(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A new admin looks here for where the dashboard is; it said "metrics/health listener".
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "admin listener: dashboard, API, metrics, health" in help_text


def test_run_with_a_bad_flag_fails_before_starting(cli: Cli) -> None:
    result = cli("run", "--listen", "nowhere")
    assert_one_line_error(result)
    assert "'listen'" in result.err


# --- prices -----------------------------------------------------------------------------------


def test_prices_list_prints_the_config_overrides(cli: Cli) -> None:
    Path("prices.yaml").write_text("prices:\n  my-model: {input: 3, output: 15, cache_read: 0.3}\n")
    result = cli("prices", "list", "--json", "--config", "prices.yaml")
    assert result.code == 0, result.err
    assert json.loads(result.out) == [
        {"model": "my-model", "source": "config", "input": "3", "output": "15",
         "cache_read": "0.3", "cache_creation": None, "updated_at": None},
    ]  # fmt: skip
    table = cli("prices", "list", "--config", "prices.yaml").out.splitlines()
    assert table[0].split() == [
        "MODEL", "SOURCE", "INPUT", "OUTPUT", "CACHE_READ", "CACHE_CREATION",
    ]  # fmt: skip
    assert table[1].split() == ["my-model", "config", "3", "15", "0.3", "-"]
    assert not Path("data").exists()  # listing never creates a database


def test_prices_set_stores_a_price_that_wins_over_the_config_until_deleted(cli: Cli) -> None:
    Path("prices.yaml").write_text("prices:\n  gpt-4o: {input: 3, output: 15}\n")
    config = ("--config", "prices.yaml")
    result = cli(
        "prices", "set", "gpt-4o", "--input", "2.5", "--output", "10", "--cache-read", "1.25",
        *config,
    )  # fmt: skip
    assert result.code == 0, result.err
    assert result.out.strip() == (
        "price of model 'gpt-4o' set (USD per million tokens): input 2.5, output 10, "
        "cache_read 1.25, cache_creation 2.5 (the input rate)"
    )
    cli("prices", "set", "my-model", "--input", "0", "--output", "1e-1", "--cache-write", "0.5")
    listed = json.loads(cli("prices", "list", "--json", *config).out)
    assert [(row["model"], row["source"]) for row in listed] == [
        ("gpt-4o", "store"), ("gpt-4o", "config"), ("my-model", "store"),
    ]  # fmt: skip
    assert listed[0] | {"updated_at": None} == {
        "model": "gpt-4o", "source": "store", "input": "2.5", "output": "10",
        "cache_read": "1.25", "cache_creation": None, "updated_at": None,
    }  # fmt: skip
    assert (listed[2]["input"], listed[2]["output"], listed[2]["cache_creation"]) == (
        "0", "0.1", "0.5",
    )  # fmt: skip
    shown = json.loads(cli("prices", "show", "openai", "gpt-4o", "--json", *config).out)
    assert (shown["source"], shown["input"]) == ("store", "2.5")
    assert cli("prices", "delete", "gpt-4o", *config).code == 0
    shown = json.loads(cli("prices", "show", "openai", "gpt-4o", "--json", *config).out)
    assert (shown["source"], shown["input"]) == ("config", "3")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--input", "-1", "--output", "2"), "--input: expected a non-negative number"),
        (("--input", "1", "--output", "cheap"), "--output: expected a number of USD"),
        (("--input", "1", "--output", "2", "--cache-read", "nan"), "--cache-read: expected"),
        (("--input", "1", "--output", "2", "--cache-write", "inf"), "--cache-write: expected"),
        (("--input", "1e19", "--output", "2"), "--input: expected at most 1000000"),
        (("--input", "1"), "--output"),
        (("--input", "1", "--input", "2", "--output", "2"), "--input given twice"),
    ],
)
def test_prices_set_with_bad_input_names_the_flag_and_changes_nothing(
    cli: Cli, args: tuple[str, ...], message: str
) -> None:
    cli("prices", "set", "kept", "--input", "1", "--output", "2")
    before = db_dump()
    result = cli("prices", "set", "kept", *args)
    assert_one_line_error(result)
    assert result.code == 2
    assert message in result.err
    assert db_dump() == before


def test_prices_set_refuses_a_bad_model_name_without_creating_a_database(cli: Cli) -> None:
    result = cli("prices", "set", " padded", "--input", "1", "--output", "2")
    assert_one_line_error(result)
    assert "invalid model name ' padded'" in result.err
    assert not Path("data").exists()


def test_prices_delete_of_a_model_without_a_set_price_names_it(cli: Cli) -> None:
    Path("prices.yaml").write_text("prices:\n  gpt-4o: {input: 3, output: 15}\n")
    result = cli("prices", "delete", "no-such-model")
    assert_one_line_error(result)
    assert result.code == 2
    assert "no price set for model 'no-such-model'" in result.err
    configured = cli("prices", "delete", "gpt-4o", "--config", "prices.yaml")
    assert "it is priced by the config's prices:" in configured.err


def test_prices_show_names_the_source_of_a_price_and_refuses_an_unpriced_model(cli: Cli) -> None:
    Path("prices.yaml").write_text("prices:\n  gpt-4o-mini: {input: 1, output: 2}\n")
    overridden = cli("prices", "show", "openai", "gpt-4o-mini", "--json", "--config", "prices.yaml")
    assert json.loads(overridden.out)["source"] == "config"
    table = json.loads(cli("prices", "show", "anthropic", "claude-sonnet-4-5", "--json").out)
    assert table["source"] == "genai-prices anthropic/claude-sonnet-4-5"
    assert float(table["cache_read"]) < float(table["input"]) < float(table["cache_creation"])
    unpriced = cli("prices", "show", "openai", "no-such-model-xyz")
    assert_one_line_error(unpriced)
    assert "no price for openai model 'no-such-model-xyz'" in unpriced.err
    assert not Path("data").exists()


# --- --config and --data-dir placement ------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("--data-dir", "d", "providers", "list"),
        ("providers", "list", "--data-dir", "d"),
        ("providers", "--data-dir", "d", "list"),
        ("--data-dir", "elsewhere", "providers", "list", "--data-dir", "d"),
        ("--config", "c.yaml", "providers", "list"),
        ("providers", "list", "--config", "c.yaml"),
        ("tokens", "list", "--config", "c.yaml"),
        ("--config", "c.yaml", "tokens", "list"),
    ],
)
def test_common_options_work_before_and_after_the_subcommand(
    cli: Cli, args: tuple[str, ...]
) -> None:
    Path("c.yaml").write_text("data_dir: d\n")
    result = cli(*args)
    assert result.code == 0, result.err
    assert (Path("d") / "aibridgeproxyd.db").exists()
    assert not Path("data").exists() and not Path("elsewhere").exists()


def test_data_dir_flag_overrides_the_config_file(cli: Cli) -> None:
    Path("c.yaml").write_text("data_dir: from-yaml\n")
    assert cli("--config", "c.yaml", "providers", "list", "--data-dir", "from-flag").code == 0
    assert Path("from-flag").exists() and not Path("from-yaml").exists()


def test_config_file_seeds_providers(cli: Cli) -> None:
    Path("c.yaml").write_text(
        "providers:\n  - name: corp\n    type: openai\n    hosts: [llm.corp.example]\n"
    )
    providers = listed(cli, "--config", "c.yaml")
    assert set(providers) == {"corp"}  # seeds replace the defaults on a fresh database


# --- tokens ---------------------------------------------------------------------------------


def test_token_create_prints_only_the_token_and_stores_its_hash(tmp_path: Path) -> None:
    result = run_process("tokens", "create", "alice", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    token = result.stdout.removesuffix("\n")
    assert result.stdout == token + "\n" and token and "\n" not in token
    assert "shown only once" in result.stderr and token not in result.stderr
    with sqlite3.connect(tmp_path / "data" / "aibridgeproxyd.db") as connection:
        rows = connection.execute("SELECT name, token_hash FROM tokens").fetchall()
    assert rows == [("alice", hashlib.sha256(token.encode()).hexdigest())]
    assert token not in "\n".join(db_dump(tmp_path / "data"))


def test_token_list_shows_names_never_hashes(cli: Cli) -> None:
    token = cli("tokens", "create", "alice").out.strip()
    token_hash = hashlib.sha256(token.encode()).hexdigest()
    for args in (("tokens", "list"), ("tokens", "list", "--json")):
        result = cli(*args)
        assert result.code == 0
        assert "alice" in result.out
        assert token not in result.out and token_hash not in result.out
    (entry,) = json.loads(cli("tokens", "list", "--json").out)
    assert set(entry) == {"name", "created_at", "last_used_at"}
    assert entry["last_used_at"] is None  # no request yet
    assert cli("tokens", "list").out.split()[:3] == ["NAME", "CREATED_AT", "LAST_USED_AT"]


def test_revoked_token_is_gone(cli: Cli) -> None:
    cli("tokens", "create", "alice")
    assert cli("tokens", "revoke", "alice").code == 0
    assert json.loads(cli("tokens", "list", "--json").out) == []


# --- process-level behaviour ------------------------------------------------------------------


def test_user_errors_never_print_a_traceback(tmp_path: Path) -> None:
    for args in (
        ("providers", "add", "x", "--type", "nope"),
        ("providers", "edit", "ghost", "--disabled"),
        ("--config", "missing.yaml", "providers", "list"),
        ("providers", "list", "--bogus"),
    ):
        result = run_process(*args, cwd=tmp_path)
        assert_one_line_error(result)


def test_python_dash_m_lists_providers(tmp_path: Path) -> None:
    result = run_process("providers", "list", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {item["name"] for item in json.loads(result.stdout)} == {"openai", "anthropic"}


# Every management command, run in one process: none of them may import mitmproxy, which costs
# about 280 ms of start-up that only `run` needs.
_MANAGEMENT_SESSION = """
import sys
from aibridgeproxyd.cli import main
from aibridgeproxyd.sealing import key_id

for args in (
    ["providers", "add", "corp", "--type", "openai-compat", "--base-url",
     "https://llm.corp.example/v1", "--host", "llm.corp.example", "--key", "sk-one"],
    ["providers", "edit", "corp", "--key", "sk-two"],
    ["providers", "disable", "corp"],
    ["providers", "enable", "corp"],
    ["providers", "show", "corp", "--json"],
    ["providers", "list", "--json"],
    ["providers", "delete", "corp"],
    ["tokens", "create", "alice"],
    ["tokens", "list", "--json"],
    ["tokens", "revoke", "alice"],
    ["admin-tokens", "create", "ops", "--role", "admin"],
    ["admin-tokens", "list", "--json"],
    ["admin-tokens", "revoke", "ops"],
    ["interceptions", "list", "--started-after", "2026-01-01T00:00:00Z", "--client", "Codex"],
    ["sessions", "list", "--initiator", "alice"],
    ["ca", "path"],  # exits 1 (no CA yet), after loading everything the ca commands use
):
    code = main(args)
    if code != (1 if args[0] == "ca" else 0):
        sys.exit(f"{args} exited {code}")
print(sorted(name for name in sys.modules if name.split(".")[0] == "mitmproxy"))
"""


def test_management_commands_never_import_mitmproxy(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIBRIDGEPROXYD_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run(
        [sys.executable, "-c", _MANAGEMENT_SESSION],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


# --- ca -------------------------------------------------------------------------------------


def _generate_ca(config_file: str) -> None:
    """What `run` does on its first start (the only command that generates a CA)."""
    from aibridgeproxyd.ca import ensure_ca
    from aibridgeproxyd.config import load_config

    ensure_ca(load_config(Path(config_file), environ={}))


def test_ca_path_and_export_never_generate_a_ca_and_name_the_absolute_path(cli: Cli) -> None:
    Path("c.yaml").write_text("certs_dir: my-certs\n")
    expected = Path("my-certs/ca-cert.pem").absolute()
    for command in ("path", "export"):
        result = cli("ca", command, "--config", "c.yaml")
        assert_one_line_error(result)
        assert result.code == 1
        assert f"no CA certificate at {expected} (" in result.err
    assert not Path("my-certs").exists()
    Path("op.yaml").write_text("ca_cert_file: op/cert.pem\nca_key_file: op/key.pem\n")
    result = cli("ca", "path", "--config", "op.yaml")
    assert_one_line_error(result)  # the loader reads operator-supplied CA files
    assert str(Path("op/cert.pem")) in result.err


def test_ca_path_and_export_give_the_certificate_never_the_key(cli: Cli) -> None:
    Path("c.yaml").write_text("certs_dir: my-certs\n")
    _generate_ca("c.yaml")
    result = cli("ca", "path", "--config", "c.yaml")
    assert result.code == 0, result.err
    cert_path = Path(result.out.strip())
    assert cert_path.is_absolute() and cert_path == Path("my-certs/ca-cert.pem").absolute()
    exported = cli("--config", "c.yaml", "ca", "export")
    assert exported.code == 0
    assert exported.out.startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" not in exported.out
    assert exported.out == cert_path.read_text()


def test_ca_export_strips_a_key_bundled_in_the_operator_cert_file(cli: Cli) -> None:
    Path("c.yaml").write_text("certs_dir: gen\n")
    _generate_ca("c.yaml")
    bundle = Path("bundle.pem")
    bundle.write_text(Path("gen/ca-key.pem").read_text() + Path("gen/ca-cert.pem").read_text())
    Path("op.yaml").write_text("ca_cert_file: bundle.pem\nca_key_file: gen/ca-key.pem\n")
    exported = cli("ca", "export", "--config", "op.yaml")
    assert exported.code == 0, exported.err
    assert "PRIVATE KEY" not in exported.out
    assert exported.out == Path("gen/ca-cert.pem").read_text()
    assert cli("ca", "path", "--config", "op.yaml").out == f"{bundle.absolute()}\n"


# --- databases are never created silently ----------------------------------------------------


def test_a_command_that_creates_the_database_says_so_with_its_absolute_path(cli: Cli) -> None:
    first = cli("providers", "list", "--data-dir", "fresh")
    assert first.code == 0
    database = Path("fresh/aibridgeproxyd.db").absolute()
    assert first.err == f"created a new database {database}\n"
    second = cli("providers", "list", "--data-dir", "fresh")
    assert second.code == 0 and second.err == ""


def test_a_failed_command_leaves_no_new_database_behind(cli: Cli) -> None:
    for args in (
        ("providers", "edit", "ghost", "--disabled"),
        ("providers", "add", "openai", "--type", "openai"),
        ("tokens", "revoke", "ghost"),
        ("providers", "delete", "ghost"),
        ("tokens", "create", "has space"),
    ):
        result = cli(*args, "--data-dir", "fresh")
        assert_one_line_error(result)
        assert "created a new database" not in result.err
        assert not Path("fresh").exists()


def test_interceptions_list_refuses_an_unknown_client_naming_the_known_ones(cli: Cli) -> None:
    result = cli("interceptions", "list", "--client", "nonsense")
    assert result.code != 0
    assert_one_line_error(result)
    assert "'nonsense'" in result.err and "'Claude Code'" in result.err


def test_interceptions_list_says_when_a_page_is_full(cli: Cli, tmp_path: Path) -> None:
    import asyncio

    from aibridgeproxyd.config import load_config
    from aibridgeproxyd.store import Store

    assert cli("providers", "list").code == 0  # creates the database
    config = load_config(environ={})

    async def seed() -> None:
        store = await Store.open(config.database_path)
        try:
            await store.insert_interceptions([record_for_test(i) for i in range(3)])
        finally:
            await store.close()

    asyncio.run(seed())
    full = cli("interceptions", "list", "--limit", "2")
    assert full.code == 0 and len(json.loads(full.out)) == 2
    assert "there may be more" in full.err
    partial = cli("interceptions", "list", "--limit", "5")
    assert partial.code == 0 and len(json.loads(partial.out)) == 3
    assert "there may be more" not in partial.err


def test_interceptions_list_prints_reasoning_tokens_and_null_where_unreported(cli: Cli) -> None:
    import asyncio
    from dataclasses import replace

    from aibridgeproxyd.config import load_config
    from aibridgeproxyd.store import Store

    assert cli("providers", "list").code == 0  # creates the database
    config = load_config(environ={})

    async def seed() -> None:
        async with await Store.open(config.database_path) as store:
            reasoned = replace(record_for_test(1), output_tokens=300, reasoning_output_tokens=256)
            await store.insert_interceptions([record_for_test(0), reasoned])

    asyncio.run(seed())
    result = cli("interceptions", "list")
    assert result.code == 0
    printed = [(r["output_tokens"], r["reasoning_output_tokens"]) for r in json.loads(result.out)]
    assert printed == [(300, 256), (1, None)]  # newest first; null, not 0, when unreported


def test_interceptions_list_prints_provider_name_user_agent_and_masked_credential(
    cli: Cli,
) -> None:
    import asyncio
    from dataclasses import replace

    from aibridgeproxyd.config import load_config
    from aibridgeproxyd.store import Store

    assert cli("providers", "list").code == 0  # creates the database
    config = load_config(environ={})
    byok = replace(
        record_for_test(1), provider_name="team-openai", credential_kind="byok",
        credential_hint="sk-\u2026LAST", user_agent=None,
    )  # fmt: skip

    async def seed() -> None:
        async with await Store.open(config.database_path) as store:
            await store.insert_interceptions([record_for_test(0), byok])

    asyncio.run(seed())
    result = cli("interceptions", "list")
    assert result.code == 0
    fields = ("provider", "provider_name", "user_agent", "credential_kind", "credential_hint")
    assert [tuple(r[f] for f in fields) for r in json.loads(result.out)] == [
        ("openai", "team-openai", None, "byok", "sk-\u2026LAST"),
        ("openai", "openai", "curl/8.5.0", "central", "sk-\u2026WXYZ"),
    ]
    named = cli("interceptions", "list", "--provider", "team-openai")
    assert [r["credential_kind"] for r in json.loads(named.out)] == ["byok"]
    typed = cli("interceptions", "list", "--provider", "openai")
    assert len(json.loads(typed.out)) == 2


def seed_records(*records: Any) -> None:
    """Write interception records to the database the default configuration names."""
    import asyncio

    from aibridgeproxyd.config import load_config
    from aibridgeproxyd.store import Store

    async def seed() -> None:
        async with await Store.open(load_config(environ={}).database_path) as store:
            await store.insert_interceptions(list(records))

    asyncio.run(seed())


def claude_code_turn(session: str, first: int) -> list[Any]:
    """A prompt answered with a tool call, then the tool's result: one thread."""
    from dataclasses import replace

    from aibridgeproxyd.model import ToolCall

    call = replace(
        record_for_test(first), client="Claude Code", client_session_id=session,
        prompt=f"prompt of {session}", tool_calls=(ToolCall(f"toolu_{first}", "Read", "{}"),),
    )  # fmt: skip
    result = replace(
        record_for_test(first + 1), client="Claude Code", client_session_id=session,
        tool_result_ids=(f"toolu_{first}",),
    )  # fmt: skip
    return [call, result]


def test_sessions_list_and_show_print_the_data_api_shapes(cli: Cli) -> None:
    assert cli("providers", "list").code == 0  # creates the database
    seed_records(*claude_code_turn("s1", 0), *claude_code_turn("s2", 2))
    listed = cli("sessions", "list")
    assert listed.code == 0, listed.err
    printed = json.loads(listed.out)
    assert printed["count"] == 2
    assert [s["id"] for s in printed["sessions"]] == ["s2", "s1"]
    assert printed["sessions"][0]["last_prompt"] == "prompt of s2"
    assert printed["sessions"][0]["threads"] == 1
    shown = cli("sessions", "show", "s1")
    assert shown.code == 0, shown.err
    (thread,) = json.loads(shown.out)["threads"]
    assert thread["prompt"] == "prompt of s1"
    assert [i["id"] for i in thread["interceptions"]] == [
        record_for_test(0).request_id,
        record_for_test(1).request_id,
    ]
    assert thread["interceptions"][0]["tool_calls"] == [
        {"tool_call_id": "toolu_0", "tool": "Read", "input": "{}"}
    ]


def test_sessions_list_filters_and_pages_after_a_session_id(cli: Cli) -> None:
    assert cli("providers", "list").code == 0
    seed_records(*claude_code_turn("s1", 0), *claude_code_turn("s2", 2))
    only = json.loads(cli("sessions", "list", "--session-id", "s1").out)
    assert [s["id"] for s in only["sessions"]] == ["s1"]
    first = cli("sessions", "list", "--limit", "1")
    assert [s["id"] for s in json.loads(first.out)["sessions"]] == ["s2"]
    assert "--after-session-id s2" in first.err  # says how to get the rest
    rest = cli("sessions", "list", "--limit", "1", "--after-session-id", "s2")
    assert [s["id"] for s in json.loads(rest.out)["sessions"]] == ["s1"]
    assert rest.err == ""
    by_session = json.loads(cli("interceptions", "list", "--session-id", "s2").out)
    assert [r["session_id"] for r in by_session] == ["s2", "s2"]


@pytest.mark.parametrize(
    "args",
    [
        ("sessions", "show", "nope"),
        ("sessions", "list", "--after-session-id", "nope"),
        ("sessions", "list", "--client", "nonsense"),
        ("sessions", "list", "--limit", "0"),
        ("sessions", "list", "--started-after", "yesterday"),
    ],
)
def test_sessions_bad_input_is_one_line_error(cli: Cli, args: tuple[str, ...]) -> None:
    assert cli("providers", "list").code == 0
    seed_records(*claude_code_turn("s1", 0))
    result = cli(*args)
    assert_one_line_error(result)
    assert result.out == ""


def test_an_unknown_session_cursor_names_the_flag(cli: Cli) -> None:
    assert cli("providers", "list").code == 0
    result = cli("sessions", "list", "--after-session-id", "nope")
    assert_one_line_error(result)
    assert "--after-session-id: unknown session 'nope'" in result.err


def test_sessions_show_of_an_unknown_id_names_it_and_leaves_no_new_database(cli: Cli) -> None:
    result = cli("sessions", "show", "nope", "--data-dir", "fresh")
    assert_one_line_error(result)
    assert "session 'nope' does not exist" in result.err
    assert not Path("fresh").exists()


def record_for_test(index: int) -> Any:
    from aibridgeproxyd.model import InterceptionRecord

    started = f"2026-01-01T00:00:0{index}.000Z"
    return InterceptionRecord(
        request_id=f"00000000-0000-4000-8000-00000000000{index}",
        connect_id="c",
        initiator="alice",
        provider="openai",
        provider_type="openai",
        model="gpt-4o",
        client="Unknown",
        method="POST",
        path="/v1/chat/completions",
        status=200,
        streamed=False,
        input_tokens=1,
        output_tokens=1,
        cache_read_input_tokens=None,
        cache_creation_input_tokens=None,
        reasoning_output_tokens=None,
        provider_name="openai",
        user_agent="curl/8.5.0",
        credential_kind="central",
        credential_hint="sk-\u2026WXYZ",
        started_at=started,
        ended_at=started,
        ttfb_ms=1.0,
        duration_ms=1.0,
    )


@pytest.mark.parametrize(
    "display_name", ["\x1b[31mOpenAI\x1b[0m", "Open\nAI", "Open\x00AI", "Evil\u202eIAnepO", "A\tB"]
)
def test_a_display_name_with_control_characters_is_refused(cli: Cli, display_name: str) -> None:
    """Regression: ANSI escape sequences were stored and printed raw by `providers list`."""
    for args in (
        ("providers", "edit", "openai", "--display-name", display_name),
        ("providers", "add", "corp", "--type", "openai", "--display-name", display_name),
    ):
        result = cli(*args)
        assert result.code != 0
        assert "display name" in result.err and "control or invisible character" in result.err
        assert display_name not in result.err  # named escaped, never raw
    assert listed(cli)["openai"]["display_name"] == "OpenAI"


def test_a_control_character_written_behind_the_cli_is_printed_escaped(
    cli: Cli, isolated: Path
) -> None:
    assert cli("providers", "list").code == 0
    with sqlite3.connect(isolated / "data" / "aibridgeproxyd.db") as connection:
        connection.execute(
            "UPDATE providers SET display_name = ?, base_url = ? WHERE name = 'openai'",
            ("\x1b[2J", "https://api.openai.com/\x1b[31m"),
        )
    for args in (("providers", "list"), ("providers", "show", "openai")):
        result = cli(*args)
        assert "\x1b" not in result.out, args


@pytest.mark.parametrize(("given", "stored"), [("127.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1")])
def test_an_ipv4_provider_host_is_allowed_and_stored_as_its_dotted_quad(
    cli: Cli, given: str, stored: str
) -> None:
    """Decision: an IPv4 literal is a valid provider host (a self-hosted server reached by
    address, as base_url's host already is by default); every spelling is the dotted quad."""
    result = cli("providers", "add", "local", "--type", "openai-compat", "--base-url",
                 "https://10.0.0.5/v1", "--host", given)  # fmt: skip
    assert result.code == 0, result.err
    assert listed(cli)["local"]["hosts"] == [stored]
    refused = cli("providers", "edit", "local", "--host", "::1")
    assert refused.code != 0 and "invalid host '::1'" in refused.err


# --- keys rotate (README.md#secrets-at-rest) ---------------------------------------------------


def test_keys_rotate_moves_every_secret_to_the_first_key_and_an_unknown_key_is_one_line(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = (base64.b64encode(bytes([n]) * 32).decode() for n in (1, 2))
    old_id, new_id = (key_id(bytes([n]) * 32) for n in (1, 2))
    monkeypatch.setenv("AIBRIDGEPROXYD_ENCRYPTION_KEYS", old)
    assert cli("providers", "edit", "openai", "--key", "sk-rotate-me").code == 0
    monkeypatch.setenv("AIBRIDGEPROXYD_ENCRYPTION_KEYS", new)
    refused = cli("providers", "list")
    assert refused.code == 1 and refused.out == ""
    assert refused.err.count("\n") == 1 and f"key id {old_id}" in refused.err
    monkeypatch.setenv("AIBRIDGEPROXYD_ENCRYPTION_KEYS", f"{new},{old}")
    rotated = cli("keys", "rotate")
    assert rotated.code == 0, rotated.err
    assert rotated.out == (
        f"re-encrypted 1 secret with key {new_id}; every stored secret now uses it\n"
    )
    monkeypatch.setenv("AIBRIDGEPROXYD_ENCRYPTION_KEYS", new)
    assert listed(cli)["openai"]["key_count"] == 1
    assert "sk-rotate-me" not in "".join(db_dump())


def test_migrate_brings_an_old_database_to_the_latest_schema_and_exits(cli: Cli) -> None:
    from aibridgeproxyd.store import MIGRATIONS

    database = Path("data/aibridgeproxyd.db")
    database.parent.mkdir()
    with sqlite3.connect(database) as connection:
        connection.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        for statement in MIGRATIONS[0]:
            connection.execute(statement)
        connection.execute("INSERT INTO schema_version VALUES (1, '2026-01-01T00:00:00Z')")
    result = cli("migrate")
    assert result.code == 0, result.err
    assert result.out.endswith(f"migrated from schema version 1 to {len(MIGRATIONS)}\n")
    with sqlite3.connect(database) as connection:
        (version,) = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
    assert version == len(MIGRATIONS)
    again = cli("migrate")
    assert again.code == 0
    assert again.out.endswith(f"is at schema version {len(MIGRATIONS)}, the latest\n")


def test_policies_set_list_and_delete_share_the_apis_messages(cli: Cli) -> None:
    """The CLI's policy commands go through management.py, as the API does."""
    assert json.loads(cli("policies", "list").out) == []
    missing = cli("policies", "delete", "--user", "nobody")
    assert missing.code != 0 and "the policy of user 'nobody' does not exist" in missing.err
    typo = cli("policies", "set", "--user", "alice", "--rpm", "5")
    assert typo.code == 0 and "warning: no proxy token is named 'alice'" in typo.err
    assert cli("tokens", "create", "me").code != 0  # reserved: the API's name for the caller
    (listed,) = json.loads(cli("policies", "list").out)
    assert listed["user"] == "alice" and listed["rpm"] == 5
    assert cli("policies", "delete", "--user", "alice").code == 0
    assert json.loads(cli("policies", "list").out) == []
