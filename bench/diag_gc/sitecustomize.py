"""Diagnostic only, never used by default: ``python -m bench streams --proxy-env
PYTHONPATH=bench/diag_gc`` makes both proxies run ``gc.collect()`` and glibc ``malloc_trim(0)``
once a second from a background thread. With it, RSS returns to near its baseline after 1,000
streams close; without it, it does not (see RESULTS.md): mitmproxy's per-connection objects sit
in reference cycles until a generation-2 collection, and freed heap is not returned to the OS.
"""

import ctypes
import gc
import threading
import time

try:
    _trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _trim = None


def _housekeeping() -> None:
    while True:
        time.sleep(1.0)
        gc.collect()
        if _trim is not None:
            _trim(0)


threading.Thread(target=_housekeeping, name="bench-gc", daemon=True).start()
