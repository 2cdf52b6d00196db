"""mitmproxy addons, one per stage of a request's path. Installed as ``aibridgeproxyd.addons``.

The order they run in, and what each needs from the ones before it, is written in one place:
``aibridgeproxyd/chain.py`` (``build_chain``).
"""
