"""Everything that depends on mitmproxy beyond its public addon API.

mitmproxy's addon API (hook signatures, ``http.HTTPFlow``, ``http.Response.make``, options) is
used everywhere; its proxy internals (layers, events, commands, private attributes) only here,
so an upgrade of mitmproxy has this one folder to re-check. ``tests/unit/test_mitm_digests.py``
pins the source of every mitmproxy method this package copies or overrides.
"""
