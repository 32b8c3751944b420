"""The plain Python API: the pipeline stages wired together, with no click in sight."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from . import __version__
from .calibrate import MEMORY_LIMIT
from .load import LoadedModel, as_input_tuple, load_model, make_inputs, resolve_inputs
from .plan import ConversionPlan
from .profile import ModelProfile, profile
from .trace import TraceResult, trace

#: Version of the JSON document written by ``analyze --format json``; bumped on incompatible change.
SCHEMA_VERSION = 1
CONVENTION = "MACs of conv, linear and matmul ops, bias excluded (torchvision's GFLOPS convention); FLOPs = 2 x MACs"


@dataclasses.dataclass
class Analysis:
    """The result of :func:`analyze`: a profile plus what tracing found."""

    model_name: str
    profile: ModelProfile
    trace: TraceResult
    loaded: LoadedModel | None = None
    #: the example inputs the profile was taken on (meta tensors are fine)
    inputs: tuple | None = None
    _channels: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def convs(self):
        """One :class:`~dsrewrite.profile.ConvProfile` per conv call site, in execution order."""
        return self.profile.convs

    def channel_groups(self):
        """The model's channel-dependency graph (:func:`dsrewrite.channels.model_channel_graph`), built once.

        Layers that only training runs (auxiliary heads) are not in the eval-mode graph;
        when some module is never called there, the training-mode graph of a copy is added.
        """
        if self._channels is None:
            from .channels import model_channel_graph

            self._channels = model_channel_graph(self.trace, self.inputs)
        return self._channels

    def modules(self, depth: int | None = None):
        """Every module with its subtree's params (trainable/frozen) and MACs (:func:`dsrewrite.modules.module_rows`)."""
        from .modules import module_rows

        return module_rows(self.trace.root, self.profile.module_macs, depth)

    def totals(self) -> dict[str, Any]:
        """Whole-model totals (params, MACs, FLOPs, bytes)."""
        p = self.profile
        return {
            "params": p.params,
            "macs": p.macs,
            "flops": p.flops,
            "param_bytes": p.param_bytes,
            "buffer_bytes": p.buffer_bytes,
            "activation_bytes": p.activation_bytes,
            "peak_activation_bytes": p.peak_activation_bytes,
            "conv_calls": len(p.convs),
        }

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON document (see README, "JSON schema")."""
        p = self.profile
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "dsrewrite", "version": __version__, "torch": torch.__version__},
            "model": self.model_name,
            "input_shapes": [list(s) for s in p.input_shapes],
            "output_shapes": [list(s) for s in p.output_shapes],
            "dtype": p.dtype,
            "convention": CONVENTION,
            "totals": self.totals(),
            "by_kind": {k: dataclasses.asdict(v) for k, v in p.by_kind.items()},
            "layers": [c.to_dict() for c in p.convs],
            "modules": [r.to_dict() for r in self.modules()],
            "untraced": [{"module": name or "(whole model)", "reason": why} for name, why in p.untraced.items()],
            "unsupported_ops": [{"op": op, **info} for op, info in sorted(p.unsupported_ops.items())],
            "trace": {"method": p.trace_method, "propagation": p.propagation,
                      "specialized": [{"module": n or "(whole model)", "reason": why}
                                      for n, why in p.specialized.items()],
                      "opaque_convs": [{"module": n, "reason": why} for n, why in p.opaque_convs.items()]},
            "notes": list(p.notes),
        }


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    dtype: torch.dtype | None = None,
    name: str | None = None,
    costs: dict | None = None,
    max_memory: float | None = None,
) -> Analysis:
    """Trace and profile ``model`` on ``example_inputs`` without running real arithmetic.

    ``example_inputs`` is a tensor, a tuple of tensors, or a shape tuple such as
    ``(1, 3, 224, 224)``; only shapes and dtypes are used. Default: one 1×3×224×224 input.
    ``costs`` adds or overrides cost handlers for this analysis only: ``{aten op: handler}``,
    ``None`` for an op free on purpose, or ``(handler, kind)`` (see :mod:`dsrewrite.costs`).
    ``max_memory`` (bytes) bounds a real-forward fallback (:func:`dsrewrite.profile.profile`).
    """
    from .costs import CostTable

    inputs = _inputs_from(example_inputs, dtype)
    traced = trace(model, inputs=inputs)
    return Analysis(name or type(model).__name__, profile(traced, inputs, dtype, CostTable(costs), max_memory), traced,
                    inputs=inputs)


def analyze_spec(
    spec: str,
    input_shapes: list[tuple[int, ...]] | None = None,
    dtype: torch.dtype | None = None,
    kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    max_memory: float | None = None,
) -> Analysis:
    """Load a model from a spec (see :func:`dsrewrite.load.load_model`) and analyze it."""
    loaded = load_model(spec, kwargs, trust_pickle=trust_pickle)
    inputs = resolve_inputs(loaded, input_shapes, dtype)
    traced = trace(loaded.model, inputs=inputs)
    return Analysis(spec, profile(traced, inputs, dtype, max_memory=max_memory), traced, loaded, inputs)


# ------------------------------------------------------------------------------------ convert


@dataclasses.dataclass
class LayerChange:
    """Before/after numbers of one replaced conv module (summed over its call sites)."""

    name: str
    kernel: tuple[int, ...]
    in_channels: int
    out_channels: int
    #: the separable block's depth multiplier (None for the other families)
    depth_multiplier: int | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    kept_energy: float
    reason: str
    #: measured latency of the original conv and of the block (first call site), when measured.
    measured_original_s: float | None = None
    measured_replacement_s: float | None = None
    #: where the layer timing came from (:meth:`~dsrewrite.measure.LayerTiming.provenance`): fresh or
    #: cached, when, on which machine, and its spread
    timing: dict[str, Any] | None = None
    #: the block family (dsrewrite.blocks.FAMILIES), its rank, and how the block reads (``dw×1 → BN → relu → pw``)
    family: str = "separable"
    rank: int | None = None
    block: str = ""

    @property
    def theoretical_speedup(self) -> float:
        """MACs before / MACs after."""
        return self.macs_before / self.macs_after if self.macs_after else float("inf")

    @property
    def measured_speedup(self) -> float | None:
        """Latency before / after, when measured."""
        if self.measured_original_s is None or not self.measured_replacement_s:
            return None
        return self.measured_original_s / self.measured_replacement_s

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["kernel"] = list(self.kernel)
        d["theoretical_speedup"] = self.theoretical_speedup
        d["measured_speedup"] = self.measured_speedup
        return d


@dataclasses.dataclass
class ConversionReport:
    """What a conversion changed, in numbers."""

    model_name: str
    rules: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    layers: list[LayerChange]
    #: Output fidelity on the example inputs (relative_error, cosine, max_abs_error).
    fidelity: dict[str, float]
    conv_calls: int
    notes: list[str]
    #: End-to-end latency before/after (see :func:`convert` with ``measure=True``), or None.
    measurement: dict[str, Any] | None = None
    #: Fidelity before/after calibration on the calibration data, or None.
    calibration: dict[str, Any] | None = None
    #: Fidelity before/after the least-squares refit of the layers a width resize took input
    #: channels from (:meth:`dsrewrite.calibrate.ReconstructionReport.to_dict`), or None.
    reconstruction: dict[str, Any] | None = None
    #: Channel-group alignment / width changes (:meth:`dsrewrite.resize.ResizePlan.to_dict`), or None.
    channels: dict[str, Any] | None = None
    #: what ``fidelity`` was measured on: "random" (seeded N(0, 1) inputs) or "example" (the model's own)
    fidelity_inputs: str = "random"
    #: what chose the replacements: "measured latency" (a latency-aware rule set) or "MACs"
    chosen_by: str = "MACs"
    #: the latency target's plan facts (``plan.rank_choice``: target, prediction, end-to-end check), or None
    latency_target: dict[str, Any] | None = None
    #: the plans made for the target and measured on held-out calibration data (``plan.rank_choice["compared"]``,
    #: ``plan.compare_on_data``), or None
    plans_compared: list[dict[str, Any]] | None = None

    def ratios(self) -> dict[str, float]:
        """before / after for params, MACs and parameter bytes (>1 means smaller)."""
        return {k: (self.before[k] / self.after[k] if self.after[k] else float("inf"))
                for k in ("params", "macs", "param_bytes")}

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON document of ``convert --report x.json``."""
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model_name,
            "rules": self.rules,
            "convention": CONVENTION,
            "before": self.before,
            "after": self.after,
            "ratios": self.ratios(),
            "replaced_modules": len(self.layers),
            "conv_calls": self.conv_calls,
            "layers": [layer.to_dict() for layer in self.layers],
            "fidelity": self.fidelity,
            "fidelity_inputs": self.fidelity_inputs,
            "chosen_by": self.chosen_by,
            "latency_target": self.latency_target,
            "plans_compared": self.plans_compared,
            "measurement": self.measurement,
            "calibration": self.calibration,
            "reconstruction": self.reconstruction,
            "channels": self.channels,
            "notes": self.notes,
        }


@dataclasses.dataclass
class ConversionResult:
    """The result of :func:`convert`: the rewritten model, the plan, and the report."""

    model: nn.Module
    plan: ConversionPlan
    report: ConversionReport
    before: Analysis
    after: Analysis


def _inputs_from(example_inputs: Any, dtype: torch.dtype | None) -> tuple:
    if example_inputs is None:
        return make_inputs([(1, 3, 224, 224)], dtype or torch.float32)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(isinstance(d, int) for d in example_inputs):
        return make_inputs([tuple(example_inputs)], dtype or torch.float32)
    return as_input_tuple(example_inputs, "example_inputs")


def plan_model(model: nn.Module, example_inputs: Any = None, rules: Any = "default",
               overrides: tuple[str, ...] | list[str] = (), *, name: str | None = None,
               analysis: Analysis | None = None, calibration=None, target_macs: float | None = None,
               max_error: float | None = None, align: int | None = None, width: float | None = None,
               measure_settings=None, batch_size: int | None = None, layer_timer=None, cache=None,
               progress=None, target_latency: float | None = None, plan_timer=None,
               calibration_memory: int | None = MEMORY_LIMIT) -> ConversionPlan:
    """The whole conversion plan (:class:`~dsrewrite.plan.ConversionPlan`); the model is not changed.

    Takes the same planning arguments as :func:`convert`, gathers the facts they need
    (:func:`dsrewrite.facts.gather_facts`: timings for a latency-aware rule set, candidate
    errors for a MAC target or error bound, candidate blocks timed for a latency target, the
    channel graph for alignment or width) and decides (:func:`dsrewrite.plan.plan_conversion`).
    ``convert`` applies exactly this plan. ``calibration_memory`` as in :func:`convert`.
    """
    from .facts import gather_facts
    from .plan import plan_conversion

    config = _rule_config(rules, overrides)
    if analysis is None:
        analysis = analyze(model, example_inputs, name=name)
    batches = _batches(calibration)
    if max_error is not None and (target_latency is not None or target_macs is not None):
        raise ValueError("max_error bounds each layer's error: give it without target_latency and target_macs")
    facts = gather_facts(model, analysis, config, timer=layer_timer, calibration=batches, target_macs=target_macs,
                         max_error=max_error, align=align, width=width, settings=measure_settings,
                         batch_size=batch_size, cache=cache, progress=progress, target_latency=target_latency,
                         inputs=_inputs_from(example_inputs, None) if example_inputs is not None else None,
                         plan_timer=plan_timer, calibration_memory=calibration_memory)
    return plan_conversion(analysis, config, facts, target_macs=target_macs, max_error=max_error, align=align,
                           width=width)


def _batches(calibration) -> list | None:
    if calibration is None:
        return None
    from .calibrate import as_batches

    return as_batches(calibration)


def convert(
    model: nn.Module,
    example_inputs: Any = None,
    rules: Any = "default",
    overrides: tuple[str, ...] | list[str] = (),
    *,
    name: str | None = None,
    analysis: Analysis | None = None,
    plan: ConversionPlan | None = None,
    progress=None,
    measure: bool = False,
    measure_settings=None,
    batch_size: int | None = None,
    layer_timer=None,
    cache=None,
    calibration=None,
    target_macs: float | None = None,
    max_error: float | None = None,
    align: int | None = None,
    width: float | None = None,
    target_latency: float | None = None,
    plan_timer=None,
    calibration_mode: str = "fast",
    calibration_memory: int | None = MEMORY_LIMIT,
) -> ConversionResult:
    """Plan (:func:`plan_model`) and apply (:func:`dsrewrite.rewrite.apply_plan`); ``model`` is left untouched.

    ``rules`` is a preset name (default, conservative, aggressive, mobile, ...), a path to a
    TOML file, or a :class:`~dsrewrite.rules.RuleConfig`; ``overrides`` are ``key=value``
    strings such as ``"replace.min_in_channels=128"``. Example inputs that are only shapes
    (or meta tensors) are filled with seeded N(0, 1) values where real data is needed: to
    place the inserted BN in the activation's linear range and to measure output fidelity.
    ``plan`` applies a given plan (from :func:`plan_model`, or a saved one read by
    :func:`dsrewrite.plan.load_plan`) instead of planning; the planning arguments are then unused.

    With ``measure=True`` the original and converted models are timed end to end, and each
    replaced layer against its block; with ``replace.min_measured_speedup`` set, candidates
    are timed before planning and kept unless they measured fast enough. ``measure_settings``
    overrides the rules' ``[measure]`` keys; ``layer_timer(conv, depth_multiplier, bn,
    activation) -> LayerTiming`` replaces real per-layer timing (tests use a fake one).

    ``calibration`` (an iterable of input batches, or (inputs, labels) pairs) refits every
    replaced block on that data (:func:`dsrewrite.calibrate`; ``calibration_mode`` ``fast``, each
    fit on a sample of positions, or ``thorough``, on every position). Calibration streams the data
    through both models once and keeps at most ``calibration_memory`` bytes of activations in memory
    (default :data:`dsrewrite.calibrate.MEMORY_LIMIT`, 1 GiB; None: no bound), the rest in a
    temporary directory, removed when it ends. ``target_macs`` (a fraction of
    the original MACs) or ``max_error`` chooses each layer's depth multiplier
    (:mod:`dsrewrite.rank`), judged from the calibration data when given, else from the
    weights' kept energy. ``target_latency`` (a fraction of the original's latency measured
    here, or rule key ``plan.target_latency``) chooses each layer's block — family × rank, or
    keep — from candidates timed on this machine (:mod:`dsrewrite.choose`); so do the MAC and
    error targets when ``block.family`` is not separable. ``target_latency`` and ``target_macs``
    together: the least-error plan within both (a size budget beside the speed one); ``max_error``
    goes alone. ``plan_timer(plan) -> (original_s,
    planned_s)`` (``plan`` None: the original alone) replaces the end-to-end check of a latency plan (timing the original and the
    planned model side by side; tests use a fake one, a user may time on the target device).

    ``align`` (a divisor, or rule keys ``align.groups`` + ``align.divisor``) rounds every
    resizable channel group up to a multiple of it, exactly; ``width`` (α, or ``align.width``)
    scales every resizable group, keeping the most important channels (:mod:`dsrewrite.resize`).
    Both are planned on the original model's channel groups (which the separable rewrite
    does not change) and applied after the replacements and calibration.
    """
    from .rewrite import apply_plan, fidelity, real_inputs

    say = progress or (lambda message: None)
    inputs = _inputs_from(example_inputs, None)
    real = real_inputs(inputs)
    if analysis is None:
        analysis = analyze(model, inputs, name=name)
    before = analysis
    config = plan.config if plan is not None else _rule_config(rules, overrides)
    settings = measure_settings or config.measure_settings()
    timer = None
    latency_target = target_latency is not None or (config.target_latency > 0 and target_macs is None
                                                    and max_error is None)
    if measure or config.min_measured_speedup > 0 or (plan is None and latency_target):
        from .facts import layer_timer as make_timer

        timer = layer_timer or make_timer(config, settings, batch_size, cache, progress)
    batches = _batches(calibration)
    if plan is None:
        plan = plan_model(model, inputs, config, analysis=before, calibration=batches, target_macs=target_macs,
                          max_error=max_error, align=align, width=width, measure_settings=settings,
                          batch_size=batch_size, layer_timer=timer, progress=progress, target_latency=target_latency,
                          plan_timer=plan_timer, calibration_memory=calibration_memory)
    if calibration_mode not in ("fast", "thorough"):
        raise ValueError(f"calibration_mode must be 'fast' or 'thorough', not {calibration_mode!r}")
    rewritten = apply_plan(model, plan, real, batches, progress, thorough=calibration_mode == "thorough",
                           memory=calibration_memory)
    say("analyzing the converted model and checking output fidelity ...")
    after = analyze(rewritten.model, inputs, name=before.model_name)
    layer_timings = {}
    if measure and plan.replacements:
        from .facts import time_decisions

        layer_timings = time_decisions(before, plan.replacements, timer)
    report = _conversion_report(before, after, plan, rewritten.kept_energy, fidelity(model, rewritten.model, real),
                                layer_timings)
    report.calibration = rewritten.calibration
    report.reconstruction = rewritten.reconstruction
    report.channels = plan.resize.to_dict() if plan.resize is not None else None
    report.fidelity_inputs = "random" if any(isinstance(x, torch.Tensor) and x.is_meta for x in inputs) else "example"
    latency_plan = (plan.rank_choice or {}).get("target_latency") is not None
    report.chosen_by = "measured latency" if config.min_measured_speedup > 0 or latency_plan else "MACs"
    report.latency_target = dict(plan.rank_choice) if latency_plan else None
    report.plans_compared = (plan.rank_choice or {}).get("compared")
    report.notes.extend(plan.notes)
    if measure:
        say("timing the original and the converted model ...")
        report.measurement = measure_end_to_end(model, rewritten.model, real, settings, config.measure_fold_bn,
                                                batch_size, report.ratios()["macs"])
        report.measurement["breakdown"] = time_breakdown(report.measurement, layer_timings)
    return ConversionResult(rewritten.model, plan, report, before, after)


def _rule_config(rules: Any, overrides):
    from .rules import RuleConfig, load_rules

    return rules if isinstance(rules, RuleConfig) else load_rules(rules, overrides)


def measure_end_to_end(original: nn.Module, converted: nn.Module, inputs: tuple, settings, fold: bool,
                       batch_size: int | None, theoretical: float) -> dict[str, Any]:
    """Median latency of both models on the same inputs, side by side, and what it means."""
    from .measure import fingerprint, time_model

    before = time_model(original, inputs, settings, fold, batch_size)
    after = time_model(converted, inputs, settings, fold, batch_size)
    speedup = before.median / after.median if after.median else float("inf")
    return {
        "settings": dataclasses.asdict(settings),
        "fold_bn": fold,
        "batch_size": batch_size or next((x.shape[0] for x in inputs[:1] if isinstance(x, torch.Tensor) and x.dim()),
                                         None),
        "fingerprint": fingerprint(settings),
        "before": before.to_dict(),
        "after": after.to_dict(),
        "speedup": speedup,
        "theoretical_speedup": theoretical,
        "realization": speedup / theoretical if theoretical else None,
    }


def time_breakdown(measurement: dict[str, Any], layer_timings: dict) -> dict[str, Any] | None:
    """Where the end-to-end time goes: the replaced convs (timed one by one) and everything else.

    ``predicted_speedup`` is what the end-to-end speedup would be if only the replaced convs
    changed, by their own measured speedups (Amdahl's law); the gap to the measured speedup
    is what the layers do together (caches, memory format changes, fusion) that they do not alone.
    """
    if not layer_timings:
        return None
    total_before = measurement["before"]["median_s"]
    total_after = measurement["after"]["median_s"]
    conv_before = sum(t.original_s for t in layer_timings.values())
    conv_after = sum(t.replacement_s for t in layer_timings.values())
    rest = max(total_before - conv_before, 0.0)
    predicted_after = rest + conv_after
    return {
        "replaced_calls": len(layer_timings),
        "replaced_before_s": conv_before,
        "replaced_after_s": conv_after,
        "rest_before_s": rest,
        "rest_after_s": max(total_after - conv_after, 0.0),
        "replaced_share_before": conv_before / total_before if total_before else None,
        "predicted_speedup": total_before / predicted_after if predicted_after else None,
    }


def _conversion_report(before: Analysis, after: Analysis, plan, kept_energy: dict[str, float],
                       fid: dict[str, float], timings: dict) -> ConversionReport:
    after_rows: dict[str, list] = {}
    for c in after.convs:
        if c.module_name:
            after_rows.setdefault(c.module_name.rpartition(".")[0], []).append(c)
    layers = []
    for module_name, decision in plan.modules_to_replace.items():
        sites = [d for d in plan.replacements if d.module_name == module_name]
        new_rows = after_rows.get(module_name, [])
        block = after.trace.root.get_submodule(module_name)
        timing = timings.get(decision.index)
        layers.append(LayerChange(
            name=module_name,
            kernel=decision.kernel,
            in_channels=decision.in_channels,
            out_channels=decision.out_channels,
            depth_multiplier=decision.depth_multiplier,
            params_before=decision.params_before,
            params_after=sum(p.numel() for p in block.parameters()),
            macs_before=sum(d.macs_before for d in sites),
            macs_after=sum(c.macs for c in new_rows),
            kept_energy=kept_energy.get(module_name, 1.0),
            reason=decision.reason,
            measured_original_s=timing.original_s if timing else decision.measured_original_s,
            measured_replacement_s=timing.replacement_s if timing else decision.measured_replacement_s,
            timing=(timing.provenance() if timing else decision.timing),
            family=decision.family or "separable",
            rank=decision.rank or decision.depth_multiplier,
            block=decision.block_text,
        ))
    notes = []
    if not layers:
        notes.append("nothing to replace under these rules: the converted model equals the original")
    return ConversionReport(
        model_name=before.model_name,
        rules=plan.config.to_dict(),
        before=before.totals(),
        after=after.totals(),
        layers=layers,
        fidelity=fid,
        conv_calls=len(before.convs),
        notes=notes,
    )
