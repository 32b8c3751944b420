"""Judging planner candidates on calibration data (facts for :mod:`dsrewrite.choose`).

Without data, a candidate block is judged by its weight error ‖W − Ŵ‖² / ‖W‖², as if every
input direction mattered alike. Real activations do not: channels are correlated, some are
nearly dead, neighbouring taps agree. With calibration data the planner judges a candidate
by the error it makes **on the layer's real inputs**:

    error = Σ_o s_o² ‖(W_o − Ŵ_o) · x‖² / Σ_o s_o² ‖W_o · x‖²

over a fixed random sample of the original model's input patches at that layer
(:func:`sample_inputs`, one forward pass of the original over the calibration batches,
memory bounded by the sample, not the data), ``s_o`` the scale of the BN that consumes
output channel o (:func:`~dsrewrite.calibrate.consumer_scales`: an error there is amplified
that much). It is the squared relative output error of the candidate's weight-only
initialization — what the final calibration then starts from and improves on — and it adds
up over layers like the weight errors it replaces.

A channel group's width is judged the same way (:func:`width_errors`): the output error of
each consumer (conv or Linear) after a least-squares refit on the channels it keeps, which is
what :func:`dsrewrite.calibrate.reconstruct` will do to the resized model.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from .trace import eval_mode

#: input patches sampled per layer for judging block candidates (errors of a fixed map: no fit, so
#: a few thousand rows estimate them well whatever the layer's width)
BLOCK_ROWS = 2048
#: rows per unknown for a width's least-squares refit (a fit on fewer rows than unknowns would look
#: better than it is), between WIDTH_ROWS[0] and WIDTH_ROWS[1]
ROWS_PER_UNKNOWN = 4
WIDTH_ROWS = (2048, 16384)


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


def family_data_errors(weight: torch.Tensor, family: str, ranks: list[int], patches: torch.Tensor,
                       scales: torch.Tensor | None = None) -> dict[int, float]:
    """``{rank: squared relative output error}`` of ``family``'s weight-only block at each rank, on
    sampled input ``patches`` [rows, C_in·K²], each output channel weighted by ``scales``² (see the
    module docstring); 0 where the layer's output is 0 on the sample."""
    from .blocks import family_approximations

    w = weight.detach().double().reshape(weight.shape[0], -1)
    p = patches.double()
    weights = scales.double() ** 2 if scales is not None else torch.ones(w.shape[0], dtype=torch.float64)
    reference = float(((p @ w.T).square().sum(0) * weights).sum())
    if reference == 0:
        return {r: 0.0 for r in ranks}
    out = {}
    for r, approx in family_approximations(weight, family, ranks):
        delta = w - approx.reshape(w.shape[0], -1)
        out[r] = float(((p @ delta.T).square().sum(0) * weights).sum()) / reference
    return out


def refit_error(weight: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor, scales: torch.Tensor | None = None,
                bias: bool = True, ridge: float = 1e-6) -> float:
    """Squared relative output error of a linear map ``weight`` [out, D] on ``rows`` [N, D] after a
    least-squares refit that may use only the columns ``keep`` (the inputs a width change leaves):
    ‖X_K Ŵ_Kᵀ − X Wᵀ‖² / ‖X Wᵀ‖², output channels weighted by ``scales``². The rows are split in
    two halves, fit on one and judged on the other, so a fit with many unknowns does not look
    better than it will be on new data. ``bias``: the refit may also move the layer's bias (a
    constant column; it absorbs the mean of what the removed inputs contributed)."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    x = rows.double()
    weights = scales.double() ** 2 if scales is not None else torch.ones(w.shape[0], dtype=torch.float64)
    half = x.shape[0] // 2
    fit, test = x[:half], x[half:]
    y_fit, y_test = fit @ w.T, test @ w.T
    reference = float((y_test.square().sum(0) * weights).sum())
    if reference == 0:
        return 0.0
    if len(keep) == 0:
        return 1.0
    def columns(part):
        kept = part[:, keep]
        return torch.cat([kept, torch.ones(len(part), 1, dtype=torch.float64)], 1) if bias else kept

    a = columns(fit)
    gram = a.T @ a
    damp = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    solved = torch.linalg.solve(gram + damp * torch.eye(a.shape[1], dtype=torch.float64), a.T @ y_fit)
    residual = columns(test) @ solved - y_test
    return float((residual.square().sum(0) * weights).sum()) / reference


def width_rows(unknowns: int) -> int:
    """Rows a width refit of a layer with ``unknowns`` inputs is judged on (both halves together)."""
    return min(max(2 * ROWS_PER_UNKNOWN * unknowns, WIDTH_ROWS[0]), WIDTH_ROWS[1])
