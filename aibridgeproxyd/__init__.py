"""aibridgeproxyd: an HTTPS forward proxy daemon for AI traffic, built on mitmproxy."""

__version__ = "0.1.0"

import os as _os

# mitmproxy writes TLS session secrets to these files when set, at import time of its TLS
# module. A proxy that holds users' API traffic must never do that, so they are dropped before
# anything imports mitmproxy.
for _name in ("SSLKEYLOGFILE", "MITMPROXY_SSLKEYLOGFILE"):
    _os.environ.pop(_name, None)
