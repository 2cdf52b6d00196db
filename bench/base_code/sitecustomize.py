"""Used by ``python -m bench --base REV`` only, never by default: makes the "base" daemon import
the exported tree named by ``BENCH_BASE_CODE`` (on ``PYTHONPATH`` too), not the
worktree the bench runs from.

``PYTHONPATH`` alone is not enough: the editable install maps ``aibridgeproxyd.addons`` to the
worktree's top-level ``addons/`` through a meta-path finder, which the exported package (it has
no ``aibridgeproxyd/addons``) falls through to. This points that mapping at the export.
"""

import os
import sys

_code = os.environ.get("BENCH_BASE_CODE")
if _code:
    for _name, _module in list(sys.modules.items()):
        _mapping = getattr(_module, "MAPPING", None)
        editable = _name.startswith("__editable__") and isinstance(_mapping, dict)
        if editable and "aibridgeproxyd" in _mapping:
            _mapping["aibridgeproxyd"] = os.path.join(_code, "aibridgeproxyd")
            _mapping["aibridgeproxyd.addons"] = os.path.join(_code, "addons")
