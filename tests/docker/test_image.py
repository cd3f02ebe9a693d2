"""The CPU image, built and run for real: its size and content, PID 1 and users, Docker's
health check, every curl example of docs/server.md against a container serving the bundled
`reference` model, and a restart that reads the recorded inference-path decision from its
volume instead of measuring again. The GPU image, when built here: its content (no GPU runs it).
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from PIL import Image

from tests.docker.conftest import gb, mask_numbers
from tests.docker.engine import ROOT, Container, docker, free_port, inspect, run_server

pytestmark = pytest.mark.docker

SIZE_GOAL = 1.5e9  # bytes: the CPU image's goal (issue 25)
API_KEY = "secret"  # docs/server.md's examples send it
CONTENT = """
import importlib.metadata as md, json, torch
names = sorted(d.metadata["Name"].lower() for d in md.distributions())
ort = [n for n in names if n.startswith("onnxruntime")]
providers = __import__("onnxruntime").get_available_providers() if ort else []
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "onnxruntime": ort,
                  "providers": providers, "nvidia": [n for n in names if n.startswith("nvidia")],
                  "pip": "pip" in names}))
"""
PROCESSES = """
import json, os
found = []
for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
    try:
        status = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status").read().splitlines())
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode().strip()
    except OSError:
        continue
    found.append({"pid": pid, "uid": status["Uid"].split()[0], "state": status["State"].split()[0],
                  "cmd": cmd})
print(json.dumps(found))
"""


def image_content(image: str) -> dict:
    run = docker("run", "--rm", "--network", "host", "--entrypoint", "python", image, "-c",
                 CONTENT, timeout=300)
    return json.loads(run.stdout)


def test_cpu_image_is_small_non_root_and_holds_the_cpu_torch(cpu_image, figures):
    image = inspect("image", cpu_image)
    config = image["Config"]
    content = image_content(cpu_image)
    layers = len(image["RootFS"]["Layers"])
    figures.append(f"{cpu_image}: {gb(image['Size'])} ({layers} layers), torch "
                   f"{content['torch']}, {', '.join(content['onnxruntime'])}")
    assert image["Size"] <= SIZE_GOAL, f"{gb(image['Size'])} > the 1.5 GB goal"
    assert content["cuda"] is None and not content["nvidia"], content
    assert content["onnxruntime"] == ["onnxruntime"], content  # never both flavours
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["tini", "--", "python", "-m", "server"]
    assert config["Healthcheck"]["Test"] == ["CMD", "python", "/app/healthcheck.py"]
    assert config["StopSignal"] == "SIGTERM"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["RADIODIFF_DEVICE"] == "cpu" and env["RADIODIFF_MODEL"] == "reference"
    assert env["RADIODIFF_CACHE_DIR"] == "/var/cache/radiodiff-vae"


def test_the_gpu_image_holds_cuda_builds_and_refuses_to_run_without_a_gpu(gpu_image, figures):
    """Built here from the package index; no GPU here, so it is never run on one."""
    image = inspect("image", gpu_image)
    content = image_content(gpu_image)
    figures.append(f"{gpu_image}: {gb(image['Size'])}, torch {content['torch']} (CUDA "
                   f"{content['cuda']}), {', '.join(content['onnxruntime'])}, providers "
                   f"{content['providers']}; not run on a GPU (none here)")
    assert content["cuda"] and content["onnxruntime"] == ["onnxruntime-gpu"], content
    assert "CUDAExecutionProvider" in content["providers"]
    assert image["Config"]["User"] == "10001:10001"
    env = dict(item.split("=", 1) for item in image["Config"]["Env"])
    assert env["RADIODIFF_DEVICE"] == "cuda"
    # RADIODIFF_DEVICE=cuda: no silent fallback to CPU on a machine without a GPU
    run = docker("run", "--rm", "--network", "host", "-e", f"RADIODIFF_PORT={free_port()}",
                 "-e", "RADIODIFF_HOST=127.0.0.1", gpu_image, check=False, timeout=300)
    log = (run.stdout + run.stderr).decode(errors="replace")
    assert run.returncode != 0 and "torch sees no CUDA device" in log, log[-2000:]


@pytest.fixture(scope="module")
def server(cpu_image, cache_volume, figures) -> Container:
    """The CPU image serving `reference` with an API key, its decision cache on a fresh volume."""
    started = time.monotonic()
    container = run_server(
        "api", cpu_image, free_port(), "-v", f"{cache_volume}:/var/cache/radiodiff-vae",
        env={"RADIODIFF_API_KEY": API_KEY, "RADIODIFF_API_KEY_ENV": "RADIODIFF_API_KEY"})
    try:
        container.wait_ready()
        ready = time.monotonic() - started
        figures.append(f"docker run (reference model, empty decision volume): /health 200 after "
                       f"{ready:.1f} s")
        yield container
    finally:
        container.remove()


def info(container: Container) -> dict:
    r = requests.get(container.url + "/info", headers={"X-API-Key": API_KEY}, timeout=30)
    r.raise_for_status()
    return r.json()


def processes(container: Container) -> list[dict]:
    return json.loads(container.python(PROCESSES))


def test_tini_is_pid_1_and_every_process_runs_as_10001(server):
    found = processes(server)
    assert found[0]["pid"] == 1 and found[0]["cmd"] == "tini -- python -m server", found[0]
    assert {p["uid"] for p in found} == {"10001"}, found
    assert len([p for p in found if "python" in p["cmd"]]) >= 5  # main, HTTP, 3 workers (+ ...)


def test_dockers_health_check_turns_healthy(server, figures):
    waited = server.wait_healthy(timeout=120)
    figures.append(f"docker HEALTHCHECK: healthy {waited:.1f} s after /health turned 200 "
                   "(probe every 10 s)")


def doc_examples() -> list[tuple[str, list[str]]]:
    """(command, documented output lines) of each `$ ` line in docs/server.md's curl block."""
    text = (ROOT / "docs" / "server.md").read_text()
    section = text.split("### curl, one example per endpoint", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```bash\n")[1:]]
    block = next((b for b in blocks if b.startswith("$ ")), "")
    examples: list[tuple[str, list[str]]] = []
    lines = iter(block.splitlines())
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                command = command[:-1].rstrip() + " " + next(lines).strip()
            examples.append((command, []))
        elif examples and line.strip():
            examples[-1][1].append(line)
    return examples


def write_inputs(folder) -> None:
    """map.png (256x256, 8-bit) and maps.npy ([2, 1, 256, 256] float32), as the examples use."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8), "L").save(folder / "map.png")
    np.save(folder / "maps.npy", rng.random((2, 1, 256, 256), dtype=np.float32))


def test_every_curl_example_of_docs_server_md(server, tmp_path, figures):
    """Run in order on a fresh container, so even the metrics counts are the documented ones;
    /info's numbers are the model's (the docs ran a tiny model), so only they may differ."""
    write_inputs(tmp_path)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    examples = doc_examples()
    assert len(examples) >= 15, "the curl block of docs/server.md was not found"
    for command, documented in examples:
        shell = command.replace("localhost:8000", server.url.removeprefix("http://"))
        run = subprocess.run(["bash", "-c", shell], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, f"{command}: exit {run.returncode}: {run.stderr}"
        got = run.stdout.strip().splitlines()
        if "/metrics" in command:  # the documented lines are among the metrics; `...`: more
            missing = [line for line in documented if line != "..." and line not in got]
            assert not missing, f"{command}: {missing} not in {got}"
        elif "/info" in command:
            assert [mask_numbers(x) for x in got] == [mask_numbers(x) for x in documented], (
                command, got)
        else:
            assert got == documented, f"{command}\n documented: {documented}\n got: {got}"
    figures.append(f"docs/server.md: all {len(examples)} curl examples gave the documented "
                   "output against the container")


def test_a_restarted_container_reads_its_decision_instead_of_measuring(server, figures):
    before = info(server)["workers"]
    # on the empty volume one worker measured (under the lock), the others read its decision
    assert not all(w["decision"]["read_from_file"] for w in before), before
    measured = max(w["decision"]["seconds"] for w in before)
    start = time.monotonic()
    docker("stop", server.name, timeout=60)  # SIGTERM: drain, then every process ends
    stopped = time.monotonic() - start
    state = server.state()
    assert state["ExitCode"] == 0, server.logs(tail=30)
    start = time.monotonic()
    docker("start", server.name)
    ready = server.wait_ready()
    after = info(server)["workers"]
    figures.append(f"docker stop (idle): exit 0 after {stopped:.1f} s; docker start: /health 200 "
                   f"after {ready:.1f} s, decision read from the volume (first start measured "
                   f"{measured:.1f} s)")
    assert after and all(w["decision"]["read_from_file"] for w in after), after
    assert all(w["decision"]["seconds"] == 0 for w in after)
    assert all(w["decision"]["paths"] == b["decision"]["paths"]
               for w, b in zip(after, before))


def test_bad_configuration_stops_the_container_with_a_clear_message(cpu_image):
    run = docker("run", "--rm", "--network", "host", "-e", "RADIODIFF_MAX_BATCH_SIZE=lots",
                 "-e", f"RADIODIFF_PORT={free_port()}", cpu_image, check=False, timeout=120)
    log = (run.stdout + run.stderr).decode(errors="replace")
    assert run.returncode == 2 and "RADIODIFF_MAX_BATCH_SIZE" in log, log[-1500:]


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_the_image_needs_no_writable_root(server):
    """The server runs on a read-only root (docker run --read-only, as Kubernetes does): only
    /tmp (tmpfs) and the decision volume are writable, and it still serves."""
    assert inspect("container", server.name)["HostConfig"]["ReadonlyRootfs"]
    body = png_bytes(np.zeros((64, 64), np.uint8))
    r = requests.post(server.url + "/reconstruct", data=body, timeout=60,
                      headers={"Content-Type": "image/png", "X-API-Key": API_KEY})
    assert r.status_code == 200, r.text
    assert re.search(r"Read-only file system", server.logs()) is None
