"""The request path as a domain layer: what the proxy decides and records for each intercepted
request, independent of mitmproxy's hooks.

- ``state``: per-connection and per-request state the addons hand to each other;
- ``routing``: the routing decision: credential mode, refusals, central key, key failover;
- ``recording``: record assembly: usage summing, the error body as logged, the record itself;
- ``policing``: policy enforcement: admit or refuse a request before routing, count its spend;
- ``writer``: the background writer that batches interception records into the store;
- ``log_records``: the structured interception log records (``log_interceptions``).
"""
