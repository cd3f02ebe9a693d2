"""The real server (`python -m server`, tiny model, CPU) over real HTTP, started once per module.

The last test sends SIGTERM and checks that every process of the server ends: keep it last.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from model.autoencoder import AutoencoderKL
from model.checkpoint import save_checkpoint
from model.config import to_dict
from model.distributions import DiagonalGaussianDistribution
from model.io import decode_png, encode_npy, encode_png, from_model, to_model
from model.loading import load
from server.budget import Budget
from server.client import Client, ServerError
from tests.conftest import stop_later, tiny_model_config
from tests.processes import group_pids, wait_group_gone

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parent.parent
# Servers started by the tests cache their measured inference path here, not in the user's
# cache: one measurement per model and size per test run (runtime/autotune.py).
AUTOTUNE_CACHE = Path(tempfile.gettempdir()) / f"radiodiff-test-autotune-{os.getpid()}"
KEY = "test-key-123"
NPY, PNG, JSON = "application/x-npy", "image/png", "application/json"
ATOL = 1e-4  # the server's CPU path (Winograd convolutions) re-associates fp32 sums
MAX_PIXELS = 128 * 128
MAX_MAPS = 8
MAX_COST = 0.1  # --max-request-cost, megapixels: 6 maps of 128x128 fit, 8 do not


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    model: AutoencoderKL
    log: Path

    def post(self, path, body=b"", content_type=NPY, accept=None, params=None, key=KEY,
             headers=None):
        h = {"Content-Type": content_type, **({"X-API-Key": key} if key else {})}
        if accept:
            h["Accept"] = accept
        return requests.post(self.url + path, data=body, params=params,
                             headers={**h, **(headers or {})}, timeout=60)

    def metrics(self) -> dict[str, float]:
        text = requests.get(self.url + "/metrics", timeout=30).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    ckpt = save_tiny_checkpoint(root)
    env = {"RADIODIFF_TEST_KEY": KEY, "RADIODIFF_BATCH_TIMEOUT": "0.05",
           "RADIODIFF_MAX_REQUEST_MAPS": str(MAX_MAPS)}
    args = ["--api-key-env", "RADIODIFF_TEST_KEY", "--max-body-mb", "1",
            "--max-pixels", str(MAX_PIXELS), "--max-batch-size", "8",
            "--max-request-cost", str(MAX_COST)]
    with running_server(root, args, env) as (url, port, proc, log):
        yield Server(url, port, proc, load(ckpt).model, log)


def save_tiny_checkpoint(root: Path) -> Path:
    """The tiny test model, untrained (seed 0), as root/model-0.pt."""
    torch.manual_seed(0)
    net = AutoencoderKL.from_config(tiny_model_config())
    return save_checkpoint(root / "model-0.pt", {"model": net.state_dict(), "step": 0,
                                                 "config": {"model": to_dict(tiny_model_config())}})


@contextmanager
def running_server(model: Path, args: list[str], env: dict[str, str],
                   prefix: tuple[str, ...] = (), path: str = "default"):
    """`python -m server --model model --path path *args` on loopback (one thread per worker),
    run through the command `prefix` if any, ready; yields (url, port, process, log path), and
    stops every process of it afterwards, in the background (tests/conftest.py stop_later: the
    next test need not wait for a graceful shutdown). The default path, not the measured one:
    these tests compare answers with the fp32 network to 1e-4, and the autotuner may pick bf16
    where it is >= 50 dB (tests/test_autotune.py tests `--path auto`)."""
    port, log = _free_port(), model / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RADIODIFF_CACHE_DIR": str(AUTOTUNE_CACHE),
           **env}
    cmd = [*prefix, sys.executable, "-m", "server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--threads", "1", "--log-level", "warning", "--path", path,
           *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server's three workers share the same few cores
    try:
        _wait_ready(url, proc, log)
        yield url, port, proc, log
    finally:
        torch.set_num_threads(threads)
        stop_later(lambda: _stop(proc))


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, up to 30 s for the server to stop, then SIGKILL to whatever is left of it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pass


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, limit: float = 180.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{_log_tail(log)}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    pytest.fail(f"server not ready after {limit} s:\n{_log_tail(log)}")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---- helpers: the model run directly, in the test process ----------------------------------

def _maps(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, size, size), dtype=np.float32)


def _posterior(model, maps: np.ndarray) -> DiagonalGaussianDistribution:
    with torch.no_grad():
        return model.encode(to_model(maps))


def _mean(model, maps):
    return _posterior(model, maps).mode().numpy()


def _decode(model, latents):
    with torch.no_grad():
        return from_model(model.decode(torch.as_tensor(latents))).numpy()


def _npy(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == NPY
    return np.load(io.BytesIO(response.content))


def _from_json(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    doc = response.json()
    array = np.load(io.BytesIO(base64.b64decode(doc["data"])))
    assert doc["encoding"] == "npy" and doc["shape"] == list(array.shape)
    return array


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- endpoints, payload formats, equality with the model -----------------------------------

def test_health_info_and_openapi(server):
    health = requests.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ready"
    assert requests.get(server.url + "/info", timeout=10).status_code == 401
    info = requests.get(server.url + "/info", headers={"X-API-Key": KEY}, timeout=10).json()
    assert info["model"]["downsample_factor"] == 4 and info["model"]["latent_channels"] == 3
    assert info["model"]["scale_factor"] == pytest.approx(0.3)
    assert info["limits"]["max_pixels"] == MAX_PIXELS
    assert info["limits"]["max_request_maps"] == MAX_MAPS  # set through RADIODIFF_*
    workers = {w["endpoint"]: w for w in info["workers"]}
    assert set(workers) == {"/encode", "/decode", "/reconstruct"}
    assert all(w["backend"] == "torch" and w["device"] == "cpu" for w in workers.values())
    assert info["versions"]["torch"] == torch.__version__
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    encode = spec["paths"]["/encode"]["post"]
    assert set(encode["requestBody"]["content"]) == {PNG, NPY, JSON}
    assert {p["name"] for p in encode["parameters"]} == {"mode", "seed", "scaled", "resize",
                                                         "tiled"}
    decode = spec["paths"]["/decode"]["post"]
    assert set(decode["requestBody"]["content"]) == {NPY, JSON}
    assert PNG in decode["responses"]["200"]["content"]
    assert "415" in decode["responses"] and "413" in decode["responses"]


def test_encode_each_input_format_matches_the_model(server):
    maps = _maps(3)
    want = _mean(server.model, maps)
    np.testing.assert_allclose(_npy(server.post("/encode", encode_npy(maps))), want, atol=ATOL)
    single = _npy(server.post("/encode", encode_npy(maps[0, 0])))  # [H, W] -> [z, h, w]
    np.testing.assert_allclose(single, want[0], atol=ATOL)
    np.testing.assert_allclose(_npy(server.post("/encode", encode_npy(maps[0]))), want[0],
                               atol=ATOL)
    for bits in (8, 16):
        png = encode_png(maps[1, 0], bits=bits)
        got = _npy(server.post("/encode", png, content_type=PNG))
        np.testing.assert_allclose(got, _mean(server.model, decode_png(png)[None, None])[0],
                                   atol=ATOL)
    doc = {"encoding": "png", "data": [_b64(encode_png(m[0], bits=16)) for m in maps]}
    got = _from_json(server.post("/encode", json.dumps(doc), content_type=JSON, accept=JSON))
    np.testing.assert_allclose(got, want, atol=1e-3)  # 16-bit quantised input
    doc = {"encoding": "npy", "data": _b64(encode_npy(maps))}
    np.testing.assert_allclose(_npy(server.post("/encode", json.dumps(doc),
                                                content_type=JSON)), want, atol=ATOL)


def test_decode_and_reconstruct_each_format_match_the_model(server):
    maps = _maps(2, seed=1)
    latents = _mean(server.model, maps)
    want = _decode(server.model, latents)
    np.testing.assert_allclose(_npy(server.post("/decode", encode_npy(latents))), want,
                               atol=ATOL)
    one = _npy(server.post("/decode", encode_npy(latents[0])))  # [z, h, w] -> [1, H, W]
    np.testing.assert_allclose(one, want[0], atol=ATOL)
    doc = {"encoding": "npy", "data": [_b64(encode_npy(z)) for z in latents]}
    got = _from_json(server.post("/decode", json.dumps(doc), content_type=JSON, accept=JSON))
    np.testing.assert_allclose(got, want, atol=ATOL)
    for bits in (8, 16):
        r = server.post("/decode", encode_npy(latents[:1]), accept=PNG, params={"bits": bits})
        assert r.status_code == 200 and r.headers["content-type"] == PNG
        np.testing.assert_allclose(decode_png(r.content), want[0, 0], atol=0.5 / (2**bits - 1)
                                   + ATOL)
    recon = _decode(server.model, latents)
    np.testing.assert_allclose(_npy(server.post("/reconstruct", encode_npy(maps))), recon,
                               atol=ATOL)
    png_in = encode_png(maps[0, 0], bits=16)
    r = server.post("/reconstruct", png_in, content_type=PNG, accept=PNG, params={"bits": 16})
    expected = _decode(server.model, _mean(server.model, decode_png(png_in)[None, None]))
    np.testing.assert_allclose(decode_png(r.content), expected[0, 0], atol=1e-4)


def test_encode_then_decode_equals_reconstruct(server):
    maps = _maps(2, seed=2)
    z = _npy(server.post("/encode", encode_npy(maps)))
    via_latents = _npy(server.post("/decode", encode_npy(z)))
    # one recorded decision: the same kernels in every worker, so the same bytes
    np.testing.assert_array_equal(via_latents,
                                  _npy(server.post("/reconstruct", encode_npy(maps))))


def test_scaled_latents_use_the_scale_factor(server):
    maps = _maps(1, seed=3)
    z = _npy(server.post("/encode", encode_npy(maps)))
    scaled = _npy(server.post("/encode", encode_npy(maps), params={"scaled": "true"}))
    np.testing.assert_allclose(scaled, 0.3 * z, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_npy(server.post("/decode", encode_npy(scaled),
                                                params={"scaled": "true"})),
                               _npy(server.post("/decode", encode_npy(z))), atol=ATOL)


def test_sample_mode_is_reproducible_with_a_seed_and_matches_the_model(server):
    maps = _maps(2, seed=4)
    params = {"mode": "sample", "seed": "7"}
    first = _npy(server.post("/encode", encode_npy(maps), params=params))
    again = _npy(server.post("/encode", encode_npy(maps), params=params))
    other = _npy(server.post("/encode", encode_npy(maps), params={"mode": "sample", "seed": "8"}))
    assert np.array_equal(first, again) and not np.allclose(first, other)
    unseeded = [_npy(server.post("/encode", encode_npy(maps), params={"mode": "sample"}))
                for _ in range(2)]
    assert not np.allclose(*unseeded)
    direct = _posterior(server.model, maps).sample(torch.Generator().manual_seed(7)).numpy()
    np.testing.assert_allclose(first, direct, atol=ATOL)
    assert not np.allclose(first, _mean(server.model, maps), atol=1e-3)
    recon = _npy(server.post("/reconstruct", encode_npy(maps), params=params))
    np.testing.assert_allclose(recon, _decode(server.model, direct), atol=ATOL)


def test_resize_on_request_and_size_errors_naming_what_is_accepted(server):
    odd = _maps(1, size=62, seed=5)
    r = server.post("/encode", encode_npy(odd))
    assert r.status_code == 422
    assert "multiples of 4" in r.json()["detail"] and "resize" in r.json()["detail"]
    z = _npy(server.post("/encode", encode_npy(odd), params={"resize": "64,64"}))
    assert z.shape == (1, 3, 16, 16)
    r = server.post("/reconstruct", encode_npy(_maps(1, size=128)))  # 128x128 = the limit
    assert _npy(r).shape == (1, 1, 128, 128)


# ---- cross-request batching --------------------------------------------------------------

def test_concurrent_requests_are_batched_and_answered_as_one_by_one(server):
    requests_ = []
    for i in range(8):
        maps = _maps(1 + i % 3, size=64 if i % 4 else 32, seed=10 + i)
        path = "/encode" if i % 2 else "/reconstruct"
        params = {"mode": "sample", "seed": str(i)} if i % 3 == 0 else {}
        requests_.append((path, encode_npy(maps), params))
    alone = [_npy(server.post(p, body, params=q)) for p, body, q in requests_]
    before = server.metrics()
    barrier = threading.Barrier(len(requests_))

    def send(item):
        path, body, params = item
        barrier.wait()
        return _npy(server.post(path, body, params=params))

    with ThreadPoolExecutor(len(requests_)) as pool:
        together = list(pool.map(send, requests_))
    for a, b in zip(alone, together):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=ATOL)
    after = server.metrics()
    merged = 0.0
    for path in ("/encode", "/reconstruct"):
        count, total = (after[f'radiodiff_batch_requests_{kind}{{endpoint="{path}"}}']
                        - before[f'radiodiff_batch_requests_{kind}{{endpoint="{path}"}}']
                        for kind in ("count", "sum"))
        assert total == 4  # every request ran exactly once
        merged += total - count
    assert merged > 0, "no worker batch held more than one request"


# ---- bad input: a 4xx that says what was expected, and the server keeps serving ----------

def _tiny_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _npy_claiming(shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + b"\0" * 16


def _rgb_png() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    return buf.getvalue()


GOOD = encode_npy(_maps(1))
NAN = _maps(1)
NAN[0, 0, 3, 3] = np.nan
INF = _maps(1)
INF[0, 0, 0, 0] = np.inf
BAD_INPUTS = [
    # (path, body, content type, accept, params, status, words in the detail)
    ("/encode", GOOD, "text/plain", None, None, 415, "takes Content-Type image/png"),
    ("/encode", GOOD, "", None, None, 415, "no Content-Type"),
    ("/decode", encode_png(_maps(1)[0, 0]), PNG, None, None, 415, "application/x-npy"),
    ("/encode", b"\x89PNG\r\n\x1a\ngarbage", PNG, None, None, 400, "not a decodable PNG"),
    ("/encode", encode_png(_maps(1)[0, 0])[:200], PNG, None, None, 400, "PNG"),
    ("/encode", _rgb_png(), PNG, None, None, 400, "grayscale"),
    ("/encode", b"not an npy file", NPY, None, None, 400, "not a readable .npy"),
    ("/encode", _npy_claiming((100000, 100000)), NPY, None, None, 400, "header declares"),
    ("/encode", encode_npy(_maps(1).astype(np.float64)), NPY, None, None, 422, "float32"),
    ("/encode", encode_npy((_maps(1) * 255).astype(np.uint8)), NPY, None, None, 422, "float32"),
    ("/encode", encode_npy(_maps(3)[:, 0]), NPY, None, None, 422, "[N, 1, H, W]"),
    ("/encode", encode_npy(np.zeros((2, 2, 64, 64), np.float32)), NPY, None, None, 422,
     "[N, 1, H, W]"),
    ("/encode", encode_npy(np.zeros((0, 1, 64, 64), np.float32)), NPY, None, None, 422,
     "1 to 8"),
    ("/encode", encode_npy(_maps(1, size=66)), NPY, None, None, 422, "multiples of 4"),
    ("/encode", encode_npy(NAN), NPY, None, None, 422, "NaN or Inf"),
    ("/reconstruct", encode_npy(INF), NPY, None, None, 422, "NaN or Inf"),
    ("/encode", encode_npy(_maps(1) * 3), NPY, None, None, 422, "[0, 1]"),
    ("/decode", encode_npy(np.zeros((1, 4, 16, 16), np.float32)), NPY, None, None, 422,
     "[N, 3, h, w]"),
    ("/decode", encode_npy(np.full((1, 3, 16, 16), np.nan, np.float32)), NPY, None, None, 422,
     "NaN"),
    ("/decode", encode_npy(np.full((1, 3, 16, 16), 1e20, np.float32)), NPY, PNG, None, 422,
     "within +-10000"),
    ("/encode", GOOD, NPY, None, {"mode": "median"}, 422, "mode: expected one of mean, sample"),
    ("/encode", GOOD, NPY, None, {"mode": "sample", "seed": "-1"}, 422, "seed"),
    ("/encode", GOOD, NPY, None, {"bits": "16"}, 422, "unknown query parameter 'bits'"),
    ("/encode", GOOD, NPY, None, {"resize": "64"}, 422, "H,W"),
    ("/encode", GOOD, NPY, None, {"resize": "1048576,1048576"}, 413, "pixels"),
    ("/encode", b'{"data": "AAAA"}', JSON, None, None, 422, '"encoding"'),
    ("/encode", b'{"data": "AAAA", "encoding": "npy", "x": 1}', JSON, None, None, 422,
     "expected a JSON object"),
    ("/encode", b"{not json", JSON, None, None, 400, "not valid JSON"),
    ("/encode", b"[" * 100000, JSON, None, None, 400, "not valid JSON"),
    ("/encode", b'{"data": "%%%", "encoding": "npy"}', JSON, None, None, 400, "base64"),
    ("/decode", json.dumps({"data": _b64(encode_png(_maps(1)[0, 0])), "encoding": "png"}),
     JSON, None, None, 422, "latents cannot be PNG"),
    ("/encode", json.dumps({"encoding": "npy", "data": [_b64(encode_npy(_maps(1, 64)[0])),
                                                        _b64(encode_npy(_maps(1, 32)[0]))]}),
     JSON, None, None, 422, "share a shape"),
    ("/encode", _tiny_png_header(20000, 20000), PNG, None, None, 413, "400000000 pixels"),
    ("/encode", encode_npy(_maps(1, size=256)), NPY, None, {"tiled": "false"}, 413,
     "65536 pixels"),
    ("/encode", encode_npy(_maps(MAX_MAPS + 1, size=32)), NPY, None, None, 413, "1 to 8"),
    ("/encode", json.dumps({"encoding": "npy", "data": [_b64(encode_npy(_maps(1, 32)[0]))] * 9}),
     JSON, None, None, 413, "items; got 9"),
    ("/encode", encode_npy(np.zeros((1, 1, 600, 600), np.float32)), NPY, None, None, 413,
     "limit is 1048576"),
    ("/encode", GOOD, NPY, PNG, None, 406, "answers with application/x-npy, application/json"),
    ("/reconstruct", encode_npy(_maps(2)), NPY, PNG, None, 406, "holds one map"),
]


@pytest.mark.parametrize("path,body,ctype,accept,params,status,words", BAD_INPUTS,
                         ids=[f"{b[5]}-{b[6][:24]}" for b in BAD_INPUTS])
def test_bad_input_gets_a_4xx_naming_what_was_expected(server, path, body, ctype, accept,
                                                       params, status, words):
    r = server.post(path, body, content_type=ctype, accept=accept, params=params)
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["status"] == status and words in doc["detail"], doc


UNDECODABLE = [
    # (body, content type, what the detail must say was expected)
    (b"this is not a png", PNG, "not a decodable PNG: expected PNG bytes"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, PNG, "not a decodable PNG: the PNG signature is"),
    (json.dumps({"encoding": "png", "data": _b64(b"GIF89a not a png")}), JSON,
     "not a decodable PNG: expected PNG bytes"),
    (b"garbage, not an npy", NPY, "not a readable .npy array: the magic string"),
    (b"\x93NUMPY\x01\x00\x20\x00" + b"{'descr': object, 'shape': ()}".ljust(31) + b"\n", NPY,
     "not a readable .npy array: the header is not a dict of literals"),
]


@pytest.mark.parametrize("body,ctype,words", UNDECODABLE, ids=[u[2][:32] for u in UNDECODABLE])
def test_undecodable_bodies_get_400_saying_what_was_expected_without_reprs(server, body, ctype,
                                                                           words):
    r = server.post("/encode", body, content_type=ctype)
    assert r.status_code == 400 and r.headers["content-type"] == JSON, r.text
    assert "object at 0x" not in r.text and " at 0x" not in r.text, r.text
    doc = r.json()
    assert doc["status"] == 400 and words in doc["detail"], doc


def read_response(sock: socket.socket) -> bytes:
    """Read one HTTP response (headers and a Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_oversized_body_is_refused_before_it_is_read(server):
    head = (f"POST /encode HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
            f"Content-Type: {NPY}\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head + b"Content-Length: 10000000000\r\n\r\n")  # 10 GB announced, none sent
        answer = read_response(s)
    assert answer.startswith(b"HTTP/1.1 413") and b"the limit is 1048576" in answer
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")  # no length: counted as read
        for size in (0x40000,) * 4 + (0x10,):  # 1 MiB + 16 bytes, then silence
            s.sendall(b"%x\r\n" % size + b"\0" * size + b"\r\n")
        answer = read_response(s)
    assert answer.startswith(b"HTTP/1.1 413") and b"exceeds the limit" in answer


def test_server_keeps_serving_after_bad_input(server):
    pids = {w["pid"] for w in requests.get(server.url + "/info", headers={"X-API-Key": KEY},
                                           timeout=10).json()["workers"]}
    assert _npy(server.post("/reconstruct", GOOD)).shape == (1, 1, 64, 64)
    info = requests.get(server.url + "/info", headers={"X-API-Key": KEY}, timeout=10).json()
    assert {w["pid"] for w in info["workers"]} == pids  # no worker died or was replaced
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids)


def test_api_key_is_required(server):
    for key, headers in ((None, None), ("wrong", None)):
        r = server.post("/encode", GOOD, key=key, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["detail"]
    r = server.post("/encode", GOOD, key=None, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    assert requests.get(server.url + "/health", timeout=10).status_code == 200  # for balancers


def test_an_empty_x_api_key_leaves_the_bearer_token_to_decide(server):
    bearer = {"Authorization": f"Bearer {KEY}"}
    r = server.post("/encode", GOOD, key=None, headers={"X-API-Key": "", **bearer})
    assert r.status_code == 200, r.text
    r = requests.get(server.url + "/info", headers={"X-API-Key": "", **bearer}, timeout=10)
    assert r.status_code == 200, r.text
    r = server.post("/encode", GOOD, key=None, headers={"X-API-Key": "", "Authorization":
                                                        "Bearer wrong"})
    assert r.status_code == 401 and r.json()["detail"] == "wrong API key"
    r = server.post("/encode", GOOD, key="wrong", headers=bearer)  # a key given is the key
    assert r.status_code == 401 and r.json()["detail"] == "wrong API key"


# ---- compute budget (--max-request-cost) ---------------------------------------------------

def _info(server) -> dict:
    return requests.get(server.url + "/info", headers={"X-API-Key": KEY}, timeout=10).json()


def test_the_budget_override_is_reported_with_each_endpoints_measured_speed(server):
    budget = _info(server)["budget"]
    assert budget["max_request_cost"] == MAX_COST and budget["fraction_of_timeout"] == 0.5
    assert set(budget["endpoints"]) == {"/encode", "/decode", "/reconstruct"}
    for endpoint in budget["endpoints"].values():
        assert endpoint["budget_megapixels"] == MAX_COST
        assert 0 < endpoint["seconds_per_megapixel"] < 1000


def priced(server: Server, endpoint: str, side: int) -> float:
    """What one pass over a side x side map costs at `endpoint`, as its workers' measured cost
    model (GET /info) prices it (server/budget.py)."""
    worker = next(w for w in requests.get(server.url + "/info", timeout=10,
                                          headers={"X-API-Key": KEY}).json()["workers"]
                  if w["endpoint"] == endpoint)
    model = Budget(MAX_COST, worker["cost_growth_per_megapixel"], worker["warmup_megapixels"],
                   worker["growth_measured_to_megapixels"])
    return model.pass_cost(side * side / 1e6)


def test_an_amplifying_request_is_refused_fast_with_its_cost_and_the_budget(server):
    tiny = encode_npy(_maps(MAX_MAPS, size=4))  # 512 bytes of pixels, resized to 8 x 128x128
    start = time.perf_counter()
    r = server.post("/reconstruct", tiny, params={"resize": "128,128"})
    elapsed = time.perf_counter() - start
    assert r.status_code == 413, r.text
    doc = r.json()
    assert doc["cost_megapixels"] == pytest.approx(MAX_MAPS * priced(server, "/reconstruct", 128),
                                                   rel=1e-5)
    assert doc["budget_megapixels"] == MAX_COST
    assert "fewer maps" in doc["detail"] and "?resize=" in doc["detail"]
    print(f"the 413 took {elapsed * 1000:.0f} ms")


def test_decode_cost_counts_the_maps_the_latents_decode_to(server):
    latents = np.zeros((MAX_MAPS, 3, 32, 32), np.float32)  # 8 maps of 128x128
    one = priced(server, "/decode", 128)
    r = server.post("/decode", encode_npy(latents))
    assert r.status_code == 413 and r.json()["cost_megapixels"] == pytest.approx(MAX_MAPS * one,
                                                                               rel=1e-5)
    fit = int(MAX_COST // one)
    assert _npy(server.post("/decode", encode_npy(latents[:fit]))).shape == (fit, 1, 128, 128)


def test_a_request_within_the_budget_is_served(server):
    # as many 128x128 maps as the budget holds, as the endpoint's measured cost model prices
    # them (6 of 0.016 MP nominal; a measured growth can price them past 0.1 MP together)
    fit = {path: int(MAX_COST // priced(server, path, 128)) for path in ("/reconstruct", "/encode")}
    assert min(fit.values()) >= 4, fit
    maps = _maps(fit["/reconstruct"], size=128, seed=40)
    assert _npy(server.post("/reconstruct", encode_npy(maps))).shape == maps.shape
    r = server.post("/encode", encode_npy(_maps(fit["/encode"], size=4)),
                    params={"resize": "128,128"})
    assert _npy(r).shape == (fit["/encode"], 3, 32, 32)


def concurrent_batches(server: Server, path: str, body: bytes,
                       clients: int) -> tuple[list[np.ndarray], float, float]:
    """`body` sent to `path` by `clients` threads at once: the answers, and how many batches
    and requests in them the endpoint's workers counted meanwhile."""
    before = server.metrics()
    barrier = threading.Barrier(clients)

    def send(_):
        barrier.wait()
        return _npy(server.post(path, body))

    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(send, range(clients)))
    after = server.metrics()
    count, total = (after[f'radiodiff_batch_requests_{kind}{{endpoint="{path}"}}']
                    - before.get(f'radiodiff_batch_requests_{kind}{{endpoint="{path}"}}', 0.0)
                    for kind in ("count", "sum"))
    return answers, count, total


def test_batches_are_formed_under_the_budget(server):
    maps = int(MAX_COST // priced(server, "/encode", 128))  # fits the budget; two would not
    body = encode_npy(_maps(maps, size=128, seed=41))
    answers, count, total = concurrent_batches(server, "/encode", body, 3)
    assert all(z.shape == (maps, 3, 32, 32) for z in answers)
    assert total == 3 and count == 3, "requests over the budget together shared a batch"


# ---- metrics -------------------------------------------------------------------------------

def test_metrics_count_what_was_sent(server):
    before = server.metrics()
    for n in (1, 2, 3):
        _npy(server.post("/encode", encode_npy(_maps(n, seed=n))))
    for _ in range(2):
        assert server.post("/encode", GOOD, content_type="text/csv").status_code == 415
    after = server.metrics()

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('radiodiff_requests_total{code="200",endpoint="/encode"}') == 3
    assert delta('radiodiff_requests_total{code="415",endpoint="/encode"}') == 2
    assert delta('radiodiff_maps_processed_total{endpoint="/encode"}') == 6
    assert delta('radiodiff_request_duration_seconds_count{endpoint="/encode"}') == 5
    assert delta('radiodiff_model_duration_seconds_count{endpoint="/encode"}') == 3
    assert delta('radiodiff_batch_size_sum{endpoint="/encode"}') == 6
    assert after['radiodiff_requests_in_flight{endpoint="/encode"}'] == 0


def _peak_resident_kib(pgid: int) -> dict[int, int]:
    """VmHWM (peak resident set, KiB) of each live process in the server's process group."""
    peaks = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            status = (entry / "status").read_text()
        except (OSError, ValueError):
            continue
        if "VmHWM:" in status:  # not in a zombie's
            peaks[int(entry.name)] = int(status.split("VmHWM:")[1].split()[0])
    return peaks


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_decompression_bomb_is_refused_from_its_headers_before_any_pixel_is_decoded(server):
    """Small PNGs that each declare 4096x4096 (16.8 MP, 64 MiB as float32) with a tiny
    ?resize=: refused 413 from their IHDR headers in every form (a JSON list, one PNG beside a
    too-small budget), and no process of the server grows by what decoding would cost."""
    bomb = encode_png(np.zeros((4096, 4096), np.float32))
    assert len(bomb) < 100_000
    before = _peak_resident_kib(server.proc.pid)
    items = [base64.b64encode(bomb).decode()] * MAX_MAPS
    r = server.post("/reconstruct", json.dumps({"data": items, "encoding": "png"}).encode(),
                    content_type=JSON, params={"resize": "8,8"})
    assert r.status_code == 413 and "declare 134217728 pixels in all" in r.json()["detail"], r.text
    one_png = server.post("/reconstruct", bomb, content_type=PNG, params={"tiled": "false"})
    assert one_png.status_code == 413 and "4096x4096" in one_png.json()["detail"]
    empty_items = b'{"encoding": "png", "data": [' + b'"",' * 200_000 + b'""]}'
    r = server.post("/encode", empty_items, content_type=JSON)
    assert r.status_code == 413 and "holds more" in r.json()["detail"]
    after = _peak_resident_kib(server.proc.pid)
    grown = {pid: after[pid] - before[pid] for pid in after if pid in before}
    assert max(grown.values()) < 48 * 1024, f"peak resident memory grew (KiB): {grown}"


# ---- the client --------------------------------------------------------------------------

def test_client_numpy_in_and_out(server):
    vae = Client(server.url, api_key=KEY, timeout=60)
    assert vae.ready() and vae.info()["model"]["latent_channels"] == 3
    maps = _maps(2, seed=20)
    z = vae.encode(maps)
    np.testing.assert_allclose(z, _mean(server.model, maps), atol=ATOL)
    np.testing.assert_allclose(vae.encode([m[0] for m in maps]), z, atol=1e-6)  # list of [H, W]
    np.testing.assert_allclose(vae.encode(maps[0, 0].astype(np.float64)), z[0], atol=ATOL)
    zs = vae.encode(maps, mode="sample", seed=1, scaled=True)
    np.testing.assert_allclose(vae.decode(zs, scaled=True),
                               _decode(server.model, zs / 0.3), atol=ATOL)
    np.testing.assert_array_equal(vae.reconstruct(maps), vae.decode(z))
    with pytest.raises(ServerError) as err:
        vae.encode(maps * 5)
    assert err.value.status == 422 and "[0, 1]" in err.value.detail and "/encode" in str(err.value)
    with pytest.raises(ServerError) as err:
        Client(server.url, api_key="nope").decode(z)
    assert err.value.status == 401


def test_client_retries_connection_errors_with_backoff():
    vae = Client(f"http://127.0.0.1:{_free_port()}", retries=2, backoff=0.1, timeout=5)
    start = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        vae.encode(_maps(1))
    assert time.monotonic() - start >= 0.1 + 0.2  # slept between the three attempts


# ---- graceful shutdown (keep last: it stops the module's server) ---------------------------

def test_sigterm_finishes_in_flight_requests_and_ends_every_process(server):
    assert len(group_pids(server.proc.pid)) >= 6  # main, manager, 3 workers, HTTP, ...
    maps = encode_npy(_maps(4, size=128, seed=30))
    result = {}
    sender = threading.Thread(target=lambda: result.update(r=server.post("/reconstruct", maps)))
    sender.start()
    gauge = 'radiodiff_requests_in_flight{endpoint="/reconstruct"}'
    deadline = time.monotonic() + 30
    while server.metrics().get(gauge, 0) < 1 and sender.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    sender.join(60)
    assert result["r"].status_code == 200, "the in-flight request was cut short"
    assert _npy(result["r"]).shape == (4, 1, 128, 128)
    assert server.proc.wait(120) == 0, _log_tail(server.log)
    # the main process has joined (or killed) every other before it exits 0: what may be left
    # is the kernel reaping them, not a process still running
    assert wait_group_gone(server.proc.pid, 30) == [], "processes left after SIGTERM"

