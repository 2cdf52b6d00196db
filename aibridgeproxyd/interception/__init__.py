"""The request path as a domain layer: what the proxy decides and records for each intercepted
request, independent of mitmproxy's hooks.

- ``state``: per-connection and per-request state the addons hand to each other;
- ``writer``: the background writer that batches interception records into the store.
"""
