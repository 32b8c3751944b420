"""Size budgets for code review: ``dsrewrite check``.

Budgets name a model and limits on its metrics (absolute ``max``, relative ``max-increase``
against a committed baseline, or both, each at level ``error`` or ``warn``). Evaluating a
config yields plain results; :mod:`dsrewrite.check_format` turns them into text, JSON,
markdown, GitHub annotations or JUnit XML, and :func:`exit_code` decides the exit code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .errors import AnalysisError, ConfigError, ExitCode, InputError, ModelLoadError
from .files import write_text_atomic
from .load import DTYPES
from .units import byte_style, format_bytes, format_count, format_seconds, parse_bytes, parse_count, parse_seconds

BASELINE_KIND = "dsrewrite-check-baseline"
BASELINE_VERSION = 1
REPORT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One metric a budget can limit."""

    key: str  # the TOML key
    label: str  # how a person reads it
    unit: str  # "count", "bytes" or "seconds"
    parse: Callable[[Any], float]
    deterministic: bool = True


METRICS: dict[str, MetricSpec] = {m.key: m for m in [
    MetricSpec("params", "params", "count", parse_count),
    MetricSpec("macs", "MACs", "count", parse_count),
    MetricSpec("param-bytes", "parameter bytes", "bytes", parse_bytes),
    MetricSpec("activation-memory", "activation memory", "bytes", parse_bytes),
    MetricSpec("latency", "latency", "seconds", parse_seconds, deterministic=False),
]}
LEVELS = ("error", "warn")


def format_value(metric: str, value: float | None, style: str | None = None) -> str:
    """A metric's value with its unit: ``'4.09G MACs'``, ``'44.6 MiB'`` (``'46.8 MB'`` in the user's SI
    style), ``'12.3 ms'``, ``'2.66 s'``; never an exponent."""
    if value is None:
        return "-"
    unit = METRICS[metric].unit
    if unit == "count":
        return f"{format_count(value)} {METRICS[metric].label}"
    if unit == "bytes":
        return format_bytes(value, si=style == "si")
    return format_seconds(value)


def format_delta(metric: str, delta: float, style: str | None = None) -> str:
    """A signed change with its unit."""
    sign = "+" if delta >= 0 else "-"
    unit = METRICS[metric].unit
    magnitude = abs(delta)
    if unit == "count":
        return f"{sign}{format_count(magnitude)}"
    if unit == "bytes":
        return f"{sign}{format_bytes(magnitude, si=style == 'si')}"
    return f"{sign}{format_seconds(magnitude)}"


@dataclasses.dataclass(frozen=True)
class Limit:
    """Limits on one metric of one budget."""

    metric: str
    max: float | None = None
    max_increase: float | None = None  # a fraction: 0.02 for "2%"
    level: str = "error"
    #: the prefixes the user wrote the limit in ("si": 50MB, "iec": 512MiB), to answer in the same terms
    style: str | None = None


@dataclasses.dataclass(frozen=True)
class Budget:
    """A model and its limits."""

    name: str
    model: str
    input_shapes: tuple[tuple[int, ...], ...] = ()
    dtype: str | None = None
    args: tuple[tuple[str, Any], ...] = ()
    limits: tuple[Limit, ...] = ()
    message: str = ""
    trust_pickle: bool = False


@dataclasses.dataclass(frozen=True)
class CheckConfig:
    """Everything ``dsrewrite check`` reads from its config (or from ad hoc flags)."""

    budgets: tuple[Budget, ...]
    baseline: str | None = None
    source: str = "command line"
    #: TOML table to point people at when a limit needs editing.
    table: str = "[[tool.dsrewrite.check.budget]]"


_BUDGET_KEYS = {"name", "model", "input-shape", "dtype", "args", "message", "trust-pickle", *METRICS}
_LIMIT_KEYS = {"max", "max-increase", "level"}


def parse_config(table: dict[str, Any], source: str) -> CheckConfig:
    """Validate a ``[tool.dsrewrite.check]`` table; every problem names its key and file."""
    known = {"baseline", "budget", "fail-on", "format"}
    for key in table:
        if key not in known:
            raise ConfigError(f"{source}: unknown key 'check.{key}' (known: {', '.join(sorted(known))})")
    raw_budgets = table.get("budget", [])
    if isinstance(raw_budgets, dict):
        raw_budgets = [raw_budgets]
    if not isinstance(raw_budgets, list) or not raw_budgets:
        raise ConfigError(f"{source}: no budgets; add a [[tool.dsrewrite.check.budget]] table with name and model")
    budgets, names = [], set()
    for i, raw in enumerate(raw_budgets):
        where = f"{source}: budget {raw.get('name', i + 1)!r}" if isinstance(raw, dict) else f"{source}: budget {i + 1}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a table")
        budget = _parse_budget(raw, where)
        if budget.name in names:
            raise ConfigError(f"{where}: two budgets are named {budget.name!r}")
        names.add(budget.name)
        budgets.append(budget)
    baseline = table.get("baseline")
    if baseline is not None and not isinstance(baseline, str):
        raise ConfigError(f"{source}: check.baseline must be a path string, got {baseline!r}")
    table_name = "[[tool.dsrewrite.check.budget]]" if source.endswith("pyproject.toml") else "[[check.budget]]"
    return CheckConfig(tuple(budgets), baseline, source, table_name)


def _parse_budget(raw: dict, where: str) -> Budget:
    for key in raw:
        if key not in _BUDGET_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(_BUDGET_KEYS))})")
    for key in ("name", "model"):
        if not isinstance(raw.get(key), str) or not raw.get(key):
            raise ConfigError(f"{where}: '{key}' is required and must be a string")
    shapes = raw.get("input-shape", [])
    if shapes and all(isinstance(d, int) for d in shapes):
        shapes = [shapes]
    if not isinstance(shapes, list) or not all(
            isinstance(s, list) and s and all(isinstance(d, int) and d > 0 for d in s) for s in shapes):
        raise ConfigError(f"{where}: input-shape must be a list of positive integers like [1, 3, 224, 224]")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"{where}: unknown dtype {dtype!r}")
    args = raw.get("args", {})
    if not isinstance(args, dict):
        raise ConfigError(f"{where}: args must be a table of factory keyword arguments")
    limits = []
    for metric, spec in METRICS.items():
        if metric in raw:
            limits.append(_parse_limit(raw[metric], spec, where))
    if not limits:
        raise ConfigError(f"{where}: no limits; set at least one of {', '.join(METRICS)}")
    message = raw.get("message", "")
    if not isinstance(message, str):
        raise ConfigError(f"{where}: message must be a string")
    return Budget(raw["name"], raw["model"], tuple(tuple(s) for s in shapes), dtype, tuple(sorted(args.items())),
                  tuple(limits), message, bool(raw.get("trust-pickle", False)))


def _parse_limit(raw: Any, spec: MetricSpec, where: str) -> Limit:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {spec.key} must be a table such as {{ max = \"25M\", max-increase = \"2%\" }}")
    for key in raw:
        if key not in _LIMIT_KEYS:
            raise ConfigError(f"{where}: unknown key '{spec.key}.{key}' (known: max, max-increase, level)")
    maximum = increase = None
    if "max" in raw:
        try:
            maximum = spec.parse(raw["max"])
        except ValueError as e:
            raise ConfigError(f"{where}: {spec.key}.max: {e}") from None
    if "max-increase" in raw:
        increase = _parse_percent(raw["max-increase"], f"{where}: {spec.key}.max-increase")
    if maximum is None and increase is None:
        raise ConfigError(f"{where}: {spec.key} needs max, max-increase or both")
    level = raw.get("level", "error" if spec.deterministic else "warn")
    if level not in LEVELS:
        raise ConfigError(f"{where}: {spec.key}.level must be error or warn, got {level!r}")
    style = byte_style(raw["max"]) if "max" in raw and spec.unit == "bytes" else None
    return Limit(spec.key, maximum, increase, level, style)


def _parse_percent(value: Any, where: str) -> float:
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100
        return float(text)  # a bare number is a fraction: 0.02 == 2%
    except ValueError:
        raise ConfigError(f"{where}: expected a percentage such as \"2%\", got {value!r}") from None


def adhoc_config(spec: str, shapes: list[tuple[int, ...]], dtype: str | None, args: dict, limits: dict[str, str],
                 trust_pickle: bool = False, baseline: str | None = None) -> CheckConfig:
    """A one-budget config from ``dsrewrite check MODEL --max-params 12M ...``."""
    parsed = []
    for metric, text in limits.items():
        if text is None:
            continue
        try:
            parsed.append(Limit(metric, METRICS[metric].parse(text), None,
                                "error" if METRICS[metric].deterministic else "warn",
                                byte_style(text) if METRICS[metric].unit == "bytes" else None))
        except ValueError as e:
            raise ConfigError(f"--max-{metric}: {e}") from None
    if not parsed:
        raise ConfigError("give at least one limit (--max-params, --max-macs, --max-param-bytes, "
                          "--max-activation-memory, --max-latency) or use a config file")
    return CheckConfig((Budget(spec, spec, tuple(shapes), dtype, tuple(sorted(args.items())), tuple(parsed),
                               trust_pickle=trust_pickle),), baseline)


# ------------------------------------------------------------------------------- baselines


def load_baseline(path: str | Path | None) -> dict[str, Any] | None:
    """A baseline document, or None when there is none yet."""
    if path is None or not Path(path).exists():
        return None
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: corrupt baseline ({e}); regenerate it with dsrewrite check --update-baseline") \
            from None
    if not isinstance(doc, dict) or doc.get("kind") != BASELINE_KIND:
        raise ConfigError(f"{path}: not a dsrewrite check baseline; regenerate it with --update-baseline")
    if doc.get("schema_version") != BASELINE_VERSION:
        raise ConfigError(f"{path}: baseline schema version {doc.get('schema_version')} is not supported "
                          f"(expected {BASELINE_VERSION}); regenerate it with --update-baseline")
    if not isinstance(doc.get("budgets"), dict):
        raise ConfigError(f"{path}: corrupt baseline (no budgets); regenerate it with --update-baseline")
    return doc


def write_baseline(path: str | Path, measurements: list["Measurement"]) -> None:
    """Write (atomically) the baseline for these measurements."""
    doc = {
        "kind": BASELINE_KIND,
        "schema_version": BASELINE_VERSION,
        "tool": {"name": "dsrewrite", "version": __version__, "torch": torch.__version__},
        "budgets": {m.budget.name: m.to_baseline() for m in measurements},
    }
    write_text_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------ evaluation


@dataclasses.dataclass
class Measurement:
    """The measured metrics of one budget's model."""

    budget: Budget
    values: dict[str, float]
    input_shapes: list[list[int]]
    #: every parametrized leaf module (conv, linear, norm, embedding, ...): name, type, params, MACs
    layers: list[dict[str, Any]]
    latency_fingerprint: dict[str, Any] | None
    source_file: str | None
    source_line: int | None
    #: modules down to two levels (stages and blocks), for "which block grew"
    blocks: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_baseline(self) -> dict[str, Any]:
        """This measurement as a baseline entry."""
        return {"model": self.budget.model, "input_shapes": self.input_shapes, "metrics": self.values,
                "latency_fingerprint": self.latency_fingerprint, "layers": self.layers, "blocks": self.blocks}


@dataclasses.dataclass
class MetricResult:
    """One metric of one budget, judged."""

    metric: str
    value: float | None
    limit: float | None
    max_increase: float | None
    baseline: float | None
    level: str
    #: pass, fail (error level), warn (warn level exceeded), not-comparable (latency elsewhere)
    status: str
    message: str
    #: the prefixes the limit was written in (:attr:`Limit.style`)
    style: str | None = None

    @property
    def delta(self) -> float | None:
        """value − baseline."""
        return None if self.value is None or self.baseline is None else self.value - self.baseline

    @property
    def delta_pct(self) -> float | None:
        """Relative change against the baseline, in percent."""
        if self.delta is None or not self.baseline:
            return None
        return 100.0 * self.delta / self.baseline


@dataclasses.dataclass
class BudgetResult:
    """A budget's verdict."""

    budget: Budget
    #: ok, added (no baseline entry yet), error (the model failed)
    state: str
    metrics: list[MetricResult]
    measurement: Measurement | None = None
    error: str = ""
    baseline_entry: dict[str, Any] | None = None

    @property
    def failed(self) -> bool:
        """Whether an error-level limit was exceeded."""
        return any(m.status == "fail" for m in self.metrics)

    @property
    def warned(self) -> bool:
        """Whether a warn-level limit was exceeded."""
        return any(m.status == "warn" for m in self.metrics)


@dataclasses.dataclass
class CheckResult:
    """All budgets judged, plus budgets the baseline has that the config no longer does."""

    config: CheckConfig
    budgets: list[BudgetResult]
    removed: list[str]
    baseline_path: str | None
    baseline_found: bool

    @property
    def errors(self) -> list[BudgetResult]:
        """Budgets whose model could not be loaded or traced."""
        return [b for b in self.budgets if b.state == "error"]


def measure_budget(budget: Budget, measure_settings=None) -> Measurement:
    """Load, analyze (and, for a latency limit, time) a budget's model."""
    from .api import analyze_spec
    from .load import parse_dtype, resolve_inputs

    dtype = parse_dtype(budget.dtype) if budget.dtype else None
    analysis = analyze_spec(budget.model, [tuple(s) for s in budget.input_shapes], dtype,
                            dict(budget.args), budget.trust_pickle)
    totals = analysis.totals()
    values = {"params": totals["params"], "macs": totals["macs"], "param-bytes": totals["param_bytes"],
              "activation-memory": totals["peak_activation_bytes"] if totals["peak_activation_bytes"] is not None
              else totals["activation_bytes"]}
    fingerprint = None
    if any(limit.metric == "latency" for limit in budget.limits):
        from .measure import MeasureSettings, measure
        from .rewrite import real_inputs

        settings = measure_settings or MeasureSettings()
        inputs = real_inputs(resolve_inputs(analysis.loaded, [tuple(s) for s in budget.input_shapes], dtype))
        timing = measure(analysis.loaded.model, inputs, settings)
        values["latency"] = timing.median
        fingerprint = timing.fingerprint
    from .modules import block_rows, parametrized_layers

    model, macs = analysis.trace.root, analysis.profile.module_macs
    return Measurement(budget, values, [list(s) for s in analysis.profile.input_shapes],
                       parametrized_layers(model, macs), fingerprint, analysis.loaded.source_file,
                       analysis.loaded.source_line, block_rows(model, macs))


def run_check(config: CheckConfig, baseline_path: str | None = None, progress=None,
              measure_settings=None) -> CheckResult:
    """Measure every budget and judge it against its limits and the baseline."""
    say = progress or (lambda message: None)
    path = baseline_path or config.baseline
    baseline = load_baseline(path)
    entries = (baseline or {}).get("budgets", {})
    results = []
    for i, budget in enumerate(config.budgets, 1):
        say(f"[{i}/{len(config.budgets)}] {budget.name}: analyzing {budget.model} ...")
        try:
            measurement = measure_budget(budget, measure_settings)
        except (ModelLoadError, InputError, AnalysisError) as e:  # the model is broken, not the config
            results.append(BudgetResult(budget, "error", [], error=str(e)))
            continue
        entry = entries.get(budget.name)
        if entry is not None and entry.get("input_shapes") != measurement.input_shapes:
            raise ConfigError(
                f"{path}: the baseline of budget {budget.name!r} was taken with input "
                f"{shapes_text(entry.get('input_shapes'))}, the budget now uses {shapes_text(measurement.input_shapes)}; "
                "refresh it with dsrewrite check --update-baseline")
        metrics = [_judge(limit, measurement, entry) for limit in budget.limits]
        results.append(BudgetResult(budget, "ok" if entry is not None or baseline is None else "added", metrics,
                                    measurement, baseline_entry=entry))
    removed = sorted(set(entries) - {b.name for b in config.budgets})
    return CheckResult(config, results, removed, path, baseline is not None)


def shapes_text(shapes) -> str:
    """``[[1, 3, 224, 224]] -> '1×3×224×224'``."""
    return ", ".join("×".join(map(str, s)) for s in shapes or []) or "(none)"


def _judge(limit: Limit, m: Measurement, entry: dict[str, Any] | None) -> MetricResult:
    metric = limit.metric
    value = m.values.get(metric)
    base = None
    comparable = True
    if entry is not None:
        base = entry.get("metrics", {}).get(metric)
        if metric == "latency" and base is not None:
            comparable = _same_environment(entry.get("latency_fingerprint"), m.latency_fingerprint)
    label = METRICS[metric].label
    problems = []
    style = limit.style
    if limit.max is not None and value is not None and value > limit.max:
        over = format_delta(metric, value - limit.max, style).lstrip("+")
        if METRICS[metric].unit == "count":
            over += f" {label}"
        change = ""
        if base is not None and comparable and base:
            change = f" ({100 * (value - base) / base:+.1f}% vs baseline)"
        text = f"{label} exceed the limit by {over}{change}"
        if base is not None and comparable and base > limit.max:
            text += f"; the baseline was already over it ({format_value(metric, base, style)})"
        problems.append(text)
    if limit.max_increase is not None and base is not None and comparable and base and value is not None:
        growth = (value - base) / base
        if growth > limit.max_increase + 1e-12:
            problems.append(f"{label} grew {100 * growth:+.1f}% vs baseline "
                            f"({format_delta(metric, value - base, style)}), more than the allowed "
                            f"+{100 * limit.max_increase:g}%")
    if problems:
        status = "fail" if limit.level == "error" else "warn"
        message = "; ".join(problems)
    elif base is not None and not comparable:
        status, message = "not-comparable", (f"{label} baseline was measured elsewhere "
                                             "(torch, device, threads or dtype differ); not compared")
    else:
        status = "pass"
        message = f"{label} {format_value(metric, value, style)} within budget"
        if limit.max is not None and value is not None:
            room = limit.max - value
            message += (f" (limit {format_value(metric, limit.max, style)}, headroom "
                        f"{format_delta(metric, room, style).lstrip('+')}"
                        + (f", {100 * room / limit.max:.1f}%" if limit.max else "") + ")")
        elif limit.max_increase is not None and base is not None and comparable and base and value is not None:
            message += (f" ({100 * (value - base) / base:+.1f}% vs baseline, allowed "
                        f"+{100 * limit.max_increase:g}%)")
    return MetricResult(metric, value, limit.max, limit.max_increase, base if comparable else None, limit.level,
                        status, message, style)


def _same_environment(a: dict | None, b: dict | None) -> bool:
    keys = ("torch", "device", "device_name", "threads", "dtype", "memory_format")
    return bool(a) and bool(b) and all(a.get(k) == b.get(k) for k in keys)


def exit_code(result: CheckResult, fail_on: str = "error") -> ExitCode:
    """0 within budget (warnings allowed), 1 a limit exceeded, 3 a model failed to load or trace."""
    if result.errors:
        return ExitCode.MODEL_FAILED
    if any(b.failed for b in result.budgets) or (fail_on == "warn" and any(b.warned for b in result.budgets)):
        return ExitCode.BUDGET_EXCEEDED
    return ExitCode.OK


def layer_changes(result: BudgetResult, top: int = 10) -> list[dict[str, Any]]:
    """``--why``: the layers whose params/MACs changed most between the baseline and now."""
    if result.measurement is None or not result.baseline_entry:
        return []
    return diff_layers(result.baseline_entry.get("layers", []), result.measurement.layers, top)


def block_changes(result: BudgetResult, top: int = 5) -> list[dict[str, Any]]:
    """``--why``: the stages and blocks (modules two levels deep) that changed most since the baseline.

    Empty when the baseline predates block records (refresh it with ``--update-baseline``).
    """
    if result.measurement is None or not result.baseline_entry or "blocks" not in result.baseline_entry:
        return []
    return diff_layers(result.baseline_entry["blocks"], result.measurement.blocks, top)


def diff_layers(before: list[dict], after: list[dict], top: int = 10) -> list[dict[str, Any]]:
    """Per-layer params/MACs deltas by layer name, largest |ΔMACs| (then |Δparams|) first."""
    old = {layer["name"]: layer for layer in before}
    new = {layer["name"]: layer for layer in after}
    rows = []
    for name in list(new) + [n for n in old if n not in new]:
        a, b = old.get(name), new.get(name)
        d_params = (b["params"] if b else 0) - (a["params"] if a else 0)
        d_macs = (b["macs"] if b else 0) - (a["macs"] if a else 0)
        if d_params or d_macs or a is None or b is None:
            rows.append({"name": name, "type": (b or a).get("type", ""),
                         "change": "added" if a is None else "removed" if b is None else "changed",
                         "params_before": a["params"] if a else None, "params_after": b["params"] if b else None,
                         "macs_before": a["macs"] if a else None, "macs_after": b["macs"] if b else None,
                         "delta_params": d_params, "delta_macs": d_macs})
    rows.sort(key=lambda r: (-abs(r["delta_macs"]), -abs(r["delta_params"]), r["name"]))
    return rows[:top]
