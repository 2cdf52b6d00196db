"""The MITM certificate authority: generated on first start, or supplied by the operator.

The key file is written mode 0600 and survives restarts. mitmproxy wants the key and the
certificate in one PEM inside its confdir, so ``mitmproxy_confdir`` writes that combined file
into a private directory under ``data_dir`` on every start; the operator's files stay untouched.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aibridgeproxyd.config import Config
from aibridgeproxyd.pem_files import key_matches, read_certificate_file
from aibridgeproxyd.sealing import Keyring
from aibridgeproxyd.store import Store

log = logging.getLogger("aibridgeproxyd.ca")

CA_COMMON_NAME = "aibridgeproxyd CA"
CA_VALIDITY = datetime.timedelta(days=3650)


class CaError(RuntimeError):
    """The CA files are missing, unreadable or do not belong together."""


@dataclass(frozen=True)
class CaFiles:
    """Where the MITM CA's certificate and private key are on disk."""

    cert_path: Path
    key_path: Path

    def certificate_pem(self) -> bytes:
        """Only the CERTIFICATE blocks, even if the operator's cert file also holds a key."""
        return certificate_blocks(self.cert_path.read_bytes())


def ca_paths(config: Config) -> CaFiles:
    if config.ca_cert_file is not None and config.ca_key_file is not None:
        return CaFiles(config.ca_cert_file, config.ca_key_file)
    return CaFiles(config.certs_dir / "ca-cert.pem", config.certs_dir / "ca-key.pem")


def ensure_ca(config: Config) -> CaFiles:
    """Return the CA files, generating them on first start unless the operator supplied them."""
    files = ca_paths(config)
    operator_supplied = config.ca_cert_file is not None
    cert_exists, key_exists = files.cert_path.exists(), files.key_path.exists()
    if not cert_exists and not key_exists and not operator_supplied:
        _generate(files)
        # Clients must be told to trust it: say where it is.
        log.warning(
            "generated a new MITM CA at %s: clients must trust it (GET /ca-cert.pem on the "
            "admin listener, or `aibridgeproxyd ca export`)",
            files.cert_path.resolve(),
        )
    elif not (cert_exists and key_exists):
        missing = files.cert_path if not cert_exists else files.key_path
        # Never regenerate over half a CA: clients may already trust the surviving certificate.
        raise CaError(
            f"CA file {missing} is missing (its partner exists); restore it or remove both"
        )
    _check_pair(files)
    return files


def certificate_blocks(pem: bytes) -> bytes:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return b""
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


async def ensure_shared_ca(config: Config, keyring: Keyring) -> CaFiles:
    """Replicas on PostgreSQL without operator CA files (CONTRACT 14): the one CA kept in the
    database, its key sealed like provider keys, written into ``certs_dir`` for mitmproxy and
    ``/ca-cert.pem``. The first replica to start stores one (the CA already in its
    ``certs_dir`` if it has a complete one, which clients may trust already, else a new one);
    every replica then uses the stored one, so a client trusts all of them.
    ``CaError`` or ``StoreError`` when it cannot be read or written."""
    files = ca_paths(config)
    async with await Store.open(config.database, migrate=False, keyring=keyring) as store:
        stored = await store.shared_ca()
        if stored is None:
            offered = _local_pems(files) or generate_ca_pems()
            stored = await store.create_shared_ca(*offered)
            if offered[0] == stored[0] and not files.cert_path.exists():
                log.warning(
                    "generated the replicas' shared MITM CA (kept in the database): clients "
                    "must trust it (GET /ca-cert.pem on the admin listener)"
                )
    cert_pem, key_pem = stored
    if _local_pems(files) != stored:
        write_private_file(files.key_path, key_pem.encode())
        write_file_atomically(files.cert_path, cert_pem.encode(), 0o644)
    _check_pair(files)
    return files


def _local_pems(files: CaFiles) -> tuple[str, str] | None:
    try:
        return files.cert_path.read_text(), files.key_path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def generate_ca_pems() -> tuple[str, str]:
    """A new MITM CA: ``(certificate PEM, PKCS#8 private key PEM)``, ECDSA P-256, valid
    ``CA_VALIDITY``."""
    cert, key = _new_ca()
    return cert.decode(), key.decode()


def _generate(files: CaFiles) -> None:
    cert_pem, key_pem = _new_ca()
    write_private_file(files.key_path, key_pem)
    write_file_atomically(files.cert_path, cert_pem, 0o644)


def _new_ca() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aibridgeproxyd"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _check_pair(files: CaFiles) -> None:
    try:
        certs = x509.load_pem_x509_certificates(files.cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CaError(f"cannot load CA certificate {files.cert_path}: {exc}") from None
    try:
        key = serialization.load_pem_private_key(files.key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CaError(f"cannot load CA key {files.key_path}: {_short(exc)}") from None
    if not key_matches(certs[0], key):
        raise CaError(f"CA key {files.key_path} does not match certificate {files.cert_path}")


def _short(exc: BaseException) -> str:
    # cryptography's messages can be long; the first line says what is wrong, never the key.
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def mitmproxy_confdir(files: CaFiles, data_dir: Path) -> Path:
    """Write ``mitmproxy-ca.pem`` (key + certificates) into a private confdir and return it."""
    confdir = data_dir / "mitmproxy"
    confdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(confdir, 0o700)
    combined = (
        files.key_path.read_bytes().rstrip()
        + b"\n"
        + certificate_blocks(files.cert_path.read_bytes())
    )
    write_private_file(confdir / "mitmproxy-ca.pem", combined)
    return confdir


def write_private_file(path: Path, data: bytes) -> None:
    write_file_atomically(path, data, 0o600)


def write_file_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write via a temp file in the same directory, created with ``mode`` from the start,
    so a secret is never readable by others even for an instant and a crash leaves no
    half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def upstream_trust_bundle(extra_ca_file: Path | None, confdir: Path) -> Path | None:
    """mitmproxy's upstream trust store *replaces* certifi when set, so an operator's extra roots
    are appended to certifi's bundle rather than used alone. None means certifi as is."""
    if extra_ca_file is None:
        return None
    import certifi

    try:
        extra = read_certificate_file(extra_ca_file, "upstream_ca_file")
    except ValueError as exc:
        raise CaError(str(exc)) from None
    bundle = confdir / "upstream-trust.pem"
    write_file_atomically(
        bundle, Path(certifi.where()).read_bytes().rstrip() + b"\n" + extra, 0o644
    )
    return bundle
