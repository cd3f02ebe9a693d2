"""Progress of long jobs (eval, latent-stats, latent shards, ray tracing, autotune), and the one
log-line format the project's commands and the server share.

On a terminal a tqdm bar on stderr; elsewhere (a log file, a job scheduler, a pipe) a plain
line every tenth of the work or every PERIOD_S seconds, whichever comes first, plus the last:

    2025-01-01 12:00:00,123 INFO [4242] eval: 120/568 maps (21%), 35 s, 3.4 maps/s, ~2 min left
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

from tqdm.auto import tqdm

# the server's format (server/logs.py): time, level, process id, message
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(message)s"
PERIOD_S = 30.0  # the longest silence between two lines off a terminal
STEPS = 10  # lines per job off a terminal (one every tenth), besides the time-based ones

T = TypeVar("T")


def log_line(message: str, level: str = "INFO") -> str:
    """`message` in LOG_FORMAT, stamped now."""
    record = logging.LogRecord("radiodiff", getattr(logging, level), "", 0, message, None, None)
    return logging.Formatter(LOG_FORMAT).format(record)


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is at the time of each record."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure_logging(names: Iterable[str] = ("runtime",), level: int = logging.INFO) -> None:
    """Show the INFO records of these loggers (autotune's one line per candidate, ...) on
    stderr in LOG_FORMAT; a logger that already has a handler is left alone."""
    for name in names:
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(_StderrHandler())
        logger.setLevel(level)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def status(desc: str, done: int, total: int, unit: str, seconds: float) -> str:
    """`desc: done/total unit (pct%), elapsed, rate, ~left`."""
    rate = done / seconds if seconds > 0 else 0.0
    text = f"{desc}: {done}/{total} {unit}"
    if total:
        text += f" ({100 * done / total:.0f}%)"
    text += f", {_duration(seconds)}, {rate:.3g} {unit}/s"
    if 0 < done < total and rate > 0:
        text += f", ~{_duration((total - done) / rate)} left"
    return text


class Progress:
    """Counts work done towards `total`; draws a bar on a terminal, else writes periodic lines
    to `stream` (default sys.stderr)."""

    def __init__(self, total: int, desc: str, unit: str = "maps", stream: TextIO | None = None,
                 period_s: float = PERIOD_S):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.period_s = period_s
        self.done = 0
        self.start = self.last = time.monotonic()
        self.next_count = self._step()
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream,
                        dynamic_ncols=True) if self.stream.isatty() else None

    def _step(self) -> int:
        return max(1, -(-self.total // STEPS))

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.done >= self.next_count or now - self.last >= self.period_s \
                or self.done >= self.total:
            self.write(status(self.desc, self.done, self.total, self.unit, now - self.start))
            self.last = now
            while self.next_count <= self.done:
                self.next_count += self._step()

    def write(self, message: str) -> None:
        """One line in LOG_FORMAT (above the bar on a terminal)."""
        if self.bar is not None:
            self.bar.write(log_line(message), file=self.stream)
        else:
            print(log_line(message), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], total: int, desc: str, unit: str = "maps",
          count: Callable[[T], int] = lambda _item: 1) -> Iterator[T]:
    """Yield `items`, counting `count(item)` units of progress after each."""
    with Progress(total, desc, unit) as progress:
        for item in items:
            yield item
            progress.update(count(item))
