"""Resizing channel groups: exact alignment (zero channels) and a MobileNet-style width multiplier.

Decide first, change second: :func:`plan_resize` turns a :class:`~dsrewrite.channels.ChannelGraph`
into a :class:`ResizePlan` (each group's new width and which of its channels stay, with the
reason) without touching the model; :func:`apply_resize` applies a plan to a copy.

* **Alignment** (``divisor``) rounds every resizable group's width up to a multiple of the
  divisor by adding channels that are zero where they are produced (new conv/Linear output
  filters and biases are zero, new BN channels are neutral: mean 0, variance 1, weight 1,
  bias 0) and ignored where they are consumed (new input weights are zero). The model's
  outputs do not change. Aligning an aligned model changes nothing.
* **Width** (``width`` = α) scales every resizable group to ``make_divisible(α·width,
  divisor)``; when it shrinks, the channels kept are those whose producing filters have the
  largest L1 norm summed over the group's producers, removed consistently from every member.

A group with a frozen member is never resized; the plan lists it with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .blocks import FAMILY_BLOCKS
from .channels import CHAIN_ENDS, ChannelGraph, Member
from .layers import DepthwiseSeparableConv2d, make_divisible


@dataclasses.dataclass
class GroupChange:
    """One group's decision."""

    group: int
    old_width: int
    new_width: int
    #: indices of the old channels kept, in order; new channels (zero) follow them
    keep: list[int]
    reason: str
    producers: list[str]
    #: the group's key (:meth:`~dsrewrite.channels.ChannelGraph.key`): how a saved plan finds it again
    members: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether the group's width or channels change."""
        return self.new_width != self.old_width or self.keep != list(range(self.old_width))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (without the kept indices)."""
        return {"group": self.group, "old_width": self.old_width, "new_width": self.new_width,
                "removed": self.old_width - len(self.keep), "added": self.new_width - len(self.keep),
                "reason": self.reason, "producers": self.producers}


@dataclasses.dataclass
class ResizePlan:
    """What :func:`apply_resize` will do, group by group."""

    divisor: int
    width: float | None
    changes: list[GroupChange]
    #: frozen groups with members: (group id, width, reasons)
    frozen: list[tuple[int, int, list[str]]]
    #: the widths were chosen group by group by the planner (``plan.group_widths``); only changed groups listed
    chosen: bool = False

    @property
    def exact(self) -> bool:
        """True when no channel is removed (pure alignment): the outputs stay the same."""
        return all(len(c.keep) == c.old_width for c in self.changes)

    @property
    def changed(self) -> list[GroupChange]:
        """The groups that change."""
        return [c for c in self.changes if c.changed]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the report's summary: changed groups, without kept indices)."""
        return {"divisor": self.divisor, "width": self.width, "exact": self.exact, "chosen": self.chosen,
                "changed": [c.to_dict() for c in self.changed],
                "unchanged": len(self.changes) - len(self.changed),
                "frozen": [{"group": g, "width": w, "reasons": r} for g, w, r in self.frozen]}

    def to_plan_dict(self) -> dict[str, Any]:
        """Everything :func:`apply_resize` needs, for a saved plan: every resizable group's change.

        ``keep`` is null when every old channel stays in order (alignment), else the kept indices.
        """
        groups = [{"group": c.group, "members": list(c.members), "old_width": c.old_width, "new_width": c.new_width,
                   "keep": None if c.keep == list(range(c.old_width)) else list(c.keep), "reason": c.reason,
                   "producers": list(c.producers)} for c in self.changes]
        return {"divisor": self.divisor, "width": self.width, "exact": self.exact, "chosen": self.chosen,
                "groups": groups,
                "frozen": [{"group": g, "width": w, "reasons": r} for g, w, r in self.frozen]}


def plan_resize(model: nn.Module | None, channels: ChannelGraph, divisor: int = 8, width: float | None = None,
                importance: dict[int, Any] | None = None) -> ResizePlan:
    """Each resizable group's new width (see the module docstring); changes nothing.

    Which channels a shrinking group keeps is decided by ``importance`` (group id -> one
    score per channel, :func:`group_importance`); without it, it is computed from ``model``.
    """
    if divisor < 1:
        raise ValueError(f"the channel divisor must be at least 1, got {divisor}")
    if width is not None and not width > 0:
        raise ValueError(f"the width multiplier must be positive, got {width}")
    changes = []
    for group in channels.groups:
        if not group.resizable:
            continue
        old = group.width
        if width is None:
            new = -(-old // divisor) * divisor
            reason = f"aligned to a multiple of {divisor}" if new != old else f"already a multiple of {divisor}"
        else:
            new = make_divisible(old * width, divisor, min_value=divisor)
            reason = f"width ×{width:g} → make_divisible({old * width:g}, {divisor})"
        if new < old:
            scores = importance.get(group.id) if importance else None
            if scores is None:
                if model is None:
                    raise ValueError(f"no channel importance for group {group.id}: give the model or importance")
                scores = group_importance(model, channels, group.id)
            keep = sorted(torch.topk(torch.as_tensor(scores, dtype=torch.float64), new).indices.tolist())
            reason += f"; kept the {new} channels with the largest filter L1 norm"
        else:
            keep = list(range(old))
        changes.append(GroupChange(group.id, old, new, keep, reason, group.producers, channels.key(group)))
    return ResizePlan(divisor, width, changes, _frozen(channels))


def group_importance(model: nn.Module, channels: ChannelGraph, group_id: int) -> torch.Tensor:
    """L1 norm of each channel's producing filters, summed over the group's producers.

    A producer's outputs may span several groups (a conv whose outputs are added to a
    concat); only its rows in this group's runs count.
    """
    total = torch.zeros(channels.group(group_id).width, dtype=torch.float64)
    for member in channels.members:
        if member.role != "out":
            continue
        weight = member_tensor(model, member, "weight").detach()
        rows = weight.abs().reshape(weight.shape[0], -1).sum(1).double().cpu()
        offset = 0
        for seg in member.layout:
            size = channels.graph.nodes[seg.atom]["size"]
            if channels.group_of[seg.atom] == group_id:
                total += rows[offset:offset + size * seg.factor].reshape(size, seg.factor).sum(1)
            offset += size * seg.factor
    return total


def member_tensor(model: nn.Module, member: Member, name: str) -> torch.Tensor:
    """A parameter or buffer of the member's module."""
    return getattr(model.get_submodule(member.module), name)


# neutral values for new entries of each parameter (zero for everything else)
_FILL = {"running_var": 1.0, ("features", "weight"): 1.0}


def resize_plan_from_dict(doc: Any, channels: ChannelGraph, where: str) -> ResizePlan:
    """A saved plan's channel section, checked against the model's channel graph (groups found by key)."""
    from .plan import PlanMismatch

    by_key = {channels.key(g): g for g in channels.groups}
    try:
        divisor, width = int(doc["divisor"]), doc.get("width")
        entries = list(doc["groups"])
    except (KeyError, TypeError, ValueError) as e:
        raise PlanMismatch(f"{where}: malformed ({type(e).__name__}: {e})") from e
    changes = []
    for entry in entries:
        key = tuple(sorted(entry.get("members") or ()))
        group = by_key.get(key)
        shown = ", ".join(key[:3]) + (", …" if len(key) > 3 else "")
        if group is None:
            raise PlanMismatch(f"{where}: the model has no channel group with members {shown}")
        old, new, keep = entry.get("old_width"), entry.get("new_width"), entry.get("keep")
        if old != group.width:
            raise PlanMismatch(f"{where}: group {shown} is {group.width} channels wide in the model, the plan says "
                               f"{old!r}")
        if not group.resizable:
            raise PlanMismatch(f"{where}: group {shown} cannot be resized ({'; '.join(group.frozen) or 'no producer'})")
        if isinstance(new, bool) or not isinstance(new, int) or new < 1:
            raise PlanMismatch(f"{where}: group {shown}: new_width must be a positive integer, got {new!r}")
        if keep is None:
            keep = list(range(min(old, new)))
        if (not isinstance(keep, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in keep)
                or keep != sorted(set(keep)) or (keep and not 0 <= keep[0] <= keep[-1] < old) or len(keep) > new):
            raise PlanMismatch(f"{where}: group {shown}: keep must be increasing channel indices below {old}, at most "
                               f"new_width ({new}) of them")
        if new < old and len(keep) != new:
            raise PlanMismatch(f"{where}: group {shown} shrinks to {new} channels but keeps {len(keep)}")
        changes.append(GroupChange(group.id, old, new, keep, str(entry.get("reason") or "as the plan file says"),
                                   list(group.producers), key))
    return ResizePlan(divisor, width if isinstance(width, (int, float)) else None, changes, _frozen(channels),
                      doc.get("chosen") is True)


def _frozen(channels: ChannelGraph) -> list[tuple[int, int, list[str]]]:
    """The groups with members that cannot be resized: (group id, width, reasons)."""
    return [(g.id, g.width, g.frozen or ["no conv or Linear produces these channels"])
            for g in channels.groups if not g.resizable and g.members]


def apply_resize(model: nn.Module, channels: ChannelGraph, plan: ResizePlan) -> nn.Module:
    """Resize ``model`` in place according to ``plan`` and return it (callers pass a copy).

    ``channels`` is ``model``'s own channel graph; the plan's groups are found in it by key,
    so a plan made on the model before its separable rewrite applies to the rewritten one.
    """
    change_of = _changes_by_group(channels, plan)
    if not change_of:
        return model
    atom_change = _atom_changes(channels, change_of)
    touched = set()
    with torch.no_grad():
        for member in channels.members:
            if not any(atom_change[s.atom] is not None for s in member.layout):
                continue
            index = _index(member, channels, atom_change)
            module = model.get_submodule(member.module)
            for name, dim in member.params:
                old = getattr(module, name)
                if old is None:
                    continue
                fill = _FILL.get(name, _FILL.get((member.role, name), 0.0))
                pad = torch.full_like(old.narrow(dim, 0, 1), fill)
                grown = torch.cat([old, pad], dim).index_select(dim, index.to(old.device))
                if isinstance(old, nn.Parameter):
                    setattr(module, name, nn.Parameter(grown, requires_grad=old.requires_grad))
                else:
                    module.register_buffer(name, grown, persistent=name not in module._non_persistent_buffers_set)
            touched.add(member.module)
        for name in touched:
            _sync_attributes(model.get_submodule(name))
        for module in model.modules():
            if isinstance(module, DepthwiseSeparableConv2d):
                module.in_channels = module.depthwise.in_channels
                module.mid_channels = module.depthwise.out_channels
                module.out_channels = module.pointwise.out_channels
                module.depth_multiplier = module.mid_channels // module.in_channels
            elif isinstance(module, FAMILY_BLOCKS) and module.family in CHAIN_ENDS:
                first, last = (getattr(module, n) for n in CHAIN_ENDS[module.family])
                module.in_channels, module.out_channels = first.in_channels, last.out_channels
    return model


def _changes_by_group(channels: ChannelGraph, plan: ResizePlan) -> dict[int, GroupChange]:
    """The plan's changes by the id of the group of ``channels`` they apply to (found by key)."""
    from .errors import InputError

    by_key = {channels.key(g): g for g in channels.groups}
    change_of = {}
    for change in plan.changed:
        group = by_key.get(tuple(change.members)) if change.members else channels.group(change.group)
        if group is None or group.width != change.old_width or not group.resizable:
            raise InputError(f"the planned change of channel group {', '.join(change.members[:3])} does not fit the "
                             "model it is applied to")
        change_of[group.id] = change
    return change_of


def _atom_changes(channels: ChannelGraph, change_of: dict[int, GroupChange]) -> dict:
    return {atom: change_of.get(channels.group_of[atom]) for atom in channels.group_of}


def kept_positions(channels: ChannelGraph, plan: ResizePlan) -> dict[tuple[str, str], torch.Tensor]:
    """For every member a resize changes, ``(module, role) ->`` the old position of each new
    channel along it (``in``/``out`` of a conv or Linear, ``features`` of a BN, ...); a new
    (zero) channel has the position one past the old ones. ``channels`` is the graph the plan
    is applied to (:func:`apply_resize`)."""
    atom_change = _atom_changes(channels, _changes_by_group(channels, plan))
    return {(m.module, m.role): _index(m, channels, atom_change) for m in channels.members
            if any(atom_change[s.atom] is not None for s in m.layout)}


def _index(member: Member, channels: ChannelGraph, atom_change) -> torch.Tensor:
    """Old positions along the member's dimension for each new position; −1 (→ the pad slot) for new ones."""
    out, offset = [], 0
    for seg in member.layout:
        size = channels.graph.nodes[seg.atom]["size"]
        change = atom_change[seg.atom]
        keep = change.keep if change else list(range(size))
        new = change.new_width if change else size
        for i in keep:
            out.extend(offset + i * seg.factor + j for j in range(seg.factor))
        out.extend([-1] * ((new - len(keep)) * seg.factor))
        offset += size * seg.factor
    index = torch.tensor(out, dtype=torch.long)
    return torch.where(index < 0, torch.full_like(index, offset), index)


def _sync_attributes(module: nn.Module) -> None:
    """Make a resized module's size attributes match its new parameters."""
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        multiplier = module.out_channels // module.groups
        module.out_channels = module.weight.shape[0]
        if depthwise:
            # the filters follow the input channels: in = groups = out / multiplier
            module.in_channels = module.groups = module.out_channels // multiplier
        else:
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        ref = module.weight if module.weight is not None else module.running_mean
        module.num_features = ref.shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.shape[0]
