"""OpenMP's wait policy, set before torch loads its OpenMP runtime.

torch's CPU builds run intra-op parallel regions on GNU OpenMP, whose threads spin (busy-wait)
for a while at every barrier before they sleep. When another job keeps the cores busy, a
spinning thread burns the time slice its descheduled peer needs to reach the barrier, and
every parallel region waits for a whole scheduler tick: the quickstart took 20.6 minutes
instead of about 2 beside a 2-thread job on 2 cores. With OMP_WAIT_POLICY=PASSIVE threads
sleep at once, so a busy machine slows a run down by the CPU it takes, no more
(bench/load.py; docs/performance.md has the figures).

libgomp reads the variable once, when it is loaded (when torch is first imported), so the
entry points (python -m train / server / export / bench.*) call `prefer_passive_wait()` before
they import anything that imports torch; worker processes inherit the variable. A value the
user set is kept. This module imports nothing heavy, on purpose.
"""
from __future__ import annotations

import os
import sys
import warnings
from collections.abc import MutableMapping

VARIABLE = "OMP_WAIT_POLICY"


def prefer_passive_wait(environ: MutableMapping[str, str] = os.environ) -> str:
    """Set OMP_WAIT_POLICY=PASSIVE unless it is set; the policy in force. Warns when torch is
    already imported (too late: its OpenMP runtime has read the old value)."""
    if VARIABLE not in environ:
        environ[VARIABLE] = "PASSIVE"
        if "torch" in sys.modules:
            warnings.warn(f"{VARIABLE}=PASSIVE set after torch was imported: it takes effect "
                          "in child processes only", RuntimeWarning, stacklevel=2)
    return environ[VARIABLE]
