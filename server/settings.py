"""Server options: command line first, then `RADIODIFF_*` environment variables, then defaults."""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional

from runtime.arguments import (non_negative_float, non_negative_int, number, positive_float,
                               positive_int)

from .queueing import default_queue

ENV_PREFIX = "RADIODIFF_"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess directory


@dataclass(frozen=True)
class Settings:
    model: str
    backend: Optional[Literal["onnx", "torch"]] = None  # None: chosen from what --model is
    device: Literal["auto", "cuda", "cpu"] = "auto"
    host: str = "0.0.0.0"
    port: int = 8000
    workers_per_device: int = 1
    threads: int = 0  # intra-op threads per inference worker; 0: the library's default
    api_servers: int = 1
    max_batch_size: int = 16
    batch_timeout: float = 0.01
    timeout: float = 30.0
    max_queue: Optional[int] = None  # None: server/queueing.py's default_queue
    max_queue_mb: float = 256.0  # payload bytes an endpoint's queue may hold
    header_timeout: float = 10.0  # seconds a new connection has to send its request head
    body_timeout: float = 60.0  # seconds a request body may take to arrive
    max_body_mb: float = 64.0
    max_pixels: int = 512 * 512
    max_tiled_pixels: int = 4096 * 4096  # model/io.py's PNG decoding bound
    tile: Optional[int] = None  # map pixels per tile side; None: the model's training size
    tile_overlap: Optional[int] = None  # None: half a tile
    max_request_maps: int = 64
    max_request_cost: Optional[float] = None  # megapixels; None: measured (server/budget.py)
    resolution: Optional[tuple[int, int]] = None
    config: Optional[str] = None
    api_key_env: Optional[str] = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    path: str = "auto"  # torch backend: auto (measured: runtime.decision.choose), default, a name
    autotune_budget: float = 60.0  # seconds --path auto may spend measuring (then: recorded)
    allow_inaccurate_path: bool = False  # serve a pinned path that fails the accuracy gate
    trusted_proxies: str = ""  # comma-separated peers whose X-Real-IP names the client
    shutdown_timeout: float = 10.0
    # per HTTP process: open connections and requests in progress (uvicorn's limit_concurrency:
    # past it, 503); the bound on upload memory is about max_connections x max_body_mb
    max_connections: int = 64
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    max_worker_restarts: int = 3  # per 10 minutes (server/supervisor.py); more stop the server
    log_level: str = "info"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def queue_capacity(self) -> int:
        """Requests that may wait per endpoint: --max-queue, else the default."""
        return self.max_queue or default_queue(self.max_batch_size, self.workers_per_device)


def resolve_accelerator(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without one is an error."""
    import torch  # here, not at module level: parsing options needs no torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _port(text: str) -> int:
    return number(text, int, lambda v: 1024 <= v <= 65535, "a port in 1024..65535")


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _default(name: str) -> str:
    return f"(default {Settings.__dataclass_fields__[name].default})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server", allow_abbrev=False,
        description="Serve a RadioDiff VAE over HTTP: POST /encode, /decode, /reconstruct. "
                    f"Every option can also be set as an environment variable {ENV_PREFIX}<OPTION> "
                    f"(e.g. {ENV_PREFIX}MAX_BATCH_SIZE=8); the command line wins.")
    add = p.add_argument
    add("--model", help="an export directory (python -m export; serves with onnx) or a "
                        "checkpoint / run directory (serves with torch)")
    add("--backend", choices=["onnx", "torch"],
        help="default: onnx for an export directory, torch for a checkpoint")
    add("--device", choices=["auto", "cuda", "cpu"], help=f"cuda if present {_default('device')}")
    add("--host", choices=["0.0.0.0", "127.0.0.1", "::", "localhost"], help=_default("host"))
    add("--port", type=_port, help=_default("port"))
    add("--workers-per-device", type=positive_int,
        help=f"inference processes per device and endpoint {_default('workers_per_device')}")
    add("--threads", type=non_negative_int,
        help="CPU threads per inference process, 0: one per core; with several processes on "
             f"few cores, 1 avoids oversubscription {_default('threads')}")
    add("--api-servers", type=positive_int,
        help=f"HTTP processes that parse and encode payloads {_default('api_servers')}")
    add("--max-batch-size", type=positive_int,
        help=f"requests merged into one batch, and maps per forward pass "
             f"{_default('max_batch_size')}")
    add("--batch-timeout", type=non_negative_float,
        help=f"seconds a batch waits to fill {_default('batch_timeout')}")
    add("--timeout", type=positive_float,
        help="seconds from queueing to answer: a request not answered by then gets 504 (still "
             f"queued: it never runs; running: its result is discarded) {_default('timeout')}")
    add("--max-queue", type=positive_int, metavar="N",
        help="requests that may wait per endpoint; more get 429 with Retry-After (default: 2 x "
             "--max-batch-size x --workers-per-device)")
    add("--max-body-mb", type=positive_float, help=f"request body limit {_default('max_body_mb')}")
    add("--max-pixels", type=positive_int, help=f"H*W limit per map {_default('max_pixels')}")
    add("--max-tiled-pixels", type=positive_int,
        help="H*W limit per map when it is tiled; a map over --max-pixels is tiled up to this "
             f"size, unless the request says tiled=false {_default('max_tiled_pixels')}")
    add("--tile", type=positive_int,
        help="tile side in map pixels for tiled requests (a multiple of the downsampling "
             "factor; default: the size the model was trained at, as diffusers tiles)")
    add("--tile-overlap", type=non_negative_int,
        help="overlap of neighbouring tiles in map pixels (a multiple of the downsampling "
             "factor, below --tile; default: half a tile)")
    add("--max-request-maps", type=positive_int,
        help=f"maps per request {_default('max_request_maps')}")
    add("--max-request-cost", type=positive_float, metavar="MEGAPIXELS",
        help="compute budget per request, in megapixels of output maps (maps x H x W after "
             "?resize); larger requests get 413 (default: what each endpoint computes in half "
             "of --timeout, timed at start)")
    add("--resolution", type=positive_int, nargs=2, metavar=("H", "W"),
        help="accept only HxW maps (default: any multiple of the downsampling factor)")
    add("--config", help="model YAML for an upstream checkpoint that stores no config")
    add("--api-key-env", metavar="NAME",
        help="require the API key held in environment variable NAME")
    add("--precision", choices=["auto", "fp32", "bf16", "fp16"],
        help="torch backend: the network's arithmetic; auto: as --path decides; fp32, bf16 or "
             "fp16: the fastest path measured (as --path auto) among those computing in that "
             "precision (bf16 / fp16 need CUDA, or for bf16 a CPU with native bf16; "
             f"accuracy-gated like --path) {_default('precision')}")
    add("--path", metavar="auto|default|NAME",
        help="torch backend: the inference path; auto measures the candidates on this machine "
             "at the served size once and records the decision for every worker and replica "
             "(per machine, weights and size; GET /info shows the table), default is the "
             "plain fp32 network (the same on every machine), a name such as "
             "'bf16+channels_last' pins one "
             "(docs/performance.md); any path but plain fp32 must stay within 50 dB of fp32 on "
             f"these weights or the server refuses to start {_default('path')}")
    add("--allow-inaccurate-path", action="store_const", const=True,
        help="serve a pinned --path / --precision that fails the 50 dB accuracy gate (GET /info "
             "shows it)")
    add("--max-queue-mb", type=positive_float, metavar="MB",
        help="payload megabytes one endpoint's queue may hold (past it, 429) "
             f"{_default('max_queue_mb')}")
    add("--trusted-proxies", metavar="ADDR[,NET]",
        help="addresses or networks (10.0.0.0/8) of load balancers whose X-Real-IP header "
             "names the client, for fair shares per client (default: none: each connection's "
             "own address; behind a proxy, set it, or every client shares one share)")
    add("--autotune-budget", type=non_negative_float, metavar="S",
        help="seconds --path auto may spend measuring candidates at start when nothing is "
             "recorded; the ones not reached are skipped " f"{_default('autotune_budget')}")
    add("--shutdown-timeout", type=positive_float,
        help=f"seconds in-flight requests get after SIGTERM {_default('shutdown_timeout')}")
    add("--max-connections", type=positive_int,
        help="connections and requests in progress per HTTP process; past it new ones get 503 "
             f"(upload memory stays under about this x --max-body-mb) {_default('max_connections')}")
    add("--header-timeout", type=positive_float, metavar="S",
        help="seconds a new connection has to send a whole request head; then it is closed "
             "(idle connections count against --max-connections only once they send) "
             f"{_default('header_timeout')}")
    add("--body-timeout", type=positive_float, metavar="S",
        help=f"seconds a request body may take to arrive; then 408 {_default('body_timeout')}")
    add("--keep-alive-timeout", type=positive_float,
        help=f"seconds an idle keep-alive connection is kept {_default('keep_alive_timeout')}")
    add("--max-worker-restarts", type=non_negative_int, metavar="N",
        help="restarts of inference workers that died after they were ready, per 10 minutes; "
             "one more stops the server (a worker that dies before it is ready always does) "
             f"{_default('max_worker_restarts')}")
    add("--log-level", choices=["critical", "error", "warning", "info", "debug"],
        help=_default("log_level"))
    return p


def _from_env(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> dict:
    """Options given as RADIODIFF_* variables, converted and checked like the command line."""
    values = {}
    for action in parser._actions:  # argparse exposes no public list of its options
        if not action.option_strings or action.dest == "help":
            continue
        name = ENV_PREFIX + action.dest.upper()
        if name not in environ:
            continue
        raw = environ[name]
        try:
            values[action.dest] = _convert(action, raw)
        except argparse.ArgumentTypeError as err:
            parser.error(f"{name}={raw!r}: {err}")
    return values


def _convert(action: argparse.Action, raw: str):
    if action.nargs == 2:
        parts = raw.replace(",", " ").split()
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected two values such as '256,256', got {raw!r}")
        return [action.type(p) for p in parts]
    if isinstance(action, argparse._StoreConstAction):
        return _bool(raw)
    value = action.type(raw) if action.type else raw
    if action.choices is not None and value not in action.choices:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, action.choices))}")
    return value


def parse_settings(argv: Optional[Sequence[str]] = None,
                   environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Settings from argv (default sys.argv[1:]) over environ (default os.environ)."""
    environ = os.environ if environ is None else environ
    parser = _parser()
    if ENV_PREFIX + "BF16" in environ:  # retired: a silent fall-back to the default would hide it
        parser.error(f"{ENV_PREFIX}BF16 was replaced by {ENV_PREFIX}PRECISION=bf16 "
                     "(or fp16, fp32, auto)")
    values = _from_env(parser, environ)
    given = parser.parse_args(argv)
    values.update({k: v for k, v in vars(given).items() if v is not None})
    if not values.get("model"):
        parser.error(f"--model (or {ENV_PREFIX}MODEL) is required")
    if "resolution" in values:
        values["resolution"] = tuple(values["resolution"])
    known = {f.name for f in dataclasses.fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in known})
