"""aibridgeproxyd.management on a real store in a temporary directory: the provider view,
PATCH semantics (keys by id, settings merged with masked secrets kept), errors naming the
field, and tokens."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aibridgeproxyd import management
from aibridgeproxyd.management import (
    Conflict,
    InvalidInput,
    KeyChange,
    ManagementError,
    NotFound,
    ProviderPatch,
)
from aibridgeproxyd.model import InterceptionRecord, ProviderRecord
from aibridgeproxyd.store import RecordError, Store
from aibridgeproxyd.tokens import hash_token

KEY_ONE = "sk-proj-SECRETKEYONE-0001"
KEY_TWO = "sk-proj-SECRETKEYTWO-0002"
KEY_THREE = "sk-proj-SECRETKEYTHREE-03"
AWS_SECRET = "AWS-SECRET-ACCESS-KEY-VALUE"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(tmp_path / "db.sqlite") as opened:
        yield opened


def corp(**fields: Any) -> ProviderRecord:
    base = ProviderRecord(
        name="corp",
        type="openai-compat",
        base_url="https://llm.corp.example/v1",
        hosts=("llm.corp.example",),
        keys=(KEY_ONE, KEY_TWO),
    )
    return dataclasses.replace(base, **fields)


def bedrock(**settings: Any) -> ProviderRecord:
    return ProviderRecord(
        name="aws",
        type="bedrock",
        hosts=("claude.corp.example",),
        settings={
            "region": "us-east-1",
            "access_key_id": "AKIDEXAMPLE",
            "secret_access_key": AWS_SECRET,
            **settings,
        },
    )


async def stored_settings(store: Store, name: str) -> dict[str, Any]:
    record = await store.get_provider(name)
    assert record is not None
    return dict(record.settings)


async def test_created_provider_view_has_the_api_fields_and_masks_every_key(store: Store) -> None:
    view = await management.create_provider(store, corp())
    assert list(view) == [
        "name", "type", "display_name", "enabled", "status", "status_reason", "base_url",
        "hosts", "allow_byok", "api_keys", "settings", "created_at", "updated_at",
    ]  # fmt: skip
    assert view["status"] == "enabled" and view["display_name"] == "corp"
    assert [key["masked"] for key in view["api_keys"]] == ["sk-\u20260001", "sk-\u20260002"]
    assert all(len(key["id"]) == 12 and key["created_at"] for key in view["api_keys"])
    assert KEY_ONE not in json.dumps(view) and KEY_TWO not in json.dumps(view)


async def test_view_masks_secret_settings_at_any_depth(store: Store) -> None:
    await management.create_provider(store, bedrock())
    view = await management.get_provider(store, "aws")
    assert view["settings"] == {
        "region": "us-east-1",
        "access_key_id": "***",  # "key" in the name: a secret whatever the type says
        "secret_access_key": "***",
    }
    assert management.mask_settings("azure", {"deployments": {"password": "x", "a": "b"}}) == {
        "deployments": {"password": "***", "a": "b"}
    }


async def test_list_evaluates_status_like_the_reload(store: Store) -> None:
    await management.create_provider(store, corp(hosts=("api.openai.com",), name="a-first"))
    await management.create_provider(store, ProviderRecord(name="openai", type="openai"))
    views = {view["name"]: view for view in await management.list_providers(store)}
    assert views["openai"]["status"] == "error"
    assert "claimed by provider 'a-first'" in views["openai"]["status_reason"]


async def test_patch_keeps_adds_and_deletes_keys_by_id(store: Store) -> None:
    view = await management.create_provider(store, corp())
    first, second = (key["id"] for key in view["api_keys"])
    patch = ProviderPatch(api_keys=[KeyChange(api_key=KEY_THREE), KeyChange(id=second)])
    patched = await management.update_provider(store, "corp", patch)
    ids = [key["id"] for key in patched["api_keys"]]
    assert ids[1] == second and ids[0] not in (first, second)
    assert [key["masked"] for key in patched["api_keys"]] == ["sk-\u2026E-03", "sk-\u20260002"]
    record = await store.get_provider("corp")
    assert record is not None and record.keys == (KEY_THREE, KEY_TWO)


async def test_patch_without_api_keys_leaves_the_keys_and_other_fields(store: Store) -> None:
    before = await management.create_provider(store, corp(display_name="Corp"))
    after = await management.update_provider(store, "corp", ProviderPatch(enabled=False))
    assert after["api_keys"] == before["api_keys"]
    assert after["display_name"] == "Corp" and after["status"] == "disabled"
    assert after["hosts"] == before["hosts"] and after["base_url"] == before["base_url"]


@pytest.mark.parametrize(
    ("entries", "field", "message"),
    [
        ([KeyChange(id="000000000000")], "api_keys[0].id", "has no key with id '000000000000'"),
        ([KeyChange()], "api_keys[0]", "either 'id' (keep) or 'api_key' (add)"),
        ([KeyChange(id="x", api_key="y")], "api_keys[0]", "either 'id'"),
        ([KeyChange(api_key="bad key")], "api_keys", "key #1 has a character"),
        ([KeyChange(api_key=f"k{i}") for i in range(6)], "api_keys", "at most 5"),
    ],
)
async def test_bad_api_keys_name_the_field_and_change_nothing(
    store: Store, entries: list[KeyChange], field: str, message: str
) -> None:
    await management.create_provider(store, corp())
    before = await store.get_provider("corp")
    with pytest.raises(InvalidInput) as raised:
        await management.update_provider(store, "corp", ProviderPatch(api_keys=entries))
    assert raised.value.field == field and message in str(raised.value)
    assert KEY_ONE not in str(raised.value)
    assert await store.get_provider("corp") == before


async def test_a_key_id_listed_twice_is_refused(store: Store) -> None:
    view = await management.create_provider(store, corp())
    key_id = view["api_keys"][0]["id"]
    with pytest.raises(InvalidInput) as raised:
        await management.update_provider(
            store, "corp", ProviderPatch(api_keys=[KeyChange(id=key_id), KeyChange(id=key_id)])
        )
    assert raised.value.field == "api_keys[1].id"


async def test_patch_settings_sent_back_masked_keeps_the_stored_secret(store: Store) -> None:
    await management.create_provider(store, bedrock())
    view = await management.get_provider(store, "aws")
    edited = {**view["settings"], "region": "eu-west-1"}  # the view, edited and sent back
    patched = await management.update_provider(store, "aws", ProviderPatch(settings=edited))
    assert patched["settings"]["region"] == "eu-west-1"
    assert await stored_settings(store, "aws") == {
        "region": "eu-west-1",
        "access_key_id": "AKIDEXAMPLE",
        "secret_access_key": AWS_SECRET,
    }


async def test_patch_settings_replaces_a_secret_sent_anew_and_removes_a_null(
    store: Store,
) -> None:
    await management.create_provider(store, bedrock(session_token="TOKEN-1"))
    patch = ProviderPatch(settings={"secret_access_key": "NEW-SECRET", "session_token": None})
    await management.update_provider(store, "aws", patch)
    assert await stored_settings(store, "aws") == {
        "region": "us-east-1",
        "access_key_id": "AKIDEXAMPLE",  # not given: untouched
        "secret_access_key": "NEW-SECRET",
    }


async def test_a_masked_secret_with_nothing_stored_is_refused_naming_it(store: Store) -> None:
    await management.create_provider(store, bedrock())
    with pytest.raises(InvalidInput) as raised:
        await management.update_provider(
            store, "aws", ProviderPatch(settings={"session_token": "***"})
        )
    assert raised.value.field == "settings.session_token"


async def test_nested_masked_secret_keeps_the_stored_one(store: Store) -> None:
    record = ProviderRecord(
        name="az",
        type="azure",
        base_url="https://az.example",
        settings={"deployments": {"password": "hunter2-secret", "gpt-4o": "prod"}},
    )
    await management.create_provider(store, record)
    sent = {"deployments": {"password": "***", "gpt-4o": "canary"}}
    await management.update_provider(store, "az", ProviderPatch(settings=sent))
    assert await stored_settings(store, "az") == {
        "deployments": {"password": "hunter2-secret", "gpt-4o": "canary"}
    }


async def test_an_unknown_setting_is_refused_naming_it(store: Store) -> None:
    with pytest.raises(InvalidInput) as raised:
        await management.create_provider(store, bedrock(regoin="us-east-1"))
    assert raised.value.field == "settings.regoin"
    assert "has no setting 'regoin'" in str(raised.value)
    assert await store.get_provider("aws") is None


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (corp(name="Bad_Name"), "name"),
        (corp(type="nope"), "type"),
        (corp(base_url="ftp://x.example"), "base_url"),
        (corp(hosts=("*.x.example",)), "hosts"),
        (corp(display_name="a\x1bb"), "display_name"),
        (corp(keys=("",)), "api_keys"),
    ],
)
async def test_create_errors_name_the_field(
    store: Store, record: ProviderRecord, field: str
) -> None:
    with pytest.raises(InvalidInput) as raised:
        await management.create_provider(store, record)
    assert raised.value.field == field


async def test_duplicates_conflict_and_missing_names_are_not_found(store: Store) -> None:
    await management.create_provider(store, corp())
    with pytest.raises(Conflict) as conflict:
        await management.create_provider(store, corp())
    assert conflict.value.field == "name"
    for call in (
        management.get_provider(store, "ghost"),
        management.update_provider(store, "ghost", ProviderPatch(enabled=True)),
        management.set_provider_enabled(store, "ghost", False),
        management.delete_provider(store, "ghost"),
        management.revoke_proxy_token(store, "ghost"),
        management.revoke_admin_token(store, "ghost"),
    ):
        with pytest.raises(NotFound):
            await call


async def test_errors_are_record_errors_so_the_cli_exits_2() -> None:
    assert issubclass(ManagementError, RecordError)


async def test_deleted_provider_leaves_a_tombstone(store: Store) -> None:
    await management.create_provider(store, corp())
    await management.delete_provider(store, "corp")
    assert await store.was_deleted("corp")
    assert [view["name"] for view in await management.list_providers(store)] == []


async def test_enable_and_disable(store: Store) -> None:
    await management.create_provider(store, corp())
    assert (await management.set_provider_enabled(store, "corp", False))["status"] == "disabled"
    assert (await management.set_provider_enabled(store, "corp", True))["status"] == "enabled"


def interception(initiator: str, started_at: str) -> InterceptionRecord:
    fields: dict[str, Any] = {
        field.name: None
        for field in dataclasses.fields(InterceptionRecord)
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    }
    fields.update(
        request_id=f"req-{initiator}-{started_at}",
        connect_id="c",
        initiator=initiator,
        provider="openai",
        provider_type="openai",
        client="Unknown",
        method="POST",
        path="/v1/chat/completions",
        streamed=False,
        started_at=started_at,
        ended_at=started_at,
        ttfb_ms=1.0,
        duration_ms=1.0,
    )
    return InterceptionRecord(**fields)


async def test_proxy_tokens_show_last_use_from_the_records(store: Store) -> None:
    created = await management.create_proxy_token(store, "alice")
    assert created["name"] == "alice" and created["token"]
    assert await store.token_owner(hash_token(created["token"])) == ("proxy", "alice")
    await management.create_proxy_token(store, "bob")
    await store.insert_interceptions(
        [
            interception("alice", "2026-01-01T00:00:01.000Z"),
            interception("alice", "2026-01-02T00:00:01.000Z"),
        ]
    )
    listed = {token["name"]: token for token in await management.list_proxy_tokens(store)}
    assert listed["alice"]["last_used_at"] == "2026-01-02T00:00:01.000Z"
    assert listed["bob"]["last_used_at"] is None
    assert set(listed["bob"]) == {"name", "created_at", "last_used_at"}
    await management.revoke_proxy_token(store, "alice")
    assert await store.token_owner(hash_token(created["token"])) is None


async def test_token_errors_name_the_field(store: Store) -> None:
    await management.create_proxy_token(store, "alice")
    with pytest.raises(Conflict):
        await management.create_proxy_token(store, "alice")
    with pytest.raises(InvalidInput) as invalid:
        await management.create_proxy_token(store, "has space")
    assert invalid.value.field == "name"
    with pytest.raises(InvalidInput) as role:
        await management.create_admin_token(store, "ops", "root")
    assert role.value.field == "role"


async def test_admin_tokens_create_list_revoke(store: Store) -> None:
    created = await management.create_admin_token(store, "ops", "auditor")
    assert await store.token_owner(hash_token(created["token"])) == ("auditor", "ops")
    (listed,) = await management.list_admin_tokens(store)
    assert set(listed) == {"name", "role", "created_at"} and listed["role"] == "auditor"
    with pytest.raises(Conflict):
        await management.create_admin_token(store, "ops", "admin")
    await management.revoke_admin_token(store, "ops")
    assert await management.list_admin_tokens(store) == []
