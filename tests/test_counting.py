"""Totals against torchvision's published table: params exact, MACs within 0.5%, on 15 models."""

import pytest
import torch
import torchvision

import dsrewrite
from conftest import published_table

TABLE = published_table()


@pytest.mark.parametrize("name", sorted(TABLE))
def test_totals_match_published(name):
    ref = TABLE[name]
    model = torchvision.models.get_model(name, weights=None, **ref.get("constructor_kwargs", {}))
    analysis = dsrewrite.analyze(model, (1, 3, *ref["input_size"]))
    p = analysis.profile
    assert p.params == ref["num_params"]
    assert p.macs / 1e9 == pytest.approx(ref["gflops"], rel=0.005)
    assert p.flops == 2 * p.macs
    assert p.unsupported_ops == {}, "every op of a torchvision model has a handler or is known free"
    assert p.untraced == {} and p.trace_method == "fx" and p.propagation == "meta"
    assert sum(c.macs for c in p.convs) == p.by_kind["conv"].macs
    # analysis is a pure function of the model: it must not leave it in eval mode or change parameters
    assert model.training


def test_cost_does_not_depend_on_allocation():
    """Meta propagation: a 4096×4096 input costs no memory and gives 335× the MACs of 224×224."""
    model = torchvision.models.resnet18()
    small = dsrewrite.analyze(model, (1, 3, 224, 224)).profile
    huge = dsrewrite.analyze(model, (8, 3, 4096, 4096)).profile
    conv_small = small.by_kind["conv"].macs
    assert huge.by_kind["conv"].macs == pytest.approx(conv_small * 8 * (4096 / 224) ** 2, rel=0.01)
    assert huge.propagation == "meta"


def test_dtype_changes_bytes_not_counts():
    model = torchvision.models.mobilenet_v2()
    fp32 = dsrewrite.analyze(model, (1, 3, 224, 224)).profile
    bf16 = dsrewrite.analyze(model, torch.empty(1, 3, 224, 224, dtype=torch.bfloat16), dtype=torch.bfloat16).profile
    assert bf16.macs == fp32.macs and bf16.params == fp32.params
    assert bf16.param_bytes * 2 == fp32.param_bytes
    assert bf16.dtype == "bfloat16"
