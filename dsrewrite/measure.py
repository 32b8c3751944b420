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
#: a measurement whose p10–p90 spread exceeds this share of its median is reported as noisy
NOISY_SPREAD = 0.25


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

    @property
    def noisy(self) -> bool:
        """The spread is wider than :data:`NOISY_SPREAD` of the median."""
        return self.spread > NOISY_SPREAD

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (seconds)."""
        return {"median_s": self.median, "p10_s": self.p10, "p90_s": self.p90, "mean_s": self.mean,
                "repeats": self.repeats, "spread": self.spread, "noisy": self.noisy, "fingerprint": self.fingerprint}


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


# ---------------------------------------------------------------------------- BN folding


def fold_bn(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with each BatchNorm folded into the conv before it.

    Only a conv whose output feeds nothing but the BN, and a conv and BN module each
    called at exactly one site, are folded (folding a conv shared by two call sites into one
    site's BN is the trap of pytorch#104593). Models that do not trace are returned as an
    eval copy, unfolded.
    """
    import torch.fx as fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from .trace import trace

    model = copy.deepcopy(model).eval()
    traced = trace(model)
    if traced.graph is None:
        return model
    gm = fx.GraphModule(model, traced.graph)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0] if node.args else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv, bn = gm.get_submodule(src.target), gm.get_submodule(node.target)
        if not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed or not bn.track_running_stats:
            continue
        if calls[src.target] != 1 or calls[node.target] != 1:
            continue
        parent, _, name = src.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


# ------------------------------------------------------------------------ per-layer timing


@dataclasses.dataclass
class LayerTiming:
    """A conv and its replacement block, timed on the input shape the conv sees."""

    original_s: float
    replacement_s: float
    cached: bool = False
    #: when it was measured (ISO 8601, UTC), and where ("cpu/2 threads", the fingerprint's short form)
    measured_at: str | None = None
    environment: str = ""
    #: the depth multiplier (rank) of the block that was timed
    depth_multiplier: int | None = None
    #: p10 and p90 of the repeats (seconds), original and replacement; None in old cache entries
    original_p10_p90: tuple[float, float] | None = None
    replacement_p10_p90: tuple[float, float] | None = None
    #: the family of the block that was timed (dsrewrite.blocks.FAMILIES)
    family: str = "separable"

    @property
    def spread(self) -> float | None:
        """The wider of the two (p90 − p10) / median spreads, or None when unknown."""
        if self.original_p10_p90 is None or self.replacement_p10_p90 is None:
            return None
        return max((hi - lo) / med if med else 0.0 for (lo, hi), med in
                   ((self.original_p10_p90, self.original_s), (self.replacement_p10_p90, self.replacement_s)))

    @property
    def speedup(self) -> float:
        """original / replacement (>1: the replacement is faster)."""
        return self.original_s / self.replacement_s if self.replacement_s > 0 else float("inf")

    def provenance(self) -> dict[str, Any]:
        """Where this timing came from, for a plan: fresh or cached, when, where, which block."""
        return {"source": "cached" if self.cached else "fresh", "measured_at": self.measured_at,
                "environment": self.environment, "depth_multiplier": self.depth_multiplier,
                "family": self.family, "speedup": self.speedup, "spread": self.spread}


class LatencyCache:
    """Per-layer timings on disk, keyed by (environment, layer geometry, input shape, block, settings).

    A second run on the same machine reuses them. Location: ``$DSREWRITE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/dsrewrite``, else ``~/.cache/dsrewrite``; ``None`` disables caching.
    """

    VERSION = 1

    def __init__(self, path=None):
        import os
        from pathlib import Path

        if path is None:
            base = os.environ.get("DSREWRITE_CACHE_DIR") or os.path.join(
                os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dsrewrite")
            path = Path(base) / f"latency-v{self.VERSION}.json"
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        try:
            import json

            doc = json.loads(self.path.read_text())
            if isinstance(doc, dict) and doc.get("version") == self.VERSION:
                self.entries = doc.get("entries", {})
        except (OSError, ValueError):
            pass  # no cache yet, or an unreadable one: start afresh
        self.dirty = False

    def get(self, key: str) -> LayerTiming | None:
        """A cached timing, or None."""
        e = self.entries.get(key)
        if not e:
            return None
        return LayerTiming(e["original_s"], e["replacement_s"], cached=True, measured_at=e.get("measured_at"),
                           environment=e.get("environment", ""), depth_multiplier=e.get("depth_multiplier"),
                           original_p10_p90=_pair(e.get("original_p10_p90")),
                           replacement_p10_p90=_pair(e.get("replacement_p10_p90")),
                           family=e.get("family", "separable"))

    def put(self, key: str, timing: LayerTiming) -> None:
        """Remember a timing (saved by :meth:`save`)."""
        self.entries[key] = {"original_s": timing.original_s, "replacement_s": timing.replacement_s,
                             "measured_at": timing.measured_at, "environment": timing.environment,
                             "depth_multiplier": timing.depth_multiplier,
                             "original_p10_p90": timing.original_p10_p90,
                             "replacement_p10_p90": timing.replacement_p10_p90, "family": timing.family}
        self.dirty = True

    def save(self) -> None:
        """Write the cache atomically (best effort: a read-only home is not an error)."""
        import json
        from pathlib import Path

        from .files import atomic_write

        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"version": self.VERSION, "entries": self.entries}, sort_keys=True)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))
            self.dirty = False
        except (OSError, UsageError):
            pass


def layer_key(conv, depth_multiplier: int, bn: bool, activation: str, settings: MeasureSettings,
              fold: bool, batch_size: int | None, family: str = "separable") -> str:
    """Cache key of one per-layer measurement (``family`` named only when not separable: old keys stay valid)."""
    import json

    fp = fingerprint(settings)
    shape = list(conv.input_shape)
    if batch_size:
        shape[0] = batch_size
    return json.dumps([fp["torch"], fp["device"], fp["device_name"], fp["threads"], fp["dtype"], fp["memory_format"],
                       fold, shape, conv.in_channels, conv.out_channels, list(conv.kernel), list(conv.stride),
                       list(conv.padding), list(conv.dilation), conv.has_bias, depth_multiplier, bn, activation,
                       settings.repeats, settings.warmup] + ([family] if family != "separable" else []))


def time_layer(conv, depth_multiplier: int, bn: bool, activation: str, settings: MeasureSettings,
               fold: bool = True, batch_size: int | None = None, family: str = "separable",
               original: Timing | None = None) -> LayerTiming:
    """Time a standard conv of ``conv``'s geometry and its replacement: ``family``'s block at rank ``depth_multiplier``.

    Weights do not change speed, so both are built fresh; with ``fold`` the separable block's
    inserted BN is folded into the depthwise conv, as inference deployments do. ``original``:
    the dense conv's timing when it was already taken this run (a planner times many blocks
    against one conv).
    """
    from .blocks import FAMILIES
    from .layers import DepthwiseSeparableConv2d

    shape = list(conv.input_shape)
    if batch_size:
        shape[0] = batch_size
    if family == "separable":
        block = DepthwiseSeparableConv2d(conv.in_channels, conv.out_channels, conv.kernel, conv.stride, conv.padding,
                                         conv.dilation, depth_multiplier, bn and not fold, activation, bias=True)
        if bn and fold:  # what a folded BN leaves behind: a bias on the depthwise conv
            block.depthwise.bias = nn.Parameter(torch.zeros(block.mid_channels))
    else:
        block = FAMILIES[family].make(conv.in_channels, conv.out_channels, tuple(conv.kernel), tuple(conv.stride),
                                      tuple(conv.padding), tuple(conv.dilation), depth_multiplier)
    x = torch.randn(*shape)
    import datetime

    t_orig = original or time_dense(conv, settings, batch_size)
    t_new = measure(block, (x,), settings)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return LayerTiming(t_orig.median, t_new.median, measured_at=when, environment=environment_label(settings),
                       depth_multiplier=depth_multiplier, original_p10_p90=(t_orig.p10, t_orig.p90),
                       replacement_p10_p90=(t_new.p10, t_new.p90), family=family)


def time_dense(conv, settings: MeasureSettings, batch_size: int | None = None) -> Timing:
    """The dense conv of ``conv``'s geometry timed on its input shape (what every candidate is compared with)."""
    shape = list(conv.input_shape)
    if batch_size:
        shape[0] = batch_size
    dense = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel, conv.stride, conv.padding,
                      conv.dilation, bias=conv.has_bias)
    return measure(dense, (torch.randn(*shape),), settings)


def time_thinned(conv, in_channels: int, out_channels: int, settings: MeasureSettings, batch_size: int | None = None,
                 original: Timing | None = None) -> LayerTiming:
    """The dense conv of ``conv``'s geometry against the same conv with fewer channels (a thinned
    channel group), each on its own input shape. ``depth_multiplier`` of the result is None."""
    import datetime

    thin = dataclasses.replace(conv, in_channels=in_channels, out_channels=out_channels,
                               input_shape=(conv.input_shape[0], in_channels, *conv.input_shape[2:]))
    t_orig = original or time_dense(conv, settings, batch_size)
    t_new = time_dense(thin, settings, batch_size)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return LayerTiming(t_orig.median, t_new.median, measured_at=when, environment=environment_label(settings),
                       original_p10_p90=(t_orig.p10, t_orig.p90), replacement_p10_p90=(t_new.p10, t_new.p90),
                       family=f"thinned {in_channels}→{out_channels}")


def time_model(model: nn.Module, inputs: tuple, settings: MeasureSettings, fold: bool = True,
               batch_size: int | None = None) -> Timing:
    """A whole model timed end to end on ``inputs`` (repeated along the batch to ``batch_size``), BN folded
    when ``fold``; the model itself is not touched."""
    if batch_size:
        inputs = tuple(x.expand(batch_size, *x.shape[1:]).clone() if isinstance(x, torch.Tensor) and x.dim() else x
                       for x in inputs)
    return measure(fold_bn(model) if fold else copy.deepcopy(model).eval(), inputs, settings)


def time_side_by_side(models: list[nn.Module], inputs: tuple, settings: MeasureSettings, fold: bool = True,
                      batch_size: int | None = None, rounds: int = 3) -> list[float]:
    """Median seconds per call of each model, timed in interleaved rounds (drift on a shared machine
    hits them alike): each round times every model with a third of ``settings.repeats``."""
    if batch_size:
        inputs = tuple(x.expand(batch_size, *x.shape[1:]).clone() if isinstance(x, torch.Tensor) and x.dim() else x
                       for x in inputs)
    prepared = [prepare(fold_bn(m) if fold else copy.deepcopy(m).eval(), inputs, settings) for m in models]
    per_round = dataclasses.replace(settings, repeats=max(settings.repeats // rounds, 3),
                                    warmup=max(settings.warmup // rounds, 1))
    samples: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, (model, args) in enumerate(prepared):
            samples[i].append(measure(model, args, per_round, prepared=True).median)
    return [statistics.median(v) for v in samples]


def _pair(value) -> tuple[float, float] | None:
    return (float(value[0]), float(value[1])) if isinstance(value, (list, tuple)) and len(value) == 2 else None


def environment_label(settings: MeasureSettings) -> str:
    """``cpu/2 threads`` or ``cuda (NVIDIA H100)``: where timings were taken, for reasons."""
    device = settings.resolved_device()
    if device == "cpu":
        return f"cpu/{settings.threads or torch.get_num_threads()} threads"
    return f"{device} ({fingerprint(settings)['device_name']})"
