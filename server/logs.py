"""One log format for the main process and the spawned inference workers (which start bare)."""
from __future__ import annotations

import logging
import sys

from runtime.progress import LOG_FORMAT

LOGGER = "radiodiff.server"


def configure_logging(level: str) -> logging.Logger:
    """The server's logger, and runtime/'s (the inference decision, autotune's table), in the
    one format (runtime/progress.py LOG_FORMAT)."""
    for name in (LOGGER, "runtime"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            logger.addHandler(handler)
        logger.setLevel(level.upper())
    return logging.getLogger(LOGGER)
