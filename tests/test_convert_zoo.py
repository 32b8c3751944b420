"""Table-driven conversion of real zoo models with every preset (small inputs)."""

import pytest
import torch
import torchvision
from torch.utils._pytree import tree_flatten

import dsrewrite
from dsrewrite.api import plan_model

MODELS = {
    # name: input size (inception_v3 needs at least 75×75)
    "resnet18": 64, "resnet50": 64, "vgg16_bn": 64, "densenet121": 64, "googlenet": 64, "inception_v3": 96,
    "regnet_y_400mf": 64, "convnext_tiny": 64, "mobilenet_v2": 64, "efficientnet_b0": 64,
    "squeezenet1_1": 64, "shufflenet_v2_x1_0": 64,
}
PRESETS = ["default", "conservative", "aggressive", "mobile"]
_cache = {}


def zoo(name):
    if name not in _cache:
        kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        torch.manual_seed(0)
        _cache[name] = torchvision.models.get_model(name, weights=None, **kwargs)
    return _cache[name]


def outputs(out):
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_preset_converts(name):
    model = zoo(name)
    size = MODELS[name]
    shape = (2, 3, size, size)
    x = torch.randn(*shape)
    with torch.no_grad():
        reference = outputs(model.eval()(x))
    model.train()
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    for preset in PRESETS:
        result = dsrewrite.convert(model, shape, rules=preset)
        converted = result.model
        # output shape unchanged
        with torch.no_grad():
            got = outputs(converted.eval()(x))
        assert [t.shape for t in got] == [t.shape for t in reference], preset
        # the plan is deterministic
        again = plan_model(model, shape, preset, analysis=result.before)
        assert again.to_dict() == result.plan.to_dict(), preset
        # converting the converted model changes nothing (its plan replaces nothing)
        assert dsrewrite.plan_model(converted, shape, preset).replacements == [], preset
        # numbers add up: the report's MACs are the re-analyzed model's
        assert result.report.after["macs"] == result.after.profile.macs
        if result.plan.replacements:
            assert result.report.after["macs"] < result.report.before["macs"], preset
        # forward and backward in train mode
        converted.train()
        loss = sum(t.float().sum() for t in outputs(converted(x)))
        loss.backward()
        for layer in result.report.layers:
            block = converted.get_submodule(layer.name)
            assert isinstance(block, dsrewrite.DepthwiseSeparableConv2d)
            assert block.depthwise.weight.grad is not None and block.pointwise.weight.grad is not None
    # the user's model is never touched
    assert all(torch.equal(v, original_state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
def test_full_rank_blocks_reproduce_the_model(name, activation):
    """With depth multiplier ≥ min(K², C_out) the rewrite is exact, BN and activation included."""
    size = MODELS[name]
    result = dsrewrite.convert(zoo(name), (2, 3, size, size), rules="default", overrides=[
        "block.depth_multiplier=9", "replace.min_mac_reduction=0", "block.bn=true", f"block.activation={activation}",
        "keep.first_depth_fraction=0", "keep.downsampling=false"])
    # these have no standard 3×3 conv at all (depthwise, grouped or 1×1 only, or 7×7 depthwise)
    if name not in ("shufflenet_v2_x1_0", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf"):
        assert result.report.layers, "this model has 3×3 standard convs to replace"
    assert result.report.fidelity["relative_error"] < 1e-4
    assert all(layer.kept_energy == pytest.approx(1.0) for layer in result.report.layers)
