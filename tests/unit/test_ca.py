from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509

from aibridgeproxyd.ca import CaError, ensure_ca, mitmproxy_confdir, upstream_trust_bundle
from aibridgeproxyd.config import ConfigError, load_config


def config_for(tmp_path: Path, **flags: str):  # type: ignore[no-untyped-def]
    return load_config(
        flags={"certs_dir": str(tmp_path / "certs"), "data_dir": str(tmp_path / "data"), **flags},
        environ={},
    )


def test_generated_ca_is_a_ca_with_a_private_key_and_survives_restarts(tmp_path: Path) -> None:
    first = ensure_ca(config_for(tmp_path))
    assert first.key_path.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(first.cert_path.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    again = ensure_ca(config_for(tmp_path))
    assert again.cert_path.read_bytes() == first.cert_path.read_bytes()
    assert again.key_path.read_bytes() == first.key_path.read_bytes()


def test_operator_supplied_files_are_used_as_is(tmp_path: Path) -> None:
    generated = ensure_ca(config_for(tmp_path / "gen"))
    config = config_for(
        tmp_path, ca_cert_file=str(generated.cert_path), ca_key_file=str(generated.key_path)
    )
    files = ensure_ca(config)
    assert files.cert_path == generated.cert_path
    assert not (tmp_path / "certs").exists()


def test_half_a_ca_is_refused_not_regenerated(tmp_path: Path) -> None:
    files = ensure_ca(config_for(tmp_path))
    files.key_path.unlink()
    with pytest.raises(CaError, match="missing"):
        ensure_ca(config_for(tmp_path))
    assert files.cert_path.exists()


def test_mismatched_key_is_refused(tmp_path: Path) -> None:
    one = ensure_ca(config_for(tmp_path / "one"))
    two = ensure_ca(config_for(tmp_path / "two"))
    with pytest.raises(ConfigError, match=r"'ca_key_file'.*does not match"):
        config_for(tmp_path, ca_cert_file=str(one.cert_path), ca_key_file=str(two.key_path))
    # Files swapped after the configuration was loaded are still refused at start.
    config = replace(config_for(tmp_path), ca_cert_file=one.cert_path, ca_key_file=two.key_path)
    with pytest.raises(CaError, match="does not match"):
        ensure_ca(config)


def test_certificate_pem_never_carries_the_key(tmp_path: Path) -> None:
    files = ensure_ca(config_for(tmp_path))
    combined = tmp_path / "combined.pem"
    combined.write_bytes(files.key_path.read_bytes() + files.cert_path.read_bytes())
    config = config_for(tmp_path, ca_cert_file=str(combined), ca_key_file=str(files.key_path))
    pem = ensure_ca(config).certificate_pem()
    assert b"PRIVATE KEY" not in pem and pem.startswith(b"-----BEGIN CERTIFICATE-----")


def test_mitmproxy_confdir_is_private(tmp_path: Path) -> None:
    files = ensure_ca(config_for(tmp_path))
    confdir = mitmproxy_confdir(files, tmp_path / "data")
    assert confdir.stat().st_mode & 0o777 == 0o700
    combined = confdir / "mitmproxy-ca.pem"
    assert combined.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in combined.read_bytes() and b"CERTIFICATE" in combined.read_bytes()


def test_upstream_trust_bundle_extends_certifi(tmp_path: Path) -> None:
    import certifi

    files = ensure_ca(config_for(tmp_path))
    bundle = upstream_trust_bundle(files.cert_path, tmp_path)
    assert bundle is not None
    text = bundle.read_bytes()
    assert text.startswith(Path(certifi.where()).read_bytes()[:200])
    assert files.cert_path.read_bytes().strip() in text
    assert upstream_trust_bundle(None, tmp_path) is None
    junk = tmp_path / "junk.pem"
    junk.write_text("not a cert")
    with pytest.raises(CaError, match="no PEM certificate"):
        upstream_trust_bundle(junk, tmp_path)
