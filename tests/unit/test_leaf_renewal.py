import datetime
from pathlib import Path

from aibridgeproxyd.addons.leaf_renewal import LeafRenewal
from mitmproxy.certs import CertStore
from mitmproxy.test import taddons

from aibridgeproxyd.mitm.leaf_certs import RENEW_BEFORE, evict_expiring


def store(tmp_path: Path) -> CertStore:
    return CertStore.from_store(tmp_path, "mitmproxy", 2048)


def test_a_leaf_close_to_expiry_is_replaced_by_a_fresh_one(tmp_path: Path) -> None:
    certs = store(tmp_path)
    old = certs.get_cert("api.openai.com", [])
    expiry = old.cert.notafter
    # Well before the renewal window: kept.
    assert evict_expiring(certs, expiry - RENEW_BEFORE - datetime.timedelta(days=1)) == 0
    assert certs.get_cert("api.openai.com", []) is old
    # Inside the window, as a clock 170 days later would see it: evicted, and regenerated.
    assert evict_expiring(certs, expiry - datetime.timedelta(days=10)) == 1
    assert old not in certs.expire_queue
    fresh = certs.get_cert("api.openai.com", [])
    assert fresh is not old
    assert fresh.cert.serial != old.cert.serial


def test_operator_supplied_certificates_are_never_evicted(tmp_path: Path) -> None:
    certs = store(tmp_path)
    generated = certs.get_cert("example.com", [])
    certs.certs["*.operator.example"] = generated  # what add_cert_file registers: a string id
    assert evict_expiring(certs, generated.cert.notafter + datetime.timedelta(days=1)) == 1
    assert "*.operator.example" in certs.certs


class FakeTlsConfig:
    name = "tlsconfig"

    def __init__(self, certstore: CertStore | None) -> None:
        self.certstore = certstore


def test_the_addon_sweeps_the_certificate_store_mitmproxy_serves_from(tmp_path: Path) -> None:
    certs = store(tmp_path)
    expiry = certs.get_cert("api.openai.com", []).cert.notafter
    renewal = LeafRenewal(clock=lambda: expiry - datetime.timedelta(days=1))
    with taddons.context(FakeTlsConfig(certs)):
        assert renewal.sweep() == 1
        assert renewal.sweep() == 0


def test_the_addon_does_nothing_before_tls_is_configured() -> None:
    with taddons.context(FakeTlsConfig(None)):
        assert LeafRenewal().sweep() == 0
