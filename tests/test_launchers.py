"""The launchers users already use: `accelerate launch` (RadioDiff's own quick start) with 1
and 2 CPU processes, and torchrun across 2 nodes (two launchers on one machine, c10d
rendezvous on loopback), which trains and resumes."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model.checkpoint import read_checkpoint
from tests.test_trainer import tiny_run
from train.logging import read_metrics

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]


def _config(tmp_path: Path, steps: int) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run(tmp_path, train_num_steps=steps,
                                           save_and_sample_every=2, batch_size=1)))
    return cfg


def _ranks_in(run_dir: Path) -> int:
    return len(read_checkpoint(max(run_dir.glob("model-*.pt")))["rng"])  # one RNG per rank


def test_accelerate_launch_one_process_as_radiodiff_quick_start(tmp_path):
    pytest.importorskip("accelerate")
    out = subprocess.run([*ACCELERATE, "--num_processes", "1", "-m", "train", "--cfg",
                          str(_config(tmp_path, 2))], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done: 2 steps" in out.stdout and _ranks_in(tmp_path / "run") == 1


def test_accelerate_launch_two_cpu_processes_trains_with_ddp(tmp_path):
    """On CPU, `--multi_gpu` is accelerate's torchrun launcher (gloo here); `--cpu` with 2
    processes would ask for MPI and, without mpirun, run a single process (docs/training.md)."""
    pytest.importorskip("accelerate")
    out = subprocess.run([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "-m", "train",
                          "--cfg", str(_config(tmp_path, 4))], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("done: 4 steps") == 1  # rank 0 alone reports
    assert out.stdout.count("DDP: 2 processes, gloo backend") == 1
    assert _ranks_in(tmp_path / "run") == 2
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "val/psnr" in r] == [2, 4]


def test_accelerate_launch_cpu_two_processes_says_it_runs_one(tmp_path):
    """`--cpu --num_processes 2` hands the processes to MPI and, without mpirun, starts one:
    the run says so instead of training on one process silently."""
    pytest.importorskip("accelerate")
    out = subprocess.run([*ACCELERATE, "--cpu", "--num_processes", "2", "-m", "train",
                          "--cfg", str(_config(tmp_path, 2))], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("started this one process only") == 1
    assert "use `accelerate launch --multi_gpu --num_processes N`" in out.stdout
    assert "DDP:" not in out.stdout and _ranks_in(tmp_path / "run") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(cfg: Path, *train_args: str) -> list[subprocess.CompletedProcess]:
    """Two torchrun launchers, one process each, meeting at a c10d rendezvous on loopback."""
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
         str(rank), "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
         f"127.0.0.1:{port}", "--rdzv_id", "radiodiff-test", "-m", "train", "--cfg", str(cfg),
         *train_args], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for rank in (0, 1)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


def test_an_mpi_launch_without_world_size_is_refused_before_anything_is_written(tmp_path):
    """`mpirun -n 2 python -m train ...` gives each process OMPI_COMM_WORLD_SIZE=2 and no
    WORLD_SIZE: two independent runs into one folder. Each process is refused in one line."""
    for variable in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        env = {**ENV, variable: "2", "OMPI_COMM_WORLD_RANK": "1", "PMI_RANK": "1"}
        env.pop("WORLD_SIZE", None)
        out = subprocess.run([sys.executable, "-m", "train", "--cfg", str(_config(tmp_path, 2))],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr[-3000:]
        assert f"MPI launcher ({variable}=2) without WORLD_SIZE" in out.stderr
        assert "torchrun --nproc_per_node=N" in out.stderr and "Traceback" not in out.stderr
        assert not (tmp_path / "run").exists()


@pytest.mark.slow  # two launchers, four processes, a resume (~30 s on 2 cores)
def test_torchrun_two_nodes_on_loopback_trains_and_resumes(tmp_path):
    cfg = _config(tmp_path, 2)
    first = _two_nodes(cfg)
    assert all(r.returncode == 0 for r in first), [r.stderr[-2000:] for r in first]
    assert sum(r.stdout.count("done: 2 steps") for r in first) == 1
    assert _ranks_in(tmp_path / "run") == 2
    cfg.write_text(cfg.read_text().replace("train_num_steps: 2", "train_num_steps: 4"))
    again = _two_nodes(cfg, "--resume")
    assert all(r.returncode == 0 for r in again), [r.stderr[-2000:] for r in again]
    assert read_checkpoint(tmp_path / "run" / "model-2.pt")["step"] == 4
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "train/total_loss" in r]
    assert steps == [0, 1, 2, 3]  # resumed at step 2: no step twice, none missing
