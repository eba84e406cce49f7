"""A text progress bar for meshctl (no third-party dependency): redrawn in place on a terminal,
one line per tenth of the way otherwise (logs and pipes stay readable)."""

from __future__ import annotations

import sys
from typing import TextIO


class Bar:
    def __init__(self, label: str, total: float, unit: str = "", out: TextIO | None = None, width: int = 30) -> None:
        self.label, self.total, self.unit, self.width = label, max(total, 0.0), unit, width
        self.out = out or sys.stderr
        self._tty = self.out.isatty()
        self._last_step = -1

    def update(self, done: float, note: str = "") -> None:
        frac = min(1.0, done / self.total) if self.total else 1.0
        filled = int(frac * self.width)
        text = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {frac * 100:5.1f}% "
                f"{_fmt(done)}/{_fmt(self.total)}{self.unit}{'  ' + note if note else ''}")
        if self._tty:
            self.out.write("\r" + text)
            self.out.flush()
            return
        step = int(frac * 10)
        if step != self._last_step:
            self._last_step = step
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self._tty:
            self.out.write("\n")
            self.out.flush()


def _fmt(n: float) -> str:
    if n >= 10 * 2**20:
        return f"{n / 2**20:.1f}Mi"
    return f"{n:g}" if n == int(n) else f"{n:.1f}"
