"""Block families beside the depthwise-separable block: other factorizations of one K×K conv.

Each family replaces a standard ``nn.Conv2d`` (groups 1, zero padding) by a chain of
smaller convs with the same output shape, is initialized from the conv's weights by a
closed-form factorization that is **exact at full rank**, reports its weight-only error at
lower ranks, and states its exact params and MACs (:meth:`BlockFamily.costs`, what a
planner compares). Every block is made of plain ``nn.Conv2d`` layers, so it trains, saves,
traces (``--export-code``) and exports to ONNX like any other module.

* ``spatial`` — :class:`SpatialSeparableConv2d`: K×1 (C_in → r) then 1×K (r → C_out), from the
  SVD of W unfolded as a (C_in·K_h) × (K_w·C_out) matrix (Jaderberg et al. 2014, scheme 2).
* ``bottleneck`` — :class:`Tucker2Conv2d`: 1×1 reduce (C_in → r_in), K×K core (r_in → r_out),
  1×1 expand (r_out → C_out), from a Tucker-2 decomposition of W over its channel modes (HOSVD,
  refined by a few HOOI sweeps; Kim et al. 2016).
* ``pointwise-first`` — :class:`PointwiseFirstConv2d`: 1×1 (C_in → C_out·m) then a K×K conv
  grouped per output channel (m inputs each; depthwise when m = 1): Xception's order, from
  per-output-channel SVDs of W.
* ``inverted-residual`` — :class:`InvertedResidualConv2d`: 1×1 expand (C_in → r), depthwise
  K×K on r channels, 1×1 project (r → C_out): MobileNetV2's linear bottleneck, from a CP
  (canonical polyadic) decomposition of W as a C_out × C_in × K² tensor (Lebedev et al. 2015),
  fitted by alternating least squares from the separable block's SVD start; exact from
  r = K²·min(C_in, C_out).
* ``mbconv`` — :class:`MBConvConv2d`: the inverted-residual block with squeeze-and-excitation
  on its r depthwise outputs (MBConv, as in EfficientNet), the gate started as the identity
  (:class:`SqueezeExcite`: exactly 1 everywhere until training moves it), so it computes the
  inverted-residual block's function; training can then learn the gate. Not among ``auto``'s
  candidates (at its start it is the inverted-residual block at more cost): name it.

The depthwise-separable block (``separable``, :class:`~dsrewrite.layers.DepthwiseSeparableConv2d`)
is one more; :data:`FAMILIES` lists them all by name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _check_conv(conv: nn.Conv2d, family: str) -> None:
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.transposed:
        raise ValueError(f"{family}: expects a standard nn.Conv2d (groups 1, not transposed)")
    if conv.padding_mode != "zeros":
        raise ValueError(f"{family}: padding mode {conv.padding_mode!r} does not factor exactly; only zeros")


def numeric_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Numeric padding of ``conv`` ("same" resolved for stride 1)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return 0, 0
        kh, kw = conv.kernel_size
        dh, dw = conv.dilation
        if (dh * (kh - 1)) % 2 or (dw * (kw - 1)) % 2:
            raise ValueError("padding='same' with an even effective kernel is asymmetric; not supported")
        return dh * (kh - 1) // 2, dw * (kw - 1) // 2
    return tuple(conv.padding)


def _shell(cls, conv: nn.Conv2d, *ranks: int) -> nn.Module:
    """An uninitialized ``cls`` block with ``conv``'s geometry, device and dtype (after checking ``conv`` factors)."""
    _check_conv(conv, cls.family)
    c_out, c_in, kh, kw = conv.weight.shape
    block = cls(c_in, c_out, (kh, kw), conv.stride, numeric_padding(conv), conv.dilation, *ranks, bias=True)
    return block.to(device=conv.weight.device, dtype=conv.weight.dtype)


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    norm = float(weight.double().norm())
    return float((approx.double() - weight.double()).norm()) / norm if norm else 0.0


# ------------------------------------------------------------------------------- spatial


class SpatialSeparableConv2d(nn.Module):
    """K_h×1 conv (C_in → ``rank``) then 1×K_w conv (``rank`` → C_out): the same output shape as the K×K conv."""

    family = "spatial"
    #: the conv that calibration refits by least squares (the last: the block is linear in its weights)
    refit = "horizontal"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 rank: int = 1, bias: bool = True):
        super().__init__()
        kh, kw = _pair(kernel_size)
        sh, sw = _pair(stride)
        ph, pw = _pair(padding)
        dh, dw = _pair(dilation)
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.vertical = nn.Conv2d(in_channels, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
                                  bias=False)
        self.horizontal = nn.Conv2d(rank, out_channels, (1, kw), stride=(1, sw), padding=(0, pw),
                                    dilation=(1, dw), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.horizontal(self.vertical(x))

    @staticmethod
    def unfolding(weight: torch.Tensor) -> torch.Tensor:
        """W [C_out, C_in, K_h, K_w] as the (C_in·K_h) × (K_w·C_out) matrix the family factors (float64)."""
        c_out, c_in, kh, kw = weight.shape
        return weight.double().permute(1, 2, 3, 0).reshape(c_in * kh, kw * c_out)

    @classmethod
    def max_rank(cls, conv: nn.Conv2d) -> int:
        """The rank at which the factorization is exact."""
        c_out, c_in, kh, kw = conv.weight.shape
        return min(c_in * kh, kw * c_out)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> "SpatialSeparableConv2d":
        """Initialized from ``conv`` by a rank-``rank`` truncated SVD (exact at :meth:`max_rank`)."""
        block = _shell(cls, conv, rank)
        c_out, c_in, kh, kw = conv.weight.shape
        u, s, vh = torch.linalg.svd(cls.unfolding(conv.weight.detach()), full_matrices=False)
        r = min(rank, s.numel())
        a = torch.zeros(c_in * kh, rank, dtype=torch.float64)
        b = torch.zeros(rank, kw * c_out, dtype=torch.float64)
        a[:, :r] = u[:, :r] * s[:r].sqrt()
        b[:r] = s[:r].sqrt().unsqueeze(1) * vh[:r]
        dtype = conv.weight.dtype
        with torch.no_grad():
            block.vertical.weight.copy_(a.T.reshape(rank, c_in, kh, 1).to(dtype))
            block.horizontal.weight.copy_(b.reshape(rank, kw, c_out).permute(2, 0, 1).reshape(c_out, rank, 1, kw)
                                          .to(dtype))
            block.horizontal.bias.copy_(conv.bias.detach() if conv.bias is not None else torch.zeros(c_out, dtype=dtype))
        return block.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The K×K weight this block computes."""
        a = self.vertical.weight.detach().double()[:, :, :, 0]  # [r, C_in, K_h]
        b = self.horizontal.weight.detach().double()[:, :, 0, :]  # [C_out, r, K_w]
        return torch.einsum("rci,orj->ocij", a, b)


# ---------------------------------------------------------------------------- bottleneck


class Tucker2Conv2d(nn.Module):
    """1×1 reduce (C_in → ``in_rank``), K×K core (``in_rank`` → ``out_rank``), 1×1 expand (→ C_out)."""

    family = "bottleneck"
    #: the conv that calibration refits by least squares (the last: the block is linear in its weights)
    refit = "expand"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 in_rank: int = 1, out_rank: int = 1, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_rank, self.out_rank = in_rank, out_rank
        self.reduce = nn.Conv2d(in_channels, in_rank, 1, bias=False)
        self.core = nn.Conv2d(in_rank, out_rank, kernel_size, stride=stride, padding=padding, dilation=dilation,
                              bias=False)
        self.expand = nn.Conv2d(out_rank, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.core(self.reduce(x)))

    @classmethod
    def max_rank(cls, conv: nn.Conv2d) -> tuple[int, int]:
        """(in_rank, out_rank) at which the decomposition is exact."""
        return conv.in_channels, conv.out_channels

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, in_rank: int, out_rank: int | None = None,
                  sweeps: int = 3) -> "Tucker2Conv2d":
        """Initialized by a Tucker-2 decomposition of ``conv.weight`` over its two channel modes.

        HOSVD gives the factors; ``sweeps`` rounds of HOOI (higher-order orthogonal iteration)
        refine them, each never worse than the last. Exact when the ranks are the channel counts.
        """
        _check_conv(conv, cls.family)
        out_rank = out_rank if out_rank is not None else in_rank
        c_out, c_in, kh, kw = conv.weight.shape
        in_rank, out_rank = min(in_rank, c_in), min(out_rank, c_out)
        w = conv.weight.detach().double()
        u_in, u_out = tucker2(w, in_rank, out_rank, sweeps)
        core = torch.einsum("oikl,oa,ib->abkl", w, u_out, u_in)  # [r_out, r_in, K, K]
        block = _shell(cls, conv, in_rank, out_rank)
        dtype = conv.weight.dtype
        with torch.no_grad():
            block.reduce.weight.copy_(u_in.T.reshape(in_rank, c_in, 1, 1).to(dtype))
            block.core.weight.copy_(core.to(dtype))
            block.expand.weight.copy_(u_out.reshape(c_out, out_rank, 1, 1).to(dtype))
            block.expand.bias.copy_(conv.bias.detach() if conv.bias is not None else torch.zeros(c_out, dtype=dtype))
        return block.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The K×K weight this block computes."""
        return torch.einsum("oa,abkl,bi->oikl", self.expand.weight.detach().double()[:, :, 0, 0],
                            self.core.weight.detach().double(), self.reduce.weight.detach().double()[:, :, 0, 0])


def tucker2(weight: torch.Tensor, in_rank: int, out_rank: int, sweeps: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal factors (U_in [C_in, r_in], U_out [C_out, r_out]) of a Tucker-2 decomposition (HOSVD + HOOI)."""
    c_out, c_in = weight.shape[:2]
    w = weight.double()

    def leading(matrix: torch.Tensor, r: int) -> torch.Tensor:
        # top-r eigenvectors of the (small) Gram matrix: the leading left singular vectors
        vals, vecs = torch.linalg.eigh(matrix @ matrix.T)
        return vecs[:, vals.argsort(descending=True)[:r]]

    u_out = leading(w.reshape(c_out, -1), out_rank)
    u_in = leading(w.transpose(0, 1).reshape(c_in, -1), in_rank)
    for _ in range(sweeps):
        projected = torch.einsum("oikl,oa->aikl", w, u_out)  # fix U_out, solve U_in
        u_in = leading(projected.transpose(0, 1).reshape(c_in, -1), in_rank)
        projected = torch.einsum("oikl,ib->obkl", w, u_in)
        u_out = leading(projected.reshape(c_out, -1), out_rank)
    return u_in, u_out


# ------------------------------------------------------------------------ pointwise-first


class PointwiseFirstConv2d(nn.Module):
    """1×1 (C_in → C_out·``multiplier``) then K×K grouped per output channel (``multiplier`` inputs each)."""

    family = "pointwise-first"
    #: the conv that calibration refits by least squares (the last: the block is linear in its weights)
    refit = "spatial"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 multiplier: int = 1, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.multiplier = in_channels, out_channels, multiplier
        self.mid_channels = out_channels * multiplier
        self.pointwise = nn.Conv2d(in_channels, self.mid_channels, 1, bias=False)
        self.spatial = nn.Conv2d(self.mid_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                 dilation=dilation, groups=out_channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.pointwise(x))

    @classmethod
    def max_rank(cls, conv: nn.Conv2d) -> int:
        """The multiplier at which the factorization is exact."""
        kh, kw = conv.kernel_size
        return min(conv.in_channels, kh * kw)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, multiplier: int) -> "PointwiseFirstConv2d":
        """Initialized from per-output-channel truncated SVDs of W[o] (C_in × K²); exact at :meth:`max_rank`."""
        block = _shell(cls, conv, multiplier)
        c_out, c_in, kh, kw = conv.weight.shape
        slices = conv.weight.detach().double().reshape(c_out, c_in, kh * kw)
        u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # u [C_out, C_in, q], s [C_out, q], vh [C_out, q, K²]
        r = min(multiplier, s.shape[1])
        root = s[:, :r].sqrt()
        pointwise = torch.zeros(c_out, multiplier, c_in, dtype=torch.float64)
        spatial = torch.zeros(c_out, multiplier, kh * kw, dtype=torch.float64)
        pointwise[:, :r] = (u[:, :, :r] * root.unsqueeze(1)).transpose(1, 2)
        spatial[:, :r] = vh[:, :r] * root.unsqueeze(-1)
        dtype = conv.weight.dtype
        with torch.no_grad():
            block.pointwise.weight.copy_(pointwise.reshape(c_out * multiplier, c_in, 1, 1).to(dtype))
            block.spatial.weight.copy_(spatial.reshape(c_out, multiplier, kh, kw).to(dtype))
            block.spatial.bias.copy_(conv.bias.detach() if conv.bias is not None else torch.zeros(c_out, dtype=dtype))
        return block.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The K×K weight this block computes."""
        c_out, m = self.out_channels, self.multiplier
        p = self.pointwise.weight.detach().double()[:, :, 0, 0].reshape(c_out, m, -1)  # [C_out, m, C_in]
        d = self.spatial.weight.detach().double()  # [C_out, m, K, K]
        return torch.einsum("omc,omkl->ockl", p, d)


# ---------------------------------------------------------------------- inverted-residual

#: alternating-least-squares sweeps of the CP fit (each never raises the error) ...
CP_SWEEPS = 8
#: ... within this many multiply-adds per fit (a sweep costs about 3·C_out·C_in·K²·rank)
CP_BUDGET = 2e9
#: the planner's estimate of a candidate's error (one fit per candidate rank): fewer sweeps, a smaller budget
ESTIMATE_SWEEPS = 2
ESTIMATE_BUDGET = 3e8



class InvertedResidualConv2d(nn.Module):
    """1×1 expand (C_in → ``rank``), depthwise K×K on ``rank`` channels, 1×1 project (→ C_out).

    MobileNetV2's block without its activations (a linear bottleneck), so that it can stand
    for one conv: each mid channel m computes ``P[:, m] · (d_m ∗ (e_mᵀ x))``, a rank-one term
    of W = Σ_m P[:, m] ⊗ e_m ⊗ d_m (a CP decomposition).
    """

    family = "inverted-residual"
    #: the conv that calibration refits by least squares (the last: the block is linear in its weights)
    refit = "project"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 rank: int = 1, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.expand = nn.Conv2d(in_channels, rank, 1, bias=False)
        self.depthwise = nn.Conv2d(rank, rank, kernel_size, stride=stride, padding=padding, dilation=dilation,
                                   groups=rank, bias=False)
        self.project = nn.Conv2d(rank, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.depthwise(self.expand(x)))

    @classmethod
    def max_rank(cls, conv: nn.Conv2d) -> int:
        """The rank from which the block is exact: K² terms per input (or output) channel."""
        kh, kw = conv.kernel_size
        return kh * kw * min(conv.in_channels, conv.out_channels)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, sweeps: int = CP_SWEEPS,
                  budget: float | None = None) -> "InvertedResidualConv2d":
        """Initialized by a rank-``rank`` CP decomposition of ``conv.weight`` (:func:`cp_factors`; ``budget``:
        multiply-adds per fit, default :data:`CP_BUDGET`)."""
        block = _shell(cls, conv, rank)
        p, e, d = cp_factors(conv.weight.detach(), rank, sweeps, budget)
        kh, kw = conv.kernel_size
        dtype = conv.weight.dtype
        with torch.no_grad():
            block.expand.weight.copy_(e.T.reshape(rank, -1, 1, 1).to(dtype))
            block.depthwise.weight.copy_(d.T.reshape(rank, 1, kh, kw).to(dtype))
            block.project.weight.copy_(p.reshape(-1, rank, 1, 1).to(dtype))
            block.project.bias.copy_(conv.bias.detach() if conv.bias is not None
                                     else torch.zeros(conv.out_channels, dtype=dtype))
        return block.to(device=conv.weight.device, dtype=dtype)

    def dense_weight(self) -> torch.Tensor:
        """The K×K weight this block computes."""
        p = self.project.weight.detach().double()[:, :, 0, 0]  # [C_out, r]
        e = self.expand.weight.detach().double()[:, :, 0, 0]  # [r, C_in]
        d = self.depthwise.weight.detach().double()[:, 0]  # [r, K, K]
        return torch.einsum("or,ri,rkl->oikl", p, e, d)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x · 2σ(W₂ silu(W₁ avgpool(x) + b₁) + b₂)``, per channel (SiLU as in
    EfficientNet's MBConv).

    Started as the identity: ``W₂ = 0, b₂ = 0`` give ``2σ(0) = 1`` exactly, while ``W₁`` keeps its
    random start, so the first gradient step already moves ``W₂`` (a gate saturated at 1, such as
    a hard sigmoid at its top, would never learn; nor would a ReLU hidden unit that starts dead).
    The factor 2 lets the gate also amplify a channel.
    """

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.reset()

    def reset(self, seed: int = 0) -> None:
        """The identity start: ``W₂ = 0, b₂ = 0``, and ``W₁`` drawn from a generator seeded with ``seed``
        (uniform ±1/√channels, torch's default bound for a conv), so a plan applied twice builds the
        same model."""
        generator = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(self.reduce.in_channels)
        with torch.no_grad():
            w = torch.empty(self.reduce.weight.shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
            self.reduce.weight.copy_(w)
            self.reduce.bias.zero_()
            self.expand.weight.zero_()
            self.expand.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (2 * torch.sigmoid(self.expand(F.silu(self.reduce(self.pool(x))))))


def squeeze_width(rank: int) -> int:
    """The SE bottleneck of an MBConv block with ``rank`` mid channels: a quarter, at least 1."""
    return max(1, rank // 4)


class MBConvConv2d(InvertedResidualConv2d):
    """1×1 expand (C_in → ``rank``), depthwise K×K, squeeze-and-excitation, 1×1 project (→ C_out).

    Initialized as :class:`InvertedResidualConv2d` (a CP decomposition of the conv's weight) with
    the gate at the identity (:class:`SqueezeExcite`), so it starts as exactly that block;
    :meth:`dense_weight` is the K×K weight it computes while the gate is the identity.
    """

    family = "mbconv"
    refit = "project"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 rank: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, rank, bias)
        self.se = SqueezeExcite(rank, squeeze_width(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.se(self.depthwise(self.expand(x))))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, sweeps: int = CP_SWEEPS,
                  budget: float | None = None) -> "MBConvConv2d":
        """The inverted-residual block's CP initialization, the gate at the identity (seeded: the same
        conv gives the same block)."""
        block = super().from_conv(conv, rank, sweeps, budget)
        block.se.reset(seed=rank)
        return block


def cp_factors(weight: torch.Tensor, rank: int, sweeps: int = CP_SWEEPS,
               budget: float | None = None, svd: tuple | None = None) -> tuple[torch.Tensor, ...]:
    """Factors (P [C_out, r], E [C_in, r], D [K², r]) with W ≈ Σ_m P[:, m] ⊗ E[:, m] ⊗ D[:, m], in float64.

    From ``r = K²·min(C_in, C_out)`` an exact construction (one mid channel per input or
    output channel and kernel tap). Below it, the start is the separable block's: per input
    channel the leading singular pairs of its C_out × K² slice (E one-hot), the ``r`` largest
    terms kept; then ``sweeps`` rounds of alternating least squares, each solving one factor
    given the other two, so the error never rises above the separable start's.
    """
    w = weight.detach().double()
    c_out, c_in, kh, kw = w.shape
    k = kh * kw
    t = w.reshape(c_out, c_in, k)
    if rank >= k * min(c_in, c_out):
        rank_out = k * min(c_in, c_out)
        eye_k = torch.eye(k, dtype=torch.float64)
        if c_in <= c_out:  # mid channel (c, tap): picks input c at one tap; P holds W[:, c, tap]
            p = t.reshape(c_out, c_in * k)
            e = torch.eye(c_in, dtype=torch.float64).repeat_interleave(k, 1)
            d = eye_k.repeat(1, c_in)
        else:  # mid channel (o, tap): mixes the inputs by W[o, :, tap]; P routes it to output o
            p = torch.eye(c_out, dtype=torch.float64).repeat_interleave(k, 1)
            e = t.permute(1, 0, 2).reshape(c_in, c_out * k)
            d = eye_k.repeat(1, c_out)
        pad = rank - rank_out  # extra mid channels stay zero
        return tuple(torch.cat([f, torch.zeros(f.shape[0], pad, dtype=torch.float64)], 1) for f in (p, e, d))
    # separable start: per input channel c, W[:, c, :] = U S Vᵀ; term j: P = U_j S_j, E = e_c, D = V_j
    # [C_in, C_out, q], [C_in, q], [C_in, q, K²]; ``svd`` passes it in when one weight is fitted at several ranks
    u, s, vh = svd if svd is not None else torch.linalg.svd(t.permute(1, 0, 2), full_matrices=False)
    q = s.shape[1]
    order = s.reshape(-1).argsort(descending=True)[:rank]
    channel, j = order // q, order % q
    p = (u[channel, :, j] * s[channel, j].unsqueeze(1)).T  # [C_out, r]
    e = torch.zeros(c_in, len(order), dtype=torch.float64)
    e[channel, torch.arange(len(order))] = 1.0
    d = vh[channel, j, :].T  # [K², r]
    if len(order) < rank:  # fewer singular pairs than the rank: zero terms
        extra = rank - len(order)
        p, e, d = (torch.cat([f, torch.zeros(f.shape[0], extra, dtype=torch.float64)], 1) for f in (p, e, d))
    # alternating least squares: each factor solved given the other two (its MTTKRP by einsum,
    # never the Khatri-Rao matrix), as many sweeps as CP_BUDGET allows for this layer
    budget = CP_BUDGET if budget is None else budget
    sweeps = min(sweeps, max(1, int(budget // max(3 * c_out * c_in * k * rank, 1))))
    ridge = 1e-10 * float(t.square().sum())
    eye_r = torch.eye(rank, dtype=torch.float64)
    t32 = t.float()

    def solve(mttkrp, a, b):
        gram = (a.T @ a) * (b.T @ b) + ridge * eye_r
        return torch.cholesky_solve(mttkrp.double().T, torch.linalg.cholesky(gram)).T

    for _ in range(sweeps):
        p = solve(torch.einsum("oik,ir,kr->or", t32, e.float(), d.float()), e, d)
        e = solve(torch.einsum("oik,or,kr->ir", t32, p.float(), d.float()), p, d)
        d = solve(torch.einsum("oik,or,ir->kr", t32, p.float(), e.float()), p, e)
    return p, e, d


def cp_error(weight: torch.Tensor, p: torch.Tensor, e: torch.Tensor, d: torch.Tensor) -> float:
    """‖W − Σ_m P_m ⊗ E_m ⊗ D_m‖² / ‖W‖², without building the approximation:
    ‖W‖² − 2⟨W, Ŵ⟩ + ‖Ŵ‖², with ⟨W, Ŵ⟩ from one MTTKRP and ‖Ŵ‖² from the factors' Gram matrices."""
    t = weight.detach().reshape(weight.shape[0], weight.shape[1], -1)
    total = float(t.double().square().sum())
    if total == 0:
        return 0.0
    inner = float((torch.einsum("oik,ir,kr->or", t.float(), e.float(), d.float()).double() * p).sum())
    norm = float(((p.T @ p) * (e.T @ e) * (d.T @ d)).sum())
    return max((total - 2 * inner + norm) / total, 0.0)


# ------------------------------------------------------------------------------ the families


@dataclasses.dataclass(frozen=True)
class BlockFamily:
    """One way to factor a K×K conv: how to build it at a rank, what it costs, how far from W it starts."""

    name: str
    #: ``build(conv, rank) -> nn.Module`` initialized from the conv's weights
    build: Callable[[nn.Conv2d, int], nn.Module]
    #: ``max_rank(conv) -> int``: the smallest rank at which ``build`` is exact
    max_rank: Callable[[nn.Conv2d], int]
    #: ``costs(c_in, c_out, kernel, in_hw, out_hw, rank, batch) -> (params, MACs)``, bias included in params
    costs: Callable[..., tuple[int, int]]
    #: ``make(c_in, c_out, kernel, stride, padding, dilation, rank) -> nn.Module``, randomly initialized
    #: (what timing builds: weights do not change speed)
    make: Callable[..., nn.Module]
    #: ``mid(c_in, c_out, rank) -> int``: the widest intermediate channel count the block creates
    mid: Callable[[int, int, int], int]
    #: how the block reads in a plan, ``{r}`` the rank: ``"3×1 → r → 1×3"``
    shape: str

    def weight_error(self, conv: nn.Conv2d, rank: int) -> float:
        """‖W − Ŵ‖ / ‖W‖ of the block built at ``rank`` (0 at :attr:`max_rank`)."""
        block = self.build(conv, rank)
        dense = block.dense_weight() if hasattr(block, "dense_weight") else _separable_dense(block)
        return relative_error(conv.weight.detach(), dense)


def _separable_costs(c_in, c_out, kernel, in_hw, out_hw, rank, batch=1):
    k = math.prod(kernel)
    mid = c_in * rank
    positions = batch * math.prod(out_hw)
    return mid * k + mid * c_out + c_out, positions * mid * (k + c_out)


def _spatial_costs(c_in, c_out, kernel, in_hw, out_hw, rank, batch=1):
    kh, kw = kernel
    middle = batch * out_hw[0] * in_hw[1]  # K×1 keeps the input's width
    return (rank * c_in * kh + c_out * rank * kw + c_out,
            middle * rank * c_in * kh + batch * math.prod(out_hw) * c_out * rank * kw)


def _bottleneck_costs(c_in, c_out, kernel, in_hw, out_hw, rank, batch=1):
    k = math.prod(kernel)
    positions_in, positions_out = batch * math.prod(in_hw), batch * math.prod(out_hw)
    return (c_in * rank + rank * rank * k + rank * c_out + c_out,
            positions_in * c_in * rank + positions_out * (rank * rank * k + rank * c_out))


def _inverted_residual_costs(c_in, c_out, kernel, in_hw, out_hw, rank, batch=1):
    k = math.prod(kernel)
    positions_in, positions_out = batch * math.prod(in_hw), batch * math.prod(out_hw)
    return (c_in * rank + rank * k + rank * c_out + c_out,
            positions_in * c_in * rank + positions_out * rank * (k + c_out))


def _mbconv_costs(c_in, c_out, kernel, in_hw, out_hw, rank, batch=1):
    params, macs = _inverted_residual_costs(c_in, c_out, kernel, in_hw, out_hw, rank, batch)
    s = squeeze_width(rank)
    return params + 2 * rank * s + s + rank, macs + batch * 2 * rank * s


def _pointwise_first_costs(c_in, c_out, kernel, in_hw, out_hw, rank, batch=1):
    k = math.prod(kernel)
    mid = c_out * rank
    return (c_in * mid + mid * k + c_out,
            batch * math.prod(in_hw) * c_in * mid + batch * math.prod(out_hw) * mid * k)


def _build_separable(conv: nn.Conv2d, rank: int) -> nn.Module:
    from .layers import DepthwiseSeparableConv2d

    block = DepthwiseSeparableConv2d.from_conv(conv, rank, bn=False, activation="none")
    del block.kept_energy
    return block


def _separable_dense(block) -> torch.Tensor:
    c_in, r = block.in_channels, block.depth_multiplier
    d = block.depthwise.weight.detach().double().reshape(c_in, r, -1)  # [C_in, r, K²]
    p = block.pointwise.weight.detach().double()[:, :, 0, 0].reshape(-1, c_in, r)  # [C_out, C_in, r]
    kh, kw = block.depthwise.kernel_size
    return torch.einsum("cjk,ocj->ock", d, p).reshape(-1, c_in, kh, kw)


def _separable_max_rank(conv: nn.Conv2d) -> int:
    kh, kw = conv.kernel_size
    return min(kh * kw, conv.out_channels)


def _make_separable(c_in, c_out, kernel, stride, padding, dilation, rank):
    from .layers import DepthwiseSeparableConv2d

    return DepthwiseSeparableConv2d(c_in, c_out, kernel, stride, padding, dilation, rank, bn=False,
                                    activation="none", bias=True)


FAMILIES: dict[str, BlockFamily] = {f.name: f for f in [
    BlockFamily("separable", _build_separable, _separable_max_rank, _separable_costs, _make_separable,
                lambda c_in, c_out, r: c_in * r, "dw×{r} → pw"),
    BlockFamily("pointwise-first", PointwiseFirstConv2d.from_conv, PointwiseFirstConv2d.max_rank,
                _pointwise_first_costs, PointwiseFirstConv2d, lambda c_in, c_out, r: c_out * r, "pw×{r} → dw"),
    BlockFamily("spatial", SpatialSeparableConv2d.from_conv, SpatialSeparableConv2d.max_rank, _spatial_costs,
                SpatialSeparableConv2d, lambda c_in, c_out, r: r, "K×1 → {r} → 1×K"),
    BlockFamily("bottleneck", lambda conv, rank: Tucker2Conv2d.from_conv(conv, rank, rank),
                lambda conv: max(conv.in_channels, conv.out_channels), _bottleneck_costs,
                lambda c_in, c_out, k, s, p, d, r: Tucker2Conv2d(c_in, c_out, k, s, p, d, min(r, c_in), min(r, c_out)),
                lambda c_in, c_out, r: r, "1×1 → {r} → K×K → 1×1"),
    BlockFamily("inverted-residual", InvertedResidualConv2d.from_conv, InvertedResidualConv2d.max_rank,
                _inverted_residual_costs, InvertedResidualConv2d, lambda c_in, c_out, r: r,
                "1×1 → {r} → dw K×K → 1×1"),
    BlockFamily("mbconv", MBConvConv2d.from_conv, MBConvConv2d.max_rank, _mbconv_costs, MBConvConv2d,
                lambda c_in, c_out, r: r, "1×1 → {r} → dw K×K → SE → 1×1"),
]}

#: the families' block classes (what calibration looks for in a converted model), separable excluded
FAMILY_BLOCKS = (SpatialSeparableConv2d, Tucker2Conv2d, PointwiseFirstConv2d, InvertedResidualConv2d, MBConvConv2d)


def max_rank_of(family: str, in_channels: int, out_channels: int, kernel: tuple[int, ...]) -> int:
    """The rank at which ``family`` is exact for a conv of this geometry (no module needed)."""
    kh, kw = kernel
    return {"separable": min(kh * kw, out_channels), "pointwise-first": min(in_channels, kh * kw),
            "spatial": min(in_channels * kh, kw * out_channels),
            "bottleneck": max(in_channels, out_channels),
            "inverted-residual": kh * kw * min(in_channels, out_channels),
            "mbconv": kh * kw * min(in_channels, out_channels)}[family]


def block_costs(family: str, rank: int, in_channels: int, out_channels: int, kernel: tuple[int, ...],
                input_shape: tuple[int, ...], output_shape: tuple[int, ...], bn: bool = False) -> tuple[int, int]:
    """(MACs, params) of ``family``'s block at ``rank`` for one conv call (batch from ``output_shape``).

    The separable family counts its optional BN, as :func:`~dsrewrite.layers.theoretical_costs`
    does; every family's last conv carries a bias (the built blocks always have one: it takes
    the conv's bias, or the shift an inserted BN passes on), whether or not the conv had one.
    """
    if family == "separable":
        from .layers import theoretical_costs

        positions = output_shape[0] * math.prod(output_shape[2:])
        return theoretical_costs(in_channels, out_channels, kernel, positions, rank, bn, True)
    if family == "bottleneck":  # ranks are capped by the channel counts, as the block builds them
        c_in_rank, c_out_rank = min(rank, in_channels), min(rank, out_channels)
        k = math.prod(kernel)
        pin, pout = output_shape[0] * math.prod(input_shape[2:]), output_shape[0] * math.prod(output_shape[2:])
        params = in_channels * c_in_rank + c_in_rank * c_out_rank * k + c_out_rank * out_channels + out_channels
        return pin * in_channels * c_in_rank + pout * (c_in_rank * c_out_rank * k + c_out_rank * out_channels), params
    params, macs = FAMILIES[family].costs(in_channels, out_channels, tuple(kernel), tuple(input_shape[2:]),
                                          tuple(output_shape[2:]), rank, output_shape[0])
    return macs, params


#: fractions of the dense conv's MACs at which :func:`rank_ladder` places a family's candidate ranks
LADDER = (0.5, 0.35, 0.25, 0.17, 0.12, 0.08)


def rank_ladder(family: str, in_channels: int, out_channels: int, kernel: tuple[int, ...],
                input_shape: tuple[int, ...], output_shape: tuple[int, ...], divisor: int = 8,
                max_multiplier: int = 4) -> list[int]:
    """Candidate ranks of ``family`` for one conv: a few points from half the dense MACs down.

    Multiplier families (separable, pointwise-first) try 1..``max_multiplier`` (below exact);
    width families (spatial, bottleneck) take, for each fraction in :data:`LADDER`, the
    largest rank within that share of the dense conv's MACs, rounded down to a multiple of
    ``divisor`` where it is at least that (aligned channel counts run faster).
    """
    top = max_rank_of(family, in_channels, out_channels, kernel)
    if family in ("separable", "pointwise-first"):
        return list(range(1, min(top, max_multiplier) + 1))
    positions = output_shape[0] * math.prod(output_shape[2:])
    dense = positions * in_channels * out_channels * math.prod(kernel)
    macs = [block_costs(family, r, in_channels, out_channels, kernel, input_shape, output_shape)[0]
            for r in range(1, top + 1)]
    ranks = set()
    for fraction in LADDER:
        fits = [r for r, m in zip(range(1, top + 1), macs) if m <= fraction * dense]
        if not fits:
            continue
        r = fits[-1]
        if divisor > 1 and r >= divisor:
            r = r // divisor * divisor
        ranks.add(r)
    return sorted(ranks)


def family_errors(weight: torch.Tensor, family: str, ranks: list[int]) -> dict[int, float]:
    """``{rank: ‖W − Ŵ‖² / ‖W‖²}`` of ``family``'s weight-only initialization at each rank.

    The squared relative error is 1 − kept energy for the SVD-based families, so errors
    of different families (and of :mod:`dsrewrite.rank`) compare and add up alike. One
    decomposition answers every rank: the SVDs of the separable, pointwise-first and
    spatial families, and for the bottleneck family the HOSVD truncation (1 − ‖core‖²/‖W‖²,
    the factors being orthonormal), which bounds from above the error of the block
    :class:`Tucker2Conv2d` builds (its HOOI sweeps refine the HOSVD factors).
    """
    from .layers import channel_slices, kept_energy

    w = weight.detach().double()
    total = float(w.square().sum())
    if total == 0:
        return {r: 0.0 for r in ranks}
    c_out, c_in = w.shape[:2]
    if family == "separable":
        s = torch.linalg.svdvals(channel_slices(w))
        return {r: max(1.0 - kept_energy(s, r), 0.0) for r in ranks}
    if family == "pointwise-first":  # per output channel, the C_in × K² slice
        s = torch.linalg.svdvals(w.reshape(c_out, c_in, -1))
        return {r: max(1.0 - kept_energy(s, r), 0.0) for r in ranks}
    if family == "spatial":
        s = torch.linalg.svdvals(SpatialSeparableConv2d.unfolding(w)).square()
        return {r: max(float(s[r:].sum()) / total, 0.0) for r in ranks}
    if family in ("inverted-residual", "mbconv"):  # mbconv: its gate starts as the identity
        # a CP fit per rank (no one decomposition answers them all), with ESTIMATE_SWEEPS sweeps: the
        # built block starts from the same point and sweeps more, so this bounds its error from above
        svd = torch.linalg.svd(w.reshape(c_out, c_in, -1).permute(1, 0, 2), full_matrices=False)
        return {r: cp_error(w, *cp_factors(w, r, ESTIMATE_SWEEPS, ESTIMATE_BUDGET, svd)) for r in ranks}
    if family != "bottleneck":
        raise ValueError(f"unknown block family {family!r}")
    # bottleneck: the HOSVD truncation, every rank from one rotation of W into the leading
    # singular bases of its channel modes (an upper bound of the HOOI block's error)
    u_out = torch.linalg.eigh(w.reshape(c_out, -1) @ w.reshape(c_out, -1).T)[1].flip(1)
    m_in = w.transpose(0, 1).reshape(c_in, -1)
    u_in = torch.linalg.eigh(m_in @ m_in.T)[1].flip(1)
    rotated = torch.einsum("oikl,oa,ib->abkl", w, u_out, u_in).square().sum((2, 3))  # [C_out, C_in] energies
    cumulative = rotated.cumsum(0).cumsum(1)
    return {r: max(1.0 - float(cumulative[min(r, c_out) - 1, min(r, c_in) - 1]) / total, 0.0) for r in ranks}


def family_approximations(weight: torch.Tensor, family: str, ranks: list[int]):
    """``(rank, Ŵ)`` pairs, one rank at a time: the dense K×K weight (float64) of ``family``'s
    weight-only initialization at each rank — the same truncations :func:`family_errors` judges
    (‖W − Ŵ‖² / ‖W‖² of each Ŵ is its error there), for judging a candidate on data
    (:mod:`dsrewrite.judge`). A generator, so that only one Ŵ is held at a time."""
    w = weight.detach().double()
    c_out, c_in, kh, kw = w.shape
    k = kh * kw
    if family == "separable":  # per input channel, its C_out × K² slice
        u, s, vh = torch.linalg.svd(w.reshape(c_out, c_in, k).permute(1, 0, 2), full_matrices=False)
        for r in ranks:
            yield r, ((u[:, :, :r] * s[:, None, :r]) @ vh[:, :r]).permute(1, 0, 2).reshape(w.shape)
    elif family == "pointwise-first":  # per output channel, its C_in × K² slice
        u, s, vh = torch.linalg.svd(w.reshape(c_out, c_in, k), full_matrices=False)
        for r in ranks:
            yield r, ((u[:, :, :r] * s[:, None, :r]) @ vh[:, :r]).reshape(w.shape)
    elif family == "spatial":
        u, s, vh = torch.linalg.svd(SpatialSeparableConv2d.unfolding(w), full_matrices=False)
        for r in ranks:
            yield r, ((u[:, :r] * s[:r]) @ vh[:r]).reshape(c_in, kh, kw, c_out).permute(3, 0, 1, 2)
    elif family in ("inverted-residual", "mbconv"):
        svd = torch.linalg.svd(w.reshape(c_out, c_in, k).permute(1, 0, 2), full_matrices=False)
        for r in ranks:
            p, e, d = cp_factors(w, r, ESTIMATE_SWEEPS, ESTIMATE_BUDGET, svd)
            yield r, torch.einsum("or,ir,kr->oik", p, e, d).reshape(w.shape)
    elif family == "bottleneck":  # the HOSVD truncation: W projected on the leading bases of both channel modes
        u_out = torch.linalg.eigh(w.reshape(c_out, -1) @ w.reshape(c_out, -1).T)[1].flip(1)
        m_in = w.transpose(0, 1).reshape(c_in, -1)
        u_in = torch.linalg.eigh(m_in @ m_in.T)[1].flip(1)
        for r in ranks:
            a, b = u_out[:, :min(r, c_out)], u_in[:, :min(r, c_in)]
            yield r, torch.einsum("oikl,pi->opkl", torch.einsum("oikl,po->pikl", w, a @ a.T), b @ b.T)
    else:
        raise ValueError(f"unknown block family {family!r}")


def block_text(family: str, rank: int, bn: bool = False, activation: str = "none") -> str:
    """How a planned block reads: ``dw×2 → BN → relu → pw``, ``3×1 → 48 → 1×3`` (K written out by the caller)."""
    if family == "separable":
        parts = [f"dw×{rank}"] + (["BN"] if bn else []) + ([activation] if activation not in (None, "none") else [])
        return " → ".join(parts + ["pw"])
    return FAMILIES[family].shape.format(r=rank)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)
