"""Choosing each replaced layer's rank (depth multiplier) for a MAC target or an error bound.

Rank r keeps, per input channel, the top r singular components of the conv weight's
C_out × K² slice. A layer's *error* at rank r is judged either

* from the weights alone: 1 − kept energy (the Network Decoupling energy rule), or
* from calibration data: the relative error of the layer's output after the least-squares
  refit of its pointwise weights — exact for every candidate rank from one pass, because the
  rank-r depthwise outputs are a subset of the rank-``max`` ones, so one set of normal
  equations per layer answers them all.

:func:`choose_ranks` then finds the assignment with the least summed error within a MAC
budget (``target_macs``; keeping a layer dense is one of the choices), or gives each layer
the smallest rank within an error bound (``max_error``). Like the rest of planning it returns a new plan and changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import channel_slices, decouple, kept_energy
from .plan import ConversionPlan, Decision, kept
from .rules import AlignChannels
from .trace import eval_mode

MAX_RANK = 4


def candidate_ranks(decision: Decision, align_divisor: int) -> list[int]:
    """Aligned ranks from 1 up to min(K², C_out, MAX_RANK) (the multiplier AlignChannels allows)."""
    top = min(math.prod(decision.kernel), decision.out_channels, MAX_RANK)
    step = AlignChannels().depth_multiplier(decision.in_channels, 1, align_divisor)
    ranks = list(range(step, max(top, step) + 1, step))
    return ranks or [step]


def energy_errors(model: nn.Module, plan: ConversionPlan) -> dict[str, dict[int, float]]:
    """``module -> {rank: 1 − kept energy}`` from the weights (one SVD per layer answers every rank)."""
    out = {}
    for name, d in plan.modules_to_replace.items():
        s = torch.linalg.svdvals(channel_slices(model.get_submodule(name).weight.detach()))
        out[name] = {r: 1.0 - kept_energy(s, r) for r in candidate_ranks(d, plan.config.align_divisor)}
    return out


def data_errors(model: nn.Module, plan: ConversionPlan, batches: Iterable[torch.Tensor]) -> dict[str, dict[int, float]]:
    """``module -> {rank: relative output error after the least-squares refit}`` on calibration data."""
    targets = plan.modules_to_replace
    batches = list(batches)
    from .calibrate import consumer_scales

    scales = consumer_scales(model, targets, batches[0]) if batches else {}
    state = {}
    for name, d in targets.items():
        conv = model.get_submodule(name)
        ranks = candidate_ranks(d, plan.config.align_divisor)
        top = ranks[-1]
        depthwise = decouple(conv.weight.detach(), top)[0]
        dims = conv.in_channels * top + 1
        state[name] = {"conv": conv, "ranks": ranks, "top": top, "dw": depthwise,
                       "gram": torch.zeros(dims, dims, dtype=torch.float64),
                       "cross": torch.zeros(dims, conv.out_channels, dtype=torch.float64),
                       "yy": torch.zeros(conv.out_channels, dtype=torch.float64)}

    def hook(mod, args, out, name):
        s = state[name]
        conv = s["conv"]
        h = F.conv2d(args[0], s["dw"], None, conv.stride, conv.padding, conv.dilation, groups=conv.in_channels)
        hf = torch.cat([h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), torch.ones(h.numel() // h.shape[1], 1)], 1)
        yf = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]).double()
        hf = hf.double()
        s["gram"] += hf.T @ hf
        s["cross"] += hf.T @ yf
        s["yy"] += (yf * yf).sum(0)

    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in targets]
    try:
        with eval_mode(model), torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    errors = {}
    for name, s in state.items():
        c_in, top = s["conv"].in_channels, s["top"]
        w2 = scales[name] ** 2 if name in scales else torch.ones_like(s["yy"])
        reference = float((w2 * s["yy"]).sum())
        errors[name] = {}
        for r in s["ranks"]:
            idx = torch.tensor([i * top + j for i in range(c_in) for j in range(r)] + [c_in * top])
            a = s["gram"][idx][:, idx]
            b = s["cross"][idx]
            damp = 1e-6 * float(a.diagonal().mean().clamp_min(1e-12))
            w = torch.linalg.solve(a + damp * torch.eye(len(idx), dtype=torch.float64), b)
            residual = float((w2 * (s["yy"] - 2 * (w * b).sum(0) + (w * (a @ w)).sum(0))).sum())
            errors[name][r] = math.sqrt(max(residual, 0.0) / reference) if reference > 0 else 0.0
    return errors


def choose_ranks(plan: ConversionPlan, errors: dict[str, dict[int, float]], total_macs: int, *,
                 target_macs: float | None = None, max_error: float | None = None, judged_by: str = "energy") -> ConversionPlan:
    """A new plan with each replaced module's rank chosen (see the module docstring)."""
    if (target_macs is None) == (max_error is None):
        raise ValueError("give exactly one of target_macs and max_error")
    sites: dict[str, list[Decision]] = {}
    for d in plan.replacements:
        sites.setdefault(d.module_name, []).append(d)
    cost = {name: {r: _module_macs(ds, r, plan) for r in errors[name]} for name, ds in sites.items()}
    chosen: dict[str, int | None] = {}
    notes = []
    if max_error is not None:
        for name, ds in sites.items():
            ok = [r for r in sorted(errors[name]) if errors[name][r] <= max_error]
            rank = ok[0] if ok else None
            chosen[name] = rank if rank is not None and cost[name][rank] < sum(d.macs_before for d in ds) else None
    else:
        chosen, note = _spend_budget(sites, errors, cost, total_macs, target_macs * total_macs)
        if note:
            notes.append(f"target {target_macs:g} of the original MACs is out of reach under these rules: {note}")
    word = "kept energy" if judged_by == "energy" else "output error after refit"
    decisions = []
    for d in plan.decisions:
        rank = chosen.get(d.module_name, "absent") if d.replaced else "absent"
        if rank == "absent":
            decisions.append(d)
        elif rank is None:
            reason = (f"kept: no depth multiplier ≤ {MAX_RANK} brings the error under {max_error:g} for fewer MACs"
                      if max_error is not None else
                      f"kept: the dense conv is a better use of the MACs than depth multiplier ≤ {MAX_RANK} "
                      f"for ≤{target_macs:g} of the MACs")
            decisions.append(dataclasses.replace(kept(d, "ChooseDepthMultiplier", reason),
                                                 candidate_errors=dict(errors[d.module_name])))
        else:
            err = errors[d.module_name][rank]
            quality = f"{100 * (1 - err):.1f}% kept energy" if judged_by == "energy" else f"{word} {err:.3f}"
            macs, params = _site_costs(d, rank, plan)
            why = f"for ≤{target_macs:g} of the MACs" if target_macs is not None else f"for error ≤ {max_error:g}"
            k = "×".join(map(str, d.kernel))
            hw = "×".join(map(str, d.output_shape[2:]))
            decisions.append(dataclasses.replace(
                d, depth_multiplier=rank, rank=rank, mid_channels=d.in_channels * rank, macs_after=macs, params_after=params,
                rule="ChooseDepthMultiplier", candidate_errors=dict(errors[d.module_name]),
                reason=f"replaced: {k} {d.in_channels}→{d.out_channels} at {hw}, {d.macs_before / macs:.1f}× fewer "
                       f"MACs; depth multiplier {rank} ({quality}) {why}"))
    choice = {"target_macs": target_macs, "max_error": max_error, "judged_by": judged_by}
    return dataclasses.replace(plan, decisions=decisions, notes=plan.notes + notes, rank_choice=choice)


# MAC budget resolution of the allocation: costs are rounded up to 1/BUCKETS of the budget
BUCKETS = 4000


def _spend_budget(sites: dict[str, list[Decision]], errors: dict[str, dict[int, float]],
                  cost: dict[str, dict[int, int]], total_macs: int, budget: float) -> tuple[dict, str]:
    """The assignment (a rank, or None = keep the dense conv) with the least summed error within the budget.

    A multiple-choice knapsack solved by dynamic programming over the MAC budget in
    :data:`BUCKETS` steps (costs rounded up, so the result never exceeds the budget):
    unlike a greedy error-per-MAC walk, it is not misled by error curves that are not
    convex, and it may keep a layer dense where a high rank would cost nearly as much.
    Returns (choice per module, a note when even the lowest ranks exceed the budget).
    """
    names = list(sites)
    dense = {name: sum(d.macs_before for d in ds) for name, ds in sites.items()}
    fixed = total_macs - sum(dense.values())  # MACs of everything the plan does not replace
    lowest = {name: min(errors[name]) for name in names}
    floor = fixed + sum(cost[name][lowest[name]] for name in names)
    if floor > budget:
        return lowest, f"every replaced layer at its lowest rank leaves {floor / total_macs:.3f}"
    options = {name: [(r, errors[name][r], cost[name][r]) for r in sorted(errors[name])] + [(None, 0.0, dense[name])]
               for name in names}
    return least_error_within(options, budget - fixed), ""


def least_error_within(options: dict[str, list[tuple[Any, float, float]]], budget: float) -> dict[str, Any]:
    """One option per name, ``(choice, error, cost)``, with the least summed error and summed cost ≤ ``budget``.

    A multiple-choice knapsack solved by dynamic programming over the budget in
    :data:`BUCKETS` steps (costs rounded up, so the result never exceeds the budget). Costs
    are MACs or seconds alike. The caller makes sure the cheapest options fit; where they do
    not, each name gets its cheapest option.
    """
    names = list(options)
    if sum(min(c for _, _, c in options[n]) for n in names) > budget:
        return {n: min(options[n], key=lambda o: o[2])[0] for n in names}
    unit = max(budget / BUCKETS, 1e-30)
    inf = float("inf")
    best = torch.zeros(BUCKETS + 1, dtype=torch.float64)  # least summed error within b buckets
    picks: list[torch.Tensor] = []
    for name in names:
        layer = torch.full((BUCKETS + 1,), inf, dtype=torch.float64)
        pick = torch.full((BUCKETS + 1,), -1, dtype=torch.long)
        for i, (_, err, cost) in enumerate(options[name]):
            need = max(math.ceil(cost / unit - 1e-9), 0)
            if need > BUCKETS:
                continue
            shifted = torch.full((BUCKETS + 1,), inf, dtype=torch.float64)
            shifted[need:] = best[:BUCKETS + 1 - need] + err
            better = shifted < layer
            layer = torch.where(better, shifted, layer)
            pick = torch.where(better, torch.full_like(pick, i), pick)
        best = layer
        picks.append(pick)
    if not math.isfinite(float(best[BUCKETS])):  # rounding up pushed the cheapest set over: take it
        return {n: min(options[n], key=lambda o: o[2])[0] for n in names}
    chosen: dict[str, Any] = {}
    b = BUCKETS
    for name, pick in zip(reversed(names), reversed(picks)):
        choice, _, cost = options[name][int(pick[b])]
        chosen[name] = choice
        b -= max(math.ceil(cost / unit - 1e-9), 0)
    return chosen


def _site_costs(d: Decision, rank: int, plan: ConversionPlan) -> tuple[int, int]:
    """(MACs, params) of one call site's block at ``rank``."""
    from .blocks import block_costs

    return block_costs("separable", rank, d.in_channels, d.out_channels, d.kernel, d.input_shape, d.output_shape,
                       plan.config.bn)


def _module_macs(decisions: list[Decision], rank: int, plan: ConversionPlan) -> int:
    return sum(_site_costs(d, rank, plan)[0] for d in decisions)
