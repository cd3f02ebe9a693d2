"""Worker memory headroom on a real `python -m server` (tiny model, CPU) inside a real memory
cgroup, the limit a container runs under: a request whose measured working memory does not fit
in what the cgroup has left gets 503 with Retry-After and never runs, the worker stays up, and
a request that fits is served; and the unit pieces of server/memory.py against /proc."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests

from model.io import encode_npy
from server import memory
from tests.test_server import NPY, running_server, save_tiny_checkpoint
from tests.test_server_queue import Server

pytestmark = pytest.mark.server

NO_MEMORY = 'radiodiff_rejections_total{endpoint="/reconstruct",reason="no_memory"}'
REPO = Path(__file__).resolve().parents[1]
START_LIMIT = 4 << 30  # bytes: room to start three workers, lowered once they are ready
LEFT = 400 << 20  # bytes the cgroup has left after lowering


class MemoryCgroup:
    """A fresh memory cgroup (v2, or v1) with a settable limit; processes join it through
    `prefix`."""

    def __init__(self):
        name = f"radiodiff-test-{uuid.uuid4().hex[:8]}"
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.exists() and "memory" in v2.read_text().split():
            self.path, self.limit_file = Path("/sys/fs/cgroup") / name, "memory.max"
            self.usage_file, self.cache_key = "memory.current", "inactive_file"
        else:
            self.path, self.limit_file = Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes"
            self.usage_file, self.cache_key = "memory.usage_in_bytes", "total_inactive_file"
        self.path.mkdir()

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh")

    def set_limit(self, limit: int) -> None:
        (self.path / self.limit_file).write_text(str(limit))

    def usage(self) -> int:
        stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        return int((self.path / self.usage_file).read_text()) - int(stat.get(self.cache_key, 0))

    def remove(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


@pytest.fixture
def cgroup():
    try:
        group = MemoryCgroup()
        group.set_limit(START_LIMIT)
    except OSError as err:
        pytest.skip(f"cannot make a memory cgroup here (needs root and a cgroup fs): {err}")
    yield group
    group.remove()


def test_a_request_that_does_not_fit_in_memory_gets_503_and_never_runs(tmp_path, cgroup):
    save_tiny_checkpoint(tmp_path)
    args = ["--timeout", "120", "--max-pixels", str(1024 * 1024)]
    with running_server(tmp_path, args, {}, prefix=cgroup.prefix) as (url, port, proc, log):
        server = Server(url, port)
        info = requests.get(url + "/info", timeout=10).json()
        per_mp = next(w["bytes_per_megapixel"] for w in info["workers"]
                      if w["endpoint"] == "/reconstruct")
        assert per_mp > 0, "the warm-up measured no working memory"
        cgroup.set_limit(cgroup.usage() + LEFT)
        side = int((2 * LEFT / per_mp * 1e6) ** 0.5) // 16 * 16  # needs about twice what is left
        assert side * side / 1e6 <= server.budget, "the test request must pass admission"
        body = encode_npy(np.random.default_rng(0).random((1, 1, side, side), np.float32))
        big = requests.post(url + "/reconstruct", data=body, headers={"Content-Type": NPY},
                            timeout=60)
        assert big.status_code == 503, big.text
        assert "MiB of working memory" in big.json()["detail"] and "Retry-After" in big.headers
        assert server.metrics()[NO_MEMORY] == 1
        assert server.reconstruct(1).status_code == 200  # a 64x64 map fits
        assert Server(url, port).worker == server.worker  # the same worker: nothing died
        assert proc.poll() is None


PEAK_PROBE = """
import json, numpy as np
from server import memory
base = memory.resident_bytes()
assert memory.reset_peak()
block = np.ones(256 << 20, np.uint8)  # 256 MiB touched, then freed: the peak must keep it
del block
print(json.dumps([base, memory.resident_bytes(), memory.peak_resident_bytes()]))
"""


def test_memory_readings_match_proc():
    status = Path("/proc/self/status").read_text()
    rss = int(status.split("VmRSS:")[1].split()[0]) * 1024
    assert abs(memory.resident_bytes() - rss) < 64 << 20
    # in a fresh process, where the allocation cannot reuse memory freed by earlier tests
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    base, after, peak = json.loads(out)
    assert peak - base > 200 << 20 and after < peak
    free = memory.available_bytes()
    total = memory.capacity_bytes()
    meminfo = Path("/proc/meminfo").read_text()
    assert 0 < free <= int(meminfo.split("MemAvailable:")[1].split()[0]) * 1024
    assert free <= total <= int(meminfo.split("MemTotal:")[1].split()[0]) * 1024


def test_a_cgroup_limit_bounds_available_and_capacity(cgroup):
    cgroup.set_limit(2 << 30)
    code = ("from server import memory; import json; "
            "print(json.dumps([memory.available_bytes(), memory.capacity_bytes()]))")
    out = subprocess.run([*cgroup.prefix, sys.executable, "-c", code], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout
    free, total = (int(v) for v in out.strip("[]\n").split(","))
    assert total == 2 << 30
    assert 0 < free < 2 << 30


def test_an_ancestors_limit_bounds_a_process_in_a_child_cgroup(cgroup):
    """Limits nest: a process in a child cgroup with no limit of its own (a systemd scope in a
    limited slice, a container in a limited pod) is bound by its parent's."""
    cgroup.set_limit(2 << 30)
    child = cgroup.path / "leaf"
    if cgroup.limit_file == "memory.max":  # v2: the parent hands its memory controller down
        (cgroup.path / "cgroup.subtree_control").write_text("+memory")
    child.mkdir()
    try:
        prefix = ("sh", "-c", f'echo $$ > {child}/cgroup.procs && exec "$@"', "sh")
        code = ("from server import memory; import json; "
                "print(json.dumps([memory.available_bytes(), memory.capacity_bytes()]))")
        out = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True,
                             text=True, check=True, cwd=REPO).stdout
    finally:
        child.rmdir()
    free, total = json.loads(out)
    assert total == 2 << 30
    assert 0 < free < 2 << 30


def _fake_cgroup(root: Path, version: str, levels: dict[str, tuple[str, int, int]]) -> None:
    """A /proc and cgroup fs under `root`: this process in cgroup /a/b; `levels` maps a cgroup
    path to (limit as the kernel writes it, usage, inactive file cache) bytes."""
    proc, fs = root / "proc", root / "cgroup"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "meminfo").write_text("MemTotal:       16777216 kB\nMemAvailable:    8388608 kB\n")
    if version == "v2":
        (proc / "self" / "cgroup").write_text("0::/a/b\n")
        names, base = ("memory.max", "memory.current", "inactive_file"), fs
    else:
        (proc / "self" / "cgroup").write_text("5:memory:/a/b\n0::/\n")
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        base = fs / "memory"
    for path, (limit, usage, cache) in levels.items():
        level = base / path
        level.mkdir(parents=True, exist_ok=True)
        (level / names[0]).write_text(f"{limit}\n")
        (level / names[1]).write_text(f"{usage}\n")
        (level / "memory.stat").write_text(f"anon 1\n{names[2]} {cache}\n")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_tightest_limit_over_a_cgroup_and_its_ancestors_wins(tmp_path, monkeypatch, version):
    """The parsing of both cgroup versions' files, on a fake tree (this machine runs one
    version; the test above exercises it for real)."""
    mib, unlimited = 1 << 20, ("max" if version == "v2" else str(2**63 - 4096))
    monkeypatch.setattr(memory, "PROC", tmp_path / "proc")
    monkeypatch.setattr(memory, "CGROUP", tmp_path / "cgroup")
    # the process's own cgroup sets no limit; its parent 1 GiB, 600 MiB used, 100 MiB of cache
    _fake_cgroup(tmp_path, version, {"": (unlimited, 4000 * mib, 0),
                                     "a": ("1073741824", 600 * mib, 100 * mib),
                                     "a/b": (unlimited, 300 * mib, 0)})
    assert memory.capacity_bytes() == 1024 * mib
    assert memory.available_bytes() == 524 * mib
    # a tighter limit on the process's own cgroup wins over the parent's
    _fake_cgroup(tmp_path, version, {"a/b": ("536870912", 300 * mib, 50 * mib)})
    assert memory.capacity_bytes() == 512 * mib
    assert memory.available_bytes() == 262 * mib
    # no limit anywhere: the machine's memory
    _fake_cgroup(tmp_path, version, {"a": (unlimited, 600 * mib, 0),
                                     "a/b": (unlimited, 300 * mib, 0)})
    assert memory.capacity_bytes() == 16 << 30
    assert memory.available_bytes() == 8 << 30
