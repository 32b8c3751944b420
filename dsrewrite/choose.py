"""Choosing each replaced layer's block — family × rank, or keep — for a latency or MAC target.

For every conv module the rules would replace, the candidates are: the dense conv (keep),
and each allowed block family (:mod:`dsrewrite.blocks`; all of them under
``block.family = "auto"``) at a few ranks (:func:`~dsrewrite.blocks.rank_ladder`). Each
candidate has

* an **error**: without data, ‖W − Ŵ‖² / ‖W‖² of its weight-only initialization
  (:func:`~dsrewrite.blocks.family_errors`; 1 − kept energy, as :mod:`dsrewrite.rank` judges
  the separable ranks); with calibration data, its squared relative output error on the
  layer's sampled real inputs after the least-squares refit of its last conv
  (:func:`dsrewrite.judge.family_refit_errors`); summed over the layers as the objective;
* its exact **MACs** (:func:`~dsrewrite.blocks.block_costs`), and, for a latency target,
  its **measured time** on each call site's real input shape (the cached per-layer timer,
  :func:`dsrewrite.facts.layer_timer`), against the dense conv timed on the same shape.

:func:`choose_blocks` picks, per module, the candidate that minimizes the summed error
while the predicted latency — the original model measured end to end, minus what each
chosen block saves on its layers — stays within ``target_latency`` of the original
(or the MACs within ``target_macs``): a multiple-choice knapsack
(:func:`dsrewrite.rank.least_error_within`). Every decision keeps its candidates, and its
reason names the winner and its neighbours on the layer's time/error front.

With ``plan.group_widths`` and calibration data, every resizable channel group is offered
beside the blocks at those widths (:func:`gather_widths`): its error is the summed output
error of its consumers after their least-squares refit on the channels kept
(:func:`dsrewrite.judge.refit_error`), its saving the measured time (or MACs) its convs save
thinned. A thinned group keeps its convs dense; groups and blocks are chosen together
(:func:`_choose_with_widths`) and the chosen widths become the plan's channel resize.

Like the rest of planning it is pure: the timings and errors are facts gathered beforehand
(:func:`gather_candidates`, :func:`gather_widths`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from torch import nn

from .plan import ConversionPlan, Decision, kept, replacement, site_of
from .rules import AUTO_FAMILIES, RuleConfig, candidate_label
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


@dataclasses.dataclass
class WidthCandidate:
    """One channel group at a smaller width: the channels with the largest filter L1 norm kept,
    every consumer (conv or Linear reading the group) refit by least squares on them."""

    group: int
    #: the group's key (:meth:`~dsrewrite.channels.ChannelGraph.key`)
    members: tuple[str, ...]
    alpha: float
    old_width: int
    new_width: int
    keep: list[int]
    #: summed squared relative output error of the consumers after their refit (:func:`dsrewrite.judge.refit_error`)
    error: float
    #: MACs the group's convs save, summed over their call sites
    macs_saved: int
    #: measured seconds the group's standard convs save (latency plans), and the first timing's provenance
    time_saved_s: float | None = None
    timing: dict | None = None
    #: the convs whose cost changes: they stay dense when the group is thinned
    modules: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    producers: tuple[str, ...] = ()
    #: per conv whose cost changes: (module, role, share of its channels kept along that role, its dense
    #: MACs, its dense seconds or None) — how savings of two groups on one conv combine (:func:`combined_saving`)
    parts: tuple[tuple[str, str, float, int, float | None], ...] = ()

    @property
    def label(self) -> str:
        """``×0.5 → 32``."""
        return f"×{self.alpha:g} → {self.new_width}"

    def saving(self, by_time: bool) -> float:
        """What thinning the group saves: seconds or MACs."""
        return (self.time_saved_s or 0.0) if by_time else self.macs_saved

    def to_dict(self, chosen: bool = False) -> dict[str, Any]:
        """JSON-ready, as a plan lists a group's width candidates."""
        return {"alpha": self.alpha, "old_width": self.old_width, "new_width": self.new_width, "error": self.error,
                "macs_saved": self.macs_saved, "time_saved_s": self.time_saved_s, "timing": self.timing,
                "chosen": chosen}


def uses_blocks(config: RuleConfig, target_latency: float | None, target_macs: float | None,
                max_error: float | None, widths: bool = False) -> bool:
    """Whether the block chooser plans (a latency target, or a MAC target or error bound with families
    beyond separable, or a MAC target with channel ``widths`` to choose).

    ``block.family = "auto"`` without any target is a :class:`~dsrewrite.errors.ConfigError`:
    auto means "choose for a target".
    """
    from .errors import ConfigError

    targeted = any(x is not None for x in (target_latency, target_macs, max_error))
    families = {config.family} | {f for _, f in config.layer_family}
    if "auto" in families and not targeted:
        raise ConfigError("block.family = \"auto\" chooses a block per layer for a target: give --target-latency "
                          "FRACTION (or plan.target_latency), --target-macs or --max-error")
    return target_latency is not None or (targeted and bool(families - {"separable", "keep"})) or \
        (target_macs is not None and widths)


#: families a channel resize (--align / --width) can follow through (dsrewrite.channels.CHAIN_ENDS, and separable)
RESIZABLE_FAMILIES = ("separable", "spatial", "bottleneck", "inverted-residual")


def families_for(config: RuleConfig, module_name: str | None, resize: bool = False) -> tuple[str, ...]:
    """The families a module's candidates come from: every family under auto (those a planned
    channel ``resize`` can follow), else the one named."""
    family = config.family_of(module_name)
    if family == "keep":
        return ()
    if family == "auto":
        return RESIZABLE_FAMILIES if resize else AUTO_FAMILIES
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
                      resize: bool = False, calibration: list | None = None,
                      spent: dict | None = None,
                      sensitivity: dict[str, float] | None = None) -> dict[str, list[Candidate]]:
    """``module -> [keep, block candidates...]`` for the modules of ``sites`` (replace decisions).

    With a ``timer`` (``timer(conv, rank, bn, activation, family) -> LayerTiming``) every
    candidate is timed on every call site of its module; without one, candidates carry MACs
    and errors only. Candidates with no fewer MACs than the dense conv are left out; with a
    channel ``resize`` planned, so are the families it cannot follow. Errors are the weight
    errors, or with ``calibration`` batches the output errors on the layer's sampled real
    inputs after the refit of each block's last conv (:func:`dsrewrite.judge.family_refit_errors`).
    ``spent``: a dict that gets ``judging_s``, the seconds spent judging (sampling the data and
    the errors; the timing is not counted). ``sensitivity`` (module -> s,
    :func:`dsrewrite.judge.output_sensitivity`) weights each layer's data errors by how much of
    an error there reaches the model's output, so that errors of different layers compare.
    """
    import time
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
    clock = time.perf_counter()
    judging = 0.0
    if calibration:
        from .calibrate import consumer_scales
        from .judge import block_rows, sample_inputs

        samples = sample_inputs(model, {name: block_rows(model.get_submodule(name).weight[0].numel())
                                        for name in by_module}, calibration)
        scales = consumer_scales(model, list(by_module), calibration[0])
    judging = time.perf_counter() - clock

    def judge(name: str, family: str, ranks: list[int]) -> dict[int, float]:
        nonlocal judging
        start = time.perf_counter()
        conv = model.get_submodule(name)
        if name in samples:
            from .judge import family_refit_errors

            errors = family_refit_errors(conv, family, ranks, samples[name], scales.get(name))
            weight = (sensitivity or {}).get(name, 1.0)
            errors = {r: weight * e for r, e in errors.items()}
        else:
            errors = family_errors(conv.weight, family, ranks)
        judging += time.perf_counter() - start
        return errors

    out: dict[str, list[Candidate]] = {}
    total = sum(len(v) for v in plans.values()) if timer is not None else 0
    with Progress("timing candidate blocks", total, enabled=progress and timer is not None) as bar:
        for name, ds in by_module.items():
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
                    errors[family] = judge(name, family, [r for f, r in plans[name] if f == family])
                time_s = timing = None
                if timer is not None:
                    timings = [timer(convs[d.index], rank, bn, activation, family) for d in ds]
                    time_s = sum(t.replacement_s for t in timings)
                    timing = timings[0].provenance()
                    bar.advance(f"{name} {family} {rank}")
                options.append(Candidate(family, rank, macs, costs[0][1], errors[family][rank], time_s, timing))
            out[name] = options
    if spent is not None:
        spent["judging_s"] = spent.get("judging_s", 0.0) + judging
    return out


def refittable(module: nn.Module) -> bool:
    """Whether a layer reading a thinned channel group can be refit on the channels left (and so judged):
    a Linear, or an ungrouped conv with numeric padding."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1 and
                                             not isinstance(module.padding, str))


def gather_widths(model: nn.Module, analysis, config: RuleConfig, calibration: list, timer: Callable | None = None,
                  progress: bool = False, spent: dict | None = None,
                  sensitivity: dict[str, float] | None = None) -> dict[int, list[WidthCandidate]]:
    """``group id -> [WidthCandidate, ...]`` for every resizable channel group, one per width of
    ``config.group_widths`` (``make_divisible`` by ``align.divisor``; widths that do not shrink
    the group are left out).

    Errors come from one pass of the original over ``calibration`` (sampled inputs of every
    consumer, :func:`dsrewrite.judge.refit_error`). A group is offered only when every layer
    reading it can be refit (an ungrouped conv with numeric padding, or a Linear). With a
    ``timer``, each of the group's standard convs is timed thinned against itself on its input
    shape (``timer.thinned``; a timer without it scales the dense conv's time by the MACs).
    ``spent`` gets ``judging_s``: seconds spent sampling and judging (not timing). ``sensitivity``
    weights each consumer's error as in :func:`gather_candidates`.
    """
    import time

    import torch

    from .calibrate import consumer_scales
    from .judge import refit_error, sample_inputs, width_rows
    from .layers import make_divisible
    from .measure import LayerTiming
    from .progress import Progress
    from .resize import GroupChange, ResizePlan, group_importance, kept_positions

    channels = analysis.channel_groups()
    divisor = max(config.align_divisor, 1)
    sites: dict[str, list] = {}
    for c in analysis.convs:
        if c.module_name:
            sites.setdefault(c.module_name, []).append(c)

    offered: dict[int, tuple] = {}
    for group in channels.resizable:
        members = [m for m in channels.members if any(channels.group_of[s.atom] == group.id for s in m.layout)]
        consumers = sorted({m.module for m in members if m.role == "in"})
        if not consumers or not all(refittable(model.get_submodule(n)) for n in consumers):
            continue
        news = sorted({make_divisible(group.width * a, divisor, min_value=divisor): a for a in config.group_widths
                       }.items(), reverse=True)
        news = [(new, a) for new, a in news if new < group.width]
        if news:
            offered[group.id] = (group, members, consumers, news)
    if not offered:
        return {}
    clock = time.perf_counter()
    readers = sorted({n for _, _, consumers, _ in offered.values() for n in consumers})
    rows = sample_inputs(model, {n: width_rows(model.get_submodule(n).weight[0].numel()) for n in readers},
                         calibration)
    scales = consumer_scales(model, readers, calibration[0])
    judging = time.perf_counter() - clock
    out: dict[int, list[WidthCandidate]] = {}
    total = sum(len(v[3]) for v in offered.values())
    with Progress("judging channel widths", total, enabled=progress) as bar:
        for gid, (group, members, consumers, news) in offered.items():
            importance = group_importance(model, channels, gid)
            key = channels.key(group)
            options = []
            for new, alpha in news:
                keep = sorted(torch.topk(importance, new).indices.tolist())
                change = GroupChange(gid, group.width, new, keep, "", list(group.producers), key)
                positions = kept_positions(channels, ResizePlan(divisor, None, [change], []))
                error, clock = 0.0, time.perf_counter()
                for name in consumers:
                    module = model.get_submodule(name)
                    index = positions[(name, "in")]
                    taps = math.prod(module.kernel_size) if isinstance(module, nn.Conv2d) else 1
                    cols = (index[:, None] * taps + torch.arange(taps)[None]).reshape(-1)
                    error += (sensitivity or {}).get(name, 1.0) * refit_error(
                        module.weight.reshape(module.weight.shape[0], -1), rows[name], cols, scales.get(name),
                        bias=module.bias is not None)
                judging += time.perf_counter() - clock
                macs, seconds, timing, parts = 0, 0.0 if timer is not None else None, None, []
                for m in members:
                    linear = isinstance(model.get_submodule(m.module), nn.Linear)
                    if m.role not in ("in", "out", "depthwise") or not (m.module in sites or linear):
                        continue
                    weight = model.get_submodule(m.module).weight
                    size = weight.shape[1] if m.role == "in" else weight.shape[0]
                    share = len(positions[(m.module, m.role)]) / size
                    dense_macs = (analysis.profile.module_macs.get(m.module, 0) if linear else
                                  sum(site.macs for site in sites[m.module]))
                    macs += round(dense_macs * (1 - share))
                    dense_s = None
                    if timer is not None and m.role != "depthwise" and not linear:  # depthwise, Linear: not timed
                        dense_s = 0.0
                        for site in sites[m.module]:
                            c_in = round(site.in_channels * share) if m.role == "in" else site.in_channels
                            c_out = round(site.out_channels * share) if m.role == "out" else site.out_channels
                            if hasattr(timer, "thinned"):
                                t = timer.thinned(site, c_in, c_out)
                                timing = timing or t.provenance()
                            else:
                                dense = timer(site, 1, False, "none", "separable").original_s
                                t = LayerTiming(dense, dense * c_in * c_out / (site.in_channels * site.out_channels))
                            seconds += t.original_s - t.replacement_s
                            dense_s += t.original_s
                    parts.append((m.module, m.role, share, dense_macs, dense_s))
                options.append(WidthCandidate(gid, key, alpha, group.width, new, keep, error, macs, seconds, timing,
                                              tuple(sorted({p[0] for p in parts})), tuple(consumers),
                                              tuple(group.producers), tuple(parts)))
                bar.advance(f"group {gid} ×{alpha:g}")
            out[gid] = options
    if spent is not None:
        spent["judging_s"] = spent.get("judging_s", 0.0) + judging
    return out


def choose_blocks(plan: ConversionPlan, candidates: dict[str, list[Candidate]], *,
                  target_latency: float | None = None, target_macs: float | None = None,
                  max_error: float | None = None, original_latency_s: float | None = None,
                  environment: str = "", batch_size: int | None = None, budget: float | None = None,
                  judged_by: str = "weights", widths: dict[int, list[WidthCandidate]] | None = None,
                  macs_cap: float | None = None) -> ConversionPlan:
    """A new plan with each candidate module's block chosen (see the module docstring).

    Exactly one of ``target_latency`` (with ``original_latency_s``, the original model
    measured end to end), ``target_macs`` (fractions of the original) or ``max_error``
    (per layer: the cheapest candidate within the bound). ``macs_cap``: with ``target_latency``,
    the MACs must stay within this fraction of the original too (:func:`_within_macs`), for a
    size budget beside the latency one. ``budget``: the fraction the
    layer-sum prediction must meet, when it differs from the target (:func:`fit_latency`).
    ``judged_by``: where the candidates' errors came from, "weights" or "data" (recorded in the plan).
    ``widths`` (:func:`gather_widths`): channel-group widths offered beside the blocks for a target
    (:func:`_choose_with_widths`); the chosen ones become the plan's ``resize``, and the convs of a
    thinned group stay dense.
    """
    from .rank import least_error_within

    if sum(x is not None for x in (target_latency, target_macs, max_error)) != 1:
        raise ValueError("give exactly one of target_latency, target_macs and max_error")
    by_time = target_latency is not None
    if macs_cap is not None and not by_time:
        raise ValueError("macs_cap goes with a latency target (a MAC target alone is target_macs)")
    if by_time and original_latency_s is None:
        raise ValueError("a latency target needs the original's measured latency")

    def cost(c: Candidate) -> float:
        return c.time_s if by_time else c.macs

    notes, groups = [], {}
    if max_error is not None:
        chosen = {name: min((c for c in opts if c.error <= max_error), key=cost) for name, opts in candidates.items()}
        if widths:
            notes.append("channel widths are chosen for a latency or MAC target, not for --max-error: every group "
                         "keeps its width")
    else:
        if by_time:
            whole, budget_total = original_latency_s, (budget or target_latency) * original_latency_s
        else:
            whole, budget_total = plan.macs_before, target_macs * plan.macs_before
        fixed = whole - sum(cost(opts[0]) for opts in candidates.values())  # what the plan does not touch
        floor = fixed + sum(min(cost(c) for c in opts) for opts in candidates.values()) - \
            sum(max(w.saving(by_time) for w in opts) for opts in (widths or {}).values())
        if floor > budget_total:
            what = "latency" if by_time else "MACs"
            notes.append(f"target {target_latency if by_time else target_macs:g} of the original {what} is out of "
                         f"reach under these rules: the fastest candidate everywhere predicts "
                         f"{floor / whole:.3f}")
        def pick(blocks, group_widths):
            if group_widths:
                return _choose_with_widths(blocks, group_widths, cost, by_time, budget_total - fixed)
            options = {name: [(i, c.error, cost(c)) for i, c in enumerate(opts)] for name, opts in blocks.items()}
            picked = least_error_within(options, budget_total - fixed)
            return {name: blocks[name][i] for name, i in picked.items()}, {}

        if macs_cap is not None:
            chosen, groups, macs_note = _within_macs(candidates, widths or {}, pick, plan.macs_before, macs_cap)
            if macs_note:
                notes.append(macs_note)
        else:
            chosen, groups = pick(candidates, widths)
    predicted = None
    if by_time:
        predicted = original_latency_s - sum(opts[0].time_s - chosen[name].time_s for name, opts in candidates.items()) \
            - combined_saving(groups.values(), True)
    goal = (f"≤{target_latency:g} of the original's latency" if by_time else
            f"≤{target_macs:g} of the MACs" if target_macs is not None else f"error ≤ {max_error:g}")
    if macs_cap is not None:
        goal += f" and ≤{macs_cap:g} of the MACs"
    thinned = {m: w for w in groups.values() for m in w.modules}
    decisions = [_decide(d, candidates[d.module_name], chosen[d.module_name], by_time, goal, plan.config,
                         thinned.get(d.module_name))
                 if d.replaced and d.module_name in candidates else d for d in plan.decisions]
    choice = {"target_latency": target_latency, "target_macs": target_macs if macs_cap is None else macs_cap,
              "max_error": max_error,
              "judged_by": judged_by, "chooser": "blocks",
              "families": sorted({c.family for opts in candidates.values() for c in opts if c.family != "keep"}),
              "original_latency_s": original_latency_s, "predicted_latency_s": predicted,
              "predicted_fraction": predicted / original_latency_s if predicted is not None else None,
              "reachable": not notes, "environment": environment if by_time else "", "batch_size": batch_size,
              "budget": budget or target_latency if by_time else None,
              "error": sum(c.error for c in chosen.values()) + sum(w.error for w in groups.values())}
    resize = plan.resize
    if widths:
        choice["widths"] = [{"group": gid, "members": list(opts[0].members), "old_width": opts[0].old_width,
                             "chosen": groups[gid].new_width if gid in groups else opts[0].old_width,
                             "candidates": [w.to_dict(chosen=groups.get(gid) is w) for w in opts]}
                            for gid, opts in widths.items()]
        resize = _resize_of(groups, by_time, goal, plan.config) if groups else None
        choice["width_macs_saved"] = round(combined_saving(groups.values(), False))
    return dataclasses.replace(plan, decisions=decisions, notes=plan.notes + notes, rank_choice=choice, resize=resize)


def _choose_with_widths(candidates: dict[str, list[Candidate]], widths: dict[int, list[WidthCandidate]],
                        cost: Callable[[Candidate], float], by_time: bool,
                        room: float) -> tuple[dict[str, Candidate], dict[int, WidthCandidate]]:
    """Blocks per module and a width per group, least summed error with the touched cost within ``room``.

    A thinned group keeps its convs dense (their timings and errors were taken dense), which
    couples groups and modules; so the groups are chosen by a Lagrangian search: for each price
    λ of cost, groups are taken greedily while thinning one saves more (λ·saving) than it costs
    in error plus the block choices its convs give up; then the modules left free get the exact
    least-error blocks within what remains of the budget (:func:`dsrewrite.rank.least_error_within`).
    The best plan within ``room`` over all λ wins (λ = 0: no group thinned, the blocks-only plan).
    """
    from .rank import least_error_within

    scale = room if room > 0 else 1.0
    best = None
    for price in [0.0] + [10 ** (k / 4) for k in range(-16, 25)]:
        lam = price / scale
        free = {name: min(opts, key=lambda c: c.error + lam * cost(c)) for name, opts in candidates.items()}
        given_up = {name: lam * cost(opts[0]) - (free[name].error + lam * cost(free[name]))
                    for name, opts in candidates.items()}  # what forcing the module dense costs, ≥ 0
        picked: dict[int, WidthCandidate] = {}
        forced: set[str] = set()
        while True:
            top = None
            for gid, opts in widths.items():
                if gid in picked:
                    continue
                penalty = sum(given_up.get(m, 0.0) for m in opts[0].modules if m not in forced)
                for w in opts:
                    gain = lam * w.saving(by_time) - w.error - penalty
                    if gain > 1e-12 and (top is None or gain > top[0]):
                        top = (gain, gid, w)
            if top is None:
                break
            picked[top[1]] = top[2]
            forced.update(top[2].modules)
        saved = combined_saving(picked.values(), by_time)
        options = {name: [(i, c.error, cost(c)) for i, c in enumerate(opts) if name not in forced or i == 0]
                   for name, opts in candidates.items()}
        chosen = {name: candidates[name][i] for name, i in least_error_within(options, room + saved).items()}
        spent = sum(cost(c) for c in chosen.values()) - saved
        error = sum(c.error for c in chosen.values()) + sum(w.error for w in picked.values())
        rank = (spent > room * (1 + 1e-9), error if spent <= room * (1 + 1e-9) else spent)
        if best is None or rank < best[0]:
            best = (rank, chosen, picked)
    return best[1], best[2]


def _within_macs(candidates: dict[str, list[Candidate]], widths: dict[int, list[WidthCandidate]],
                 pick: Callable, macs_before: int, cap: float) -> tuple[dict, dict, str | None]:
    """``pick(blocks, widths) -> (chosen, groups)`` (least error within the latency budget), with the
    plan's MACs also within ``cap`` of ``macs_before``.

    A second budget, priced: each candidate's error is charged μ per MAC it keeps (a thinned
    group's credited μ per MAC it saves), as a fraction of the original's MACs, and μ is searched —
    0 first (the latency-only plan, taken if it fits), then from 1 doubled until a plan fits or halved
    until one does not, then bisected (geometrically) between the highest price that missed and the
    lowest that fit, so the price is as low, and the error as small, as the cap allows. The
    least-error plan within the cap of all those tried is kept; if none is (the fewest MACs that
    fit the latency budget are still too many), the one with the fewest MACs, and a note says so."""
    scale = float(macs_before) or 1.0

    def at(mu: float):
        blocks = {n: [dataclasses.replace(c, error=c.error + mu * c.macs / scale) for c in opts]
                  for n, opts in candidates.items()}
        groups_ = {g: [dataclasses.replace(w, error=w.error - mu * w.macs_saved / scale) for w in opts]
                   for g, opts in widths.items()}
        chosen, groups = pick(blocks, groups_)
        chosen = {n: candidates[n][_index(blocks[n], c)] for n, c in chosen.items()}
        groups = {g: widths[g][_index(groups_[g], w)] for g, w in groups.items()}
        macs = macs_before - sum(opts[0].macs - chosen[n].macs for n, opts in candidates.items()) \
            - combined_saving(groups.values(), False)
        error = sum(c.error for c in chosen.values()) + sum(w.error for w in groups.values())
        return macs / scale, error, chosen, groups

    def fits(t) -> bool:
        return t[0] <= cap * (1 + 1e-9)

    tried = [at(0.0)]
    if not fits(tried[0]):
        # the price's scale is the errors' (weight errors ~1, data errors far smaller): from 1, doubled
        # until a plan fits or halved until one does not, then bisected geometrically between the two
        lo, hi, mu = None, None, 1.0
        while lo is None or hi is None:
            tried.append(at(mu))
            if fits(tried[-1]):
                hi, mu = mu, mu / 2
            else:
                lo, mu = mu, mu * 2
            if not 2.0 ** -40 <= mu <= 2.0 ** 40:
                break
        for _ in range(10 if lo is not None and hi is not None else 0):
            mid = math.sqrt(lo * hi)
            tried.append(at(mid))
            if fits(tried[-1]):
                hi = mid
            else:
                lo = mid
    within = [t for t in tried if fits(t)]
    if within:
        _, _, chosen, groups = min(within, key=lambda t: t[1])
        return chosen, groups, None
    fewest = min(tried, key=lambda t: t[0])
    return fewest[2], fewest[3], (f"--target-macs {cap:g} is out of reach within this latency budget: the plan "
                                  f"with the fewest MACs that fits it keeps {fewest[0]:.3f} of the original MACs")


def macs_within(plan: ConversionPlan, fraction: float | None) -> bool:
    """Whether ``plan`` keeps at most ``fraction`` of the original MACs (up to float rounding); None: no cap."""
    return fraction is None or plan.macs_after <= fraction * plan.macs_before * (1 + 1e-9)


def _index(options: list, chosen) -> int:
    return next(i for i, o in enumerate(options) if o is chosen)


def combined_saving(groups, by_time: bool) -> float:
    """What thinning all of ``groups`` saves together: each conv's dense cost times 1 − the product of
    the shares it keeps along each thinned role (a conv thinned on both its inputs and its outputs
    keeps f_in·f_out of its cost, not 1 − (1 − f_in) − (1 − f_out)). For seconds, each part's
    measured saving is used and only the overlap is corrected by that product rule."""
    kept: dict[str, dict[str, float]] = {}
    dense: dict[str, float] = {}
    measured = 0.0
    for w in groups:
        measured += w.saving(by_time)
        for module, role, share, macs, seconds in w.parts:
            cost = seconds if by_time else macs
            if cost is None:
                continue
            roles = kept.setdefault(module, {})
            roles[role] = roles.get(role, 1.0) - (1 - share)  # two groups along one role (a concat) add up
            dense[module] = cost
    overlap = 0.0  # what adding the roles' savings counts twice
    for module, roles in kept.items():
        lost = [1 - f for f in roles.values()]
        overlap += dense[module] * (sum(lost) - (1 - math.prod(roles.values())))
    return measured - overlap


def _resize_of(groups: dict[int, WidthCandidate], by_time: bool, goal: str, config: RuleConfig):
    """The plan's channel resize for the chosen group widths."""
    from .resize import GroupChange, ResizePlan

    changes = []
    for gid, w in sorted(groups.items()):
        saved = (f"saves {format_seconds(w.time_saved_s)}" if by_time and w.time_saved_s is not None else
                 f"saves {w.macs_saved:,} MACs")
        reason = (f"chosen for {goal}: width ×{w.alpha:g} → make_divisible({w.old_width * w.alpha:g}, "
                  f"{max(config.align_divisor, 1)}); kept the {w.new_width} channels with the largest filter L1 norm; "
                  f"error {w.error:.3f} after the consumers' least-squares refit; {saved}")
        changes.append(GroupChange(gid, w.old_width, w.new_width, list(w.keep), reason, list(w.producers),
                                   tuple(w.members)))
    return ResizePlan(max(config.align_divisor, 1), None, changes, [], chosen=True)


#: a plan's end-to-end check counts as on target from (1 − 2·TOLERANCE) to 1 of the target; a later
#: measurement of the applied model, ±5% noise on a shared machine, then stays within target + 5%
TOLERANCE = 0.05


def fit_latency(plan: ConversionPlan, candidates: dict[str, list[Candidate]], target_latency: float,
                original_latency_s: float, time_plan: Callable[[ConversionPlan], tuple[float, float]], *,
                rounds: int = 6, environment: str = "", batch_size: int | None = None,
                judged_by: str = "weights", widths: dict[int, list[WidthCandidate]] | None = None,
                macs_cap: float | None = None) -> ConversionPlan:
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
    timed round is recorded in ``rank_choice["rounds"]``. ``widths``: channel-group widths offered
    beside the blocks (:func:`choose_blocks`). ``macs_cap``: every round's plan keeps the MACs within
    this fraction of the original as well; a plan counts as on target only if it does.
    """
    if not candidates and not widths:  # nothing the rules would replace or thin: no plan can be faster
        plan = choose_blocks(plan, candidates, target_latency=target_latency, original_latency_s=original_latency_s,
                             environment=environment, batch_size=batch_size, judged_by=judged_by, macs_cap=macs_cap)
        return dataclasses.replace(plan, rank_choice=dict(plan.rank_choice, reachable=False, rounds=[]))
    budget, tried, seen, nudges = target_latency, [], {}, 0
    while len(tried) < rounds and nudges <= 20:
        candidate = choose_blocks(plan, candidates, target_latency=target_latency, original_latency_s=original_latency_s,
                                  environment=environment, batch_size=batch_size, budget=budget, judged_by=judged_by,
                                  widths=widths, macs_cap=macs_cap)
        signature = plan_signature(candidate)
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
                      "error": candidate.rank_choice["error"], "replaced": len(candidate.modules_to_replace),
                      "thinned": len(candidate.resize.changed) if candidate.resize else 0})
        if target_latency * (1 - 2 * TOLERANCE) <= measured <= target_latency:
            break
        budget = _next_budget(tried, target_latency)
        if budget is None:
            break
    plans = list(seen.values())
    in_time = [p for p in plans if p.rank_choice["measured_fraction"] <= target_latency]
    fits = [p for p in in_time if macs_within(p, macs_cap)]
    chosen = min(fits or in_time, key=lambda p: p.rank_choice["error"]) if in_time else \
        min(plans, key=lambda p: p.rank_choice["measured_fraction"])
    notes = list(chosen.notes)
    if not in_time:
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
            config: RuleConfig, thinned: WidthCandidate | None = None) -> Decision:
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
    if thinned is not None:
        return dataclasses.replace(kept(d, "ChooseWidth", f"kept dense: its channel group ({thinned.old_width} "
                                                          f"channels) is thinned {thinned.label} for {goal}"),
                                   candidates=listed, **timing)
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


def fast_enough(candidates: dict[str, list[Candidate]], threshold: float,
                environment: str = "") -> tuple[dict[str, list[Candidate]], str]:
    """The candidates a planner may choose under ``replace.min_measured_speedup = threshold``: keep, and
    the blocks measured at least ``threshold``× faster than their dense conv (a block with no timing
    is not offered); and a note saying how many were left out (empty when none or ``threshold`` ≤ 0)."""
    if threshold <= 0:
        return candidates, ""
    out, dropped, total = {}, 0, 0
    for name, opts in candidates.items():
        dense = opts[0].time_s
        kept = [opts[0]] + [c for c in opts[1:] if dense and c.time_s and dense / c.time_s >= threshold]
        dropped += len(opts) - len(kept)
        total += len(opts) - 1
        out[name] = kept
    note = (f"{dropped} of {total} candidate blocks measured less than {threshold:g}× faster than their dense conv"
            f"{' on ' + environment if environment else ''} (replace.min_measured_speedup) and were not offered"
            if dropped else "")
    return out, note


def alternatives(candidates: dict[str, list[Candidate]], widths: dict[int, list[WidthCandidate]] | None
                 ) -> list[tuple[str, dict[str, list[Candidate]], dict[int, list[WidthCandidate]]]]:
    """The plans :func:`compare_on_data` weighs, as (label, block candidates, width candidates):
    every offered option together (``all``) first; without the channel widths (``blocks only``) and
    the widths alone (``widths only``) when widths are offered; each block family alone when more
    than one is offered (keep stays a candidate everywhere; keep first in every list)."""
    widths = widths or {}
    options = [("all", candidates, widths)]
    if widths:
        if any(len(opts) > 1 for opts in candidates.values()):  # some block is offered
            options.append(("blocks only", candidates, {}))
        options.append(("widths only", {name: opts[:1] for name, opts in candidates.items()}, widths))
    families = sorted({c.family for opts in candidates.values() for c in opts} - {"keep"})
    if len(families) > 1:
        for family in families:
            options.append((family, {name: [c for c in opts if c.family in ("keep", family)]
                                     for name, opts in candidates.items()}, {}))
    out: list = []
    for label, blocks, offered in options:  # the same choices under another name (no block to offer): planned once
        if not any(blocks == b and offered == w for _, b, w in out):
            out.append((label, blocks, offered))
    return out


def plan_signature(plan: ConversionPlan) -> tuple:
    """What a plan changes: each replaced module's block and each thinned group's width."""
    return tuple(sorted((d.module_name, d.family, d.rank) for d in plan.replacements)) + \
        tuple(sorted((c.group, c.new_width) for c in (plan.resize.changed if plan.resize else [])))


#: fewer held-out samples than this and the plan says the comparison on data is noisy
FEW_HELD_OUT = 64


def compare_on_data(options: list[tuple[str, ConversionPlan]], judge: Callable[[ConversionPlan, str], dict],
                    by_time: bool, target: float,
                    recheck: Callable[[ConversionPlan], tuple[float, float]] | None = None,
                    macs_cap: float | None = None) -> ConversionPlan:
    """Of plans made for one target (``options``: (label, plan), the full-choice plan first), the one
    whose model, applied and calibrated, has the least output error on the held-out calibration
    samples (``judge(plan, label) -> {"relative_error", "cosine", "top1_agreement", "samples",
    "seconds"}``), among those that meet the target: measured end to end (``by_time``) or by MACs.
    If none meets it, the full-choice plan stays.

    The per-layer errors the plans were chosen by add up single changes; changes made together
    interact (a thinned group feeds a replaced block), and calibration repairs some families more
    than others, so what the plans' models do is measured rather than predicted. Plans that make
    the same changes are judged once. The comparison is recorded in the chosen plan's
    ``rank_choice["compared"]``, one entry per option, in order.

    Latency: of several plans each checked once, the least-error one that measured within the
    target is the likeliest to have been measured lucky (a noisy check just under the target). So
    ``recheck(plan) -> (original_s, planned_s)`` times the candidate again, side by side, in order
    of error, and a plan is kept only if the mean of its two checks is within the target; one that
    is not counts as missing the target (``fraction`` becomes that mean). ``macs_cap`` (with a
    latency target): a plan above this fraction of the original's MACs misses the target too.
    """
    judged: dict[tuple, dict] = {}
    rows = []

    for label, plan in options:
        choice = plan.rank_choice or {}
        signature = plan_signature(plan)
        if signature not in judged:
            judged[signature] = judge(plan, label)
        if by_time:
            fraction = choice.get("measured_fraction")
            fits = fraction is not None and fraction <= target and macs_within(plan, macs_cap)
        else:
            fraction = plan.macs_after / plan.macs_before if plan.macs_before else None
            fits = fraction is not None and macs_within(plan, target)
        rows.append({"plan": label, "fraction": fraction, "by": "measured latency" if by_time else "MACs",
                     "predicted_error": choice.get("error"), "replaced": len(plan.modules_to_replace),
                     "thinned": len(plan.resize.changed) if plan.resize else 0, "fits": fits,
                     "same_as": next((r["plan"] for r, (_, p) in zip(rows, options)
                                      if plan_signature(p) == signature), None),
                     **judged[signature]})
    best = None
    for i in sorted((i for i, r in enumerate(rows) if r["fits"]), key=lambda i: (rows[i]["relative_error"], i)):
        if by_time and recheck is not None:
            before_s, after_s = recheck(options[i][1])
            again = after_s / before_s if before_s else float("inf")
            for r, (_, p) in zip(rows, options):  # plans making the same changes share the recheck
                if plan_signature(p) == plan_signature(options[i][1]):
                    r["checks"] = [r["fraction"], again]
                    r["fraction"] = (r["fraction"] + again) / 2
                    r["fits"] = r["fraction"] <= target and macs_within(p, macs_cap)
        if rows[i]["fits"]:
            best = i
            break
    best = 0 if best is None else best
    for i, r in enumerate(rows):
        r["chosen"] = i == best
    chosen = options[best][1]
    notes = list(chosen.notes)
    samples = rows[0].get("samples") or 0
    if samples < FEW_HELD_OUT:
        notes.append(f"the plans were compared on only {samples} held-out calibration samples (1/8 of the data): "
                     f"errors that close are noise at that size; give more --calibrate data (≥{8 * FEW_HELD_OUT} "
                     "samples) for a comparison to rely on")
    if best:
        first = rows[0]
        was = f"{first['relative_error']:.4f}" + ("" if first["fits"] else ", and it missed the target")
        notes.append(f"the plan with every option together was not kept: '{rows[best]['plan']}' measured less output "
                     f"error on the held-out calibration samples ({rows[best]['relative_error']:.4f} vs {was})")
    return dataclasses.replace(chosen, notes=notes, rank_choice=dict(chosen.rank_choice or {}, compared=rows))
