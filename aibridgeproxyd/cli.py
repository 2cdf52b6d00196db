"""The ``aibridgeproxyd`` command line (README.md#cli): a thin layer over config, store and
provider evaluation.

Every command takes ``--config FILE`` and ``--data-dir DIR`` before or after the subcommand; the
later one wins. Bad input (a config error, an invalid or duplicate name, an unknown type, a
malformed URL, a missing provider) exits 2 with one ``error: ...`` line on stderr and writes
nothing. An unusable database or CA exits 1 the same way. Keys are never printed, and a proxy
token only once, by ``tokens create``.

Nothing happens silently (README.md#cli): a command that creates a new database says so on
stderr with its absolute path (and removes it again if the command then fails); ``ca path`` and
``ca export`` never generate a CA; printed paths are absolute. Options that would silently lose
information are refused: ``--byok`` with ``--no-byok``, a single-valued option given twice,
``--key-stdin`` with no key (only ``--clear-keys`` removes keys) or with ``--key``, ``--set`` of
a name the type does not read, ``--unset`` of a setting that is not set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from aibridgeproxyd import __version__, management
from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.clients import CLIENTS
from aibridgeproxyd.config import Config, ConfigError, load_config
from aibridgeproxyd.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from aibridgeproxyd.interception.writer import parse_timestamp
from aibridgeproxyd.model import (
    ADMIN_ROLES,
    MAX_KEYS,
    InterceptionFilter,
    Provider,
    ProviderRecord,
    Status,
)
from aibridgeproxyd.policy import PERIODS, Policy, PolicyError, index_policies, validate_policy
from aibridgeproxyd.policy_counters import spend_report
from aibridgeproxyd.presence import WAIT_SECONDS, daemons_without_key, wait_for_daemons
from aibridgeproxyd.pricing import (
    PROVIDER_IDS,
    RATE_NAMES,
    ModelPrices,
    PriceTable,
    override_rates,
    parse_rate,
    price_source,
)
from aibridgeproxyd.providers import check_known_settings
from aibridgeproxyd.seeding import prepare_store
from aibridgeproxyd.store import (
    RecordError,
    Store,
    StoreError,
    StoreUnavailable,
    validate_price_model,
    validate_record,
    validate_token_name,
)

if TYPE_CHECKING:
    from aibridgeproxyd.ca import CaFiles

PROG = "aibridgeproxyd"

Handler = Callable[[argparse.Namespace, Config], int]


class UsageError(Exception):
    """Bad command-line input found before anything is touched."""


class CommandFailed(Exception):
    """The command could not do its job for a reason other than bad input (an unusable CA)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print the usage block and exit; the contract wants one line, and
        # raising lets main() report every kind of bad input the same way.
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Once(argparse.Action):
    """A single-valued option given twice with different values is refused: argparse would let
    the later one win silently, hiding a mistake in a script."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        given: set[str] = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in given and getattr(namespace, self.dest) != values:
            # The values are not echoed: a base URL may be long, or hold a secret by mistake.
            raise UsageError(f"{option_string} given twice with different values")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


# --- output helpers ------------------------------------------------------------------------


# ``providers list --json`` fields, in order (CONTRACT section 4): the API's view with the keys
# as a count.
CLI_PROVIDER_FIELDS = (
    "name", "type", "display_name", "base_url", "hosts", "enabled", "allow_byok", "key_count",
    "settings", "status", "status_reason", "created_at", "updated_at",
)  # fmt: skip


def cli_provider_view(view: Mapping[str, Any]) -> dict[str, Any]:
    """The CLI's shape of a provider from ``management.provider_view``: keys only as a count."""
    fields = {**view, "key_count": len(view["api_keys"])}
    return {name: fields[name] for name in CLI_PROVIDER_FIELDS}


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _printable(cell: str) -> str:
    """A table cell with every non-printable character escaped (``\\x1b``): a value written
    to the database behind the CLI's checks must not drive the terminal."""
    if cell.isprintable():
        return cell
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in cell)


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    rows = [[_printable(cell) for cell in row] for row in rows]
    widths = [
        max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(headers)
    ]
    for line in (headers, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _status_text(provider: Provider) -> str:
    if provider.status is Status.ERROR:
        return f"{provider.status.value} ({provider.status_reason})"
    return provider.status.value


# --- store access --------------------------------------------------------------------------


def _with_store[T](config: Config, action: Callable[[Store], Awaitable[T]]) -> T:
    # A command run from another directory, or with a mistyped --data-dir, would otherwise work
    # on a brand-new empty database without a word (README.md#cli).
    database = config.database_path.absolute()
    # A PostgreSQL database is never created here (only its schema): nothing to undo.
    existed = config.database.is_postgres or database.exists()
    directory_existed = database.parent.exists()

    async def run() -> T:
        # Drift between the environment seeds and the table is only a warning here: the CLI is
        # the tool that resolves it (``providers edit``), so it must not refuse to run.
        async with await prepare_store(config, refuse_drift=False) as store:
            return await action(store)

    try:
        result = asyncio.run(run())
    except BaseException:
        if not existed:
            # A failed command changes nothing, so the database it just created goes too.
            _remove_new_database(database, remove_directory=not directory_existed)
        raise
    if not existed:
        print(f"created a new database {database}", file=sys.stderr)
    return result


def _remove_new_database(database: Path, remove_directory: bool) -> None:
    for path in (database, *(database.with_name(database.name + s) for s in _SQLITE_SIDE_FILES)):
        with contextlib.suppress(OSError):
            path.unlink()
    if remove_directory:
        with contextlib.suppress(OSError):
            database.parent.rmdir()  # only if empty


_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


async def _report(store: Store, name: str, verb: str) -> int:
    evaluated = await management.evaluated_providers(store)
    provider = evaluated[name]
    print(f"provider {name!r} {verb}; status: {_status_text(provider)}")
    # Hosts go to the first provider by name: a write can take a host from another provider
    # and put that one out of service, which must not pass without a word.
    claimed_by_this = f"claimed by provider {name!r}"
    for other in evaluated.values():
        if other.status is Status.ERROR and claimed_by_this in (other.status_reason or ""):
            print(
                f"warning: provider {other.name!r} is now in status error ({other.status_reason}); "
                f"its requests are no longer intercepted",
                file=sys.stderr,
            )
    return EXIT_OK


# --- providers -----------------------------------------------------------------------------


def _parse_setting_value(text: str) -> Any:
    """JSON when the text is valid JSON (``5``, ``true``, ``{"a": "b"}``), else the text itself.
    NaN and Infinity are not JSON, so they stay strings."""

    def reject_constant(constant: str) -> Any:
        raise ValueError(constant)

    try:
        return json.loads(text, parse_constant=reject_constant)
    except ValueError:
        return text


def parse_settings(assignments: Sequence[str]) -> dict[str, Any]:
    """``--set K=V`` arguments as a dict. Errors name the argument's position, never its value,
    which may be a secret."""
    settings: dict[str, Any] = {}
    for position, assignment in enumerate(assignments, start=1):
        name, sep, value = assignment.partition("=")
        name = name.strip()
        if not sep:
            raise UsageError(f"--set argument #{position} has no '=': expected KEY=VALUE")
        if not name:
            raise UsageError(f"--set argument #{position} has an empty KEY: expected KEY=VALUE")
        if name in settings:
            raise UsageError(f"--set {name} is given twice (argument #{position})")
        settings[name] = _parse_setting_value(value)
    return settings


def _given_keys(args: argparse.Namespace) -> list[str] | None:
    """Keys from ``--key`` or ``--key-stdin`` (one per line, blank lines skipped), or None when
    neither was given. Never an empty list: removing every key takes ``--clear-keys``, so an
    empty pipe (a secret manager that printed nothing) cannot wipe the keys."""
    if args.key_stdin and args.keys is not None:
        raise UsageError("--key and --key-stdin cannot be used together")
    if not args.key_stdin:
        return None if args.keys is None else list(args.keys)
    try:
        keys = [line.strip() for line in sys.stdin if line.strip()]
    except UnicodeDecodeError:
        raise UsageError("--key-stdin: standard input is not UTF-8 text") from None
    if not keys:
        hint = "; to remove every key use --clear-keys" if hasattr(args, "clear_keys") else ""
        raise UsageError(f"--key-stdin read no key from standard input{hint}")
    return keys


def check_setting_names(provider_type: str, names: Iterable[str]) -> None:
    """``--set`` names the type reads, or ``UsageError`` listing the ones it knows."""
    try:
        check_known_settings(provider_type, names)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _field_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The ProviderRecord fields named by add/edit options (settings handled by the caller)."""
    changes: dict[str, Any] = {}
    for option, field_name in (
        ("type", "type"),
        ("display_name", "display_name"),
        ("base_url", "base_url"),
        ("allow_byok", "allow_byok"),
        ("enabled", "enabled"),
    ):
        value = getattr(args, option, None)
        if value is not None:
            changes[field_name] = value
    if args.hosts is not None:
        changes["hosts"] = tuple(args.hosts)
    keys = _given_keys(args)
    if keys is not None:
        changes["keys"] = tuple(keys)
    return changes


def cmd_providers_list(args: argparse.Namespace, config: Config) -> int:
    providers = list(_with_store(config, management.evaluated_providers).values())
    if args.json:
        _print_json([cli_provider_view(management.provider_view(p)) for p in providers])
        return EXIT_OK
    rows = [
        [
            p.name,
            p.type,
            p.status.value,
            ",".join(p.hosts) or "-",
            p.base_url or "-",
            str(len(p.keys)),
            p.status_reason or "-",
        ]
        for p in providers
    ]
    _print_table(["NAME", "TYPE", "STATUS", "HOSTS", "BASE_URL", "KEYS", "REASON"], rows)
    return EXIT_OK


def cmd_providers_show(args: argparse.Namespace, config: Config) -> int:
    async def show(store: Store) -> Provider:
        return await management.evaluated_provider(store, args.name)

    provider = _with_store(config, show)
    view = cli_provider_view(management.provider_view(provider))
    if args.json:
        _print_json(view)
        return EXIT_OK
    # Say when base_url/hosts are the type's defaults: editing them then pins a value.
    defaulted = {"base_url": not provider.record.base_url, "hosts": not provider.record.hosts}
    for field_name, value in view.items():
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, list):
            text = ", ".join(value) or "-"
        elif isinstance(value, dict):
            text = json.dumps(value, sort_keys=True)
        else:
            text = str(value) if value != "" else "-"
        if defaulted.get(field_name):
            text += " (type default)"
        print(f"{field_name + ':':<15}{_printable(text)}")
    return EXIT_OK


def cmd_providers_add(args: argparse.Namespace, config: Config) -> int:
    settings = parse_settings(args.settings)
    record = ProviderRecord(name=args.name, type=args.type, settings=settings)
    # Validate before opening the database, so bad input never even creates it.
    record = validate_record(replace(record, **_field_changes(args)))
    check_setting_names(record.type, settings)

    async def add(store: Store) -> int:
        await management.create_provider(store, record)
        return await _report(store, record.name, "added")

    return _with_store(config, add)


def cmd_providers_edit(args: argparse.Namespace, config: Config) -> int:
    settings = parse_settings(args.settings)
    unset = set(args.unset or [])
    if args.clear_hosts and args.hosts is not None:
        raise UsageError("--host and --clear-hosts cannot be used together")
    if args.clear_keys and (args.keys is not None or args.key_stdin):
        raise UsageError("--key/--key-stdin and --clear-keys cannot be used together")
    if unset & settings.keys():
        raise UsageError(
            f"setting {sorted(unset & settings.keys())[0]!r} is both --set and --unset"
        )
    changes = _field_changes(args)
    if args.clear_hosts:
        changes["hosts"] = ()
    if args.clear_keys:
        changes["keys"] = ()
    if not (changes or settings or unset):
        raise UsageError(f"nothing to change for provider {args.name!r}: give at least one option")

    async def edit(store: Store) -> int:
        current = (await management.evaluated_provider(store, args.name)).record
        not_set = sorted(unset - current.settings.keys())
        if not_set:
            present = ", ".join(sorted(current.settings)) or "none"
            raise UsageError(
                f"--unset {not_set[0]}: provider {args.name!r} has no setting {not_set[0]!r} "
                f"(its settings: {present})"
            )
        check_setting_names(changes.get("type", current.type), settings)
        patch = _provider_patch(changes, unset, settings)
        await management.update_provider(store, args.name, patch)
        return await _report(store, args.name, "updated")

    return _with_store(config, edit)


def _provider_patch(
    changes: Mapping[str, Any], unset: Iterable[str], settings: Mapping[str, Any]
) -> management.ProviderPatch:
    """The ``providers edit`` options as a PATCH: ``--key`` lists the final keys (one kept
    keeps its id), ``--set`` and ``--unset`` merge into the stored settings."""
    fields = {name: value for name, value in changes.items() if name != "keys"}
    if "keys" in changes:
        fields["api_keys"] = [management.KeyChange(api_key=key) for key in changes["keys"]]
    if settings or unset:
        fields["settings"] = {**dict.fromkeys(unset), **settings}
    return management.ProviderPatch(**fields)


def _cmd_set_enabled(enabled: bool) -> Handler:
    verb = "enabled" if enabled else "disabled"

    def handler(args: argparse.Namespace, config: Config) -> int:
        async def toggle(store: Store) -> int:
            await management.set_provider_enabled(store, args.name, enabled)
            return await _report(store, args.name, verb)

        return _with_store(config, toggle)

    return handler


def cmd_providers_delete(args: argparse.Namespace, config: Config) -> int:
    async def delete(store: Store) -> None:
        # Raised inside, so a database this command just created is removed again.
        await management.delete_provider(store, args.name)

    _with_store(config, delete)
    print(f"provider {args.name!r} deleted")
    return EXIT_OK


# --- tokens --------------------------------------------------------------------------------


def cmd_keys_rotate(args: argparse.Namespace, config: Config) -> int:
    """``keys rotate``: every provider key and secret setting sealed with the first encryption
    key (README.md#secrets-at-rest)."""
    key_id, count = _with_store(config, _rotate_keys)
    plural = "" if count == 1 else "s"
    print(f"re-encrypted {count} secret{plural} with key {key_id}; every stored secret now uses it")
    return EXIT_OK


async def _rotate_keys(store: Store) -> tuple[str, int]:
    """Refuse while a running daemon lacks the key that would seal (it could read nothing
    sealed from then on), else rotate."""
    key_id = store.sealing_key_id()
    lacking = await daemons_without_key(store, key_id)
    if lacking:
        raise StoreError(
            f"running daemon(s) {', '.join(lacking)} do not have encryption key {key_id}: "
            "restart every daemon with the new key list (the new key first, the old ones after "
            "it) before keys rotate"
        )
    return await store.rotate_keys()


# ``migrate`` as a deployment step (a Kubernetes init container, a Compose service) may start
# before PostgreSQL accepts connections: it waits, like the daemon, this long at most.
MIGRATE_WAIT_SECONDS = 300.0
MIGRATE_RETRY_SECONDS = 2.0


def cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    """``migrate``: bring the database to the latest schema (a SQLite file is created if
    absent; a PostgreSQL database must exist, and is waited for while it cannot be reached)
    and exit, for a deployment step that runs before the daemons start."""

    async def migrated(store: Store) -> tuple[int | None, int]:
        return store.migrated_from, await store.schema_version()

    deadline = time.monotonic() + MIGRATE_WAIT_SECONDS
    while True:
        try:
            before, version = _with_store(config, migrated)
            break
        except StoreUnavailable as exc:
            if time.monotonic() + MIGRATE_RETRY_SECONDS > deadline:
                raise
            print(f"waiting for the database: {exc}", file=sys.stderr)
            time.sleep(MIGRATE_RETRY_SECONDS)  # the database is not there yet
    if before is None:
        print(f"database {config.database} is at schema version {version}, the latest")
    else:
        print(f"database {config.database} migrated from schema version {before} to {version}")
    return EXIT_OK


def cmd_tokens_create(args: argparse.Namespace, config: Config) -> int:
    validate_token_name(args.name)  # before the database is opened, so bad input creates none

    async def create(store: Store) -> str:
        return (await management.create_proxy_token(store, args.name))["token"]

    token = _with_store(config, create)
    # The token alone on stdout, so T=$(aibridgeproxyd tokens create me) works; the rest on
    # stderr. It is printed only after the hash is safely stored.
    print(token)
    print(
        f"created proxy token {args.name!r}; it is shown only once and cannot be recovered.\n"
        f"Use it as the proxy password, e.g. HTTPS_PROXY=http://{args.name}:<token>@{config.listen}"
        " (the daemon's listen address as this configuration sets it)",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_tokens_list(args: argparse.Namespace, config: Config) -> int:
    # As the API lists them: last_used_at is the newest record the token's user initiated.
    tokens = _with_store(config, management.list_proxy_tokens)
    if args.json:
        _print_json(tokens)
    else:
        rows = [[t["name"], t["created_at"], t["last_used_at"] or "-"] for t in tokens]
        _print_table(["NAME", "CREATED_AT", "LAST_USED_AT"], rows)
    return EXIT_OK


def cmd_tokens_revoke(args: argparse.Namespace, config: Config) -> int:
    async def revoke(store: Store) -> bool:
        await management.revoke_proxy_token(store, args.name)
        # Return only once every running daemon refuses the token (aibridgeproxyd.presence).
        return await wait_for_daemons(store)

    applied = _with_store(config, revoke)
    if applied:
        print(f"token {args.name!r} revoked; new connections with it are refused")
    else:
        print(
            f"token {args.name!r} revoked; a running daemon did not confirm within "
            f"{WAIT_SECONDS:g}s and refuses it once it reloads",
            file=sys.stderr,
        )
    return EXIT_OK


# --- admin tokens ------------------------------------------------------------------------------


def cmd_admin_tokens_create(args: argparse.Namespace, config: Config) -> int:
    validate_token_name(args.name)  # before the database is opened, so bad input creates none

    async def create(store: Store) -> str:
        return (await management.create_admin_token(store, args.name, args.role))["token"]

    token = _with_store(config, create)
    # As ``tokens create``: the token alone on stdout, shown once, after its hash is stored.
    print(token)
    print(
        f"created {args.role} token {args.name!r} for the HTTP API; it is shown only once and "
        "cannot be recovered. Send it as 'Authorization: Bearer <token>'",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_admin_tokens_list(args: argparse.Namespace, config: Config) -> int:
    tokens = _with_store(config, management.list_admin_tokens)
    if args.json:
        _print_json(tokens)
    else:
        rows = [[t["name"], t["role"], t["created_at"]] for t in tokens]
        _print_table(["NAME", "ROLE", "CREATED_AT"], rows)
    return EXIT_OK


def cmd_admin_tokens_revoke(args: argparse.Namespace, config: Config) -> int:
    async def revoke(store: Store) -> None:
        await management.revoke_admin_token(store, args.name)

    _with_store(config, revoke)
    print(f"admin token {args.name!r} revoked; API requests with it are refused")
    return EXIT_OK


# --- prices ------------------------------------------------------------------------------------


def _stored_prices(config: Config) -> list[tuple[str, ModelPrices | None, str]]:
    """The prices stored with ``prices set``; none when there is no database yet (reading
    prices never creates one)."""
    if not config.database.is_postgres and not config.database_path.exists():
        return []
    return _with_store(config, lambda store: store.list_model_prices())


def cmd_prices_list(args: argparse.Namespace, config: Config) -> int:
    """Every operator price (USD per million tokens) with its source: ``store`` (``prices set``)
    and ``config`` (``prices:``). For a model in both, the store's is in force."""
    stored = [
        {"model": model, "source": "store", **override_rates(rates), "updated_at": updated}
        for model, rates, updated in _stored_prices(config)
    ]
    configured = [
        {"model": model, "source": "config", **override_rates(rates), "updated_at": None}
        for model, rates in config.prices.items()
    ]
    rows = sorted(stored + configured, key=lambda row: (row["model"], row["source"] != "store"))
    if args.json:
        _print_json(rows)
    else:
        columns = ["model", "source", *RATE_NAMES]
        _print_table(
            [c.upper() for c in columns], [[row[c] or "-" for c in columns] for row in rows]
        )
    return EXIT_OK


def cmd_prices_show(args: argparse.Namespace, config: Config) -> int:
    """The price a record of provider type TYPE and model MODEL gets, and its source."""
    stored = {model: rates for model, rates, _ in _stored_prices(config)}
    found = price_source(PriceTable(config.prices, stored=lambda: stored), args.type, args.model)
    if found is None:
        raise UsageError(f"no price for {args.type} model {args.model!r}: its cost stays null")
    if args.json:
        _print_json(found)
    else:
        for key, value in found.items():
            print(f"{key}: {'-' if value is None else value}")
    return EXIT_OK


# ``prices set`` flags -> ModelPrices fields.
PRICE_FLAGS = {
    "--input": "input",
    "--output": "output",
    "--cache-read": "cache_read",
    "--cache-write": "cache_creation",
}


def _price_options(args: argparse.Namespace) -> ModelPrices:
    """The rates of ``prices set``, each checked as the config's (``pricing.parse_rate``);
    ``UsageError`` naming the flag and the value."""
    rates: dict[str, Any] = {}
    for flag, name in PRICE_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        try:
            rates[name] = parse_rate(value)
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from None
    return ModelPrices(**rates)


def cmd_prices_set(args: argparse.Namespace, config: Config) -> int:
    prices = _price_options(args)
    validate_price_model(args.model)

    async def store_price(store: Store) -> bool:
        await store.set_model_price(args.model, prices)
        return await wait_for_daemons(store)

    applied = _with_store(config, store_price)
    given = override_rates(prices)
    # A cache rate left out is priced at the input rate: say so rather than print nothing.
    fallback = f"{given['input']} (the input rate)"
    rates = ", ".join(f"{name} {value or fallback}" for name, value in given.items())
    print(f"price of model {args.model!r} set (USD per million tokens): {rates}")
    _note_unconfirmed(applied, "prices the next records with it")
    return EXIT_OK


def cmd_prices_delete(args: argparse.Namespace, config: Config) -> int:
    async def delete_price(store: Store) -> bool:
        if not await store.delete_model_price(args.model):
            where = "; it is priced by the config's prices:" if args.model in config.prices else ""
            raise RecordError(f"no price set for model {args.model!r}{where}")
        return await wait_for_daemons(store)

    applied = _with_store(config, delete_price)
    print(f"price of model {args.model!r} deleted; the config's prices: or genai-prices apply")
    _note_unconfirmed(applied, "applies the next price once it reloads")
    return EXIT_OK


def _note_unconfirmed(applied: bool, then: str) -> None:
    if not applied:
        print(
            f"note: a running daemon did not confirm within {WAIT_SECONDS:g}s; it {then}",
            file=sys.stderr,
        )


# --- policies (docs/policies.md) ------------------------------------------------------------

# ``policies set`` flags -> Policy fields, each parsed as an int (the cost as a decimal).
POLICY_COUNT_FLAGS = {
    "--max-tokens": "max_tokens",
    "--rpm": "rpm",
    "--tpm": "tpm",
    "--max-parallel": "max_parallel",
}


def _policy_count(flag: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise UsageError(f"{flag}: {text[:40]!r} is not a whole number") from None


def _policy_from_args(args: argparse.Namespace) -> Policy:
    """The policy ``policies set`` describes; ``RecordError`` naming the field (its flag)."""
    count = {
        name: _policy_count(flag, getattr(args, name)) for flag, name in POLICY_COUNT_FLAGS.items()
    }
    models = None if args.models is None else tuple(m.strip() for m in args.models.split(","))
    policy = Policy(
        user=args.user, provider=args.provider, max_cost_usd=args.budget_usd,
        period=args.period, models=models, max_tokens=count["max_tokens"], rpm=count["rpm"],
        tpm=count["tpm"], max_parallel=count["max_parallel"],
    )  # fmt: skip
    try:
        return validate_policy(policy)
    except PolicyError as exc:
        raise RecordError(f"{_POLICY_FLAG_OF.get(exc.field, exc.field)}: {exc}") from None


_POLICY_FLAG_OF = {
    "max_cost_usd": "--budget-usd",
    "user": "--user",
    "provider": "--provider",
    "period": "--period",
    "models": "--models",
    **{name: flag for flag, name in POLICY_COUNT_FLAGS.items()},
}


def _subject(user: str | None, provider: str | None) -> str:
    who = f"user {user!r}" if user else "the default (every user)"
    return who + (f" at provider {provider!r}" if provider else "")


def cmd_policies_list(args: argparse.Namespace, config: Config) -> int:
    """Every policy as a JSON array (``Policy.to_json``), the defaults first."""
    _print_json(_with_store(config, management.list_policies))
    return EXIT_OK


def cmd_policies_show(args: argparse.Namespace, config: Config) -> int:
    """The limits in force for a user and the spend counted against them (``spend_report``)."""

    async def report(store: Store) -> dict[str, Any]:
        policies = index_policies(await store.list_policies())
        return await spend_report(store, policies, args.user or "")

    _print_json(_with_store(config, report))
    return EXIT_OK


def cmd_policies_set(args: argparse.Namespace, config: Config) -> int:
    policy = _policy_from_args(args)

    async def store_policy(store: Store) -> tuple[dict[str, Any], bool, list[str]]:
        view, _ = await management.put_policy(store, policy)
        unknown = await management.policy_unknowns(store, policy)
        return view, await wait_for_daemons(store), unknown

    stored, applied, unknown = _with_store(config, store_policy)
    print(f"policy of {_subject(policy.user, policy.provider)} set", file=sys.stderr)
    for what in unknown:  # stored anyway: the token or provider may come later
        print(f"warning: {what}; the policy applies once it exists", file=sys.stderr)
    _print_json(stored)
    _note_unconfirmed(applied, "applies it once it reloads")
    return EXIT_OK


def cmd_policies_delete(args: argparse.Namespace, config: Config) -> int:
    async def delete_policy(store: Store) -> bool:
        await management.delete_policy(store, args.user, args.provider)
        return await wait_for_daemons(store)

    applied = _with_store(config, delete_policy)
    print(f"policy of {_subject(args.user, args.provider)} deleted")
    _note_unconfirmed(applied, "applies it once it reloads")
    return EXIT_OK


def _add_policy_commands(commands: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    policies = add(
        commands, "policies", None, "budgets, model allow-lists and rate limits per user"
    ).add_subparsers(dest="policies_command", required=True, metavar="COMMAND")
    add(
        policies, "list", cmd_policies_list, "every policy, as a JSON array (defaults first)"
    ).add_argument("--json", action="store_true", help="print a JSON array (the default)")
    show = add(policies, "show", cmd_policies_show, "a user's limits in force and spend, as JSON")
    show.add_argument(
        "--user", metavar="NAME", action=_Once, required=True, help="the user (proxy token name)"
    )
    set_policy = add(
        policies,
        "set",
        cmd_policies_set,
        "create or replace the whole policy of a user (default: every user) and provider",
    )
    for parser in (set_policy, add(policies, "delete", cmd_policies_delete, "delete a policy")):
        parser.add_argument(
            "--user",
            metavar="NAME",
            action=_Once,
            help="a proxy token's name (default: every user)",
        )
        parser.add_argument(
            "--provider",
            metavar="NAME",
            action=_Once,
            help="one provider (default: every provider)",
        )
    set_policy.add_argument("--budget-usd", metavar="USD", action=_Once, help="USD per period")
    set_policy.add_argument(
        "--period", choices=PERIODS, action=_Once, help="the budget's UTC calendar period"
    )
    set_policy.add_argument(
        "--models", metavar="GLOB,...", action=_Once, help="allowed models, e.g. 'gpt-4o*,claude-*'"
    )
    for flag, name in POLICY_COUNT_FLAGS.items():
        set_policy.add_argument(
            flag, dest=name, metavar="N", action=_Once, help=name.replace("_", " ")
        )


# --- interceptions ----------------------------------------------------------------------------

MAX_INTERCEPTIONS_LIMIT = 100_000


def cmd_interceptions_list(args: argparse.Namespace, config: Config) -> int:
    query = _interception_filter(args)

    async def list_records(store: Store) -> list[dict[str, Any]]:
        return await store.list_interceptions(query)

    records = _with_store(config, list_records)
    _print_json(records)
    if len(records) == args.limit:
        # A full page may not be everything: say so, so an export does not lose records.
        print(
            f"note: showing the newest {args.limit} matching records; there may be more "
            f"(raise --limit, up to {MAX_INTERCEPTIONS_LIMIT}, or narrow with --started-before)",
            file=sys.stderr,
        )
    return EXIT_OK


def _interception_filter(args: argparse.Namespace) -> InterceptionFilter:
    """The filter options ``interceptions list`` and ``sessions list`` share, checked."""
    after = _timestamp_option("--started-after", args.started_after)
    before = _timestamp_option("--started-before", args.started_before)
    if not 1 <= args.limit <= MAX_INTERCEPTIONS_LIMIT:
        raise UsageError(
            f"--limit must be between 1 and {MAX_INTERCEPTIONS_LIMIT}, got {args.limit}"
        )
    if args.client is not None and args.client not in CLIENTS:
        raise UsageError(
            f"--client must be one of {', '.join(repr(c) for c in CLIENTS)}, got {args.client!r}"
        )
    return InterceptionFilter(
        provider=args.provider,
        model=args.model,
        initiator=args.initiator,
        client=args.client,
        started_after=after,
        started_before=before,
        limit=args.limit,
        session_id=args.session_id,
    )


# --- sessions ----------------------------------------------------------------------------------


def cmd_sessions_list(args: argparse.Namespace, config: Config) -> int:
    """``{count, sessions}`` as the data API's ``GET /api/v2/aibridge/sessions`` returns it."""
    query = _interception_filter(args)

    async def list_sessions(store: Store) -> dict[str, Any]:
        # One more than the page, to tell whether there is a next page.
        try:
            return await store.list_sessions(query, args.limit + 1, args.after_session_id)
        except RecordError as exc:  # the cursor names no session
            raise RecordError(f"--after-session-id: {exc}") from None

    listed = _with_store(config, list_sessions)
    more = len(listed["sessions"]) > args.limit
    listed["sessions"] = listed["sessions"][: args.limit]
    _print_json(listed)
    if more:
        print(
            f"note: showing {args.limit} of {listed['count']} matching sessions; continue with "
            f"--after-session-id {listed['sessions'][-1]['id']}",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_sessions_show(args: argparse.Namespace, config: Config) -> int:
    """One session with its threads, as ``GET /api/v2/aibridge/sessions/{id}`` returns it."""

    async def get_session(store: Store) -> dict[str, Any]:
        session = await store.get_session(args.session_id)
        if session is None:
            raise RecordError(f"session {args.session_id!r} does not exist")
        return session

    session = _with_store(config, get_session)
    _print_json(session)
    return EXIT_OK


def _timestamp_option(flag: str, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


# --- ca and run ----------------------------------------------------------------------------


def _existing_ca(config: Config) -> CaFiles:
    """The CA files, which must exist: only ``run`` generates a CA. Raises ``CommandFailed``
    naming the absolute path looked at."""
    from aibridgeproxyd.ca import CaFiles, ca_paths

    files = ca_paths(config)
    files = CaFiles(files.cert_path.absolute(), files.key_path.absolute())
    if not files.cert_path.is_file():
        if config.ca_cert_file is not None:
            origin = "set by config key 'ca_cert_file'"
        elif config.database.is_postgres:
            origin = (
                "the replicas' CA is kept in the database: 'aibridgeproxyd ca export' prints it"
            )
        else:
            origin = "'aibridgeproxyd run' generates it on first start"
        raise CommandFailed(f"no CA certificate at {files.cert_path} ({origin})")
    return files


def cmd_ca_path(args: argparse.Namespace, config: Config) -> int:
    print(_existing_ca(config).cert_path)
    return EXIT_OK


def _shared_ca_certificate(config: Config) -> str:
    """The replicas' shared CA certificate, from the database (CONTRACT 14)."""
    pem = _with_store(config, lambda store: store.shared_ca_certificate())
    if pem is None:
        raise CommandFailed(
            "no CA in the database yet: the first replica to start ('aibridgeproxyd run') stores it"
        )
    return pem


def cmd_ca_export(args: argparse.Namespace, config: Config) -> int:
    if config.database.is_postgres and config.ca_cert_file is None:
        sys.stdout.write(_shared_ca_certificate(config))
        return EXIT_OK
    files = _existing_ca(config)
    # Only CERTIFICATE blocks: an operator's cert file may also hold the key.
    try:
        pem = files.certificate_pem()
    except OSError as exc:
        raise CommandFailed(
            f"cannot read CA certificate {files.cert_path}: {exc.strerror}"
        ) from None
    if not pem:
        raise CommandFailed(f"CA certificate file {files.cert_path} holds no certificate")
    sys.stdout.write(pem.decode())
    return EXIT_OK


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    # Imported here so management commands never load mitmproxy.
    from aibridgeproxyd.daemon import run_daemon

    if config.workers > 1:
        from aibridgeproxyd.workers import serve_workers

        return run_daemon(config, serve_workers)
    return run_daemon(config)


# --- parser --------------------------------------------------------------------------------


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """--config and --data-dir. Subcommands use SUPPRESS defaults so a value given before the
    subcommand is not overwritten by the subcommand's own default; the later one wins."""
    parent = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    parent.add_argument(
        "--config", type=Path, metavar="FILE", default=default, help="YAML configuration file"
    )
    parent.add_argument(
        "--data-dir",
        metavar="DIR",
        default=default,
        help="directory of the SQLite database (default ./data)",
    )
    return parent


def _add_provider_options(parser: argparse.ArgumentParser, editing: bool) -> None:
    parser.add_argument("name", metavar="NAME", help="provider name, e.g. openai or corp-azure")
    types = ", ".join(sorted(ADAPTERS))
    with_settings = ", ".join(sorted(name for name, a in ADAPTERS.items() if a.known_settings))
    parser.add_argument(
        "--type",
        required=not editing,
        metavar="TYPE",
        action=_Once,
        help=f"provider type: {types}",
    )
    parser.add_argument("--display-name", metavar="TEXT", action=_Once, help="human-readable name")
    parser.add_argument(
        "--base-url",
        metavar="URL",
        action=_Once,
        help="upstream base URL ('' for the type's default)",
    )
    parser.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="HOST",
        help="hostname to intercept (no wildcards); repeat for several"
        + ("; replaces the list" if editing else ""),
    )
    parser.add_argument(
        "--key",
        action="append",
        dest="keys",
        metavar="KEY",
        help=f"central API key, up to {MAX_KEYS}, tried in order; repeat for several"
        + ("; replaces the list" if editing else "")
        + ". Visible in the process list: prefer --key-stdin",
    )
    parser.add_argument(
        "--key-stdin",
        action="store_true",
        help="read keys from stdin, one per line"
        + ("; replaces the list" if editing else "")
        + ". Empty input is refused"
        + ("; --clear-keys removes every key" if editing else ""),
    )
    byok = parser.add_mutually_exclusive_group()
    byok.add_argument(
        "--byok",
        action="store_const",
        const=True,
        dest="allow_byok",
        help="let clients use their own key (default: allowed)",
    )
    byok.add_argument(
        "--no-byok",
        action="store_const",
        const=False,
        dest="allow_byok",
        help="refuse clients' own keys: only the central keys are used",
    )
    parser.add_argument(
        "--set",
        action="append",
        dest="settings",
        default=[],
        metavar="K=V",
        help=f"type-specific setting (types with settings: {with_settings}; an unknown K is "
        "refused with the list); V is parsed as JSON when valid, else kept as a string"
        + ("; merged into the existing settings" if editing else ""),
    )
    state = parser.add_mutually_exclusive_group()
    if editing:
        state.add_argument(
            "--enabled", action="store_const", const=True, dest="enabled", help="turn it on"
        )
    state.add_argument(
        "--disabled", action="store_const", const=False, dest="enabled", help="turn it off"
    )
    if editing:
        parser.add_argument(
            "--unset",
            action="append",
            metavar="K",
            help="remove a setting that is set; repeat for several",
        )
        parser.add_argument(
            "--clear-hosts", action="store_true", help="go back to the type's default hosts"
        )
        parser.add_argument("--clear-keys", action="store_true", help="remove every key")


def _add_interception_filters(listing: argparse.ArgumentParser, items: str) -> None:
    """The filters of ``interceptions list`` and ``sessions list``: a session matches when one
    of its records does."""
    for option, meaning in (
        ("--provider", "provider name or type"),
        ("--model", "model name"),
        ("--initiator", "proxy token name (the user)"),
        ("--client", "client, e.g. 'Claude Code'"),
        ("--session-id", "session"),
    ):
        listing.add_argument(
            option, metavar=option.strip("-").split("-")[-1].upper(), help=f"only this {meaning}"
        )
    listing.add_argument(
        "--started-after", metavar="TS", help="RFC 3339, e.g. 2026-11-26T00:00:00Z"
    )
    listing.add_argument("--started-before", metavar="TS", help="RFC 3339")
    listing.add_argument(
        "--limit", metavar="N", type=int, default=100, help=f"at most N {items} (100)"
    )


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(suppress=True)
    parser = _Parser(
        prog=PROG,
        description=(
            "HTTPS forward proxy for AI traffic: intercepts provider hosts, tunnels the rest."
        ),
        parents=[_common_options(suppress=False)],
        # Scripts should not come to depend on abbreviations a future option would make ambiguous.
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        group: Any, name: str, handler: Handler | None, help_text: str
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(
            name, parents=[common], help=help_text, description=help_text, allow_abbrev=False
        )
        if handler is not None:
            sub.set_defaults(handler=handler)
        return sub

    run = add(commands, "run", cmd_run, "run the daemon in the foreground")
    run.add_argument(
        "--listen", metavar="HOST:PORT", help="proxy listener (default 127.0.0.1:8888)"
    )
    run.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="admin listener: dashboard, API, metrics, health (default 127.0.0.1:8889)",
    )
    run.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")

    providers = add(commands, "providers", None, "manage AI providers").add_subparsers(
        dest="providers_command", required=True, metavar="COMMAND"
    )
    listing = add(
        providers,
        "list",
        cmd_providers_list,
        "list providers with their status: a table, or a JSON array with --json",
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    show = add(providers, "show", cmd_providers_show, "show one provider")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    _add_provider_options(add(providers, "add", cmd_providers_add, "add a provider"), editing=False)
    _add_provider_options(
        add(providers, "edit", cmd_providers_edit, "change the fields given"), editing=True
    )
    for name, handler, help_text in (
        ("enable", _cmd_set_enabled(True), "enable a provider"),
        ("disable", _cmd_set_enabled(False), "disable a provider: its hosts are tunneled"),
        ("delete", cmd_providers_delete, "delete a provider (seeding never recreates it)"),
    ):
        add(providers, name, handler, help_text).add_argument("name", metavar="NAME")

    tokens = add(commands, "tokens", None, "manage proxy tokens").add_subparsers(
        dest="tokens_command", required=True, metavar="COMMAND"
    )
    add(
        tokens,
        "create",
        cmd_tokens_create,
        "create a proxy token for user NAME; stdout is the token alone, shown only once",
    ).add_argument("name", metavar="NAME")
    add(
        tokens,
        "list",
        cmd_tokens_list,
        "list token names and creation times (never tokens or hashes): "
        "a NAME/CREATED_AT table, or with --json an array of {name, created_at}",
    ).add_argument("--json", action="store_true", help="print a JSON array")
    add(
        tokens,
        "revoke",
        cmd_tokens_revoke,
        "revoke a token: refused on new connections once it returns",
    ).add_argument("name", metavar="NAME")

    _add_admin_token_commands(commands, add)
    _add_policy_commands(commands, add)

    prices = add(commands, "prices", None, "price overrides and price look-ups").add_subparsers(
        dest="prices_command", required=True, metavar="COMMAND"
    )
    add(
        prices, "list", cmd_prices_list, "operator prices: prices set (store) and prices: (config)"
    ).add_argument("--json", action="store_true", help="print a JSON array")
    set_price = add(
        prices,
        "set",
        cmd_prices_set,
        "store a model's price in USD per million tokens; it wins over prices: and genai-prices",
    )
    set_price.add_argument("model", metavar="MODEL")
    for flag, name in PRICE_FLAGS.items():
        required = name in ("input", "output")
        set_price.add_argument(
            flag, dest=name, metavar="USD", action=_Once, required=required,
            help=f"USD per million {name.replace('_', ' ')} tokens"
            + ("" if required else " (default: the --input rate)"),
        )  # fmt: skip
    add(prices, "delete", cmd_prices_delete, "remove a price set with prices set").add_argument(
        "model", metavar="MODEL"
    )
    show_price = add(
        prices, "show", cmd_prices_show, "the price of a model of a provider type, and its source"
    )
    show_price.add_argument("type", metavar="TYPE", choices=sorted(PROVIDER_IDS))
    show_price.add_argument("model", metavar="MODEL")
    show_price.add_argument("--json", action="store_true", help="print a JSON object")

    interceptions = add(
        commands, "interceptions", None, "interception records of MITM'd requests"
    ).add_subparsers(dest="interceptions_command", required=True, metavar="COMMAND")
    listing = add(
        interceptions,
        "list",
        cmd_interceptions_list,
        "a JSON array of interception records, newest first",
    )
    _add_interception_filters(listing, "records")

    sessions = add(
        commands, "sessions", None, "sessions and threads of interception records"
    ).add_subparsers(dest="sessions_command", required=True, metavar="COMMAND")
    listing = add(
        sessions,
        "list",
        cmd_sessions_list,
        "a JSON object {count, sessions}: sessions with a matching record, most recently active "
        "first",
    )
    _add_interception_filters(listing, "sessions")
    listing.add_argument(
        "--after-session-id", metavar="ID", help="continue after this session (the next page)"
    )
    add(sessions, "show", cmd_sessions_show, "one session with its threads, as JSON").add_argument(
        "session_id", metavar="ID"
    )

    keys = add(commands, "keys", None, "encryption keys of secrets at rest").add_subparsers(
        dest="keys_command", required=True, metavar="COMMAND"
    )
    add(
        keys,
        "rotate",
        cmd_keys_rotate,
        "re-encrypt every provider key and secret setting with the first encryption key",
    )

    add(commands, "migrate", cmd_migrate, "apply the database migrations, then exit")

    ca = add(commands, "ca", None, "the MITM certificate authority").add_subparsers(
        dest="ca_command", required=True, metavar="COMMAND"
    )
    add(
        ca,
        "path",
        cmd_ca_path,
        "print the CA certificate's absolute path (never generates one: 'run' does)",
    )
    add(ca, "export", cmd_ca_export, "print the CA certificate as PEM (never the key)")
    return parser


def _add_admin_token_commands(commands: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    admin_tokens = add(
        commands, "admin-tokens", None, "manage tokens of the HTTP API (roles admin, auditor)"
    ).add_subparsers(dest="admin_tokens_command", required=True, metavar="COMMAND")
    create = add(
        admin_tokens,
        "create",
        cmd_admin_tokens_create,
        "create an API token; stdout is the token alone, shown only once",
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument(
        "--role",
        required=True,
        choices=ADMIN_ROLES,
        action=_Once,
        help="admin: everything; auditor: read providers (no secrets), records, usage",
    )
    add(
        admin_tokens,
        "list",
        cmd_admin_tokens_list,
        "list API token names, roles and creation times (never tokens or hashes): a table, "
        "or with --json an array of {name, role, created_at}",
    ).add_argument("--json", action="store_true", help="print a JSON array")
    add(
        admin_tokens,
        "revoke",
        cmd_admin_tokens_revoke,
        "revoke an API token: the next request with it gets 401",
    ).add_argument("name", metavar="NAME")


def _config_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: getattr(args, key, None) for key in ("data_dir", "listen", "admin_listen", "log_level")
    }


def _fail(exc: BaseException, code: int) -> int:
    # Exactly one line, whatever the message holds (YAML errors span several).
    print("error: " + " ".join(str(exc).split()), file=sys.stderr)
    return code


def _check_arguments_are_text(argv: Sequence[str]) -> None:
    """Bytes that are not UTF-8 reach Python as lone surrogates, which SQLite and every encoder
    refuse later, as a traceback; they are refused here, naming the argument's position."""
    for position, argument in enumerate(argv, start=1):
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"argument #{position} is not valid UTF-8 text") from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        _check_arguments_are_text(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        config = load_config(args.config, _config_flags(args))
        return int(args.handler(args, config))
    except (UsageError, ConfigError, RecordError) as exc:
        return _fail(exc, EXIT_USAGE)
    except (StoreError, CommandFailed) as exc:
        return _fail(exc, EXIT_FAILURE)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): exit quietly, and keep Python from complaining
        # about the unflushable stdout at shutdown.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except OSError as exc:
        # A file or directory that cannot be read or written (permissions, a full disk).
        where = f" {Path(exc.filename).absolute()}" if exc.filename else ""
        return _fail(OSError(f"cannot use{where}: {exc.strerror or exc}"), EXIT_FAILURE)
