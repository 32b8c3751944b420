"""Channel groups: which channel dimensions of a traced model must keep the same size.

Analysis only (like :mod:`dsrewrite.profile`, whose shapes it reads from ``node.meta["val"]``):
it walks the traced graph once and builds a networkx graph whose nodes are *channel atoms*
— the channels a conv or Linear produces, a model input's channels, the output of an op it
does not understand — and whose edges say "these must have the same size and the same
channel order": through BN, activations, pooling, dropout, residual adds and muls,
depthwise convs (in = out, or ``in × m`` with a depth multiplier), repeated call sites of
one module. Each connected component is a :class:`ChannelGroup`, resizable only as a whole.

A tensor's channel dimension (dim 1) is a *layout*: a list of segments ``(atom, factor)``,
so a concatenation is the segments of its inputs in order (each at its offset), a flatten
into a Linear repeats each channel ``H·W`` times (``factor``), and a depthwise conv with
multiplier ``m`` repeats each of its input's channels ``m`` times. Every parameter dimension
that follows channels (a conv's input or output filters, a BN's features, a Linear's
in-features) is a :class:`Member` with the layout it spans; resizing rewrites exactly those.

What it cannot reason about it freezes, with the reason, instead of guessing: the model's
inputs and outputs, grouped convs, channel splits and shuffles, reshapes that mix channels
with other dimensions, hard-coded channel counts in ``view``, reductions over channels,
layer/group norms, untraced leaves and unknown ops.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from .trace import TraceResult


@dataclasses.dataclass(frozen=True)
class Segment:
    """``factor`` consecutive entries per channel of ``atom`` (1 for a plain channel run)."""

    atom: int
    factor: int = 1


Layout = tuple[Segment, ...]


@dataclasses.dataclass(frozen=True)
class Member:
    """A parameter dimension of one module that follows a layout of channels."""

    module: str
    #: ``in`` / ``out`` (conv, Linear), ``features`` (BN, PReLU), ``depthwise`` (a depthwise conv's filters)
    role: str
    #: (parameter or buffer name, dimension) pairs that follow the layout
    params: tuple[tuple[str, int], ...]
    layout: Layout

    def label(self) -> str:
        """``layer1.0.conv1.out``-style name."""
        return f"{self.module}.{self.role}" if self.module else self.role


@dataclasses.dataclass
class ChannelGroup:
    """Channel atoms that must change size together."""

    id: int
    width: int
    atoms: list[int]
    #: the members whose layout contains one of this group's atoms (labels)
    members: list[str]
    #: modules whose output filters create this group's channels (``module.out``)
    producers: list[str]
    #: why the group cannot be resized (empty when it can)
    frozen: list[str]

    @property
    def resizable(self) -> bool:
        """Whether every member is understood and at least one module produces the channels."""
        return not self.frozen and bool(self.producers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"id": self.id, "width": self.width, "resizable": self.resizable, "frozen": self.frozen,
                "producers": self.producers, "members": self.members}


@dataclasses.dataclass
class ChannelGraph:
    """The channel-dependency graph of one traced model."""

    #: nodes: atom ids with ``label``, ``size``, ``frozen`` (list of reasons); edges: ``via`` (what ties them)
    graph: nx.Graph
    members: list[Member]
    groups: list[ChannelGroup]
    #: atom id -> group id
    group_of: dict[int, int]
    notes: list[str] = dataclasses.field(default_factory=list)
    #: qualified names of the model's depthwise-separable blocks (see :meth:`key`)
    blocks: frozenset = frozenset()
    #: the other families' blocks: qualified name -> (first conv, last conv) (see :meth:`key`)
    chains: dict = dataclasses.field(default_factory=dict)

    def group(self, group_id: int) -> ChannelGroup:
        """The group with this id."""
        return self.groups[group_id]

    def key(self, group: ChannelGroup) -> tuple[str, ...]:
        """A name for the group that survives the separable rewrite: its member labels, sorted.

        Inside a :class:`~dsrewrite.layers.DepthwiseSeparableConv2d` block ``B``, the
        depthwise filters follow ``B``'s input channels (``B.in``), the pointwise outputs are
        ``B.out``, and the inserted BN and the pointwise inputs follow the input channels too,
        so they add nothing. A group of a model and the same group after some of its convs
        were replaced therefore have the same key.

        The other families' blocks (:mod:`dsrewrite.blocks`) are chains of plain convs: their
        first conv's inputs are ``B.in``, their last conv's outputs ``B.out``, and the channels
        between (the rank) belong to the block alone.
        """
        labels = set()
        for label in group.members:
            module, _, role = label.rpartition(".")
            parent, _, part = module.rpartition(".")
            if parent in self.blocks:
                if part == "depthwise":
                    labels.add(f"{parent}.in")
                elif part == "pointwise" and role == "out":
                    labels.add(f"{parent}.out")
                continue
            if parent in self.chains:
                first, last = self.chains[parent]
                if part == first and role == "in":
                    labels.add(f"{parent}.in")
                elif part == last and role == "out":
                    labels.add(f"{parent}.out")
                continue
            labels.add(label)
        return tuple(sorted(labels))

    @property
    def resizable(self) -> list[ChannelGroup]:
        """The groups that can be resized."""
        return [g for g in self.groups if g.resizable]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"groups": [g.to_dict() for g in self.groups],
                "resizable": len(self.resizable), "frozen": len(self.groups) - len(self.resizable),
                "notes": self.notes}


# ----------------------------------------------------------------------------- op tables

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: block families made of a chain of plain convs: family -> (first conv, last conv) attribute names.
#: pointwise-first is not here: its grouped K×K conv ties its C_out·m inputs to its outputs,
#: which a resize would have to follow (planning refuses a resize with that family).
CHAIN_ENDS = {"spatial": ("vertical", "horizontal"), "bottleneck": ("reduce", "expand"),
              "inverted-residual": ("expand", "project")}
_NORM_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d,
    nn.ReflectionPad2d, nn.ReplicationPad2d,
)
_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.softplus, F.sigmoid, F.tanh, torch.relu, torch.sigmoid, torch.tanh, torch.clamp, operator.neg,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach", "float",
                 "clamp", "clamp_", "clamp_min", "clamp_min_", "neg"}
_BINARY_FUNCTIONS = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.isub,
                     operator.truediv, operator.itruediv, torch.add, torch.mul, torch.sub, torch.div}
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_SHAPE_METHODS = {"size", "dim"}


def _first_value(node: fx.Node):
    """The value (``meta["val"]``) of a node's first argument, when that is a node."""
    return node.args[0].meta.get("val") if node.args and isinstance(node.args[0], fx.Node) else None


def _spatial_index(index, ndim: int) -> bool:
    """Whether ``x[index]`` on an ``ndim``-D tensor takes whole batch and channel dims and slices the rest."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (isinstance(i, slice) or i is Ellipsis) for i in items) or items.count(Ellipsis) > 1:
        return False
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (ndim - len(items) + 1)
    items += [slice(None)] * (ndim - len(items))
    whole = slice(None)
    return len(items) == ndim and ndim >= 3 and items[0] == whole and items[1] == whole and all(
        not isinstance(s.start, fx.Node) and not isinstance(s.stop, fx.Node) and s.step in (None, 1) for s in items)


# ----------------------------------------------------------------------------- building

def channel_graph(traced: TraceResult, extra: list[TraceResult] = ()) -> ChannelGraph:
    """Build the channel-dependency graph of a traced and profiled model (see the module docstring).

    ``traced`` must have been profiled (:func:`dsrewrite.profile.profile`) so that every
    node carries its shape in ``node.meta["val"]``; ``extra`` are more profiled graphs of the
    same model (or a copy with the same module names), e.g. its training-mode graph, whose
    ties are added. A model torch.fx could not trace at the top level has no graph: every
    module's channels are one frozen group each. Modules with parameters that no graph
    calls are listed in ``notes`` and frozen where known, since nothing says what they consume.
    """
    from .blocks import FAMILY_BLOCKS
    from .layers import DepthwiseSeparableConv2d

    builder = _Builder(traced.root)
    blocks = frozenset(n for n, m in traced.root.named_modules() if isinstance(m, DepthwiseSeparableConv2d))
    chains = {n: CHAIN_ENDS[m.family] for n, m in traced.root.named_modules()
              if isinstance(m, FAMILY_BLOCKS) and m.family in CHAIN_ENDS}
    if traced.graph is None:
        builder.freeze_all_modules("the model could not be traced")
        return dataclasses.replace(builder.finish(), blocks=blocks, chains=chains)
    for result in [traced, *extra]:
        for node in result.graph.nodes:
            builder.visit(node)
    builder.freeze_weight_reads()
    missing = set(uncalled_modules(traced))
    for result in extra:
        missing &= set(uncalled_modules(result))
    builder.freeze_uncalled(sorted(missing))
    return dataclasses.replace(builder.finish(), blocks=blocks, chains=chains)


def model_channel_graph(traced: TraceResult, inputs: tuple) -> ChannelGraph:
    """:func:`channel_graph` of a profiled model, with its training-mode graph added when needed.

    Layers that only training runs (auxiliary heads) are not in the eval-mode graph; when
    some module is never called there, a copy is traced in training mode and profiled on
    ``inputs`` (meta tensors are fine), and its ties are added.
    """
    import copy

    from .profile import profile
    from .trace import trace

    extra = []
    if traced.graph is not None and inputs is not None and uncalled_modules(traced):
        training = trace(copy.deepcopy(traced.root), training=True, inputs=inputs)
        if training.graph is not None:
            profile(training, inputs)
            extra.append(training)
    return channel_graph(traced, extra)


def uncalled_modules(traced: TraceResult) -> list[str]:
    """Modules that own parameters but that the graph never calls (nor any untraced leaf around them)."""
    if traced.graph is None:
        return []
    called = {str(n.target) for n in traced.graph.nodes if n.op == "call_module"}
    read = {str(n.target).rpartition(".")[0] for n in traced.graph.nodes if n.op == "get_attr"}
    out = []
    for name, module in traced.root.named_modules():
        if not name or not any(True for _ in module.parameters(recurse=False)):
            continue
        if name in called or name in read or any(name.startswith(c + ".") for c in called):
            continue
        out.append(name)
    return out


class _Builder:
    def __init__(self, root: nn.Module):
        self.root = root
        self.graph = nx.Graph()
        self.layouts: dict[fx.Node, Any] = {}
        self.members: dict[tuple[str, str], Member] = {}
        self.out_atoms: dict[str, int] = {}
        self.weight_reads: set[str] = set()
        self.notes: list[str] = []
        self.parts: dict[int, list[int]] = {}
        self.next_atom = 0

    # -- atoms and layouts
    def atom(self, label: str, size: int, frozen: str | None = None) -> int:
        node = self.next_atom
        self.next_atom += 1
        self.graph.add_node(node, label=label, size=int(size), frozen=[frozen] if frozen else [])
        return node

    def frozen_layout(self, label: str, size: int, reason: str) -> Layout:
        return (Segment(self.atom(label, size, reason)),)

    def size(self, layout: Layout) -> int:
        return sum(self.graph.nodes[s.atom]["size"] * s.factor for s in self.resolve(layout))

    def resolve(self, layout: Layout) -> Layout:
        """The layout in terms of current atoms (atoms split since are replaced by their parts)."""
        out: list[Segment] = []
        for s in layout:
            if s.atom in self.parts:
                out.extend(self.resolve(tuple(Segment(p, s.factor) for p in self.parts[s.atom])))
            else:
                out.append(s)
        return tuple(out)

    def freeze(self, layout, reason: str) -> None:
        for s in _segments(layout):
            for atom in self.resolve((s,)):
                if reason not in self.graph.nodes[atom.atom]["frozen"]:
                    self.graph.nodes[atom.atom]["frozen"].append(reason)

    def join(self, a: Layout, b: Layout, via: str, refined: bool = False) -> None:
        """Tie two layouts that must be the same channels in the same order.

        When both sides hold the same channels cut into different runs (a concat of 120 + 130
        added to a conv's 250 outputs), the atoms are split at the union of the cut points —
        with everything already tied to them — and the pieces are tied one to one.
        """
        a, b = self.resolve(a), self.resolve(b)
        size = self.graph.nodes
        same = (len(a) == len(b) and all(x.factor == y.factor for x, y in zip(a, b))
                and all(size[x.atom]["size"] == size[y.atom]["size"] for x, y in zip(a, b)))
        if same:
            for x, y in zip(a, b):
                if x.atom != y.atom:
                    self.graph.add_edge(x.atom, y.atom, via=via)
            return
        if not refined and self.size(a) == self.size(b):
            cuts = self._cuts(a, b)
            if cuts is not None:
                for atom, positions in cuts.items():
                    if atom not in self.parts:  # split already as part of an earlier atom's component
                        self._split(atom, positions)
                return self.join(a, b, via, refined=True)
        # channels laid out in ways that cannot be matched run for run (different repeat factors)
        for x in a + b:
            for y in a + b:
                if x.atom != y.atom:
                    self.graph.add_edge(x.atom, y.atom, via=via)
        self.freeze(a + b, f"{via}: channels laid out differently on its inputs")

    def _cuts(self, a: Layout, b: Layout) -> dict[int, list[int]] | None:
        """Atom -> positions where it must be cut so that both layouts have the same run boundaries."""
        def bounds(layout):
            edges, pos = set(), 0
            for s in layout:
                pos += self.graph.nodes[s.atom]["size"] * s.factor
                edges.add(pos)
            return edges
        boundaries = bounds(a) | bounds(b)
        cuts: dict[int, set[int]] = {}
        for layout in (a, b):
            pos = 0
            for s in layout:
                end = pos + self.graph.nodes[s.atom]["size"] * s.factor
                for edge in boundaries:
                    if pos < edge < end:
                        if (edge - pos) % s.factor:
                            return None  # a cut through one channel's repeated entries
                        cuts.setdefault(s.atom, set()).add((edge - pos) // s.factor)
                pos = end
        # every atom tied to a cut atom is the same channels in the same order: cut it alike
        merged: dict[int, set[int]] = {}
        for atom, positions in cuts.items():
            root = min(nx.node_connected_component(self.graph, atom))
            merged.setdefault(root, set()).update(positions)
        return {root: sorted(p) for root, p in merged.items()}

    def _split(self, atom: int, positions: list[int]) -> None:
        """Split ``atom`` and every atom tied to it at ``positions``; the pieces keep the ties."""
        component = sorted(nx.node_connected_component(self.graph, atom))
        total = self.graph.nodes[atom]["size"]
        sizes = [hi - lo for lo, hi in zip([0, *positions], [*positions, total])]
        for old in component:
            data = self.graph.nodes[old]
            self.parts[old] = [self.atom(f"{data['label']}[{lo}:{lo + n}]", n) for lo, n in
                               zip([0, *positions], sizes)]
            for part in self.parts[old]:
                self.graph.nodes[part]["frozen"] = list(data["frozen"])
        for x, y, via in list(self.graph.subgraph(component).edges(data="via")):
            for px, py in zip(self.parts[x], self.parts[y]):
                self.graph.add_edge(px, py, via=via)
        self.graph.remove_nodes_from(component)

    def member(self, module: str, role: str, params, layout: Layout) -> None:
        key = (module, role)
        if key in self.members:
            self.join(self.members[key].layout, layout, f"{module} (called at several sites)")
        else:
            self.members[key] = Member(module, role, tuple(params), layout)

    # -- per node
    def visit(self, node: fx.Node) -> None:
        val = node.meta.get("val")
        if node.op == "placeholder":
            self.layouts[node] = self._fresh(val, f"input {node.name}", "model input")
        elif node.op == "get_attr":
            self.weight_reads.add(str(node.target))
            self.layouts[node] = self._fresh(val, f"attribute {node.target}", f"tensor attribute {node.target}")
        elif node.op == "output":
            for layout in self._arg_layouts(node.args):
                self.freeze(layout, "model output")
        elif node.op == "call_module":
            self.layouts[node] = self._module(node, self.root.get_submodule(str(node.target)), val)
        elif node.op == "call_function":
            self.layouts[node] = self._function(node, node.target, val)
        elif node.op == "call_method":
            self.layouts[node] = self._method(node, str(node.target), val)

    def _fresh(self, val, label: str, reason: str):
        if isinstance(val, torch.Tensor):
            return self.frozen_layout(label, val.shape[1], reason) if val.dim() >= 2 else None
        if isinstance(val, (tuple, list)):
            return tuple(self._fresh(v, f"{label}[{i}]", reason) for i, v in enumerate(val))
        return None

    def _input(self, node: fx.Node, index: int = 0):
        arg = node.args[index] if len(node.args) > index else None
        return self.layouts.get(arg) if isinstance(arg, fx.Node) else None

    def _arg_layouts(self, args) -> list[Layout]:
        out = []
        nodes: list[fx.Node] = []
        fx.node.map_arg(args, lambda n: nodes.append(n))
        for n in nodes:
            out.extend(_layouts_in(self.layouts.get(n)))
        return out

    def _unknown(self, node: fx.Node, what: str, val):
        reason = f"{what} at {node.name}"
        for layout in self._arg_layouts((node.args, node.kwargs)):
            self.freeze(layout, reason)
        return self._fresh(val, f"{what} {node.name}", reason)

    def _module(self, node: fx.Node, module: nn.Module, val):
        name = str(node.target)
        x = self._input(node)
        kind = type(module).__name__
        if isinstance(module, _PASS_MODULES) or isinstance(module, nn.PReLU) and module.num_parameters == 1:
            return x
        if x is None or not isinstance(val, torch.Tensor):
            return self._unknown(node, f"{kind} not understood", val)
        if isinstance(module, _CONV):
            return self._conv(name, module, x, val)
        if isinstance(module, nn.Linear):
            if val.dim() != 2:
                return self._unknown(node, f"Linear on a {val.dim()}-d tensor", val)
            self.member(name, "in", [("weight", 1)], x)
            return self._produced(name, module, [("weight", 0), ("bias", 0)], module.out_features)
        if isinstance(module, _NORM_PER_CHANNEL):
            params = [(p, 0) for p in ("weight", "bias", "running_mean", "running_var") if getattr(module, p, None)
                      is not None]
            if params:
                self.member(name, "features", params, x)
            return x
        if isinstance(module, nn.PReLU):
            self.member(name, "features", [("weight", 0)], x)
            return x
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            if _norm_dim(module.dim, val.dim()) == 1:
                return self._unknown(node, f"{kind} over channels", val)
            return x
        if isinstance(module, nn.Flatten):
            return self._reshape(node, x, val, kind, literal_channels=False)
        return self._unknown(node, f"{kind} not understood", val)

    def _produced(self, name: str, module: nn.Module, params, size: int) -> Layout:
        if name not in self.out_atoms:
            self.out_atoms[name] = self.atom(f"{name}.out", size)
            present = [(p, d) for p, d in params if getattr(module, p, None) is not None]
            self.members[(name, "out")] = Member(name, "out", tuple(present), (Segment(self.out_atoms[name]),))
        return (Segment(self.out_atoms[name]),)

    def _conv(self, name: str, conv: nn.Conv2d, x: Layout, val) -> Layout:
        if conv.transposed:
            self.freeze(x, f"transposed conv {name}")
            return self.frozen_layout(f"{name}.out", val.shape[1], f"transposed conv {name}")
        if conv.groups == 1:
            self.member(name, "in", [("weight", 1)], x)
            return self._produced(name, conv, [("weight", 0), ("bias", 0)], conv.out_channels)
        if conv.groups == conv.in_channels:
            multiplier = conv.out_channels // conv.in_channels
            out = tuple(Segment(s.atom, s.factor * multiplier) for s in x)
            params = [("weight", 0)] + ([("bias", 0)] if conv.bias is not None else [])
            self.member(name, "depthwise", params, out)
            return out
        reason = f"grouped conv {name} (groups={conv.groups})"
        self.freeze(x, reason)
        return self.frozen_layout(f"{name}.out", conv.out_channels, reason)

    def _function(self, node: fx.Node, fn, val):
        name = getattr(fn, "__name__", str(fn))
        if fn in _PASS_FUNCTIONS:
            return self._input(node)
        if fn in _BINARY_FUNCTIONS:
            return self._binary(node, val)
        if fn in _CAT_FUNCTIONS:
            return self._cat(node, val)
        if fn in _REDUCE_FUNCTIONS:
            return self._reduce(node, val, name)
        if fn is torch.flatten:
            return self._reshape(node, self._input(node), val, "flatten", literal_channels=False)
        if fn is operator.getitem:
            return self._getitem(node, val)
        if fn is getattr:
            return None  # x.shape and friends: no tensor
        if fn is F.pad:
            return self._pad(node, val)
        return self._unknown(node, f"{name} not understood", val)

    def _pad(self, node: fx.Node, val):
        """``F.pad`` pads the last dims first: a pad list no longer than the spatial dims keeps the channels."""
        src = _first_value(node)
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        if isinstance(src, torch.Tensor) and isinstance(pad, (tuple, list)) and len(pad) <= 2 * (src.dim() - 2):
            return self._input(node)
        return self._unknown(node, "pad of the batch or channel dimension", val)

    def _method(self, node: fx.Node, method: str, val):
        if method in _PASS_METHODS:
            return self._input(node)
        if method in _BINARY_METHODS:
            return self._binary(node, val)
        if method in _REDUCE_METHODS:
            return self._reduce(node, val, method)
        if method in _RESHAPE_METHODS:
            return self._reshape(node, self._input(node), val, method, literal_channels=method != "flatten")
        if method in _SHAPE_METHODS:
            return None
        return self._unknown(node, f".{method}() not understood", val)

    def _binary(self, node: fx.Node, val):
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            return self._unknown(node, f"{_op_name(node)} on a tensor without channels", val) \
                if isinstance(val, torch.Tensor) else None
        out, channels = None, val.shape[1]
        for arg in node.args:
            arg_val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
            if not isinstance(arg_val, torch.Tensor):
                continue  # a scalar
            aligned = 1 - (val.dim() - arg_val.dim())  # the operand's dim broadcast against channels
            if aligned < 0 or arg_val.shape[aligned] == 1:
                continue  # broadcast over the channels: no constraint
            layout = self.layouts.get(arg)
            if aligned != 1 or layout is None or arg_val.shape[1] != channels:
                return self._unknown(node, f"{_op_name(node)} with a channel-shaped operand", val)
            if out is None:
                out = layout
            else:
                self.join(out, layout, f"{_op_name(node)} at {node.name}")
        return out if out is not None else self._unknown(node, f"{_op_name(node)} without a channel operand", val)

    def _cat(self, node: fx.Node, val):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        layouts = [self.layouts.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        if not isinstance(val, torch.Tensor) or val.dim() < 2 or any(not _is_layout(x) for x in layouts):
            return self._unknown(node, "cat of tensors without channels", val)
        if _norm_dim(dim, val.dim()) == 1:
            return tuple(s for layout in layouts for s in layout)
        for other in layouts[1:]:
            self.join(layouts[0], other, f"cat at {node.name}")
        return layouts[0]

    def _reduce(self, node: fx.Node, val, name: str):
        x = self._input(node)
        src = _first_value(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not _is_layout(x) or not isinstance(src, torch.Tensor) or dims is None:
            return self._unknown(node, f"{name} over every dimension", val)
        dims = {_norm_dim(d, src.dim()) for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
        if 0 in dims or 1 in dims:
            return self._unknown(node, f"{name} over the batch or channels", val)
        return x

    def _reshape(self, node: fx.Node, x, val, name: str, literal_channels: bool):
        src = _first_value(node)
        if not _is_layout(x) or not isinstance(src, torch.Tensor) or not isinstance(val, torch.Tensor):
            return self._unknown(node, f"{name} not understood", val)
        if literal_channels and _literal_at(node, 1):
            return self._unknown(node, f"{name} with a literal size at the channel dimension", val)
        same_lead = val.dim() >= 2 and val.shape[0] == src.shape[0]
        if same_lead and val.shape[1] == src.shape[1]:
            return x  # only the spatial dims change
        if same_lead and val.dim() == 2 and val.shape[1] == math.prod(src.shape[1:]):
            spatial = math.prod(src.shape[2:])
            return tuple(Segment(s.atom, s.factor * spatial) for s in x)  # channel-major flatten
        return self._unknown(node, f"{name} mixing channels with other dimensions", val)

    def _getitem(self, node: fx.Node, val):
        container = self._input(node)
        index = node.args[1] if len(node.args) > 1 else None
        if isinstance(container, tuple) and not _is_layout(container) and isinstance(index, int):
            return container[index]
        if not isinstance(val, torch.Tensor):
            return None  # an index into sizes or a non-tensor container
        src = _first_value(node)
        if _is_layout(container) and isinstance(src, torch.Tensor) and _spatial_index(index, src.dim()):
            return container  # x[..., :h, :w]: only the spatial dims are cut
        return self._unknown(node, "indexing a tensor", val)

    # -- whole-model
    def freeze_weight_reads(self) -> None:
        """A module whose parameters the forward reads directly cannot be resized behind its back."""
        for member in self.members.values():
            if any(f"{member.module}.{p}" in self.weight_reads for p, _ in member.params):
                self.freeze(member.layout, f"{member.module}'s parameters are read directly by the forward")

    def freeze_uncalled(self, names: list[str]) -> None:
        """A module no graph calls: whatever group it would belong to cannot be resized safely.

        Its output channels get their own frozen atom; its input side is unknown, so every
        group it could consume is unknowable — the note says so and the module is left as is.
        """
        self.notes += [f"{name} is never called in the traced graphs; it is left as it is" for name in names]
        for name in names:
            module = self.root.get_submodule(name)
            if isinstance(module, _CONV + (nn.Linear,)):
                self._produced(name, module, [("weight", 0), ("bias", 0)], module.weight.shape[0])
                self.freeze(self.members[(name, "out")].layout, f"{name} is never called in the traced graphs")

    def freeze_all_modules(self, reason: str) -> None:
        for name, module in self.root.named_modules():
            if isinstance(module, _CONV + (nn.Linear,)):
                self._produced(name, module, [("weight", 0), ("bias", 0)], module.weight.shape[0])
                self.freeze(self.members[(name, "out")].layout, reason)

    def finish(self) -> ChannelGraph:
        members = [dataclasses.replace(m, layout=self.resolve(m.layout)) for m in self.members.values()]
        groups, group_of = [], {}
        components = sorted(nx.connected_components(self.graph), key=min)
        for gid, atoms in enumerate(components):
            for a in atoms:
                group_of[a] = gid
        for gid, atoms in enumerate(components):
            atoms = sorted(atoms)
            sizes = {self.graph.nodes[a]["size"] for a in atoms}
            frozen = list(dict.fromkeys(r for a in atoms for r in self.graph.nodes[a]["frozen"]))
            if len(sizes) > 1:
                frozen.append(f"members disagree on the width ({sorted(sizes)})")
            mine = [m for m in members if any(group_of[s.atom] == gid for s in m.layout)]
            producers = [m.label() for m in mine if m.role == "out"]
            groups.append(ChannelGroup(gid, max(sizes), atoms, [m.label() for m in mine], producers, frozen))
        return ChannelGraph(self.graph, members, groups, group_of, self.notes)


def _segments(layout) -> list[Segment]:
    return [s for lay in _layouts_in(layout) for s in lay]


def _layouts_in(value) -> list[Layout]:
    if value is None:
        return []
    if _is_layout(value):
        return [value]
    return [lay for v in value for lay in _layouts_in(v)]


def _is_layout(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(s, Segment) for s in value) and len(value) > 0


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _literal_at(node: fx.Node, position: int) -> bool:
    """Whether a view/reshape call gives output dim ``position`` as a literal size (not -1, not computed)."""
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    if len(shape) <= position:
        return False
    entry = shape[position]
    return isinstance(entry, int) and entry != -1


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
