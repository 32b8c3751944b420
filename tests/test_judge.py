"""Judging candidates on calibration data: block errors on the layer's real inputs, width refits.

Each number is checked against the quantity it stands for, computed the slow way (a real
conv over every position, a least-squares fit on the whole data).
"""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsrewrite
from dsrewrite.blocks import (ESTIMATE_SWEEPS, FAMILIES, InvertedResidualConv2d, MBConvConv2d, family_approximations,
                              family_errors, relative_error)
from dsrewrite.calibrate import _conv_patches
from dsrewrite.judge import family_refit_errors, output_sensitivity, refit_error, sample_inputs
from models import fashion_resnet

SMALL = (1, 1, 28, 28)


@pytest.fixture(scope="module")
def small():
    return fashion_resnet(16)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_approximations_are_the_truncations_the_weight_errors_judge(family):
    torch.manual_seed(1)
    w = torch.randn(12, 10, 3, 3)
    ranks = [1, 2, 5]
    errors = family_errors(w, family, ranks)
    got = dict(family_approximations(w, family, ranks))
    assert sorted(got) == ranks
    for r in ranks:
        assert relative_error(w, got[r]) ** 2 == pytest.approx(errors[r], rel=1e-6, abs=1e-9)


def _reference_refit(conv, block, family, x):
    """The refit the slow way: run the real block on the whole input, take its last conv's input
    patches at every position, solve least squares against the real conv's output (bias column)."""
    last = {"separable": "pointwise", "bottleneck": "expand", "inverted-residual": "project", "mbconv": "project",
            "spatial": "horizontal", "pointwise-first": "spatial"}[family]
    seen = {}
    layer = getattr(block, last)
    handle = layer.register_forward_pre_hook(lambda m, a: seen.setdefault("z", a[0].detach()))
    with torch.no_grad():
        block(x)
    handle.remove()
    z = _conv_patches(layer, seen["z"]).double()
    y = F.conv2d(x, conv.weight.detach(), None, conv.stride, conv.padding)
    y = y.permute(0, 2, 3, 1).reshape(-1, conv.out_channels).double()
    groups = layer.groups
    per = z.shape[1] // groups
    residual = 0.0
    for o in range(conv.out_channels):
        g = o * groups // conv.out_channels
        a = torch.cat([z[:, g * per:(g + 1) * per], torch.ones(len(z), 1, dtype=torch.float64)], 1)
        coef = torch.linalg.lstsq(a, y[:, o:o + 1]).solution
        residual += float((a @ coef - y[:, o:o + 1]).square().sum())
    return residual / float(y.square().sum())


#: the CP-initialized families, built as the planner's estimate builds them (ESTIMATE_SWEEPS)
FAMILY_CLASSES = {"inverted-residual": InvertedResidualConv2d, "mbconv": MBConvConv2d}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_refit_error_is_a_least_squares_fit_of_the_real_block(family, stride, padding):
    """On every position, the error equals the refit of the block's last conv done on the real block's
    activations; and it is never above the error of the block's weight-only start on the same data."""
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 8, 3, stride=stride, padding=padding)
    # correlated, non-white inputs: two channels carry most of the energy
    x = torch.randn(3, 6, 9, 9) * torch.tensor([3.0, 2.0, 0.3, 0.3, 0.1, 0.1]).view(1, 6, 1, 1)
    positions = 3 * conv(x).shape[2] * conv(x).shape[3]
    patches = sample_inputs(nn.Sequential(conv), {"0": positions}, [x[:2], x[2:]])["0"]
    assert patches.shape == (positions, 6 * 9)
    ranks = [1, 2]
    got = family_refit_errors(conv, family, ranks, patches, held_out=False)
    y = F.conv2d(x, conv.weight.detach(), None, stride, padding)
    for r, approx in family_approximations(conv.weight, family, ranks):
        block = (FAMILY_CLASSES[family].from_conv(conv, r, sweeps=ESTIMATE_SWEEPS) if family in FAMILY_CLASSES
                 else FAMILIES[family].build(conv, r))
        assert got[r] == pytest.approx(_reference_refit(conv, block, family, x), rel=1e-3, abs=1e-7)
        start = float(F.conv2d(x, (conv.weight.detach().double() - approx).float(), None, stride, padding)
                      .square().sum() / y.square().sum())
        assert got[r] <= start + 1e-6


@pytest.mark.parametrize("family", list(FAMILIES))
def test_refit_error_vanishes_at_full_rank_and_held_out_judges_honestly(family):
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(8, 4, 10, 10)
    patches = sample_inputs(nn.Sequential(conv), {"0": 4000}, [x])["0"]
    top = FAMILIES[family].max_rank(conv)
    top = top if isinstance(top, int) else max(top)
    assert family_refit_errors(conv, family, [top], patches)[top] < 1e-6
    low = family_refit_errors(conv, family, [1], patches)[1]
    assert low >= family_refit_errors(conv, family, [1], patches, held_out=False)[1] - 1e-9


def test_refit_error_recovers_copied_channels_and_charges_independent_ones():
    torch.manual_seed(4)
    base = torch.randn(4000, 6, dtype=torch.float64)
    copies = torch.cat([base, 2 * base[:, :2]], 1)  # channels 6, 7 are scaled copies of 0, 1
    w = torch.randn(5, 8, dtype=torch.float64)
    keep = torch.arange(6)
    assert refit_error(w, copies, keep, bias=False) < 1e-8
    independent = torch.randn(4000, 8, dtype=torch.float64)
    removed_share = float((w[:, 6:] ** 2).sum() / (w ** 2).sum())
    assert refit_error(w, independent, keep, bias=False) == pytest.approx(removed_share, rel=0.1)
    assert refit_error(w, independent, torch.arange(0), bias=False) == 1.0


def test_sample_inputs_is_seeded_and_bounded(small):
    batches = [torch.randn(16, *SMALL[1:]) for _ in range(3)]
    names = {"blocks.2.conv1": 100, "head": 20}
    a = sample_inputs(small, names, batches)
    b = sample_inputs(small, names, batches)
    conv = small.get_submodule("blocks.2.conv1")
    assert a["blocks.2.conv1"].shape == (100, conv.in_channels * 9)
    assert a["head"].shape == (20, small.head.in_features)
    assert all(torch.equal(a[n], b[n]) for n in names)


def test_auto_plans_with_data_judge_candidates_on_the_data(small):
    batches = [torch.randn(32, *SMALL[1:]) for _ in range(2)]
    plan = dsrewrite.plan_model(small, SMALL, "auto", ["plan.compare_on_data=false"], target_macs=0.5,
                                calibration=batches)
    weights_plan = dsrewrite.plan_model(small, SMALL, "auto", target_macs=0.5)
    assert plan.rank_choice["judged_by"] == "data" and weights_plan.rank_choice["judged_by"] == "weights"
    d = next(d for d in plan.decisions if d.name == "blocks.4.conv1")
    w = next(d for d in weights_plan.decisions if d.name == "blocks.4.conv1")
    by_data = {(c["family"], c["rank"]): c["error"] for c in d.candidates}
    by_weights = {(c["family"], c["rank"]): c["error"] for c in w.candidates}
    assert by_data.keys() == by_weights.keys()
    assert any(abs(by_data[k] - by_weights[k]) > 0.01 for k in by_data)
    assert all(0 <= e for e in by_data.values())
    from dsrewrite.report import render_plan

    assert "calibration inputs" in render_plan(plan, "markdown")
    assert "no data" in render_plan(weights_plan, "markdown")


class TwoPaths(nn.Module):
    """y = head(relu(a(x)) + scale · relu(b(x))): b's errors reach the output scaled down (scale²) compared with a's."""

    def __init__(self, scale):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)
        self.scale = scale

    def forward(self, x):
        return self.head(torch.relu(self.a(x)) + self.scale * torch.relu(self.b(x)))


def test_output_sensitivity_is_what_reaches_the_output():
    torch.manual_seed(0)
    model = TwoPaths(0.1)
    batches = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    s = output_sensitivity(model, ["a", "b", "head"], batches)
    assert s["head"] == pytest.approx(1.0, rel=1e-6), "the output layer's error is the output's"
    # a and b alike but for the scale: b's share of the output energy, and of an error's, is 0.1² of a's
    assert 0.002 < s["b"] / s["a"] < 0.05
    assert output_sensitivity(model, ["a", "b"], batches) == {k: s[k] for k in ("a", "b")}, "seeded"
    linear = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 1, bias=False))
    with torch.no_grad():
        linear[1].weight.copy_(torch.eye(8)[:, :, None, None] * 3.0)
    assert output_sensitivity(linear, ["0"], batches)["0"] == pytest.approx(1.0, rel=1e-5), \
        "a scaled identity after the layer passes its relative error on unchanged"


def test_sensitivity_weights_the_data_errors(small):
    from dsrewrite.choose import gather_candidates
    from dsrewrite.plan import candidate_decisions
    from dsrewrite.rules import load_rules

    batches = [torch.randn(32, *SMALL[1:]) for _ in range(2)]
    # candidates in the last stage only (the data sample depends on the layers sampled: the same here and in the plan)
    overrides = ["plan.group_widths=[]", "plan.compare_on_data=false", 'block.layer_family={"blocks.0.*" = "keep", "blocks.1.*" = "keep", '
                 '"blocks.2.*" = "keep", "blocks.3.*" = "keep"}']
    config = load_rules("auto", overrides)
    analysis = dsrewrite.analyze(small, SMALL)
    sites = candidate_decisions(analysis, config)
    plain = gather_candidates(small, analysis, sites, config, calibration=batches)["blocks.4.conv1"]
    weighted = gather_candidates(small, analysis, sites, config, calibration=batches,
                                 sensitivity={"blocks.4.conv1": 0.25})["blocks.4.conv1"]
    assert [c.error for c in weighted] == pytest.approx([0.25 * c.error for c in plain], rel=1e-9)
    plan = dsrewrite.plan_model(small, SMALL, config, target_macs=0.8, calibration=batches)
    from dsrewrite.report import render_plan

    measured = plan.rank_choice["sensitivity"]
    assert set(measured) >= set(plan.modules_to_replace)
    assert measured == output_sensitivity(small, sorted(measured), batches)
    # the plan's candidates carry the layer's errors weighted by its measured sensitivity
    shown = next(d for d in plan.decisions if d.name == "blocks.4.conv1").candidates
    by_key = {(c.family, c.rank): c.error for c in plain}
    assert [c["error"] for c in shown] == pytest.approx(
        [measured["blocks.4.conv1"] * by_key[(c["family"], c["rank"])] for c in shown], rel=1e-9)
    assert "reaches the model's output" in render_plan(plan, "markdown")


def test_consumer_scales_pair_each_layer_with_its_own_bn():
    """densenet121 at 224²: concatenations everywhere, and a freed conv output's id handed to a later tensor
    used to pair a 32-channel conv with a 256-feature BN (the planner then failed on the shapes)."""
    import torchvision

    from dsrewrite.calibrate import consumer_scales

    model = torchvision.models.densenet121(weights=None).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    scales = consumer_scales(model, names, torch.randn(2, 3, 224, 224))
    assert scales and all(s.numel() == model.get_submodule(n).out_channels for n, s in scales.items())
