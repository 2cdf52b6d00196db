"""Fault injection for the fail-closed end-to-end tests, loaded by Python at start-up when this
directory is on PYTHONPATH. ``ABP_TEST_FAULT=<module>:<Class>.<method>`` makes that method
raise, as a bug in a check would: the daemon must refuse, never let through. The daemon wraps
its addons after this runs, so the guard sees the faulty method.
"""

import importlib
import os

_fault = os.environ.get("ABP_TEST_FAULT")
if _fault:
    _module_name, _, _attribute = _fault.partition(":")
    _class_name, _, _method_name = _attribute.partition(".")
    _owner = getattr(importlib.import_module(_module_name), _class_name)
    _original = getattr(_owner, _method_name)

    if getattr(_original, "__code__", None) is not None and _original.__code__.co_flags & 0x80:

        async def _raise(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"injected fault in {_attribute}")

    else:

        def _raise(*args: object, **kwargs: object) -> None:  # type: ignore[misc]
            raise RuntimeError(f"injected fault in {_attribute}")

    setattr(_owner, _method_name, _raise)
