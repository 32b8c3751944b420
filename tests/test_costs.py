"""Each cost handler alone, on one op (as fvcore tests its handles)."""

import pytest
import torch

from dsrewrite.costs import CostTable, OpCall

handler_for = CostTable().handler_for

aten = torch.ops.aten


def run(func, *args):
    out = func(*args)
    known, handler = handler_for(func)
    assert known
    return handler(OpCall(func, args, {}, out)) if handler else None


def meta(*shape):
    return torch.empty(*shape, device="meta")


CASES = [
    ("conv2d", aten.convolution.default,
     (meta(2, 8, 10, 10), meta(16, 8, 3, 3), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1), 2 * 16 * 100 * 8 * 9),
    ("grouped", aten.convolution.default,
     (meta(1, 8, 10, 10), meta(8, 2, 3, 3), None, [2, 2], [1, 1], [1, 1], False, [0, 0], 4), 8 * 25 * 2 * 9),
    ("transposed", aten.convolution.default,
     (meta(1, 4, 5, 5), meta(4, 6, 2, 2), None, [2, 2], [0, 0], [1, 1], True, [0, 0], 1), 25 * 4 * 6 * 4),
    ("mm", aten.mm.default, (meta(3, 4), meta(4, 5)), 60),
    ("addmm", aten.addmm.default, (meta(5), meta(3, 4), meta(4, 5)), 60),
    ("bmm", aten.bmm.default, (meta(2, 3, 4), meta(2, 4, 5)), 120),
    ("baddbmm", aten.baddbmm.default, (meta(2, 3, 5), meta(2, 3, 4), meta(2, 4, 5)), 120),
    ("mv", aten.mv.default, (meta(3, 4), meta(4)), 12),
    ("relu is free", aten.relu.default, (meta(3, 4),), None),
    ("batch norm is free", aten.native_batch_norm.default,
     (meta(1, 3, 4, 4), meta(3), meta(3), meta(3), meta(3), False, 0.1, 1e-5), None),
    ("in-place hardswish is free", aten.hardswish_.default, (meta(3, 4),), None),
    ("view is free", aten.view.default, (meta(3, 4), [12]), None),
    # ops the torchvision and timm sweeps found without a handler (benchmarks/results/*_sweep.md)
    ("linspace is free", aten.linspace.default, (0.0, 1.0, 5), None),
    ("unique (batched NMS) is free", aten._unique2.default, (torch.zeros(6),), None),
]


@pytest.mark.parametrize("func,args,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_handler(func, args, expected):
    assert run(func, *args) == expected


def test_unknown_op_is_not_known():
    known, handler = handler_for(aten._fft_r2c.default)
    assert not known and handler is None


def test_deformable_conv_is_counted_as_the_conv_it_generalizes():
    """torchvision's deform_conv2d: batch × weight × output positions MACs, in the conv column, and no conv row."""
    torchvision = pytest.importorskip("torchvision", reason="deform_conv2d is a torchvision op")
    from torch import nn

    import dsrewrite

    class Deformable(nn.Module):
        def __init__(self):
            super().__init__()
            self.offsets = nn.Conv2d(16, 18, 3, padding=1)
            self.deform = torchvision.ops.DeformConv2d(16, 32, 3, padding=1, groups=2)

        def forward(self, x):
            return self.deform(x, self.offsets(x))

    profile = dsrewrite.analyze(Deformable(), (2, 16, 20, 20)).profile
    offsets, deform = 2 * 400 * 18 * 16 * 9, 2 * 400 * 32 * 8 * 9
    assert profile.unsupported_ops == {}
    assert profile.macs == offsets + deform
    assert profile.by_kind["conv"].macs == offsets + deform
    assert [c.name for c in profile.convs] == ["offsets"], "only aten convs are planned"
