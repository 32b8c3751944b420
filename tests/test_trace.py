"""The second tracer: modules torch.fx refuses are traced again with the input's concrete shapes.

Each case is a real model whose generic fx trace leaves opaque leaves (Python control flow on
shapes, TF-style "same" padding), or a small module built to show one behaviour.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

import dsrewrite
from dsrewrite.channels import model_channel_graph
from dsrewrite.plan import load_plan
from dsrewrite.profile import profile
from dsrewrite.report import render_analysis
from dsrewrite.rules import load_rules_dict
from dsrewrite.trace import VALUE_DEPENDENT, trace
from models import Gate

#: (timm model, what generic fx made of it): leaves that shape control flow caused
TIMM_CASES = [
    ("tf_efficientnet_b0", "opaque_convs"),        # Conv2dSame at stride 2
    ("tf_mobilenetv3_large_100", "opaque_convs"),
    ("efficientvit_m0", "specialized"),            # LocalWindowAttention: if H == ws, window padding
    ("cpubone_nano", "specialized"),               # ConvAttention: pads odd sizes, crops after upsampling
]


@pytest.mark.parametrize("name,how", TIMM_CASES)
def test_timm_models_that_fx_refuses_analyze_with_no_leaves(name, how):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    shape = (1, 3, 224, 224)
    generic = trace(model)
    assert generic.untraced, "generic fx still refuses these modules (else this test tests nothing)"
    analysis = dsrewrite.analyze(model, shape)
    assert not analysis.trace.untraced
    assert set(getattr(analysis.trace, how)) == set(generic.untraced)
    assert all(c.traced and c.fx_node for c in analysis.convs)
    # the dispatch-level count did not depend on how the model was traced
    assert analysis.profile.macs == profile(generic, (torch.empty(shape, device="meta"),)).macs
    # the graph computes what the model computes
    x = torch.randn(shape)
    gm = torch.fx.GraphModule(model, analysis.trace.graph)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


class Windowed(nn.Module):
    """Pads to a multiple of the window when the size is not one, convolves, crops back: shape control flow."""

    def __init__(self, channels: int = 64, window: int = 8):
        super().__init__()
        self.window = window
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        _, _, h, w = x.shape
        if h % self.window or w % self.window:
            x = F.pad(x, (0, (-w) % self.window, 0, (-h) % self.window))
        return F.relu(self.bn(self.conv(x)))[..., :h, :w]


class Net(nn.Module):
    def __init__(self, middle: nn.Module, channels: int = 64):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.middle = middle
        self.head = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.head(self.middle(F.relu(self.stem(x))))


def _rules(**overrides):
    doc = {"keep": {"first_convs": 0, "downsampling": False, "first_depth_fraction": 0.0},
           "replace": {"min_in_channels": 8, "min_macs_share": 0.0, "min_mac_reduction": 0.0}}
    for key, value in overrides.items():
        section, name = key.split("__")
        doc.setdefault(section, {})[name] = value
    return load_rules_dict(doc, "test")


def test_shape_control_flow_is_specialized_and_its_conv_replaced():
    torch.manual_seed(0)
    model = Net(Windowed()).eval()
    shape = (1, 3, 20, 28)
    analysis = dsrewrite.analyze(model, shape)
    assert list(analysis.trace.specialized) == ["middle"] and not analysis.trace.untraced
    inner = next(c for c in analysis.convs if c.module_name == "middle.conv")
    assert inner.traced and inner.input_shape == (1, 64, 24, 32), "the padded size, as this input takes the branch"
    # the channel graph sees through it: the middle conv's output group is resizable
    groups = model_channel_graph(analysis.trace, analysis.inputs).groups
    middle = next(g for g in groups if "middle.conv.out" in g.producers)
    assert not middle.frozen
    # exact family at full rank: the converted model is the same function, at this and at other sizes
    result = dsrewrite.convert(model, shape, _rules(block__family="spatial", block__rank=10**6), analysis=analysis)
    assert "middle.conv" in result.plan.modules_to_replace
    for size in (shape, (2, 3, 16, 16), (1, 3, 13, 9)):
        x = torch.randn(size)
        with torch.no_grad():
            torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)
    text = render_analysis(analysis, "table")
    assert "Traced at this input shape" in text and "middle" in text
    # and a width resize goes through it (the re-trace of the result is specialized the same way)
    narrow = dsrewrite.convert(model, shape, _rules(align__width=0.5), analysis=analysis).model
    assert narrow.middle.conv.pointwise.out_channels == 32 and narrow.stem.out_channels == 32
    for size in (shape, (1, 3, 13, 9)):
        assert narrow(torch.randn(size)).shape == (size[0], 64, size[2], size[3])


def test_value_dependent_control_flow_stays_a_leaf_with_that_reason():
    model = Net(Gate(), channels=8).eval()  # a branch on x.sum(): no input shape decides it
    analysis = dsrewrite.analyze(model, (1, 3, 16, 16))
    assert list(analysis.trace.untraced) == ["middle"]
    assert VALUE_DEPENDENT in analysis.trace.untraced["middle"]
    plan = dsrewrite.plan_model(model, (1, 3, 16, 16), rules=_rules(), analysis=analysis)
    kept = next(d for d in plan.decisions if d.module_name == "middle.conv")
    assert kept.action == "keep" and "untraced" in kept.reason


class Scaled(nn.Conv2d):
    """A conv subclass whose forward does more than convolve."""

    def forward(self, x):
        return super().forward(x) * 2


class SameNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Conv2dSame(16, 64, 3)
        self.b = Conv2dSame(64, 64, 3)
        self.down = Conv2dSame(64, 64, 3, stride=2)
        self.scaled = Scaled(64, 64, 3, padding=1)

    def forward(self, x):
        return self.scaled(self.down(F.relu(self.b(F.relu(self.a(x))))))


@pytest.mark.parametrize("family,rank", [("spatial", 10**6), ("bottleneck", 10**6)])
def test_tf_same_convs_keep_their_padding_in_the_block(family, rank):
    torch.manual_seed(0)
    model = SameNet().eval()
    shape = (1, 16, 33, 33)
    analysis = dsrewrite.analyze(model, shape)
    assert set(analysis.trace.opaque_convs) == {"a", "b", "down"} and not analysis.trace.untraced
    rows = {c.module_name: c for c in analysis.convs}
    assert rows["b"].own_forward == "pads" and rows["b"].input_padding == (1, 1, 1, 1)
    assert rows["b"].block_padding == (1, 1) and rows["down"].block_padding is None
    assert rows["scaled"].own_forward == "custom"
    result = dsrewrite.convert(model, shape, _rules(block__family=family, block__rank=rank), analysis=analysis)
    decisions = {d.module_name: d for d in result.plan.decisions}
    assert decisions["a"].replaced and decisions["b"].replaced and "for 'same'" in decisions["b"].block_text
    assert not decisions["down"].replaced and "depends on the input size" in decisions["down"].reason
    assert not decisions["scaled"].replaced and "runs its own code" in decisions["scaled"].reason
    for size in (shape, (2, 16, 20, 27)):  # TF "same" at stride 1 is the same padding at every size
        x = torch.randn(size)
        with torch.no_grad():
            torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_saved_plan_carries_the_block_padding():
    model = SameNet().eval()
    shape = (1, 16, 33, 33)
    plan = dsrewrite.plan_model(model, shape, rules=_rules(block__family="separable"))
    doc = plan.to_dict()
    row = next(r for r in doc["decisions"] if r["module_name"] == "b")
    assert row["block_padding"] == [1, 1]
    again = load_plan(doc, dsrewrite.analyze(model, shape))
    assert again.modules_to_replace["b"].block_padding == (1, 1)


def test_a_module_shared_by_two_parents_gets_its_own_parameters_back():
    """timm's CoaT hands one conv module to several blocks; analysis once left it with meta parameters."""
    shared = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(shared), nn.Sequential(shared)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dsrewrite.analyze(model, (1, 3, 16, 16))
    result = dsrewrite.convert(model, (1, 3, 16, 16), _rules())
    for m in (model, result.model):
        assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n])
    result.model.train()(torch.randn(2, 3, 16, 16)).square().mean().backward()


def test_detection_model_that_caches_tensors_on_the_input_device_falls_back_to_a_real_forward():
    """torchvision's AnchorGenerator moves its cell anchors to the input's device: the meta pass left them
    on meta, and the real-forward fallback then failed on them."""
    from torchvision.models import get_model

    model = get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, weights_backbone=None).eval()
    analysis = dsrewrite.analyze(model, (1, 3, 320, 320))
    assert analysis.profile.propagation == "real" and analysis.profile.macs > 0
    anchors = model.rpn.anchor_generator.cell_anchors
    assert all(not a.is_meta for a in anchors)


class KwargsNet(nn.Module):
    """A forward fx cannot trace even with concrete shapes (it writes into ``**kwargs``, as HuggingFace's do)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.body = nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x, **kwargs):
        kwargs["scale"] = 2.0
        return self.body(F.relu(self.stem(x))) * kwargs["scale"]


def test_a_model_fx_cannot_trace_falls_back_to_torch_export_and_still_converts():
    torch.manual_seed(0)
    model = KwargsNet().eval()
    shape = (1, 3, 16, 16)
    analysis = dsrewrite.analyze(model, shape)
    assert analysis.trace.method == "export" and not analysis.trace.untraced
    assert "torch.export" in analysis.trace.specialized[""]
    assert [(c.module_name, c.traced) for c in analysis.convs] == [("stem", True), ("body", True)]
    result = dsrewrite.convert(model, shape, _rules(block__family="spatial", block__rank=10**6), analysis=analysis)
    assert list(result.plan.modules_to_replace) == ["body"]
    assert type(result.model) is KwargsNet
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-4)


class WritesInPlace(nn.Module):
    """timm's MViTv2 adds relative positions with ``attn[:, :, 1:, 1:] = ...`` behind shape arithmetic."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[-1] > 4:
            y[:, :, 1:, 1:] = y[:, :, 1:, 1:] * 2
        return y


def test_in_place_item_assignment_inside_a_specialized_module_is_recorded():
    torch.manual_seed(0)
    model = Net(nn.Sequential(nn.Conv2d(64, 8, 1), WritesInPlace(), nn.Conv2d(8, 64, 1))).eval()
    analysis = dsrewrite.analyze(model, (1, 3, 8, 8))
    assert not analysis.trace.untraced and list(analysis.trace.specialized) == ["middle.1"]
    gm = torch.fx.GraphModule(model, analysis.trace.graph)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_analysis_leaves_the_users_model_as_it_was():
    """torch.fx keeps constants a forward creates as attributes of the traced root: on a copy, not the user's model."""

    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + torch.tensor([1.0])

    model = Offset().eval()
    before = set(vars(model))
    analysis = dsrewrite.analyze(model, (1, 3, 8, 8))
    assert set(vars(model)) == before and analysis.profile.macs == 8 * 27 * 64
    result = dsrewrite.convert(model, (1, 3, 8, 8), "aggressive", ["replace.min_in_channels=0",
                                                                    "replace.min_mac_reduction=0"])
    assert set(vars(model)) == before and not hasattr(result.model, "_tensor_constant0")
