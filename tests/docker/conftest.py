"""Fixtures of the Docker suite: the engine, the images, figures for the summary.

Run it with `make test-docker` (installs and starts an engine when root, builds the images,
then `pytest -m docker tests/docker`); `make test` deselects it. Without an engine every test
is skipped, saying why. The images are built by scripts/docker-build.sh when missing.
"""
from __future__ import annotations

import re
import subprocess

import pytest

from tests.docker.engine import ROOT, docker, engine_problem, image_exists
from tests.figures import figures_plugin

CPU_IMAGE, GPU_IMAGE, NGINX_IMAGE = "radiodiff-vae:cpu", "radiodiff-vae:gpu", "radiodiff-nginx"


def pytest_configure(config):
    config.addinivalue_line("markers", "docker: needs a Docker engine (make test-docker)")
    config.addinivalue_line("markers", "smoke: the part of the Docker suite CI runs")


# `figures`: lines for the summary at the end of the run (sizes, times, faults)
figures, pytest_terminal_summary = figures_plugin("docker figures")


@pytest.fixture(scope="session")
def engine() -> None:
    problem = engine_problem()
    if problem:
        pytest.skip(problem)


def build(target: str, figures: list[str]) -> None:
    """scripts/docker-build.sh TARGET; its `built ...` lines go to the figures."""
    run = subprocess.run(["bash", str(ROOT / "scripts" / "docker-build.sh"), target], cwd=ROOT,
                         capture_output=True, text=True, timeout=3600)
    if run.returncode:
        raise RuntimeError(f"scripts/docker-build.sh {target} failed:\n{run.stdout[-3000:]}"
                           f"\n{run.stderr[-3000:]}")
    figures += [line for line in run.stdout.splitlines() if line.startswith("built ")]


@pytest.fixture(scope="session")
def cpu_image(engine, figures) -> str:
    if not image_exists(CPU_IMAGE):
        build("cpu", figures)
    return CPU_IMAGE


@pytest.fixture(scope="session")
def nginx_image(engine, figures) -> str:
    if not image_exists(NGINX_IMAGE):
        build("nginx", figures)
    return NGINX_IMAGE


@pytest.fixture(scope="session")
def gpu_image(engine) -> str:
    """The GPU image when it was built here (it takes ~5 GB and minutes): never built by the
    suite itself; `make test-docker DOCKER_GPU=1` builds it first."""
    if not image_exists(GPU_IMAGE):
        pytest.skip(f"{GPU_IMAGE} is not built here: bash scripts/docker-build.sh gpu")
    return GPU_IMAGE


@pytest.fixture(scope="session")
def cache_volume(engine):
    """A fresh named volume for the decision cache, removed at the end."""
    name = "radiodiff-test-cache"
    docker("volume", "rm", "-f", name, check=False)
    docker("volume", "create", name)
    yield name
    docker("volume", "rm", "-f", name, check=False)


def gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def mask_numbers(text: str) -> str:
    """`text` with every number replaced by N (for outputs whose values depend on the model)."""
    return re.sub(r"\d+(?:\.\d+)?", "N", text)
