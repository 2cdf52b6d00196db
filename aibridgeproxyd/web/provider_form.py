"""The dashboard's provider form: which fields a provider type shows (read from its adapter:
``default_base_url``, ``no_keys_because``, ``known_settings``; secrets as
``sealing.is_secret_setting`` says), and the
submitted form turned into what ``management.create_provider`` and ``update_provider`` take
(the functions the API calls: CONTRACT section 12, Providers).

Secrets are never sent back to the browser: a secret setting's field is empty with a "set"
hint, and a key is shown by its masked form. On edit, a secret field left empty keeps the stored
value, and the keys are the final list: the kept ones by id, a newly typed one added.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.management import KeyChange, ProviderPatch
from aibridgeproxyd.model import NAME_PATTERN, ProviderRecord
from aibridgeproxyd.sealing import is_secret_setting

# Settings the form shows as JSON (a mapping or a list) rather than one line of text.
JSON_SETTINGS = frozenset({"deployments", "allowed_betas"})
SETTING_LABELS: Mapping[str, str] = {
    "region": "AWS region",
    "access_key_id": "Access key ID",
    "secret_access_key": "Secret access key",
    "session_token": "Session token (optional)",
    "model": "Model",
    "small_fast_model": "Small, fast model",
    "allowed_betas": "Allowed anthropic-beta flags (JSON list, optional)",
    "api_version": "API version",
    "deployments": "Deployments (JSON: model -> deployment name)",
}
# The order settings appear in, where the adapter names them; others follow by name.
SETTING_ORDER = tuple(SETTING_LABELS)
SETTING_PREFIX = "setting_"
# The labels of the form's other fields, by form field name (an API field name maps to one).
FIELD_LABELS: Mapping[str, str] = {
    "type": "Type",
    "name": "Name",
    "display_name": "Display name",
    "base_url": "Base URL",
    "hosts": "Hosts",
    "new_api_key": "API keys",
    "api_keys": "API keys",
    "enabled": "Enabled",
    "allow_byok": "Allow BYOK",
}
# The server's provider name rule as an HTML ``pattern`` (implicitly anchored by the browser).
NAME_INPUT_PATTERN = NAME_PATTERN.pattern.removeprefix("^").removesuffix("$")
# Form fields never sent back to the browser (besides secret settings): a typed key, the CSRF.
NEVER_ECHOED = frozenset({"new_api_key", "csrf_token"})


class FormProblem(ValueError):
    """A form value the API body cannot be made of: ``field`` names the form field."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


@dataclass(frozen=True)
class SettingField:
    """One setting's input: ``name`` in the settings, ``kind`` ``text``, ``secret`` or
    ``json``."""

    name: str
    label: str
    kind: str

    @property
    def input_name(self) -> str:
        return SETTING_PREFIX + self.name


@dataclass(frozen=True)
class TypeForm:
    """What the form of one provider type shows."""

    type: str
    base_url: bool  # a base_url field
    base_url_required: bool
    default_base_url: str
    default_hosts: tuple[str, ...]
    keys: bool  # central API keys may be set
    settings: tuple[SettingField, ...]


def provider_types() -> list[str]:
    """The provider types, in the adapters' registry order."""
    return list(ADAPTERS)


def type_form(provider_type: str) -> TypeForm:
    """The form of ``provider_type``. Raises ``FormProblem`` for an unknown type."""
    adapter = ADAPTERS.get(provider_type)
    if adapter is None:
        raise FormProblem("type", f"unknown provider type {provider_type!r}")
    signed = bool(adapter.no_keys_because) and bool(adapter.credential_settings)
    order = {name: at for at, name in enumerate(SETTING_ORDER)}
    names = sorted(adapter.known_settings, key=lambda n: (order.get(n, len(order)), n))
    return TypeForm(
        type=provider_type,
        base_url=not signed,
        base_url_required=adapter.default_base_url is None and not signed,
        default_base_url=adapter.default_base_url or "",
        default_hosts=adapter.default_hosts,
        keys=not adapter.no_keys_because,
        settings=tuple(_setting_field(provider_type, name) for name in names),
    )


def _setting_field(provider_type: str, name: str) -> SettingField:
    # Secret as the views mask it (an access key ID too): its value is never shown.
    secret = is_secret_setting(provider_type, name)
    kind = "secret" if secret else "json" if name in JSON_SETTINGS else "text"
    return SettingField(name, SETTING_LABELS.get(name, name), kind)


def _text(form: Mapping[str, str], name: str) -> str:
    return str(form.get(name, "")).strip()


def _hosts(form: Mapping[str, str]) -> list[str]:
    return [line.strip() for line in _text(form, "hosts").replace(",", "\n").split() if line]


def _setting_value(field: SettingField, text: str) -> Any:
    if field.kind != "json":
        return text
    try:
        return json.loads(text)
    except ValueError as exc:
        raise FormProblem(field.input_name, f"not valid JSON: {exc}") from None


def _typed_settings(form: Mapping[str, str], fields: TypeForm) -> dict[str, Any]:
    """The settings typed in, empty fields left out."""
    return {
        field.name: _setting_value(field, _text(form, field.input_name))
        for field in fields.settings
        if _text(form, field.input_name)
    }


def new_record(form: Mapping[str, str]) -> ProviderRecord:
    """The provider an "Add provider" form describes (``management.create_provider`` checks
    it). Raises ``FormProblem`` (unknown type, malformed JSON)."""
    fields = type_form(_text(form, "type"))
    new_key = _text(form, "new_api_key")
    return ProviderRecord(
        name=_text(form, "name"),
        type=fields.type,
        display_name=_text(form, "display_name"),
        base_url=_text(form, "base_url") if fields.base_url else "",
        hosts=tuple(_hosts(form)),
        enabled=form.get("enabled") == "on",
        allow_byok=form.get("allow_byok") == "on",
        keys=(new_key,) if fields.keys and new_key else (),
        settings=_typed_settings(form, fields),
    )


def _settings_change(form: Mapping[str, str], fields: TypeForm) -> dict[str, Any]:
    """Setting changes of an edit form: a typed value replaces the setting; an emptied
    non-secret field removes it (None); an empty secret field keeps the stored secret."""
    changes: dict[str, Any] = {}
    for field in fields.settings:
        text = _text(form, field.input_name)
        if text:
            changes[field.name] = _setting_value(field, text)
        elif field.kind != "secret":
            changes[field.name] = None
    return changes


def _kept_keys(form: Mapping[str, str], key_ids: Sequence[str]) -> list[KeyChange]:
    kept = [KeyChange(id=key) for key in key_ids if form.get(f"remove_key_{key}") != "on"]
    new_key = _text(form, "new_api_key")
    return kept + ([KeyChange(api_key=new_key)] if new_key else [])


def provider_patch(form: Mapping[str, str], current: Mapping[str, Any]) -> ProviderPatch:
    """The change an edit form asks of provider ``current`` (its view: ``management``'s
    provider shape). base_url and hosts are sent only when changed (the view shows them with
    the type's defaults applied, which must not become explicit values); keys as the final
    list (a ticked ``remove_key_<id>`` left out, a typed ``new_api_key`` added). Raises
    ``FormProblem``."""
    fields = type_form(str(current["type"]))
    base_url = _text(form, "base_url")
    hosts = _hosts(form)
    key_ids = [str(key["id"]) for key in current.get("api_keys", ())]
    return ProviderPatch(
        display_name=_text(form, "display_name"),
        base_url=base_url if fields.base_url and base_url != current.get("base_url") else None,
        hosts=hosts if hosts != list(current.get("hosts", ())) else None,
        enabled=form.get("enabled") == "on",
        allow_byok=form.get("allow_byok") == "on",
        api_keys=_kept_keys(form, key_ids) if fields.keys else None,
        settings=_settings_change(form, fields),
    )


def input_name(field: str) -> str:
    """The form field an API field name (``settings.region``, ``api_keys[0].api_key``,
    ``base_url``) or a form field name stands for: ``setting_region``, ``new_api_key``."""
    if field.startswith("settings."):
        return SETTING_PREFIX + field.removeprefix("settings.").split(".", 1)[0]
    if field.startswith("api_keys") or field == "keys":
        return "new_api_key"
    return field


def field_label(field: str) -> str:
    """What the form calls ``field`` (an API or form field name): ``setting_deployments`` ->
    ``Deployments``. An unknown name is returned as it is."""
    name = input_name(field)
    if name.startswith(SETTING_PREFIX):
        setting = name.removeprefix(SETTING_PREFIX)
        return SETTING_LABELS.get(setting, setting).split(" (", 1)[0]
    return FIELD_LABELS.get(name, field)


def stored_values(provider: Mapping[str, Any], fields: TypeForm) -> dict[str, str]:
    """What the edit form of ``provider`` (``management``'s view) shows, by form field name:
    the texts of its fields (a JSON setting as JSON, a secret never), ``on``/``off`` for the
    check boxes."""
    values = {
        "name": str(provider.get("name", "")),
        "display_name": str(provider.get("display_name") or ""),
        "base_url": str(provider.get("base_url") or ""),
        "hosts": "\n".join(provider.get("hosts", ())),
        "enabled": "on" if provider.get("enabled") else "off",
        "allow_byok": "on" if provider.get("allow_byok") else "off",
    }
    settings = provider.get("settings", {})
    for field in fields.settings:
        if field.kind != "secret" and field.name in settings:
            value = settings[field.name]
            shown = json.dumps(value) if field.kind == "json" else str(value)
            values[field.input_name] = shown
    return values


def typed_values(form: Mapping[str, str], fields: TypeForm) -> dict[str, str]:
    """A refused form's fields exactly as they were typed, by form field name, less the
    secrets (a secret setting, a new API key: never sent back)."""
    secret = {field.input_name for field in fields.settings if field.kind == "secret"}
    return {
        name: value
        for name, value in form.items()
        if name not in secret and name not in NEVER_ECHOED
    }
