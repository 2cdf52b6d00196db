"""Hook dispatch: mitmproxy's ``AddonManager`` with each event's handlers looked up once.

mitmproxy's ``AddonManager.trigger_event`` walks the whole addon chain for every event: for each
addon a ``safecall`` context manager, an ``invoke_addon`` coroutine, a ``traverse`` generator and
an attribute lookup, whether or not the addon handles the event, and ``event.args()`` (a
``dataclasses.fields`` walk) once per handler. ``handle_lifecycle`` then does it all again for an
``update`` event after every flow hook. On a keep-alive request that is eight walks of the chain,
a few microseconds per addon each, for four hooks of which most addons handle one or none.

``HookDispatch`` answers the same events with the same handlers in the same order, and the same
outcome for an exception (logged like ``safecall``, the next handler still runs; ``AddonHalt``
stops the event, ``OptionsError`` propagates), but from a list of handlers per event name built
once from the chain and rebuilt whenever the chain is no longer the one it was built from
(``chain`` is compared element by element, by identity, on every event). It reads an addon's
handler when it builds that list: an addon that sets or clears a hook attribute later is not
seen until the chain changes. ``update`` events are only made when some addon handles them.

Source: ``mitmproxy/addonmanager.py`` of mitmproxy 12.3 (``trigger_event``,
``handle_lifecycle``, ``invoke_addon``, ``_iter_hooks``, ``safecall``), pinned in
``tests/unit/test_mitm_digests.py``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import exceptions, flow, hooks
from mitmproxy.addonmanager import AddonManager, traverse

__all__ = ["HookDispatch", "use_hook_dispatch"]

log = logging.getLogger("mitmproxy.addonmanager")

Handler = Callable[..., Any]


class HookDispatch(AddonManager):
    """An ``AddonManager`` whose ``trigger_event`` and ``handle_lifecycle`` call each event's
    handlers from a list built once per chain (module docstring). Everything else (``add``,
    ``remove``, ``get``, the synchronous ``trigger``) is mitmproxy's."""

    def __init__(self, master: Any) -> None:
        super().__init__(master)
        self._built_from: list[Any] = []
        self._handlers: dict[str, tuple[Handler, ...]] = {}

    def handlers(self, name: str) -> tuple[Handler, ...]:
        """The callables handling the event ``name``, in chain order (sub-addons after their
        addon, as ``traverse`` yields them)."""
        if self.chain != self._built_from:
            self._built_from, self._handlers = list(self.chain), {}
        found = self._handlers.get(name)
        if found is None:
            found = self._handlers[name] = tuple(_handlers(self.chain, name))
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        """Call every handler of ``event`` in chain order, awaiting those that return an
        awaitable; an exception is logged and the next handler runs; ``AddonHalt`` ends it."""
        handlers = self.handlers(event.name)
        if not handlers:
            return
        args = event.args()
        for handler in handlers:
            try:
                result = handler(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as exc:
                log.error(f"Addon error: {exc}", exc_info=True)

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        """``event``, then an ``update`` of its flow if it is about one and some addon
        handles ``update`` (mitmproxy's ``handle_lifecycle``)."""
        await self.trigger_event(event)
        message = event.args()[0] if self.handlers("update") else None
        if isinstance(message, flow.Flow):
            await self.trigger_event(hooks.UpdateHook([message]))


def _handlers(chain: list[Any], name: str) -> list[Handler]:
    """What mitmproxy's ``_iter_hooks`` yields for each addon of ``chain``: truthy callable
    attributes named ``name`` (a module of that name is skipped; anything else is an error,
    raised here as mitmproxy raises it)."""
    found = []
    for addon in traverse(chain):
        func = getattr(addon, name, None)
        if not func or inspect.ismodule(func):
            continue
        if not callable(func):
            raise exceptions.AddonManagerError(f"Addon handler {name} ({addon}) not callable")
        found.append(func)
    return found


def use_hook_dispatch(master: Any) -> None:
    """Replace ``master.addons`` (still empty: call it right after constructing the master)
    with a ``HookDispatch``, moving the options' change signal over to it."""
    old = master.addons
    if old.chain:
        raise RuntimeError("use_hook_dispatch: the master already has addons")
    master.options.changed.disconnect(old._configure_all)
    master.addons = HookDispatch(master)
