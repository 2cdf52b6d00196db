"""Secrets at rest, the cipher alone (aibridgeproxyd.sealing): the value format and its key id,
binding to provider and field, tampering, the first key seals and the others open, and the key
file (generated once with mode 0600, never overwritten, refused when readable by others or of
the wrong size)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from aibridgeproxyd.sealing import (
    KEY_FILE_NAME,
    KeyFileError,
    Keyring,
    TamperedValueError,
    UnknownKeyError,
    create_key_file,
    is_secret_setting,
    key_id,
    read_key_file,
    seal_settings,
    unseal_settings,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
SECRET = "sk-live-0123456789abcdef"
SEALED = re.compile(r"^enc:v1:([0-9a-f]{14}):([A-Za-z0-9+/=]+)$")


def test_a_sealed_value_names_its_key_by_the_first_seven_bytes_of_its_sha256() -> None:
    sealed = Keyring([KEY_A]).seal(SECRET, "corp", "keys")
    match = SEALED.match(sealed)
    assert match is not None, sealed
    assert match[1] == hashlib.sha256(KEY_A).hexdigest()[:14] == key_id(KEY_A)
    assert SECRET not in sealed
    # nonce (12) + ciphertext (len) + tag (16)
    assert len(base64.b64decode(match[2])) == 12 + len(SECRET) + 16


def test_round_trip_and_a_fresh_nonce_for_every_value() -> None:
    keyring = Keyring([KEY_A])
    first, second = keyring.seal(SECRET, "corp", "keys"), keyring.seal(SECRET, "corp", "keys")
    assert first != second
    assert keyring.unseal(first, "corp", "keys") == keyring.unseal(second, "corp", "keys") == SECRET


@pytest.mark.parametrize(
    ("provider", "field"), [("other", "keys"), ("corp", "settings.secret_access_key")]
)
def test_a_value_moved_to_another_provider_or_field_fails_authentication(
    provider: str, field: str
) -> None:
    keyring = Keyring([KEY_A])
    sealed = keyring.seal(SECRET, "corp", "keys")
    with pytest.raises(TamperedValueError) as caught:
        keyring.unseal(sealed, provider, field)
    assert repr(provider) in str(caught.value) and field in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda v: v[:-6] + ("A" if v[-6] != "A" else "B") + v[-5:],  # a ciphertext byte
        lambda v: v[:40],  # truncated
        lambda v: v + "!",  # not base64
        lambda v: v.replace("enc:v1:", "enc:v1:zz", 1),  # not a key id
    ],
    ids=["flipped", "truncated", "not-base64", "bad-key-id"],
)
def test_a_tampered_value_is_refused_naming_provider_and_field_never_its_content(
    tamper: Callable[[str], str],
) -> None:
    keyring = Keyring([KEY_A])
    sealed = tamper(keyring.seal(SECRET, "corp", "keys"))
    with pytest.raises(TamperedValueError, match=r"provider 'corp': the stored keys cannot be"):
        keyring.unseal(sealed, "corp", "keys")


def test_the_first_key_seals_and_the_others_only_open() -> None:
    old = Keyring([KEY_A]).seal(SECRET, "corp", "keys")
    both = Keyring([KEY_B, KEY_A])
    assert both.unseal(old, "corp", "keys") == SECRET
    assert both.first_key_id() == key_id(KEY_B)
    assert both.seal(SECRET, "corp", "keys").startswith(f"enc:v1:{key_id(KEY_B)}:")
    resealed = both.reseal(old, "corp", "keys", rotate=True, as_json=False)
    assert resealed is not None and resealed.startswith(f"enc:v1:{key_id(KEY_B)}:")
    assert both.reseal(resealed, "corp", "keys", rotate=True, as_json=False) is None


def test_a_value_sealed_with_a_key_we_do_not_have_names_that_key_id() -> None:
    sealed = Keyring([KEY_A]).seal(SECRET, "corp", "keys")
    with pytest.raises(UnknownKeyError) as caught:
        Keyring([KEY_B]).unseal(sealed, "corp", "keys")
    assert caught.value.key_id == key_id(KEY_A)
    assert key_id(KEY_A) in str(caught.value) and "encryption_keys" in str(caught.value)


def test_from_config_uses_the_configured_keys_and_never_the_key_file(tmp_path: Path) -> None:
    texts = [base64.b64encode(KEY_B).decode(), base64.b64encode(KEY_A).decode()]
    keyring = Keyring.from_config(texts, tmp_path)
    keyring.seal(SECRET, "corp", "keys")
    assert keyring.first_key_id() == key_id(KEY_B)
    assert not (tmp_path / KEY_FILE_NAME).exists()


# --- the key file ------------------------------------------------------------------------------


def test_the_key_file_is_generated_on_the_first_seal_with_mode_0600(tmp_path: Path) -> None:
    keyring = Keyring.from_config([], tmp_path / "data")
    path = tmp_path / "data" / KEY_FILE_NAME
    assert not path.exists()  # not on construction
    sealed = keyring.seal(SECRET, "corp", "keys")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = base64.b64decode(path.read_text().strip(), validate=True)
    assert len(key) == 32
    assert sealed.startswith(f"enc:v1:{key_id(key)}:")
    # Another process (another keyring) reads the same key.
    assert Keyring.from_config([], tmp_path / "data").unseal(sealed, "corp", "keys") == SECRET
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE_NAME]  # no temporary left


def test_reading_never_creates_the_key_file(tmp_path: Path) -> None:
    sealed = Keyring([KEY_A]).seal(SECRET, "corp", "keys")
    with pytest.raises(UnknownKeyError, match=f"key id {key_id(KEY_A)}.*key file") as caught:
        Keyring(key_file=tmp_path / KEY_FILE_NAME).unseal(sealed, "corp", "keys")
    assert not (tmp_path / KEY_FILE_NAME).exists()
    # The message says the file is missing rather than suggest its key is the wrong one.
    assert f"{tmp_path / KEY_FILE_NAME} does not exist: restore it" in str(caught.value)


def test_a_key_file_with_another_key_is_named_as_it_is(tmp_path: Path) -> None:
    sealed = Keyring([KEY_A]).seal(SECRET, "corp", "keys")
    other = Keyring(key_file=tmp_path / KEY_FILE_NAME)
    other.seal(SECRET, "corp", "keys")  # generates a key file with a new key
    with pytest.raises(UnknownKeyError, match=f"key file {tmp_path / KEY_FILE_NAME}\\)"):
        Keyring(key_file=tmp_path / KEY_FILE_NAME).unseal(sealed, "corp", "keys")


def test_an_existing_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    first = create_key_file(path)
    before = path.read_bytes()
    assert create_key_file(path) == first
    assert path.read_bytes() == before


def test_concurrent_first_seals_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    ids: list[str] = []

    def seal() -> None:
        ids.append(Keyring(key_file=path).first_key_id())

    threads = [threading.Thread(target=seal) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1
    assert ids[0] == key_id(read_key_file(path) or b"")


def test_a_key_file_readable_by_others_is_refused_naming_its_mode(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    create_key_file(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match=r"mode 0644.*chmod 600"):
        Keyring(key_file=path).first_key_id()


@pytest.mark.parametrize(
    "content",
    [base64.b64encode(b"x" * 16) + b"\n", b"not base64 at all\n", b"", b"A" * 400],
    ids=["16-bytes", "not-base64", "empty", "huge"],
)
def test_a_key_file_that_is_not_32_bytes_of_base64_is_refused(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / KEY_FILE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(KeyFileError, match="not the base64 text of 32 bytes"):
        Keyring(key_file=path).seal(SECRET, "corp", "keys")
    assert path.read_bytes() == content  # never replaced


def test_a_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    create_key_file(real)
    (tmp_path / KEY_FILE_NAME).symlink_to(real)
    with pytest.raises(KeyFileError, match="cannot read key file"):
        Keyring(key_file=tmp_path / KEY_FILE_NAME).first_key_id()


def test_a_data_dir_that_cannot_be_created_is_a_key_file_error(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "data"
    not_a_directory.write_text("a file where the data directory should be")
    with pytest.raises(KeyFileError, match=r"cannot (read|create) key file .*data"):
        Keyring(key_file=not_a_directory / KEY_FILE_NAME).first_key_id()


# --- settings ----------------------------------------------------------------------------------


def test_secret_settings_are_the_adapters_list_and_names_that_look_secret() -> None:
    assert is_secret_setting("bedrock", "secret_access_key")
    assert is_secret_setting("bedrock", "session_token")
    assert is_secret_setting("openai", "api_key")
    assert is_secret_setting("azure", "Password")
    assert not is_secret_setting("bedrock", "region")
    assert not is_secret_setting("azure", "deployments")


def test_secret_settings_are_sealed_at_any_depth_and_others_kept_as_they_are() -> None:
    keyring = Keyring([KEY_A])
    settings = {
        "region": "us-east-1",
        "secret_access_key": "aws/secret+key",
        "nested": {"auth_token": {"value": 7}, "plain": [1, {"password": "hunter2"}]},
    }
    stored = seal_settings(keyring, "corp", "bedrock", settings)
    assert stored["region"] == "us-east-1"
    assert stored["secret_access_key"].startswith("enc:v1:")
    assert stored["nested"]["auth_token"].startswith("enc:v1:")
    assert stored["nested"]["plain"][1]["password"].startswith("enc:v1:")
    assert "aws/secret+key" not in repr(stored) and "hunter2" not in repr(stored)
    assert unseal_settings(keyring, "corp", stored) == settings
    # Bound to its path: moved to another name it does not open.
    moved = {"other_key": stored["secret_access_key"]}
    with pytest.raises(TamperedValueError, match=r"settings\.other_key"):
        unseal_settings(keyring, "corp", moved)
