"""Checks of the PEM files a configuration names, made when the configuration is loaded.

Each check reads and parses the file, so a missing, unreadable or malformed file refuses to start
(and fails every CLI command) with one line naming the config key and the file, instead of
failing later inside mitmproxy. Format: PEM (RFC 7468), parsed by ``cryptography``.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes as PrivateKey


class PemFileError(ValueError):
    """A configured PEM file is unreadable, holds no usable block, or does not match its partner.
    ``key`` is the config key at fault; ``reason`` names the file, never its content."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PemFileError(key, f"cannot read {path}: {exc.strerror or exc}") from None


def load_certificates(path: Path, key: str) -> list[x509.Certificate]:
    """Every CERTIFICATE block of ``path`` (at least one), or ``PemFileError`` for ``key``."""
    data = _read(path, key)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise PemFileError(key, f"{path} holds no PEM certificate") from None


def check_key_pair(cert_path: Path, cert_key: str, key_path: Path, key_key: str) -> None:
    """The first certificate of ``cert_path`` belongs to the unencrypted private key in
    ``key_path``. Raises ``PemFileError`` for the config key that is wrong."""
    certificate = load_certificates(cert_path, cert_key)[0]
    data = _read(key_path, key_key)
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # cryptography's message may quote parser state; what matters is which file.
        raise PemFileError(key_key, f"{key_path} holds no unencrypted PEM private key") from None
    if not key_matches(certificate, private_key):
        raise PemFileError(
            key_key, f"{key_path} does not match the certificate in {cert_key} {cert_path}"
        )


def key_matches(certificate: x509.Certificate, private_key: PrivateKey) -> bool:
    """Whether ``private_key`` is the key of ``certificate`` (same SubjectPublicKeyInfo)."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return certificate.public_key().public_bytes(
        serialization.Encoding.PEM, spki
    ) == private_key.public_key().public_bytes(serialization.Encoding.PEM, spki)


def read_certificate_file(path: Path, key: str) -> bytes:
    """The bytes of ``path``, which must hold at least one PEM certificate: the check made again
    where the file is used (it may have changed since the configuration was loaded). Raises
    ``ValueError`` naming ``key`` and the file, in the words the daemon logs."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {key} {path}: {exc.strerror or exc}") from None
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{key} {path} holds no PEM certificate") from None
    return data
