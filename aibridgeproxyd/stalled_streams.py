"""The stall watch's decision: which HTTP/2 streams a client has stopped reading for too long.

A stream whose client window stays shut for ``stall_timeout`` with response data waiting is
treated as abandoned (the client stopped reading without resetting it), and its upstream is to
be cancelled; a stream read again starts over. Knows nothing of mitmproxy: the caller reads the
waiting streams (``aibridgeproxyd.mitm.http_layer.unread_streams_of``) and names each by a key.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable


class StalledStreams[Key: Hashable]:
    """Since when each waiting stream has waited (monotonic seconds)."""

    def __init__(self, stall_timeout: float) -> None:
        self.stall_timeout = stall_timeout
        self._waiting_since: dict[Key, float] = {}

    def sweep(self, now: float, waiting: Iterable[Key]) -> list[tuple[Key, float]]:
        """Note the streams ``waiting`` at ``now`` (one no longer waiting is forgotten, so it
        starts over), and return those that have waited ``stall_timeout`` or more, with how
        long, in the order given: each is abandoned. One stays noted until ``cancelled``."""
        self._waiting_since = {key: self._waiting_since.get(key, now) for key in waiting}
        return [
            (key, now - since)
            for key, since in self._waiting_since.items()
            if now - since >= self.stall_timeout
        ]

    def cancelled(self, key: Key) -> None:
        """The stream's upstream was cancelled: it is no longer watched."""
        self._waiting_since.pop(key, None)
