"""The proxy listener on a socket made by our code: with ``workers`` > 1 each worker listens on a
socket of its own bound with ``SO_REUSEPORT`` to the one ``listen`` port (README.md#workers).

mitmproxy binds its listener itself (``AsyncioServerInstance.listen`` calls
``asyncio.start_server`` with a host and a port) and has no option for a socket bound already.
``Servers.update`` announces each new server instance on ``Servers.changed`` before it starts
it; ``ListenSocket`` answers that signal by giving the instance a ``listen`` that serves the
given socket instead. Both were read in mitmproxy 12.3 and are pinned
(``tests/unit/test_mitm_digests.py``, ``COPIED``).
"""

from __future__ import annotations

import asyncio
import functools
import socket
from typing import Any

from mitmproxy.master import Master
from mitmproxy.proxy.mode_servers import AsyncioServerInstance


class ListenSocket:
    """Makes ``master``'s proxy listener accept on ``sock`` (bound and listening; the listener
    closes it when it stops). Keep this object
    as long as the master: mitmproxy's signal holds its receiver weakly."""

    def __init__(self, master: Master, sock: socket.socket) -> None:
        self.sock = sock
        self._servers = master.addons.get("proxyserver").servers
        self._servers.changed.connect(self._adopt)

    def _adopt(self) -> None:
        for instance in self._servers:
            # An instance attribute shadows the class's method; set once, before it starts.
            if isinstance(instance, AsyncioServerInstance) and "listen" not in vars(instance):
                instance.listen = functools.partial(_listen_on, instance, self.sock)  # type: ignore[method-assign,assignment]


async def _listen_on(
    instance: AsyncioServerInstance[Any], sock: socket.socket, host: str, port: int
) -> list[asyncio.Server]:
    """``AsyncioServerInstance.listen`` for a socket bound already (``host``, ``port`` unused)."""
    return [await asyncio.start_server(instance.handle_stream, sock=sock)]
