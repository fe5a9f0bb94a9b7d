"""A tiny progress bar for stderr (the client stays free of tqdm)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class ProgressBar:
    """`done/total, %, items/s, ETA`. On a terminal it redraws one line; elsewhere (logs, tests) it
    writes a full line at most every `log_interval_s`, so a redirected stderr does not fill up."""

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        unit: str = "img",
        stream: TextIO | None = None,
        width: int = 30,
        log_interval_s: float = 5.0,
    ) -> None:
        self.total = total
        self.done = initial
        self._initial = initial  # resumed work does not count toward the rate
        self.unit = unit
        # None where the CLI started with stderr closed (`2>&-`): nothing is drawn, the work goes on.
        self.stream: TextIO | None = stream or sys.stderr
        self.width = width
        self._tty = self.stream is not None and self.stream.isatty()
        self._interval_s = 0.2 if self._tty else log_interval_s
        self._start = time.monotonic()
        self._last_draw = float("-inf")

    def rate(self) -> float:
        elapsed = time.monotonic() - self._start
        return (self.done - self._initial) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        rate = self.rate()
        eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
        bar = "#" * filled + "." * (self.width - filled)
        return f"[{bar}] {self.done}/{self.total} {100 * frac:5.1f}% {rate:8.1f} {self.unit}/s ETA {eta}"

    def update(self, n: int = 1, *, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if self.stream is not None and (force or now - self._last_draw >= self._interval_s):
            self._last_draw = now
            self.stream.write(("\r" if self._tty else "") + self.line() + ("" if self._tty else "\n"))
            self.stream.flush()

    def close(self) -> None:
        self.update(0, force=True)
        if self._tty and self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()
