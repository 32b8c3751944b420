"""Judging planner candidates on calibration data (facts for :mod:`dsrewrite.choose`).

Without data, a candidate block is judged by its weight error ‖W − Ŵ‖² / ‖W‖², as if every
input direction mattered alike. Real activations do not: channels are correlated, some are
nearly dead, neighbouring taps agree. With calibration data the planner judges
a candidate by the error it makes **on the layer's real inputs, after the least-squares refit of
its last conv** that calibration will give it (:func:`family_refit_errors`):

    error = Σ_o s_o² ‖ŷ_o − W_o·x‖² / Σ_o s_o² ‖W_o·x‖²

over a fixed random sample of the original model's input patches at that layer
(:func:`sample_inputs`, one forward pass of the original over the calibration batches,
memory bounded by the sample, not the data), ``ŷ`` the refit block's output, fit on one half
of the sample and judged on the other, and ``s_o`` the scale of the BN that consumes output
channel o (:func:`~dsrewrite.calibrate.consumer_scales`: an error there is amplified that
much). Errors add up over layers like the weight errors they replace.

A channel group's width is judged the same way (:func:`width_errors`): the output error of
each consumer (conv or Linear) after a least-squares refit on the channels it keeps, which is
what :func:`dsrewrite.calibrate.reconstruct` will do to the resized model.

Errors of different layers do not cost alike: :func:`output_sensitivity` measures, per layer,
how much of a relative error made there reaches the model's output, and the planner weights
each layer's error by it, so the sum over a plan's layers estimates the model's output error.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .trace import eval_mode

#: input patches sampled per layer for judging block candidates: twice the patch size, within these
#: bounds and within BLOCK_VALUES values per layer
BLOCK_ROWS = (2048, 8192)
BLOCK_VALUES = 16 * 2 ** 20
#: rows per unknown for a width's least-squares refit (a fit on fewer rows than unknowns would look
#: better than it is), between WIDTH_ROWS[0] and WIDTH_ROWS[1]
ROWS_PER_UNKNOWN = 4
WIDTH_ROWS = (2048, 16384)
#: ... and within this many values per layer (a wide 3×3 consumer is judged on fewer rows, pessimistically)
WIDTH_VALUES = 8 * 2 ** 20


def sample_inputs(model: nn.Module, rows: dict[str, int], batches: Iterable[torch.Tensor],
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """``module -> [rows, C_in·K²]`` (conv: input patches in the weight's order) or ``[rows, in_features]``
    (Linear): a fixed random sample of what each named module of ``model`` sees on ``batches``.
    Convs with string padding ("same") are left out (their patches are not gathered here).

    One eval-mode, no-grad forward per batch; each batch contributes its share of each
    module's rows (by its number of samples), drawn uniformly over its output positions (a module called at several
    sites contributes from each).
    """
    from .calibrate import _conv_patches

    batches = list(batches)
    generator = torch.Generator().manual_seed(seed)
    taken: dict[str, list[torch.Tensor]] = {name: [] for name in rows}
    total = sum(x.shape[0] for x in batches) or 1
    share: dict[str, int] = {}

    def hook(module, args, name):
        x = args[0].detach()
        if isinstance(module, nn.Linear):
            flat = x.reshape(-1, x.shape[-1])
            pick = torch.randperm(flat.shape[0], generator=generator)[:share[name]]
            taken[name].append(flat[pick].float())
            return
        out_hw = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
                  zip(x.shape[2:], module.kernel_size, module.stride, module.padding, module.dilation)]
        positions = x.shape[0] * math.prod(out_hw)
        pick = torch.randperm(positions, generator=generator)[:share[name]].sort().values
        taken[name].append(_conv_patches(module, x, pick).float())

    modules = {name: model.get_submodule(name) for name in rows}
    handles = [m.register_forward_pre_hook(lambda mod, a, name=name: hook(mod, a, name))
               for name, m in modules.items() if not isinstance(getattr(m, "padding", 0), str)]
    try:
        with eval_mode(model), torch.no_grad():
            for x in batches:  # each batch gives its share of the rows, by its number of samples
                share.update({name: -(-n * x.shape[0] // total) for name, n in rows.items()})
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(parts)[:rows[name]] for name, parts in taken.items() if parts}


def family_refit_errors(conv: nn.Conv2d, family: str, ranks: list[int], patches: torch.Tensor,
                        scales: torch.Tensor | None = None, held_out: bool = True) -> dict[int, float]:
    """``{rank: squared relative output error}`` of ``family``'s block at each rank after the least-squares
    refit of its last conv (what calibration does to it), on sampled input ``patches`` [rows, C_in·K²].

    Every family's block reads one K×K input patch per output position, and what its last conv
    sees there is a linear function of that patch: the block's first convs run on each patch as a
    K×K image (stride 1, no padding: the patch already holds the strided, dilated, zero-padded
    taps) give exactly the last conv's inputs, so the refit is an ordinary least-squares problem
    on the sampled rows (a bias column included; per output channel for the grouped last conv of
    pointwise-first). ``held_out``: fit on half of the rows, judge on the other half.
    """
    from .blocks import ESTIMATE_BUDGET, ESTIMATE_SWEEPS, FAMILIES, InvertedResidualConv2d

    kh, kw = conv.kernel_size
    w = conv.weight.detach().double().reshape(conv.out_channels, -1)
    x = patches.double()
    y = x @ w.T
    images = x.reshape(-1, conv.in_channels, kh, kw)
    out = {}
    for r in ranks:
        if family in ("inverted-residual", "mbconv"):  # the planner's CP fit: the estimate's sweeps and budget, as family_errors
            # (mbconv's SE gate starts as the identity: the same block up to its last conv)
            block = InvertedResidualConv2d.from_conv(conv, r, sweeps=ESTIMATE_SWEEPS, budget=ESTIMATE_BUDGET)
        else:
            block = FAMILIES[family].build(conv, r)
        out[r] = _held_out_fit(_last_inputs(block, family, images), y, scales, True, held_out)
    return out


def _last_inputs(block: nn.Module, family: str, images: torch.Tensor) -> torch.Tensor:
    """What ``block``'s last conv reads at one output position, per patch image [N, C_in, K, K]:
    [N, features], or [N, C_out, features] for a grouped last conv (pointwise-first)."""
    def conv(x, layer, groups=1):
        bias = layer.bias.detach().double() if layer.bias is not None else None
        return F.conv2d(x, layer.weight.detach().double(), bias, groups=groups)

    n = images.shape[0]
    if family == "separable":
        return conv(images, block.depthwise, block.in_channels).reshape(n, -1)
    if family == "bottleneck":
        return conv(conv(images, block.reduce), block.core).reshape(n, -1)
    if family in ("inverted-residual", "mbconv"):  # mbconv: its gate starts as the identity
        return conv(conv(images, block.expand), block.depthwise, block.rank).reshape(n, -1)
    if family == "spatial":  # K_h×1 over the patch: one row of K_w positions, as the 1×K_w conv reads them
        return conv(images, block.vertical).reshape(n, -1)
    if family == "pointwise-first":
        return conv(images, block.pointwise).reshape(n, block.out_channels, -1)
    raise ValueError(f"unknown block family {family!r}")


def _held_out_fit(z: torch.Tensor, y: torch.Tensor, scales: torch.Tensor | None, bias: bool, held_out: bool,
                  ridge: float = 1e-6) -> float:
    """Squared relative error ‖Z·A − Y‖² / ‖Y‖² of the least-squares A, fit on the first half of the rows and
    judged on the second (``held_out``; else both on all rows); ``z`` [N, q] shared by every output, or
    [N, C_out, q] one problem per output channel; output channels weighted by ``scales``²."""
    weights = scales.double() ** 2 if scales is not None else torch.ones(y.shape[1], dtype=torch.float64)
    if bias:
        ones = torch.ones(*z.shape[:-1], 1, dtype=torch.float64)
        z = torch.cat([z, ones], -1)
    half = z.shape[0] // 2 if held_out else z.shape[0]
    fit, test = (slice(0, half), slice(half, None)) if held_out else (slice(None), slice(None))
    reference = float((y[test].square().sum(0) * weights).sum())
    if reference == 0:
        return 0.0
    if z.shape[-1] == 0:
        return 1.0
    eye = torch.eye(z.shape[-1], dtype=torch.float64)
    if z.dim() == 2:
        gram = z[fit].T @ z[fit]
        damp = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
        predicted = z[test] @ torch.linalg.solve(gram + damp * eye, z[fit].T @ y[fit])
    else:
        gram = torch.einsum("noa,nob->oab", z[fit], z[fit])
        damp = ridge * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
        coef = torch.linalg.solve(gram + damp[:, None, None] * eye, torch.einsum("noa,no->oa", z[fit], y[fit]))
        predicted = torch.einsum("noa,oa->no", z[test], coef)
    return float(((predicted - y[test]).square().sum(0) * weights).sum()) / reference


def refit_error(weight: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor, scales: torch.Tensor | None = None,
                bias: bool = True, held_out: bool = True) -> float:
    """Squared relative output error of a linear map ``weight`` [out, D] on ``rows`` [N, D] after a
    least-squares refit that may use only the columns ``keep`` (the inputs a width change leaves):
    ‖X_K Ŵ_Kᵀ − X Wᵀ‖² / ‖X Wᵀ‖², output channels weighted by ``scales``². ``held_out``: fit on half
    of the rows, judged on the other half, so that a fit with many unknowns does not look better
    than it will be on new data. ``bias``: the refit may also move the layer's bias (a constant
    column; it absorbs the mean of what the removed inputs contributed)."""
    x = rows.double()
    y = x @ weight.detach().double().reshape(weight.shape[0], -1).T
    return _held_out_fit(x[:, keep], y, scales, bias, held_out)


def block_rows(patch_size: int) -> int:
    """Rows :func:`sample_inputs` takes for judging a layer's block candidates (patches of ``patch_size`` values)."""
    return max(min(max(2 * patch_size, BLOCK_ROWS[0]), BLOCK_ROWS[1], BLOCK_VALUES // max(patch_size, 1)), 256)


def width_rows(unknowns: int) -> int:
    """Rows a width refit of a layer with ``unknowns`` inputs is judged on (both halves together)."""
    return max(min(max(2 * ROWS_PER_UNKNOWN * unknowns, WIDTH_ROWS[0]), WIDTH_ROWS[1],
                   WIDTH_VALUES // max(unknowns, 1)), 256)


#: relative size of the probe :func:`output_sensitivity` adds to a layer's weight (‖G‖ = ε‖W‖: small enough
#: that the model answers it linearly)
SENSITIVITY_EPSILON = 0.1
#: samples of the calibration data the sensitivities are measured on (the first batches' samples)
SENSITIVITY_SAMPLES = 256
#: random directions probed per layer (one forward pass each): one direction's answer varies 2-3× from seed to seed
SENSITIVITY_PROBES = 2


def output_sensitivity(model: nn.Module, names: Iterable[str], batches: Iterable[torch.Tensor],
                       epsilon: float = SENSITIVITY_EPSILON, samples: int = SENSITIVITY_SAMPLES,
                       probes: int = SENSITIVITY_PROBES, seed: int = 0) -> dict[str, float]:
    """``module -> s``: how much of a relative error at that module's output reaches the model's output.

    A candidate's error is judged where it is made (the layer's own output, relative to it);
    what it costs is its effect on the model's output, and that differs from layer to layer:
    an error in a layer whose output a wide skip path dilutes counts for less than one in the
    layer before the classifier. Measured directly, with an error of the kind a candidate
    makes — a wrong weight applied to the layer's real input: a random Gaussian direction G
    (‖G‖ = ``epsilon``·‖W‖) is added to the conv's or Linear's weight, and ``s`` is the squared
    relative change of the model's outputs ‖ỹ − y‖² / ‖y‖² divided by the squared relative change
    it made at the layer's own output, over the first ``samples`` calibration samples, both
    summed over ``probes`` directions (one forward pass each). The model's own outputs are the
    reference, so any output structure (tensors in tuples or dicts) is compared as a whole. To
    first order, the model's output error of a plan is Σ s·e over its layers' own errors e.
    Modules other than convs and Linears (nothing to probe) get 1.
    """
    from torch.utils._pytree import tree_flatten

    names = list(dict.fromkeys(names))
    sample, taken = [], 0
    for x in batches:
        if taken >= samples:
            break
        sample.append(x[:samples - taken])
        taken += sample[-1].shape[0]
    if not sample or not names:
        return {}
    x = torch.cat(sample)

    def outputs():
        return [t.detach().double() for t in tree_flatten(model(x))[0] if isinstance(t, torch.Tensor)
                and t.is_floating_point()]

    generator = torch.Generator().manual_seed(seed)
    local = [0.0, 0.0]  # ‖δ‖², ‖y‖² at the probed layer

    def probe(module, args, out, direction):
        if isinstance(module, nn.Linear):
            delta = F.linear(args[0], direction)
        else:
            delta = module._conv_forward(args[0], direction, None)  # its padding mode, stride, groups
        local[0] += float(delta.double().square().sum())
        local[1] += float(out.double().square().sum())
        return out + delta

    out: dict[str, float] = {}
    with eval_mode(model), torch.no_grad():
        reference = outputs()
        energy = sum(float(t.square().sum()) for t in reference)
        for name in names:
            module = model.get_submodule(name)
            if energy == 0 or not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or \
                    isinstance(module, nn.modules.conv._ConvTransposeNd):
                out[name] = 1.0  # nothing to measure against, or no weight to probe: unweighted
                continue
            weight = module.weight.detach()
            made = reached = 0.0
            for _ in range(probes):
                g = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
                direction = (g * (epsilon * float(weight.double().norm()) / float(g.norm()))).to(weight)
                local[0] = local[1] = 0.0
                handle = module.register_forward_hook(lambda m, a, o, d=direction: probe(m, a, o, d))
                try:
                    changed = outputs()
                finally:
                    handle.remove()
                made += local[0] / local[1] if local[1] > 0 else 0.0
                reached += sum(float((a - b).square().sum()) for a, b in zip(changed, reference)) / energy
            out[name] = reached / made if made > 0 else 1.0
    return out
