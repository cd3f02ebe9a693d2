"""OMP_WAIT_POLICY=PASSIVE is in force before torch loads OpenMP, in every entry point."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.openmp import prefer_passive_wait

REPO = Path(__file__).resolve().parents[1]


def _import_order(module: str) -> list[str]:
    """Modules in the order `python -m module --help` finished importing them."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
            if line.startswith("import time:") and "|" in line][1:]


@pytest.mark.parametrize("entry", ["train", "server", "export", "bench.model"])
def test_every_entry_point_sets_the_wait_policy_before_torch_is_imported(entry):
    order = _import_order(entry)
    assert "runtime.openmp" in order, f"python -m {entry} never imports runtime.openmp"
    before = order[:order.index("runtime.openmp")]
    assert not [name for name in before if name.split(".")[0] == "torch"], (
        f"python -m {entry} imports torch before runtime.openmp sets OMP_WAIT_POLICY")


def test_a_policy_the_user_set_is_kept_and_an_unset_one_becomes_passive():
    assert prefer_passive_wait({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
    environ: dict[str, str] = {}
    with pytest.warns(RuntimeWarning, match="after torch was imported"):  # torch is, here
        assert prefer_passive_wait(environ) == "PASSIVE"
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
