"""Progress on stderr for long work (measuring, calibrating, distilling), silent when quiet.

On a terminal the bar redraws in place. When stderr is a file or a pipe (CI logs,
``2> log``) it writes whole lines instead: one when the work starts, one at least every
``interval`` seconds while it runs, and one when it ends, so a log shows that work moves
even when one step takes minutes. Work inside a step (a least-squares fit, one batch of
many) calls :func:`heartbeat`, which refreshes the innermost running bar's note.
"""

from __future__ import annotations

import sys
import time

#: seconds between two lines when stderr is not a terminal (tests make it 0)
LINE_INTERVAL = 5.0
_active: list["Progress"] = []


class Progress:
    """``with Progress("measuring layers", total) as p: p.advance()``."""

    def __init__(self, label: str, total: int | None, enabled: bool = True, stream=None, interval: float | None = None):
        self.label, self.enabled = label, enabled
        self.total = max(total, 1) if total is not None else None  # None: unknown (a loader without len)
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self.interval = LINE_INTERVAL if interval is None else interval
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_line = -float("inf")
        self._note = ""

    def __enter__(self) -> "Progress":
        _active.append(self)
        self._draw(force=True)
        return self

    def advance(self, note: str = "") -> None:
        """One more step done."""
        self.done += 1
        self._note = note
        self._draw(force=self.total is not None and self.done >= self.total)

    def heartbeat(self, note: str) -> None:
        """Work inside the current step moved: show ``note`` (at most one line per interval off a terminal)."""
        self._note = note
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.total is None:
            text = f"{self.label} {self.done} done {now - self.start:.0f}s {self._note}".rstrip()
        else:
            width = 24
            filled = int(width * min(self.done, self.total) / self.total)
            bar = "#" * filled + "-" * (width - filled)
            text = f"{self.label} [{bar}] {self.done}/{self.total} {now - self.start:.0f}s {self._note}".rstrip()
        if self._tty:
            self.stream.write("\r" + text[:120].ljust(120))
        elif force or now - self._last_line >= self.interval:
            self.stream.write(text + "\n")
            self._last_line = now
        else:
            return
        self.stream.flush()

    def __exit__(self, *exc) -> None:
        if self in _active:
            _active.remove(self)
        if not self.enabled:
            return
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
        elif self.total is not None and self.done < self.total and exc[0] is None:  # stopped early (e.g. --max-steps): say where
            self.stream.write(f"{self.label}: stopped at {self.done}/{self.total} "
                              f"{time.monotonic() - self.start:.0f}s\n")
            self.stream.flush()


def heartbeat(note: str) -> None:
    """Tell the innermost running progress bar (if any) that work inside its step moved."""
    if _active:
        _active[-1].heartbeat(note)
