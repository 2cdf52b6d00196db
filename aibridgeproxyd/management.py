"""Management operations the CLI, the HTTP API and the dashboard share (CONTRACT sections 4,
12 and 15): providers, proxy tokens, admin tokens and policies, read and written through a
``Store``.

None of the callers knows about another: the CLI prints, the API answers JSON, both call these
functions and turn ``ManagementError`` into their own kind of error. Nothing here imports
mitmproxy or FastAPI, and nothing here triggers a reload: the caller does (the API through
``AdminContext.reload_now``, the CLI by waiting for the daemons' presence).

Shapes returned (plain dicts, JSON-ready; secrets never in them):

- provider: ``{name, type, display_name, enabled, status, status_reason, base_url, hosts,
  allow_byok, api_keys: [{id, masked, created_at}], settings, created_at, updated_at}`` with
  ``base_url`` and ``hosts`` as in force (the type's defaults applied), ``status`` one of
  ``enabled``/``disabled``/``error``, secret settings as ``"***"`` and each key as its masked
  form (``credentials.mask_secret``: never more than 4 characters of either end);
- proxy token: ``{name, created_at, last_used_at}`` (``last_used_at`` None when never used);
  on creation ``{name, token}``, the only time the token is seen;
- admin token: ``{name, role, created_at}``; on creation ``{name, role, token}``;
- policy: ``Policy.to_json()``, and a user's limits and spend (the policies section below).

Errors: ``InvalidInput`` (bad input; the API answers 400), ``NotFound`` (404), ``Conflict``
(a duplicate name, 409), all ``ManagementError``, which carries ``field``: the input field at
fault as the API names it (``name``, ``type``, ``base_url``, ``hosts``, ``api_keys``,
``api_keys[1].id``, ``settings.region``, ``role``, ...). A message never contains a key, a
token or a secret setting's value. ``StoreError`` (an unusable database) passes through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from aibridgeproxyd.credentials import mask_secret
from aibridgeproxyd.model import Provider, ProviderRecord
from aibridgeproxyd.policy import Policy, index_policies
from aibridgeproxyd.policy_counters import spend_reports
from aibridgeproxyd.providers import check_known_settings, evaluate_providers
from aibridgeproxyd.sealing import is_secret_setting
from aibridgeproxyd.store import (
    DuplicateRecord,
    MissingRecord,
    RecordError,
    Store,
    validate_record,
    validate_token_name,
)
from aibridgeproxyd.tokens import generate_token, hash_token

# What a secret setting's value is replaced with; sent back in a PATCH, it keeps the value.
MASK = "***"
# The store names a provider's keys ``keys``; the API, ``api_keys``.
_API_FIELD = {"keys": "api_keys"}


class ManagementError(RecordError):
    """A management operation refused because of its input; nothing was written. ``field`` is
    the input field at fault (API naming), empty when no single field is. A ``RecordError``, so
    code that already handles the store's input errors (the CLI's exit code 2) handles it."""


class InvalidInput(ManagementError):
    """A field's value is not acceptable (HTTP 400, the field in ``validations``)."""


class NotFound(ManagementError, MissingRecord):
    """No provider, proxy token or admin token has that name (HTTP 404)."""


class Conflict(ManagementError, DuplicateRecord):
    """A provider, proxy token or admin token of that name exists already (HTTP 409)."""


@contextlib.contextmanager
def _management_errors() -> Iterator[None]:
    """The store's input errors as ``ManagementError`` of the matching kind."""
    try:
        yield
    except ManagementError:
        raise
    except DuplicateRecord as exc:
        raise Conflict(str(exc), _API_FIELD.get(exc.field, exc.field)) from None
    except MissingRecord as exc:
        raise NotFound(str(exc), _API_FIELD.get(exc.field, exc.field)) from None
    except RecordError as exc:
        raise InvalidInput(str(exc), _API_FIELD.get(exc.field, exc.field)) from None


# --- provider view ------------------------------------------------------------------------


def mask_settings(provider_type: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings with every secret value replaced by ``***``, at any depth
    (``sealing.is_secret_setting``: what is masked on screen is what is encrypted at rest)."""

    def mask(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {
                name: MASK if is_secret_setting(provider_type, name) else mask(item)
                for name, item in value.items()
            }
        if isinstance(value, list):
            return [mask(item) for item in value]
        return value

    return mask(settings)


def provider_view(provider: Provider) -> dict[str, Any]:
    """The public shape of an evaluated provider (the API's; see the module docstring). Keys
    appear only masked, with their id and when they were added."""
    record = provider.record
    return {
        "name": record.name,
        "type": record.type,
        "display_name": record.display_name,
        "enabled": record.enabled,
        "status": provider.status.value,
        "status_reason": provider.status_reason,
        "base_url": provider.base_url,
        "hosts": list(provider.hosts),
        "allow_byok": record.allow_byok,
        "api_keys": [
            {"id": info.id, "masked": mask_secret(key), "created_at": info.created_at}
            for key, info in zip(record.keys, record.key_info, strict=False)
        ],
        "settings": mask_settings(record.type, record.settings),
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }


# --- provider reads -----------------------------------------------------------------------


async def evaluated_providers(store: Store) -> dict[str, Provider]:
    """Every provider evaluated (defaults applied, status computed), by name in name order.
    Status depends on every row (an earlier provider may claim the same host), so all are
    evaluated even to show one; the evaluation runs off the event loop."""
    records = await store.list_providers()
    evaluated = await asyncio.to_thread(evaluate_providers, records)
    return {provider.name: provider for provider in evaluated}


async def evaluated_provider(store: Store, name: str) -> Provider:
    """One provider evaluated among all. Raises ``NotFound``."""
    provider = (await evaluated_providers(store)).get(name)
    if provider is None:
        raise NotFound(f"provider {name!r} does not exist", "name")
    return provider


async def list_providers(store: Store) -> list[dict[str, Any]]:
    """Every provider's view, by name."""
    return [provider_view(provider) for provider in (await evaluated_providers(store)).values()]


async def get_provider(store: Store, name: str) -> dict[str, Any]:
    """One provider's view. Raises ``NotFound``."""
    return provider_view(await evaluated_provider(store, name))


# --- provider writes ----------------------------------------------------------------------


@dataclass(frozen=True)
class KeyChange:
    """One entry of a PATCH's ``api_keys``, the desired final list: ``id`` keeps the stored
    key of that id, ``api_key`` adds a key. Exactly one of the two is set."""

    id: str | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class ProviderPatch:
    """The fields a PATCH changes; None leaves a field as it is.

    ``api_keys``: the desired final list (``KeyChange``); a stored key not listed is deleted.
    ``settings``: merged into the stored settings name by name: a value replaces the setting,
    None removes it, a name not given stays; a secret value sent back as ``***`` (at any
    depth) keeps the stored secret, so a view edited and sent back never loses one."""

    type: str | None = None
    display_name: str | None = None
    base_url: str | None = None
    hosts: Sequence[str] | None = None
    enabled: bool | None = None
    allow_byok: bool | None = None
    api_keys: Sequence[KeyChange] | None = None
    settings: Mapping[str, Any] | None = None


async def create_provider(store: Store, record: ProviderRecord) -> dict[str, Any]:
    """Insert a provider (``record.keys`` the raw keys, in failover order) and return its view.
    Raises ``InvalidInput`` (a bad field, a setting name its type does not read) or
    ``Conflict`` (the name exists)."""
    with _management_errors():
        record = validate_record(record)
        _check_new_setting_names(record.type, record.settings, {})
        await store.insert_provider(record)
    return await get_provider(store, record.name)


async def update_provider(store: Store, name: str, patch: ProviderPatch) -> dict[str, Any]:
    """Apply ``patch`` to a provider and return its view. Raises ``NotFound``, or
    ``InvalidInput`` naming the field (an unknown key id, a masked secret with nothing stored,
    a setting name the type does not read, any invalid value)."""
    with _management_errors():
        current = await store.get_provider(name)
        if current is None:
            raise NotFound(f"provider {name!r} does not exist", "name")
        await store.update_provider(_patched(current, patch))
    return await get_provider(store, name)


async def set_provider_enabled(store: Store, name: str, enabled: bool) -> dict[str, Any]:
    """Enable or disable a provider (no write when it already is) and return its view.
    Raises ``NotFound``."""
    with _management_errors():
        current = await store.get_provider(name)
        if current is None:
            raise NotFound(f"provider {name!r} does not exist", "name")
        if current.enabled != enabled:
            await store.update_provider(replace(current, enabled=enabled))
    return await get_provider(store, name)


async def delete_provider(store: Store, name: str) -> None:
    """Delete a provider; its name is never seeded again (a tombstone stays). Raises
    ``NotFound``."""
    if not await store.delete_provider(name):
        raise NotFound(f"provider {name!r} does not exist", "name")


def _patched(current: ProviderRecord, patch: ProviderPatch) -> ProviderRecord:
    changes: dict[str, Any] = {
        field: value
        for field in ("type", "display_name", "base_url", "enabled", "allow_byok")
        if (value := getattr(patch, field)) is not None
    }
    if patch.hosts is not None:
        changes["hosts"] = tuple(patch.hosts)
    if patch.api_keys is not None:
        changes["keys"] = _resolved_keys(current, patch.api_keys)
    provider_type = changes.get("type", current.type)
    if patch.settings is not None:
        _check_new_setting_names(provider_type, patch.settings, current.settings)
        changes["settings"] = _merged_settings(provider_type, current.settings, patch.settings)
    return replace(current, **changes)


def _resolved_keys(current: ProviderRecord, wanted: Sequence[KeyChange]) -> tuple[str, ...]:
    """The raw keys ``wanted`` describes, in order. The stored ids carry over: the store
    matches a kept key to its id by digest (``store.key_infos``)."""
    by_id = {info.id: key for key, info in zip(current.keys, current.key_info, strict=False)}
    keys: list[str] = []
    kept: set[str] = set()
    for position, entry in enumerate(wanted):
        field = f"api_keys[{position}]"
        if (entry.id is None) == (entry.api_key is None):
            raise InvalidInput(f"{field} must have either 'id' (keep) or 'api_key' (add)", field)
        if entry.api_key is not None:
            keys.append(entry.api_key)
            continue
        assert entry.id is not None
        if entry.id not in by_id:
            raise InvalidInput(
                f"provider {current.name!r} has no key with id {entry.id!r}", f"{field}.id"
            )
        if entry.id in kept:
            raise InvalidInput(f"key id {entry.id!r} is listed twice", f"{field}.id")
        kept.add(entry.id)
        keys.append(by_id[entry.id])
    return tuple(keys)


def _check_new_setting_names(
    provider_type: str, given: Mapping[str, Any], stored: Mapping[str, Any]
) -> None:
    """Refuse a setting the type does not read, among names not stored already (a stored one
    came from an earlier version or type and is left alone). ``InvalidInput`` naming it."""
    if not isinstance(given, Mapping):
        raise InvalidInput("settings must be an object", "settings")
    for name in sorted(set(given) - set(stored)):
        if given[name] is None:
            continue
        try:
            check_known_settings(provider_type, [name])
        except ValueError as exc:
            raise InvalidInput(str(exc), f"settings.{name}") from None


def _merged_settings(
    provider_type: str, stored: Mapping[str, Any], given: Mapping[str, Any]
) -> dict[str, Any]:
    merged = dict(stored)
    for name, value in given.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = _unmasked(provider_type, name, value, stored.get(name), "settings")
    return merged


def _unmasked(provider_type: str, name: str, value: Any, stored: Any, parent: str) -> Any:
    """``value`` of setting ``name`` with each ``***`` at a secret name replaced by the stored
    secret there. ``InvalidInput`` naming the path when nothing is stored to keep."""
    path = f"{parent}.{name}"
    if not is_secret_setting(provider_type, name):
        return _unmasked_value(provider_type, value, stored, path)
    if value != MASK:
        return value
    if stored is None:
        raise InvalidInput(
            f"{path} is the mask '{MASK}' but no value is stored; send the value", path
        )
    return stored


def _unmasked_value(provider_type: str, value: Any, stored: Any, path: str) -> Any:
    if isinstance(value, Mapping):
        inner = stored if isinstance(stored, Mapping) else {}
        return {
            key: _unmasked(provider_type, key, item, inner.get(key), path)
            for key, item in value.items()
        }
    if isinstance(value, list):
        same_shape = isinstance(stored, list) and len(stored) == len(value)
        return [
            _unmasked_value(provider_type, item, stored[i] if same_shape else None, f"{path}[{i}]")
            for i, item in enumerate(value)
        ]
    return value


# --- proxy tokens -------------------------------------------------------------------------


async def list_proxy_tokens(store: Store) -> list[dict[str, Any]]:
    """Every proxy token as ``{name, created_at, last_used_at}``, by name. ``last_used_at`` is
    the start of the newest interception record the token's user initiated, or None."""
    return [
        {"name": name, "created_at": created_at, "last_used_at": last_used_at}
        for name, created_at, last_used_at in await store.list_token_uses()
    ]


async def create_proxy_token(store: Store, name: str) -> dict[str, str]:
    """Create a proxy token for user ``name``: ``{name, token}``, the only time the token is
    shown (only its hash is stored). Raises ``InvalidInput`` or ``Conflict``. A running daemon
    accepts it at once (it re-reads the table for a token it does not know)."""
    token = generate_token()
    with _management_errors():
        validate_token_name(name)
        await store.insert_token(name, hash_token(token))
    return {"name": name, "token": token}


async def revoke_proxy_token(store: Store, name: str) -> None:
    """Delete a proxy token. Raises ``NotFound``. New connections with it are refused once the
    daemons reload (the caller triggers or waits for that)."""
    if not await store.delete_token(name):
        raise NotFound(f"token {name!r} does not exist", "name")


# --- admin tokens -------------------------------------------------------------------------


async def list_admin_tokens(store: Store) -> list[dict[str, str]]:
    """Every admin token as ``{name, role, created_at}``, by name (never a token or hash)."""
    return [
        {"name": token.name, "role": token.role, "created_at": token.created_at}
        for token in await store.list_admin_tokens()
    ]


async def create_admin_token(store: Store, name: str, role: str) -> dict[str, str]:
    """Create an API token with ``role`` (``admin`` or ``auditor``): ``{name, role, token}``,
    the only time the token is shown. Raises ``InvalidInput`` (name, role) or ``Conflict``.
    It works at once: the API looks tokens up in the store on each request."""
    token = generate_token()
    with _management_errors():
        validate_token_name(name)
        await store.insert_admin_token(name, hash_token(token), role)
    return {"name": name, "role": role, "token": token}


async def revoke_admin_token(store: Store, name: str) -> None:
    """Delete an admin token; the next API request with it gets 401. Raises ``NotFound``."""
    if not await store.delete_admin_token(name):
        raise NotFound(f"admin token {name!r} does not exist", "name")


# --- policies (aibridgeproxyd.policy; docs/policies.md) --------------------------------------
#
# A policy's view is ``Policy.to_json()``: ``{user, provider, max_cost_usd, max_tokens, period,
# models, rpm, tpm, max_parallel, created_at, updated_at}`` (``user`` None: the default of every
# user; ``provider`` None: every provider; ``max_cost_usd`` a decimal string of US dollars). The
# CLI prints the same object. A user's report is ``policy_counters.spend_report``'s shape.

# Fields a policy write sets; a PATCH names any of them, null clearing a limit.
POLICY_LIMITS = ("max_cost_usd", "max_tokens", "period", "models", "rpm", "tpm", "max_parallel")
# At most this many users in one listing of reports (users are proxy-token names: an admin
# makes each one, but a listing is bounded all the same).
MAX_REPORTED_USERS = 1000


def _policy_key(user: str | None, provider: str | None) -> str:
    """How a message names a policy: ``the default policy``, ``alice's policy at openai``."""
    who = "the default policy" if user is None else f"the policy of user {user!r}"
    return who if provider is None else f"{who} at provider {provider!r}"


async def list_policies(store: Store) -> list[dict[str, Any]]:
    """Every policy's view: the defaults first, then by user and provider."""
    return [policy.to_json() for policy in await store.list_policies()]


async def get_policy(store: Store, user: str | None, provider: str | None) -> dict[str, Any]:
    """The view of ``user``'s policy (None: the default) at ``provider`` (None: every
    provider). Raises ``NotFound``."""
    policy = await store.get_policy(user, provider)
    if policy is None:
        raise NotFound(f"{_policy_key(user, provider)} does not exist", "user")
    return policy.to_json()


async def create_policy(store: Store, policy: Policy) -> dict[str, Any]:
    """Store a new policy and return its view. Raises ``Conflict`` when one exists for that
    user and provider, ``InvalidInput`` naming the field (``policy.validate_policy``)."""
    if await store.get_policy(policy.user, policy.provider) is not None:
        raise Conflict(f"{_policy_key(policy.user, policy.provider)} exists already", "user")
    stored, _ = await put_policy(store, policy)
    return stored


async def put_policy(store: Store, policy: Policy) -> tuple[dict[str, Any], bool]:
    """Create or replace (whole) the policy of ``policy.user`` at ``policy.provider``: its view
    and whether it was created. Raises ``InvalidInput`` naming the field."""
    created = await store.get_policy(policy.user, policy.provider) is None
    with _management_errors():
        stored = await store.set_policy(policy)
    return stored.to_json(), created


async def update_policy(
    store: Store, user: str | None, provider: str | None, changes: Mapping[str, Any]
) -> dict[str, Any]:
    """Change the limits named in ``changes`` (``POLICY_LIMITS``; a None value clears that
    limit, a limit not named stays) and return the view. Raises ``NotFound``, or
    ``InvalidInput`` naming the field (an unknown one, or a policy left without a limit)."""
    current = await store.get_policy(user, provider)
    if current is None:
        raise NotFound(f"{_policy_key(user, provider)} does not exist", "user")
    for name in changes:
        if name not in POLICY_LIMITS:
            raise InvalidInput(f"{name!r} is not a policy limit", name)
    values = dict(changes)
    if "models" in values and values["models"] is not None:
        values["models"] = tuple(values["models"])
    stored, _ = await put_policy(store, replace(current, **values))
    return stored


async def policy_unknowns(store: Store, policy: Policy) -> list[str]:
    """What ``policy`` names that does not exist (yet): a user no proxy token has, a provider
    no row has. A policy may be set before either (it applies from then on), so this warns."""
    unknown = []
    if policy.user is not None and policy.user not in {t.name for t in await store.list_tokens()}:
        unknown.append(f"no proxy token is named {policy.user!r}")
    if policy.provider is not None and await store.get_provider(policy.provider) is None:
        unknown.append(f"no provider is named {policy.provider!r}")
    return unknown


async def delete_policy(store: Store, user: str | None, provider: str | None) -> None:
    """Remove a policy. Raises ``NotFound``."""
    if not await store.delete_policy(user, provider):
        raise NotFound(f"{_policy_key(user, provider)} does not exist", "user")


async def user_report(store: Store, user: str) -> dict[str, Any]:
    """``user``'s limits in force in each scope and the spend counted against them, with what
    remains (every replica's counters, about a second behind): ``policy_counters.spend_report``.
    Raises ``InvalidInput`` for a name no proxy token can have."""
    try:
        validate_token_name(user)
    except RecordError as exc:
        raise InvalidInput(str(exc).replace("token name", "user"), "user") from None
    (report,) = await budget_reports(store, [user])
    return report


async def budget_reports(
    store: Store, users: Sequence[str] | None = None, anonymous: bool = False
) -> list[dict[str, Any]]:
    """``user_report`` of each of ``users``, or (None) of every user with a proxy token or a
    policy of their own, by name: at most ``MAX_REPORTED_USERS``. ``anonymous`` adds, last,
    the requests without a proxy token (user ``""``: ``auth: none``), which only the default
    policies limit. The counters are read once."""
    stored = await store.list_policies()
    if users is None:
        names = {token.name for token in await store.list_tokens()}
        names.update(policy.user for policy in stored if policy.user is not None)
        users = sorted(names)
    wanted = [*users[:MAX_REPORTED_USERS], *([""] if anonymous else [])]
    return await spend_reports(store, index_policies(stored), wanted)
