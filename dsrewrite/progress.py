"""A minimal progress bar on stderr for long work (measuring), silent when quiet."""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress("measuring layers", total) as p: p.advance()``; redraws in place on a terminal."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream=None):
        self.label, self.total, self.enabled = label, max(total, 1), enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __enter__(self) -> "Progress":
        self._draw()
        return self

    def advance(self, note: str = "") -> None:
        """One more step done."""
        self.done += 1
        self._draw(note)

    def _draw(self, note: str = "") -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        text = f"{self.label} [{bar}] {self.done}/{self.total} {time.monotonic() - self.start:.0f}s {note}"
        if self._tty:
            self.stream.write("\r" + text[:120].ljust(120))
        elif self.done in (0, self.total) or self.done % max(self.total // 4, 1) == 0:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __exit__(self, *exc) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()
