"""Choosing each replaced layer's block — family × rank, or keep — for a latency or MAC target.

For every conv module the rules would replace, the candidates are: the dense conv (keep),
and each allowed block family (:mod:`dsrewrite.blocks`; all of them under
``block.family = "auto"``) at a few ranks (:func:`~dsrewrite.blocks.rank_ladder`). Each
candidate has

* an **error**: ‖W − Ŵ‖² / ‖W‖² of its weight-only initialization
  (:func:`~dsrewrite.blocks.family_errors`; 1 − kept energy, as :mod:`dsrewrite.rank` judges
  the separable ranks), summed over the layers as the objective;
* its exact **MACs** (:func:`~dsrewrite.blocks.block_costs`), and, for a latency target,
  its **measured time** on each call site's real input shape (the cached per-layer timer,
  :func:`dsrewrite.facts.layer_timer`), against the dense conv timed on the same shape.

:func:`choose_blocks` picks, per module, the candidate that minimizes the summed error
while the predicted latency — the original model measured end to end, minus what each
chosen block saves on its layers — stays within ``target_latency`` of the original
(or the MACs within ``target_macs``): a multiple-choice knapsack
(:func:`dsrewrite.rank.least_error_within`). Every decision keeps its candidates, and its
reason names the winner and its neighbours on the layer's time/error front. Like the rest
of planning it is pure: the timings and errors are facts gathered beforehand
(:func:`gather_candidates`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

from .plan import ConversionPlan, Decision, kept, replacement, site_of
from .rules import FAMILY_NAMES, RuleConfig, candidate_label
from .units import format_seconds


@dataclasses.dataclass
class Candidate:
    """One way to treat one conv module: a family's block at a rank, or the dense conv (family "keep")."""

    family: str
    rank: int | None
    #: MACs and params summed over the module's call sites
    macs: int
    params: int
    #: squared relative weight error (0 for keep)
    error: float
    #: measured seconds summed over the call sites (latency plans)
    time_s: float | None = None
    #: provenance of the first site's timing (fresh or cached, where)
    timing: dict | None = None

    @property
    def label(self) -> str:
        """``keep``, ``separable×1``, ``bottleneck 96``."""
        return candidate_label(self.family, self.rank)

    def to_dict(self, chosen: bool = False, on_front: bool = False) -> dict[str, Any]:
        """JSON-ready, as a plan's decision lists it (``front``: no other candidate is both cheaper and more accurate)."""
        return {"family": self.family, "rank": self.rank, "macs": self.macs, "params": self.params,
                "error": self.error, "time_s": self.time_s, "chosen": chosen, "front": on_front}

    def text(self) -> str:
        """``bottleneck 96: 0.41 ms, error 0.12``."""
        time = f"{format_seconds(self.time_s)}, " if self.time_s is not None else ""
        return f"{self.label}: {time}error {self.error:.3f}"


def uses_blocks(config: RuleConfig, target_latency: float | None, target_macs: float | None,
                max_error: float | None) -> bool:
    """Whether the block chooser plans (a latency target, or a target with families beyond separable).

    ``block.family = "auto"`` without any target is a :class:`~dsrewrite.errors.ConfigError`:
    auto means "choose for a target".
    """
    from .errors import ConfigError

    targeted = any(x is not None for x in (target_latency, target_macs, max_error))
    families = {config.family} | {f for _, f in config.layer_family}
    if "auto" in families and not targeted:
        raise ConfigError("block.family = \"auto\" chooses a block per layer for a target: give --target-latency "
                          "FRACTION (or plan.target_latency), --target-macs or --max-error")
    return target_latency is not None or (targeted and bool(families - {"separable", "keep"}))


#: families a channel resize (--align / --width) can follow through (dsrewrite.channels.CHAIN_ENDS, and separable)
RESIZABLE_FAMILIES = ("separable", "spatial", "bottleneck", "inverted-residual")


def families_for(config: RuleConfig, module_name: str | None, resize: bool = False) -> tuple[str, ...]:
    """The families a module's candidates come from: every family under auto (those a planned
    channel ``resize`` can follow), else the one named."""
    family = config.family_of(module_name)
    if family == "keep":
        return ()
    if family == "auto":
        return RESIZABLE_FAMILIES if resize else FAMILY_NAMES
    return (family,)


def candidate_ranks_of(family: str, site: Decision, config: RuleConfig) -> list[int]:
    """A family's candidate ranks for one conv: aligned depth multipliers for separable, the MAC ladder else."""
    from .blocks import rank_ladder
    from .rank import candidate_ranks

    if family == "separable":
        return candidate_ranks(site, config.align_divisor)
    return rank_ladder(family, site.in_channels, site.out_channels, site.kernel, site.input_shape,
                       site.output_shape, divisor=max(config.align_divisor, 1))


def gather_candidates(model: nn.Module, analysis, sites: list[Decision], config: RuleConfig,
                      timer: Callable | None = None, progress: bool = False,
                      resize: bool = False, calibration: list | None = None) -> dict[str, list[Candidate]]:
    """``module -> [keep, block candidates...]`` for the modules of ``sites`` (replace decisions).

    With a ``timer`` (``timer(conv, rank, bn, activation, family) -> LayerTiming``) every
    candidate is timed on every call site of its module; without one, candidates carry MACs
    and errors only. Candidates with no fewer MACs than the dense conv are left out; with a
    channel ``resize`` planned, so are the families it cannot follow. Errors are the weight
    errors, or with ``calibration`` batches the output errors on the layer's sampled real
    inputs (:func:`dsrewrite.judge.family_data_errors`).
    """
    from .blocks import block_costs, family_errors
    from .progress import Progress

    convs = {c.index: c for c in analysis.convs}
    by_module: dict[str, list[Decision]] = {}
    for d in sites:
        by_module.setdefault(d.module_name, []).append(d)
    plans: dict[str, list[tuple[str, int]]] = {}
    for name, ds in by_module.items():
        first = ds[0]
        plans[name] = [(f, r) for f in families_for(config, name, resize) for r in candidate_ranks_of(f, first, config)]
    samples, scales = {}, {}
    if calibration:
        from .calibrate import consumer_scales
        from .judge import BLOCK_ROWS, sample_inputs

        samples = sample_inputs(model, {name: BLOCK_ROWS for name in by_module}, calibration)
        scales = consumer_scales(model, list(by_module), calibration[0])

    def judge(name: str, weight, family: str, ranks: list[int]) -> dict[int, float]:
        if name in samples:
            from .judge import family_data_errors

            return family_data_errors(weight, family, ranks, samples[name], scales.get(name))
        return family_errors(weight, family, ranks)

    out: dict[str, list[Candidate]] = {}
    total = sum(len(v) for v in plans.values()) if timer is not None else 0
    with Progress("timing candidate blocks", total, enabled=progress and timer is not None) as bar:
        for name, ds in by_module.items():
            weight = model.get_submodule(name).weight
            dense_macs = sum(d.macs_before for d in ds)
            dense_s = None
            if timer is not None:
                dense_s = sum(timer(convs[d.index], 1, False, "none", "separable").original_s for d in ds)
            options = [Candidate("keep", None, dense_macs, ds[0].params_before, 0.0, dense_s)]
            errors: dict[str, dict[int, float]] = {}
            for family, rank in plans[name]:
                bn = config.bn if family == "separable" else False
                activation = config.activation if family == "separable" else "none"
                costs = [block_costs(family, rank, d.in_channels, d.out_channels, d.kernel, d.input_shape,
                                     d.output_shape, bn) for d in ds]
                macs = sum(m for m, _ in costs)
                if macs >= dense_macs:
                    bar.advance(name)
                    continue
                if family not in errors:
                    errors[family] = judge(name, weight, family, [r for f, r in plans[name] if f == family])
                time_s = timing = None
                if timer is not None:
                    timings = [timer(convs[d.index], rank, bn, activation, family) for d in ds]
                    time_s = sum(t.replacement_s for t in timings)
                    timing = timings[0].provenance()
                    bar.advance(f"{name} {family} {rank}")
                options.append(Candidate(family, rank, macs, costs[0][1], errors[family][rank], time_s, timing))
            out[name] = options
    return out


def choose_blocks(plan: ConversionPlan, candidates: dict[str, list[Candidate]], *,
                  target_latency: float | None = None, target_macs: float | None = None,
                  max_error: float | None = None, original_latency_s: float | None = None,
                  environment: str = "", batch_size: int | None = None, budget: float | None = None,
                  judged_by: str = "weights") -> ConversionPlan:
    """A new plan with each candidate module's block chosen (see the module docstring).

    Exactly one of ``target_latency`` (with ``original_latency_s``, the original model
    measured end to end), ``target_macs`` (fractions of the original) or ``max_error``
    (per layer: the cheapest candidate within the bound). ``budget``: the fraction the
    layer-sum prediction must meet, when it differs from the target (:func:`fit_latency`).
    ``judged_by``: where the candidates' errors came from, "weights" or "data" (recorded in the plan).
    """
    from .rank import least_error_within

    if sum(x is not None for x in (target_latency, target_macs, max_error)) != 1:
        raise ValueError("give exactly one of target_latency, target_macs and max_error")
    by_time = target_latency is not None
    if by_time and original_latency_s is None:
        raise ValueError("a latency target needs the original's measured latency")

    def cost(c: Candidate) -> float:
        return c.time_s if by_time else c.macs

    notes = []
    if max_error is not None:
        chosen = {name: min((c for c in opts if c.error <= max_error), key=cost) for name, opts in candidates.items()}
    else:
        if by_time:
            whole, budget_total = original_latency_s, (budget or target_latency) * original_latency_s
        else:
            whole, budget_total = plan.macs_before, target_macs * plan.macs_before
        fixed = whole - sum(cost(opts[0]) for opts in candidates.values())  # what the plan does not touch
        floor = fixed + sum(min(cost(c) for c in opts) for opts in candidates.values())
        if floor > budget_total:
            what = "latency" if by_time else "MACs"
            notes.append(f"target {target_latency if by_time else target_macs:g} of the original {what} is out of "
                         f"reach under these rules: the fastest candidate everywhere predicts "
                         f"{floor / whole:.3f}")
        options = {name: [(i, c.error, cost(c)) for i, c in enumerate(opts)] for name, opts in candidates.items()}
        picked = least_error_within(options, budget_total - fixed)
        chosen = {name: candidates[name][i] for name, i in picked.items()}
    predicted = None
    if by_time:
        predicted = original_latency_s - sum(opts[0].time_s - chosen[name].time_s for name, opts in candidates.items())
    goal = (f"≤{target_latency:g} of the original's latency" if by_time else
            f"≤{target_macs:g} of the MACs" if target_macs is not None else f"error ≤ {max_error:g}")
    decisions = [_decide(d, candidates[d.module_name], chosen[d.module_name], by_time, goal, plan.config)
                 if d.replaced and d.module_name in candidates else d for d in plan.decisions]
    choice = {"target_latency": target_latency, "target_macs": target_macs, "max_error": max_error,
              "judged_by": judged_by, "chooser": "blocks",
              "families": sorted({c.family for opts in candidates.values() for c in opts if c.family != "keep"}),
              "original_latency_s": original_latency_s, "predicted_latency_s": predicted,
              "predicted_fraction": predicted / original_latency_s if predicted is not None else None,
              "reachable": not notes, "environment": environment if by_time else "", "batch_size": batch_size,
              "budget": budget or target_latency if by_time else None,
              "error": sum(c.error for c in chosen.values())}
    return dataclasses.replace(plan, decisions=decisions, notes=plan.notes + notes, rank_choice=choice)


#: a plan's end-to-end check counts as on target from (1 − 2·TOLERANCE) to 1 of the target; a later
#: measurement of the applied model, ±5% noise on a shared machine, then stays within target + 5%
TOLERANCE = 0.05


def fit_latency(plan: ConversionPlan, candidates: dict[str, list[Candidate]], target_latency: float,
                original_latency_s: float, time_plan: Callable[[ConversionPlan], tuple[float, float]], *,
                rounds: int = 6, environment: str = "", batch_size: int | None = None,
                judged_by: str = "weights") -> ConversionPlan:
    """Blocks chosen for ``target_latency``, checked by timing the planned model end to end.

    Layers timed one by one do not add up to the model (threads, caches, kernels chosen
    differently in context), so the layer-sum prediction of :func:`choose_blocks` is only
    a guide to *which* layers to change. Each round chooses for a layer-sum budget, and
    ``time_plan(plan) -> (original_s, planned_s)`` times the original and the planned model
    side by side (blocks randomly initialized: weights do not change speed). The budget is
    then searched: scaled by target / measured until the measurements bracket the target,
    then interpolated between the bracketing rounds, until a check lands in the band below the
    target (:data:`TOLERANCE`). The plan kept is the least-error one that measured at or below
    the target, else the fastest measured.
    A budget that gives a plan already measured is pushed 5% further without timing. Every
    timed round is recorded in ``rank_choice["rounds"]``.
    """
    if not candidates:  # nothing the rules would replace: no plan can be faster
        plan = choose_blocks(plan, candidates, target_latency=target_latency, original_latency_s=original_latency_s,
                             environment=environment, batch_size=batch_size, judged_by=judged_by)
        return dataclasses.replace(plan, rank_choice=dict(plan.rank_choice, reachable=False, rounds=[]))
    budget, tried, seen, nudges = target_latency, [], {}, 0
    while len(tried) < rounds and nudges <= 20:
        candidate = choose_blocks(plan, candidates, target_latency=target_latency, original_latency_s=original_latency_s,
                                  environment=environment, batch_size=batch_size, budget=budget, judged_by=judged_by)
        signature = tuple((d.module_name, d.family, d.rank) for d in candidate.replacements)
        if signature in seen:  # the budget moved too little to change the plan: push it further, untimed
            nudges += 1
            budget = budget * (0.95 if tried[-1]["measured_fraction"] > target_latency else 1.05)
            if not 1e-3 <= budget <= 1.0:
                break
            continue
        before_s, after_s = time_plan(candidate)
        measured = after_s / before_s if before_s else float("inf")
        seen[signature] = candidate
        candidate.rank_choice.update(measured_fraction=measured, measured_original_s=before_s,
                                     measured_planned_s=after_s)
        tried.append({"budget": budget, "predicted_fraction": candidate.rank_choice["predicted_fraction"],
                      "measured_fraction": measured, "original_s": before_s, "planned_s": after_s,
                      "error": candidate.rank_choice["error"], "replaced": len(candidate.modules_to_replace)})
        if target_latency * (1 - 2 * TOLERANCE) <= measured <= target_latency:
            break
        budget = _next_budget(tried, target_latency)
        if budget is None:
            break
    plans = list(seen.values())
    fits = [p for p in plans if p.rank_choice["measured_fraction"] <= target_latency]
    chosen = min(fits, key=lambda p: p.rank_choice["error"]) if fits else \
        min(plans, key=lambda p: p.rank_choice["measured_fraction"])
    notes = list(chosen.notes)
    if not fits:
        notes.append(f"target {target_latency:g} of the original's latency not reached: the fastest plan found "
                     f"measured {chosen.rank_choice['measured_fraction']:.3f} of the original end to end")
    choice = dict(chosen.rank_choice, rounds=tried, reachable=bool(fits))
    return dataclasses.replace(chosen, notes=notes, rank_choice=choice)


def _next_budget(tried: list[dict], target: float) -> float | None:
    """The next layer-sum budget: scaled by target/measured until the target is bracketed, then interpolated."""
    below = [t for t in tried if t["measured_fraction"] < target]
    above = [t for t in tried if t["measured_fraction"] > target]
    last = tried[-1]
    if below and above:
        lo = max(below, key=lambda t: t["budget"])
        hi = min((t for t in above if t["budget"] > lo["budget"]), key=lambda t: t["budget"], default=None)
        if hi is None:  # measurements not monotone in the budget: stop searching
            return None
        span = hi["measured_fraction"] - lo["measured_fraction"]
        share = (target - lo["measured_fraction"]) / span if span > 0 else 0.5
        return lo["budget"] + min(max(share, 0.1), 0.9) * (hi["budget"] - lo["budget"])
    step = last["budget"] * target / last["measured_fraction"] if last["measured_fraction"] else 1.0
    if step >= 1.0 and last["budget"] >= 1.0:
        return None
    return min(max(step, 1e-3), 1.0)


def front(options: list[Candidate], by_time: bool) -> list[Candidate]:
    """The candidates no other one beats on both cost and error, cheapest first."""
    key = (lambda c: (c.time_s, c.error)) if by_time else (lambda c: (c.macs, c.error))
    out: list[Candidate] = []
    for c in sorted(options, key=key):
        if not out or c.error < out[-1].error:
            out.append(c)
    return out


def _decide(d: Decision, options: list[Candidate], winner: Candidate, by_time: bool, goal: str,
            config: RuleConfig) -> Decision:
    from .blocks import block_costs

    pareto = front(options, by_time)
    listed = [c.to_dict(chosen=c is winner, on_front=any(c is p for p in pareto)) for c in options]
    i = next((k for k, c in enumerate(pareto) if c is winner), None)
    faster = pareto[i - 1] if i else None
    better = pareto[i + 1] if i is not None and i + 1 < len(pareto) else None
    extra = (f"; more accurate {better.text()} did not fit" if better else "") + \
        (f"; faster {faster.text()} was not needed" if faster else "")
    keep = options[0]
    timing = dict(measured_original_s=keep.time_s if by_time else None,
                  measured_replacement_s=winner.time_s if by_time and winner.family != "keep" else None,
                  timing=winner.timing if by_time else None)
    if winner.family == "keep":
        dense = f" ({format_seconds(keep.time_s)})" if by_time else ""
        return dataclasses.replace(kept(d, "ChooseBlock", f"kept: the dense conv{dense} fits {goal}{extra}"),
                                   candidates=listed, **timing)
    separable = winner.family == "separable"
    bn, activation = (config.bn, config.activation) if separable else (False, "none")
    macs, params = block_costs(winner.family, winner.rank, d.in_channels, d.out_channels, d.kernel, d.input_shape,
                               d.output_shape, bn)
    k = "×".join(map(str, d.kernel))
    hw = "×".join(map(str, d.output_shape[2:]))
    speed = (f", {format_seconds(winner.time_s)} vs {format_seconds(keep.time_s)} dense "
             f"({keep.time_s / winner.time_s:.2f}×)" if by_time and winner.time_s else "")
    reason = (f"replaced: {k} {d.in_channels}→{d.out_channels} at {hw}, {d.macs_before / macs:.1f}× fewer MACs; "
              f"{winner.label}{speed}, error {winner.error:.3f}, for {goal}{extra}")
    return replacement(site_of(d), winner.family, winner.rank, bn, activation, macs, params, rule="ChooseBlock",
                       reason=reason, candidates=listed, **timing)
