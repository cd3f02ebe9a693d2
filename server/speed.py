"""The speed behind request budgets, recorded once per machine, weights and size.

A budget is the cost that fits in a share of the deadline at the endpoint's speed. Timed once
per start, under whatever load the machine had, it moved 9.5x between starts and differed
between replicas (the same request admitted by one, 413 from the other). So the speed is
measured once, after the kernel choices are settled (runtime/decision.py), as the median of
several runs (on a CPU, of the runs' CPU time over their threads, which another job on the
machine barely moves; server/apis.py), and recorded in a JSON file beside the inference decision; every worker, replica
and restart on the machine reads it and budgets from the same figure. Without a decision file
(an ONNX export, an unwritable cache) each start measures, with the same robust statistic.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

from model.manifest import write_json_atomic
from runtime.decision import file_lock

from .logs import LOGGER

logger = logging.getLogger(LOGGER)
Speed = dict[str, float]  # seconds_per_megapixel, bytes_per_megapixel


def recorded(path: Optional[Path], entry: str, measure: Callable[[], Speed]) -> Speed:
    """The speed recorded under `entry` in `path`, else `measure()`d and recorded there (under
    the file's lock, so that workers starting together measure one at a time)."""
    if path is None:
        return {**measure(), "source": "measured"}
    with file_lock(path.with_suffix(".lock")):
        records = _read(path)
        if entry in records:
            return {**records[entry], "source": f"recorded in {path}"}
        speed = measure()
        records[entry] = {**speed, "measured_on": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write(path, records)
        return {**speed, "source": "measured"}


def _read(path: Path) -> dict:
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def _write(path: Path, records: dict) -> None:
    try:
        write_json_atomic(path, records)
    except OSError as err:
        logger.warning("cannot record the measured speed in %s: %s (each start measures)",
                       path, err)
