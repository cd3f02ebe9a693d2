"""A `python -m server` process on loopback for the LDM to decode through, and its client."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import requests

from server.client import Client

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedVAE:
    """A `python -m server --model MODEL` process (default inference path, so decodes are the
    fp32 network's) and its Client; `decode` starts the server again if it died (a shared
    machine may kill it) and retries once."""

    def __init__(self, model: str, log: Path, threads: int = 1, ready_within: float = 600.0):
        self.model, self.log, self.threads, self.ready_within = model, log, threads, ready_within
        self.proc: subprocess.Popen | None = None
        self.client: Client | None = None
        self.restarts = 0

    def start(self) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "server", "--model", self.model, "--host", "127.0.0.1",
               "--port", str(port), "--threads", str(self.threads), "--path", "default",
               "--log-level", "warning"]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.client = Client(f"http://127.0.0.1:{port}", timeout=600.0)
        deadline = time.monotonic() + self.ready_within
        while not self.client.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start (see {self.log})")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def decode(self, latents: np.ndarray, scaled: bool) -> np.ndarray:
        try:
            return self.client.decode(latents, scaled=scaled)
        except requests.ConnectionError:
            if self.proc is None or self.proc.poll() is None:
                raise
            self.restarts += 1
            self.start()
            return self.client.decode(latents, scaled=scaled)


@contextmanager
def server_process(model: str, log: Path, threads: int = 1,
                   ready_within: float = 600.0) -> Iterator[ServedVAE]:
    """Start the server, wait until /health answers, yield it; stop it afterwards."""
    served = ServedVAE(model, log, threads, ready_within)
    try:
        served.start()
        yield served
    finally:
        served.stop()
