"""Run logs: `metrics.jsonl` always, TensorBoard event files when tensorboard is installed."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order (a torn last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return records


class RunLogger:
    """Appends `{"step": s, name: value, ...}` records; rank 0 only (others pass enabled=False).

    Records at or past `start_step` already in the file (written by a killed run after its last
    checkpoint, or by an earlier run when starting afresh) are dropped first: each step appears
    once.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) < start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir), purge_step=start_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _json_number(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _json_number(value: float) -> float | str:
    """JSON has no NaN/Inf: write them as strings."""
    value = float(value)
    return value if math.isfinite(value) else str(value)
