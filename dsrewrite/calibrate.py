"""Calibration: refit each replaced block on unlabeled data, without gradients.

For each replaced block, in network order; a
:class:`~dsrewrite.layers.DepthwiseSeparableConv2d` gets steps 1–4, the other families'
blocks (:mod:`dsrewrite.blocks`) step 1 and a least-squares refit of their last conv
(:func:`_refit_last`: the block is linear in its weights; grouped convs solve per group):

1. its inputs are taken from the **converted** model (so the errors of earlier blocks are
   compensated, not accumulated) and the targets are the **original** conv's outputs;
2. the inserted BN is reset from the statistics of the depthwise outputs on that data (so
   the activation works in its linear range on real inputs);
3. before that, the depthwise filters and pointwise weights are fit together by alternating
   least squares on the block's linear part (the block is bilinear in them): one streamed
   pass collects the input-patch covariance Σ (C_in·K²+1)² and the cross-covariance with
   the targets, then each half-step works on those small matrices only (pointwise: an exact
   (mid+1)² solve; depthwise: the (mid·K²)² system PᵀP ⊙ Σ, applied through Σ and formed only
   where it is no larger than Σ, :func:`_depthwise_normal`, by a few warm-started conjugate-gradient steps,
   :data:`CG_STEPS`) — every step lowers the objective, so the fit is never worse than
   refitting the pointwise alone;
4. the inserted BN is reset again for the new filters and the pointwise weights and bias are
   refit by least squares through the actual BN and activation, streamed over the batches:
   the fit keeps only the normal equations (mid+1)² and (mid+1)×C_out.

Both fits weight each output channel by the scale of the BN that consumes it (its error is
amplified that much), and where the original conv feeds BN → ReLU they are *ReLU-aware*:
after a plain first round, further rounds refit to targets in which a position the
original's ReLU cuts off asks only to be cut off too (:func:`_gated`), so no capacity is
spent on differences the ReLU throws away.

The data come from **one streamed pass** (:class:`_Stream`): both models run side by side,
one fx node at a time over all batches, and stop at each block just long enough to fit it —
about one forward pass of each model in all, not one per block. Fits that sample: each
least-squares problem sees a fixed random sample of :data:`POSITIONS_PER_UNKNOWN` output
positions per unknown (``thorough=True``: every position), so their cost stops growing with
the data. A block the graph does not reach (inside code fx cannot trace) gets its data by
running both models up to it on each batch.

The stream holds the activations live at one point of the network for all batches; past
``memory`` bytes (:data:`MEMORY_LIMIT` by default) further batch values go to a temporary
directory and are read back one batch at a time when used (:class:`_Spill`), bit for bit, so
memory is bounded by the limit, one batch per live node and the fits' statistics, not by the
amount of data. The directory is removed when the calibration ends, also on an error.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import os
import shutil
import tempfile
import time
import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import FAMILY_BLOCKS
from .layers import DepthwiseSeparableConv2d, decouple, set_linear_range
from .progress import Progress, heartbeat
from .trace import eval_mode, fetch_attr, node_arguments


class _Stop(Exception):
    """Raised by a hook once the layer of interest has run."""


@dataclasses.dataclass
class CalibrationReport:
    """Fidelity of the converted model against the original on the calibration data."""

    before: dict[str, float]
    after: dict[str, float]
    blocks: int
    batches: int
    samples: int
    depthwise_refit: int = 0
    #: samples kept out of the fit; ``before``/``after`` are measured on them (0: on the fit data)
    held_out_samples: int = 0
    #: blocks fitted on data from the one streamed pass (:class:`_Stream`); the others ran both
    #: models up to the block once per batch
    streamed_blocks: int = 0
    #: ``fast`` (sampled positions per fit) or ``thorough`` (every position)
    mode: str = "fast"
    #: wall time of the whole calibration, seconds
    seconds: float = 0.0
    #: bytes of activations the stream kept in memory at most (``memory``), and what it wrote to disk beyond
    memory_limit: int | None = None
    activations_peak: int = 0
    spilled_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def as_batches(data: Iterable, max_batches: int | None = None) -> list[torch.Tensor]:
    """Input tensors from an iterable of batches (tensors, or (inputs, labels) pairs), kept in memory."""
    out = []
    for i, item in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calibration batches must be tensors or (inputs, labels) pairs, got {type(x).__name__}")
        out.append(x)
    if not out:
        raise ValueError("no calibration batches")
    return out


#: fast calibration: output positions per unknown of a least-squares fit (a fixed random sample)
POSITIONS_PER_UNKNOWN = 64

# The joint depthwise fit holds a dense (mid·K²)² system (float64); above this many unknowns
# (512 channels at rank 1 with 3×3 kernels: ~170 MiB) a block gets the pointwise refit only.
MAX_JOINT_UNKNOWNS = 4608


#: activations the calibration stream keeps in memory by default, bytes (beyond: on disk, :class:`_Spill`)
MEMORY_LIMIT = 1 << 30


#: the share of the calibration samples kept out of the fits, to measure the result on
HELD_OUT = 0.125


def split_held_out(data: list[torch.Tensor], fraction: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(fit, held out): the last ``fraction`` of the samples (at least one, whole batches or a
    batch's tail) are kept out of the fit; with a single sample nothing is held out."""
    total = sum(x.shape[0] for x in data)
    keep_out = min(max(int(round(fraction * total)), 1), total - 1) if fraction > 0 and total > 1 else 0
    fit, held = list(data), []
    while keep_out > 0:
        last = fit.pop()
        if last.shape[0] <= keep_out:
            held.insert(0, last)
            keep_out -= last.shape[0]
        else:
            fit.append(last[:-keep_out])
            held.insert(0, last[-keep_out:])
            keep_out = 0
    return fit, held


def calibrate(converted: nn.Module, original: nn.Module, batches: Iterable, *, ridge: float = 1e-3,
              max_batches: int | None = None, refit_depthwise: bool = True, iterations: int = 10,
              relu_aware: bool = True, progress: bool = False, held_out: float = HELD_OUT,
              thorough: bool = False, memory: int | None = MEMORY_LIMIT) -> CalibrationReport:
    """Refit every replaced block of ``converted`` in place (see the module docstring).

    ``batches`` is a list (or iterable) of input tensors or (inputs, labels) pairs;
    ``ridge`` (relative to the mean diagonal of the normal equations) pulls the solution
    toward the weight-only SVD initialization where the data leave it undetermined.
    ``refit_depthwise`` turns the joint (alternating least squares) fit of the depthwise
    filters on or off; ``iterations`` bounds its alternations. ``relu_aware`` refits a conv
    followed by BN → ReLU to the error the ReLU lets through (:func:`relu_gates`).
    ``held_out`` is the share of the samples kept out of the fit (:func:`split_held_out`);
    the report's fidelity before/after is measured on them, so it is not flattered by the fit.
    Each least-squares fit uses a fixed sample of :data:`POSITIONS_PER_UNKNOWN` output positions
    per unknown (:meth:`_LayerData.positions`); ``thorough`` uses every position.
    ``memory`` bounds the bytes of activations the streamed pass keeps in memory (None: no bound);
    beyond it they go to a temporary directory, removed when the calibration ends (:class:`_Spill`).
    """
    per_unknown = None if thorough else POSITIONS_PER_UNKNOWN
    started = time.perf_counter()
    data, held = split_held_out(as_batches(batches, max_batches), held_out)
    judge = held or data
    blocks = _blocks_in_order(converted, data[0])
    weights = consumer_scales(original, blocks, data[0])
    graph = _graph_of(original)
    gates = relu_gates(original, blocks, graph=graph) if relu_aware else {}
    joint = 0
    with eval_mode(converted), eval_mode(original), torch.no_grad(), _Spill(memory) as spill:
        before = agreement(original, converted, judge)
        source = _Source(original, converted, graph, data, spill)
        with Progress("calibrating blocks", len(blocks), enabled=progress) as bar:
            for name in blocks:
                block = converted.get_submodule(name)
                conv = original.get_submodule(name)
                gate = gates.get(name)
                layer = source.layer(name, gate)
                if not isinstance(block, DepthwiseSeparableConv2d):
                    _refit_last(block, layer, ridge, gate, per_unknown)
                    bar.advance(name)
                    continue
                linear = _svd_linear(block, conv)
                if refit_depthwise and _joint_fit_fits(block):
                    fitted = _fit_jointly(block, layer, linear, ridge, iterations, weights.get(name), gate,
                                          per_unknown)
                    if fitted is not None:
                        linear, joint = fitted, joint + 1
                scale, shift = _reset_bn(block, layer)
                prior = _through_bn(linear[1], linear[2], scale, shift)
                _refit_pointwise(block, layer, ridge, prior, gate, per_unknown)
                bar.advance(name)
                del layer
        streamed = source.streamed
        del source  # the activations it holds
        after = agreement(original, converted, judge)
    return CalibrationReport(before, after, len(blocks), len(data), sum(x.shape[0] for x in data), joint,
                             sum(x.shape[0] for x in held), streamed, "thorough" if thorough else "fast",
                             time.perf_counter() - started, memory, spill.peak, spill.written)


@dataclasses.dataclass
class ReconstructionReport:
    """Fidelity of a width-resized model against the original, before and after the layers that
    lost input channels were refit (:func:`reconstruct`)."""

    before: dict[str, float]
    after: dict[str, float]
    #: the layers refit, in network order
    layers: list[str]
    samples: int
    held_out_samples: int = 0
    streamed_layers: int = 0
    mode: str = "fast"
    seconds: float = 0.0
    memory_limit: int | None = None
    activations_peak: int = 0
    spilled_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def reconstruct(resized: nn.Module, original: nn.Module, batches: Iterable,
                positions: dict[tuple[str, str], torch.Tensor], *, ridge: float = 1e-3, held_out: float = HELD_OUT,
                thorough: bool = False, progress: bool = False, memory: int | None = MEMORY_LIMIT) -> ReconstructionReport:
    """Refit, in place, every conv and Linear of ``resized`` that lost input channels to a width
    resize, by least squares on unlabeled data (channel pruning with reconstruction: He et al.
    2017, ThiNet): each reproduces the original layer's output — on the channels it keeps
    (``positions``, :func:`dsrewrite.resize.kept_positions`) — from what is left of its input,
    taken from the resized model (earlier refits included), in network order, from the same
    streamed pass as :func:`calibrate`. A removed channel's contribution is redistributed over
    the channels that stay, instead of being dropped.

    Refit: plain and grouped convs (not depthwise ones, whose inputs and outputs are removed
    together) and Linears. ``held_out``, ``thorough`` and ``memory`` as in :func:`calibrate`.
    """
    started = time.perf_counter()
    per_unknown = None if thorough else POSITIONS_PER_UNKNOWN
    data, held = split_held_out(as_batches(batches), held_out)
    judge = held or data
    originals = dict(original.named_modules())

    def lost_inputs(name: str, module: nn.Module) -> bool:
        before = originals.get(name)
        if (name, "in") not in positions or type(before) is not type(module):
            return False
        out = positions.get((name, "out"))
        if out is not None and bool((out >= before.weight.shape[0]).any()):
            return False  # new (zero) output channels have no target: the layer stays as it is
        if isinstance(module, nn.Linear):
            return True
        return (isinstance(module, nn.Conv2d) and not isinstance(module.padding, str)
                and not (module.groups > 1 and module.groups == module.in_channels))

    layers = _modules_in_order(resized, data[0], lost_inputs)
    graph = _graph_of(original)
    with eval_mode(resized), eval_mode(original), torch.no_grad(), _Spill(memory) as spill:
        before = agreement(original, resized, judge)
        source = _Source(original, resized, graph, data, spill)
        with Progress("refitting pruned layers", len(layers), enabled=progress) as bar:
            for name in layers:
                module = resized.get_submodule(name)
                layer = source.layer(name)
                out_index = positions.get((name, "out"))
                if isinstance(module, nn.Linear):
                    _refit_linear(module, layer, ridge, out_index)
                else:
                    _refit_conv(module, layer, ridge, None, per_unknown, out_index=out_index)
                bar.advance(name)
                del layer
        streamed = source.streamed
        del source  # the activations it holds
        after = agreement(original, resized, judge)
    return ReconstructionReport(before, after, layers, sum(x.shape[0] for x in data), sum(x.shape[0] for x in held),
                                streamed, "thorough" if thorough else "fast", time.perf_counter() - started,
                                memory, spill.peak, spill.written)


def _refit_linear(linear: nn.Linear, layer: _LayerData, ridge: float, out_index: torch.Tensor | None) -> None:
    """Least-squares refit of a Linear (weights, and bias if it has one) to its targets in ``layer``."""
    n = linear.in_features + (linear.bias is not None)
    gram = torch.zeros(n, n, dtype=torch.float64)
    cross = torch.zeros(n, linear.out_features, dtype=torch.float64)
    for x, y in zip(layer.inputs, layer.targets):
        rows = x.reshape(-1, x.shape[-1]).double()
        if linear.bias is not None:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=torch.float64)], 1)
        y = y.reshape(-1, y.shape[-1]).double()
        if out_index is not None:
            y = y[:, out_index]
        gram += rows.T @ rows
        cross += rows.T @ y
    prior = linear.weight.detach().double().T
    if linear.bias is not None:
        prior = torch.cat([prior, linear.bias.detach().double()[None]], 0)
    damp = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    solution = torch.linalg.solve(gram + damp * torch.eye(n, dtype=torch.float64), cross + damp * prior)
    linear.weight.copy_(solution[:linear.in_features].T.to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_(solution[-1].to(linear.bias.dtype))


def consumer_scales(model: nn.Module, names: Iterable[str], sample: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per output channel, how much the layer's error is amplified before anything nonlinear sees it.

    For each module in ``names`` whose output goes straight into an eval-mode BatchNorm
    (found by tensor identity on one forward, so it works for any model), that BN's
    ``|γ| / √(running_var + ε)``; modules with another consumer are left out (weight 1).
    Fitting to the BN's output instead of the conv's makes a channel that the BN scales up
    count as much as its error will downstream.
    """
    names = set(names)
    # id -> (name, a weak reference to the output): a freed output's id may be handed to a later tensor (say,
    # a concatenation a BN reads), which must not pair that BN with the layer; the dead reference tells
    outputs: dict[int, tuple[str, weakref.ref]] = {}
    scales: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if name in names:
            handles.append(m.register_forward_hook(
                lambda mod, args, out, name=name: outputs.__setitem__(id(out), (name, weakref.ref(out)))))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            def pre(mod, args):
                entry = outputs.get(id(args[0]))
                if entry is not None and entry[1]() is args[0] and entry[0] not in scales:
                    scales[entry[0]] = _bn_affine(mod)[0].abs()
            handles.append(m.register_forward_pre_hook(pre))
    _forward_once(model, sample, handles)
    return {name: scale / scale.mean().clamp_min(1e-12) for name, scale in scales.items()}


# Rounds of the ReLU-aware refit (majorize-minimize: each round refits to targets built from
# the previous round's prediction); round 1 is the plain least-squares fit.
GATED_ROUNDS = 3


@dataclasses.dataclass
class Gate:
    """What stands between a conv and the next nonlinearity: an eval BN (``scale·y + shift``
    per channel), optionally a residual add of another tensor (fx node ``other``), then a ReLU."""

    scale: torch.Tensor
    shift: torch.Tensor
    other: str | None = None
    #: the original's fx graph, to compute ``other`` (only with ``other``)
    graph: torch.fx.Graph | None = dataclasses.field(default=None, repr=False)


def _graph_of(model: nn.Module) -> torch.fx.Graph | None:
    """``model``'s fx graph (replaced convs as module calls), or None when fx cannot trace it."""
    from .trace import trace

    try:
        result = trace(model)
    except Exception:  # noqa: BLE001 - a model fx cannot trace is calibrated block by block, without gates
        return None
    return result.graph


def relu_gates(model: nn.Module, names: Iterable[str], graph: torch.fx.Graph | None = None) -> dict[str, Gate]:
    """A :class:`Gate` for each conv in ``names`` whose output only feeds an eval BN whose output
    only feeds a ReLU (module, ``F.relu``, ``torch.relu`` or ``.relu()``) — directly, or through
    one residual add (``relu(bn(conv(x)) + shortcut)``), found in the fx graph.

    Behind such a gate the error that matters is ``relu(s·ŷ + t + r̂) − relu(s·y + t + r)``:
    where the original is cut off, any prediction that is cut off too is exact, and an error
    that the shortcut ``r̂`` brings from earlier layers is the conv's to compensate. Models
    that fx cannot trace get no gates (plain least squares).
    """
    names = set(names)
    graph = graph if graph is not None else _graph_of(model)
    if graph is None:
        return {}
    modules = dict(model.named_modules())
    gates = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in names or len(node.users) != 1:
            continue
        bn_node = next(iter(node.users))
        bn = modules.get(bn_node.target) if bn_node.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None or len(bn_node.users) != 1:
            continue
        after, other = next(iter(bn_node.users)), None
        if _is_add(after) and len(after.users) == 1:
            operands = [a for a in after.args[:2] if isinstance(a, torch.fx.Node)]
            if len(operands) != 2 or operands.count(bn_node) != 1:
                continue
            other = next(a for a in operands if a is not bn_node)
            if _depends_on(other, node):
                continue
            after = next(iter(after.users))
        if not _is_relu(after, modules):
            continue
        scale, shift = _bn_affine(bn)
        if bool((scale.abs() > 1e-12).all()):
            gates[node.target] = Gate(scale, shift, other.name if other is not None else None,
                                      graph if other is not None else None)
    return gates


def _depends_on(node, ancestor) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is ancestor:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def _is_add(node) -> bool:
    if node.op == "call_function":
        return node.target in (operator.add, operator.iadd, torch.add) and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and not node.kwargs


def _is_relu(node, modules) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


@dataclasses.dataclass
class _LayerData:
    """What one block is fitted on, per batch: its input in the converted model, the original
    conv's output, and behind a residual gate the shortcut operand flattened, (original, converted)."""

    inputs: Sequence[torch.Tensor]
    targets: Sequence[torch.Tensor]
    #: per batch, the residual operand [B, C, H, W] in the original and in the converted model
    offsets: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None

    def offset(self, i: int, keep: torch.Tensor | None = None):
        """Batch ``i``'s residual operands as rows (original, converted), at the positions ``keep``."""
        if self.offsets is None:
            return None
        return tuple(_flat(t, keep) for t in self.offsets[i])

    def target_positions(self) -> list[int]:
        """Output positions per batch (from the shapes alone: nothing is read back from disk)."""
        return [s[0] * math.prod(s[2:]) for s in _shapes(self.targets)]

    def positions(self, unknowns: int, per_unknown: int | None) -> list[torch.Tensor | None]:
        """Per batch, the output positions a least-squares fit with ``unknowns`` unknowns per
        output channel uses: all of them, or (``per_unknown``) a fixed random sample of
        ``per_unknown × unknowns`` spread over the batches — the normal equations' cost is
        positions × unknowns², and beyond a few dozen positions per unknown more of them
        barely move the solution. The same sample every round, so the rounds stay monotone."""
        sizes = self.target_positions()
        total = sum(sizes)
        if per_unknown is None or total <= per_unknown * unknowns:
            return [None] * len(sizes)
        generator = torch.Generator().manual_seed(total + unknowns)
        share = per_unknown * unknowns / total
        return [torch.randperm(n, generator=generator)[:max(1, round(share * n))].sort().values for n in sizes]


class _Source:
    """Each fitted layer's data: from the one streamed pass (:class:`_Stream`) where the graph
    reaches the layer, else by running both models up to it on every batch (:func:`_captured`)."""

    def __init__(self, original: nn.Module, converted: nn.Module, graph: torch.fx.Graph | None,
                 data: list[torch.Tensor], spill: "_Spill | None" = None):
        self.original, self.converted, self.graph, self.data = original, converted, graph, data
        self.stream = _Stream.build(graph, original, converted, data, spill) if graph is not None else None
        self.offsets: _Offsets | None = None
        #: layers served by the stream
        self.streamed = 0

    def layer(self, name: str, gate: Gate | None = None) -> _LayerData:
        other = gate.other if gate is not None else None
        layer = self.stream.layer(name, other) if self.stream is not None else None
        if layer is not None:
            self.streamed += 1
            return layer
        if other and self.offsets is None:
            self.offsets = _Offsets(self.original, self.converted, self.graph)
        return _captured(self.converted, self.original, self.converted.get_submodule(name),
                         self.original.get_submodule(name), self.data, gate, self.offsets)


def _captured(converted, original, block, conv, data, gate: Gate | None, offsets: "_Offsets | None") -> _LayerData:
    """A block's :class:`_LayerData` by running both models up to it on each batch (for a block
    the stream cannot reach: called from code fx did not trace)."""
    layer = _LayerData([], [], [] if gate is not None and gate.other and offsets is not None else None)
    for i, x in enumerate(data):
        heartbeat(f"collecting the layer's data: batch {i + 1}/{len(data)}")
        layer.inputs.append(_capture(converted, block, x, "input"))
        layer.targets.append(_capture(original, conv, x, "output"))
        if layer.offsets is not None:
            layer.offsets.append(offsets(x, gate.other))
    return layer


class _Stream:
    """The original and the converted model run side by side over all calibration batches, one
    fx node at a time (the original's graph runs the converted model too: blocks are swapped in
    under the conv's name), each node once per model and batch, dropped when its last user ran.

    :meth:`layer` runs both just far enough to hand over a block's inputs (converted) and the
    original conv's outputs, in graph order; the block's own node, and everything that depends
    on it, runs later, when the next block's data is asked for, with the weights the fit gave
    it. So a whole calibration costs one forward pass of each model over the data plus the fits
    (not a pass per block), and holds the activations live at one point of the network for all
    batches.
    """

    def __init__(self, graph: torch.fx.Graph, original: nn.Module, converted: nn.Module, data: list[torch.Tensor],
                 spill: "_Spill | None" = None):
        self.spill = spill or _Spill(None)
        self.nodes = [n for n in graph.nodes if n.op != "output"]
        self.output = next(n for n in graph.nodes if n.op == "output")
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.sites: dict[str, torch.fx.Node] = {}
        for n in self.nodes:
            if n.op == "call_module":
                self.sites.setdefault(n.target, n)
        self.first_input = next((n for n in self.nodes if n.op == "placeholder"), None)
        self.roots = {"original": original, "converted": converted}
        self.data = data
        self.env: dict[str, dict] = {w: {} for w in self.roots}  # node -> its value per batch, while needed
        self.done: dict[str, set] = {w: set() for w in self.roots}
        self.pending = {w: {n: len(n.users) for n in self.nodes} for w in self.roots}
        self.start = {w: 0 for w in self.roots}  # every node before this index has run

    @classmethod
    def build(cls, graph, original, converted, data, spill: "_Spill | None" = None) -> "_Stream | None":
        """A stream, after checking on the first batch that the graph computes both models' outputs."""
        try:
            probe = cls(graph, original, converted, data[:1])
            for which, model in probe.roots.items():
                probe.run_to(which, probe.nodes[-1])
                got = node_arguments(probe.output.args[0], lambda n: probe.env[which][n][0])
                want = model(data[0])
                pairs = list(zip(_tensors(got), _tensors(want)))
                if not pairs or len(_tensors(got)) != len(_tensors(want)) or not all(
                        a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max() or 1))
                        for a, b in pairs):
                    return None
        except Exception:  # noqa: BLE001 - a graph that does not run both models: block by block instead
            return None
        return cls(graph, original, converted, data, spill)

    def layer(self, name: str, other: str | None) -> _LayerData | None:
        """The data for the block called ``name`` (first call site); None when it is not a node."""
        node = self.sites.get(name)
        if node is None or not node.args:
            return None
        converted_env, original_env = self.env["converted"], self.env["original"]
        before = self.nodes[self.index[node] - 1] if self.index[node] else None
        if before is not None:
            self.run_to("converted", before, hold=node)
        self.run_to("original", node)
        argument = node.args[0]
        if isinstance(argument, torch.fx.Node):
            inputs = converted_env[argument]
        else:  # the values it is built from, held by this layer whatever the stream drops meanwhile
            held = {n: converted_env[n] for n in node.all_input_nodes}
            inputs = _Lazy(len(self.data), lambda b: node_arguments(argument, lambda n: held[n][b]))
        layer = _LayerData(inputs, original_env[node])
        if other is not None and other in self.by_name:
            operand = self.by_name[other]
            self.run_to("original", operand)
            self.run_to("converted", operand, hold=node)
            a, b = original_env[operand], converted_env[operand]
            layer.offsets = _Lazy(len(self.data), lambda i: (a[i], b[i]))
        return layer

    def run_to(self, which: str, target: torch.fx.Node, hold: torch.fx.Node | None = None) -> None:
        """Run, in graph order, every node up to ``target`` not run yet, except ``hold`` and what
        depends on it (a block not fitted yet)."""
        done = self.done[which]
        waiting: set = set()
        first = None
        for k in range(self.start[which], self.index[target] + 1):
            n = self.nodes[k]
            if n in done or n in waiting:
                continue
            if hold is not None and (n is hold or any(a in waiting for a in n.all_input_nodes)):
                waiting.add(n)
                first = k if first is None else first
                continue
            self._run(which, n)
        self.start[which] = first if first is not None else max(self.start[which], self.index[target] + 1)
        while self.start[which] < len(self.nodes) and self.nodes[self.start[which]] in done:
            self.start[which] += 1

    def _run(self, which: str, n: torch.fx.Node) -> None:
        root, env, pending = self.roots[which], self.env[which], self.pending[which]
        values = _Values()
        # a value read after an in-place op changed it must stay the one object in memory
        values.counted = (n.op in ("call_module", "call_function", "call_method") and bool(n.users)
                          and not (len(n.users) > 1 and any(_mutates(u, n, root) for u in n.users)))
        for b, x in enumerate(self.data):
            def load(a, b=b):
                return env[a][b]

            if n.op == "placeholder":
                values.append(x if n is self.first_input else (n.args[0] if n.args else None))
            elif n.op == "get_attr":
                values.append(fetch_attr(root, n.target))
            else:
                args, kwargs = node_arguments(n.args, load), node_arguments(n.kwargs, load)
                if n.op == "call_module":
                    value = root.get_submodule(n.target)(*args, **kwargs)
                elif n.op == "call_function":
                    value = n.target(*args, **kwargs)
                else:
                    value = getattr(args[0], n.target)(*args[1:], **kwargs)
                del args, kwargs
                values.append(self.spill.keep(value) if values.counted else value)
        env[n] = values
        self.done[which].add(n)
        for a in n.all_input_nodes:
            pending[a] -= 1
            if pending[a] == 0:
                self.spill.release(env.pop(a, None))
        if not n.users:
            self.spill.release(env.pop(n, None))


def _tensors(value) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


class _OnDisk:
    """One batch of one node's value, written to a file of the spill directory; the file goes
    when the last reference to this handle does."""

    __slots__ = ("path", "shape", "__weakref__")

    def __init__(self, path: str, value: torch.Tensor):
        # a view would drag its whole base storage along: write only what the tensor covers
        whole = value.untyped_storage().nbytes() == value.numel() * value.element_size()
        torch.save(value if whole else value.clone(), path)
        self.path, self.shape = path, value.shape
        weakref.finalize(self, _remove, path)

    def load(self) -> torch.Tensor:
        return torch.load(self.path, weights_only=True)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class _Values(list):
    """A node's value per batch, some perhaps on disk (:class:`_OnDisk`): indexing and iteration
    read those back, one batch at a time. ``counted``: its tensors count against the spill limit."""

    counted = False

    def __getitem__(self, i):
        value = super().__getitem__(i)
        if isinstance(i, slice):
            return [v.load() if isinstance(v, _OnDisk) else v for v in value]
        return value.load() if isinstance(value, _OnDisk) else value

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def shapes(self) -> list:
        return [v.shape for v in super().__iter__()]


class _Lazy(Sequence):
    """``n`` values computed on access by ``get(i)`` (nothing held beyond what ``get`` closes over)."""

    def __init__(self, n: int, get: Callable[[int], Any]):
        self.n, self.get = n, get

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(k) for k in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.get(i % self.n)


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand,
                      operator.ior, operator.ixor}


def _mutates(user: torch.fx.Node, node: torch.fx.Node, root: nn.Module) -> bool:
    """Whether ``user`` may change ``node``'s value in place (an in-place module, method or operator)."""
    first = user.args[0] if user.args else None
    if user.op == "call_module":
        return first is node and bool(getattr(root.get_submodule(user.target), "inplace", False))
    if user.kwargs.get("inplace"):
        return first is node
    if user.op == "call_method":
        return first is node and str(user.target).endswith("_")
    name = getattr(user.target, "__name__", "")
    return (user.op == "call_function" and first is node
            and (user.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.startswith("_"))))


def _shapes(values: Sequence) -> list:
    return values.shapes() if isinstance(values, _Values) else [v.shape for v in values]


class _Spill:
    """Keeps the stream's activations in memory up to ``limit`` bytes (None: no limit); beyond it,
    each further batch value goes to a file in a temporary directory, read back when it is used
    and deleted when it is dropped. So a calibration holds about ``limit`` bytes of activations
    however much data it is given (plus one batch per live node and the fits' statistics);
    :meth:`close` removes the directory, whatever was left in it."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.held = 0  # bytes of the values kept in memory, live
        self.peak = 0
        self.written = 0  # bytes written to disk in all
        self.files = 0
        self.directory: str | None = None

    def keep(self, value):
        if not isinstance(value, torch.Tensor):
            return value
        size = value.numel() * value.element_size()
        if self.limit is None or self.held + size <= self.limit:
            self.held += size
            self.peak = max(self.peak, self.held)
            return value
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="dsrewrite-calibration-")
        self.files += 1
        try:
            handle = _OnDisk(os.path.join(self.directory, f"{self.files}.pt"), value)
        except (OSError, RuntimeError) as e:  # a full disk: torch.save raises either
            from .errors import UsageError
            from .units import format_bytes

            # only a limit spills, so ``self.limit`` is a size here
            raise UsageError(f"calibration could not write its activations beyond the memory limit "
                             f"({format_bytes(self.limit)}) to {self.directory} after {format_bytes(self.written)}: "
                             f"{e}; free "
                             f"space there, point TMPDIR elsewhere, or raise --calibration-memory") from e
        self.written += size
        return handle

    def release(self, values) -> None:
        """``values`` (a node's, per batch) are dropped by the stream: they no longer count."""
        if isinstance(values, _Values) and values.counted:
            for v in list.__iter__(values):
                if isinstance(v, torch.Tensor):
                    self.held -= v.numel() * v.element_size()

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "_Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Offsets:
    """The residual operand of a gate, in the original and in the converted model, per batch.

    The converted model has the original's module names (blocks are swapped in place), so
    the original's fx graph run over the converted model's modules computes the converted
    model; an interpreter stops as soon as the operand is known.
    """

    def __init__(self, original: nn.Module, converted: nn.Module, graph: torch.fx.Graph):
        self.models = [torch.fx.GraphModule(original, copy.deepcopy(graph)),
                       torch.fx.GraphModule(converted, copy.deepcopy(graph))]

    def __call__(self, x: torch.Tensor, node: str) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(_run_until(gm, x, node) for gm in self.models)


def _run_until(gm: torch.fx.GraphModule, x: torch.Tensor, name: str) -> torch.Tensor:
    class Until(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name == name:
                raise _Found(out)
            return out

    try:
        Until(gm).run(x)
    except _Found as found:
        return found.value
    raise RuntimeError(f"node {name} did not run")


class _Found(Exception):
    def __init__(self, value):
        super().__init__()
        self.value = value


def _flat(t: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[B, C, H, W] as rows [positions, C] in float64 (only the positions ``keep``, when given)."""
    if keep is not None:
        spots = t.shape[2] * t.shape[3]
        return t.flatten(2)[keep // spots, :, keep % spots].double()
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()


def _gated(targets: torch.Tensor, prediction: torch.Tensor | None, gate: Gate,
           offsets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Targets [positions, C_out] for a least-squares round behind a :class:`Gate`.

    In the ReLU's input space (BN output plus the residual operand: the original's ``r``,
    the converted model's ``r̂`` from ``offsets``), the target is the original's value, so
    the conv also makes up the shortcut's error; with a ``prediction`` (later rounds), where
    the original is cut off (≤ 0) the target becomes ``min(prediction, 0)`` (no error for a
    prediction the ReLU cuts off too): a quadratic upper bound of the post-ReLU error, so
    each round's least-squares fit lowers the error the ReLU lets through.
    """
    r, r_hat = offsets if offsets is not None else (0.0, 0.0)
    t = targets * gate.scale + gate.shift + r
    if prediction is None:
        wanted = t
    else:
        a = prediction * gate.scale + gate.shift + r_hat
        wanted = torch.where(t > 0, t, torch.clamp(a, max=0.0))
    return (wanted - gate.shift - r_hat) / gate.scale


def _blocks_in_order(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """Names of the replaced blocks (every family), in the order the forward runs them."""
    return _modules_in_order(model, sample,
                             lambda name, m: isinstance(m, (DepthwiseSeparableConv2d,) + FAMILY_BLOCKS))


def _modules_in_order(model: nn.Module, sample: torch.Tensor, pick) -> list[str]:
    """Names of the modules ``pick(name, module)`` selects, in the order the forward first runs them."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name))
               for name, m in model.named_modules() if pick(name, m)]
    _forward_once(model, sample, handles)
    return list(dict.fromkeys(order))


def _forward_once(model: nn.Module, sample: torch.Tensor, handles: list) -> None:
    """One eval-mode, no-grad forward for the given hooks' sake; the hooks are removed after."""
    try:
        with eval_mode(model), torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval BN as the per-channel map ``scale·y + shift`` (float64)."""
    scale = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _capture(model: nn.Module, module: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """Run ``model`` on ``x`` until ``module`` sees its input (``what='input'``) or produces its output."""
    seen: dict[str, torch.Tensor] = {}

    def pre(mod, args):
        if what == "input":
            seen["t"] = args[0]
            raise _Stop

    def post(mod, args, out):
        seen["t"] = out
        raise _Stop

    handle = module.register_forward_pre_hook(pre) if what == "input" else module.register_forward_hook(post)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "t" not in seen:
        raise RuntimeError("the calibrated layer did not run on the calibration data")
    return seen["t"]


def _reset_bn(block: DepthwiseSeparableConv2d, layer: _LayerData):
    """Set the inserted BN from the depthwise outputs on the data; returns its (scale, shift) on z."""
    if not isinstance(block.bn, nn.BatchNorm2d):
        ones = torch.ones(block.mid_channels, dtype=torch.float64)
        return ones, torch.zeros_like(ones)
    mid = block.mid_channels
    lo = torch.full((mid,), float("inf"), dtype=torch.float64)
    hi = torch.full((mid,), float("-inf"), dtype=torch.float64)
    total = torch.zeros(mid, dtype=torch.float64)
    squares = torch.zeros(mid, dtype=torch.float64)
    count = 0
    for inp in layer.inputs:
        z = block.depthwise(inp).transpose(0, 1).reshape(mid, -1).double()
        lo = torch.minimum(lo, z.min(1).values)
        hi = torch.maximum(hi, z.max(1).values)
        total += z.sum(1)
        squares += (z * z).sum(1)
        count += z.shape[1]
    mean = total / count
    var = (squares / count - mean * mean).clamp_min(0)
    dtype = block.depthwise.weight.dtype
    scale, shift = set_linear_range(block, lo.to(dtype), hi.to(dtype), mean.to(dtype), var.to(dtype),
                                    block.activation_name)
    return scale.double(), shift.double()


def _svd_linear(block: DepthwiseSeparableConv2d, conv: nn.Conv2d):
    """The weight-only factors (depthwise [mid, K²], pointwise [C_out, mid], bias [C_out]), float64."""
    depthwise, pointwise, _ = decouple(conv.weight.detach().double(), block.depth_multiplier)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels,
                                                                                 dtype=torch.float64)
    return depthwise.reshape(block.mid_channels, -1), pointwise, bias


def _through_bn(pointwise: torch.Tensor, bias: torch.Tensor, scale, shift) -> torch.Tensor:
    """A linear block's pointwise solution ([mid+1, C_out]) compensated for the BN's map z → scale·z + shift."""
    pointwise = pointwise / scale  # [C_out, mid]
    bias = bias - pointwise @ shift
    return torch.cat([pointwise.T, bias.unsqueeze(0)], 0)


def _joint_fit_fits(block: DepthwiseSeparableConv2d) -> bool:
    taps = block.depthwise.weight[0].numel()
    return block.mid_channels * taps <= MAX_JOINT_UNKNOWNS and block.in_channels * taps < MAX_JOINT_UNKNOWNS


def _fit_jointly(block: DepthwiseSeparableConv2d, layer: _LayerData, linear, ridge: float, iterations: int,
                 channel_weights: torch.Tensor | None = None, gate: Gate | None = None,
                 per_unknown: int | None = None):
    """Alternating least squares for ``y ≈ P·(D ∗ x) + b`` on the data; writes D into the block.

    ``channel_weights`` (per output channel, see :func:`consumer_scales`) weight each output
    channel's squared error; they change the shared depthwise filters, not the pointwise
    half-step (each output channel's row is solved on its own). With a ``gate`` (the BN →
    (residual add →) ReLU behind the conv, :func:`relu_gates`; ``offset(x)`` gives the
    residual operand in ``layer``), the targets are the ReLU's input, and later rounds refit to ReLU-aware
    targets (:func:`_gated`) built from the previous round's fit.

    One pass collects Σ = Σ x̃x̃ᵀ and C = Σ y x̃ᵀ (x̃: input patch with a trailing 1); every
    half-step after that is an exact solve on those matrices, so the error never increases.
    Returns the fitted (depthwise, pointwise, bias) in float64, or None when skipped.
    """
    taps = block.depthwise.weight[0].numel()
    c_in, mid, rank = block.in_channels, block.mid_channels, block.depth_multiplier
    n = c_in * taps + 1
    sigma = torch.zeros(n, n, dtype=torch.float64)
    depthwise, pointwise, bias = (t.clone() for t in linear)
    prior_dw = depthwise.clone()
    owner = torch.arange(mid) // rank  # input channel of each mid channel
    eye_p = torch.eye(mid + 1, dtype=torch.float64)
    w2 = (channel_weights.double() ** 2 if channel_weights is not None
          else torch.ones(block.out_channels, dtype=torch.float64))
    keep = layer.positions(n, per_unknown)
    positions = sum(layer.target_positions())
    if positions < 4 * mid * taps:
        return None  # too few positions to pin the filters down: the SVD filters stand
    rounds = GATED_ROUNDS if gate is not None else 1
    cached = _round_cache(layer, keep, n, rounds)
    for round_ in range(rounds):
        cross = torch.zeros(block.out_channels, n, dtype=torch.float64)
        # the whole linear map, per input patch row: W[c·K² + k, o] = Σ_j P[o, c·r + j] · D[c·r + j, k]
        full = torch.einsum("cjk,ocj->cko", depthwise.reshape(c_in, rank, taps),
                            pointwise.reshape(-1, c_in, rank)).reshape(c_in * taps, -1)
        for i, (inp, y) in enumerate(zip(layer.inputs, layer.targets)):
            heartbeat(f"joint fit round {round_ + 1}: batch {i + 1}/{len(layer.inputs)}")
            rows = cached.get(i) if cached is not None else None
            if rows is None:  # patches with a trailing 1, kept for the later rounds when they fit the budget
                rows = _conv_patches(block.depthwise, inp, keep[i])
                rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
                # a fast fit is approximate anyway: its products in float32, summed per batch in float64
                rows = rows.float() if per_unknown is not None else rows.double()
                if cached is not None:
                    cached[i] = rows
            targets = _flat(y, keep[i])
            if gate is not None:
                prediction = (rows[:, :-1] @ full.to(rows.dtype)).double() + bias if round_ else None
                targets = _gated(targets, prediction, gate, layer.offset(i, keep[i]))
            if round_ == 0:
                sigma += (rows.T @ rows).double()
            cross += (targets.T.to(rows.dtype) @ rows).double()
        # Σ over (input channel, tap) pairs, and C restricted to the (mid channel, tap) pairs the depthwise
        # filters see. Mid channel m = c·r + j reads input channel c, so both half-steps' matrices are
        # products of Σ with D or PᵀWP (:func:`_depthwise_normal`): nothing larger than Σ is formed
        s4 = sigma[:-1, :-1].reshape(c_in, taps, c_in, taps)
        mean = sigma[-1, :-1].reshape(c_in, taps)[owner]  # Σ x̃·1: [mid, K²]
        cross_r = cross[:, :-1].reshape(-1, c_in, taps)[:, owner]  # [C_out, mid, K²]
        for it in range(iterations):
            heartbeat(f"joint fit: alternation {it + 1}/{iterations}")
            # pointwise half-step: features h = D x and a constant 1; Σ_h = D Σ Dᵀ over matching channels
            gram = torch.empty(mid + 1, mid + 1, dtype=torch.float64)
            d4 = depthwise.reshape(c_in, rank, taps)
            gram[:mid, :mid] = torch.einsum("apk,akbq->apbq", d4, _sigma_times(s4, d4)).reshape(mid, mid)
            gram[:mid, mid] = gram[mid, :mid] = (depthwise * mean).sum(1)
            gram[mid, mid] = sigma[-1, -1]
            rhs_p = torch.cat([torch.einsum("mk,omk->mo", depthwise, cross_r), cross[:, -1].unsqueeze(0)], 0)
            damp = ridge * float(gram.diagonal()[:mid].mean().clamp_min(1e-12))
            solution = torch.linalg.solve(gram + damp * eye_p, rhs_p + damp * torch.cat(
                [pointwise.T, bias.unsqueeze(0)], 0))
            pointwise, bias = solution[:mid].T, solution[mid]
            # depthwise half-step: (PᵀWP ⊙ Σ restricted) d = PᵀW(C − b·Σ₁) restricted (W: channel weights²)
            apply, diagonal = _depthwise_normal(s4, pointwise.T @ (w2[:, None] * pointwise), rank)
            rhs = torch.einsum("om,omk->mk", w2[:, None] * pointwise, cross_r - bias[:, None, None] * mean).reshape(-1)
            damp = ridge * float(diagonal.mean().clamp_min(1e-12))
            depthwise = _conjugate_gradient(lambda v: apply(v) + damp * v, diagonal + damp,
                                            rhs + damp * prior_dw.reshape(-1), depthwise.reshape(-1),
                                            CG_STEPS if per_unknown is not None else CG_STEPS_THOROUGH).reshape(mid, taps)
    block.depthwise.weight.copy_(depthwise.reshape(block.depthwise.weight.shape).to(block.depthwise.weight.dtype))
    return depthwise, pointwise, bias


def _refit_pointwise(block: DepthwiseSeparableConv2d, layer: _LayerData, ridge: float, prior: torch.Tensor,
                     gate: Gate | None = None, per_unknown: int | None = None) -> None:
    mid, c_out = block.mid_channels, block.out_channels
    gram = torch.zeros(mid + 1, mid + 1, dtype=torch.float64)
    dtype = block.pointwise.weight.dtype
    solution = prior
    keep = layer.positions(mid + 1, per_unknown)
    rounds = GATED_ROUNDS if gate is not None else 1
    cached = _round_cache(layer, keep, mid + 1, rounds)
    for round_ in range(rounds):
        cross = torch.zeros(mid + 1, c_out, dtype=torch.float64)
        for i, (inp, y) in enumerate(zip(layer.inputs, layer.targets)):
            heartbeat(f"pointwise refit: batch {i + 1}/{len(layer.inputs)}")
            hf = cached.get(i) if cached is not None else None
            if hf is None:  # the pointwise conv's inputs with a trailing 1, kept for the later rounds
                hf = _flat(block.act(block.bn(block.depthwise(inp))), keep[i])
                hf = torch.cat([hf, torch.ones(hf.shape[0], 1, dtype=torch.float64)], 1)
                if cached is not None:
                    cached[i] = hf
            yf = _flat(y, keep[i])
            if gate is not None:
                yf = _gated(yf, hf @ solution if round_ else None, gate, layer.offset(i, keep[i]))
            if round_ == 0:
                gram += hf.T @ hf
            cross += hf.T @ yf
        # Ridge toward the weight-only solution: where the data pin the weights down it has no
        # effect; where they do not (few positions per unknown), the SVD initialization stands.
        damp = ridge * float(gram.diagonal()[:mid].mean().clamp_min(1e-12))
        eye = torch.eye(mid + 1, dtype=torch.float64)
        solution = torch.linalg.solve(gram + damp * eye, cross + damp * prior)  # [mid+1, C_out]
    block.pointwise.weight.copy_(solution[:mid].T.reshape(block.pointwise.weight.shape).to(dtype))
    block.pointwise.bias.copy_(solution[mid].to(dtype))


def _refit_last(block: nn.Module, layer: _LayerData, ridge: float, gate: Gate | None = None,
                per_unknown: int | None = None) -> None:
    """Refit the last conv of a family block (``block.refit``) by least squares (:func:`_refit_conv`);
    its inputs are the block's first convs applied to the block's inputs in ``layer``."""
    last: nn.Conv2d = getattr(block, block.refit)
    _refit_conv(last, layer, ridge, gate, per_unknown,
                None if last is block else (lambda x: _capture(block, last, x, "input")))


def _refit_conv(last: nn.Conv2d, layer: _LayerData, ridge: float, gate: Gate | None = None,
                per_unknown: int | None = None, prefix=None, out_index: torch.Tensor | None = None) -> None:
    """Refit a conv's weights (and bias, if it has one) by least squares, streamed over the batches.

    Its inputs come from ``layer`` (through ``prefix`` when the conv sits inside a block), its
    targets are the original conv's outputs (only the channels ``out_index`` when some were
    removed; behind a ``gate``, ReLU-aware as in :func:`_refit_pointwise`). Every output
    channel is its own least-squares problem on the patches of its group's input channels (a
    grouped conv's groups are solved one by one), so only per-group normal equations are kept:
    (C_in/groups · K² + 1)² each. Ridge pulls toward the current weights.
    """
    groups, c_out = last.groups, last.out_channels
    per_in, per_out = last.in_channels // groups, c_out // groups
    dtype = last.weight.dtype
    n = per_in * math.prod(last.kernel_size) + 1
    bias = last.bias.detach().double() if last.bias is not None else torch.zeros(c_out, dtype=torch.float64)
    # prior per group: [groups, n, per_out] (weights, then the bias row)
    prior = torch.cat([last.weight.detach().double().reshape(groups, per_out, n - 1).transpose(1, 2),
                       bias.reshape(groups, 1, per_out)], 1)
    gram = torch.zeros(groups, n, n, dtype=torch.float64)
    solution = prior
    keep = layer.positions(n, per_unknown)
    # without a bias the constant column stays out of the solve (its row of the solution stays 0)
    fit = slice(None) if last.bias is not None else slice(0, n - 1)
    for round_ in range(GATED_ROUNDS if gate is not None else 1):
        cross = torch.zeros(groups, n, per_out, dtype=torch.float64)
        for i, (block_input, y) in enumerate(zip(layer.inputs, layer.targets)):
            heartbeat(f"least-squares refit: batch {i + 1}/{len(layer.inputs)}")
            inp = block_input if prefix is None else prefix(block_input)
            targets = _flat(y, keep[i])  # [P, C_out]
            if out_index is not None:
                targets = targets[:, out_index]
            if gate is not None:
                prediction = None
                if round_:
                    prediction = torch.cat([torch.bmm(rows, solution[lo:hi]).transpose(0, 1).reshape(
                        -1, (hi - lo) * per_out) for lo, hi, rows in _group_rows(last, inp, n, keep[i])], 1)
                targets = _gated(targets, prediction, gate, layer.offset(i, keep[i]))
            targets = targets.reshape(-1, groups, per_out).transpose(0, 1)  # [groups, P, per_out]
            for lo, hi, rows in _group_rows(last, inp, n, keep[i]):  # [groups in chunk, P, n]
                if round_ == 0:
                    gram[lo:hi] += rows.transpose(1, 2) @ rows
                cross[lo:hi] += rows.transpose(1, 2) @ targets[lo:hi]
        damp = ridge * gram.diagonal(dim1=1, dim2=2)[:, :-1].mean(1).clamp_min(1e-12)  # [groups]
        eye = torch.eye(n, dtype=torch.float64)[fit, fit]
        solution = torch.zeros_like(prior)
        solution[:, fit] = torch.linalg.solve(gram[:, fit, fit] + damp[:, None, None] * eye,
                                              cross[:, fit] + damp[:, None, None] * prior[:, fit])
    with torch.no_grad():
        last.weight.copy_(solution[:, :-1].transpose(1, 2).reshape(last.weight.shape).to(dtype))
        if last.bias is not None:
            last.bias.copy_(solution[:, -1].reshape(-1).to(dtype))


#: float64 patch values materialized at once by :func:`_group_rows` (128 MiB)
PATCH_BUDGET = 2 ** 24


def _round_cache(layer: _LayerData, keep: list, unknowns: int, rounds: int) -> dict[int, torch.Tensor] | None:
    """A per-batch store for the rows a multi-round fit would otherwise rebuild every round, or None
    when there is one round or the rows (``unknowns`` wide) would exceed :data:`PATCH_BUDGET`."""
    used = sum(len(k) if k is not None else n for k, n in zip(keep, layer.target_positions()))
    return {} if rounds > 1 and used * unknowns <= PATCH_BUDGET else None


def _group_rows(conv: nn.Conv2d, x: torch.Tensor, n: int, keep: torch.Tensor | None = None):
    """``(first group, last group + 1, rows)`` chunks of a (grouped) conv's input patches, rows
    ``[groups in chunk, positions, C_in/groups·K² + 1]`` in float64 with a trailing 1, few enough
    groups at a time to stay within :data:`PATCH_BUDGET` values."""
    groups, per_in = conv.groups, conv.in_channels // conv.groups
    positions = len(keep) if keep is not None else _conv_patches(conv, x[:, :per_in]).shape[0]
    step = max(1, min(groups, PATCH_BUDGET // max(positions * n, 1)))
    for lo in range(0, groups, step):
        hi = min(lo + step, groups)
        cols = _conv_patches(conv, x[:, lo * per_in:hi * per_in], keep).double()
        rows = cols.reshape(positions, hi - lo, n - 1).transpose(0, 1)
        yield lo, hi, torch.cat([rows, torch.ones(hi - lo, positions, 1, dtype=torch.float64)], 2)


def _conv_patches(conv: nn.Conv2d, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``conv``'s input patches as rows [positions, C_in·K²] in its weight's (channel, tap) order;
    with ``keep``, only those output positions (flat indices over batch, row, column), gathered
    directly rather than unfolded everywhere."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    if isinstance(conv.padding, str):
        raise ValueError("string padding is resolved to numbers when blocks are built")
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    if keep is not None and 4 * len(keep) < _positions(conv, x):  # a small share: gather just those
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        out_h = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
        out_w = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
        b, spot = keep // (out_h * out_w), keep % (out_h * out_w)
        rows = (spot // out_w * sh)[:, None] + torch.arange(kh)[None] * dh  # [P, kh]
        cols = (spot % out_w * sw)[:, None] + torch.arange(kw)[None] * dw  # [P, kw]
        channels = torch.arange(x.shape[1])
        patches = x[b[:, None, None, None], channels[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
        return patches.reshape(len(keep), -1)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # [B, C·K², L]
    cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return cols if keep is None else cols[keep]


def _positions(conv: nn.Conv2d, padded: torch.Tensor) -> int:
    """Output positions of ``conv`` on an already padded input."""
    spots = [(size - d * (k - 1) - 1) // s + 1 for size, k, s, d in
             zip(padded.shape[2:], conv.kernel_size, conv.stride, conv.dilation)]
    return padded.shape[0] * math.prod(spots)


#: conjugate-gradient steps per depthwise half-step of the joint fit, fast and thorough mode: each half-step is
#: warm-started from the last and every step lowers the error, so the alternation stays monotone with few
#: (benchmarks/results/joint_fit.md: with 10 the held-out error is as low and the joint fit takes half the time)
CG_STEPS, CG_STEPS_THOROUGH = 10, 30


def _sigma_times(s4: torch.Tensor, d4: torch.Tensor) -> torch.Tensor:
    """U[a, k, b, q] = Σ_l Σ[a, k, b, l] · d[b, q, l]: the input second moments ``s4`` [C_in, K², C_in, K²]
    applied to per-mid-channel filters ``d4`` [C_in, r, K²] (mid channel b·r + q reads input channel b)."""
    return torch.einsum("akbl,bql->akbq", s4, d4)


def _depthwise_normal(s4: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[Callable, torch.Tensor]:
    """The depthwise half-step's normal matrix M[(i, k), (j, l)] = A[i, j] · Σ[o(i), k, o(j), l]
    (``a`` = PᵀWP [mid, mid], o(i) = i // r the input channel of mid channel i) as
    ``(v -> M v, diag M)``, not formed for r > 1: a product costs C_in²·K²·r·(K² + r) multiply-adds
    where M has (C_in·r·K²)² entries. At r = 1 M is as large as Σ and a dense product is the
    faster one (about 6× per product at 128 channels), so it is formed."""
    c_in, taps = s4.shape[0], s4.shape[1]
    if rank == 1:
        dense = (a[:, None, :, None] * s4).reshape(c_in * taps, c_in * taps)
        return (lambda v: dense @ v), dense.diagonal()
    a4 = a.reshape(c_in, rank, c_in, rank)
    diagonal = (a.diagonal().reshape(c_in, rank, 1) * torch.einsum("akak->ak", s4).unsqueeze(1)).reshape(-1)

    def apply(v: torch.Tensor) -> torch.Tensor:  # Σ_{b,q} A[a,p,b,q] Σ_l Σ[a,k,b,l] v[b,q,l]
        return torch.einsum("apbq,akbq->apk", a4, _sigma_times(s4, v.reshape(c_in, rank, taps))).reshape(-1)

    return apply, diagonal


def _conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], diagonal: torch.Tensor, b: torch.Tensor,
                        x: torch.Tensor, iterations: int = 30, tolerance: float = 1e-6) -> torch.Tensor:
    """Jacobi-preconditioned CG for the SPD system ``apply(x) = b`` (``diagonal``: the matrix's), warm-started
    at ``x``.

    Every step lowers the quadratic ``½xᵀax − bᵀx`` (the least-squares error), so the
    alternating fit stays monotone; a warm start from the previous half-step needs few steps,
    and each costs one matrix-vector product instead of a cubic factorization.
    """
    inv_diag = 1.0 / diagonal.clamp_min(1e-30)
    r = b - apply(x)
    z = inv_diag * r
    p = z.clone()
    rz = r @ z
    limit = tolerance * float(b.norm())
    for _ in range(iterations):
        if float(r.norm()) <= limit:
            break
        ap = apply(p)
        alpha = rz / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        z = inv_diag * r
        rz_next = r @ z
        p = z + (rz_next / rz) * p
        rz = rz_next
    return x


def agreement(original: nn.Module, converted: nn.Module, data: list[torch.Tensor]) -> dict[str, float]:
    """Relative error, cosine similarity and top-1 agreement of the outputs over the batches."""
    diff_sq = ref_sq = dot = conv_sq = 0.0
    same = total = 0
    with eval_mode(original), eval_mode(converted), torch.no_grad():
        for x in data:
            a, b = original(x).double(), converted(x).double()
            diff_sq += float(((b - a) ** 2).sum())
            ref_sq += float((a * a).sum())
            conv_sq += float((b * b).sum())
            dot += float((a * b).sum())
            if a.dim() == 2:
                same += int((a.argmax(1) == b.argmax(1)).sum())
                total += a.shape[0]
    return {
        "relative_error": (diff_sq / ref_sq) ** 0.5 if ref_sq else 0.0,
        "cosine": dot / ((ref_sq * conv_sq) ** 0.5) if ref_sq and conv_sq else 1.0,
        "top1_agreement": same / total if total else None,
    }
