"""`python -m train report RUN_DIR`: one self-contained HTML page (images inlined) with a curve
per logged term, the phase switch marked, the sample grids and the validation table."""
from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import yaml

from model.metrics import METRIC_NAMES
from train.logging import METRICS_FILE, read_metrics

SAMPLES_SHOWN = 4  # the latest sample grids; older ones stay in RUN_DIR
_SAMPLE = re.compile(r"sample-(\d+)\.png$")


def _series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[name]) for r in records
              if isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool)]
    return [s for s, _ in points], [v for _, v in points]


def phase_switch(records: list[dict], config: dict | None) -> int | None:
    """The step phase 2 began: the run's disc_start if reached, else the first logged step
    with disc_factor > 0 (logs are every log_freq steps, so this may be later)."""
    last = max(r["step"] for r in records)
    start = ((config or {}).get("model") or {}).get("lossconfig", {}).get("disc_start")
    if isinstance(start, int):
        return start if start <= last else None
    steps, factors = _series(records, "train/disc_factor")
    return next((s for s, f in zip(steps, factors) if f > 0), None)


def _plot(name: str, steps: list[int], values: list[float], switch: int | None) -> str:
    """One curve as an inline PNG data URI."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=90)
    ax.plot(steps, values, lw=1.2)
    positive = [v for v in values if v > 0]
    if len(positive) == len(values) and max(values) > 100 * min(values):
        ax.set_yscale("log")
    if switch is not None:
        ax.axvline(switch, color="tab:red", ls="--", lw=1, label=f"phase 2 from step {switch}")
        ax.legend(loc="best", fontsize=8)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return _data_uri(buf.getvalue())


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _validation_table(records: list[dict]) -> str:
    rows = [r for r in records if "val/psnr" in r]
    if not rows:
        return "<p>No validation yet (it runs at each checkpoint).</p>"
    head = "".join(f"<th>{c}</th>" for c in METRIC_NAMES)
    body = "".join(
        f"<tr><td>{r['step']}</td>"
        + "".join(f"<td>{_cell(r.get('val/' + c, 'nan'))}</td>" for c in METRIC_NAMES)
        + "</tr>" for r in rows)
    return f"<table><tr><th>step</th>{head}</tr>{body}</table>"


def _cell(value: float | str) -> str:
    """A table value; the log writes NaN / Inf as strings."""
    return f"{value:.5g}" if isinstance(value, (int, float)) else html.escape(str(value))


def _samples(run_dir: Path) -> str:
    found = sorted((int(m.group(1)), p) for p in run_dir.glob("sample-*.png")
                   if (m := _SAMPLE.search(p.name)))
    if not found:
        return "<p>No sample grids yet.</p>"
    figures = [f"<figure><img src='{_data_uri(p.read_bytes())}'><figcaption>{p.name}"
               "</figcaption></figure>" for _, p in found[-SAMPLES_SHOWN:]]
    return ("<p>Each row: input | reconstruction (EMA weights) | |error| x4.</p>"
            + "".join(figures))


def build_report(run_dir: str | Path) -> str:
    """The report's HTML for a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir / METRICS_FILE}: missing or empty; is {run_dir} a "
                                "results_folder written by `python -m train`?")
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else ""
    switch = phase_switch(records, yaml.safe_load(config_text) if config_text else None)
    names = sorted({k for r in records for k in r if k != "step" and not k.startswith("val/")})
    names += sorted({k for r in records for k in r if k.startswith("val/") and k != "val/maps"})
    curves = "".join(f"<img src='{_plot(n, *_series(records, n), switch)}'>" for n in names)
    config_html = (f"<details><summary>config.yaml</summary><pre>{html.escape(config_text)}"
                   "</pre></details>" if config_text else "")
    last = max(r["step"] for r in records)
    phase = (f"phase 1 (reconstruction + KL) until step {switch}, phase 2 (adversarial) after"
             if switch is not None else "phase 1 only (disc_start not reached)")
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>radiodiff-vae run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto}} img{{margin:4px}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
figure{{display:inline-block}}</style></head><body>
<h1>Run {html.escape(str(run_dir))}</h1>
<p>Logged up to step {last}; {phase}.</p>{config_html}
<h2>Validation (EMA weights, maps in [0, 1])</h2>{_validation_table(records)}
<h2>Sample grids</h2>{_samples(run_dir)}
<h2>Logged terms</h2>{curves}
</body></html>
"""


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report (default RUN_DIR/report.html) and return its path."""
    path = Path(out) if out else Path(run_dir) / "report.html"
    text = build_report(run_dir)
    path.write_text(text)
    return path
