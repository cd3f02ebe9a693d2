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


def before_checkpoint(records: list[dict], step: int) -> list[dict]:
    """The records a run had written when it saved its checkpoint at `step`: those of earlier
    steps and that checkpoint's own `val/` record (a train record at step s is logged after
    s + 1 optimizer steps, a `val/` record at s after s)."""
    return [r for r in records if r.get("step", 0) < step
            or (r.get("step") == step and any(k.startswith("val/") for k in r))]


class RunLogger:
    """Appends `{"step": s, name: value, ...}` records; rank 0 only (others pass enabled=False).

    When resuming from the checkpoint at `start_step`, records a killed run wrote after that
    checkpoint are dropped first (`before_checkpoint`), in TensorBoard too: each step appears
    once. (A fresh run starts in an empty folder: the trainer moves an earlier run aside.)
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = before_checkpoint(read_metrics(run_dir), start_step)
        if self.path.is_file():
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir), purge_step=start_step)
            for record in kept:  # the purge hides the checkpoint's own val/ record: re-add it
                if record["step"] == start_step:
                    self._add_scalars(start_step, {k: float(v) for k, v in record.items()
                                                   if k != "step"})

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _json_number(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._add_scalars(step, scalars)

    def _add_scalars(self, step: int, scalars: dict[str, float]) -> None:
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
