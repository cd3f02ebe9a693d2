"""Fixtures of the reliability suite: a tiny checkpoint, two replicas, nginx, figures.

The replicas run with the environment of deploy/compose.yaml's replicas (body limit, timeouts,
batching), only moved to CPU and loopback. Run the suite with
`python -m pytest -m reliability tests/reliability` (needs nginx: apt-get install nginx-light).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from model.autoencoder import AutoencoderKL
from model.checkpoint import save_checkpoint
from model.config import to_dict
from tests.conftest import tiny_model_config
from tests.figures import figures_plugin
from tests.reliability.cluster import Cluster, Nginx, Replica, compose_server_args, free_port
from tests.reliability.load import make_calls



@pytest.fixture(scope="session")
def workdir():
    # nginx's workers (user nobody when run as root) must reach their scratch folders, which
    # pytest's 0700 tmp_path does not allow.
    path = Path(tempfile.mkdtemp(prefix="radiodiff-reliability-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(workdir) -> Path:
    torch.manual_seed(0)
    config = tiny_model_config()
    net = AutoencoderKL.from_config(config)
    return save_checkpoint(workdir / "model-1.pt", {"model": net.state_dict(), "step": 1,
                                                     "config": {"model": to_dict(config)}})


@pytest.fixture(scope="session")
def cluster(workdir, tiny_checkpoint, figures):
    args = compose_server_args()
    replicas = [Replica(f"replica-{i}", tiny_checkpoint, free_port(), workdir, *args)
                for i in range(2)]
    nginx = Nginx(replicas, free_port(), workdir)
    try:
        for replica in replicas:
            replica.start()
        waits = [replica.wait_healthy() for replica in replicas]
        figures.append(f"replicas healthy {max(waits):.1f} s after start (2 started together); "
                       f"server options from deploy/compose.yaml: {' '.join(args)}")
        nginx.start()
        yield Cluster(replicas, nginx, make_calls(replicas[0].url))
    finally:
        nginx.stop()
        for replica in replicas:
            replica.stop()


@pytest.fixture
def restored(cluster) -> Cluster:
    """The cluster with both replicas healthy, before and after the test."""
    cluster.restore()
    yield cluster
    cluster.restore()


# `figures`: lines for the summary at the end of the run (requests, latencies, memory, faults)
figures, pytest_terminal_summary = figures_plugin("reliability figures")
