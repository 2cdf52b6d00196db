"""The tunnel relay floor: ``bench/splice_relay.c`` (a minimal splice(2) CONNECT relay in C),
compiled with the machine's C compiler into the lab directory and started on a free port, as a
fourth way to reach the bulk port. The tunnel bulk scenario measures it beside direct, mitmdump
and ours: what the second TCP hop itself costs the machine, whoever relays it. Skipped (None)
without a C compiler or off Linux."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from bench.lab import BENCH_DIR, Lab, Target
from bench.procs import LOOPBACK, free_port, port_open, wait_until

SOURCE = BENCH_DIR / "splice_relay.c"
NAME = "c-splice"


def compile_relay(out: Path) -> str | None:
    """Build the relay into ``out``; None on success, else why it was not built."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not sys.platform.startswith("linux") or compiler is None:
        return "no C compiler (or not Linux)"
    built = subprocess.run(
        [compiler, "-O2", "-pthread", "-o", str(out), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    return None if built.returncode == 0 else f"cc failed: {built.stderr.strip()[:300]}"


def start_c_relay(lab: Lab) -> Target | str:
    """The running relay as a ``Target`` (only ``proxy_port`` and ``pid`` matter: the bulk
    scenario names the authority and the upstream's CA itself), or why it could not start."""
    binary = lab.dir / "splice_relay"
    if not binary.exists() and (why := compile_relay(binary)) is not None:
        return why
    port = free_port()
    process = lab.procs.start(NAME, [str(binary), str(port)], cwd=lab.dir)
    wait_until(lambda: process.poll() is not None or port_open(port), 10, "C relay listening")
    if process.poll() is not None:
        return f"the C relay exited with {process.returncode}"
    return Target(
        name=NAME,
        pid=process.pid,
        proxy_port=port,
        origin=f"https://{LOOPBACK}:{lab.bulk_port}",
        connect_to=f"{LOOPBACK}:{lab.bulk_port}",
        tls_host=LOOPBACK,
        verify=lab.upstream_context,
        api_key="",
    )
