"""Checkpoint files: atomic writes, safe reads, where a name or run directory points, and strict
loading of a state dict into a module. Which weights of a file make the network, and the
network itself: model/loading.py.

One file format serves training, export and serving: a dict with `model` (the autoencoder's
state dict; the trainer adds the loss modules under `loss.`), `ema` (upstream layout:
`ema_model.`-prefixed keys), `step`, and `config` (the resolved run config, so the file is
self-describing), plus `latent_stats` once `python -m train latent-stats` has run (plain
floats, lists and strings). Upstream RadioDiff `model-N.pt` files have the same layout minus
`config`.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from .pickle_scan import disallowed_globals

EMA_PREFIX = "ema_model."
LATENT_STATS_KEY = "latent_stats"  # written by `python -m train latent-stats`
_MILESTONE = re.compile(r"model-(\d+)\.pt$")
# the parts of torch.load's errors that advise loading with weights_only=False, or allowlisting
_TORCH_ADVICE = re.compile(r"weights.only|safe_globals|Weights only load failed|file an issue|"
                           r"Check the documentation", re.IGNORECASE)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # bundled models, by name


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the network; the message names the file."""


def refuse_bundled(path: str | Path) -> None:
    """Bundled models (model/weights/*) are read-only to every command: refuse to write one."""
    path = Path(path).resolve()
    if path.parent == WEIGHTS_DIR and path.exists():
        raise CheckpointError(f"{path}: a bundled model file, read-only to every command "
                              "(exports verify against its SHA-256): write to another file")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` with torch.save via a temp file + rename, so a crash leaves no torn file.
    A bundled model file is never overwritten (refuse_bundled)."""
    path = Path(path)
    refuse_bundled(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; serving containers run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The `model-N.pt` with the highest N in `run_dir`, or None."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("model-*.pt")
             if (m := _MILESTONE.search(p.name))]
    return max(found)[1] if found else None


def bundled_checkpoint(name: str | Path) -> Path | None:
    """The file of a bundled model name (`reference`: model/weights/reference.pt), else None."""
    if Path(name).parent != Path(".") or str(name).endswith(".pt"):
        return None
    path = WEIGHTS_DIR / f"{name}.pt"
    return path if path.is_file() else None


def resolve_checkpoint(path_or_dir: str | Path) -> Path:
    """A checkpoint file, the latest `model-N.pt` of a run directory, or a bundled model name
    (a path that exists wins over the name)."""
    path = Path(path_or_dir)
    bundled = None if path.exists() else bundled_checkpoint(path)
    if bundled is not None:
        return bundled
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: directory holds no model-N.pt checkpoint")
        return found
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))) or "none"
        raise CheckpointError(f"{path}: no such checkpoint file or run directory, nor a bundled "
                              f"model name (bundled: {names})")
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    digest: Any = None) -> dict:
    """torch.load with weights_only=True; a torn, foreign or unsafe file is a CheckpointError.
    `digest` (a hashlib object), when given, is fed the bytes of the open file torch.load then
    reads, so a hash names exactly what was loaded even if the path is replaced meanwhile."""
    path = resolve_checkpoint(path)
    try:
        with open(path, "rb") as f:
            if digest is not None:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
                f.seek(0)
            obj = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load raises many types on torn or foreign bytes
        raise CheckpointError(f"{path}: {_load_failure(path, err)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    return obj


def _load_failure(path: Path, err: Exception) -> str:
    """A file that references code or foreign classes is refused, naming them; any other is not a
    checkpoint. Never torch's advice to retry without weights_only: that would run the code."""
    unsafe = disallowed_globals(path)
    if unsafe:
        return (f"refused: the file references code or classes a weights-only load does not "
                f"allow (nothing was run): {_summarise(unsafe, 3)}")
    foreign = _foreign_content(path)
    if foreign is not None:
        return (f"not a torch checkpoint: expected a file written by torch.save (a zip "
                f"archive), found {foreign}")
    return (f"not a readable torch checkpoint (truncated, or not written by torch.save): "
            f"{type(err).__name__} {_torch_detail(err)}").rstrip()


def _foreign_content(path: Path) -> str | None:
    """What a file that is neither a zip archive nor a pickle holds (an empty file, text,
    other bytes), or None for a zip or a pickle (torch's own error then says what is wrong)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "an empty file"
    if head.startswith(b"PK") or head[0] == 0x80:  # zip (torch.save) or pickle (legacy)
        return None
    text = head.decode("utf-8", "replace")
    text = text[:-4] if len(head) == 64 else text  # the cut may split a character
    if any(c == "\ufffd" or (c < " " and c not in "\t\n\r") for c in text):
        return f"other bytes (starting {head[:8].hex(' ')})"
    first = (text.strip().splitlines() or [""])[0]
    return f"a text file (starting {first[:40]!r})"


def _torch_detail(err: Exception) -> str:
    """The line of a torch error that says what is wrong, without its advice on weights_only."""
    for line in str(err).splitlines():
        line = line.split("WeightsUnpickler error:", 1)[-1].strip()
        if line and not _TORCH_ADVICE.search(line):
            return line
    return ""


def latent_stats(ckpt: dict) -> dict | None:
    """The latent statistics `python -m train latent-stats` stored in a checkpoint, or None."""
    stats = ckpt.get(LATENT_STATS_KEY)
    return stats if isinstance(stats, dict) and "scale_factor" in stats else None


def _summarise(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_finite(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """CheckpointError when a weight tensor holds NaN or Inf (a diverged run: every output
    would be NaN)."""
    broken = [k for k, v in state.items() if isinstance(v, torch.Tensor)
              and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointError(f"{source}: {len(broken)} network weight tensors hold NaN or Inf "
                              f"(a diverged run?): {_summarise(broken, 3)}")


def load_into(model: torch.nn.Module, state: dict[str, Any], source: str | Path) -> None:
    """Load the keys `model` owns (others are dropped, as upstream); name any mismatch."""
    own = model.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = [k for k in own if k not in tensors]
    if len(missing) == len(own):
        raise CheckpointError(f"{source}: no autoencoder weights found; top-level keys: "
                              f"{_summarise(sorted(map(str, state)))}")
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} network weights missing: "
                              f"{_summarise(missing)}")
    wrong = [f"{k} {tuple(tensors[k].shape)} (network expects {tuple(v.shape)})"
             for k, v in own.items() if tensors[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{source}: shape mismatch, the config does not match the "
                              f"checkpoint: {_summarise(wrong, 3)}")
    check_finite({k: tensors[k] for k in own}, source)
    model.load_state_dict({k: tensors[k] for k in own}, strict=True)
