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
