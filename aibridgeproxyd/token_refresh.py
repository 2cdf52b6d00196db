"""A token the snapshot does not know is re-read from the store before it is refused, so a token
works the moment ``tokens create`` returns, not one reload later
(docs/security.md#token-changes-apply-when-the-command-returns).

All concurrent look-ups share one read, and reads are rate-limited: a flood of bad tokens costs
at most one read per ``min_interval`` seconds, however many connections present them. A read
only decides for connections that arrived before it started, since a read that began before
the token's insert was committed cannot have seen it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

from aibridgeproxyd.tokens import hash_token

TokenSource = Callable[[], Awaitable[Mapping[str, str]]]

# At most this many token reads per second, whatever the number of unknown tokens presented.
MIN_INTERVAL = 0.2


class TokenRefresher:
    """``await identity_for_token(token)`` reads the store's tokens (``source`` returns
    ``{token hash: name}``) with a read that starts after the call, shared by every caller
    waiting at that moment. Errors of ``source`` propagate to every waiter."""

    def __init__(
        self,
        source: TokenSource,
        min_interval: float = MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.min_interval = min_interval
        self.clock = clock
        self._next: asyncio.Future[Mapping[str, str]] | None = None
        self._last_started = float("-inf")
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def identity_for_token(self, token: str) -> str | None:
        """The token's name per a fresh read of the store, or None when it is not stored."""
        token_hash = hash_token(token)
        tokens = await asyncio.shield(self._upcoming_read())
        return tokens.get(token_hash)

    def _upcoming_read(self) -> asyncio.Future[Mapping[str, str]]:
        future = self._next
        if future is None:
            future = asyncio.get_running_loop().create_future()
            # An error nobody awaited any more (every waiter went away) is not worth a warning.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._next = future
            # With an eager task factory (mitmproxy installs one) the read may already have
            # started, and cleared _next, by the time create_task returns.
            task = asyncio.create_task(self._read(future), name="token-refresh")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return future

    async def _read(self, future: asyncio.Future[Mapping[str, str]]) -> None:
        async with self._lock:  # one read in flight
            delay = self._last_started + self.min_interval - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)  # the rate limit: callers meanwhile join this read
            # From here on, new callers need a read that starts after them.
            self._next = None
            self._last_started = self.clock()
            try:
                result = await self.source()
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
