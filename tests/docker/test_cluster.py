"""deploy/compose.yaml brought up for real: two replica containers of the CPU image and the
nginx container, on the host network, with the project's nginx.conf; then, under a bounded
stream of requests through nginx (tests/reliability/load.py: every answer checked against a
reference), `docker kill` of a replica, `docker stop` of one with a batch in flight, and kill -9
of a replica's HTTP process, which Docker's restart policy must bring back into rotation.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

from model.io import encode_npy
from tests.docker.engine import (ROOT, Container, DockerError, docker, port_in_use,
                                 wait_for)
from tests.reliability.cluster import parse_access_log
from tests.reliability.load import BackgroundLoad, Call, as_array, check, make_calls, post

pytestmark = pytest.mark.docker

PROJECT = "radiodiff-test"
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
REPLICA_PORTS, NGINX_PORT = (8001, 8002), 8080  # compose.yaml and nginx.conf
CLIENTS, TOTAL, DURATION = 4, 120, 240.0
BACK_IN_BOUND = 10 + 20  # nginx's fail_timeout, plus margin
STOP_BOUND = 20  # compose.yaml's stop_grace_period: SIGKILL after it
LOGS = Path(tempfile.gettempdir()) / "radiodiff-docker-logs"  # the containers' logs, at the end


def compose_command() -> list[str] | None:
    """Compose v1 (docker-compose, Debian's package) or the v2 plugin, whichever is here."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if docker("compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    return None


@dataclass
class Cluster:
    compose: list[str]
    replicas: list[Container]
    nginx: Container
    calls: list[Call]

    def log_offset(self) -> int:
        return len(self.access_log())

    def access_log(self, since: int = 0) -> list[dict[str, str]]:
        """nginx's access log (its container's stdout), entries after the first `since`."""
        out = docker("logs", self.nginx.name).stdout.decode(errors="replace")
        return parse_access_log(out)[since:]

    def restore(self) -> None:
        """Every replica running and serving (after a test that stopped one)."""
        for replica in self.replicas:
            if not replica.running() and not replica.state()["Restarting"]:
                docker("start", replica.name)
        for replica in self.replicas:
            replica.wait_ready()


def compose(cmd: list[str], *args: str, timeout: float = 600) -> str:
    env = {**os.environ, "RADIODIFF_IMAGE": "radiodiff-vae:cpu",
           "RADIODIFF_NGINX_IMAGE": "radiodiff-nginx"}
    run = subprocess.run([*cmd, "-p", PROJECT, "-f", str(COMPOSE_FILE), *args], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if run.returncode:
        raise DockerError(f"{' '.join(cmd)} {' '.join(args)}: exit {run.returncode}:\n"
                          f"{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    return run.stdout


@pytest.fixture(scope="module")
def cluster(cpu_image, nginx_image, figures):
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither docker-compose nor the compose plugin is installed "
                    "(make test-docker installs docker-compose when run as root)")
    busy = [p for p in (*REPLICA_PORTS, NGINX_PORT) if port_in_use(p)]
    if busy:
        pytest.fail(f"ports {busy} on 127.0.0.1 are in use; deploy/compose.yaml needs "
                    f"{REPLICA_PORTS} and {NGINX_PORT}")
    version = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True)
    start = time.monotonic()
    try:
        compose(cmd, "up", "-d", "--no-build")  # waits for the replicas' health checks
        up = time.monotonic() - start
        ids = {s: compose(cmd, "ps", "-q", s).strip() for s in ("replica-0", "replica-1", "nginx")}
        replicas = [Container(ids[f"replica-{i}"], f"http://127.0.0.1:{port}")
                    for i, port in enumerate(REPLICA_PORTS)]
        nginx = Container(ids["nginx"], f"http://127.0.0.1:{NGINX_PORT}")
        wait_for(nginx.serves, 60, "nginx answering /health")
        networks = docker("network", "ls", "--format", "{{.Name}}").stdout.decode().split()
        assert not [n for n in networks if n.startswith(PROJECT)], networks  # host network only
        figures.append(f"compose ({' '.join(cmd)} {version.stdout.strip()}): 2 replicas healthy "
                       f"(docker HEALTHCHECK) and nginx up {up:.1f} s after `up -d`")
        yield Cluster(cmd, replicas, nginx, make_calls(replicas[0].url))
        figures.append("peak memory of each replica container since its last start (cgroup): "
                       + ", ".join(f"{peak_mib(r)} MiB" for r in replicas))
    finally:
        LOGS.mkdir(exist_ok=True)
        for service in ("replica-0", "replica-1", "nginx"):
            (LOGS / f"{service}.log").write_text(
                subprocess.run([*cmd, "-p", PROJECT, "-f", str(COMPOSE_FILE), "logs", "--no-color",
                                service], capture_output=True, text=True).stdout)
        compose(cmd, "down", "-v", "-t", str(STOP_BOUND))


PEAK = ("from pathlib import Path\n"  # the container's cgroup, v2 or v1
        "for f in ('memory.peak', 'memory/memory.max_usage_in_bytes'):\n"
        "    p = Path('/sys/fs/cgroup', f)\n"
        "    if p.exists(): print(p.read_text().strip()); break\n")


def peak_mib(container: Container) -> int:
    """The container's peak memory since it (re)started, MiB ('' where the kernel keeps none)."""
    out = container.python(PEAK).strip()
    return int(out) >> 20 if out else -1


@pytest.fixture
def restored(cluster) -> Cluster:
    cluster.restore()
    yield cluster
    cluster.restore()


def rejoin(cluster: Cluster, replica: Container) -> str:
    """Once `replica` serves again, nginx must send it requests within BACK_IN_BOUND."""
    ready = replica.wait_ready()
    address = replica.url.removeprefix("http://")
    offset, start = cluster.log_offset(), time.monotonic()
    call = cluster.calls[0]
    with requests.Session() as s:
        while address not in {e["upstream"] for e in cluster.access_log(offset)}:
            assert check(call, post(s, cluster.nginx.url + call.endpoint, call.body)) is None
            assert time.monotonic() - start < BACK_IN_BOUND, (
                f"{replica.name} serves but nginx gave it no traffic for {BACK_IN_BOUND} s")
            time.sleep(0.2)
    return f"serving {ready:.1f} s later, back in nginx's rotation {time.monotonic() - start:.1f} s after"


def resent(entries: list[dict[str, str]]) -> int:
    """Requests nginx passed to a second replica (`upstream=A, B` in its log)."""
    return sum("," in e["upstream"] for e in entries)


def lost_with(replica: Container, entries: list[dict[str, str]]) -> int:
    """Requests nginx had passed to `replica` when it died and answered 502: nginx.conf never
    resends a request a replica may have started (no replay of a request that may have killed
    it), so these reach the client."""
    address = replica.url.removeprefix("http://")
    return sum(e["status"] == "502" and e["upstream"] == address for e in entries)


def check_failures(stats, lost: int) -> None:
    """The only failures are the 502s of requests in flight on the replica that died."""
    assert all(": HTTP 502: " in f for f in stats.failures), stats.failures[:5]
    assert len(stats.failures) == lost <= CLIENTS, (lost, stats.failures[:5])


@pytest.mark.smoke
def test_one_request_through_nginx(cluster):
    call = cluster.calls[1]
    with requests.Session() as s:
        assert check(call, post(s, cluster.nginx.url + call.endpoint, call.body)) is None
    r = requests.get(cluster.nginx.url + "/metrics", timeout=10)
    assert r.status_code == 404 and "scrape each replica" in r.text  # nginx.conf's own answer


@pytest.mark.smoke
def test_docker_kill_of_a_replica_under_load_costs_no_request(restored, figures):
    victim = restored.replicas[0]
    offset = restored.log_offset()
    with BackgroundLoad(restored.nginx.url, restored.calls, CLIENTS, TOTAL, DURATION) as load:
        load.wait_done(TOTAL // 4)
        docker("kill", victim.name)
        at = len(load.stats.latencies)
    stats, entries = load.stats, restored.access_log(offset)
    lost = lost_with(victim, entries)
    figures.append(f"docker kill of replica-0 after {at} answers: {stats.summary()}; "
                   f"{resent(entries)} resent by nginx to the other replica; client failures: "
                   f"{len(stats.failures)}, all 502s of requests in flight on the killed replica "
                   f"({lost} in nginx's log)")
    assert stats.sent == TOTAL
    check_failures(stats, lost)
    # `docker kill` counts as a manual stop: the restart policy leaves the container down
    time.sleep(2)
    policy = "restarted by the policy" if victim.running() else "left stopped (a manual kill)"
    if not victim.running():
        docker("start", victim.name)
    figures.append(f"  replica-0 {policy}; started again: {rejoin(restored, victim)}")


def heavy_batch(replica: Container, seconds: float) -> np.ndarray:
    """256x256 maps for a /reconstruct that runs about `seconds` on `replica` (its measured
    speed, GET /info), within its request budget."""
    budget = requests.get(replica.url + "/info", timeout=30).json()["budget"]
    endpoint = budget["endpoints"]["/reconstruct"]
    per_map = 256 * 256 / 1e6
    maps = int(min(seconds / (endpoint["seconds_per_megapixel"] * per_map),
                   0.9 * endpoint["budget_megapixels"] / per_map, 64))
    assert maps >= 1, budget
    return np.random.default_rng(1).random((maps, 1, 256, 256), dtype=np.float32)


def test_docker_stop_drains_in_flight_work(restored, figures):
    victim = restored.replicas[0]
    batch = heavy_batch(victim, 4.0)
    answer: dict = {}

    def in_flight() -> None:  # straight to the victim: nginx cannot resend it elsewhere
        r = requests.post(victim.url + "/reconstruct", data=encode_npy(batch),
                          headers={"Content-Type": "application/x-npy"}, timeout=120)
        answer.update(status=r.status_code, body=r.content, done=time.monotonic())

    offset = restored.log_offset()
    with BackgroundLoad(restored.nginx.url, restored.calls, 2, TOTAL, DURATION) as load:
        load.wait_done(TOTAL // 4)
        heavy = threading.Thread(target=in_flight)
        heavy.start()
        time.sleep(0.5)
        sent_at = time.monotonic()
        docker("stop", "-t", str(STOP_BOUND), victim.name, timeout=STOP_BOUND + 30)
        drained = time.monotonic() - sent_at
        heavy.join(60)
    stats, state, entries = load.stats, victim.state(), restored.access_log(offset)
    lost = lost_with(victim, entries)
    figures.append(f"docker stop of replica-0 with a {len(batch)}-map 256x256 /reconstruct in "
                   f"flight: exit {state['ExitCode']} after {drained:.1f} s (drain); the batch: "
                   f"HTTP {answer.get('status')}; load through nginx: {stats.summary()}; "
                   f"{resent(entries)} resent by nginx; client failures: {len(stats.failures)}, "
                   f"502s of requests nginx had passed to the stopping replica ({lost} in its log)")
    assert state["ExitCode"] == 0 and not state["OOMKilled"] and drained < STOP_BOUND
    assert answer.get("status") == 200 and answer["done"] > sent_at, answer.get("status")
    assert as_array(answer["body"]).shape == batch.shape
    assert stats.sent == TOTAL
    check_failures(stats, lost)
    docker("start", victim.name)
    figures.append(f"  started again: {rejoin(restored, victim)}")


HTTP_PROCESS = """
import os, sys
port = int(sys.argv[1])
inodes = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        f = line.split()
        if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":  # LISTEN
            inodes.add(f"socket:[{f[9]}]")
found = []
for pid in (p for p in os.listdir("/proc") if p.isdigit()):
    ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    try:
        fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        continue
    # the main process (tini's child) and the queue manager (forked from it) hold the socket
    # too; the HTTP process is the one running uvicorn's event loop
    if fds & inodes and ppid != 1 and "uvloop" in open(f"/proc/{pid}/maps").read():
        found.append(int(pid))
print(" ".join(map(str, found)))
"""


def test_kill_9_of_a_replicas_http_process_restarts_the_container(restored, figures):
    """The HTTP process dies: the server exits 1, Docker's restart policy starts the container
    again, and nginx sends it traffic once it serves. Requests that the dead process held are
    lost (nginx resends a POST only when it never reached the replica)."""
    victim = restored.replicas[1]
    port = victim.url.rsplit(":", 1)[1]
    pids = victim.python(HTTP_PROCESS.replace("sys.argv[1]", port)).split()
    assert len(pids) == 1, f"HTTP processes listening on {port}: {pids}"
    restarts = victim.restart_count()
    offset = restored.log_offset()
    with BackgroundLoad(restored.nginx.url, restored.calls, CLIENTS, TOTAL, DURATION) as load:
        load.wait_done(TOTAL // 4)
        killed = victim.exec("python", "-c", f"import os; os.kill({pids[0]}, 9)")
        assert killed.returncode == 0, killed.stderr
        at, start = len(load.stats.latencies), time.monotonic()
        wait_for(lambda: victim.restart_count() > restarts, 60, "Docker restarting replica-1")
        restarted = time.monotonic() - start
    stats, entries = load.stats, restored.access_log(offset)
    lost = lost_with(victim, entries)
    figures.append(f"kill -9 of replica-1's HTTP process (pid {pids[0]} in the container) after "
                   f"{at} answers: the server exited 1 and Docker restarted the container "
                   f"{restarted:.1f} s later; load: {stats.summary()}; {resent(entries)} resent by"
                   f" nginx; client failures: {len(stats.failures)}, all 502s of requests the "
                   f"dead process held ({lost} in nginx's log)")
    assert stats.sent == TOTAL
    check_failures(stats, lost)
    assert re.search(r"HTTP process pid \d+ died", victim.logs()), victim.logs(tail=30)
    figures.append(f"  {rejoin(restored, victim)}")
