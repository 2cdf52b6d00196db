"""Whether a daemon that reported its presence (``aibridgeproxyd.presence``) is a process that
has ended on this machine, so the CLI need not wait for it: a ``kill -9`` leaves its report
behind until the heartbeat goes stale.

A report names its process by pid and by the machine and pid namespace it runs in (the kernel's
boot id, ``/proc/sys/kernel/random/boot_id``, and ``/proc/self/ns/pid``); only a report from this
same boot and namespace can be checked, and only a pid with no process (or a zombie) is gone.
Anything unknown counts as running: the cost of a wrong "running" is a wait, of a wrong "gone"
a write confirmed before a daemon applied it.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def host_identity() -> str | None:
    """This process's boot id and pid namespace as one string; None off Linux, and where
    ``/proc`` is another pid namespace's (``unshare -p`` without a new ``/proc``): there
    ``/proc/<pid>`` of a pid of this namespace is another process, maybe a zombie."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
        own_proc = os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return None
    return f"{boot} {namespace}" if boot and own_proc else None


def process_gone(pid: int | None, host: str | None) -> bool:
    """Whether process ``pid`` of the machine and namespace ``host`` (``host_identity()`` of the
    reporting process) is known to have ended: True only for this very boot and namespace and
    a pid that is no process or a zombie."""
    if pid is None or pid <= 0 or host is None or host != host_identity():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        # EPERM: a process of another user runs under that pid; OverflowError: not a pid_t (a
        # hand-edited row), nothing known of it.
        return False
    return _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has ended and waits for its parent to reap it (state ``Z``)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] == "Z"
