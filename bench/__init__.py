"""Benchmarks for aibridgeproxyd (contract section 11): ``python -m bench`` or ``make bench``.

Direct (no proxy), bare mitmdump and our daemon, side by side in one run, on loopback with a
local TLS upstream in its own process. See bench/RESULTS.md for the latest table.
"""
