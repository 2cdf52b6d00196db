"""The head and idle deadlines of one client connection (``request_head_timeout``,
``idle_timeout``; README.md#configuration), decided without a proxy: when the deadline of a
connection in a given phase falls, and what to do when its timer fires.
``addons/client_limits.py`` keeps the phases and the timers, and closes the connections.
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class Phase(enum.Enum):
    """What a client connection is doing; the value is how the close is logged."""

    HEAD = "waiting for a request head"
    BUSY = "request in flight"
    IDLE = "idle"
    TUNNEL = "tunnel"
    WEBSOCKET = "WebSocket session"


# Phases whose idle time runs from the last byte either way: their bytes are their activity.
_RELAYS = (Phase.TUNNEL, Phase.WEBSOCKET)


class Expiry(enum.Enum):
    """What a connection's timer firing at its deadline calls for."""

    EARLY = "the deadline moved later: re-arm the timer"
    STILL_SENDING = "a response is still on its way to a slow reader: not idle yet, start over"
    CLOSE = "close the connection"


def deadline(
    phase: Phase,
    since: float,
    request_head_timeout: float,
    idle_timeout: float,
    last_activity: Callable[[], float | None],
) -> float | None:
    """When a connection in ``phase`` since ``since`` (epoch seconds) is cut off; None while a
    request is in flight (the upstream's own time is bounded elsewhere). The idle time of a
    tunnel or a WebSocket session runs from its last byte either way (``last_activity``, read
    only for them; a ping is a byte), so a slow-loris head gets no more time for sending
    bytes."""
    if phase is Phase.HEAD:
        return since + request_head_timeout
    if phase is Phase.IDLE:
        return since + idle_timeout
    if phase in _RELAYS:
        last = last_activity() or since
        return max(since, last) + idle_timeout
    return None


def on_timer(
    phase: Phase, deadline: float, now: float, still_sending: Callable[[], bool]
) -> Expiry:
    """What the timer firing at ``now`` calls for; ``still_sending`` (asked only once the
    deadline has passed, and never for a tunnel or a WebSocket session, whose bytes are their
    activity) tells whether the last response is still being written to the client."""
    if deadline > now:
        return Expiry.EARLY
    if phase not in _RELAYS and still_sending():
        return Expiry.STILL_SENDING
    return Expiry.CLOSE


def timeout_reason(phase: Phase) -> str:
    """The ``client_connections_closed_total`` reason of a connection closed in ``phase``."""
    return "request_head_timeout" if phase is Phase.HEAD else "idle_timeout"
