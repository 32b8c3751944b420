"""Helpers shared by the benchmarks: environment fingerprint, peak-memory sampling, markdown."""

from __future__ import annotations

import os
import platform
import threading
import time

import torch


def fingerprint() -> str:
    """One line naming what the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}")


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Samples RSS every millisecond in a thread; ``peak`` is the growth over the starting RSS."""

    def __enter__(self):
        self.start = rss_bytes()
        self.max = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.max = max(self.max, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.max = max(self.max, rss_bytes())
        self.peak = self.max - self.start
        return False


def md_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
