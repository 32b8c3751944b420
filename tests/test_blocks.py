"""Block families: exact at full rank, error that falls with rank, exact cost formulas, ordinary modules."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import dsrewrite
from dsrewrite import export
from dsrewrite.blocks import (FAMILIES, InvertedResidualConv2d, MBConvConv2d, PointwiseFirstConv2d,
                              SpatialSeparableConv2d, Tucker2Conv2d, cp_factors, family_errors, tucker2)

# (in, out, kernel, stride, padding, dilation, bias, input H×W)
CONVS = {
    "3x3 same": (16, 24, 3, 1, 1, 1, True, (12, 12)),
    "3x3 stride 2": (8, 16, 3, 2, 1, 1, False, (13, 11)),
    "5x5 dilated": (6, 10, 5, 1, 4, 2, True, (14, 14)),
    "3x1 rectangular": (8, 8, (3, 1), 1, (1, 0), 1, False, (9, 9)),
    "valid padding": (4, 12, 3, 1, 0, 1, True, (10, 10)),
}


def make(case):
    c_in, c_out, k, s, p, d, bias, hw = CONVS[case]
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, bias=bias).double()
    return conv, torch.randn(2, c_in, *hw, dtype=torch.float64)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("case", sorted(CONVS))
def test_exact_at_full_rank(family, case):
    conv, x = make(case)
    fam = FAMILIES[family]
    block = fam.build(conv, fam.max_rank(conv))
    with torch.no_grad():
        assert torch.allclose(block(x), conv(x), atol=1e-9), family
    assert fam.weight_error(conv, fam.max_rank(conv)) < 1e-10


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_weight_error_falls_with_rank_and_matches_the_output(family):
    conv, x = make("3x3 same")
    fam = FAMILIES[family]
    ranks = sorted({1, 2, max(fam.max_rank(conv) // 2, 1), fam.max_rank(conv)})
    errors = [fam.weight_error(conv, r) for r in ranks]
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.05 and errors[-1] < 1e-10


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("case", sorted(CONVS))
def test_cost_formulas_match_the_analyzer(family, case):
    conv, x = make(case)
    fam = FAMILIES[family]
    rank = 2
    block = fam.build(conv, rank).float()
    analysis = dsrewrite.analyze(block, tuple(x.shape))
    out_hw = analysis.profile.output_shapes[0][2:]
    params, macs = fam.costs(conv.in_channels, conv.out_channels, conv.kernel_size, tuple(x.shape[2:]), out_hw,
                             rank, x.shape[0])
    assert params == sum(p.numel() for p in block.parameters())
    assert macs == analysis.profile.macs


def test_tucker2_hooi_is_never_worse_than_hosvd():
    torch.manual_seed(1)
    w = torch.randn(32, 24, 3, 3, dtype=torch.float64)

    def error(sweeps):
        u_in, u_out = tucker2(w, 8, 8, sweeps)
        approx = torch.einsum("oikl,oa,ib,pa,jb->pjkl", w, u_out, u_in, u_out, u_in)
        return float((approx - w).norm() / w.norm())

    assert error(3) <= error(0) + 1e-12


@pytest.mark.parametrize("block", [
    SpatialSeparableConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), 4),
    Tucker2Conv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), 4, 6),
    PointwiseFirstConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), 2),
    InvertedResidualConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), 12),
    MBConvConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), 12),
], ids=lambda b: b.family)
def test_blocks_are_ordinary_modules(block, tmp_path):
    x = torch.randn(2, 8, 10, 10)
    model = nn.Sequential(nn.Conv2d(8, 8, 1), block, nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model(x).detach()
    loss = model(x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    clone = nn.Sequential(nn.Conv2d(8, 8, 1), type(block)(**_init_args(block)), nn.ReLU())
    clone.load_state_dict(torch.load(buf))
    assert torch.allclose(clone(x), model(x)) and not torch.allclose(model(x), before)
    traced = torch.fx.symbolic_trace(model)
    assert torch.allclose(traced(x), model(x))
    onnx = pytest.importorskip("onnx", reason="onnx is in the dev extra; install it to test ONNX export")
    path = tmp_path / "b.onnx"
    export.export_onnx(model.eval(), (x,), path)
    onnx.checker.check_model(onnx.load(str(path)))


def _init_args(block):
    if isinstance(block, SpatialSeparableConv2d):
        v, h = block.vertical, block.horizontal
        return dict(in_channels=block.in_channels, out_channels=block.out_channels,
                    kernel_size=(v.kernel_size[0], h.kernel_size[1]), padding=(v.padding[0], h.padding[1]),
                    rank=block.rank)
    if isinstance(block, Tucker2Conv2d):
        return dict(in_channels=block.in_channels, out_channels=block.out_channels,
                    kernel_size=block.core.kernel_size, padding=block.core.padding, in_rank=block.in_rank,
                    out_rank=block.out_rank)
    if isinstance(block, InvertedResidualConv2d):
        return dict(in_channels=block.in_channels, out_channels=block.out_channels,
                    kernel_size=block.depthwise.kernel_size, padding=block.depthwise.padding, rank=block.rank)
    return dict(in_channels=block.in_channels, out_channels=block.out_channels,
                kernel_size=block.spatial.kernel_size, padding=block.spatial.padding, multiplier=block.multiplier)


@pytest.mark.parametrize("case", sorted(CONVS))
def test_mbconv_starts_as_the_inverted_residual_block_and_its_gate_learns(case):
    conv, x = make(case)
    mb, ir = MBConvConv2d.from_conv(conv, 5), InvertedResidualConv2d.from_conv(conv, 5)
    with torch.no_grad():
        assert torch.equal(mb(x), ir(x)), "the SE gate starts as exactly 1"
        assert torch.equal(mb.se(x.new_ones(2, 5, 3, 3) * 7), x.new_ones(2, 5, 3, 3) * 7)
    assert mb.se.reduce.out_channels == 1 and FAMILIES["mbconv"].weight_error(conv, 5) == pytest.approx(
        FAMILIES["inverted-residual"].weight_error(conv, 5))
    opt = torch.optim.SGD(mb.parameters(), lr=0.1)
    torch.manual_seed(1)
    target = torch.randn_like(mb(x))
    (mb(x) - target).square().mean().backward()
    assert mb.se.expand.weight.grad.abs().sum() > 0, "the gate's last layer gets a gradient from the first step"
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(mb.se(mb.depthwise(mb.expand(x))), mb.depthwise(mb.expand(x)))


def test_refuses_what_does_not_factor_exactly():
    for family in ("spatial", "bottleneck", "pointwise-first", "inverted-residual", "mbconv"):
        with pytest.raises(ValueError, match="standard nn.Conv2d"):
            FAMILIES[family].build(nn.Conv2d(8, 8, 3, groups=2), 2)
        with pytest.raises(ValueError, match="padding mode 'reflect'"):
            FAMILIES[family].build(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), 2)


def test_cp_fit_starts_from_the_separable_block_and_only_improves():
    """The inverted-residual block at rank t·C_in is never worse than the separable block at multiplier t."""
    torch.manual_seed(0)
    w = nn.Conv2d(16, 24, 3).weight.detach()
    separable = family_errors(w, "separable", [1, 2])
    for t in (1, 2):
        start = family_errors_after(w, 16 * t, sweeps=0)
        fitted = family_errors_after(w, 16 * t, sweeps=12)
        assert start <= separable[t] + 1e-9, "the start: the separable SVD terms, the largest r of them"
        assert fitted < start - 0.05, "alternating least squares improves on it"


def family_errors_after(w, rank, sweeps):
    p, e, d = cp_factors(w, rank, sweeps)
    approx = torch.einsum("or,ir,kr->oik", p, e, d).reshape(w.shape).double()
    return float((approx - w.double()).square().sum() / w.double().square().sum())
