"""The issue's 40-line prototype, as a baseline: per-input-channel SVD, then a least-squares refit.

Every 3×3 conv with at least ``min_in_channels`` inputs except the first conv is replaced
by depthwise (rank r per input channel, from the SVD of each input channel's C_out × 9
slice) → pointwise 1×1 with bias, nothing in between (no BN, no activation). Then, in
network order, each pointwise conv is refit by least squares on unlabeled images: its
inputs come from the converted model, its targets are the original conv's outputs.
dsrewrite's calibration must beat this on the same trained model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def convert_prototype(model: nn.Module, images: torch.Tensor, rank: int, min_in_channels: int = 16) -> nn.Module:
    model = model.eval()
    out = copy.deepcopy(model).eval()
    convs = [n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1]
    for name in convs[1:]:
        conv = model.get_submodule(name)
        if conv.in_channels < min_in_channels:
            continue
        c_out, c_in = conv.out_channels, conv.in_channels
        u, s, vh = torch.linalg.svd(conv.weight.detach().permute(1, 0, 2, 3).reshape(c_in, c_out, 9),
                                    full_matrices=False)  # per input channel: [C_out, 9] = U S Vh
        root = s[:, :rank].sqrt()
        block = nn.Sequential(
            nn.Conv2d(c_in, c_in * rank, 3, conv.stride, conv.padding, groups=c_in, bias=False),
            nn.Conv2d(c_in * rank, c_out, 1, bias=True))
        block[0].weight.data = (vh[:, :rank] * root[..., None]).reshape(c_in * rank, 1, 3, 3)
        block[1].weight.data = (u[:, :, :rank] * root[:, None]).permute(1, 0, 2).reshape(c_out, c_in * rank, 1, 1)
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, block)
        with torch.no_grad():
            h = block[0](_seen(out, block, images, output=False))
            y = _seen(model, conv, images, output=True)
        h = torch.cat([h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), torch.ones(h.numel() // h.shape[1], 1)], 1)
        solution = torch.linalg.lstsq(h.double(), y.permute(0, 2, 3, 1).reshape(-1, c_out).double()).solution
        block[1].weight.data = solution[:-1].T.float().reshape(c_out, -1, 1, 1)
        block[1].bias.data = solution[-1].float()
    return out


def _seen(model: nn.Module, module: nn.Module, x: torch.Tensor, output: bool) -> torch.Tensor:
    seen = {}

    def hook(m, args, out):  # returns None: the module's output stands
        seen.setdefault("t", out if output else args[0])

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen["t"]
