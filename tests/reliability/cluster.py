"""Real server replicas and a real nginx on loopback, for the reliability suite.

A `Replica` is one `python -m server` process group (main, HTTP and inference processes) on
127.0.0.1; it can be killed whole (what a crashed container looks like), sent SIGTERM on its
main process (what `docker stop` does), and started again on the same port. `Nginx` runs
deploy/nginx.conf itself with only the replica addresses, the listen address and the scratch
paths moved, so the suite tests the shipped balancer settings.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml

from tests.processes import group_pids
from tests.reliability.load import Call

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
PAGE = os.sysconf("SC_PAGE_SIZE")
LOOPBACK = "127.0.0.1"
UPSTREAM = re.compile(r"^(\s*server )(\S+)( max_fails=)", re.M)  # nginx.conf's replicas


def compose_replica_env() -> dict[str, str]:
    """The RADIODIFF_* environment of deploy/compose.yaml's replicas."""
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    return compose["services"]["replica-0"]["environment"]


def compose_server_args() -> list[str]:
    """deploy/compose.yaml's replica settings as command-line options, except model, device,
    host and port, which the suite sets itself."""
    args = []
    for name, value in compose_replica_env().items():
        option = name.removeprefix("RADIODIFF_").lower().replace("_", "-")
        if option not in ("model", "device", "host", "port"):
            args += [f"--{option}", str(value)]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of `pids`, summed."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError):
            pass
    return total


def _wait(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


class Replica:
    """One server process group on 127.0.0.1:port, serving `model` with the torch backend."""

    def __init__(self, name: str, model: Path, port: int, workdir: Path, *args: str):
        self.name, self.model, self.port, self.args = name, model, port, args
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "server", "--model", str(self.model), "--backend", "torch",
               "--device", "cpu", "--host", LOOPBACK, "--port", str(self.port),
               "--log-level", "warning", *self.args]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def healthy(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def wait_healthy(self, timeout: float = 180) -> float:
        """Seconds until GET /health says ready; a replica that exits instead is an error."""
        start = time.monotonic()

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while "
                                   f"starting:\n{self.log_tail()}")
            return self.healthy()
        _wait(ready, timeout, f"{self.name} healthy", interval=0.25)
        return time.monotonic() - start

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        return group_pids(self.proc.pid) if self.proc else []

    def rss(self) -> int:
        return rss_bytes(self.pids())

    def kill(self) -> None:
        """SIGKILL to every process of the replica at once: a crashed container."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        _wait(lambda: not self.pids(), 30, f"{self.name} processes gone after SIGKILL")

    def terminate(self) -> None:
        """SIGTERM to the main process only, as `docker stop` (through tini) delivers it."""
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Teardown: SIGTERM, then SIGKILL for whatever is left after 30 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.pids():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Nginx:
    """deploy/nginx.conf in front of `replicas`, listening on 127.0.0.1:port."""

    TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

    def __init__(self, replicas: list[Replica], port: int, workdir: Path):
        if not shutil.which("nginx"):
            raise RuntimeError("nginx is not installed: apt-get install -y nginx-light")
        self.replicas, self.port, self.dir = replicas, port, workdir
        self.log_path = workdir / "access.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def render(self) -> str:
        """The shipped config with loopback addresses and scratch paths in this test's folder."""
        text = NGINX_CONF.read_text()
        upstreams = len(UPSTREAM.findall(text))
        if upstreams != len(self.replicas):
            raise AssertionError(f"deploy/nginx.conf names {upstreams} upstream servers, the "
                                 f"suite runs {len(self.replicas)} replicas")
        addresses = iter(replica.address for replica in self.replicas)
        text = UPSTREAM.sub(lambda m: m.group(1) + next(addresses) + m.group(3), text)
        text = _replace_once(text, "listen 8080;", f"listen {LOOPBACK}:{self.port};")
        temp = "".join(f"    {kind}_temp_path {self.dir / kind};\n" for kind in self.TEMP_DIRS)
        return _replace_once(text, "http {\n", "http {\n" + temp)

    def start(self) -> None:
        conf = self.dir / "nginx.conf"
        conf.write_text(self.render())
        cmd = ["nginx", "-e", "stderr", "-p", str(self.dir), "-c", str(conf),
               "-g", f"daemon off; pid {self.dir / 'nginx.pid'};"]
        check = subprocess.run([*cmd[:-2], "-t"], capture_output=True, text=True, timeout=30)
        if check.returncode:
            raise RuntimeError(f"nginx -t rejects the rendered deploy/nginx.conf:\n{check.stderr}")
        with open(self.log_path, "ab") as log, open(self.dir / "error.log", "ab") as err:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=err, start_new_session=True)

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.dir / 'error.log').read_text()}")
            with socket.socket() as s:
                return s.connect_ex((LOOPBACK, self.port)) == 0
        _wait(listening, 30, "nginx listening")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def access_log(self, since: int = 0) -> list[dict[str, str]]:
        """Access-log entries (the `upstream` log_format) written after byte offset `since`."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            return parse_access_log(f.read().decode(errors="replace"))


ACCESS_LINE = re.compile(r'"(?P<request>[^"]*)" (?P<status>\d+) .*upstream=(?P<upstream>.*) '
                         r'ustatus=(?P<ustatus>.*) urt=')


def parse_access_log(text: str) -> list[dict[str, str]]:
    """Entries of nginx.conf's `upstream` log_format: request, status, upstream (`A, B` when
    nginx tried A, then B), ustatus; other lines (nginx's own messages) are skipped."""
    return [m.groupdict() for line in text.splitlines() if (m := ACCESS_LINE.search(line))]


@dataclass
class Cluster:
    """The replicas, the nginx in front of them, and the request mix with its answers."""
    replicas: list[Replica]
    nginx: Nginx
    calls: list[Call]

    def restore(self) -> None:
        """Every replica running and healthy again (after a test that stopped one)."""
        for replica in self.replicas:
            if not replica.running():
                replica.start()
        for replica in self.replicas:
            replica.wait_healthy()


def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise AssertionError(f"deploy/nginx.conf changed: expected {old!r} exactly once")
    return text.replace(old, new)
