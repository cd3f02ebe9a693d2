"""`python -m server --model DIR_OR_CKPT ...`: serve the VAE over HTTP (see docs/server.md)."""
from __future__ import annotations

from runtime.openmp import prefer_passive_wait

prefer_passive_wait()  # before anything imports torch (runtime/openmp.py)

import errno
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

from .logs import configure_logging
from .settings import METRICS_DIR_ENV, Settings, parse_settings, resolve_accelerator

CHILD_STOP_TIMEOUT = 5.0


def main(argv: Optional[Sequence[str]] = None) -> int:
    settings = parse_settings(argv)
    logger = configure_logging(settings.log_level)
    try:
        spec, limits, api_key = _prepare(settings)
    except (ValueError, RuntimeError) as err:
        logger.error("cannot start: %s", err)
        return 2
    metrics_dir, own_dir = _metrics_dir()
    from .app import RadioDiffServer  # imports prometheus_client: after its directory is set
    from .connections import with_header_deadline

    server = None
    try:
        server = RadioDiffServer(settings, spec, limits, api_key)
        _handle_stop_signals(server)
        server.run(host=settings.host, port=settings.port, num_api_servers=settings.api_servers,
                   log_level=settings.log_level, generate_client_file=False,
                   limit_concurrency=settings.max_connections,
                   timeout_keep_alive=settings.keep_alive_timeout,
                   http=with_header_deadline(settings.header_timeout))
    except (EOFError, ConnectionError) as err:  # the main thread's wait on the manager broke
        logger.error("server failed: the queue process died (%s)", type(err).__name__)
        return 1
    except (RuntimeError, ValueError, OSError) as err:
        logger.error("server failed: %s: %s", type(err).__name__, err)
        return 1
    except KeyboardInterrupt:
        logger.info("interrupted")
    finally:
        _reap_children(logger)
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if server is not None and server.stop_reason:
        logger.error("server stopped: %s", server.stop_reason)
        return 1
    return 0


def _check_path_request(settings: Settings, spec, accelerator: str) -> None:
    """--path / --precision: torch backend options, checked as the request the workers will
    give runtime.decision.choose() (which holds the whole path policy)."""
    from runtime.decision import PathRequest

    if spec.backend != "torch":
        for option, value in (("--path", settings.path), ("--precision", settings.precision)):
            if value != "auto":
                raise ValueError(f"{option} applies to the torch backend (an export runs as "
                                 "exported)")
        return
    size = settings.resolution or spec.config_size
    request = PathRequest(tuple(size), settings.path, settings.precision,
                          allow_inaccurate=bool(settings.allow_inaccurate_path))
    request.name(accelerator)  # PathRequestError (a ValueError) naming the option


def _prepare(settings: Settings):
    """Everything checkable before a process starts: the model, the limits, the API key."""
    from .queueing import trusted_networks
    from .spec import describe_model, limits_of

    spec = describe_model(settings)
    limits = limits_of(settings, spec)
    accelerator = resolve_accelerator(settings.device)  # --device cuda without one: stop here
    _check_path_request(settings, spec, accelerator)
    api_key = None
    if settings.api_key_env:
        api_key = os.environ.get(settings.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env {settings.api_key_env}: that environment variable "
                             "is unset or empty")
    trusted_networks(settings.trusted_proxies)  # ValueError naming a bad entry
    _check_port(settings.host, settings.port)
    return spec, limits, api_key


def _check_port(host: str, port: int) -> None:
    """Bind host:port as uvicorn will, before any process starts: a taken port is an error that
    names it (uvicorn's own is '[Errno 98] Address already in use', no port, and exit 3)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise RuntimeError(f"port {port} on {host} is already in use ({err.strerror}): "
                                   "stop what holds it, or choose another --port") from None
            raise RuntimeError(f"cannot listen on port {port} on {host} ({err.strerror})") from None


def _metrics_dir() -> tuple[Path, bool]:
    """Point PROMETHEUS_MULTIPROC_DIR at a directory; returns it and whether we created it."""
    existing = os.environ.get(METRICS_DIR_ENV)
    if not existing:
        path = Path(tempfile.mkdtemp(prefix="radiodiff-metrics-"))
        os.environ[METRICS_DIR_ENV] = str(path)
        return path, True
    path = Path(existing)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):  # a previous run's samples would be counted again
        stale.unlink()
    return path, False


def _handle_stop_signals(server) -> None:
    """SIGTERM / SIGINT: a graceful, bounded stop of every process.

    litserve's main process waits on a manager Event; a signal must not interrupt that wait
    (its connection would be left mid-call), so a helper thread sets the Event instead. The
    forked HTTP processes inherit this handler: there uvicorn has already drained (it handles
    the signal itself, then re-raises it), so they just exit.
    """
    main_pid = os.getpid()

    def on_signal(signum, frame):
        if os.getpid() != main_pid:
            raise SystemExit(0)
        if not server.started():
            raise KeyboardInterrupt
        threading.Thread(target=server.request_stop, name="stop", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _reap_children(logger) -> None:
    """Whatever child process is left (e.g. after a failed start) is stopped, within a bound."""
    for child in mp.active_children():
        child.terminate()
    for child in mp.active_children():
        child.join(CHILD_STOP_TIMEOUT)
        if child.is_alive():
            logger.warning("killing child process %s (pid %s)", child.name, child.pid)
            child.kill()
            child.join(1.0)


if __name__ == "__main__":
    sys.exit(main())
