"""``python -m bench``: direct vs bare mitmdump vs aibridgeproxyd, side by side, on loopback.

    python -m bench                 # everything (under 5 minutes on a 2-core box)
    python -m bench --quick         # a ~1 minute smoke run: shorter windows, one repetition
    python -m bench json sse-paced  # only these scenarios
    python -m bench --profile /tmp/prof json   # also sample ours with py-spy (skews ours)

The bench only reports: it never fails on a number. It exits non-zero only when a scenario
could not run (a process died, a response was wrong).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.lab import Lab
from bench.registry import SCENARIOS
from bench.report import Results, render
from bench.scenarios import Settings


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import mitmproxy.version

        mitmproxy_version = mitmproxy.version.VERSION
    except ImportError:
        mitmproxy_version = "?"
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    revision = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        root = Path(__file__).resolve().parent.parent
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":!bench"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        revision = head + (f" + {len(changed)} uncommitted file(s)" if changed else "")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": mitmproxy_version,
        "loadavg_before": os.getloadavg()[0],
        "revision": revision,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios: " + ", ".join(SCENARIOS),
    )
    parser.add_argument(
        "scenarios", nargs="*", metavar="SCENARIO", help="run only these (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    parser.add_argument("--skip", action="append", default=[], metavar="SCENARIO")
    parser.add_argument("--window", type=float, help="measured seconds per configuration")
    parser.add_argument("--reps", type=int, help="repetitions (order alternates)")
    parser.add_argument("--streams", type=int, help="concurrent open streams (default 1000)")
    parser.add_argument("--providers", type=int, help="provider count for the reload scenario")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy ours into DIR")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write raw results as JSON")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="write the tables here")
    parser.add_argument("--keep", action="store_true", help="keep the lab directory (logs)")
    parser.add_argument(
        "--base",
        metavar="REV",
        help="also run a daemon on git revision REV's code, as a 'base' column beside ours "
        "(an A/B in one run: same windows, same load)",
    )
    parser.add_argument(
        "--base-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the --base daemon only (e.g. "
        "AIBRIDGEPROXYD_RECORD_PROMPTS=false: what a setting costs, same code both sides)",
    )
    parser.add_argument(
        "--proxy-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for both proxies (diagnostics, e.g. PYTHONPATH=bench/diag_gc)",
    )
    args = parser.parse_args(argv)
    unknown = [s for s in [*args.scenarios, *args.skip] if s not in SCENARIOS]
    if unknown:
        parser.error(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings.quick_settings() if args.quick else Settings()
    overrides: dict[str, Any] = {"profile_dir": args.profile}
    if args.window:
        overrides.update(window=args.window, burst_window=args.window)
    if args.reps:
        overrides["reps"] = args.reps
    if args.streams:
        overrides["streams"] = args.streams
    if args.providers:
        overrides["providers"] = args.providers
    return Settings(**{**settings.__dict__, **overrides})


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the Lab, which stops every child


async def run(lab: Lab, names: list[str], settings: Settings, results: Results) -> list[str]:
    failed = []
    for name in names:
        started = time.monotonic()
        print(f"[bench] {name} ...", flush=True)
        try:
            await SCENARIOS[name](lab, settings, results)
        except Exception as error:
            traceback.print_exc()
            results.notes.append(f"scenario {name} failed: {type(error).__name__}: {error}")
            failed.append(name)
        print(f"[bench] {name} done in {time.monotonic() - started:.1f} s", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    names = [n for n in (args.scenarios or list(SCENARIOS)) if n not in args.skip]
    signal.signal(signal.SIGTERM, _terminate)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 3 * settings.streams + 1024))
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))  # children inherit it

    info = machine()
    print(
        f"[bench] {info['date']}: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"mitmproxy {info['mitmproxy']}, revision {info['revision']}, "
        f"load average {info['loadavg_before']:.2f}; "
        f"{'quick' if settings.quick else 'full'} run of {', '.join(names)}"
        + (f", base {args.base}" if args.base else ""),
        flush=True,
    )
    started = time.monotonic()
    results = Results()
    results.raw["machine"] = info
    proxy_env = {}
    for item in args.proxy_env:
        key, _, value = item.partition("=")
        if key == "PYTHONPATH":
            value = os.pathsep.join(str(Path(p).resolve()) for p in value.split(os.pathsep))
        proxy_env[key] = value
    if proxy_env:
        print(f"[bench] extra proxy environment: {proxy_env}", flush=True)
    with Lab(keep=args.keep, proxy_env=proxy_env) as lab:
        if set(names) - {"providers", "workers"}:
            lab.start_mitmdump()
        lab.start_daemon()
        if args.base:
            base_env = dict(item.partition("=")[::2] for item in args.base_env)
            lab.start_daemon("base", code=lab.export_revision(args.base), extra_env=base_env)
            print(f"[bench] base: {args.base} (daemon pid {lab.targets['base'].pid})", flush=True)
        if args.keep:
            print(f"[bench] lab directory: {lab.dir}")
        failed = asyncio.run(run(lab, names, settings, results))
    total = time.monotonic() - started
    info["loadavg_after"] = os.getloadavg()[0]
    info["seconds"] = round(total, 1)
    text = (
        f"Run {info['date']}, {'quick' if settings.quick else 'full'}, {total:.0f} s: "
        f"{info['nproc']} x {info['cpu']}, Linux {info['kernel']}, Python {info['python']}, "
        f"mitmproxy {info['mitmproxy']}, revision {info['revision']}, load average "
        f"{info['loadavg_before']:.2f} before / {info['loadavg_after']:.2f} after.\n\n"
        + render(results)
    )
    print()
    print(text)
    print(
        f"[bench] total {total:.0f} s; load average before/after "
        f"{info['loadavg_before']:.2f}/{info['loadavg_after']:.2f}"
    )
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results.raw, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
