"""The replacement block: a readable depthwise-separable convolution.

``DepthwiseSeparableConv2d`` is depthwise K×K (groups = in_channels, ``depth_multiplier``
filters per input channel) → optional BatchNorm → optional activation → pointwise 1×1.
``from_conv`` initializes it from a trained ``nn.Conv2d`` instead of from random weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "none": None}


class DepthwiseSeparableConv2d(nn.Module):
    """Depthwise K×K conv, BN, activation, pointwise 1×1 conv.

    ``mid_channels = in_channels × depth_multiplier``. Stride, padding, dilation and
    padding mode of the depthwise conv are those of the conv it replaces, so the output
    shape is the same.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        depth_multiplier: int = 1,
        bn: bool = True,
        activation: str = "relu",
        bias: bool = False,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.depth_multiplier = depth_multiplier
        self.mid_channels = in_channels * depth_multiplier
        self.activation_name = activation
        self.depthwise = nn.Conv2d(in_channels, self.mid_channels, kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, groups=in_channels, bias=False, padding_mode=padding_mode)
        self.bn = nn.BatchNorm2d(self.mid_channels) if bn else nn.Identity()
        act = ACTIVATIONS[activation]
        self.act = act(inplace=True) if act is not None else nn.Identity()
        self.pointwise = nn.Conv2d(self.mid_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.act(self.bn(self.depthwise(x))))

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        depth_multiplier: int = 1,
        bn: bool = True,
        activation: str = "relu",
        sample_input: torch.Tensor | None = None,
    ) -> "DepthwiseSeparableConv2d":
        """A block initialized from ``conv``'s weights (see :func:`decouple`).

        With ``bn`` or an activation, ``sample_input`` (what ``conv`` sees on example data)
        sets the inserted BN so that the depthwise outputs fall in the activation's linear
        range, and the pointwise weights compensate: the block starts as close to ``conv``
        as it would without the activation.
        """
        if conv.groups != 1 or conv.transposed:
            raise ValueError("from_conv expects a standard conv (groups == 1, not transposed)")
        block = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, depth_multiplier, bn, activation, bias=True, padding_mode=conv.padding_mode)
        block.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            depthwise, pointwise, energy = decouple(conv.weight.detach(), depth_multiplier)
            block.depthwise.weight.copy_(depthwise)
            bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels,
                                                                                          dtype=conv.weight.dtype,
                                                                                          device=conv.weight.device)
            if bn or activation != "none":
                scale, shift = _linear_range(block, sample_input, activation)
                # act(bn(z)) = scale·z + shift on the sample, so P·z = (P/scale)·(scale·z + shift) − (P/scale)·shift
                pointwise = pointwise / scale
                bias = bias - pointwise @ shift
            block.pointwise.weight.copy_(pointwise.reshape(block.pointwise.weight.shape))
            block.pointwise.bias.copy_(bias)
        block.kept_energy = energy
        return block


def decouple(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Split a dense conv weight into depthwise and pointwise weights (Network Decoupling, Guo et al. 2018).

    For input channel ``i`` the slice ``W[:, i]`` (C_out × K²) is approximated by a rank-``rank``
    truncated SVD ``U S Vᵀ``: the depthwise filters of channel ``i`` are ``√S Vᵀ`` and its
    pointwise columns ``U √S``. With ``rank >= min(K², C_out)`` the product is exact.

    Returns ``(depthwise [C_in·rank, 1, kh, kw], pointwise [C_out, C_in·rank], kept_energy)``,
    where kept energy is the fraction of ``‖W‖²`` the truncation keeps.
    """
    c_out, c_in, kh, kw = weight.shape
    u, s, vh = torch.linalg.svd(channel_slices(weight), full_matrices=False)  # u [C_in, C_out, q], s [C_in, q], vh [C_in, q, K²]
    q = s.shape[1]
    r = min(rank, q)
    root = s[:, :r].sqrt()
    depthwise = torch.zeros(c_in, rank, kh * kw, dtype=torch.float64, device=weight.device)
    pointwise = torch.zeros(c_out, c_in, rank, dtype=torch.float64, device=weight.device)
    depthwise[:, :r] = vh[:, :r] * root.unsqueeze(-1)
    pointwise[:, :, :r] = (u[:, :, :r] * root.unsqueeze(1)).permute(1, 0, 2)
    energy = kept_energy(s, r)
    return (depthwise.reshape(c_in * rank, 1, kh, kw).to(weight.dtype),
            pointwise.reshape(c_out, c_in * rank).to(weight.dtype), energy)


def channel_slices(weight: torch.Tensor) -> torch.Tensor:
    """``[C_in, C_out, K²]`` float64: per input channel, the C_out × K² slice that :func:`decouple` factors."""
    c_out, c_in = weight.shape[:2]
    return weight.permute(1, 0, 2, 3).reshape(c_in, c_out, -1).to(torch.float64)


def kept_energy(singular_values: torch.Tensor, rank: int) -> float:
    """Share of ``‖W‖²`` the top-``rank`` components of every slice keep (``singular_values`` [C_in, q])."""
    total = float(singular_values.square().sum())
    return float(singular_values[:, :rank].square().sum()) / total if total > 0 else 1.0


def set_linear_range(block: DepthwiseSeparableConv2d, lo, hi, mean, var, activation: str):
    """Set the inserted BN from per-channel statistics (min, max, mean, var) of the depthwise outputs.

    Returns ``(scale, shift)`` with act(bn(z)) = scale·z + shift inside [lo, hi] (see _linear_range).
    """
    dtype, device = block.depthwise.weight.dtype, block.depthwise.weight.device
    mid = block.mid_channels
    span = (hi - lo).clamp_min(1e-6)
    margin = 0.05 * span  # headroom for inputs a little outside the sample's range
    if activation == "relu6":
        scale = 6.0 / (span + 2 * margin)
        shift = -scale * (lo - margin)
    elif activation == "relu":
        scale = torch.ones(mid, dtype=dtype, device=device)
        shift = (margin - lo).clamp_min(0.0)
    else:
        scale = torch.ones(mid, dtype=dtype, device=device)
        shift = torch.zeros(mid, dtype=dtype, device=device)
    bn = block.bn
    if isinstance(bn, nn.BatchNorm2d):
        std = (var + bn.eps).sqrt()
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(scale * std)
        bn.bias.copy_(shift + scale * mean)
        return scale, shift
    # No BN: the activation follows z directly and the map is the identity on its linear part.
    return torch.ones(mid, dtype=dtype, device=device), torch.zeros(mid, dtype=dtype, device=device)


def _linear_range(block: DepthwiseSeparableConv2d, sample: torch.Tensor | None, activation: str):
    """Set the inserted BN so that act(bn(z)) = scale·z + shift for the depthwise outputs z of ``sample``.

    BN's running statistics are those of z (so train-mode BN starts near its eval behaviour);
    its affine parameters make the eval-mode map the chosen ``scale·z + shift``: ReLU shifts z
    above zero, ReLU6 also scales it into [0, 6], no activation keeps z as it is.
    Without BN, an activation other than none cannot be kept linear and is applied as is.
    """
    mid = block.mid_channels
    dtype, device = block.depthwise.weight.dtype, block.depthwise.weight.device
    if sample is not None and sample.numel():
        z = block.depthwise(sample.to(dtype=dtype, device=device))
        flat = z.transpose(0, 1).reshape(mid, -1)
        lo, hi = flat.min(1).values, flat.max(1).values
        mean, var = flat.mean(1), flat.var(1, unbiased=False)
    else:
        lo, hi = torch.full((mid,), -3.0, dtype=dtype, device=device), torch.full((mid,), 3.0, dtype=dtype,
                                                                                      device=device)
        mean, var = torch.zeros(mid, dtype=dtype, device=device), torch.ones(mid, dtype=dtype, device=device)
    return set_linear_range(block, lo, hi, mean, var, activation)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round ``v`` to a multiple of ``divisor``, never dropping more than ``1 - round_limit`` (timm's helper)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def theoretical_costs(in_channels: int, out_channels: int, kernel: tuple[int, ...], output_positions: int,
                      depth_multiplier: int, bn: bool, bias: bool) -> tuple[int, int]:
    """(MACs, params) of a depthwise-separable block producing ``output_positions`` (N·H·W) outputs."""
    mid = in_channels * depth_multiplier
    k = math.prod(kernel)
    macs = output_positions * mid * (k + out_channels)
    params = mid * k + mid * out_channels + (out_channels if bias else 0) + (2 * mid if bn else 0)
    return macs, params
