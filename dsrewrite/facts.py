"""Between profile and plan: gather the facts a plan is decided from.

Planning itself is pure (:func:`dsrewrite.plan.plan_conversion`); what it needs that is not
in the analysis is collected here, where side effects belong:

* **timings** of each candidate conv against its block on this machine, for the
  latency-aware rule (``replace.min_measured_speedup``) — read from and written to the
  on-disk latency cache, each one marked fresh or cached;
* **candidate errors** of every depth multiplier for each replaceable module, for
  ``--target-macs`` / ``--max-error`` — from the weights (kept SVD energy) or, with
  calibration data, from one pass over the data;
* for a **latency target** (``--target-latency``) or a block family other than separable,
  every candidate block of each replaceable layer with its error and (latency target) its
  timing, and the original model timed end to end (:mod:`dsrewrite.choose`);
* the **channel graph** (and, for a width change, each channel's importance) for
  ``--align`` / ``--width``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

from .calibrate import MEMORY_LIMIT
from .plan import ConversionPlan, candidate_decisions, rule_decisions
from .rules import RuleConfig


@dataclasses.dataclass
class PlanFacts:
    """What :func:`~dsrewrite.plan.plan_conversion` decides from, besides the analysis and the rules."""

    #: conv index -> :class:`~dsrewrite.measure.LayerTiming` (latency-aware rule)
    timings: dict[int, Any] = dataclasses.field(default_factory=dict)
    #: where the timings were taken ("cpu/2 threads")
    environment: str = ""
    #: conv module -> {depth multiplier: error} (rank choice)
    errors: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    #: "data" (calibration batches) or "energy" / "weights" (weights only: depth multipliers / blocks), or None
    errors_from: str | None = None
    #: the model's channel graph (resize), or None
    channels: Any = None
    #: group id -> one importance score per channel (width changes)
    importance: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    #: conv module -> its :class:`~dsrewrite.choose.Candidate` blocks, keep first (block choice)
    blocks: dict[str, list] = dataclasses.field(default_factory=dict)
    #: the original model's end-to-end latency in seconds (latency targets)
    original_latency_s: float | None = None
    #: the latency target the facts were gathered for (a fraction), or None
    target_latency: float | None = None
    #: ``plan_timer(plan) -> (original_s, planned_s)``: both models timed side by side (latency targets)
    plan_timer: Any = None
    batch_size: int | None = None
    #: group id -> its :class:`~dsrewrite.choose.WidthCandidate` widths (``plan.group_widths``)
    widths: dict[int, list] = dataclasses.field(default_factory=dict)
    #: what the facts could not cover, said in the plan
    notes: list[str] = dataclasses.field(default_factory=list)
    #: seconds spent judging candidates on calibration data (sampling it, the errors; not the timing)
    judging_s: float = 0.0
    #: module -> its measured output sensitivity (:func:`~dsrewrite.judge.output_sensitivity`): with calibration
    #: data, each candidate's error at its layer is weighted by it
    sensitivity: dict[str, float] = dataclasses.field(default_factory=dict)
    #: ``plan_judge(plan, label) -> fidelity``: the plan applied and calibrated, its output error on the held-out
    #: calibration samples (``plan.compare_on_data``; :func:`data_judge`), or None
    plan_judge: Any = None


def gather_facts(model: nn.Module, analysis, config: RuleConfig, *, timer: Callable | None = None,
                 calibration: list | None = None, target_macs: float | None = None, max_error: float | None = None,
                 align: int | None = None, width: float | None = None, settings=None, batch_size: int | None = None,
                 cache=None, progress: Callable[[str], None] | None = None, target_latency: float | None = None,
                 inputs: tuple | None = None, plan_timer: Callable | None = None,
                 calibration_memory: int | None = MEMORY_LIMIT) -> PlanFacts:
    """Collect exactly the facts :func:`~dsrewrite.plan.plan_conversion` will need for these settings.

    ``inputs``: example inputs (meta tensors are filled with seeded samples) for timing the
    whole model, which a latency target needs; ``plan_timer`` replaces that end-to-end timing
    (:func:`end_to_end_timer`'s signature: ``plan_timer(None)`` gives the original's latency).
    ``calibration_memory``: as ``memory`` of :func:`~dsrewrite.rewrite.apply_plan`, for the plans
    calibrated to be compared on data.
    """
    from .choose import uses_blocks
    from .measure import environment_label

    say = progress or (lambda message: None)
    facts = PlanFacts()
    if target_latency is None and target_macs is None and max_error is None:  # an explicit target wins
        target_latency = config.target_latency or None
    widths_wanted = bool(config.group_widths)
    if widths_wanted and (align is not None or config.align_groups or width is not None or config.align_width > 0):
        facts.notes.append("channel widths were not chosen per group: --align / --width (align.*) resize every "
                           "group as they say")
        widths_wanted = False
    if target_latency is None and target_macs is None:  # widths are chosen for a target: without one, none
        widths_wanted = False
    blockwise = uses_blocks(config, target_latency, target_macs, max_error, widths_wanted and bool(calibration))
    if blockwise:
        from .choose import gather_candidates

        timer_ = None

        def examples() -> tuple:
            """Concrete example inputs: the given ones, else seeded samples of the analyzed shapes."""
            import torch

            from .rewrite import real_inputs

            shaped = inputs or tuple(torch.empty(s, device="meta") for s in analysis.profile.input_shapes)
            return real_inputs(shaped)

        if target_latency is not None:
            settings = settings or config.measure_settings()
            timer_ = timer or layer_timer(config, settings, batch_size, cache, progress)
            if plan_timer is None:
                plan_timer = end_to_end_timer(model, examples(), settings, config.measure_fold_bn, batch_size, say)
            say("timing the original model end to end ...")
            facts.original_latency_s = plan_timer(None)[0]  # None: the original alone (the budget's scale)
            facts.plan_timer = plan_timer
            facts.environment = environment_label(settings)
            facts.target_latency, facts.batch_size = target_latency, batch_size
        else:
            if config.min_measured_speedup > 0:  # a block is offered only where it measured fast enough
                settings = settings or config.measure_settings()
                timer_ = timer or layer_timer(config, settings, batch_size, cache, progress)
                facts.environment = environment_label(settings)
            say("judging each candidate block ...")
        resize = align is not None or config.align_groups or width is not None or config.align_width > 0
        sites = candidate_decisions(analysis, config)
        if calibration:
            import time

            from .judge import output_sensitivity

            say("measuring each layer's effect on the model's output ...")
            start = time.perf_counter()
            names = {d.module_name for d in sites if d.module_name}
            if widths_wanted:  # every layer that can be refit may read a thinned group
                from .choose import refittable

                names |= {n for n, m in model.named_modules() if refittable(m)}
            facts.sensitivity = output_sensitivity(model, sorted(names), calibration)
            facts.judging_s += time.perf_counter() - start
        if widths_wanted:
            if calibration:
                from .choose import gather_widths

                say("judging each channel group's widths on the calibration data ...")
                spent_widths: dict[str, float] = {}
                facts.widths = gather_widths(model, analysis, config, calibration, timer_, progress is not None,
                                             spent_widths, facts.sensitivity)
                facts.judging_s += spent_widths.get("judging_s", 0.0)
            else:
                facts.notes.append("channel widths were not offered: a thinned group is only usable after its "
                                   "consumers are refit on data (give --calibrate DATA)")
        if calibration:
            say("judging each candidate block on the calibration data ...")
        spent: dict[str, float] = {}
        facts.blocks = gather_candidates(model, analysis, sites, config, timer_,
                                         progress is not None, resize, calibration, spent, facts.sensitivity)
        facts.judging_s += spent.get("judging_s", 0.0)
        facts.errors_from = "data" if calibration else "weights"
        if calibration and config.compare_on_data and (target_latency is not None or target_macs is not None):
            facts.plan_judge = data_judge(model, examples(), calibration, say, calibration_memory)
    elif config.min_measured_speedup > 0:
        settings = settings or config.measure_settings()
        timer = timer or layer_timer(config, settings, batch_size, cache, progress)
        facts.timings = time_decisions(analysis, candidate_decisions(analysis, config), timer)
        facts.environment = environment_label(settings)
    if (target_macs is not None or max_error is not None) and not blockwise:
        from .rank import data_errors, energy_errors

        say("judging each candidate depth multiplier ...")
        candidates = ConversionPlan(analysis.model_name, config,
                                    rule_decisions(analysis, config, facts.timings, facts.environment))
        facts.errors = data_errors(model, candidates, calibration) if calibration else energy_errors(model, candidates)
        facts.errors_from = "data" if calibration else "energy"
    width = width if width is not None else (config.align_width or None)
    if align is not None or config.align_groups or width is not None:
        from .resize import group_importance

        facts.channels = analysis.channel_groups()
        if width is not None:
            facts.importance = {g.id: group_importance(model, facts.channels, g.id).tolist()
                                for g in facts.channels.resizable}
    return facts


def data_judge(model: nn.Module, inputs: tuple, calibration: list, say: Callable[[str], None],
               memory: int | None = MEMORY_LIMIT) -> Callable:
    """``judge(plan, label) -> fidelity``: ``plan`` applied to ``model`` and calibrated on ``calibration`` as
    :func:`~dsrewrite.rewrite.apply_plan` does for the conversion itself (fast mode), and the output's
    relative error, cosine and top-1 agreement against the original measured on the samples that
    calibration holds out (:func:`~dsrewrite.calibrate.split_held_out`), with their count and the seconds
    it took."""
    import time

    from .calibrate import HELD_OUT, agreement, split_held_out
    from .rewrite import apply_plan

    def judge(plan, label: str) -> dict:
        say(f"applying and calibrating the plan '{label}' to measure its error on held-out samples ...")
        start = time.perf_counter()
        result = apply_plan(model, plan, inputs, calibration, memory=memory)
        report = result.reconstruction or result.calibration
        if report:  # measured by the calibration itself, on the samples it held out
            fidelity, samples = dict(report["after"]), report["held_out_samples"]
        else:  # nothing was refit (a plan that changes nothing): measured here, on the same samples
            held = split_held_out(calibration, HELD_OUT)[1]
            fidelity, samples = agreement(model, result.model, held or calibration), sum(x.shape[0] for x in held)
        return dict(fidelity, samples=samples, seconds=time.perf_counter() - start)

    return judge


#: interleaved rounds of a plan's end-to-end check (each with measure.repeats // rounds runs, at least 3)
CHECK_ROUNDS = 5


def end_to_end_timer(model: nn.Module, inputs: tuple, settings, fold: bool, batch_size: int | None,
                     say: Callable[[str], None]) -> Callable:
    """``timer(plan) -> (original_s, planned_s)``: the original and the plan's model (:func:`~dsrewrite.rewrite.skeleton`)
    timed end to end, side by side in interleaved rounds (``plan`` None: the original alone, ``planned_s``
    None)."""
    from .measure import time_model, time_side_by_side
    from .rewrite import skeleton

    def timer(plan):
        if plan is None:
            return time_model(model, inputs, settings, fold, batch_size).median, None
        say(f"timing the planned model ({len(plan.modules_to_replace)} block(s)) against the original ...")
        before, after = time_side_by_side([model, skeleton(model, plan)], inputs, settings, fold, batch_size,
                                          rounds=CHECK_ROUNDS)
        return before, after

    return timer


def layer_timer(config: RuleConfig, settings, batch_size: int | None = None, cache=None, progress=None) -> Callable:
    """``timer(conv, rank, bn, activation, family="separable") -> LayerTiming``, through the on-disk cache.

    ``rank`` is the separable block's depth multiplier, or another family's rank. The dense
    conv of one geometry is timed once per run however many blocks are timed against it.
    ``timer.thinned(conv, in_channels, out_channels) -> LayerTiming`` times the dense conv
    against itself with fewer channels (a thinned channel group), through the same cache.
    """
    from .measure import LatencyCache, layer_key, time_dense, time_layer, time_thinned

    store = cache if cache is not None else LatencyCache()  # cache=False: no disk cache at all
    this_run: dict[str, Any] = {}  # layers of the same geometry are timed once per run, and count as fresh
    dense: dict[str, Any] = {}

    def cached(key: str, conv, measure: Callable) -> Any:
        """This run's, else the disk cache's, else a fresh timing (``measure(dense_timing)``), remembered."""
        if key in this_run:
            return this_run[key]
        hit = store.get(key) if store else None
        if hit is not None:
            return hit
        dense_key = layer_key(conv, 0, False, "none", settings, False, batch_size, "dense")
        if dense_key not in dense:
            dense[dense_key] = time_dense(conv, settings, batch_size)
        timing = this_run[key] = measure(dense[dense_key])
        if store:
            store.put(key, timing)
            store.save()
        return timing

    def timer(conv, rank, bn, activation, family="separable"):
        key = layer_key(conv, rank, bn, activation, settings, config.measure_fold_bn, batch_size, family)
        return cached(key, conv, lambda original: time_layer(conv, rank, bn, activation, settings,
                                                             config.measure_fold_bn, batch_size, family,
                                                             original=original))

    def thinned(conv, in_channels: int, out_channels: int):
        """The dense conv against itself with fewer input/output channels (a thinned channel group)."""
        key = layer_key(conv, 0, False, "none", settings, False, batch_size, f"thinned {in_channels}→{out_channels}")
        return cached(key, conv, lambda original: time_thinned(conv, in_channels, out_channels, settings, batch_size,
                                                               original=original))

    timer.quiet = progress is None
    timer.thinned = thinned
    return timer


def time_decisions(analysis, decisions, timer) -> dict:
    """conv index -> timing of each decision's conv against its block (with a progress bar)."""
    from .progress import Progress

    convs = {c.index: c for c in analysis.convs}
    out = {}
    with Progress("measuring layers", len(decisions), enabled=not getattr(timer, "quiet", True)) as bar:
        for d in decisions:
            family = d.family or "separable"
            rank = d.depth_multiplier if family == "separable" else d.rank
            out[d.index] = timer(convs[d.index], rank, d.bn, d.activation, family)
            bar.advance(d.name)
    return out
