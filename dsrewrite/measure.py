"""Stage 6, measure: wall-clock latency of a module on given inputs, done properly.

Warm-up runs, then timed repeats; the median and the spread are reported. Runs are in
eval and inference mode, with the device synchronized around each timed call, and with
the thread count, dtype and memory format under control. Every result carries an
environment fingerprint, because a latency means nothing without where it was measured.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import platform
import statistics
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import UsageError

#: The clock used for every timing; tests replace it with a fake one to stay deterministic.
clock: Callable[[], float] = time.perf_counter
MEMORY_FORMATS = ("contiguous", "channels_last")


@dataclasses.dataclass(frozen=True)
class MeasureSettings:
    """How to time a module."""

    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    threads: int | None = None  # CPU threads (None: torch's current setting)
    dtype: str = "float32"  # float32, bfloat16, float16
    memory_format: str = "contiguous"
    warmup: int = 3
    repeats: int = 10
    #: stop repeating early once this much time was spent timing (seconds), after at least 3 repeats.
    max_seconds: float = 20.0

    def resolved_device(self) -> str:
        """``auto`` → cuda if available, else mps, else cpu; an unavailable device is an error."""
        if self.device == "auto":
            if torch.cuda.is_available():
                return "cuda"
            if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                return "mps"
            return "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"device {self.device!r} is not available here (no CUDA)")
        if self.device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError("device 'mps' is not available here")
        return self.device


@dataclasses.dataclass
class Timing:
    """A latency measurement: seconds per call."""

    median: float
    p10: float
    p90: float
    mean: float
    repeats: int
    fingerprint: dict[str, Any]

    @property
    def spread(self) -> float:
        """(p90 − p10) / median: how noisy the measurement was."""
        return (self.p90 - self.p10) / self.median if self.median else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (seconds)."""
        return {"median_s": self.median, "p10_s": self.p10, "p90_s": self.p90, "mean_s": self.mean,
                "repeats": self.repeats, "spread": self.spread, "fingerprint": self.fingerprint}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fingerprint(settings: MeasureSettings) -> dict[str, Any]:
    """What a latency depends on: torch version, device name, threads, dtype, memory format."""
    device = settings.resolved_device()
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    elif device == "mps":
        name = "Apple MPS"
    else:
        name = _cpu_name()
    return {
        "torch": torch.__version__,
        "device": device,
        "device_name": name,
        "threads": settings.threads or torch.get_num_threads(),
        "dtype": settings.dtype,
        "memory_format": settings.memory_format,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare(module: nn.Module, inputs: tuple, settings: MeasureSettings) -> tuple[nn.Module, tuple]:
    """A copy of ``module`` and inputs on the device, in the dtype and memory format asked for."""
    if settings.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {settings.dtype!r} for measuring; choose from {', '.join(DTYPES)}")
    if settings.memory_format not in MEMORY_FORMATS:
        raise UsageError(f"unknown memory format {settings.memory_format!r}; choose from {', '.join(MEMORY_FORMATS)}")
    device = torch.device(settings.resolved_device())
    dtype = DTYPES[settings.dtype]
    fmt = torch.channels_last if settings.memory_format == "channels_last" else torch.contiguous_format
    model = copy.deepcopy(module).eval().to(device=device, dtype=dtype)
    if fmt is torch.channels_last:
        model = model.to(memory_format=fmt)

    def move(x):
        if not isinstance(x, torch.Tensor):
            return x
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        return x.contiguous(memory_format=fmt) if fmt is torch.channels_last and x.dim() == 4 else x

    return model, tuple(move(x) for x in inputs)


def measure(module: nn.Module, inputs: tuple, settings: MeasureSettings | None = None,
            prepared: bool = False) -> Timing:
    """Time ``module(*inputs)``: warm-up, then repeats; median and p10/p90 in seconds."""
    settings = settings or MeasureSettings()
    model, args = (module, inputs) if prepared else prepare(module, inputs, settings)
    device = settings.resolved_device()
    sync = _synchronizer(device)
    times: list[float] = []
    with _threads(settings.threads if device == "cpu" else None), torch.inference_mode():
        for _ in range(settings.warmup):
            model(*args)
        sync()
        spent = 0.0
        for i in range(max(settings.repeats, 1)):
            start = clock()
            model(*args)
            sync()
            elapsed = clock() - start
            times.append(elapsed)
            spent += elapsed
            if i >= 2 and spent > settings.max_seconds:
                break
        fp = fingerprint(settings)
    times.sort()
    return Timing(
        median=statistics.median(times),
        p10=times[int(0.1 * (len(times) - 1))],
        p90=times[int(round(0.9 * (len(times) - 1)))],
        mean=statistics.fmean(times),
        repeats=len(times),
        fingerprint=fp,
    )


def _synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    if device == "mps":
        return torch.mps.synchronize
    return lambda: None
