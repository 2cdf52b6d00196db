"""The benchmark scenarios by name, as ``python -m bench NAME ...`` runs them, in the order a
full run takes them."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from bench import store_engines
from bench.lab import Lab
from bench.report import Results
from bench.scenarios import (
    RECORDING,
    Settings,
    json_latency,
    new_connection,
    open_streams,
    providers_10k,
    sse_burst,
    sse_paced,
    tunnel_bulk,
)
from bench.workers import workers_throughput

Scenario = Callable[[Lab, Settings, Results], Awaitable[None]]

SCENARIOS: dict[str, Scenario] = {
    "json": json_latency,
    "sse-paced": sse_paced,
    "sse-burst": sse_burst,
    # The same three with an agent's turn (Workload RECORDING): what recording costs.
    "json-recording": functools.partial(json_latency, work=RECORDING),
    "sse-recording": functools.partial(sse_paced, work=RECORDING),
    "sse-recording-burst": functools.partial(sse_burst, work=RECORDING),
    "newconn": new_connection,
    "bulk": tunnel_bulk,
    "providers": providers_10k,
    "postgres": store_engines.postgres_vs_sqlite,
    "streams": open_streams,  # last but one: it leaves the proxies' heaps at their high-water mark
    # Last in a full run: it starts two daemons of its own and uses every core of the box.
    "workers": workers_throughput,
}
