"""Stage 5, rewrite: execute a :class:`~dsrewrite.plan.ConversionPlan` on a copy of the model.

In a fixed order, and nothing but what the plan says:

1. each replaced conv module is swapped, under its own qualified name, for its planned
   block: a :class:`~dsrewrite.layers.DepthwiseSeparableConv2d` of the planned depth
   multiplier, BN and activation, or another family's block (:mod:`dsrewrite.blocks`) at
   the planned rank, initialized from its weights. The traced graph calls modules by
   those names (``call_module`` targets), so swapping the module rewrites every call site
   at once, and it works the same for models torch.fx cannot trace;
2. with calibration data, every block is refit on it (:func:`dsrewrite.calibrate`);
3. the planned channel resize (alignment / width) is applied to the result's channel
   groups, found again by key (:meth:`~dsrewrite.channels.ChannelGraph.key`);
4. with calibration data and channels removed, every conv and Linear that lost input channels
   is refit by least squares to the original layer's output (:func:`dsrewrite.calibrate.reconstruct`).

The result is the user's own model class, with its methods and ``state_dict`` layout
intact apart from the changed layers. The user's model is never touched: only the copy is.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .blocks import FAMILIES, numeric_padding, relative_error
from .calibrate import MEMORY_LIMIT
from .errors import InputError
from .layers import DepthwiseSeparableConv2d
from .plan import ConversionPlan


@dataclasses.dataclass
class RewriteResult:
    """The rewritten copy and per-module facts about the replacement."""

    model: nn.Module
    #: conv module name -> fraction of ‖W‖² the SVD truncation keeps.
    kept_energy: dict[str, float]
    #: fidelity before/after calibration (:meth:`~dsrewrite.calibrate.CalibrationReport.to_dict`), or None
    calibration: dict | None = None
    #: the refit of layers that lost input channels to a width resize
    #: (:meth:`~dsrewrite.calibrate.ReconstructionReport.to_dict`), or None
    reconstruction: dict | None = None


def real_inputs(inputs: tuple, seed: int = 0) -> tuple:
    """Concrete tensors for the example inputs: meta tensors become seeded N(0, 1) samples."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_meta:
            if x.is_floating_point():
                x = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype)
            else:
                x = torch.zeros(x.shape, dtype=x.dtype)
        out.append(x)
    return tuple(out)


def apply_plan(model: nn.Module, plan: ConversionPlan, inputs: tuple, calibration: list | None = None,
               progress=None, thorough: bool = False, memory: int | None = MEMORY_LIMIT) -> RewriteResult:
    """A copy of ``model`` with ``plan`` executed on it (see the module docstring); ``model`` is not touched.

    ``inputs`` are real example tensors (:func:`real_inputs`): they place each inserted BN in
    its activation's linear range. ``calibration`` is a list of input batches, or None;
    ``thorough`` fits them on every position and ``memory`` bounds the activations calibration keeps
    in memory, bytes (None: no bound; :func:`~dsrewrite.calibrate.calibrate`).
    """
    say = progress or (lambda message: None)
    say(f"rewriting {len(plan.modules_to_replace)} conv module(s) ...")
    result = _swap_blocks(model, plan, inputs)
    if calibration and plan.modules_to_replace:
        from .calibrate import calibrate

        say(f"calibrating on {sum(x.shape[0] for x in calibration)} samples ...")
        result.calibration = calibrate(result.model, model, calibration, progress=progress is not None,
                                       thorough=thorough, memory=memory).to_dict()
    if plan.resize is not None and plan.resize.changed:
        from .resize import apply_resize, kept_positions

        say(f"resizing {len(plan.resize.changed)} channel group(s) ...")
        channels = _channel_graph(result.model, inputs)
        positions = kept_positions(channels, plan.resize) if calibration and not plan.resize.exact else None
        apply_resize(result.model, channels, plan.resize)
        if positions:
            from .calibrate import reconstruct

            say(f"refitting the layers that lost input channels on {sum(x.shape[0] for x in calibration)} samples ...")
            result.reconstruction = reconstruct(result.model, model, calibration, positions, thorough=thorough,
                                                progress=progress is not None, memory=memory).to_dict()
    return result


def _swap_blocks(model: nn.Module, plan: ConversionPlan, inputs: tuple) -> RewriteResult:
    targets = plan.modules_to_replace
    new = copy.deepcopy(model)
    if not targets:
        return RewriteResult(new, {})
    needs_sample = any(d.bn or d.activation != "none" for d in targets.values())
    samples = _conv_inputs(model, list(targets), inputs) if needs_sample else {}
    energy = {}
    for name, decision in targets.items():
        conv = new.get_submodule(name)
        if not isinstance(conv, nn.Conv2d):
            raise InputError(f"cannot replace {name}: it is a {type(conv).__name__}, not an nn.Conv2d")
        conv = plain_conv(conv, decision.block_padding)
        if (decision.family or "separable") == "separable":
            block = DepthwiseSeparableConv2d.from_conv(conv, decision.depth_multiplier, decision.bn,
                                                       decision.activation, samples.get(name))
            energy[name] = block.kept_energy
            del block.kept_energy
        else:  # the other families are linear chains: kept energy is 1 − (relative weight error)²
            block = FAMILIES[decision.family].build(conv, decision.rank)
            energy[name] = 1.0 - relative_error(conv.weight.detach(), block.dense_weight()) ** 2
        block.train(conv.training)
        _set_submodule(new, name, block)
    return RewriteResult(new, energy)


def skeleton(model: nn.Module, plan: ConversionPlan) -> nn.Module:
    """A copy of ``model`` with each planned block in place, randomly initialized, and the plan's
    channel groups resized: what the plan's result runs like, for timing only (weights do not
    change speed; no factorization or refit is computed)."""
    new = copy.deepcopy(model)
    for name, d in plan.modules_to_replace.items():
        conv = plain_conv(new.get_submodule(name), d.block_padding)
        geometry = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, numeric_padding(conv),
                    conv.dilation)
        if (d.family or "separable") == "separable":
            block = DepthwiseSeparableConv2d(*geometry, d.depth_multiplier, d.bn, d.activation, bias=True)
        else:
            block = FAMILIES[d.family].make(*geometry, d.rank)
        _set_submodule(new, name, block.to(device=conv.weight.device, dtype=conv.weight.dtype))
    if plan.resize is not None and plan.resize.changed:
        from .resize import apply_resize

        meta = tuple(torch.empty(shape, device="meta") for shape in plan.input_shapes)
        apply_resize(new, _channel_graph(new, meta), plan.resize)
    return new


def _channel_graph(model: nn.Module, inputs: tuple):
    """``model``'s own channel graph (traced on meta copies of ``inputs``): what a resize is applied through."""
    from .channels import model_channel_graph
    from .profile import profile
    from .trace import trace

    meta = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
    traced = trace(model, inputs=meta)
    profile(traced, meta)
    return model_channel_graph(traced, meta)


def plain_conv(conv: nn.Conv2d, padding: tuple[int, ...] | None) -> nn.Conv2d:
    """``conv`` itself, or, for a conv module that pads its own input (``padding`` given), a plain
    ``nn.Conv2d`` sharing its weights with that padding: what its replacement block is built from."""
    if padding is None:
        return conv
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, tuple(padding),
                      conv.dilation, conv.groups, bias=conv.bias is not None, device="meta")
    plain.weight, plain.bias = conv.weight, conv.bias
    plain.train(conv.training)
    return plain


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def _conv_inputs(model: nn.Module, names: list[str], inputs: tuple) -> dict[str, torch.Tensor]:
    """What each named conv receives (its first call) on the example inputs, in eval mode."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(mod, args, name=name):
            if name not in seen:
                seen[name] = args[0].detach()
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        run_eval(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def run_eval(model: nn.Module, inputs: tuple):
    """Run ``model`` once in eval mode without gradients, restoring its train/eval flags."""
    from .trace import eval_mode

    with eval_mode(model), torch.no_grad():
        try:
            return model(*inputs)
        except Exception as e:
            raise InputError(f"the model fails on the example inputs: {type(e).__name__}: {e}") from e


def fidelity(original: nn.Module, converted: nn.Module, inputs: tuple) -> dict[str, float]:
    """How close the converted model's outputs are to the original's on ``inputs``.

    ``relative_error`` = ‖y' − y‖ / ‖y‖ over all output elements; ``cosine`` their cosine
    similarity; ``max_abs_error`` the largest elementwise difference.
    """
    a = _flat(run_eval(original, inputs))
    b = _flat(run_eval(converted, inputs))
    if a.numel() == 0:
        return {"relative_error": 0.0, "cosine": 1.0, "max_abs_error": 0.0}
    diff = (b - a).double()
    norm = a.double().norm()
    rel = float(diff.norm() / norm) if norm > 0 else float(diff.norm())
    cos = float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))
    return {"relative_error": rel, "cosine": cos, "max_abs_error": float(diff.abs().max())}


def _flat(out) -> torch.Tensor:
    tensors = [t.reshape(-1).float() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return torch.cat(tensors) if tensors else torch.zeros(0)
