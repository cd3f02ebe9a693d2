"""One log format for the main process and the spawned inference workers (which start bare)."""
from __future__ import annotations

import logging

from runtime.progress import configure_logging as configure_loggers

LOGGER = "radiodiff.server"


def configure_logging(level: str) -> logging.Logger:
    """The server's logger, and runtime/'s (the inference decision, autotune's table), on
    stderr in the one format (runtime/progress.py)."""
    configure_loggers((LOGGER, "runtime"), getattr(logging, level.upper()))
    return logging.getLogger(LOGGER)
