"""timm models that once broke the converter, and the general cause behind them."""

import pytest
import timm
import torch
from torch import nn

import dsrewrite
from dsrewrite.trace import trace


class CachesInForward(nn.Module):
    """Like timm's LeViT attention: eval-mode forward caches a derived tensor on the module, keyed by device."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.bias = nn.Parameter(torch.zeros(64))
        self.cache = {}

    def forward(self, x):
        key = str(x.device)
        if self.training or key not in self.cache:
            self.cache[key] = self.bias.view(1, -1, 1, 1) * 2
        return self.conv(x) + self.cache[key]


def test_tracing_leaves_no_proxy_in_module_state():
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), CachesInForward(), CachesInForward())
    first = trace(model)
    assert all(not m.cache for m in model.modules() if isinstance(m, CachesInForward)), "the cache is put back"
    second = trace(model)
    assert [n.name for n in first.graph.nodes] == [n.name for n in second.graph.nodes]
    result = dsrewrite.convert(model, (1, 3, 16, 16), "aggressive", ["keep.first_convs=1"])
    assert len(result.report.layers) == 2
    x = torch.randn(1, 3, 16, 16)
    assert result.model.eval()(x).shape == (1, 64, 16, 16)


@pytest.mark.parametrize("name", ["levit_128s", "levit_conv_128s"])
def test_levit_family_analyzes_converts_and_trains(name):
    """It ended in 'internal error: KeyError: getitem_6' while profiling the converted model."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    analysis = dsrewrite.analyze(model, (1, 3, 224, 224))
    assert not analysis.trace.untraced and analysis.convs
    result = dsrewrite.convert(model, (1, 3, 224, 224), "aggressive", analysis=analysis)
    assert result.after.profile.macs <= result.before.profile.macs
    converted = result.model.train()
    out = converted(torch.randn(2, 3, 224, 224))
    out = out[0] if isinstance(out, tuple) else out
    out.square().mean().backward()
    assert all(p.grad is not None for p in converted.parameters() if p.requires_grad)
