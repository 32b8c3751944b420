"""Channel groups, exact alignment and the width multiplier (dsrewrite.channels, dsrewrite.resize)."""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import dsrewrite
from dsrewrite.cli import cli
from dsrewrite.resize import apply_resize, plan_resize

from models import ChannelMix, OddWidths

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import odd_widths  # noqa: E402

ZOO = ["resnet18", "resnet50", "densenet121", "googlenet", "regnet_y_400mf", "shufflenet_v2_x1_0"]


def _zoo(name):
    torch.manual_seed(0)
    kwargs = {"init_weights": True} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(weights=None, **kwargs).eval()


def _randomize_bn(model):
    """Non-trivial BN statistics, so a non-neutral new channel would show in the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def _groups(model, shape):
    return dsrewrite.analyze(model, shape).channel_groups()


def _resized(model, shape, divisor, width=None):
    graph = _groups(model, shape)
    plan = plan_resize(model, graph, divisor, width)
    return apply_resize(copy.deepcopy(model), graph, plan), plan, graph


# (model, input shape, divisor): divisor 24 forces padding on every torchvision group (widths are multiples of 8)
EXACT = [(name, (2, 3, 64, 64), 24) for name in ZOO] + [("odd", (2, 3, 16, 16), 8),
                                                         ("odd_widths_example", (2, 3, 64, 64), 8)]


def _model(name):
    if name == "odd":
        return OddWidths().eval()
    if name == "odd_widths_example":
        torch.manual_seed(0)
        return odd_widths.build_model().eval()
    return _zoo(name)


@pytest.mark.parametrize("name,shape,divisor", EXACT)
def test_alignment_is_exact(name, shape, divisor):
    model = _randomize_bn(_model(name))
    new, plan, graph = _resized(model, shape, divisor)
    assert plan.exact and plan.changed, "alignment must add channels, never remove them"
    x = torch.randn(shape)
    with torch.no_grad():
        diff = (model(x) - new(x)).abs().max().item()
    assert diff < 1e-5
    # every resizable group is now a multiple of the divisor, and a second alignment is a no-op
    again = _groups(new, shape)
    assert all(g.width % divisor == 0 for g in again.resizable)
    assert not plan_resize(new, again, divisor).changed
    # the input channels and the classes never change
    assert new(x).shape == model(x).shape


def test_odd_widths_groups_and_widths():
    model = OddWidths().eval()
    graph = _groups(model, (1, 3, 16, 16))
    by_member = {m: g for g in graph.groups for m in g.members}
    stream = by_member["stem.0.out"]
    assert stream.resizable and stream.width == 100
    assert {"block1.3.out", "block1.4.features", "left.in", "right.0.in"} <= set(stream.members)
    # the concat: 60 + 40 channels, each its own group, both spanned by the BN and the next conv
    assert by_member["left.out"].width == 60 and by_member["right.0.out"].width == 40
    assert by_member["left.out"] is not by_member["right.0.out"]
    assert "joined.features" in by_member["left.out"].members and "joined.features" in by_member["right.0.out"].members
    # the 250 stream: the downsampling conv, the depthwise conv, the pointwise, the gate's expansion, the Linear
    wide = by_member["down.0.out"]
    assert {"block2.0.depthwise", "block2.3.out", "gate.3.out", "head.in"} <= set(wide.members)
    assert by_member["head.out"].frozen == ["model output"]
    new, plan, _ = _resized(model, (1, 3, 16, 16), 8)
    widths = {c.old_width: c.new_width for c in plan.changed}
    assert widths == {100: 104, 60: 64, 250: 256, 30: 32}
    assert new.head.in_features == 256 * 4 and new.block2[0].groups == 256 and new.right[1].num_parameters == 40
    assert new.joined.num_features == 104


def test_concat_added_to_a_conv_output_splits_the_conv_into_the_concat_groups():
    model = _model("odd_widths_example")
    graph = _groups(model, (1, 3, 64, 64))
    by_member: dict = {}
    for g in graph.groups:
        for m in g.members:
            by_member.setdefault(m, []).append(g)
    (left,) = by_member["mixed.1.a.0.out"]
    (right,) = by_member["mixed.1.b.1.0.out"]
    assert (left.width, right.width) == (120, 130) and left.resizable and right.resizable
    # each residual block's last conv produces both runs: its outputs are added to the concat
    for block in ("stage2.0", "stage2.1", "stage2.3"):
        assert by_member[f"{block}.body.1.out"] == [left, right]
        assert f"{block}.body.1.out" in left.producers and f"{block}.body.1.out" in right.producers
    assert [g.frozen for g in graph.groups if g.members and not g.resizable] == [["model input"], ["model output"]]
    new, plan, _ = _resized(model, (1, 3, 64, 64), 8, 0.75)
    assert new.stage2[0].body[1].out_channels == new.mixed[1].bn.num_features == 88 + 96  # make_divisible(90) + make_divisible(97.5)
    new.train()
    new(torch.randn(2, 3, 64, 64)).sum().backward()


def test_frozen_group_is_listed_and_left_alone():
    model = ChannelMix().eval()
    graph = _groups(model, (1, 3, 8, 8))
    by_member = {m: g for g in graph.groups for m in g.members}
    shuffled = by_member["a.out"]
    assert not shuffled.resizable
    assert any("view" in reason for reason in shuffled.frozen)
    assert not by_member["b.in"].resizable, "the consumer of the shuffled channels is frozen too"
    assert by_member["b.out"].resizable and by_member["c.out"].resizable
    new, plan, _ = _resized(model, (1, 3, 8, 8), 8)
    assert shuffled.id in [g for g, _, _ in plan.frozen]
    assert new.a.out_channels == 20 and new.b.in_channels == 20
    assert new.b.out_channels == 24 and new.c.in_channels == 24 and new.c.out_channels == 16
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert (model(x) - new(x)).abs().max() < 1e-5


def test_resnet50_groups_match_the_architecture():
    graph = _groups(_zoo("resnet50"), (1, 3, 64, 64))
    by_member = {m: g for g in graph.groups for m in g.members}
    # each stage's residual stream is one group: every block's last conv, the downsample, the next stage's entry
    for stage, blocks, width in [(1, 3, 256), (2, 4, 512), (3, 6, 1024), (4, 3, 2048)]:
        stream = by_member[f"layer{stage}.0.downsample.0.out"]
        assert stream.width == width and stream.resizable
        expected = {f"layer{stage}.{b}.conv3.out" for b in range(blocks)}
        expected |= {f"layer{stage}.{b}.conv1.in" for b in range(1, blocks)}
        assert expected <= set(stream.members)
        assert stream.producers == [f"layer{stage}.0.conv3.out", f"layer{stage}.0.downsample.0.out"] + [
            f"layer{stage}.{b}.conv3.out" for b in range(1, blocks)]
    assert "fc.in" in by_member["layer4.0.downsample.0.out"].members
    # inside each bottleneck: conv1 → bn1 → conv2, and conv2 → bn2 → conv3, each its own group
    inner = by_member["layer2.1.conv1.out"]
    assert set(inner.members) == {"layer2.1.conv1.out", "layer2.1.bn1.features", "layer2.1.conv2.in"}
    assert by_member["conv1.in"].frozen == ["model input"]
    # 4 streams + 16 blocks × 2 inner groups + the stem, plus the frozen input and output
    assert len(graph.resizable) == 4 + 16 * 2 + 1
    assert sum(1 for g in graph.groups if g.members and not g.resizable) == 2


@pytest.mark.parametrize("name", ZOO)
def test_width_half_runs_and_aligns(name):
    model = _zoo(name)
    shape = (2, 3, 64, 64)
    new, plan, graph = _resized(model, shape, 8, 0.5)
    assert plan.changed and not plan.exact
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in new.parameters())
    assert after < 0.75 * before
    again = _groups(new, shape)
    assert all(g.width % 8 == 0 for g in again.resizable)
    new.train()
    outs = new(torch.randn(shape))  # googlenet in training mode: logits and two auxiliary heads
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in new.parameters() if p.requires_grad)
    assert all(o.shape == (2, 1000) for o in outs)


def test_width_keeps_the_most_important_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].weight[[2, 5, 11, 13, 14, 15, 0, 7]] *= 1000  # the 8 channels that matter
    new, plan, _ = _resized(model, (1, 3, 8, 8), 8, 0.5)
    (change,) = plan.changed
    assert change.keep == [0, 2, 5, 7, 11, 13, 14, 15]
    assert torch.equal(new[0].weight, model[0].weight[change.keep])
    assert torch.equal(new[2].weight, model[2].weight[:, change.keep])


def test_convert_then_align_in_order_and_idempotent():
    model = OddWidths().eval()
    result = dsrewrite.convert(model, (2, 3, 16, 16), "aggressive",
                               ["replace.min_in_channels=0", "replace.min_mac_reduction=0", "block.depth_multiplier=3"],
                               align=8)
    ch = result.report.channels
    assert ch["exact"] and ch["changed"]
    assert result.report.fidelity["relative_error"] < 0.5  # the lossy part is the separable rewrite only
    groups = result.after.channel_groups()
    assert all(g.width % 8 == 0 for g in groups.resizable)
    # a second conversion with alignment changes nothing
    again = dsrewrite.convert(result.model, (2, 3, 16, 16), "aggressive",
                              ["replace.min_in_channels=0", "replace.min_mac_reduction=0"], align=8)
    assert not again.plan.replacements and not again.report.channels["changed"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (again.model(x) - result.model(x)).abs().max() < 1e-5


def test_alignment_of_a_converted_model_is_exact_through_depth_multiplied_blocks():
    model = _randomize_bn(OddWidths().eval())
    converted = dsrewrite.convert(model, (2, 3, 16, 16), "aggressive", [
        "replace.min_in_channels=0", "replace.min_mac_reduction=0", "block.depth_multiplier=3",
        "block.activation=relu"]).model.eval()
    new, plan, graph = _resized(converted, (2, 3, 16, 16), 8)
    assert plan.exact and plan.changed
    # a block's mid channels follow its input group × its multiplier (AlignChannels made it 4 for 100
    # input channels): 100 → 104 input channels, 400 → 416 mid channels
    block = new.block1[0]
    assert converted.block1[0].mid_channels == 400
    assert (block.in_channels, block.mid_channels, block.bn.num_features) == (104, 416, 416)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (converted(x) - new(x)).abs().max() < 1e-5


def test_cli_groups_and_align(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["analyze", "torchvision:resnet18", "--groups", "--input-shape", "1,3,64,64"])
    assert res.exit_code == 0, res.output
    assert "12 resizable, 2 frozen" in res.output and "model input" in res.output
    res = runner.invoke(cli, ["analyze", "torchvision:resnet18", "--groups", "--format", "json",
                              "--input-shape", "1,3,64,64"])
    assert res.exit_code == 0 and '"resizable": 12' in res.output
    out = tmp_path / "out.pt"
    res = runner.invoke(cli, ["convert", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--align", "24",
                              "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "Channel groups (aligned to multiples of 24; exact" in res.output and "64 → 72" in res.output
    assert out.exists()
    res = runner.invoke(cli, ["convert", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--width", "0.75",
                              "-q"])
    assert res.exit_code == 0 and "width ×0.75" in res.output and "64 → 48" in res.output
    html = tmp_path / "r.html"
    res = runner.invoke(cli, ["convert", "torchvision:resnet18", "--rules", "none", "--input-shape", "1,3,64,64",
                              "--width", "0.5", "-q", "--report", str(html)])
    assert res.exit_code == 0 and "Channel groups (width ×0.5, multiples of 8; lossy)" in html.read_text()
    for args, word in [(["--align", "0"], "--align"), (["--width", "1.5"], "--width"), (["--width", "0"], "--width")]:
        bad = tmp_path / "bad.pt"
        res = runner.invoke(cli, ["convert", "torchvision:resnet18", "-o", str(bad), "-q"] + args)
        assert res.exit_code == 2 and word in res.output and not bad.exists()
