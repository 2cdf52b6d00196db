"""What the admin application's handlers reach: the store, the configuration and the daemon's
reload trigger, kept on ``app.state.context`` and handed to handlers by ``context()``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from aibridgeproxyd.config import Config
from aibridgeproxyd.store import Store


@dataclass(frozen=True)
class AdminContext:
    """The daemon's parts the API and the dashboard use. ``store`` is a connection of the
    application's own (aiosqlite: every query runs in its thread, off the event loop);
    ``reload_now`` asks the daemon to rebuild its routing snapshot at once."""

    config: Config
    store: Store
    reload_now: Callable[[], None]


def context(request: Request) -> AdminContext:
    """FastAPI dependency: the application's ``AdminContext``."""
    ctx = request.app.state.context
    assert isinstance(ctx, AdminContext)
    return ctx
