"""The processes of a server under test, from /proc (shared by the server and reliability
suites)."""
from __future__ import annotations

import os
import time
from pathlib import Path


def group_pids(pgid: int) -> list[int]:
    """Live processes of a process group (from /proc; zombies excluded)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)"
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return sorted(pids)


def wait_group_gone(pgid: int, timeout: float) -> list[int]:
    """Poll until a process group has no live process, within `timeout`; what is left.

    The main process exits first; a helper it started (multiprocessing's resource tracker)
    sees its pipe close only then and ends a moment later, and the kernel reaps the others:
    bounded, not instant."""
    deadline = time.monotonic() + timeout
    while (left := group_pids(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left
