"""Server parts without a running server: options, model sources, size rules, Accept, and the
onnxruntime backend (on a real `python -m export` directory) against the torch backend."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from model.autoencoder import AutoencoderKL
from model.checkpoint import save_checkpoint
from model.config import to_dict
from model.io import encode_npy, from_model, to_model
from model.loading import load
from runtime.inference import prepare_for_inference
from runtime.tiling import Tiler
from server.__main__ import main
from server.apis import DecodeAPI, EncodeAPI, ReconstructAPI
from server.budget import BudgetPolicy
from server.payloads import Job, decode_body
from server.protocol import OPERATIONS, Options, RequestError, negotiate, parse_options
from server.queueing import OverShare, QueueSlots, retry_after
from server.routes import error_response
from server.settings import Settings, parse_settings
from server.spec import ModelSourceError, describe_model, limits_of
from tests.conftest import tiny_model_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    net = AutoencoderKL.from_config(tiny_model_config())
    path = tmp_path_factory.mktemp("units") / "model-0.pt"
    return save_checkpoint(path, {"model": net.state_dict(), "step": 0,
                                  "config": {"model": to_dict(tiny_model_config())}})


def test_options_come_from_the_command_line_then_radiodiff_env_then_defaults():
    env = {"RADIODIFF_MODEL": "/m", "RADIODIFF_PORT": "9000", "RADIODIFF_MAX_BATCH_SIZE": "4",
           "RADIODIFF_RESOLUTION": "256,256", "RADIODIFF_PRECISION": "fp16"}
    s = parse_settings(["--port", "9100"], env)
    assert (s.model, s.port, s.max_batch_size, s.resolution, s.precision) == (
        "/m", 9100, 4, (256, 256), "fp16")
    assert s.batch_timeout == 0.01 and s.device == "auto" and s.backend is None
    assert parse_settings(["--model", "/x", "--resolution", "320", "320"], {}).resolution == (
        320, 320)


@pytest.mark.parametrize("argv,env,words", [
    ([], {}, "--model (or RADIODIFF_MODEL) is required"),
    (["--model", "m"], {"RADIODIFF_MAX_BATCH_SIZE": "0"}, "RADIODIFF_MAX_BATCH_SIZE='0': expected a"
                                                          " positive integer"),
    (["--model", "m"], {"RADIODIFF_DEVICE": "tpu"}, "RADIODIFF_DEVICE='tpu': expected one of"),
    (["--model", "m"], {"RADIODIFF_RESOLUTION": "256"}, "expected two values"),
    (["--model", "m", "--port", "80"], {}, "expected a port in 1024..65535, got '80'"),
    (["--model", "m"], {"RADIODIFF_BF16": "true"}, "replaced by RADIODIFF_PRECISION=bf16"),
])
def test_bad_options_name_the_option_and_what_was_expected(argv, env, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_settings(argv, env)
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_startup_errors_name_what_is_wrong(tmp_path, checkpoint, caplog, monkeypatch):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    monkeypatch.delenv("RADIODIFF_NO_SUCH_KEY", raising=False)
    cases = [(["--model", str(tmp_path / "nothere.pt")], "no such checkpoint file"),
             (["--model", str(tmp_path / "broken.pt")], "broken.pt: "),
             (["--model", str(checkpoint), "--backend", "onnx"], "python -m export"),
             (["--model", str(checkpoint), "--resolution", "66", "66"], "multiples of the model's"),
             (["--model", str(checkpoint), "--tile", "62"],
              "--tile 62 --tile-overlap 28: tile (62) and overlap (28) must be multiples of "
              "the downsampling factor 4"),
             (["--model", str(checkpoint), "--tile", "64", "--tile-overlap", "64"],
              "--tile 64 --tile-overlap 64: overlap must be in [0, tile)"),
             (["--model", str(checkpoint), "--api-key-env", "RADIODIFF_NO_SUCH_KEY"],
              "RADIODIFF_NO_SUCH_KEY: that environment variable is unset"),
             (["--model", str(checkpoint), "--device", "cpu", "--precision", "fp16"],
              "--precision fp16 needs a CUDA device")]
    if not torch.cuda.is_available():
        cases.append((["--model", str(checkpoint), "--device", "cuda"], "torch sees no CUDA"))
    for argv, words in cases:
        caplog.clear()
        assert main(argv) == 2
        assert words in caplog.text, caplog.text


def test_a_port_in_use_is_named_and_exits_2_before_any_worker_starts(checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "server", "--model", str(checkpoint),
                               "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "Uvicorn" not in done.stderr
    assert time.monotonic() - start < 60  # no worker loaded the model (a few s when idle)


def test_error_bodies_name_a_python_objects_type_never_its_repr():
    body = json.loads(error_response(400, "cannot identify image file <_io.BytesIO object at "
                                          "0x7f3a2b1c0d90>; <function f at 0x10>").body)
    assert body == {"status": 400, "error": "Bad Request",
                    "detail": "cannot identify image file a BytesIO object; a function object"}


def test_tiles_default_to_the_models_training_size_overlapping_by_half(checkpoint):
    """As diffusers' enable_tiling: a 64x64 model is tiled in 64x64 passes, not 256x256 ones
    (the quickstart model's attention makes a 256x256 pixel cost 2.6x a 64x64 one)."""
    spec = describe_model(Settings(model=str(checkpoint)))
    side = min(spec.config_size)
    tiler = limits_of(Settings(model=str(checkpoint)), spec).tiler
    assert (tiler.tile, tiler.overlap) == (side, side // 2)
    pinned = limits_of(Settings(model=str(checkpoint), tile=32, tile_overlap=0), spec).tiler
    assert (pinned.tile, pinned.overlap) == (32, 0)


def test_default_tiles_are_multiples_of_the_factor_whatever_the_configured_resolution(checkpoint):
    """ddconfig.resolution only places attention layers: it need not be a multiple of the
    downsampling factor, and the default tile and overlap must still be (else the server would
    refuse to start over options nobody set)."""
    spec = describe_model(Settings(model=str(checkpoint)))
    f = spec.downsample_factor
    odd = 10 * f + f // 2 + 1  # not a multiple of f (f >= 2)
    config = {**spec.model_config, "ddconfig": {**spec.model_config["ddconfig"],
                                                 "resolution": [odd, odd]}}
    tiler = limits_of(Settings(model=str(checkpoint)), replace(spec, model_config=config)).tiler
    assert tiler.tile == 10 * f and tiler.overlap % f == 0 and tiler.overlap <= 5 * f
    # a --tile whose half is not a multiple of f: the default overlap is rounded, not refused
    given = limits_of(Settings(model=str(checkpoint), tile=3 * f), spec).tiler
    assert (given.tile, given.overlap) == (3 * f, f)


def test_pinned_resolution_accepts_only_that_size(checkpoint):
    settings = Settings(model=str(checkpoint), resolution=(64, 64))
    spec = describe_model(settings)
    limits = limits_of(settings, spec)
    op = OPERATIONS["encode"]
    maps = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    npy = encode_npy(maps)
    with pytest.raises(RequestError) as err:
        decode_body(npy, "application/x-npy", op, spec, limits, Options())
    assert err.value.status == 422 and "64x64 maps only" in err.value.detail
    resized = decode_body(npy, "application/x-npy", op, spec, limits, Options(resize=(64, 64)))
    assert resized.array.shape == (1, 1, 64, 64) and 0 <= resized.array.min()
    latent = encode_npy(np.zeros((3, 8, 8), np.float32))  # decodes to 32x32
    with pytest.raises(RequestError, match="latent 8x8 decodes to a map of 32x32"):
        decode_body(latent, "application/x-npy", OPERATIONS["decode"], spec, limits, Options())


def test_accept_negotiation_follows_preferences():
    decode, encode = OPERATIONS["decode"], OPERATIONS["encode"]
    assert negotiate(decode, None) == "application/x-npy"
    assert negotiate(decode, "image/*") == "image/png"
    assert negotiate(decode, "image/png;q=0.5, application/json") == "application/json"
    assert negotiate(encode, "image/png, */*;q=0.1") == "application/x-npy"
    with pytest.raises(RequestError, match="answers with application/x-npy, application/json"):
        negotiate(encode, "image/png, text/html")
    assert parse_options(encode, {"mode": "sample", "seed": "0", "scaled": "1"}) == Options(
        mode="sample", seed=0, scaled=True)


# ---- onnxruntime backend on a real export ----------------------------------------------------

@pytest.fixture(scope="module")
def export_dir(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "onnx"
    cmd = [sys.executable, "-m", "export", "--ckpt", str(checkpoint), "--out", str(out),
           "--exporter", "torchscript", "--no-check"]  # parity: checked below, on our terms
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_onnx_backend_serves_an_export_like_the_model(export_dir, checkpoint):
    spec = describe_model(Settings(model=str(export_dir)))
    assert spec.backend == "onnx" and spec.downsample_factor == 4
    with pytest.raises(ModelSourceError, match="ONNX export directory"):
        describe_model(Settings(model=str(export_dir), backend="torch"))
    encode, decode, reconstruct = (cls(spec, max_batch_size=2, batch_timeout=0.0,
                                       budget=BudgetPolicy(30.0))
                                   for cls in (EncodeAPI, DecodeAPI, ReconstructAPI))
    for api in (encode, decode, reconstruct):
        api.setup("cpu")  # what each inference worker runs, warm-up (timed) included
        assert 0 < api.budget_megapixels < float("inf")
    assert encode.backend.describe()["provider"] == "CPUExecutionProvider"
    model = load(checkpoint).model
    rng = np.random.default_rng(2)
    maps = [rng.random((n, 1, 64, 64), dtype=np.float32) for n in (1, 3)]
    jobs = [Job(maps[0]), Job(maps[1], mode="sample", seed=5)]  # 4 maps: two forward passes
    with torch.no_grad():
        posteriors = [model.encode(to_model(m)) for m in maps]
        want_z = [posteriors[0].mode(), posteriors[1].sample(torch.Generator().manual_seed(5))]
        want_maps = [from_model(model.decode(z)) for z in want_z]
    for got, want in [*zip(encode.predict(jobs), want_z), *zip(reconstruct.predict(jobs),
                                                                want_maps)]:
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    (got,) = decode.predict([Job(want_z[1].numpy())])
    np.testing.assert_allclose(got, want_maps[1].numpy(), atol=1e-4)


@pytest.mark.slow  # tiled ONNX sessions beside the torch tiler (~10 s on 2 idle cores)
def test_onnx_backend_runs_tiled_jobs_like_the_torch_library(export_dir, checkpoint):
    spec = describe_model(Settings(model=str(export_dir)))
    encode, decode, reconstruct = (cls(spec, max_batch_size=2, batch_timeout=0.0)
                                   for cls in (EncodeAPI, DecodeAPI, ReconstructAPI))
    for api in (encode, decode, reconstruct):
        api.setup("cpu")
    engine = prepare_for_inference(load(checkpoint).model, "cpu")
    engine.enable_tiling(64, 32)
    tiler = Tiler(64, 32, spec.downsample_factor)
    maps = np.random.default_rng(3).random((3, 1, 128, 96), dtype=np.float32)
    want_z = engine.encode(to_model(maps)).mode()
    (z,) = encode.predict([Job(maps, tiler=tiler)])  # 3 maps: two forward passes per tile
    np.testing.assert_allclose(z, want_z.numpy(), atol=1e-4)
    (image,) = decode.predict([Job(want_z.numpy(), tiler=tiler)])
    np.testing.assert_allclose(image, from_model(engine.decode(want_z)).numpy(), atol=1e-4)
    (recon,) = reconstruct.predict([Job(maps, tiler=tiler)])
    np.testing.assert_allclose(recon, from_model(engine.reconstruct(to_model(maps))).numpy(),
                               atol=1e-4)


def test_queue_slots_bound_the_queue_and_hand_each_ticket_back_once():
    slots = QueueSlots(2)
    first, second = slots.take(0.5), slots.take(0.25)
    assert slots.take(1.0) is None and slots.waiting() == (2, 0.75)
    assert slots.claim(first) and not slots.abandon(first)  # a worker ran it: not "never run"
    assert not slots.claim(first)
    third = slots.take(1.0)
    assert third is not None and third.slot == first.slot and not slots.claim(first)
    assert slots.waiting() == (2, 1.25)
    assert parse_settings(["--model", "m", "--max-batch-size", "4"], {}).queue_capacity == 8
    assert parse_settings(["--model", "m", "--max-queue", "3"], {}).queue_capacity == 3


def test_an_abandoned_request_holds_its_slot_until_a_worker_drops_its_payload():
    """The queue process holds an abandoned payload until a worker meets it: until then its
    slot is not free, so abandoned requests never pile up in the queue beyond its capacity."""
    slots = QueueSlots(1)
    gone = slots.take(0.5)
    assert slots.abandon(gone) and slots.waiting() == (0, 0.0)
    assert slots.take(0.1) is None  # still physically queued
    assert not slots.claim(gone)  # the worker drops it, freeing the slot
    late = slots.take(0.5)
    slots.drop(late)  # its deadline passed in the queue: dropped by the worker
    assert slots.take(0.1) is None and slots.abandon(late)  # never run; the handler frees it
    assert slots.take(0.1) is not None


def test_queue_slots_bound_the_queued_bytes_and_each_clients_share():
    slots = QueueSlots(8, max_bytes=100)
    a = slots.take(0.5, client=1, share=1.0, size=60)
    assert slots.take(0.1, client=2, size=50) is None  # 110 bytes: over
    with pytest.raises(OverShare):
        slots.take(0.6, client=1, share=1.0, size=1)
    assert slots.take(0.4, client=1, share=1.0, size=1) is not None  # within its share
    assert slots.take(5.0, client=2, share=1.0, size=1) is not None  # nothing queued: admitted
    slots.release(a)
    assert slots.take(0.6, client=1, share=1.0, size=1) is not None


def test_retry_after_is_the_queued_work_at_the_slowest_measured_speed():
    workers = [{"endpoint": "/decode", "seconds_per_megapixel": 10.0},
               {"endpoint": "/decode", "seconds_per_megapixel": 20.0},
               {"endpoint": "/encode", "seconds_per_megapixel": 99.0}]
    assert retry_after(workers, "/decode", 0.25) == 3  # 20 s/MP x 0.25 MP over 2 workers
    assert retry_after(workers, "/decode", 0.0) == 1 and retry_after([], "/decode", 5.0) == 1
    # before: Retry-After 121 with --timeout 8; the queue turns over within the timeout
    assert retry_after(workers, "/decode", 12.0, timeout=8.0) == 8


class _Transport:
    """Records what the batch loop sends (the worker's answers go through litserve's transport
    in a server; here only what was sent matters)."""

    def __init__(self):
        self.sent = []

    def send(self, item, consumer_id):
        self.sent.append(item)


class _Endpoint:
    """The members of a RadioAPI the batch loop reads, at given speeds and deadlines."""
    api_path, max_batch_size, batch_timeout, deadline_s = "/reconstruct", 4, 0.0, 6.0
    budget_megapixels, seconds_per_megapixel = 0.3, 10.0  # a whole budget takes 3 s

    def __init__(self):
        self.slots = QueueSlots(8)

    def job_cost(self, job):
        return float(job.x.sum())  # the tests say each job's cost in its one value

    def memory_room(self):
        return float("inf")

    def memory_cost(self, jobs):
        return sum(self.job_cost(job) for job in jobs)

    def fits_in_memory(self, megapixels, room):
        return True

    def publish_running(self, requests):
        pass


def _queued(endpoint: "_Endpoint", uid: str, cost: float, age: float, client: int) -> tuple:
    """A request as litserve queues it, `age` seconds old, costing `cost` (its one value)."""
    ticket = endpoint.slots.take(cost)
    job = Job(np.full((1, 1, 1, 1), cost, np.float32), ticket=ticket, client=client)
    return (0, uid, time.monotonic() - age, job)


def _batches(endpoint: "_Endpoint", items: list[tuple], count: int) -> tuple[list, list]:
    """The uids of the first `count` batches a worker forms from `items`, and what it sent."""
    from queue import Queue

    from server.apis import BlockingBatchedLoop
    queue, transport, loop = Queue(), _Transport(), BlockingBatchedLoop()
    for item in items:
        queue.put(item)
    batches = [[uid for _, uid, _ in loop.get_batch_requests(endpoint, queue, transport)[0]]
               for _ in range(count)]
    return batches, transport.sent


def test_a_cheap_request_is_not_refused_for_an_expensive_batch_mate():
    """Before: a cheap request batched with an expensive one got 504 with its deadline mostly
    unspent (the batch as a whole would end too late). Now the expensive one waits for the
    next batch."""
    endpoint = _Endpoint()
    items = [_queued(endpoint, "cheap", 0.001, 3.5, client=1),  # 2.5 s of its deadline left
             _queued(endpoint, "heavy", 0.3, 1.0, client=2)]  # 3 s of work, 5 s left
    batches, sent = _batches(endpoint, items, 2)
    assert batches == [["cheap"], ["heavy"]]
    assert not [item for item in sent if "504" in repr(item)]


def test_batches_alternate_between_clients():
    """A client with two expensive requests queued before another client's cheap one: the
    second batch goes to the other client, not to the first client's second request."""
    endpoint = _Endpoint()
    items = [_queued(endpoint, "a1", 0.3, 2.0, client=1), _queued(endpoint, "a2", 0.3, 1.5, 1),
             _queued(endpoint, "b", 0.001, 1.0, client=2)]
    batches, _ = _batches(endpoint, items, 3)
    assert batches == [["a1"], ["b"], ["a2"]]


def test_served_batches_move_the_deadline_speed_within_bounds_of_the_recorded_one():
    """A machine busier than when the speed was recorded: the speed behind the 504 check
    follows what batches take, but never past 1.5x of the recorded one; the budget stays."""
    api = object.__new__(EncodeAPI)
    api.worker_info, api.recorded_rate, api.seconds_per_megapixel = None, 10.0, 10.0
    api.budget_megapixels = 0.5
    for _ in range(50):
        api._refresh_speed(seconds=40.0, cost=1.0)  # batches at 4x the recorded time
    assert api.seconds_per_megapixel == pytest.approx(15.0) and api.budget_megapixels == 0.5
    api._refresh_speed(seconds=10.0, cost=1.0)
    assert 10.0 < api.seconds_per_megapixel < 15.0  # back towards what batches show


def test_warm_up_timing_on_a_cpu_counts_computing_not_waiting_for_a_core():
    """The speed behind budgets and path choices is what a run takes with its cores to itself:
    time the process spends off-CPU (here a sleep; beside a busy job, waiting for a core) does
    not count on a CPU, and does count where the work is not on the CPU (a CUDA sync)."""
    from runtime.fast_layers import run_seconds
    assert run_seconds(lambda: time.sleep(0.2), on_cpu=False) >= 0.2
    assert run_seconds(lambda: time.sleep(0.2), on_cpu=True) < 0.1


def test_working_memory_is_priced_by_the_largest_pass_not_the_whole_request():
    """A tiled map runs a tile at a time and a batch at most max_batch_size maps a pass, so its
    working memory is that pass's: a 1024x1024 map in 64x64 tiles needs a 64x64 pass's memory,
    not 961 tiles' (which refused it 503 on a machine with GiBs free)."""
    from runtime.tiling import Tiler
    from server.budget import Budget
    api = object.__new__(EncodeAPI)
    api.max_batch_size = 16
    api.cost_model = lambda: Budget(10.0)
    tiled = Job(np.zeros((1, 1, 1024, 1024), np.float32), tiler=Tiler(64, 32, 1))
    assert api.memory_cost([tiled]) == pytest.approx(64 * 64 / 1e6)
    assert api.job_cost(tiled) == pytest.approx(31 * 31 * 64 * 64 / 1e6)
    maps = Job(np.zeros((20, 1, 64, 64), np.float32))
    assert api.memory_cost([maps, tiled]) == pytest.approx(16 * 64 * 64 / 1e6)


def test_a_request_whose_largest_pass_never_fits_in_memory_is_413_before_queueing():
    """Memory bounds a request's largest pass (a tiled map's tile, at most --max-batch-size
    maps), not its total cost: the budget stays the speed's, a tiled request of many tiles is
    admitted, and one whose single pass needs more than all the memory there is gets 413."""
    from runtime.tiling import Tiler
    from server.budget import Budget, check_cost
    budget = Budget(10.0, max_pass=0.2, pass_maps=4)
    check_cost("/encode", 1, (1024, 1024), 1, budget, Tiler(128, 64, 1))  # 225 small passes
    check_cost("/encode", 8, (128, 128), 1, budget)  # 2 passes of 4 maps: 0.066 MP each
    with pytest.raises(RequestError) as err:
        check_cost("/encode", 1, (512, 512), 1, budget)  # one 0.26 MP pass
    assert err.value.status == 413 and "largest forward pass (1 x 512x512)" in err.value.detail
