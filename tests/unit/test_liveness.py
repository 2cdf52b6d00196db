"""Whether a daemon that reported its presence has ended on this machine
(aibridgeproxyd.liveness)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from aibridgeproxyd.liveness import host_identity, process_gone


def test_this_machine_has_an_identity() -> None:
    identity = host_identity()
    assert identity is not None and "pid:[" in identity


def test_a_running_process_is_not_gone() -> None:
    assert not process_gone(os.getpid(), host_identity())


def test_an_ended_process_is_gone_reaped_or_not() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped: a zombie
    assert process_gone(child.pid, host_identity())
    child.wait()
    assert process_gone(child.pid, host_identity())


def test_only_a_report_of_this_boot_and_namespace_can_be_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not process_gone(child.pid, None)
    assert not process_gone(child.pid, "another-boot pid:[1]")
    assert not process_gone(None, host_identity())
    # 0 and negative pids name process groups for kill(2): never probed.
    assert not process_gone(0, host_identity())
    assert not process_gone(-1, host_identity())


def test_a_pid_beyond_what_kill_takes_is_not_gone_and_does_not_raise() -> None:
    """A hand-edited presence row may name any integer: kill(2) cannot take one beyond pid_t
    (OverflowError in Python), and an unknown process counts as running."""
    for pid in (2**31, 2**63, 10**30):
        assert not process_gone(pid, host_identity())


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare(1) as root"
)
def test_no_identity_where_proc_is_another_namespaces() -> None:
    """In a pid namespace of its own without a /proc of its own (``unshare -p -f``), a pid
    read in /proc names another process than kill(2) reaches: a live daemon there could be
    taken for the zombie /proc shows under its pid, and a write confirmed that it has not
    applied. Such a process has no identity (its reports are never judged gone)."""
    code = "from aibridgeproxyd.liveness import host_identity; print(host_identity())"
    inside = subprocess.run(
        ["unshare", "-p", "-f", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert inside.stdout.strip() == "None"
