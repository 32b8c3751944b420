"""Stage 4, plan: a list of decisions, one per conv call site, each with its reason.

Computing a plan has no side effects: it reads an :class:`~dsrewrite.api.Analysis` and a
:class:`~dsrewrite.rules.RuleConfig` and returns a value. ``--dry-run`` prints it; the
rewrite stage applies it.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from .profile import ConvProfile
from .rules import KEEP_RULES, AlignChannels, MinMeasuredSpeedup, PlanContext, ReplaceHeavyConv, RuleConfig


@dataclasses.dataclass
class Decision:
    """What happens to one conv call site, and why."""

    index: int
    name: str
    module_name: str | None
    action: str  # "replace" or "keep"
    rule: str
    reason: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    in_channels: int
    out_channels: int
    output_shape: tuple[int, ...]
    macs_before: int
    params_before: int
    has_bias: bool = False
    depth_multiplier: int | None = None
    mid_channels: int | None = None
    macs_after: int | None = None
    params_after: int | None = None
    bn: bool | None = None
    activation: str | None = None
    #: measured latency of the conv and of its replacement on this machine (latency-aware plans).
    measured_original_s: float | None = None
    measured_replacement_s: float | None = None

    @property
    def measured_speedup(self) -> float | None:
        """original / replacement latency, when measured."""
        if self.measured_original_s is None or not self.measured_replacement_s:
            return None
        return self.measured_original_s / self.measured_replacement_s

    @property
    def replaced(self) -> bool:
        """Whether this call site is replaced."""
        return self.action == "replace"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclasses.dataclass
class Plan:
    """The decisions for a whole model, in network order."""

    model_name: str
    config: RuleConfig
    decisions: list[Decision]
    #: Remarks about the plan as a whole (an unreachable MAC target, say).
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def replacements(self) -> list[Decision]:
        """Decisions that replace a conv (one per call site)."""
        return [d for d in self.decisions if d.replaced]

    @property
    def modules_to_replace(self) -> dict[str, Decision]:
        """Conv module name -> its (first) replacing decision."""
        out: dict[str, Decision] = {}
        for d in self.replacements:
            out.setdefault(d.module_name, d)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"model": self.model_name, "rules": self.config.to_dict(), "replaced": len(self.replacements),
                "decisions": [d.to_dict() for d in self.decisions], "notes": list(self.notes)}


def make_plan(analysis, config: RuleConfig, timings: dict | None = None, environment: str = "") -> Plan:
    """Decide, for every conv call site of an analyzed model, whether to replace it.

    Shares of model MACs are measured against the model *as it will be after* the planned
    replacements: replacing heavy convs shrinks the total, which raises every other conv's
    share. The plan is therefore iterated to its fixed point (replacements only grow, so it
    converges), and running the converter on its own output finds nothing more to do.
    """
    ctx = PlanContext(
        config=config,
        convs=analysis.convs,
        weight_reads=_weight_reads(analysis),
        root_untraced="" in analysis.profile.untraced,
        total_macs=analysis.profile.macs,
        timings=timings or {},
        environment=environment,
    )
    for _ in range(len(analysis.convs) + 1):
        decisions = _consistent_per_module([_decide(conv, ctx) for conv in analysis.convs])
        total = analysis.profile.macs - sum(d.macs_before - d.macs_after for d in decisions if d.replaced)
        if total == ctx.total_macs:
            break
        ctx = dataclasses.replace(ctx, total_macs=total)
    return Plan(analysis.model_name, config, decisions)


def _decide(conv: ConvProfile, ctx: PlanContext) -> Decision:
    base = dict(index=conv.index, name=conv.name, module_name=conv.module_name, kernel=conv.kernel,
                stride=conv.stride, in_channels=conv.in_channels, out_channels=conv.out_channels,
                output_shape=conv.output_shape, macs_before=conv.macs, params_before=conv.params,
                has_bias=conv.has_bias)
    for rule in KEEP_RULES:
        reason = rule.keep_reason(conv, ctx)
        if reason:
            return Decision(action="keep", rule=rule.name, reason=reason, **base)
    c = ctx.config
    dm = AlignChannels().depth_multiplier(conv.in_channels, c.depth_multiplier, c.align_divisor)
    proposal, why = ReplaceHeavyConv().propose(conv, ctx, dm)
    if proposal is None:
        return Decision(action="keep", rule=ReplaceHeavyConv.name, reason=why, **base)
    timing = ctx.timings.get(conv.index)
    if timing is not None:
        base.update(measured_original_s=timing.original_s, measured_replacement_s=timing.replacement_s)
    measured_keep = MinMeasuredSpeedup().keep_reason(conv, ctx)
    if measured_keep:
        return Decision(action="keep", rule=MinMeasuredSpeedup.name, reason=measured_keep, **base)
    reason = proposal.reason
    if timing is not None:
        reason += f", measured {timing.speedup:.2f}×"
    if dm != c.depth_multiplier:
        reason += f" (depth multiplier {c.depth_multiplier}→{dm} to align {conv.in_channels * dm} channels to " \
                  f"{c.align_divisor})"
    return Decision(action="replace", rule=ReplaceHeavyConv.name, reason=reason,
                    depth_multiplier=dm, mid_channels=proposal.mid_channels, macs_after=proposal.macs_after,
                    params_after=proposal.params_after, bn=c.bn, activation=c.activation, **base)


def _consistent_per_module(decisions: list[Decision]) -> list[Decision]:
    """A module called at several sites is replaced at all of them or at none.

    Swapping the module changes every call site at once, so one site's reason to keep
    (say, too small a share of MACs at a low-resolution call) keeps them all.
    """
    by_module = collections.defaultdict(list)
    for d in decisions:
        if d.module_name is not None:
            by_module[d.module_name].append(d)
    out = []
    for d in decisions:
        sites = by_module.get(d.module_name, [d])
        if d.replaced and not all(s.replaced for s in sites):
            keeper = next(s for s in sites if not s.replaced)
            d = dataclasses.replace(
                d, action="keep", rule="ConsistentModule",
                reason=f"kept: module called at {len(sites)} sites and call {keeper.name} is {keeper.reason[6:]}",
                depth_multiplier=None, mid_channels=None, macs_after=None, params_after=None, bn=None,
                activation=None)
        out.append(d)
    return out


def _weight_reads(analysis) -> dict[str, list[str]]:
    """Conv modules whose parameters the traced graph reads directly (``get_attr conv.weight``)."""
    graph = analysis.trace.graph
    if graph is None:
        return {}
    modules = {c.module_name for c in analysis.convs if c.module_name}
    reads = collections.defaultdict(list)
    for node in graph.nodes:
        if node.op == "get_attr":
            owner, _, attr = str(node.target).rpartition(".")
            if owner in modules:
                reads[owner].append(str(node.target))
    return dict(reads)
