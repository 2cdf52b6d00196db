"""``python -m bench workers``: ``workers: 2`` against ``workers: 1``, throughput of small MITM'd
JSON requests on this box, where the client and the upstream share the same cores (issue 12,
section 3: target >= 1.3x requests/s, proxy CPU per request within 10%).

Two daemons run side by side (``AIBRIDGEPROXYD_WORKERS=1`` and ``=2``), blocks alternating
(ABBA...). In each block the client opens ``CONNECTIONS`` keep-alive connections through the
proxy, each a CONNECT, a TLS handshake and then requests back to back for the window. The client
is a lean asyncio one (raw HTTP/1.1 over TLS, no httpx) so that the box's cores go to the proxy,
which is what is measured. Proxy CPU is the main process's plus every worker's, from /proc;
"load spread" is the busier worker's share of the workers' CPU (0.5 is an even split).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from bench.clients import CHAT_PATH, JSON_BODY
from bench.lab import Lab, Target, settle
from bench.procs import LOOPBACK, CpuWindow
from bench.report import Results, Table, Verdict, fmt, ratio
from bench.scenarios import Settings, orders

CONNECTIONS = 16
NAMES = {"workers: 1": "1", "workers: 2": "2"}


def children(pid: int) -> list[int]:
    """The worker processes of a daemon's main process (none with workers: 1)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(child) for child in path.read_text().split()]
    except OSError:
        return []


def context_switches(pids: list[int]) -> int:
    """Voluntary + involuntary context switches of these processes so far (/proc status)."""
    switches = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if "ctxt_switches:" in line:
                switches += int(line.split(":")[1])
    return switches


async def _open(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert target.proxy_port is not None
    reader, writer = await asyncio.open_connection(LOOPBACK, target.proxy_port)
    authority = target.connect_to
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{target.name}: CONNECT answered {head[:40]!r}")
    await writer.start_tls(target.verify, server_hostname=target.tls_host)
    return reader, writer


def _request(target: Target) -> bytes:
    host = target.origin.removeprefix("https://")
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {target.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(JSON_BODY)}\r\n\r\n"
    )
    return head.encode() + JSON_BODY


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"request answered {head[:60]!r}")
    length = 0
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)


async def _connection(target: Target, start: float, stop: float, counts: list[int]) -> None:
    """One keep-alive connection: requests back to back until ``stop``; those finished after
    ``start`` are counted."""
    reader, writer = await _open(target)
    request = _request(target)
    try:
        while time.monotonic() < stop:
            await _one(reader, writer, request)
            if time.monotonic() >= start:
                counts[0] += 1
    finally:
        writer.close()


async def _block(lab: Lab, target: Target, warmup: float, window: float) -> dict[str, float]:
    counts = [0]
    start = time.monotonic() + warmup
    stop = start + window
    tasks = [
        asyncio.create_task(_connection(target, start, stop, counts)) for _ in range(CONNECTIONS)
    ]
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    assert target.pid is not None and lab.upstream is not None
    workers = children(target.pid)
    pids = {"main": target.pid, "upstream": lab.upstream.pid, "client": os.getpid()}
    pids |= {f"worker{n}": pid for n, pid in enumerate(workers)}
    proxy_pids = [target.pid, *workers]
    switches = context_switches(proxy_pids)
    cpu = CpuWindow(pids).start()
    await asyncio.gather(*tasks)
    cpu.stop()
    switches = context_switches(proxy_pids) - switches
    worker_cpu = [cpu.used[f"worker{n}"] for n in range(len(workers))]
    return {
        "requests": counts[0],
        "elapsed": cpu.elapsed,
        "proxy": cpu.used["main"] + sum(worker_cpu),
        "main": cpu.used["main"] if workers else 0.0,
        "switches": switches,
        "busiest": max(worker_cpu) / sum(worker_cpu) if sum(worker_cpu) else 1.0,
        "client": cpu.used["client"],
        "upstream": cpu.used["upstream"],
        "machine": cpu.machine_busy,
    }


async def workers_throughput(lab: Lab, s: Settings, results: Results) -> None:
    targets = {
        name: lab.start_daemon(
            f"workers-{count}", register=False, extra_env={"AIBRIDGEPROXYD_WORKERS": count}
        )
        for name, count in NAMES.items()
    }
    for target in targets.values():
        await _block(lab, target, 0.2, s.warmup)  # leaf certificates, imports, pools
    blocks: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for _, name in orders(list(targets), s.reps):
        blocks[name].append(await _block(lab, targets[name], 0.3, s.window))
        settle(0.3)
    _report(blocks, results)


def _report(blocks: dict[str, list[dict[str, float]]], results: Results) -> None:
    def total(name: str, key: str) -> float:
        return sum(block[key] for block in blocks[name])

    def per_request(name: str, *keys: str) -> float:
        return sum(total(name, key) for key in keys) / total(name, "requests") * 1e3

    one, two = NAMES
    rate = {n: total(n, "requests") / total(n, "elapsed") for n in blocks}
    cpu = {n: per_request(n, "proxy") for n in blocks}
    rows: list[tuple[str, dict[str, float], str]] = [
        (
            "req/s",
            rate,
            "per block: "
            + "; ".join(
                f"{n} " + "/".join(fmt(b["requests"] / b["elapsed"], 0) for b in blocks[n])
                for n in blocks
            ),
        ),
        ("proxy CPU ms/req (main + workers)", cpu, ""),
        (
            "proxy cores used (CPU s per s)",
            {n: total(n, "proxy") / total(n, "elapsed") for n in blocks},
            "what the proxy got of the box: more req/s needs more of this",
        ),
        (
            "proxy context switches per request",
            {n: total(n, "switches") / total(n, "requests") for n in blocks},
            "fewer: more events handled per wake-up of the event loop",
        ),
        (
            "main process CPU ms/s (workers: 2 only)",
            {n: total(n, "main") / total(n, "elapsed") * 1e3 for n in blocks},
            "the supervisor (no /metrics scrape during the windows)",
        ),
        (
            "load spread: busiest worker's share of the workers' CPU",
            {n: max(b["busiest"] for b in blocks[n]) for n in blocks},
            "worst block (0.50 is even, 1.00 is one worker only); per block: "
            + "/".join(fmt(b["busiest"]) for b in blocks[two]),
        ),
        (
            "client + upstream CPU ms/req",
            {n: per_request(n, "client", "upstream") for n in blocks},
            "",
        ),
        (
            f"machine busy cores (of {os.cpu_count()})",
            {n: total(n, "machine") / total(n, "elapsed") for n in blocks},
            "everything on the box, other tenants included",
        ),
    ]
    results.tables.append(
        Table(
            f"Workers: MITM JSON over {CONNECTIONS} keep-alive connections, workers: 2 vs 1",
            ["metric", one, two, "2/1", "note"],
            [
                [metric, fmt(v[one]), fmt(v[two]), fmt(ratio(v[two], v[one]), 3), note]
                for metric, v, note in rows
            ],
        )
    )
    speedup, cpu_ratio = ratio(rate[two], rate[one]), ratio(cpu[two], cpu[one])
    results.verdicts += [
        Verdict(
            "workers: 2 vs 1: requests/s >= 1.3x",
            f"{fmt(rate[two], 0)} vs {fmt(rate[one], 0)} (x{fmt(speedup, 3)})",
            speedup is not None and speedup >= 1.3,
        ),
        Verdict(
            "workers: 2 vs 1: proxy CPU per request within 10%",
            f"{fmt(cpu[two])} vs {fmt(cpu[one])} ms (x{fmt(cpu_ratio, 3)})",
            cpu_ratio is not None and cpu_ratio <= 1.10,
        ),
    ]
    results.raw["workers"] = {"blocks": blocks, "req_s": rate, "proxy_cpu_ms": cpu}
