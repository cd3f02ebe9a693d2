import contextlib
import threading
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch

from model.config import DDConfig, ModelConfig

torch.set_num_threads(1)  # tests share 2 cores with the server and worker processes they start


def tiny_model_config(size: int = 64, attn: list[int] | None = None) -> ModelConfig:
    """A 2.7 M-parameter network of the first_radio.yaml family (ch 32) for fast CPU tests."""
    dd = DDConfig(resolution=[size, size], ch=32, ch_mult=[1, 2, 4], num_res_blocks=1,
                  attn_resolutions=attn or [])
    return ModelConfig(embed_dim=3, ddconfig=dd)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return tiny_model_config()


# ---- process-starting tests ------------------------------------------------------------------

def pytest_collection_modifyitems(config, items):
    """The modules holding tests marked `server` (they start real processes: a `python -m
    server`, torchrun or accelerate ranks) run together, after every other module; the order
    inside a module, and of the modules inside each group, is kept."""
    starting = {item.nodeid.split("::")[0] for item in items
                if item.get_closest_marker("server") is not None}
    items[:] = sorted(items, key=lambda item: item.nodeid.split("::")[0] in starting)


_STOPPING: list[threading.Thread] = []


def stop_later(stop: Callable[[], None]) -> None:
    """Run `stop` (a server's shutdown, seconds of waiting) in a thread: the next test starts
    meanwhile; the session waits for every one of them before it ends."""
    thread = threading.Thread(target=stop, name="stop-server", daemon=True)
    thread.start()
    _STOPPING.append(thread)


def pytest_sessionfinish(session, exitstatus):
    # pytest loads this file as `conftest`; the test modules import it as `tests.conftest`, a
    # second instance with its own list
    import tests.conftest
    for thread in [*_STOPPING, *tests.conftest._STOPPING]:
        thread.join(120)


# Servers that several test modules share: one `python -m server` (the tiny model, untrained)
# per set of options for the whole session, started by the first module that asks for it.
# Modules whose tests change a server for good (SIGTERM, killed processes) start their own.
LIMITS_TIMEOUT = 5.0  # --timeout: every deadline of the queue tests
LIMITS_MAX_SIDE, LIMITS_MAX_MAPS = 1024, 64  # --max-pixels (as a side), --max-request-maps
LIMITS_MAX_QUEUE = 2
# tests/test_server_budget.py (--timeout short, so that the measured budget is well below what
# --max-pixels and --max-request-maps allow), tests/test_server_crash.py (a worker killed and
# restarted), tests/test_server_queue.py (a short queue, one request per batch)
LIMITS_SERVER = (
    "--timeout", str(LIMITS_TIMEOUT), "--max-pixels", str(LIMITS_MAX_SIDE ** 2),
    "--max-request-maps", str(LIMITS_MAX_MAPS), "--max-body-mb", "8",
    "--max-queue", str(LIMITS_MAX_QUEUE), "--max-batch-size", "1")
CONNECTIONS_MAX = 4  # --max-connections
# tests/test_server_connections.py and tests/test_server_uploads.py (which never run the model)
CONNECTIONS_SERVER = (
    "--max-connections", str(CONNECTIONS_MAX), "--keep-alive-timeout", "1",
    "--header-timeout", "2", "--max-pixels", str(1024 * 1024), "--max-body-mb", "8",
    "--timeout", "120", "--log-level", "info")


class Running(NamedTuple):
    """A server started by tests.test_server.running_server: its model folder and process."""
    root: Path
    url: str
    port: int
    proc: object  # subprocess.Popen
    log: Path


def _has_served(running: Running) -> bool:
    """Whether the server has run a batch: each moves the speed /info reports (the budget stays
    the recorded one)."""
    import requests
    text = requests.get(running.url + "/metrics", timeout=30).text
    return any(float(line.rsplit(" ", 1)[1]) > 0 for line in text.splitlines()
               if line.startswith("radiodiff_model_duration_seconds_count{"))


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    """shared_server(options, env=None, unused=False) -> Running: the session's server with
    these options, started on first use (again if it has died, or, with `unused`, if it has
    run a batch already) and stopped at the end of the session."""
    from tests.test_server import running_server, save_tiny_checkpoint
    started: dict[tuple, Running] = {}
    with contextlib.ExitStack() as stack:
        def get(options: tuple[str, ...], env: dict[str, str] | None = None,
                unused: bool = False) -> Running:
            key = (tuple(options), tuple(sorted((env or {}).items())))
            running = started.get(key)
            if running is None or running.proc.poll() is not None \
                    or (unused and _has_served(running)):
                root = tmp_path_factory.mktemp("shared-server")
                save_tiny_checkpoint(root)
                started[key] = Running(root, *stack.enter_context(
                    running_server(root, list(options), dict(env or {}))))
            return started[key]
        yield get
