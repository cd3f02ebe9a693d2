"""The Kubernetes manifests (deploy/k8s/), checked offline.

Every manifest is validated against pinned Kubernetes versions' OpenAPI schemas (strict: an
unknown or misspelt field fails), which kubernetes-validate ships, so no cluster or network is
needed. The rest ties the manifests to the code they deploy: probes on routes the server
really registers, a grace period longer than the server's bounded shutdown, the image's
non-root user, and an HPA, PDB and Service that select the Deployment's pods.
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate  # the dev extra
import pytest
import yaml
from fastapi import FastAPI

from server import metrics
from server.app import WORKER_STOP_TIMEOUT, RadioDiffServer
from server.protocol import OPERATIONS
from server.settings import Settings
from tests.test_docker import DOCKERFILE, _env_settings, image_env

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
# The oldest version the manifests support (the preStop `sleep` action is on by default from
# 1.30) and the newest whose schema kubernetes-validate 1.37 ships.
KUBERNETES_VERSIONS = ("1.30", "1.37")
MANIFESTS = sorted(K8S.glob("*.yaml")) + sorted((K8S / "gpu").glob("*.yaml"))
CPU, GPU = K8S / "deployment.yaml", K8S / "gpu" / "deployment.yaml"
ADAPTER = K8S / "metrics" / "prometheus-adapter-values.yaml"
POD = "spec.template.spec"  # the pod template's spec, as a dotted path


def load(path: Path) -> dict:
    """The one Kubernetes object a manifest file holds."""
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return doc


def objects() -> dict[str, dict]:
    """The objects `kubectl apply -f deploy/k8s/` creates, by kind."""
    found = [load(p) for p in sorted(K8S.glob("*.yaml"))]
    assert len({d["kind"] for d in found}) == len(found), "one object of each kind"
    return {d["kind"]: d for d in found}


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict) -> dict:
    (server,) = pod_spec(deployment)["containers"]
    return server


def env(deployment: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment)["env"]}


def variant(deployment: dict) -> str:
    """The image variant the Deployment runs: the tag scripts/docker-build.sh gives it."""
    image = container(deployment)["image"]
    assert image in ("radiodiff-vae:cpu", "radiodiff-vae:gpu"), image
    return image.rsplit(":", 1)[1]


def settings(deployment: dict) -> Settings:
    """The server's settings as the pod's RADIODIFF_* variables (over the image's) give them."""
    return _env_settings({**image_env(variant(deployment)), **env(deployment)})


def get_routes() -> set[str]:
    """The GET routes the server registers besides the model endpoints (/health, ...)."""
    async def noop() -> None:
        return None

    app = FastAPI()
    fake = SimpleNamespace(app=app, _health=noop, _info=noop, _metrics=noop)
    RadioDiffServer.register_internal_endpoints(fake)
    return {route.path for route in app.routes if "GET" in getattr(route, "methods", ())}


def shutdown_bound(s: Settings) -> float:
    """Worst-case seconds from SIGTERM to exit, step by step as server/app.py bounds them:
    each HTTP process drains (+2 s, then a kill and 1 s), each inference process gets
    WORKER_STOP_TIMEOUT (then a kill and 1 s), the worker supervisor thread (poll + 1 s)."""
    workers = len(OPERATIONS) * s.workers_per_device  # one device per replica
    return (s.api_servers * (s.shutdown_timeout + 2 + 1) + workers * (WORKER_STOP_TIMEOUT + 1)
            + 0.5 + 1)


def flat(obj: object, path: str = "") -> dict[str, object]:
    """Leaves of nested dicts / lists by dotted path."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return {path: obj}
    return {k: v for key, value in items
            for k, v in flat(value, f"{path}.{key}".lstrip(".")).items()}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_the_kubernetes_schema(path, version):
    kubernetes_validate.validate(load(path), version, strict=True)


def test_schema_check_is_live():
    """A misspelt probe, and the preStop sleep on a version without it, both fail."""
    bad = load(CPU)
    container(bad)["readinesProbe"] = container(bad).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[0], strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(load(CPU), "1.28", strict=True)


def test_apply_creates_a_deployment_service_pdb_and_hpa():
    assert set(objects()) == {"Deployment", "Service", "PodDisruptionBudget",
                              "HorizontalPodAutoscaler"}


@pytest.mark.parametrize("path", [CPU, GPU], ids=["cpu", "gpu"])
def test_probes_use_real_routes_and_outlast_startup(path):
    dep = load(path)
    server = container(dep)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["http"] == settings(dep).port
    routes = get_routes()
    probes = {k: server[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for name, probe in probes.items():
        assert probe["httpGet"]["path"] in routes and probe["httpGet"]["path"] == "/health", name
        assert probe["httpGet"]["port"] in ports, name
    # startup: at least the image HEALTHCHECK's start period (the full-size model's load)
    start = int(re.search(r"--start-period=(\d+)s", DOCKERFILE).group(1))
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= start
    # liveness: a replica is restarted only after a minute without any answer
    live = probes["livenessProbe"]
    assert live["timeoutSeconds"] >= 5 and live["periodSeconds"] * live["failureThreshold"] >= 60


@pytest.mark.parametrize("path", [CPU, GPU], ids=["cpu", "gpu"])
def test_grace_period_outlasts_the_prestop_sleep_and_the_servers_shutdown(path):
    dep = load(path)
    s = settings(dep)
    assert s.shutdown_timeout == Settings.__dataclass_fields__["shutdown_timeout"].default
    sleep = container(dep)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod_spec(dep)["terminationGracePeriodSeconds"]
    assert grace > sleep + shutdown_bound(s)


@pytest.mark.parametrize("path", [CPU, GPU], ids=["cpu", "gpu"])
def test_runs_as_the_images_non_root_user_on_a_read_only_root(path):
    dep = load(path)
    runtime = DOCKERFILE.split("AS runtime", 1)[1]
    uid, gid = map(int, re.search(r"^USER (\d+):(\d+)$", runtime, re.M).groups())
    pod = pod_spec(dep)["securityContext"]
    assert uid != 0 and pod["runAsNonRoot"] is True
    assert (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid)
    box = container(dep)["securityContext"]
    assert box["readOnlyRootFilesystem"] is True and box["allowPrivilegeEscalation"] is False
    assert box["capabilities"]["drop"] == ["ALL"]
    # what the server writes (metrics files, multiprocessing sockets) goes to /tmp, the
    # decision to the image's RADIODIFF_CACHE_DIR: both writable, kept across restarts
    mounts = {m["mountPath"]: m["name"] for m in container(dep)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    cache = re.search(r"RADIODIFF_CACHE_DIR=(\S+)", DOCKERFILE).group(1)
    assert "emptyDir" in volumes[mounts["/tmp"]] and "emptyDir" in volumes[mounts[cache]]


def test_service_pdb_and_hpa_select_the_deployment():
    found = objects()
    dep = found["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = found["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    names = {p["name"] for p in container(dep)["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= names
    hpa = found["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": dep["apiVersion"], "kind": dep["kind"],
                                     "name": dep["metadata"]["name"]}
    assert "replicas" not in dep["spec"]  # the HPA owns the count
    assert found["PodDisruptionBudget"]["spec"]["maxUnavailable"] < hpa["minReplicas"]


def test_hpa_scales_on_the_servers_in_flight_gauge_through_the_adapter_rule():
    (family,) = metrics.IN_FLIGHT.describe()
    assert family.type == "gauge"
    (metric,) = objects()["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == family.name
    (rule,) = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    assert rule["name"]["as"] == family.name and family.name in rule["seriesQuery"]
    endpoints = re.search(r'endpoint=~"([^"]+)"', rule["metricsQuery"]).group(1).split("|")
    assert set(endpoints) == {op.path for op in OPERATIONS.values()}  # not /health, /metrics


def test_gpu_variant_differs_only_where_a_gpu_needs_it():
    cpu, gpu = load(CPU), load(GPU)
    assert env(gpu) == {**env(cpu), "RADIODIFF_DEVICE": "cuda"}
    assert settings(gpu).device == "cuda" and settings(cpu).device == "cpu"
    assert (variant(cpu), variant(gpu)) == ("cpu", "gpu")
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in str(container(cpu)["resources"])
    allowed = ("spec.strategy", f"{POD}.tolerations", f"{POD}.containers.0.resources",
               f"{POD}.containers.0.env", f"{POD}.containers.0.image")
    a, b = flat(cpu), flat(gpu)
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert differ and all(k.startswith(allowed) for k in differ), sorted(differ)
