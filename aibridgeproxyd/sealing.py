"""Secrets at rest (CONTRACT section 13): provider keys and secret settings sealed with AES-256-GCM.

A sealed value is text: ``enc:v1:<key id>:<base64 of nonce (12 bytes) + ciphertext + tag>``. The
key id is the first 7 bytes of the SHA-256 of the 32-byte key, in hex (14 digits), so a value says
which key sealed it without revealing the key. The associated data binds a value to its place
(provider name and field, e.g. ``keys`` or ``settings.secret_access_key``): a ciphertext copied to
another row or field fails authentication. AES-GCM: NIST SP 800-38D, via ``cryptography``'s
``AESGCM`` (a random 96-bit nonce per value).

Keys come from ``encryption_keys`` (the first seals, every one opens) or, without it, from
``<data_dir>/encryption.key``: the base64 text of 32 random bytes, mode 0600, created atomically
the first time a value is sealed and never overwritten.

The store is the only caller (``Store`` methods and ``read_routing_state``): records in memory
hold plaintext, rows on disk hold sealed values.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aibridgeproxyd.adapters import ADAPTERS

log = logging.getLogger("aibridgeproxyd.sealing")

PREFIX = "enc:v1:"
KEY_FILE_NAME = "encryption.key"
KEY_BYTES = 32
NONCE_BYTES = 12
KEY_FILE_MODE = 0o600
_KEY_ID = re.compile(r"^[0-9a-f]{14}$")
# A key file is one line of base64 (44 characters); anything much longer is not one.
_KEY_FILE_MAX_BYTES = 256

# Setting names that hold secrets whatever the provider type, on top of each adapter's list.
_SECRET_SETTING = re.compile(r"secret|key|token|password", re.IGNORECASE)


class SealingError(Exception):
    """A secret cannot be sealed or opened. Messages name keys by id and values by provider and
    field, never a key or a value."""


class UnknownKeyError(SealingError):
    """A value was sealed with a key that is not configured; ``key_id`` names it."""

    def __init__(self, key_id: str, source: str, provider: str) -> None:
        super().__init__(
            f"a stored secret (provider {provider!r}) was encrypted with key id {key_id}, which "
            f"is not among the encryption keys ({source}); add that key to encryption_keys"
        )
        self.key_id = key_id


class TamperedValueError(SealingError):
    """A sealed value failed authentication: altered, truncated, or moved from another place."""


class KeyFileError(SealingError):
    """The key file cannot be used: wrong mode, wrong size, or unreadable."""


def key_id(key: bytes) -> str:
    """The 14-hex-digit id of a 32-byte key: the first 7 bytes of its SHA-256."""
    return hashlib.sha256(key).digest()[:7].hex()


def is_sealed(value: Any) -> bool:
    """Whether a stored value is a sealed one (``enc:v1:...``)."""
    return type(value) is str and value.startswith(PREFIX)


def sealed_key_id(value: str) -> str:
    """The key id a sealed value names (not checked against any key)."""
    return value[len(PREFIX) : len(PREFIX) + 14]


def is_secret_setting(provider_type: str, name: str) -> bool:
    """Whether a setting holds a secret: a name in the adapter's ``secret_settings``, or one that
    looks like a secret (secret, key, token, password), at any depth. Shared by masking (the CLI,
    the API) and sealing (the store), so what is hidden on screen is what is encrypted on disk."""
    adapter = ADAPTERS.get(provider_type)
    declared = adapter.secret_settings if adapter is not None else frozenset()
    return name in declared or _SECRET_SETTING.search(name) is not None


def _associated_data(provider: str, field: str) -> bytes:
    return f"aibridgeproxyd\0{provider}\0{field}".encode()


def decode_key(text: str) -> bytes:
    """A base64 key as its 32 bytes; ValueError when it is not that (the key is not echoed)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise ValueError("not the base64 text of 32 bytes")
    return raw


class Keyring:
    """The encryption keys of one process: the first seals, every one opens. Safe to share
    between the event loop and the reload's worker thread.

    ``Keyring(keys)`` uses configured keys; ``Keyring(key_file=path)`` the key file, read the
    first time a key is needed and generated the first time a value is sealed."""

    def __init__(self, keys: Iterable[bytes] = (), key_file: Path | None = None) -> None:
        self._ciphers: dict[str, AESGCM] = {}
        self._first: str | None = None
        for key in keys:
            self._add(key)
        self._key_file = None if self._first is not None else key_file
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, encryption_keys: Iterable[str], data_dir: Path) -> Keyring:
        """From ``Config.encryption_keys`` (already checked base64), else the key file in
        ``data_dir``."""
        keys = [decode_key(text) for text in encryption_keys]
        return cls(keys, None if keys else Path(data_dir) / KEY_FILE_NAME)

    @classmethod
    def beside(cls, database: Path) -> Keyring:
        """The key file next to a database file: ``<data_dir>/encryption.key``."""
        return cls(key_file=Path(database).parent / KEY_FILE_NAME)

    def _add(self, key: bytes) -> None:
        identifier = key_id(key)
        self._ciphers.setdefault(identifier, AESGCM(key))
        if self._first is None:
            self._first = identifier

    @property
    def source(self) -> str:
        """Where the keys come from, for messages: ``encryption_keys`` or the key file path,
        and that it is missing when it is (a data directory restored without it)."""
        if self._key_file is None:
            return "encryption_keys"
        if self._first is None and not self._key_file.exists():
            return f"key file {self._key_file} does not exist: restore it from your backup"
        return f"key file {self._key_file}"

    def _load(self) -> None:
        if self._first is None and self._key_file is not None:
            with self._lock:
                if self._first is None:
                    key = read_key_file(self._key_file)
                    if key is not None:
                        self._add(key)

    def key_ids(self) -> tuple[str, ...]:
        """The ids of every key this keyring holds (the key file's once read), first first."""
        self._load()
        return tuple(self._ciphers)

    def first_key_id(self) -> str:
        """The id of the key that seals, generating the key file if there is none yet."""
        self._load()
        if self._first is None:
            assert self._key_file is not None  # configured keys always set _first
            with self._lock:
                if self._first is None:
                    try:
                        self._add(create_key_file(self._key_file))
                    except OSError as exc:
                        raise KeyFileError(
                            f"cannot create key file {self._key_file}: {exc.strerror or exc}"
                        ) from None
        assert self._first is not None
        return self._first

    def seal(self, plaintext: str, provider: str, field: str) -> str:
        """``plaintext`` sealed with the first key, bound to ``provider`` and ``field``."""
        identifier = self.first_key_id()
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[identifier].encrypt(
            nonce, plaintext.encode(), _associated_data(provider, field)
        )
        return f"{PREFIX}{identifier}:{base64.b64encode(nonce + sealed).decode()}"

    def unseal(self, value: str, provider: str, field: str) -> str:
        """The plaintext of a sealed value. ``UnknownKeyError`` naming the key id when no key of
        ours sealed it; ``TamperedValueError`` naming provider and field when it fails
        authentication (or is not a sealed value at all)."""
        tampered = TamperedValueError(
            f"provider {provider!r}: the stored {field} cannot be decrypted: it was altered, "
            "or copied from another provider or field"
        )
        identifier, _, body = value[len(PREFIX) :].partition(":")
        if not value.startswith(PREFIX) or not _KEY_ID.match(identifier):
            raise tampered
        self._load()
        cipher = self._ciphers.get(identifier)
        if cipher is None:
            raise UnknownKeyError(identifier, self.source, provider)
        try:
            blob = base64.b64decode(body, validate=True)
            opened = cipher.decrypt(
                blob[:NONCE_BYTES], blob[NONCE_BYTES:], _associated_data(provider, field)
            )
            return opened.decode()
        except (binascii.Error, ValueError, InvalidTag):
            raise tampered from None

    def reseal(
        self, value: Any, provider: str, field: str, *, rotate: bool, as_json: bool
    ) -> str | None:
        """A stored value sealed with the first key, or None when it needs no change: plaintext
        is sealed (as its JSON text with ``as_json``: a setting's value may be any JSON value);
        a sealed value is sealed again when ``rotate`` and another key sealed it (and with
        ``rotate`` one the first key sealed is still opened, so an altered value is reported)."""
        if not is_sealed(value):
            text = json.dumps(value, sort_keys=True) if as_json else str(value)
            return self.seal(text, provider, field)
        if not rotate:
            return None
        plaintext = self.unseal(value, provider, field)
        if sealed_key_id(value) == self.first_key_id():
            return None
        return self.seal(plaintext, provider, field)


# --- settings ------------------------------------------------------------------------------


def seal_settings(
    keyring: Keyring, provider: str, provider_type: str, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Settings as stored: each secret setting's value (any JSON value) sealed as its JSON
    text, at any depth."""

    def seal(field: str, value: Any) -> Any:
        return keyring.seal(json.dumps(value, sort_keys=True), provider, field)

    return walk_secret_settings(provider_type, settings, seal)


def walk_secret_settings(
    provider_type: str,
    settings: Mapping[str, Any],
    change: Callable[[str, Any], Any],
    path: str = "settings",
) -> dict[str, Any]:
    """A copy of ``settings`` with ``change(field, value)`` applied to each secret setting's
    value; ``field`` is its path (``settings.aws.secret_access_key``, ``settings.list[0].key``)."""

    def walk(value: Any, where: str) -> Any:
        if isinstance(value, Mapping):
            return {
                name: change(f"{where}.{name}", item)
                if is_secret_setting(provider_type, name)
                else walk(item, f"{where}.{name}")
                for name, item in value.items()
            }
        if isinstance(value, list):
            return [walk(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return value

    result: dict[str, Any] = walk(settings, path)
    return result


def unseal_settings(keyring: Keyring, provider: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Stored settings with every sealed value opened (whatever its name, so a value sealed
    under an older secret-name rule still opens); plaintext values are kept as they are."""

    def walk(value: Any, where: str) -> Any:
        if isinstance(value, Mapping):
            return {name: walk(item, f"{where}.{name}") for name, item in value.items()}
        if isinstance(value, list):
            return [walk(item, f"{where}[{index}]") for index, item in enumerate(value)]
        if is_sealed(value):
            return json.loads(keyring.unseal(value, provider, where))
        return value

    result: dict[str, Any] = walk(settings, "settings")
    return result


def has_plaintext_secret(provider_type: str, settings: Mapping[str, Any]) -> bool:
    """Whether a stored settings object holds a secret setting that is not sealed."""
    found: list[str] = []

    def note(field: str, value: Any) -> Any:
        if not is_sealed(value):
            found.append(field)
        return value

    walk_secret_settings(provider_type, settings, note)
    return bool(found)


# --- the key file --------------------------------------------------------------------------


def read_key_file(path: Path) -> bytes | None:
    """The key in ``path``, None when there is no file. ``KeyFileError`` when it is readable by
    others than its owner, not a regular file, or not the base64 text of 32 bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}; it must be "
                f"readable by its owner only (chmod 600 {path})"
            )
        data = os.read(fd, _KEY_FILE_MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        if len(data) > _KEY_FILE_MAX_BYTES:
            raise ValueError
        return decode_key(data.decode("ascii"))
    except ValueError:
        raise KeyFileError(f"key file {path} is not the base64 text of 32 bytes") from None


def create_key_file(path: Path) -> bytes:
    """Generate a key into ``path`` (mode 0600) and return it; if another process created the
    file first, return that key instead. Written to a temporary file then linked into place, so
    the file is never seen half-written and an existing key is never overwritten."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = os.urandom(KEY_BYTES)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    try:
        try:
            os.write(fd, base64.b64encode(key) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            existing = read_key_file(path)
            if existing is None:
                raise KeyFileError(f"key file {path} vanished while it was created") from None
            return existing
    finally:
        temporary.unlink(missing_ok=True)
    _sync_directory(path.parent)
    log.warning(
        "generated encryption key %s (key id %s): back it up; without it the provider keys "
        "stored in the database cannot be read",
        path,
        key_id(key),
    )
    return key


def _sync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the link is still there
    finally:
        os.close(fd)
