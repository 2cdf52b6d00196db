"""How a host name is spelled when it is matched against the hosts providers claim: one
spelling for every way a client can write the same name (``canonical_host``)."""

from __future__ import annotations

import contextlib
import socket


def canonical_host(host: str) -> str:
    """The host name as the resolver will look it up, for matching against provider hosts:
    lower case, no trailing dot, and Unicode spellings through IDNA's nameprep (the resolver
    dials ``api.openai.com`` written in full-width letters as ``api.openai.com``). A name IDNA
    refuses is returned lower-cased as it is (the resolver refuses it too)."""
    if not host.isascii():
        with contextlib.suppress(UnicodeError):
            host = host.encode("idna").decode("ascii")
    host = host.lower().rstrip(".")
    if host[:1].isdigit():
        # The resolver reads IPv4 in inet_aton's spellings (127.1, 0x7f.0.0.1, 2130706433):
        # each is the dotted quad a provider host names.
        with contextlib.suppress(OSError):
            host = socket.inet_ntoa(socket.inet_aton(host))
    return host
