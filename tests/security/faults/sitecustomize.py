"""Fault injection for the fail-closed end-to-end tests, loaded by Python at start-up when this
directory is on PYTHONPATH. ``ABP_TEST_FAULT=<Snapshot method>`` makes that method of
the routing snapshot raise, as a bug in a check would: the daemon must refuse, never let through.
"""

import os

_fault = os.environ.get("ABP_TEST_FAULT")
if _fault:
    from aibridgeproxyd import snapshot

    def _raise(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"injected fault in Snapshot.{_fault}")

    setattr(snapshot.Snapshot, _fault, _raise)
