"""argparse types the project's commands share: a wrong value is an error naming what was
expected (argparse turns it into a usage line and exit code 2), never a traceback."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def number(text: str, kind: type, ok: Callable[[Any], bool], expected: str) -> Any:
    """`text` as `kind` when `ok` accepts it; else an error saying `expected`."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):  # NaN fails every comparison: refused too
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return number(text, int, lambda v: v >= 0, "an integer >= 0")


def non_negative_float(text: str) -> float:
    return number(text, float, lambda v: v >= 0, "a number >= 0")


def positive_float(text: str) -> float:
    return number(text, float, lambda v: v > 0, "a number > 0")
