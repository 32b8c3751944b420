"""Stage 4, plan: one :class:`ConversionPlan` value that holds every decision of a conversion.

Per conv call site: keep or replace, with the reason and the rule that decided; for a
replacement, the block (depth multiplier, BN, activation) and its costs; the channel
resize (alignment / width) of every channel group; and the facts each decision used
(measured timings with where they came from, each candidate depth multiplier's error).

:func:`plan_conversion` builds it from an :class:`~dsrewrite.api.Analysis` and the
:class:`~dsrewrite.facts.PlanFacts` that the fact-gathering step collected (timings,
calibration errors, channel importance). It has no side effects: it reads values and
returns one. ``convert --dry-run`` renders it; :func:`dsrewrite.rewrite.apply_plan`
executes exactly it; :meth:`ConversionPlan.to_dict` / :func:`load_plan` save it as
JSON and read a saved (maybe hand-edited) plan back, validated against the model.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from .errors import InputError
from .profile import ConvProfile
from .rules import Draft, Keep, PlanContext, RuleConfig, rules_in_order

#: ``format`` and ``schema_version`` of a saved plan (``convert --dry-run --format json``).
PLAN_FORMAT = "dsrewrite-plan"
PLAN_VERSION = 2
#: versions :func:`load_plan` reads (1: before block families; every replacement is separable)
READABLE_VERSIONS = (1, 2)


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
    #: the replacement's block family (dsrewrite.blocks.FAMILIES) and rank (the depth multiplier for separable)
    family: str | None = None
    rank: int | None = None
    #: the conv call's input shape (what the block's costs and timings depend on)
    input_shape: tuple[int, ...] = ()
    #: padding (H, W) the block uses when the conv module pads its own input (TF "same" at stride 1),
    #: else None: the block takes the conv's own padding
    block_padding: tuple[int, ...] | None = None
    #: every block the target-driven planner weighed for this layer: [{family, rank, macs, time_s, error}],
    #: the dense conv as family "keep"; the chosen one has "chosen": true
    candidates: list[dict] | None = None
    #: measured latency of the conv and of its replacement on this machine (latency-aware plans).
    measured_original_s: float | None = None
    measured_replacement_s: float | None = None
    #: where that timing came from: {"source": "fresh"|"cached", "measured_at", "environment", "depth_multiplier"}
    timing: dict | None = None
    #: depth multiplier -> the error the choice was judged by (``--target-macs`` / ``--max-error``)
    candidate_errors: dict[int, float] | None = None

    @property
    def measured_speedup(self) -> float | None:
        """original / replacement latency, when measured."""
        if self.measured_original_s is None or not self.measured_replacement_s:
            return None
        return self.measured_original_s / self.measured_replacement_s

    @property
    def block_text(self) -> str:
        """How the block reads (``dw×2 → BN → relu → pw``, ``3×1 → 48 → 1×3``); empty for a kept conv."""
        if not self.replaced:
            return ""
        from .blocks import block_text

        k = "×".join(map(str, self.kernel))
        text = block_text(self.family or "separable", self.rank or self.depth_multiplier or 1, bool(self.bn),
                          self.activation or "none")
        text = text.replace("K×K", k).replace("K×1", f"{self.kernel[0]}×1").replace("1×K", f"1×{self.kernel[-1]}")
        if self.block_padding is not None:  # the module padded its own input ("same"); the block pads instead
            text += f" (padding {','.join(map(str, self.block_padding))} for 'same')"
        return text

    @property
    def replaced(self) -> bool:
        """Whether this call site is replaced."""
        return self.action == "replace"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = dataclasses.asdict(self)
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        out["block"] = self.block_text
        if self.candidate_errors is not None:
            out["candidate_errors"] = {str(k): v for k, v in self.candidate_errors.items()}
        return out


@dataclasses.dataclass
class ConversionPlan:
    """Everything a conversion will do, and what it was decided from (see the module docstring)."""

    model_name: str
    config: RuleConfig
    decisions: list[Decision]
    #: the input shapes the model was analyzed at (a plan fits only those)
    input_shapes: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    #: the model's MACs before conversion
    macs_before: int = 0
    #: how depth multipliers were chosen: {"target_macs", "max_error", "judged_by"}, or None (rules only)
    rank_choice: dict | None = None
    #: the channel resize (:class:`~dsrewrite.resize.ResizePlan`) applied after the replacements, or None
    resize: Any = None
    #: where the timings the plan used were taken ("cpu/2 threads"), or ""
    environment: str = ""
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

    @property
    def macs_after(self) -> int:
        """The model's MACs once the replacements are applied, and the convs' MACs that chosen channel widths
        save (``rank_choice["width_macs_saved"]``); a global ``--width`` / ``--align`` resize is not counted."""
        saved = int((self.rank_choice or {}).get("width_macs_saved") or 0)
        return self.macs_before - sum(d.macs_before - d.macs_after for d in self.replacements) - saved

    def to_dict(self) -> dict[str, Any]:
        """The saved-plan JSON document (``convert --dry-run --format json``; ``convert --plan`` reads it)."""
        return {
            "format": PLAN_FORMAT,
            "schema_version": PLAN_VERSION,
            "model": self.model_name,
            "input_shapes": [list(s) for s in self.input_shapes],
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "rules": self.config.to_dict(),
            "rank_choice": self.rank_choice,
            "environment": self.environment,
            "replaced": len(self.replacements),
            "decisions": [d.to_dict() for d in self.decisions],
            "channels": self.resize.to_plan_dict() if self.resize is not None else None,
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------ planning


def plan_conversion(analysis, config: RuleConfig, facts=None, *, target_macs: float | None = None,
                    max_error: float | None = None, align: int | None = None,
                    width: float | None = None) -> ConversionPlan:
    """The whole plan for ``analysis``'s model under ``config``, from gathered ``facts``; no side effects.

    1. The rules decide per conv call site (:func:`rule_decisions`).
    2. With a latency target, or block families beyond separable and ``target_macs`` /
       ``max_error``, each replaced module's block (family × rank, or keep) is chosen from
       ``facts.blocks`` (:mod:`dsrewrite.choose`) — with both a latency target and ``target_macs``,
       within both; otherwise, with ``target_macs`` (a fraction
       of the original MACs) or ``max_error``, each replaced module's depth multiplier is
       chosen from ``facts.errors`` (:mod:`dsrewrite.rank`).
    3. With ``plan.group_widths`` and calibration data (``facts.widths``), the width of each
       channel group is chosen in step 2, beside the blocks. With ``plan.compare_on_data``
       (``facts.plan_judge``), step 2 also plans without the widths, with the widths alone and with
       each family alone, and keeps the plan that measured the least output error on held-out
       calibration samples (:func:`dsrewrite.choose.compare_on_data`). Else with ``align`` (or rule key
       ``align.groups``) or ``width`` (or ``align.width``), every
       resizable channel group gets its new width and kept channels (:mod:`dsrewrite.resize`),
       from ``facts.channels`` (and ``facts.importance`` for a width change).

    ``facts`` (:class:`~dsrewrite.facts.PlanFacts`) must hold what these steps need;
    :func:`dsrewrite.facts.gather_facts` collects exactly that.
    """
    from .facts import PlanFacts

    facts = facts or PlanFacts()
    blockwise = bool(facts.blocks or facts.widths or facts.target_latency is not None)
    # a block planner applies replace.min_measured_speedup to each candidate block (below), not to the site
    decided = dataclasses.replace(config, min_measured_speedup=0.0) if blockwise else config
    decisions = rule_decisions(analysis, decided, facts.timings, facts.environment)
    plan = ConversionPlan(analysis.model_name, config, decisions, [tuple(s) for s in analysis.profile.input_shapes],
                          analysis.profile.macs, environment=facts.environment if facts.timings else "")
    if blockwise:
        from .choose import choose_blocks, fast_enough

        latency = facts.target_latency
        base = plan
        blocks, slow_note = fast_enough(facts.blocks, config.min_measured_speedup, facts.environment)

        def make(blocks, widths):
            if latency is not None:
                from .choose import fit_latency

                made = fit_latency(base, blocks, latency, facts.original_latency_s, facts.plan_timer,
                                   environment=facts.environment, batch_size=facts.batch_size,
                                   judged_by=facts.errors_from or "weights", widths=widths, macs_cap=target_macs)
                made.environment = facts.environment
                return made
            made = choose_blocks(base, blocks, target_macs=target_macs, max_error=max_error,
                                 judged_by=facts.errors_from or "weights", widths=widths)
            if config.min_measured_speedup > 0:
                made.environment = facts.environment
            return made

        from .choose import alternatives

        offered = alternatives(blocks, facts.widths)
        if facts.plan_judge is not None and len(offered) > 1 and (latency is not None or target_macs is not None):
            from .choose import compare_on_data

            options = [(label, make(blocks, widths)) for label, blocks, widths in offered]
            plan = compare_on_data(options, facts.plan_judge, latency is not None,
                                   latency if latency is not None else target_macs, recheck=facts.plan_timer,
                                   macs_cap=target_macs if latency is not None else None)
        else:
            plan = make(blocks, facts.widths)
        if slow_note:
            plan.notes.append(slow_note)
    elif target_macs is not None or max_error is not None:
        from .rank import choose_ranks

        missing = [n for n in plan.modules_to_replace if n not in facts.errors]
        if missing:
            raise ValueError(f"no candidate errors for {missing[0]}: gather them first (dsrewrite.facts)")
        plan = choose_ranks(plan, facts.errors, analysis.profile.macs, target_macs=target_macs, max_error=max_error,
                            judged_by=facts.errors_from or "energy")
    plan.notes.extend(facts.notes)
    if plan.rank_choice is not None and facts.errors_from == "data":
        plan.rank_choice["judging_s"] = facts.judging_s
        if facts.sensitivity:
            plan.rank_choice["sensitivity"] = dict(facts.sensitivity)
    divisor = align if align is not None else config.align_divisor
    width = width if width is not None else (config.align_width or None)
    if (align is not None or config.align_groups or width is not None) and not facts.widths:
        from .resize import plan_resize

        if facts.channels is None:
            raise ValueError("no channel graph: gather facts with the resize settings first (dsrewrite.facts)")
        from .choose import RESIZABLE_FAMILIES
        from .errors import ConfigError

        odd = next((d for d in plan.replacements if d.family not in RESIZABLE_FAMILIES), None)
        if odd is not None:
            raise ConfigError(f"a channel resize (--align, --width, align.*) cannot follow a {odd.family} block yet "
                              f"({odd.name}): use block.family {', '.join(RESIZABLE_FAMILIES)} or auto")
        plan.resize = plan_resize(None, facts.channels, max(divisor, 1), width, importance=facts.importance)
    return plan


def rule_decisions(analysis, config: RuleConfig, timings: dict | None = None,
                   environment: str = "") -> list[Decision]:
    """Run the config's rules, in order, on every conv call site of an analyzed model.

    Shares of model MACs are measured against the model *as it will be after* the planned
    replacements: replacing heavy convs shrinks the total, which raises every other conv's
    share. The decisions are therefore iterated to their fixed point (replacements only
    grow, so it converges), and running the converter on its own output finds nothing more to do.
    """
    ctx = PlanContext(
        config=config,
        convs=analysis.convs,
        weight_reads=weight_reads(analysis),
        root_untraced="" in analysis.profile.untraced,
        total_macs=analysis.profile.macs,
        timings=timings or {},
        environment=environment,
    )
    rules = rules_in_order(config)
    decisions: list[Decision] = []
    for _ in range(len(analysis.convs) + 1):
        decisions = _consistent_per_module([_decide(conv, ctx, rules) for conv in analysis.convs])
        total = analysis.profile.macs - sum(d.macs_before - d.macs_after for d in decisions if d.replaced)
        if total == ctx.total_macs:
            break
        ctx = dataclasses.replace(ctx, total_macs=total)
    return decisions


def candidate_decisions(analysis, config: RuleConfig) -> list[Decision]:
    """What the rules would replace if speed were no object (``replace.min_measured_speedup`` off).

    The latency-aware rule needs a timing for each of these before it can decide.
    """
    return [d for d in rule_decisions(analysis, dataclasses.replace(config, min_measured_speedup=0.0)) if d.replaced]


#: the fields of a decision that describe its call site (what :func:`replacement` builds on)
SITE_FIELDS = ("index", "name", "module_name", "kernel", "stride", "in_channels", "out_channels", "output_shape",
               "input_shape", "macs_before", "params_before", "has_bias", "block_padding")


def _site(conv: ConvProfile) -> dict[str, Any]:
    return dict(zip(SITE_FIELDS, (conv.index, conv.name, conv.module_name, conv.kernel, conv.stride, conv.in_channels,
                                  conv.out_channels, conv.output_shape, tuple(conv.input_shape), conv.macs,
                                  conv.params, conv.has_bias, conv.block_padding)))


def site_of(d: Decision) -> dict[str, Any]:
    """The call-site fields of a decision, as :func:`_site` gives them for a conv."""
    return {f: getattr(d, f) for f in SITE_FIELDS}


def _decide(conv: ConvProfile, ctx: PlanContext, rules) -> Decision:
    base = _site(conv)
    timing = ctx.timings.get(conv.index)
    if timing is not None:
        base.update(measured_original_s=timing.original_s, measured_replacement_s=timing.replacement_s,
                    timing=timing.provenance())
    c = ctx.config
    draft: Draft | Keep = Draft(c.depth_multiplier, c.bn, c.activation, rank=c.rank)
    for rule in rules:
        draft = rule.decide(conv, ctx, draft)
        if isinstance(draft, Keep):
            return Decision(action="keep", rule=rule.name, reason=draft.reason, **base)
    if not draft.chosen:
        return Decision(action="keep", rule=rules[-1].name if rules else "none",
                        reason="kept: no rule chose to replace it", **base)
    return replacement(base, draft.family, draft.rank or draft.depth_multiplier, draft.bn, draft.activation,
                       draft.macs_after, draft.params_after, rule="ReplaceHeavyConv",
                       reason=draft.reason + "".join(draft.remarks))


def replacement(base: dict, family: str, rank: int, bn: bool, activation: str, macs: int, params: int, *,
                rule: str, reason: str, **extra) -> Decision:
    """A replace decision for call site ``base`` (:func:`_site`) with ``family``'s block at ``rank``.

    ``family`` "auto" (no planner ran) is the separable block. Only separable blocks carry a
    depth multiplier, BN and activation; the other families are linear chains.
    """
    from .blocks import FAMILIES

    family = "separable" if family == "auto" else family
    separable = family == "separable"
    return Decision(action="replace", rule=rule, reason=reason, family=family, rank=rank,
                    depth_multiplier=rank if separable else None,
                    mid_channels=FAMILIES[family].mid(base["in_channels"], base["out_channels"], rank),
                    macs_after=macs, params_after=params, bn=bn if separable else False,
                    activation=activation if separable else "none", **base, **extra)


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
            d = kept(d, "ConsistentModule",
                     f"kept: module called at {len(sites)} sites and call {keeper.name} is {keeper.reason[6:]}")
        out.append(d)
    return out


def kept(d: Decision, rule: str, reason: str) -> Decision:
    """``d`` turned into a keep decision (its block and costs cleared)."""
    return dataclasses.replace(d, action="keep", rule=rule, reason=reason, depth_multiplier=None, mid_channels=None,
                               macs_after=None, params_after=None, bn=None, activation=None, family=None, rank=None)


def weight_reads(analysis) -> dict[str, list[str]]:
    """Conv modules whose parameters the traced graph reads directly (``get_attr conv.weight``).

    A read by the module's own forward is no read: a ``torch.export`` graph fetches every
    conv's weight with ``get_attr`` for the conv op it records inside that module.
    """
    from .profile import innermost_module

    graph = analysis.trace.graph
    if graph is None:
        return {}
    modules = {c.module_name for c in analysis.convs if c.module_name}
    reads = collections.defaultdict(list)
    for node in graph.nodes:
        if node.op == "get_attr":
            owner, _, attr = str(node.target).rpartition(".")
            if owner in modules and not (node.users and all(innermost_module(u) == owner for u in node.users)):
                reads[owner].append(str(node.target))
    return dict(reads)


# ------------------------------------------------------------------------- saved plans


def load_plan(doc: Any, analysis, where: str = "plan") -> ConversionPlan:
    """A saved plan (the dict of :meth:`ConversionPlan.to_dict`), checked against ``analysis``'s model.

    A plan is validated, not trusted: it must fit the model (same call sites, shapes and
    widths), every replacement must be one the converter can make, and a module's call
    sites must agree. Costs are recomputed from the model; a decision whose action was
    edited by hand gets a reason that says so. Raises :class:`PlanMismatch` (exit 2)
    naming the first problem.
    """
    from .blocks import FAMILIES, block_costs, max_rank_of
    from .layers import ACTIVATIONS
    from .rules import RULES, load_rules_dict

    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        raise PlanMismatch(f"{where}: not a dsrewrite plan (write one with convert --dry-run --format json -o FILE)")
    if doc.get("schema_version") not in READABLE_VERSIONS:
        raise PlanMismatch(f"{where}: plan schema_version {doc.get('schema_version')!r}; this dsrewrite reads "
                           f"versions {', '.join(map(str, READABLE_VERSIONS))}")
    shapes = [tuple(s) for s in analysis.profile.input_shapes]
    try:
        planned_shapes = [tuple(int(v) for v in s) for s in doc["input_shapes"]]
        rows = list(doc["decisions"])
        config = load_rules_dict(doc.get("rules") or {}, f"{where}: rules")
    except (KeyError, TypeError, ValueError) as e:
        raise PlanMismatch(f"{where}: malformed plan ({type(e).__name__}: {e})") from e
    if planned_shapes != shapes:
        raise PlanMismatch(f"{where}: made for input shape(s) {_shapes(planned_shapes)}, but the model was analyzed "
                           f"at {_shapes(shapes)} (pass the plan's --input-shape)")
    convs = analysis.convs
    if len(rows) != len(convs):
        raise PlanMismatch(f"{where}: has {len(rows)} conv call sites, the model has {len(convs)}")
    ctx = PlanContext(config=config, convs=convs, weight_reads=weight_reads(analysis),
                      root_untraced="" in analysis.profile.untraced)
    feasibility = [RULES[n] for n in ("SkipNonStandard", "SkipFunctional", "SkipUntraced", "SkipWeightReads")]
    decisions = []
    for row, conv in zip(rows, convs):
        if not isinstance(row, dict):
            raise PlanMismatch(f"{where}: decision {conv.index} is not an object")
        _check_site(row, conv, where)
        base = _site(conv)
        errors = row.get("candidate_errors")
        # the facts a decision was made from travel with it (shown, not re-checked)
        base.update(measured_original_s=row.get("measured_original_s"),
                    measured_replacement_s=row.get("measured_replacement_s"), timing=row.get("timing"),
                    candidate_errors={int(k): float(v) for k, v in errors.items()} if isinstance(errors, dict)
                    else None,
                    candidates=row.get("candidates") if isinstance(row.get("candidates"), list) else None)
        action = row.get("action")
        reason = str(row.get("reason") or "")
        if action == "keep":
            if not reason.startswith("kept"):
                reason = "kept: as the plan file says (edited by hand)"
            decisions.append(Decision(action="keep", rule=str(row.get("rule") or "PlanFile"), reason=reason, **base))
            continue
        if action != "replace":
            raise PlanMismatch(f"{where}: decision {conv.index} ({conv.name}): action must be 'replace' or 'keep', "
                               f"got {action!r}")
        for rule in feasibility:
            verdict = rule.decide(conv, ctx, Draft(1, False, "none"))
            if isinstance(verdict, Keep):
                raise PlanMismatch(f"{where}: decision {conv.index} ({conv.name}) replaces a conv that cannot be "
                                   f"replaced ({verdict.reason})")
        family = row.get("family") or "separable"
        here = f"{where}: decision {conv.index} ({conv.name})"
        if family not in FAMILIES:
            raise PlanMismatch(f"{here}: family must be one of {', '.join(FAMILIES)}, got {family!r}")
        if family == "separable":
            # a separable block's rank is its depth multiplier: that key is the one read
            rank = row["depth_multiplier"] if row.get("depth_multiplier") is not None else row.get("rank")
            bn, act = row.get("bn"), row.get("activation")
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise PlanMismatch(f"{here}: depth_multiplier must be a positive integer, got {rank!r}")
            if not isinstance(bn, bool):
                raise PlanMismatch(f"{here}: bn must be true or false, got {bn!r}")
            if act not in ACTIVATIONS:
                raise PlanMismatch(f"{here}: activation must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
        else:
            rank, bn, act = row.get("rank"), False, "none"
            top = max_rank_of(family, conv.in_channels, conv.out_channels, conv.kernel)
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
                raise PlanMismatch(f"{here}: a {family} block's rank must be an integer from 1 to {top} (exact), "
                                   f"got {rank!r}")
            if row.get("bn") or row.get("activation") not in (None, "none"):
                raise PlanMismatch(f"{here}: a {family} block is a linear chain; bn and activation apply to "
                                   "separable blocks only")
        macs, params = block_costs(family, rank, conv.in_channels, conv.out_channels, conv.kernel,
                                   conv.input_shape, conv.output_shape, bn)
        if not reason.startswith("replaced"):
            reason = "replaced: as the plan file says (edited by hand)"
        decisions.append(replacement(base, family, rank, bn, act, macs, params,
                                     rule=str(row.get("rule") or "PlanFile"), reason=reason))
    _check_modules_agree(decisions, where)
    plan = ConversionPlan(analysis.model_name, config, decisions, shapes, analysis.profile.macs,
                          rank_choice=doc.get("rank_choice"), environment=str(doc.get("environment") or ""),
                          notes=[str(n) for n in doc.get("notes") or []])
    if doc.get("channels") is not None:
        from .resize import resize_plan_from_dict

        plan.resize = resize_plan_from_dict(doc["channels"], analysis.channel_groups(), f"{where}: channels")
    return plan


class PlanMismatch(InputError):
    """A saved plan that does not fit the model, or is malformed (exit 2)."""


def _check_site(row: dict, conv: ConvProfile, where: str) -> None:
    """The saved call site must be the model's: same name, geometry and shapes."""
    checks = [("name", conv.name), ("kernel", list(conv.kernel)), ("stride", list(conv.stride)),
              ("in_channels", conv.in_channels), ("out_channels", conv.out_channels),
              ("output_shape", list(conv.output_shape))]
    for key, actual in checks:
        if row.get(key) != actual:
            raise PlanMismatch(f"{where}: decision {conv.index} expects {key} {row.get(key)!r} but the model's conv "
                               f"call {conv.index} ({conv.name}) has {actual!r}")


def _check_modules_agree(decisions: list[Decision], where: str) -> None:
    """Swapping a module changes all its call sites: they must agree on the action and the block."""
    first: dict[str, Decision] = {}
    for d in decisions:
        if d.module_name is None:
            continue
        seen = first.setdefault(d.module_name, d)
        if (seen.action, seen.family, seen.rank, seen.bn, seen.activation) != \
                (d.action, d.family, d.rank, d.bn, d.activation):
            raise PlanMismatch(f"{where}: module {d.module_name} is called at several sites ({seen.name}, {d.name}) "
                               "and the plan treats them differently; one module gets one block")


def _shapes(shapes) -> str:
    return " ".join(",".join(map(str, s)) for s in shapes) or "(none)"
