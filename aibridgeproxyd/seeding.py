"""One-time provider seeding (docs/providers.md#how-seeding-works), and opening the store with it.

Two deprecated sources describe providers outside the table: the YAML ``providers:`` list and
the environment variables ``CODER_AI_GATEWAY_PROVIDER_<N>_<SUFFIX>``. A seed is inserted only if
no row of its name exists and none was ever deleted; from then on the table is the source of
truth and later starts leave the row alone.

An environment seed that no longer matches its stored row refuses to start the daemon: the
environment then claims a configuration the proxy is not running, and an operator who rotated a
key in a Helm value would otherwise never learn that nothing changed. A differing YAML entry is
only a warning (the contract keeps the failure to the environment, and the YAML list is
documented as a one-time seed).

Parsing is pure and raises ``SeedError`` (a ``ConfigError``) naming the variable or entry, never
a key value. ``prepare_store`` is the one entry point for the daemon and the CLI.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.config import Config, ConfigError, parse_bool
from aibridgeproxyd.credentials import CredentialMode
from aibridgeproxyd.model import MAX_KEYS, ProviderRecord, Upstream
from aibridgeproxyd.policy import Policy
from aibridgeproxyd.providers import check_known_settings, check_name
from aibridgeproxyd.sealing import Keyring
from aibridgeproxyd.store import RecordError, Store, validate_record

log = logging.getLogger("aibridgeproxyd.seeding")

ENVIRONMENT_PREFIX = "CODER_AI_GATEWAY_PROVIDER_"
# Coder's older prefix. Not read: a warning says so, because a silently ignored variable would
# look like a provider that "did not seed" for no reason.
LEGACY_ENVIRONMENT_PREFIX = "CODER_AIBRIDGE_PROVIDER_"

# Suffix of a setting variable -> the type whose adapter reads it (``environment_settings``).
_SETTING_SUFFIX_TYPES: Mapping[str, str] = {
    suffix: adapter.type_name
    for adapter in ADAPTERS.values()
    for suffix in adapter.environment_settings
}
ENVIRONMENT_SUFFIXES = ("TYPE", "NAME", "KEY", "KEYS", "BASE_URL", *_SETTING_SUFFIX_TYPES)
_INDEX = re.compile(r"0|[1-9][0-9]*")

# A YAML entry names row fields; the timestamps are the store's to set.
_CONFIG_SEED_FIELDS = frozenset(
    item.name
    for item in dataclasses.fields(ProviderRecord)
    if item.name not in ("created_at", "updated_at")
)

DEFAULT_PROVIDERS: tuple[ProviderRecord, ...] = tuple(
    ProviderRecord(name=type_name, type=type_name, display_name=adapter.default_display_name)
    for type_name, adapter in ADAPTERS.items()
    if adapter.default_display_name
)


class SeedError(ConfigError):
    """A seed is malformed, or the environment differs from the stored row. The message names
    the variable or config entry and says what to do; it never contains a key value."""


@dataclass(frozen=True)
class Seed:
    """A validated provider row from a seed source, with what a stored row is compared on."""

    record: ProviderRecord
    # Where it came from, for messages: "CODER_AI_GATEWAY_PROVIDER_0_*" or a config entry.
    source: str
    # Row fields a stored row must match: "type", "base_url", "keys", "hosts", ..., or
    # "settings.<name>" for one setting.
    compared: frozenset[str]
    # Environment seeds only: field -> the variable that holds it, for resolution hints.
    variables: Mapping[str, str] = field(default_factory=dict)

    @property
    def from_environment(self) -> bool:
        return bool(self.variables)


# --- parsing ---------------------------------------------------------------------------------


def parse_environment_seeds(environ: Mapping[str, str]) -> tuple[Seed, ...]:
    """Seeds from ``CODER_AI_GATEWAY_PROVIDER_<N>_<SUFFIX>``. Indices start at 0 and are
    contiguous; NAME defaults to TYPE; KEYS is comma-separated; an empty variable counts as
    unset. Raises ``SeedError`` naming the first bad variable."""
    groups: dict[int, dict[str, str]] = {}  # index -> suffix -> variable name
    for variable in sorted(environ):
        if not variable.startswith(ENVIRONMENT_PREFIX):
            continue
        index_text, separator, suffix = variable[len(ENVIRONMENT_PREFIX) :].partition("_")
        if not _INDEX.fullmatch(index_text) or not separator:
            raise SeedError(
                f"invalid environment variable {variable}: expected "
                f"{ENVIRONMENT_PREFIX}<N>_<SUFFIX> with N a number counting from 0 "
                "(no leading zeros)"
            )
        if suffix not in ENVIRONMENT_SUFFIXES:
            raise SeedError(
                f"invalid environment variable {variable}: unknown suffix {suffix!r}; "
                f"valid suffixes: {', '.join(ENVIRONMENT_SUFFIXES)}"
            )
        groups.setdefault(int(index_text), {})[suffix] = variable

    for expected, index in enumerate(sorted(groups)):
        if index != expected:
            first = min(groups[index].values())
            raise SeedError(
                f"invalid environment variable {first}: provider indices start at 0 and are "
                f"contiguous, but no {ENVIRONMENT_PREFIX}{expected}_* variable is set"
            )

    seeds = tuple(_environment_seed(index, groups[index], environ) for index in sorted(groups))
    _check_unique_names(seeds)
    return seeds


def _environment_seed(index: int, variables: Mapping[str, str], environ: Mapping[str, str]) -> Seed:
    group = f"{ENVIRONMENT_PREFIX}{index}_*"

    def variable(suffix: str) -> str:
        return f"{ENVIRONMENT_PREFIX}{index}_{suffix}"

    def value(suffix: str) -> str:
        return environ[variables[suffix]].strip() if suffix in variables else ""

    def invalid(suffix: str, problem: str) -> SeedError:
        return SeedError(f"invalid environment variable {variable(suffix)}: {problem}")

    provider_type = value("TYPE")
    if not provider_type:
        raise SeedError(
            f"environment variable {variable('TYPE')} is missing or empty, "
            f"but other {group} variables are set"
        )
    adapter = ADAPTERS.get(provider_type)
    if adapter is None:
        raise invalid(
            "TYPE",
            f"unknown provider type {provider_type!r}; valid types: {', '.join(sorted(ADAPTERS))}",
        )

    name = value("NAME") or provider_type
    try:
        check_name(name)
    except ValueError as exc:
        raise invalid("NAME" if value("NAME") else "TYPE", str(exc)) from None

    base_url = value("BASE_URL")
    if base_url:
        try:
            Upstream.parse(base_url)
        except ValueError as exc:
            raise invalid("BASE_URL", str(exc)) from None

    if value("KEY") and value("KEYS"):
        raise SeedError(
            f"environment variables {variable('KEY')} and {variable('KEYS')} are both set; "
            "set one (KEYS takes a comma-separated list)"
        )
    if value("KEYS"):
        key_suffix = "KEYS"
        keys = tuple(part.strip() for part in value("KEYS").split(",") if part.strip())
    else:
        key_suffix = "KEY"
        keys = (value("KEY"),) if value("KEY") else ()
    if keys and CredentialMode.CENTRAL not in adapter.credential_modes:
        raise invalid(
            key_suffix,
            f"provider type {provider_type!r} takes no keys ({adapter.no_keys_because})",
        )
    if len(keys) > MAX_KEYS:
        raise invalid(key_suffix, f"{len(keys)} keys given; at most {MAX_KEYS} are allowed")

    settings: dict[str, str] = {}
    for suffix, owner in _SETTING_SUFFIX_TYPES.items():
        if value(suffix):
            if suffix not in adapter.environment_settings:
                raise invalid(suffix, f"applies only to TYPE={owner}, not {provider_type!r}")
            settings[adapter.environment_settings[suffix]] = value(suffix)

    try:
        record = validate_record(
            ProviderRecord(
                name=name, type=provider_type, base_url=base_url, keys=keys, settings=settings
            )
        )
    except RecordError as exc:
        raise SeedError(f"invalid environment variables {group}: {exc}") from None

    compared = {"type", "base_url", "keys"}
    field_variables = {
        "type": variable("TYPE"),
        "base_url": variable("BASE_URL"),
        "keys": variable(key_suffix),
    }
    # Every setting of the type the environment can express is compared, set or not.
    for suffix, setting in adapter.environment_settings.items():
        compared.add(f"settings.{setting}")
        field_variables[f"settings.{setting}"] = variable(suffix)
    return Seed(record, group, frozenset(compared), field_variables)


def parse_config_seeds(entries: Iterable[Mapping[str, Any]]) -> tuple[Seed, ...]:
    """Seeds from the YAML ``providers:`` list. A stored row is compared on the fields the
    entry names. Raises ``SeedError`` naming the entry."""
    seeds: list[Seed] = []
    for index, entry in enumerate(entries):
        source = f"config key 'providers' entry {index}"
        if "name" in entry:
            source += f" ({entry['name']!r})"
        try:
            record = validate_record(_config_record(entry))
        except (ValueError, RecordError) as exc:
            raise SeedError(f"invalid value for {source}: {exc}") from None
        compared = {name for name in entry if name not in ("name", "settings")}
        compared |= {f"settings.{name}" for name in record.settings}
        seeds.append(Seed(record, source, frozenset(compared)))
    _check_unique_names(seeds)
    return tuple(seeds)


def _config_record(entry: Mapping[str, Any]) -> ProviderRecord:
    unknown = sorted(set(entry) - _CONFIG_SEED_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown field {unknown[0]!r}; valid fields: {', '.join(sorted(_CONFIG_SEED_FIELDS))}"
        )
    for required in ("name", "type"):
        if not isinstance(entry.get(required), str):
            raise ValueError(f"field {required!r} is required and must be a string")
    settings = entry.get("settings") or {}
    if not isinstance(settings, Mapping):
        raise ValueError("field 'settings' must be a mapping")
    check_known_settings(entry["type"], settings)
    return ProviderRecord(
        name=entry["name"],
        type=entry["type"],
        display_name=str(entry.get("display_name") or ""),
        base_url=str(entry.get("base_url") or ""),
        hosts=tuple(str(host) for host in _config_list(entry.get("hosts"), "hosts")),
        # YAML may give a numeric-looking key as a number; a key is always text.
        keys=tuple(str(key) for key in _config_list(entry.get("keys"), "keys")),
        enabled=parse_bool(entry.get("enabled", True)),
        allow_byok=parse_bool(entry.get("allow_byok", True)),
        settings=dict(settings),
    )


def _config_list(value: Any, field_name: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise ValueError(f"field {field_name!r} must be a list")


def collect_seeds(config: Config, environ: Mapping[str, str]) -> tuple[Seed, ...]:
    """Every seed: the config list, then the environment. A name seeded twice, in one source
    or across both, is a ``SeedError``: which one should win is not ours to guess."""
    seeds = parse_config_seeds(config.providers) + parse_environment_seeds(environ)
    _check_unique_names(seeds)
    return seeds


def _check_unique_names(seeds: Iterable[Seed]) -> None:
    sources: dict[str, str] = {}
    for seed in seeds:
        earlier = sources.setdefault(seed.record.name, seed.source)
        if earlier != seed.source:
            raise SeedError(
                f"provider {seed.record.name!r} is seeded twice, by {earlier} and by "
                f"{seed.source}; keep one"
            )


# --- drift -----------------------------------------------------------------------------------


def drifted_fields(seed: Seed, stored: ProviderRecord) -> list[str]:
    """The compared fields on which the stored row differs from the seed, in a stable order.
    Keys and hosts are compared as sets: their order is not worth refusing to start over."""
    return [
        name
        for name in sorted(seed.compared)
        if _comparable(seed.record, name) != _comparable(stored, name)
    ]


def _comparable(record: ProviderRecord, field_name: str) -> Any:
    if field_name.startswith("settings."):
        return record.settings.get(field_name.removeprefix("settings."))
    value = getattr(record, field_name)
    return sorted(value) if field_name in ("keys", "hosts") else value


def environment_drift_message(drifts: Iterable[tuple[Seed, list[str]]]) -> str:
    """One line: what differs (field names only) and how to resolve it, with an ``edit``
    command per provider that applies the environment's values without printing a secret."""
    drifts = list(drifts)
    differences = "; ".join(
        f"{seed.source} differs from the stored provider {seed.record.name!r} "
        f"({', '.join(differing)})"
        for seed, differing in drifts
    )
    commands = " and ".join(f"`{_edit_command(seed, differing)}`" for seed, differing in drifts)
    return (
        f"{differences}. Seeding is one-time and the provider table is now the source of truth: "
        f"remove the {ENVIRONMENT_PREFIX}* variables to keep the stored "
        f"{'provider' if len(drifts) == 1 else 'providers'}, or apply the environment's values "
        f"with {commands}, then start again"
    )


def _edit_command(seed: Seed, differing: Iterable[str]) -> str:
    record = seed.record
    stdin = ""
    arguments = ["aibridgeproxyd", "providers", "edit", record.name]
    for name in differing:
        variable = seed.variables.get(name, "")
        if name == "type":
            arguments += ["--type", record.type]
        elif name == "base_url":
            arguments += ["--base-url", shlex.quote(record.base_url)]
        elif name == "keys" and not record.keys:
            arguments.append("--clear-keys")
        elif name == "keys" and variable.endswith("_KEYS"):
            stdin = f"echo \"${variable}\" | tr , '\\n' | "
            arguments.append("--key-stdin")
        elif name == "keys":
            arguments += ["--key", f'"${variable}"']
        elif name.startswith("settings."):
            setting = name.removeprefix("settings.")
            value = record.settings.get(setting)
            if value is None:
                arguments += ["--unset", setting]
            elif setting in ADAPTERS[record.type].credential_settings:
                arguments += ["--set", f'{setting}="${variable}"']
            else:
                arguments += ["--set", shlex.quote(f"{setting}={value}")]
    return stdin + " ".join(arguments)


# --- applying --------------------------------------------------------------------------------


async def apply_seeds(
    store: Store, seeds: Iterable[Seed], *, refuse_drift: bool = True
) -> list[str]:
    """Insert each seed whose name was never stored or deleted; return the names inserted.

    Every seed is checked before anything is written, so a refused start changes nothing. A
    differing environment seed raises ``SeedError`` (or, with ``refuse_drift=False``, as the
    CLI does so that it can still be used to resolve the difference, logs a warning). A
    deleted row is never recreated.
    """
    environment_drifts: list[tuple[Seed, list[str]]] = []
    new: list[Seed] = []
    for seed in seeds:
        name = seed.record.name
        stored = await store.get_provider(name)
        if stored is None:
            if await store.was_deleted(name):
                log.info(
                    "provider %r from %s was deleted by an operator and is not recreated; "
                    "remove its seed",
                    name,
                    seed.source,
                )
            else:
                new.append(seed)
            continue
        differing = drifted_fields(seed, stored)
        if not differing:
            continue
        if seed.from_environment:
            environment_drifts.append((seed, differing))
        else:
            log.warning(
                "%s differs from the stored provider %r (%s); the stored row is kept because "
                "the provider table is the source of truth: remove the entry, or change the "
                "row with 'aibridgeproxyd providers edit %s'",
                seed.source,
                name,
                ", ".join(differing),
                name,
            )
    if environment_drifts:
        message = environment_drift_message(environment_drifts)
        if refuse_drift:
            raise SeedError(message)
        log.warning("the daemon refuses to start until this is resolved: %s", message)

    inserted = []
    for seed in new:
        # insert_provider_if_new re-checks inside its write transaction: another process
        # starting at the same moment may have inserted it since.
        if await store.insert_provider_if_new(seed.record):
            log.info("seeded provider %r from %s", seed.record.name, seed.source)
            inserted.append(seed.record.name)
    return inserted


async def seed_policies(store: Store, policies: Iterable[Policy]) -> list[Policy]:
    """Store each ``policies:`` entry once (``Store.seed_policy``); return those stored now."""
    seeded = []
    for policy in policies:
        if await store.seed_policy(policy):
            log.info("seeded the policy of %s from the config", "/".join(policy.key))
            seeded.append(policy)
    return seeded


async def prepare_store(
    config: Config, environ: Mapping[str, str] | None = None, *, refuse_drift: bool = True
) -> Store:
    """Open and migrate the configured database, then seed it: from the config list and the
    environment when either names providers, or, on a fresh database with no seeds, with the
    ``DEFAULT_PROVIDERS`` (``openai`` and ``anthropic``). The daemon refuses to start on drift; the
    CLI passes ``refuse_drift=False``."""
    environ = os.environ if environ is None else environ
    # Parse before touching the disk, so bad seeds change nothing.
    seeds = collect_seeds(config, environ)
    _warn_deprecated(seeds, environ)
    keyring = Keyring.from_config(config.encryption_keys, config.data_dir)
    store = await Store.open(config.database, keyring=keyring)
    try:
        if seeds:
            await apply_seeds(store, seeds, refuse_drift=refuse_drift)
        elif store.is_fresh:
            for record in DEFAULT_PROVIDERS:
                await store.insert_provider_if_new(record)
        await seed_policies(store, config.policies)
    except BaseException:
        await store.close()
        raise
    return store


async def initialize(config: Config, environ: Mapping[str, str] | None = None) -> None:
    """Daemon start-up: create, migrate and seed the database, then close it."""
    store = await prepare_store(config, environ)
    await store.close()


def _warn_deprecated(seeds: Iterable[Seed], environ: Mapping[str, str]) -> None:
    sources = []
    seeds = list(seeds)
    if any(not seed.from_environment for seed in seeds):
        sources.append("the 'providers' config key")
    if any(seed.from_environment for seed in seeds):
        sources.append(f"{ENVIRONMENT_PREFIX}* environment variables")
    if sources:
        log.warning(
            "seeding providers from %s is deprecated and happens once per provider; "
            "manage providers with 'aibridgeproxyd providers ...' instead",
            " and ".join(sources),
        )
    legacy = sorted(name for name in environ if name.startswith(LEGACY_ENVIRONMENT_PREFIX))
    if legacy:
        log.warning(
            "%s* environment variables (%s) are not read; use %s<N>_<SUFFIX>, or better, "
            "'aibridgeproxyd providers add'",
            LEGACY_ENVIRONMENT_PREFIX,
            ", ".join(legacy),
            ENVIRONMENT_PREFIX,
        )
