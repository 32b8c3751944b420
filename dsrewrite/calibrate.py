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
   the targets, then each half-step is an exact solve on those small matrices
   (pointwise: (mid+1)²; depthwise: (mid·K²)², the Hadamard product PᵀP ⊙ Σ) — the
   objective never goes up, so it is never worse than refitting the pointwise alone;
4. the inserted BN is reset again for the new filters and the pointwise weights and bias are
   refit by least squares through the actual BN and activation, streamed over the batches:
   only the normal equations (mid+1)² and (mid+1)×C_out are kept, never the activations.

Both fits weight each output channel by the scale of the BN that consumes it (its error is
amplified that much), and where the original conv feeds BN → ReLU they are *ReLU-aware*:
after a plain first round, further rounds refit to targets in which a position the
original's ReLU cuts off asks only to be cut off too (:func:`_gated`), so no capacity is
spent on differences the ReLU throws away.

Every pass stops as soon as the layer of interest has run, so calibrating a block early
in the network costs only the layers before it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import FAMILY_BLOCKS
from .layers import DepthwiseSeparableConv2d, decouple, set_linear_range
from .progress import Progress, heartbeat
from .trace import eval_mode


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


# The joint depthwise fit holds a dense (mid·K²)² system (float64); above this many unknowns
# (512 channels at rank 1 with 3×3 kernels: ~170 MiB) a block gets the pointwise refit only.
MAX_JOINT_UNKNOWNS = 4608


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
              relu_aware: bool = True, progress: bool = False, held_out: float = 0.125) -> CalibrationReport:
    """Refit every replaced block of ``converted`` in place (see the module docstring).

    ``batches`` is a list (or iterable) of input tensors or (inputs, labels) pairs;
    ``ridge`` (relative to the mean diagonal of the normal equations) pulls the solution
    toward the weight-only SVD initialization where the data leave it undetermined.
    ``refit_depthwise`` turns the joint (alternating least squares) fit of the depthwise
    filters on or off; ``iterations`` bounds its alternations. ``relu_aware`` refits a conv
    followed by BN → ReLU to the error the ReLU lets through (:func:`relu_gates`).
    ``held_out`` is the share of the samples kept out of the fit (:func:`split_held_out`);
    the report's fidelity before/after is measured on them, so it is not flattered by the fit.
    """
    data, held = split_held_out(as_batches(batches, max_batches), held_out)
    judge = held or data
    blocks = _blocks_in_order(converted, data[0])
    weights = consumer_scales(original, blocks, data[0])
    gates = relu_gates(original, blocks) if relu_aware else {}
    graph = next((g.graph for g in gates.values() if g.other), None)
    offsets = _Offsets(original, converted, graph) if graph is not None else None
    joint = 0
    with eval_mode(converted), eval_mode(original), torch.no_grad():
        before = agreement(original, converted, judge)
        with Progress("calibrating blocks", len(blocks), enabled=progress) as bar:
            for name in blocks:
                block = converted.get_submodule(name)
                conv = original.get_submodule(name)
                gate = gates.get(name)
                offset = (lambda x, node=gate.other: offsets(x, node)) if gate and gate.other else None
                if not isinstance(block, DepthwiseSeparableConv2d):
                    _refit_last(converted, original, block, conv, data, ridge, gate, offset)
                    bar.advance(name)
                    continue
                linear = _svd_linear(block, conv)
                if refit_depthwise and _joint_fit_fits(block):
                    fitted = _fit_jointly(converted, original, block, conv, data, linear, ridge, iterations,
                                          weights.get(name), gate, offset)
                    if fitted is not None:
                        linear, joint = fitted, joint + 1
                scale, shift = _reset_bn(converted, block, data)
                prior = _through_bn(linear[1], linear[2], scale, shift)
                _refit_pointwise(converted, original, block, conv, data, ridge, prior, gate, offset)
                bar.advance(name)
        after = agreement(original, converted, judge)
    return CalibrationReport(before, after, len(blocks), len(data), sum(x.shape[0] for x in data), joint,
                             sum(x.shape[0] for x in held))


def consumer_scales(model: nn.Module, names: Iterable[str], sample: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per output channel, how much the layer's error is amplified before anything nonlinear sees it.

    For each module in ``names`` whose output goes straight into an eval-mode BatchNorm
    (found by tensor identity on one forward, so it works for any model), that BN's
    ``|γ| / √(running_var + ε)``; modules with another consumer are left out (weight 1).
    Fitting to the BN's output instead of the conv's makes a channel that the BN scales up
    count as much as its error will downstream.
    """
    names = set(names)
    outputs: dict[int, str] = {}
    scales: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if name in names:
            handles.append(m.register_forward_hook(
                lambda mod, args, out, name=name: outputs.__setitem__(id(out), name)))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            def pre(mod, args):
                name = outputs.get(id(args[0]))
                if name is not None and name not in scales:
                    scales[name] = _bn_affine(mod)[0].abs()
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


def relu_gates(model: nn.Module, names: Iterable[str]) -> dict[str, Gate]:
    """A :class:`Gate` for each conv in ``names`` whose output only feeds an eval BN whose output
    only feeds a ReLU (module, ``F.relu``, ``torch.relu`` or ``.relu()``) — directly, or through
    one residual add (``relu(bn(conv(x)) + shortcut)``), found in the fx graph.

    Behind such a gate the error that matters is ``relu(s·ŷ + t + r̂) − relu(s·y + t + r)``:
    where the original is cut off, any prediction that is cut off too is exact, and an error
    that the shortcut ``r̂`` brings from earlier layers is the conv's to compensate. Models
    that fx cannot trace get no gates (plain least squares).
    """
    from .trace import trace

    names = set(names)
    try:
        result = trace(model)
    except Exception:  # noqa: BLE001 - a model fx cannot trace is calibrated without gates
        return {}
    if result.graph is None:
        return {}
    modules = dict(model.named_modules())
    gates = {}
    for node in result.graph.nodes:
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
                                      result.graph if other is not None else None)
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
        return tuple(_flat(_run_until(gm, x, node)) for gm in self.models)


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


def _flat(t: torch.Tensor) -> torch.Tensor:
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
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name))
               for name, m in model.named_modules() if isinstance(m, (DepthwiseSeparableConv2d,) + FAMILY_BLOCKS)]
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


def _reset_bn(converted: nn.Module, block: DepthwiseSeparableConv2d, data: list[torch.Tensor]):
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
    for x in data:
        z = block.depthwise(_capture(converted, block, x, "input")).transpose(0, 1).reshape(mid, -1).double()
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


def _fit_jointly(converted, original, block: DepthwiseSeparableConv2d, conv: nn.Conv2d, data, linear,
                 ridge: float, iterations: int, channel_weights: torch.Tensor | None = None,
                 gate: Gate | None = None, offset=None):
    """Alternating least squares for ``y ≈ P·(D ∗ x) + b`` on the data; writes D into the block.

    ``channel_weights`` (per output channel, see :func:`consumer_scales`) weight each output
    channel's squared error; they change the shared depthwise filters, not the pointwise
    half-step (each output channel's row is solved on its own). With a ``gate`` (the BN →
    (residual add →) ReLU behind the conv, :func:`relu_gates`; ``offset(x)`` gives the
    residual operand), the targets are the ReLU's input, and later rounds refit to ReLU-aware
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
    for round_ in range(GATED_ROUNDS if gate is not None else 1):
        cross = torch.zeros(block.out_channels, n, dtype=torch.float64)
        # the whole linear map, per input patch row: W[c·K² + k, o] = Σ_j P[o, c·r + j] · D[c·r + j, k]
        full = torch.einsum("cjk,ocj->cko", depthwise.reshape(c_in, rank, taps),
                            pointwise.reshape(-1, c_in, rank)).reshape(c_in * taps, -1)
        for i, x in enumerate(data):
            heartbeat(f"joint fit round {round_ + 1}: batch {i + 1}/{len(data)}")
            inp = _capture(converted, block, x, "input")
            y = _capture(original, conv, x, "output")
            rows = _conv_patches(block.depthwise, inp).double()
            if i == 0 and round_ == 0 and rows.shape[0] * len(data) < 4 * mid * taps:
                return None  # too few positions to pin the filters down: the SVD filters stand
            targets = _flat(y)
            if gate is not None:
                targets = _gated(targets, rows @ full + bias if round_ else None, gate, offset and offset(x))
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=torch.float64)], 1)
            if round_ == 0:
                sigma += rows.T @ rows
            cross += targets.T @ rows
        # Σ and C restricted to the (mid channel, tap) pairs the depthwise filters see; the block
        # structure of D means nothing larger than (mid·K²)² is ever formed
        patch = sigma[:-1, :-1].reshape(c_in, taps, c_in, taps)[owner][:, :, owner]  # [mid, K², mid, K²]
        mean = sigma[-1, :-1].reshape(c_in, taps)[owner]  # Σ x̃·1: [mid, K²]
        cross_r = cross[:, :-1].reshape(-1, c_in, taps)[:, owner]  # [C_out, mid, K²]
        for it in range(iterations):
            heartbeat(f"joint fit: alternation {it + 1}/{iterations}")
            # pointwise half-step: features h = D x and a constant 1
            gram = torch.empty(mid + 1, mid + 1, dtype=torch.float64)
            gram[:mid, :mid] = torch.einsum("ik,ikj->ij", depthwise, torch.einsum("ikjl,jl->ikj", patch, depthwise))
            gram[:mid, mid] = gram[mid, :mid] = (depthwise * mean).sum(1)
            gram[mid, mid] = sigma[-1, -1]
            rhs_p = torch.cat([torch.einsum("mk,omk->mo", depthwise, cross_r), cross[:, -1].unsqueeze(0)], 0)
            damp = ridge * float(gram.diagonal()[:mid].mean().clamp_min(1e-12))
            solution = torch.linalg.solve(gram + damp * eye_p, rhs_p + damp * torch.cat(
                [pointwise.T, bias.unsqueeze(0)], 0))
            pointwise, bias = solution[:mid].T, solution[mid]
            # depthwise half-step: (PᵀWP ⊙ Σ restricted) d = PᵀW(C − b·Σ₁) restricted (W: channel weights²)
            system = ((pointwise.T @ (w2[:, None] * pointwise))[:, None, :, None] * patch).reshape(
                mid * taps, mid * taps)
            rhs = torch.einsum("om,omk->mk", w2[:, None] * pointwise, cross_r - bias[:, None, None] * mean).reshape(-1)
            damp = ridge * float(system.diagonal().mean().clamp_min(1e-12))
            system.diagonal().add_(damp)
            depthwise = _conjugate_gradient(system, rhs + damp * prior_dw.reshape(-1),
                                            depthwise.reshape(-1)).reshape(mid, taps)
    block.depthwise.weight.copy_(depthwise.reshape(block.depthwise.weight.shape).to(block.depthwise.weight.dtype))
    return depthwise, pointwise, bias


def _refit_pointwise(converted, original, block: DepthwiseSeparableConv2d, conv: nn.Conv2d,
                     data: list[torch.Tensor], ridge: float, prior: torch.Tensor, gate: Gate | None = None,
                     offset=None) -> None:
    mid, c_out = block.mid_channels, block.out_channels
    gram = torch.zeros(mid + 1, mid + 1, dtype=torch.float64)
    dtype = block.pointwise.weight.dtype
    solution = prior
    for round_ in range(GATED_ROUNDS if gate is not None else 1):
        cross = torch.zeros(mid + 1, c_out, dtype=torch.float64)
        for i, x in enumerate(data):
            heartbeat(f"pointwise refit: batch {i + 1}/{len(data)}")
            h = block.act(block.bn(block.depthwise(_capture(converted, block, x, "input"))))
            y = _capture(original, conv, x, "output")
            hf = torch.cat([h.permute(0, 2, 3, 1).reshape(-1, mid), torch.ones(h.numel() // mid, 1)], 1).double()
            yf = _flat(y)
            if gate is not None:
                yf = _gated(yf, hf @ solution if round_ else None, gate, offset and offset(x))
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


def _refit_last(converted, original, block: nn.Module, conv: nn.Conv2d, data: list[torch.Tensor], ridge: float,
                gate: Gate | None = None, offset=None) -> None:
    """Refit the last conv of a family block (``block.refit``) by least squares, streamed over the batches.

    Its inputs come from the converted model, its targets are the original conv's outputs
    (behind a ``gate``, ReLU-aware as in :func:`_refit_pointwise`). Every output channel is
    its own least-squares problem on the patches of its group's input channels (a grouped
    conv's groups are solved one by one), so only per-group normal equations are kept:
    (C_in/groups · K² + 1)² each. Ridge pulls toward the weight-only initialization.
    """
    last: nn.Conv2d = getattr(block, block.refit)
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
    for round_ in range(GATED_ROUNDS if gate is not None else 1):
        cross = torch.zeros(groups, n, per_out, dtype=torch.float64)
        for i, x in enumerate(data):
            heartbeat(f"{block.refit} refit: batch {i + 1}/{len(data)}")
            inp = _capture(converted, last, x, "input")
            targets = _flat(_capture(original, conv, x, "output"))  # [P, C_out]
            if gate is not None:
                prediction = None
                if round_:
                    prediction = torch.cat([torch.bmm(rows, solution[lo:hi]).transpose(0, 1).reshape(
                        -1, (hi - lo) * per_out) for lo, hi, rows in _group_rows(last, inp, n)], 1)
                targets = _gated(targets, prediction, gate, offset and offset(x))
            targets = targets.reshape(-1, groups, per_out).transpose(0, 1)  # [groups, P, per_out]
            for lo, hi, rows in _group_rows(last, inp, n):  # [groups in chunk, P, n]
                if round_ == 0:
                    gram[lo:hi] += rows.transpose(1, 2) @ rows
                cross[lo:hi] += rows.transpose(1, 2) @ targets[lo:hi]
        damp = ridge * gram.diagonal(dim1=1, dim2=2)[:, :-1].mean(1).clamp_min(1e-12)  # [groups]
        eye = torch.eye(n, dtype=torch.float64)
        solution = torch.linalg.solve(gram + damp[:, None, None] * eye, cross + damp[:, None, None] * prior)
    with torch.no_grad():
        last.weight.copy_(solution[:, :-1].transpose(1, 2).reshape(last.weight.shape).to(dtype))
        if last.bias is not None:
            last.bias.copy_(solution[:, -1].reshape(-1).to(dtype))


#: float64 patch values materialized at once by :func:`_group_rows` (128 MiB)
PATCH_BUDGET = 2 ** 24


def _group_rows(conv: nn.Conv2d, x: torch.Tensor, n: int):
    """``(first group, last group + 1, rows)`` chunks of a (grouped) conv's input patches, rows
    ``[groups in chunk, positions, C_in/groups·K² + 1]`` in float64 with a trailing 1, few enough
    groups at a time to stay within :data:`PATCH_BUDGET` values."""
    groups, per_in = conv.groups, conv.in_channels // conv.groups
    positions = _conv_patches(conv, x[:, :per_in]).shape[0]
    step = max(1, min(groups, PATCH_BUDGET // max(positions * n, 1)))
    for lo in range(0, groups, step):
        hi = min(lo + step, groups)
        cols = _conv_patches(conv, x[:, lo * per_in:hi * per_in]).double()
        rows = cols.reshape(positions, hi - lo, n - 1).transpose(0, 1)
        yield lo, hi, torch.cat([rows, torch.ones(hi - lo, positions, 1, dtype=torch.float64)], 2)


def _conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv``'s input patches as rows [positions, C_in·K²] in its weight's (channel, tap) order."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    if isinstance(conv.padding, str):
        raise ValueError("string padding is resolved to numbers when blocks are built")
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # [B, C·K², L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _conjugate_gradient(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, iterations: int = 30,
                        tolerance: float = 1e-6) -> torch.Tensor:
    """Jacobi-preconditioned CG for the SPD system ``a x = b``, warm-started at ``x``.

    Every step lowers the quadratic ``½xᵀax − bᵀx`` (the least-squares error), so the
    alternating fit stays monotone; a warm start from the previous half-step needs few steps,
    and each costs one matrix-vector product instead of a cubic factorization.
    """
    inv_diag = 1.0 / a.diagonal().clamp_min(1e-30)
    r = b - a @ x
    z = inv_diag * r
    p = z.clone()
    rz = r @ z
    limit = tolerance * float(b.norm())
    for _ in range(iterations):
        if float(r.norm()) <= limit:
            break
        ap = a @ p
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
