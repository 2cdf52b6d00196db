"""mitmproxy addons, one per stage of a request's path. Installed as ``aibridgeproxyd.addons``.

The order they run in is written down, with what each needs from the ones before it, in
``aibridgeproxyd.chain.build_chain``: in short, classify -> proxy_auth -> intercept (MITM or
tunnel) -> route (adapter rewrite) -> upstream_proxy -> client_limits -> destinations (dial
checks) -> metrics -> streaming -> error_answers -> interceptions (record) -> tracing ->
websocket, after mitmproxy's own addons, listener_tls, the background sweeps and in_flight.
"""
