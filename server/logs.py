"""One log format for the main process and the spawned inference workers (which start bare)."""
from __future__ import annotations

import logging
import sys

LOGGER = "radiodiff.server"


def configure_logging(level: str) -> logging.Logger:
    logger = logging.getLogger(LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    return logger
