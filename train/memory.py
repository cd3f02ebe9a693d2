"""Whether a training step fits the GPU: activation checkpointing on when it would not.

The estimate scales one measurement (bench/RESULTS.md, H200, first_radio at 320x320, batch 8,
phase 2, LPIPS on: peak 85.9 GiB with TF32 / fp32 activations, 30.0 GiB with bf16 autocast)
by the network's activation volume: per map, the sum over resolution levels of width x pixels,
once per residual block (encoder `num_res_blocks`, decoder one more). That measurement gives
the bytes kept per unit of that volume; the weights, their gradients, AdamW's two moments and
the EMA copy come on top. It is an estimate, never measured on other GPUs: a wrong guess costs
speed (checkpointing on, ~20% slower) or an out-of-memory error at the first step (before the
run folder is touched), which `trainer.gradient_checkpointing: true` then avoids.
"""
from __future__ import annotations

from typing import Union

from model.config import DDConfig

# bytes kept for the backward pass per unit of activation volume (calibrated, see above)
BYTES_PER_UNIT = {"fp32": 99.0, "half": 34.0}
PARAMETER_COPIES = 5  # weights, gradients, AdamW exp_avg and exp_avg_sq, EMA
HEADROOM = 0.9  # use at most this share of the free memory
GIB = 2 ** 30


def activation_units(dd: DDConfig, size: tuple[int, int]) -> float:
    """Activation volume of one map of `size` through the encoder and the decoder."""
    h, w = size
    per_level = sum(dd.ch * mult * (h * w) / 4 ** level for level, mult in enumerate(dd.ch_mult))
    return per_level * (2 * dd.num_res_blocks + 1)


def step_bytes(dd: DDConfig, size: tuple[int, int], batch: int, half: bool,
               parameters: int) -> float:
    """Estimated peak GPU memory of a training step (bytes) without checkpointing."""
    per_unit = BYTES_PER_UNIT["half" if half else "fp32"]
    return batch * activation_units(dd, size) * per_unit + 4 * PARAMETER_COPIES * parameters


def choose_checkpointing(setting: Union[bool, str], device_type: str, needed: float,
                         free: float | None) -> tuple[bool, str | None]:
    """`trainer.gradient_checkpointing` resolved: true / false as set; 'auto' turns it on when
    the estimated step (`needed` bytes) exceeds HEADROOM of the `free` GPU memory, and off on a
    CPU (no change there). Returns the choice and the line that says why (None: nothing to say)."""
    if isinstance(setting, bool):
        return setting, None
    if device_type != "cuda" or free is None:
        return False, None
    on = needed > HEADROOM * free
    verdict = "on" if on else "off"
    return on, (f"activation checkpointing {verdict} (trainer.gradient_checkpointing: auto): a "
                f"step needs ~{needed / GIB:.1f} GiB by estimate without it, "
                f"{free / GIB:.1f} GiB of GPU memory is free"
                + ("; set it to false to force it off" if on else ""))
