"""The Docker engine as the tests drive it: the `docker` CLI, containers on the host network.

Every container runs with `--network host` (the engine may have no bridge at all:
scripts/docker-engine.sh starts dockerd with --bridge=none), so every request the tests send
stays on 127.0.0.1. Containers are named `radiodiff-test-*` and removed by the fixtures.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "radiodiff-test-"
LOOPBACK = "127.0.0.1"


class DockerError(RuntimeError):
    pass


def docker(*args: str, timeout: float = 120, check: bool = True,
           input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run the docker CLI; a failure raises with its stderr."""
    run = subprocess.run(["docker", *args], capture_output=True, timeout=timeout, input=input)
    if check and run.returncode:
        raise DockerError(f"docker {' '.join(args)}: exit {run.returncode}: "
                          f"{run.stderr.decode(errors='replace').strip()}")
    return run


def engine_problem() -> str | None:
    """Why the tests cannot use a Docker engine here, or None."""
    if not shutil.which("docker"):
        return "no docker CLI (make test-docker installs docker.io when run as root)"
    try:
        run = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                             capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 30 s"
    if run.returncode:
        return ("the Docker engine does not answer (make test-docker starts dockerd when run as "
                f"root): {run.stderr.decode(errors='replace').strip()[:200]}")
    return None


def image_exists(image: str) -> bool:
    return docker("image", "inspect", image, check=False).returncode == 0


def inspect(kind: str, name: str) -> dict:
    return json.loads(docker(kind, "inspect", name).stdout)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) == 0


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    """Poll `predicate` until it returns something true; its value, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


@dataclass
class Container:
    """One container, by name or id."""
    name: str
    url: str = ""  # http://127.0.0.1:PORT of the server inside, when it is one

    def state(self) -> dict:
        return inspect("container", self.name)["State"]

    def running(self) -> bool:
        return self.state()["Running"]

    def health(self) -> str:
        """Docker's HEALTHCHECK status: starting, healthy, unhealthy ('' without one)."""
        return (self.state().get("Health") or {}).get("Status", "")

    def restart_count(self) -> int:
        return inspect("container", self.name)["RestartCount"]

    def serves(self) -> bool:
        """GET /health answers 200 from the server inside."""
        try:
            return requests.get(self.url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, timeout: float = 300) -> float:
        """Seconds until the server answers /health 200; a container that exits (and is not
        being restarted) is an error, with its log."""
        start = time.monotonic()

        def ready() -> bool:
            state = self.state()
            if not state["Running"] and not state["Restarting"] and state["Status"] != "created":
                raise DockerError(f"{self.name} exited with {state['ExitCode']} while starting:"
                                  f"\n{self.logs(tail=40)}")
            return self.serves()
        wait_for(ready, timeout, f"{self.name} serving /health")
        return time.monotonic() - start

    def wait_healthy(self, timeout: float = 300) -> float:
        """Seconds until Docker's own HEALTHCHECK reports the container healthy."""
        start = time.monotonic()
        wait_for(lambda: self.health() == "healthy", timeout, f"{self.name} healthy (docker)",
                 interval=0.5)
        return time.monotonic() - start

    def logs(self, tail: int | None = None) -> str:
        args = ["logs"] + (["--tail", str(tail)] if tail else []) + [self.name]
        run = docker(*args, check=False)
        return (run.stdout + run.stderr).decode(errors="replace")

    def exec(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return docker("exec", self.name, *cmd, timeout=timeout, check=False)

    def python(self, code: str, timeout: float = 60) -> str:
        """Run `code` with the image's Python inside the container; its stdout."""
        run = self.exec("python", "-c", code, timeout=timeout)
        if run.returncode:
            raise DockerError(f"python in {self.name}: {run.stderr.decode(errors='replace')}")
        return run.stdout.decode()

    def remove(self) -> None:
        docker("rm", "-f", "-v", self.name, check=False, timeout=120)


def run_server(name: str, image: str, port: int, *options: str,
               env: dict[str, str] | None = None) -> Container:
    """`docker run -d` of a server image on the host network, on 127.0.0.1:port, with the
    read-only root, /tmp and decision-cache volume a deployment uses (compose.yaml)."""
    env = {"RADIODIFF_HOST": LOOPBACK, "RADIODIFF_PORT": str(port), "RADIODIFF_THREADS": "1",
           **(env or {})}
    flags = [f"--env={k}={v}" for k, v in env.items()]
    docker("rm", "-f", "-v", PREFIX + name, check=False)
    docker("run", "-d", "--name", PREFIX + name, "--network", "host", "--read-only",
           "--tmpfs", "/tmp", *flags, *options, image)
    return Container(PREFIX + name, f"http://{LOOPBACK}:{port}")
