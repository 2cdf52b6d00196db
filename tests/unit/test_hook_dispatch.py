"""HookDispatch answers every event as mitmproxy's AddonManager does, from a cached handler list.

Each test runs the same chain through both managers (mitmproxy's and ours), so a difference in
order, arguments, exception handling or ``update`` events fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
from mitmproxy import exceptions, hooks, options
from mitmproxy.addonmanager import AddonManager
from mitmproxy.master import Master
from mitmproxy.test import tflow

from aibridgeproxyd.failclosed import guard
from aibridgeproxyd.mitm.dispatch import HookDispatch, use_hook_dispatch


class Recorder:
    """An addon that appends (its label, the hook, the flow's id) to a shared journal."""

    def __init__(self, label: str, journal: list[tuple[str, str]], *, fail: bool = False) -> None:
        self.name = label
        self.journal, self.fail = journal, fail

    def request(self, flow: Any) -> None:
        self.journal.append((self.name, "request"))
        if self.fail:
            raise ValueError("boom")

    async def response(self, flow: Any) -> None:
        await asyncio.sleep(0)
        self.journal.append((self.name, "response"))

    def update(self, flows: list[Any]) -> None:
        self.journal.append((self.name, f"update:{len(flows)}"))


class Halting:
    name = "halting"

    def request(self, flow: Any) -> None:
        raise exceptions.AddonHalt()


class Parent:
    """An addon with sub-addons (``addons``), which run right after it."""

    name = "parent"

    def __init__(self, journal: list[tuple[str, str]]) -> None:
        self.journal = journal
        self.addons = [Recorder("child", journal)]

    def request(self, flow: Any) -> None:
        self.journal.append(("parent", "request"))


class NoUpdate:
    name = "noupdate"

    def __init__(self, journal: list[tuple[str, str]]) -> None:
        self.journal = journal

    def request(self, flow: Any) -> None:
        self.journal.append(("noupdate", "request"))


Build = Callable[[list[tuple[str, str]]], list[object]]


async def _journal(manager_class: type[AddonManager], build: Build, events: list[str]) -> list:
    journal: list[tuple[str, str]] = []
    master = Master(options.Options())
    if manager_class is HookDispatch:
        use_hook_dispatch(master)
    master.addons.add(*build(journal))
    flow = tflow.tflow(resp=True)
    for name in events:
        event = hooks.all_hooks[name](flow)
        await master.addons.handle_lifecycle(event)
    return journal


CHAINS: dict[str, Build] = {
    "order and update": lambda j: [Recorder("a", j), Recorder("b", j)],
    "an exception is logged and the next runs": lambda j: [
        Recorder("a", j, fail=True),
        Recorder("b", j),
    ],
    "AddonHalt ends the event": lambda j: [Recorder("a", j), Halting(), Recorder("b", j)],
    "sub-addons after their addon": lambda j: [Parent(j), Recorder("b", j)],
    "no update handler, no update": lambda j: [NoUpdate(j)],
    "guarded addons": lambda j: [guard(Recorder("a", j, fail=True)), guard(Recorder("b", j))],
}


@pytest.mark.parametrize("case", CHAINS)
async def test_same_calls_as_mitmproxys_addon_manager(case: str) -> None:
    events = ["request", "response", "request"]
    theirs = await _journal(AddonManager, CHAINS[case], events)
    ours = await _journal(HookDispatch, CHAINS[case], events)
    assert ours == theirs
    assert ours  # the chain did run


async def test_an_exception_is_logged_like_safecall(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        await _journal(
            HookDispatch, CHAINS["an exception is logged and the next runs"], ["request"]
        )
    assert any("Addon error: boom" in r.getMessage() for r in caplog.records)


async def test_a_changed_chain_is_seen_at_the_next_event() -> None:
    journal: list[tuple[str, str]] = []
    master = Master(options.Options())
    use_hook_dispatch(master)
    master.addons.add(Recorder("a", journal))
    flow = tflow.tflow()
    await master.addons.trigger_event(hooks.all_hooks["request"](flow))
    master.addons.add(Recorder("b", journal))
    master.addons.chain[0] = guard(Recorder("c", journal))  # replaced in place, as guard_chain
    await master.addons.trigger_event(hooks.all_hooks["request"](flow))
    master.addons.remove(master.addons.get("b"))
    await master.addons.trigger_event(hooks.all_hooks["request"](flow))
    assert journal == [("a", "request"), ("c", "request"), ("b", "request"), ("c", "request")]


async def test_options_changes_still_reach_the_addons() -> None:
    seen: list[set[str]] = []

    class Configured:
        name = "configured"

        def configure(self, updated: set[str]) -> None:
            seen.append(set(updated))

    master = Master(options.Options())
    use_hook_dispatch(master)
    master.addons.add(Configured())
    master.options.update(listen_port=8099)
    assert {"listen_port"} in seen


async def test_refuses_a_master_that_already_has_addons() -> None:
    master = Master(options.Options())
    master.addons.add(NoUpdate([]))
    with pytest.raises(RuntimeError, match="already has addons"):
        use_hook_dispatch(master)
