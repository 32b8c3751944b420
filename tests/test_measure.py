"""Measuring: timing discipline, BN folding, the latency-aware rule (fake timers), the cache, reports."""

import json
import re

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import dsrewrite
import dsrewrite.measure as measure_mod
from dsrewrite.cli import cli
from dsrewrite.measure import LatencyCache, LayerTiming, MeasureSettings, fold_bn, measure


class StepClock:
    """A clock whose successive timed calls take the given durations (then the last one)."""

    def __init__(self, durations):
        self.durations, self.now, self.reads = list(durations), 0.0, 0

    def __call__(self):
        self.reads += 1
        if self.reads % 2 == 0:  # the end of a timed call
            self.now += self.durations.pop(0) if len(self.durations) > 1 else self.durations[0]
        return self.now


def test_median_and_spread_from_the_clock(monkeypatch):
    monkeypatch.setattr(measure_mod, "clock", StepClock([0.010, 0.012, 0.011, 0.030, 0.011]))
    t = measure(nn.Linear(4, 4), (torch.randn(2, 4),), MeasureSettings(device="cpu", warmup=1, repeats=5))
    assert t.repeats == 5 and t.median == pytest.approx(0.011)
    assert t.p10 == pytest.approx(0.010) and t.p90 == pytest.approx(0.030)
    assert t.fingerprint["device"] == "cpu" and t.fingerprint["dtype"] == "float32"


def test_threads_and_formats_are_controlled_and_restored():
    before = torch.get_num_threads()
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["threads"] = torch.get_num_threads()
            seen["channels_last"] = x.is_contiguous(memory_format=torch.channels_last)
            seen["grad"] = torch.is_grad_enabled()
            seen["dtype"] = x.dtype
            return x

    t = measure(Probe(), (torch.randn(1, 3, 8, 8),),
                MeasureSettings(device="cpu", threads=1, memory_format="channels_last", dtype="bfloat16", repeats=2))
    assert seen == {"threads": 1, "channels_last": True, "grad": False, "dtype": torch.bfloat16}
    assert torch.get_num_threads() == before
    assert t.fingerprint["threads"] == 1 and t.fingerprint["memory_format"] == "channels_last"


def test_bad_settings_are_usage_errors():
    with pytest.raises(dsrewrite.DsrewriteError, match="unknown memory format"):
        measure(nn.Identity(), (torch.zeros(1),), MeasureSettings(memory_format="nhwc"))
    if not torch.cuda.is_available():
        with pytest.raises(dsrewrite.DsrewriteError, match="not available"):
            MeasureSettings(device="cuda").resolved_device()


def test_fold_bn_is_exact_and_respects_shared_convs():
    model = torchvision.models.resnet18().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.running_mean, -1, 1)
            nn.init.uniform_(m.running_var, 0.5, 2)
    folded = fold_bn(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4)
    assert not any(n.op == "call_module" and isinstance(folded.get_submodule(n.target), nn.BatchNorm2d)
                   for n in folded.graph.nodes)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn1(self.conv(x)) + self.bn2(self.conv(x))

    shared = Shared().eval()
    nn.init.uniform_(shared.bn1.running_mean, -1, 1)
    folded = fold_bn(shared)
    with torch.no_grad():
        assert torch.allclose(folded(x), shared(x), atol=1e-5), "a conv used at two sites is not folded"


def fake_timer(speedups):
    """Per-layer timer: the replacement runs ``speedups(conv)`` times faster; counts its calls."""
    def timer(conv, depth_multiplier, bn, activation):
        timer.calls += 1
        return LayerTiming(0.004, 0.004 / speedups(conv))
    timer.calls = 0
    return timer


def test_latency_rule_keeps_layers_that_measured_too_slow():
    model = torchvision.models.resnet18()
    timer = fake_timer(lambda c: 1.03 if c.in_channels == 64 else 3.0)
    plan = dsrewrite.plan_model(model, (1, 3, 64, 64), "latency", ["replace.min_measured_speedup=1.2"],
                                layer_timer=timer)
    d = {x.name: x for x in plan.decisions}
    assert d["layer1.0.conv1"].reason == "kept: measured 1.03× on cpu/" \
        f"{torch.get_num_threads()} threads, below 1.2×"
    assert d["layer3.0.conv1"].replaced and d["layer3.0.conv1"].reason.endswith("measured 3.00×")
    assert d["layer3.0.conv1"].measured_speedup == pytest.approx(3.0)
    assert not any(x.replaced and x.measured_speedup < 1.2 for x in plan.decisions)
    assert timer.calls == 16, "every 3×3 conv is a candidate (the stem is 7×7)"


def test_layer_timings_are_cached(tmp_path, monkeypatch):
    calls = []

    def fake_time_layer(conv, *args, **kwargs):
        calls.append(conv.name)
        return LayerTiming(0.002, 0.001)

    monkeypatch.setattr(measure_mod, "time_layer", fake_time_layer)
    monkeypatch.setenv("DSREWRITE_CACHE_DIR", str(tmp_path))
    model = torchvision.models.resnet18()
    dsrewrite.plan_model(model, (1, 3, 64, 64), "latency")
    first = len(calls)
    assert first == 7 and (tmp_path / "latency-v1.json").exists(), "16 candidates, 7 distinct geometries"
    dsrewrite.plan_model(model, (1, 3, 64, 64), "latency")
    assert len(calls) == first, "the second run reads every timing from the cache"
    cache = LatencyCache(tmp_path / "latency-v1.json")
    assert len(cache.entries) == len({tuple(c.input_shape) + (c.in_channels, c.out_channels, c.stride)
                                      for c in dsrewrite.analyze(model, (1, 3, 64, 64)).convs
                                      if c.kind == "standard" and c.index > 0})


def test_convert_measure_report(monkeypatch, tmp_path):
    monkeypatch.setattr(measure_mod, "clock", StepClock([0.01]))
    monkeypatch.setenv("DSREWRITE_CACHE_DIR", str(tmp_path / "cache"))
    result = dsrewrite.convert(torchvision.models.resnet18(), (1, 3, 64, 64), "default", measure=True,
                               measure_settings=MeasureSettings(device="cpu", repeats=3, warmup=1))
    m = result.report.measurement
    assert m["speedup"] == pytest.approx(1.0) and m["before"]["median_s"] == pytest.approx(0.01)
    assert m["theoretical_speedup"] == pytest.approx(result.report.ratios()["macs"])
    assert m["realization"] == pytest.approx(1.0 / m["theoretical_speedup"])
    assert all(layer.measured_speedup == pytest.approx(1.0) for layer in result.report.layers)


def test_cli_measure_writes_a_self_contained_html_report(monkeypatch, tmp_path):
    monkeypatch.setattr(measure_mod, "clock", StepClock([0.02, 0.01]))
    monkeypatch.setenv("DSREWRITE_CACHE_DIR", str(tmp_path / "cache"))
    report = tmp_path / "report.html"
    r = CliRunner().invoke(cli, ["convert", "examples/resnet.py", "--input-shape", "1,3,64,64", "--measure",
                                 "--repeats", "2", "--threads", "1", "--report", str(report), "-q"])
    assert r.exit_code == 0, r.output
    page = report.read_text()
    assert page.startswith("<!doctype html>") and page.count("<svg") >= 3
    assert "End-to-end latency" in page and "realization" in page and "Every conv and its decision" in page
    assert not re.search(r"(src|href)=['\"]?https?:", page), "no network resources"
    doc = json.loads(re.search(r"id='dsrewrite-report'>(.*?)</script>", page, re.S).group(1))
    assert doc["measurement"]["fingerprint"]["threads"] == 1 and doc["replaced_modules"] == 13
    md = tmp_path / "report.md"
    r = CliRunner().invoke(cli, ["convert", "examples/resnet.py", "--input-shape", "1,3,64,64", "--measure",
                                 "--repeats", "2", "--report", str(md), "-q"])
    assert "## Measured speedup" in md.read_text() and "measured speedup" in md.read_text()
