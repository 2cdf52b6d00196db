"""What the admin application's handlers reach: the store, the configuration and the daemon's
reload trigger, kept on ``app.state.context`` and handed to handlers by ``context()``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request

from aibridgeproxyd.config import Config
from aibridgeproxyd.store import Store

# Seconds a management write waits for the daemon to apply it before answering anyway.
APPLY_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class AdminContext:
    """The daemon's parts the API and the dashboard use. ``store`` is a connection of the
    application's own (aiosqlite: every query runs in its thread, off the event loop);
    ``reload_now`` makes the daemon (every worker, with ``workers`` > 1) rebuild its routing
    snapshot at once and returns once it has, so that a write is in force when the handler
    answers; it waits ``APPLY_TIMEOUT_SECONDS`` at most (the write is stored all the same and
    applies at the next successful reload)."""

    config: Config
    store: Store
    reload_now: Callable[[], Awaitable[None]]


def context(request: Request) -> AdminContext:
    """FastAPI dependency: the application's ``AdminContext``."""
    ctx = request.app.state.context
    assert isinstance(ctx, AdminContext)
    return ctx
