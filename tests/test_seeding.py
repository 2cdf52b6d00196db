"""One-time seeding (docs/providers.md#how-seeding-works): parsing the YAML list and
CODER_AI_GATEWAY_PROVIDER_*, inserting once, tombstones, drift, the deprecation warning, and the
CLI's lenient mode."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from aibridgeproxyd.cli import main
from aibridgeproxyd.config import Config, ConfigError, load_config
from aibridgeproxyd.model import ProviderRecord
from aibridgeproxyd.seeding import (
    ENVIRONMENT_PREFIX,
    SeedError,
    collect_seeds,
    drifted_fields,
    initialize,
    parse_config_seeds,
    parse_environment_seeds,
    prepare_store,
)
from aibridgeproxyd.store import Store, read_routing_state

P = ENVIRONMENT_PREFIX
SECRETS = ("sk-SECRET-one", "sk-SECRET-two", "AKIA-SECRET-ID", "aws-SECRET-access")


def bedrock_env(index: int = 0) -> dict[str, str]:
    values = {
        "TYPE": "bedrock",
        "BEDROCK_REGION": "eu-west-1",
        "BEDROCK_ACCESS_KEY": SECRETS[2],
        "BEDROCK_ACCESS_KEY_SECRET": SECRETS[3],
        "BEDROCK_MODEL": "anthropic.claude-sonnet-4-5",
        "BEDROCK_SMALL_FAST_MODEL": "anthropic.claude-haiku-4-5",
    }
    return {f"{P}{index}_{suffix}": value for suffix, value in values.items()}


BEDROCK_ENV = bedrock_env()


def env(**suffixes: str) -> dict[str, str]:
    """``env(_0_TYPE="openai")`` -> ``{"CODER_AI_GATEWAY_PROVIDER_0_TYPE": "openai"}``."""
    return {P + suffix.lstrip("_"): value for suffix, value in suffixes.items()}


def config_for(tmp_path: Path, providers: list[dict[str, Any]] | None = None) -> Config:
    flags: dict[str, Any] = {"data_dir": str(tmp_path / "data")}
    if providers is not None:
        flags["providers"] = providers
    return load_config(None, flags, {})


async def rows(config: Config, environ: dict[str, str] | None = None) -> dict[str, ProviderRecord]:
    async with await prepare_store(config, environ or {}) as store:
        return {record.name: record for record in await store.list_providers()}


@pytest.fixture
def no_seed_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLI reads os.environ: start every CLI test from a clean one."""
    for name in list(os.environ):
        if name.startswith((P, "AIBRIDGEPROXYD_")):
            monkeypatch.delenv(name)
    yield


# --- parsing the environment -----------------------------------------------------------------


def test_environment_seeds_follow_index_order_and_name_defaults_to_type() -> None:
    seeds = parse_environment_seeds(
        {
            **env(_0_TYPE="openai", _0_KEY=SECRETS[0]),
            **env(_1_TYPE="openai-compat", _1_NAME="local", _1_BASE_URL="http://llm.corp:8000/v1/"),
            "CODER_AI_GATEWAY_OTHER": "ignored",
            "PATH": "/bin",
        }
    )
    assert [(s.record.name, s.record.type) for s in seeds] == [
        ("openai", "openai"),
        ("local", "openai-compat"),
    ]
    assert [s.source for s in seeds] == [f"{P}0_*", f"{P}1_*"]
    openai, local = (s.record for s in seeds)
    assert openai.keys == (SECRETS[0],) and openai.base_url == ""
    assert openai.enabled and openai.allow_byok and openai.display_name == "openai"
    assert local.base_url == "http://llm.corp:8000/v1" and local.keys == ()


def test_no_seed_variables_means_no_seeds() -> None:
    assert parse_environment_seeds({"HOME": "/root", "CODER_AI_GATEWAY_ENABLED": "1"}) == ()


def test_keys_is_split_on_commas_and_key_is_taken_whole() -> None:
    (many,) = parse_environment_seeds(env(_0_TYPE="openai", _0_KEYS=" a1 , b2,,c3, "))
    assert many.record.keys == ("a1", "b2", "c3")
    (one,) = parse_environment_seeds(env(_0_TYPE="openai", _0_KEY="key,with,commas"))
    assert one.record.keys == ("key,with,commas",)


def test_empty_variables_count_as_unset() -> None:
    (seed,) = parse_environment_seeds(
        env(_0_TYPE="anthropic", _0_NAME="", _0_KEY=" ", _0_BASE_URL="")
    )
    assert seed.record == parse_environment_seeds(env(_0_TYPE="anthropic"))[0].record
    assert seed.record.name == "anthropic" and seed.record.keys == ()


def test_bedrock_suffixes_map_to_settings() -> None:
    (seed,) = parse_environment_seeds(BEDROCK_ENV)
    assert seed.record.name == "bedrock"
    assert dict(seed.record.settings) == {
        "region": "eu-west-1",
        "access_key_id": SECRETS[2],
        "secret_access_key": SECRETS[3],
        "model": "anthropic.claude-sonnet-4-5",
        "small_fast_model": "anthropic.claude-haiku-4-5",
    }


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        pytest.param(
            env(_0_TYPE="openai", _2_TYPE="anthropic"),
            f"invalid environment variable {P}2_TYPE: provider indices start at 0 and are "
            f"contiguous, but no {P}1_* variable is set",
            id="gap",
        ),
        pytest.param(
            env(_1_TYPE="openai", _1_KEY=SECRETS[0]),
            f"invalid environment variable {P}1_KEY: provider indices start at 0",
            id="not-from-zero",
        ),
        pytest.param(
            env(_0_TYPE="openai", _0_KEYZ=SECRETS[0]),
            f"invalid environment variable {P}0_KEYZ: unknown suffix 'KEYZ'; valid suffixes: "
            "TYPE, NAME, KEY, KEYS, BASE_URL, BEDROCK_REGION",
            id="unknown-suffix",
        ),
        pytest.param(
            env(_0_TYPE="openai", _0_BEDROCK_BASE_URL="https://x"),
            f"{P}0_BEDROCK_BASE_URL: unknown suffix 'BEDROCK_BASE_URL'",
            id="unknown-bedrock-suffix",
        ),
        pytest.param(
            env(_X_TYPE="openai"),
            f"invalid environment variable {P}X_TYPE: expected {P}<N>_<SUFFIX> with N a number",
            id="non-integer-index",
        ),
        pytest.param(
            env(_01_TYPE="openai"), f"{P}01_TYPE: expected {P}<N>_<SUFFIX>", id="leading-zero"
        ),
        pytest.param({f"{P}0": "openai"}, f"{P}0: expected {P}<N>_<SUFFIX>", id="no-suffix"),
        pytest.param(
            env(_0_KEY=SECRETS[0]),
            f"environment variable {P}0_TYPE is missing or empty, but other {P}0_* variables "
            "are set",
            id="missing-type",
        ),
        pytest.param(
            env(_0_TYPE="openia"),
            f"invalid environment variable {P}0_TYPE: unknown provider type 'openia'; valid "
            "types: anthropic, azure, bedrock",
            id="unknown-type",
        ),
        pytest.param(
            env(_0_TYPE="openai", _0_NAME="Corp LLM"),
            f"invalid environment variable {P}0_NAME: invalid provider name 'Corp LLM'",
            id="bad-name",
        ),
        pytest.param(
            env(_0_TYPE="openai", _0_BASE_URL="ftp://x"),
            f"invalid environment variable {P}0_BASE_URL: base_url 'ftp://x' must start with",
            id="bad-base-url",
        ),
        pytest.param(
            env(_0_TYPE="openai-compat"),
            f"invalid environment variables {P}0_*: provider type 'openai-compat' has no "
            "default base_url",
            id="base-url-required",
        ),
        pytest.param(
            env(_0_TYPE="openai", _0_KEY=SECRETS[0], _0_KEYS=SECRETS[1]),
            f"environment variables {P}0_KEY and {P}0_KEYS are both set; set one",
            id="key-and-keys",
        ),
        pytest.param(
            env(_0_TYPE="openai", _0_KEYS=",".join(f"{SECRETS[0]}{i}" for i in range(6))),
            f"invalid environment variable {P}0_KEYS: 6 keys given; at most 5 are allowed",
            id="too-many-keys",
        ),
        pytest.param(
            env(_0_TYPE="copilot", _0_KEY=SECRETS[0]),
            f"invalid environment variable {P}0_KEY: provider type 'copilot' takes no keys "
            "(it always uses the user's own credential)",
            id="key-on-copilot",
        ),
        pytest.param(
            {**BEDROCK_ENV, f"{P}0_KEYS": SECRETS[0]},
            f"invalid environment variable {P}0_KEYS: provider type 'bedrock' takes no keys "
            "(it signs requests with the BEDROCK_* credentials)",
            id="keys-on-bedrock",
        ),
        pytest.param(
            env(_0_TYPE="anthropic", _0_BEDROCK_ACCESS_KEY_SECRET=SECRETS[3]),
            f"invalid environment variable {P}0_BEDROCK_ACCESS_KEY_SECRET: applies only to "
            "TYPE=bedrock, not 'anthropic'",
            id="bedrock-setting-on-anthropic",
        ),
        pytest.param(
            env(_0_TYPE="openai", _1_TYPE="anthropic", _1_NAME="openai"),
            f"provider 'openai' is seeded twice, by {P}0_* and by {P}1_*; keep one",
            id="duplicate-name",
        ),
    ],
)
def test_bad_environment_is_refused_naming_the_variable_never_a_key(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(SeedError) as raised:
        parse_environment_seeds(environ)
    assert isinstance(raised.value, ConfigError)  # the daemon and the CLI report it as such
    assert message in str(raised.value)
    for secret in SECRETS:
        assert secret not in str(raised.value)


def test_credentials_in_a_base_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(SeedError) as raised:
        parse_environment_seeds(
            env(_0_TYPE="openai", _0_BASE_URL=f"https://user:{SECRETS[0]}@llm.corp/v1")
        )
    assert f"{P}0_BASE_URL" in str(raised.value)
    assert SECRETS[0] not in str(raised.value)


# --- parsing the YAML list --------------------------------------------------------------------


def test_yaml_seeds_are_compared_on_the_fields_they_name() -> None:
    (seed,) = parse_config_seeds(
        [{"name": "corp", "type": "azure", "hosts": "api.openai.com",
          "base_url": "https://corp.example", "settings": {"api_version": "v1"}}]
    )  # fmt: skip
    assert seed.record.hosts == ("api.openai.com",)
    assert seed.compared == {"type", "hosts", "base_url", "settings.api_version"}
    assert seed.source == "config key 'providers' entry 0 ('corp')"
    assert not seed.from_environment


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "corp"}, "field 'type' is required"),
        ({"name": "corp", "type": "nope"}, "unknown provider type 'nope'"),
        ({"name": "corp", "type": "openai", "colour": "red"}, "unknown field 'colour'"),
        ({"name": "corp", "type": "openai", "enabled": "maybe"}, "expected true or false"),
        (
            {"name": "corp", "type": "openai", "settings": {"region": "eu"}},
            "provider type 'openai' has no setting 'region'; it has no settings",
        ),
        ({"name": "corp", "type": "openai", "hosts": ["*.x.test"]}, "wildcards are not supported"),
    ],
)
async def test_invalid_yaml_seed_is_a_config_error_and_creates_nothing(
    tmp_path: Path, entry: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        await prepare_store(config_for(tmp_path, [entry]), {})
    assert not (tmp_path / "data").exists()


def test_yaml_seed_listed_twice_is_refused() -> None:
    with pytest.raises(SeedError, match="provider 'a' is seeded twice, by config key"):
        parse_config_seeds([{"name": "a", "type": "openai"}, {"name": "a", "type": "openai"}])


def test_a_name_in_both_yaml_and_environment_is_refused(tmp_path: Path) -> None:
    config = config_for(tmp_path, [{"name": "openai", "type": "openai"}])
    with pytest.raises(
        SeedError,
        match=re.escape(
            f"provider 'openai' is seeded twice, by config key 'providers' entry 0 ('openai') "
            f"and by {P}0_*"
        ),
    ):
        collect_seeds(config, env(_0_TYPE="openai"))


# --- drift -------------------------------------------------------------------------------------


def test_drift_covers_what_the_environment_can_express_and_nothing_else() -> None:
    (seed,) = parse_environment_seeds(env(_0_TYPE="openai", _0_KEYS=f"{SECRETS[0]},{SECRETS[1]}"))
    stored = replace(seed.record, created_at="2026-01-01T00:00:00Z")
    assert drifted_fields(seed, stored) == []
    # Operator-only fields and key order are not drift.
    operator_changes = replace(
        stored,
        keys=tuple(reversed(stored.keys)),
        enabled=False,
        allow_byok=False,
        display_name="Corp",
        hosts=("llm.corp",),
        settings={"note": "x"},
    )
    assert drifted_fields(seed, operator_changes) == []
    changed = replace(stored, type="openrouter", base_url="https://x/v1", keys=(SECRETS[0],))
    assert drifted_fields(seed, changed) == ["base_url", "keys", "type"]


def test_bedrock_drift_includes_every_bedrock_setting() -> None:
    (seed,) = parse_environment_seeds(BEDROCK_ENV)
    stored = replace(seed.record, settings={**seed.record.settings, "session_token": "t"})
    assert drifted_fields(seed, stored) == []
    settings = {**seed.record.settings, "model": "other"}
    del settings["small_fast_model"]
    assert drifted_fields(seed, replace(stored, settings=settings)) == [
        "settings.model",
        "settings.small_fast_model",
    ]


# --- applying: once, tombstones, drift ----------------------------------------------------------


async def test_fresh_database_without_seeds_gets_the_default_providers(tmp_path: Path) -> None:
    records = await rows(config_for(tmp_path))
    assert [(r.name, r.type) for r in records.values()] == [
        ("anthropic", "anthropic"),
        ("openai", "openai"),
    ]
    for record in records.values():
        assert record.enabled and record.allow_byok
        assert record.keys == () and record.hosts == () and record.base_url == ""


async def test_deleted_default_provider_is_not_recreated(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    async with await prepare_store(config, {}) as store:
        await store.delete_provider("openai")
    assert list(await rows(config)) == ["anthropic"]


async def test_environment_seeds_replace_the_defaults_and_are_inserted_once(
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path)
    environ = {**env(_0_TYPE="openai", _0_NAME="corp", _0_KEY=SECRETS[0]), **bedrock_env(1)}
    first = await rows(config, environ)
    assert set(first) == {"corp", "bedrock"}
    assert first["corp"].keys == (SECRETS[0],)
    assert first["bedrock"].settings["region"] == "eu-west-1"

    async with await Store.open(config.database_path) as store:
        generation = await store.generation()
        # An operator change the environment cannot express: kept, and not drift.
        await store.update_provider(replace(first["corp"], enabled=False))
    second = await rows(config, environ)
    assert not second["corp"].enabled
    assert second["bedrock"] == first["bedrock"]
    async with await Store.open(config.database_path) as store:
        assert await store.generation() == generation + 1  # only the operator's write


async def test_yaml_seeds_replace_the_defaults_and_are_inserted_once(tmp_path: Path) -> None:
    seeds = [{"name": "corp", "type": "openai", "keys": ["sk-1"], "hosts": "api.openai.com"}]
    config = config_for(tmp_path, seeds)
    async with await prepare_store(config, {}) as store:
        (corp,) = await store.list_providers()
        await store.update_provider(replace(corp, enabled=False))
    (corp,) = (await rows(config)).values()
    assert corp.keys == ("sk-1",) and corp.hosts == ("api.openai.com",)
    assert not corp.enabled  # a later start leaves the operator's change alone


async def test_deleted_environment_seed_is_not_recreated_and_does_not_fail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_for(tmp_path)
    environ = env(_0_TYPE="openai", _0_KEY=SECRETS[0], _1_TYPE="anthropic")
    async with await prepare_store(config, environ) as store:
        await store.delete_provider("openai")
    caplog.set_level(logging.INFO, "aibridgeproxyd.seeding")
    assert list(await rows(config, environ)) == ["anthropic"]
    assert (
        f"provider 'openai' from {P}0_* was deleted by an operator and is not recreated"
        in caplog.text
    )


async def test_environment_drift_refuses_to_start_and_writes_nothing(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    await rows(config, env(_0_TYPE="openai", _0_KEY=SECRETS[0]))
    drifted = env(
        _0_TYPE="openai",
        _0_KEY=SECRETS[1],
        _0_BASE_URL="https://llm.corp/v1",
        _1_TYPE="anthropic",  # new: must not be inserted by a refused start
    )
    with pytest.raises(SeedError) as raised:
        await prepare_store(config, drifted)
    message = str(raised.value)
    assert message.startswith(
        f"{P}0_* differs from the stored provider 'openai' (base_url, keys). Seeding is "
        "one-time and the provider table is now the source of truth: remove the "
        f"{P}* variables to keep the stored provider, or apply the environment's values with "
        f'`aibridgeproxyd providers edit openai --base-url https://llm.corp/v1 --key "${P}0_KEY"`'
    )
    assert "\n" not in message
    for secret in SECRETS:
        assert secret not in message
    async with await Store.open(config.database_path) as store:
        assert [r.name for r in await store.list_providers()] == ["openai"]


async def test_drift_hint_for_bedrock_refers_to_secret_variables_by_name(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    await rows(config, {**BEDROCK_ENV, f"{P}0_NAME": "anthropic"})
    changed = {
        **BEDROCK_ENV,
        f"{P}0_NAME": "anthropic",
        f"{P}0_BEDROCK_ACCESS_KEY_SECRET": "aws-SECRET-rotated",
        f"{P}0_BEDROCK_MODEL": "",
        f"{P}0_BEDROCK_REGION": "us-east-1",
    }
    with pytest.raises(SeedError) as raised:
        await prepare_store(config, changed)
    message = str(raised.value)
    assert "(settings.model, settings.region, settings.secret_access_key)" in message
    assert (
        "`aibridgeproxyd providers edit anthropic --unset model --set region=us-east-1 "
        f'--set secret_access_key="${P}0_BEDROCK_ACCESS_KEY_SECRET"`'
    ) in message
    assert "aws-SECRET-rotated" not in message and SECRETS[3] not in message


async def test_drift_hint_for_a_type_change_and_several_keys(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    await rows(config, {})  # the defaults: openai, anthropic
    environ = env(_0_TYPE="openrouter", _0_NAME="openai", _0_KEYS=f"{SECRETS[0]},{SECRETS[1]}")
    with pytest.raises(SeedError) as raised:
        await prepare_store(config, environ)
    assert (
        f"`echo \"${P}0_KEYS\" | tr , '\\n' | aibridgeproxyd providers edit openai --key-stdin "
        "--type openrouter`"
    ) in str(raised.value)


async def test_yaml_drift_is_a_warning_and_keeps_the_stored_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_for(tmp_path, [{"name": "corp", "type": "openai", "keys": [SECRETS[0]]}])
    async with await prepare_store(config, {}) as store:
        (corp,) = await store.list_providers()
        await store.update_provider(replace(corp, keys=(SECRETS[1],)))
    caplog.set_level(logging.WARNING, "aibridgeproxyd.seeding")
    (corp,) = (await rows(config)).values()
    assert corp.keys == (SECRETS[1],)
    assert (
        "config key 'providers' entry 0 ('corp') differs from the stored provider 'corp' (keys); "
        "the stored row is kept"
    ) in caplog.text
    assert SECRETS[0] not in caplog.text and SECRETS[1] not in caplog.text


async def test_lenient_mode_warns_on_drift_and_still_seeds_new_providers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_for(tmp_path)
    await rows(config, env(_0_TYPE="openai", _0_KEY=SECRETS[0]))
    caplog.set_level(logging.WARNING, "aibridgeproxyd.seeding")
    drifted = env(_0_TYPE="openai", _0_KEY=SECRETS[1], _1_TYPE="anthropic")
    async with await prepare_store(config, drifted, refuse_drift=False) as store:
        assert [r.name for r in await store.list_providers()] == ["anthropic", "openai"]
    assert (
        "the daemon refuses to start until this is resolved: "
        f"{P}0_* differs from the stored provider 'openai' (keys)"
    ) in caplog.text


async def test_seeding_logs_a_deprecation_warning_naming_the_sources(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "aibridgeproxyd.seeding")
    await rows(config_for(tmp_path))
    assert "deprecated" not in caplog.text
    config = config_for(tmp_path, [{"name": "corp", "type": "openai"}])
    await rows(config, env(_0_TYPE="anthropic"))
    assert (
        "seeding providers from the 'providers' config key and "
        f"{P}* environment variables is deprecated"
    ) in caplog.text
    assert "manage providers with 'aibridgeproxyd providers ...'" in caplog.text


async def test_legacy_prefix_is_not_read_but_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "aibridgeproxyd.seeding")
    records = await rows(config_for(tmp_path), {"CODER_AIBRIDGE_PROVIDER_0_TYPE": "openai"})
    assert list(records) == ["anthropic", "openai"]  # the defaults: nothing was seeded
    assert "CODER_AIBRIDGE_PROVIDER_* environment variables" in caplog.text
    assert "CODER_AIBRIDGE_PROVIDER_0_TYPE" in caplog.text


async def test_daemon_helpers_initialize_then_read_routing_state(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    await initialize(config, {})
    async with await Store.open(config.database_path) as opened:
        await opened.insert_token("alice", "a" * 64)
    state = await read_routing_state(config.database_path)
    providers, tokens = state.providers, state.tokens
    assert [p.name for p in providers] == ["anthropic", "openai"]
    assert [t.name for t in tokens] == ["alice"]


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_bad_environment_exits_2_with_one_line_and_creates_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_seed_environment: None,
) -> None:
    monkeypatch.setenv(f"{P}0_TYPE", "openai")
    monkeypatch.setenv(f"{P}0_TOKEN", SECRETS[0])
    code = main(["providers", "list", "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"error: invalid environment variable {P}0_TOKEN: unknown suffix 'TOKEN'; valid "
        "suffixes: TYPE, NAME, KEY, KEYS, BASE_URL, BEDROCK_REGION, BEDROCK_ACCESS_KEY, "
        "BEDROCK_ACCESS_KEY_SECRET, BEDROCK_MODEL, BEDROCK_SMALL_FAST_MODEL\n"
    )
    assert not (tmp_path / "data").exists()


def test_cli_still_runs_on_drift_so_that_edit_can_resolve_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_seed_environment: None,
) -> None:
    config = config_for(tmp_path)
    asyncio.run(rows(config, env(_0_TYPE="openai", _0_KEY=SECRETS[0])))
    monkeypatch.setenv(f"{P}0_TYPE", "openai")
    monkeypatch.setenv(f"{P}0_KEY", SECRETS[1])
    caplog.set_level(logging.WARNING, "aibridgeproxyd.seeding")
    edit = ["providers", "edit", "openai", "--key", SECRETS[1]]
    assert main([*edit, "--data-dir", str(tmp_path / "data")]) == 0
    assert f"{P}0_* differs from the stored provider 'openai' (keys)" in caplog.text
    assert SECRETS[0] not in caplog.text
    # Resolved: a daemon start with this environment now passes.
    resolved = asyncio.run(rows(config, env(_0_TYPE="openai", _0_KEY=SECRETS[1])))
    assert resolved["openai"].keys == (SECRETS[1],)
