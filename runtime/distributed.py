"""torch.distributed set-up for torchrun / accelerate launches; a no-op on one process."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size and its device."""
    rank: int
    world_size: int
    device: torch.device
    backend: str | None = None  # the process group's ("nccl", "gloo"); None on one process

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs, samples and checkpoints."""
        return self.rank == 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    """`trainer.device` (auto | cpu | cuda) as a torch device for this process."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: 'cuda' was asked for but no CUDA GPU is visible; "
                          "use trainer.device=cpu or auto")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


# What MPI launchers (Open MPI, MPICH / Intel MPI / Slurm's PMI, MVAPICH) tell each process
MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launcher() -> None:
    """Refuse a multi-process MPI launch (`mpirun -n 2 python -m train ...`) that sets no
    WORLD_SIZE: every process would train alone, all writing one run folder."""
    if "WORLD_SIZE" in os.environ:
        return
    for name in MPI_SIZE_VARIABLES:
        size = os.environ.get(name, "1")
        if size.isdigit() and int(size) > 1:
            raise ConfigError(f"started by an MPI launcher ({name}={size}) without "
                              "WORLD_SIZE/RANK: each process would run alone into one folder; "
                              "launch with `torchrun --nproc_per_node=N` (or `accelerate "
                              "launch`), which set them")


def setup(preference: str = "auto") -> DistEnv:
    """Join the process group when launched with WORLD_SIZE > 1 (env:// rendezvous)."""
    check_launcher()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(preference, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    backend = dist.get_backend() if world_size > 1 else None
    return DistEnv(rank, world_size, device, backend)


def describe(env: DistEnv) -> str | None:
    """One line on a multi-process run (world size, backend, device); None on one process."""
    if not env.enabled:
        return None
    return (f"DDP: {env.world_size} processes, {env.backend} backend, one {env.device.type} "
            "device each")


def single_process_note(environ: dict[str, str] | None = None) -> str | None:
    """`accelerate launch --cpu --num_processes N` hands N CPU processes to MPI (mpirun, with
    --mpirun_hostfile) and without it starts one process, setting MASTER_ADDR but no
    WORLD_SIZE: say so rather than train on one process silently."""
    env = os.environ if environ is None else environ
    accelerate_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1", "yes")
    if accelerate_cpu and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        return ("note: `accelerate launch --cpu --num_processes N` started this one process "
                "only (accelerate hands CPU processes to MPI, which it did not use here), so "
                "this run trains on 1 process; for N CPU processes use `accelerate launch "
                "--multi_gpu --num_processes N` (gloo on CPU) or `torchrun --nproc_per_node=N`")
    return None


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ('sum' or 'max') across ranks; identity on one process."""
    if env.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast_module(module: torch.nn.Module, env: DistEnv) -> None:
    """Overwrite every rank's parameters and buffers with rank 0's."""
    if env.enabled:
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=0)


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """One picklable object per rank, in rank order."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
