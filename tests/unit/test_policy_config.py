"""The ``policies:`` configuration key: parsed and validated at load (errors name the key, the
entry and the field), YAML only, and seeded into the store once (docs/policies.md)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from aibridgeproxyd.config import ConfigError, load_config
from aibridgeproxyd.policy import Policy
from aibridgeproxyd.seeding import prepare_store

SEED = """
policies:
  - max_cost_usd: 5
    period: day
    rpm: 60
  - user: alice
    provider: openai
    models: ["gpt-4o*"]
"""


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\n{text}")
    return path


def test_policies_load_as_validated_policies(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, SEED), environ={})
    assert config.policies == (
        Policy(max_cost_usd=Decimal(5), period="day", rpm=60),
        Policy(user="alice", provider="openai", models=("gpt-4o*",)),
    )


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("policies: {rpm: 5}", "expected a list"),
        ("policies: [{rpm: 0}]", "entry 0: rpm"),
        ("policies: [{max_cost_usd: 5}]", "entry 0: period"),
        ("policies: [{rpm: 5}, {rpm: 6}]", "entry 1: a second policy"),
        ("policies: [{rpn: 5}]", "entry 0: unknown field 'rpn'"),
        ("policies: [{user: 'a b', rpm: 1}]", "entry 0: user"),
    ],
)
def test_a_bad_policy_is_refused_at_load_naming_the_key_and_field(
    tmp_path: Path, text: str, named: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(config_file(tmp_path, text), environ={})
    assert "policies" in str(refused.value) and named in str(refused.value)


async def test_the_seed_is_stored_once_and_a_deleted_policy_stays_deleted(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, SEED), environ={})
    async with await prepare_store(config, environ={}) as store:
        assert len(await store.list_policies()) == 2
        await store.delete_policy(None)
        await store.set_policy(Policy(user="alice", provider="openai", rpm=1))
    async with await prepare_store(config, environ={}) as store:
        policies = await store.list_policies()
    assert [(p.key, p.rpm, p.models) for p in policies] == [(("alice", "openai"), 1, None)]
