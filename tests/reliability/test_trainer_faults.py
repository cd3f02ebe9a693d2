"""Trainer faults: kill -9 in the middle of a checkpoint write, and a checkpoint that carries
code. The first must leave the previous checkpoint loadable and `--resume` working; the second
must be refused by every program that loads checkpoints, without running the code."""
from __future__ import annotations

import ctypes
import os
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.autoencoder import AutoencoderKL
from model.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint
from model.config import to_dict
from model.loading import load
from tests.conftest import tiny_model_config
from tests.reliability.cluster import ROOT, free_port

pytestmark = pytest.mark.reliability

IN_CREATE = 0x100
RUN_TIMEOUT = 300


def train_cmd(results: Path, *extra: str) -> list[str]:
    """The quick start, cut to 2 steps with a checkpoint after each."""
    return [sys.executable, "-m", "train", "--cfg", "quickstart.yaml",
            "trainer.train_num_steps=2", "trainer.save_and_sample_every=1",
            f"trainer.results_folder={results}", "data.num_maps=16", "trainer.batch_size=2",
            "trainer.val_size=2", "trainer.num_samples=2", *extra]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}


class CreationWatch:
    """inotify on one directory: the name of each file created in it, as it is created."""

    def __init__(self, directory: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, bytes(directory), IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {directory}")

    def next_names(self, timeout: float) -> list[str]:
        if not select.select([self.fd], [], [], timeout)[0]:
            return []
        data, names, offset = os.read(self.fd, 65536), [], 0
        while offset < len(data):
            _, _, _, length = struct.unpack_from("iIII", data, offset)
            raw = data[offset + 16: offset + 16 + length]
            names.append(raw.rstrip(b"\0").decode())
            offset += 16 + length
        return names

    def close(self) -> None:
        os.close(self.fd)


def kill_during_write(proc: subprocess.Popen, results: Path, milestone: int) -> Path:
    """Freeze the trainer the moment it creates model-{milestone}.pt's temp file, let it write
    part of it, then kill -9 it. Returns the temp file it was writing."""
    watch, deadline = CreationWatch(results), time.monotonic() + RUN_TIMEOUT
    try:
        while time.monotonic() < deadline:
            for name in watch.next_names(1.0):
                if name.startswith(f".model-{milestone}.pt.") and name.endswith(".tmp"):
                    os.kill(proc.pid, signal.SIGSTOP)
                    torn = results / name
                    advance_until_written(proc.pid, torn)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(30)
                    return torn
            if proc.poll() is not None:
                raise AssertionError(f"the trainer ended ({proc.returncode}) before writing "
                                     f"model-{milestone}.pt:\n{proc.stdout.read()}")
        raise TimeoutError(f"no model-{milestone}.pt write within {RUN_TIMEOUT} s")
    finally:
        watch.close()


def advance_until_written(pid: int, path: Path, slice_s: float = 0.001) -> None:
    """Let a stopped process run in 1 ms slices until `path` holds some bytes; it stays stopped."""
    for _ in range(5000):
        if path.stat().st_size > 0:
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(slice_s)
        os.kill(pid, signal.SIGSTOP)
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.0005)
    raise AssertionError(f"{path} stayed empty")


def test_kill_9_during_a_checkpoint_write_then_resume(tmp_path, figures):
    results = tmp_path / "run"
    results.mkdir()
    proc = subprocess.Popen(train_cmd(results), cwd=ROOT, env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    torn = kill_during_write(proc, results, milestone=2)
    assert proc.returncode == -signal.SIGKILL
    torn_size = torn.stat().st_size
    assert not (results / "model-2.pt").exists()
    with pytest.raises(CheckpointError):
        read_checkpoint(torn)  # the half-written file is not a checkpoint...
    assert latest_checkpoint(results) == results / "model-1.pt"  # ...and not taken for one
    assert read_checkpoint(results / "model-1.pt")["step"] == 1
    load(results / "model-1.pt")

    resumed = subprocess.run(train_cmd(results, "--resume"), cwd=ROOT, env=child_env(),
                             capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {results / 'model-1.pt'} at step 1" in resumed.stdout
    assert read_checkpoint(latest_checkpoint(results))["step"] == 2
    load(results)
    figures.append(f"trainer: kill -9 while writing model-2.pt ({torn_size / 2**20:.1f} of "
                   f"{(results / 'model-1.pt').stat().st_size / 2**20:.1f} MiB written): "
                   "model-1.pt intact and loadable; --resume from step 1 ran to step 2; lost: "
                   "the step after the last checkpoint, nothing else")


class RunsCode:
    """Unpickled without weights_only, this creates `marker`: a stand-in for any payload."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_carrying_code_is_refused_by_every_loader(tmp_path, figures):
    marker = tmp_path / "code-ran"
    config = tiny_model_config()
    net = AutoencoderKL.from_config(config)
    run = tmp_path / "run"
    run.mkdir()
    evil = run / "model-9.pt"  # otherwise a good checkpoint: weights, config, step
    torch.save({"model": net.state_dict(), "step": 9, "config": {"model": to_dict(config)},
                "extra": RunsCode(marker)}, evil)
    armed = subprocess.run([sys.executable, "-c", "import sys, torch; "
                            "torch.load(sys.argv[1], weights_only=False)", str(evil)],
                           env=child_env(), capture_output=True, timeout=RUN_TIMEOUT)
    assert armed.returncode == 0 and marker.exists(), "the test file does not carry code"
    marker.unlink()

    loaders = {
        "train --resume": train_cmd(run, "--resume"),
        "train eval": [sys.executable, "-m", "train", "eval", "--ckpt", str(evil)],
        "export": [sys.executable, "-m", "export", "--ckpt", str(evil), "--out",
                   str(tmp_path / "export")],
        "server": [sys.executable, "-m", "server", "--model", str(evil), "--device", "cpu",
                   "--host", "127.0.0.1", "--port", str(free_port())],
    }
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=child_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name, cmd in loaders.items()}
    outputs = {name: proc.communicate(timeout=RUN_TIMEOUT)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode != 0, f"{name} accepted the file:\n{outputs[name]}"
        assert str(evil) in outputs[name] and "refused" in outputs[name], outputs[name]
        assert "io.open" in outputs[name] and "weights_only" not in outputs[name]  # builtins.open
    assert not marker.exists(), "a loader ran the code in the checkpoint"
    assert not (tmp_path / "export" / "encoder.onnx").exists()
    figures.append(f"checkpoint carrying code: refused by {', '.join(loaders)} "
                   f"(exit codes {[p.returncode for p in procs.values()]}); code never ran")
