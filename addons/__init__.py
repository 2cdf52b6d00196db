"""mitmproxy addons, one per stage of a request's path. Installed as ``aibridgeproxyd.addons``.

CONNECT -> classify -> proxy_auth -> intercept (MITM or tunnel) -> destinations (dial checks)
-> route (adapter rewrite) -> metrics -> streaming.
"""
