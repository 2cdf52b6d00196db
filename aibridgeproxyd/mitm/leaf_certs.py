"""Renewal of the MITM leaf certificates mitmproxy caches.

mitmproxy's certificate store keeps a generated leaf until it is pushed out by newer ones and
never checks its expiry, so a long-running daemon with few intercepted hosts would start serving
expired leaves after about 197 days. Evicting leaves that are close to expiry makes the next
handshake generate a fresh one.
"""

from __future__ import annotations

import datetime

from mitmproxy import ctx as mitmproxy_ctx
from mitmproxy.certs import CertStore

RENEW_BEFORE = datetime.timedelta(days=30)


def evict_expiring(
    store: CertStore, now: datetime.datetime, renew_before: datetime.timedelta = RENEW_BEFORE
) -> int:
    """Drop generated leaves that expire within ``renew_before`` of ``now``; return how many.

    Operator-supplied certificates (string ids) are left alone: they cannot be regenerated."""
    deadline = now + renew_before
    evicted = 0
    for cert_id, entry in list(store.certs.items()):
        if isinstance(cert_id, tuple) and entry.cert.notafter <= deadline:
            del store.certs[cert_id]
            if entry in store.expire_queue:
                store.expire_queue.remove(entry)
            evicted += 1
    return evicted


def running_cert_store() -> CertStore | None:
    """The certificate store of the running master's ``tlsconfig`` addon, where mitmproxy caches
    the MITM leaves; None before it is set up."""
    tlsconfig = mitmproxy_ctx.master.addons.get("tlsconfig")
    return None if tlsconfig is None else tlsconfig.certstore
