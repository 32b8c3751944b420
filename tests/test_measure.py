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
from dsrewrite.load import load_model
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
    def timer(conv, depth_multiplier, bn, activation, family="separable"):
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


def fake_layer_timing(monkeypatch, cache_dir) -> list:
    """Replace real per-layer timing (2 ms → 1 ms) and point the latency cache at ``cache_dir``; returns the
    list of conv names timed."""
    calls = []

    def fake_time_layer(conv, *args, **kwargs):
        calls.append(conv.name)
        return LayerTiming(0.002, 0.001)

    monkeypatch.setattr(measure_mod, "time_layer", fake_time_layer)
    monkeypatch.setattr(measure_mod, "time_dense", lambda *args, **kwargs: None)
    monkeypatch.setenv("DSREWRITE_CACHE_DIR", str(cache_dir))
    return calls


def test_layer_timings_are_cached(tmp_path, monkeypatch):
    calls = fake_layer_timing(monkeypatch, tmp_path)
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


def provenance_timer(speedup_of, cached_of):
    """Per-layer timer with provenance: ``cached_of(conv)`` marks a timing as read from the cache."""
    def timer(conv, depth_multiplier, bn, activation, family="separable"):
        return LayerTiming(0.0005, 0.0005 / speedup_of(conv), cached=cached_of(conv),
                           measured_at="2026-11-20T08:00:00+00:00" if cached_of(conv) else "2026-11-25T09:00:00+00:00",
                           environment="cpu/2 threads", depth_multiplier=depth_multiplier,
                           original_p10_p90=(0.00045, 0.00055),
                           replacement_p10_p90=(0.00045 / speedup_of(conv), 0.00055 / speedup_of(conv)))
    return timer


# name: (end-to-end before durations, after durations, per-layer speedup, cached, expected findings by level,
#        expected latency card class)
HONESTY = {
    "slower model, slower layers, cached timings": (
        [0.010] * 3, [0.020] * 3, lambda c: 0.8 if c.in_channels == 64 else 2.0, lambda c: c.in_channels == 64,
        {"bad": ["The converted model is SLOWER: 2.00× the original's latency", "--rules latency",
                 "4 of 13 replaced layers measured slower than the conv they replace"],
         "info": ["Per-layer timings: 4 of 13 from the latency cache (measured 2026-11-20 08:00 UTC on cpu/2 "
                  "threads), 9 fresh; --no-cache"]},
        "bad"),
    "faster model, fresh timings": (
        [0.020] * 3, [0.010] * 3, lambda c: 2.0, lambda c: False,
        {"good": ["Measured 2.00× faster end to end (20 ms → 10 ms median, fresh)"],
         "info": ["Per-layer timings: all 13 measured fresh in this run."]},
        "good"),
    "noisy timing": (
        [0.010, 0.010, 0.030], [0.010] * 3, lambda c: 2.0, lambda c: False,
        {"warn": ["Noisy end-to-end timing (before: p10–p90 spread 200% of the median)"]},
        "warn"),
}


@pytest.mark.parametrize("case", sorted(HONESTY))
def test_reports_say_what_the_measurements_mean(case, monkeypatch):
    from dsrewrite.html import render_conversion_html
    from dsrewrite.report import conversion_findings, render_conversion

    before, after, speedup, cached, expected, card = HONESTY[case]
    monkeypatch.setattr(measure_mod, "clock", StepClock(before + after))
    model = load_model("examples/resnet.py").model
    result = dsrewrite.convert(model, (1, 3, 32, 32), "default", measure=True,
                               measure_settings=MeasureSettings(device="cpu", repeats=3, warmup=1),
                               layer_timer=provenance_timer(speedup, cached))
    doc = result.report.to_dict()
    findings = conversion_findings(doc)
    for level, starts in expected.items():
        for text in starts:
            assert any(lv == level and text in t for lv, t in findings), (level, text, findings)
    bd = doc["measurement"]["breakdown"]
    replaced = {d.index for d in result.plan.replacements}
    assert bd["replaced_calls"] == 13
    assert [layer["timing"]["source"] == "cached" for layer in doc["layers"]] == \
        [cached(c) for c in result.before.convs if c.index in replaced and c.module_name in
         {layer["name"] for layer in doc["layers"]}], "every layer says where its timing came from"
    assert bd["replaced_before_s"] == pytest.approx(0.0065) and bd["rest_before_s"] == pytest.approx(
        doc["measurement"]["before"]["median_s"] - 0.0065)
    text = render_conversion(result.report, result.plan, "table")
    assert "Where the time goes" in text and "p10–p90" in text and "latency (median, fresh)" in text
    assert ("cached 2026-11-20" in text) == any(cached(c) for c in result.before.convs)
    page = render_conversion_html(result.report, result.plan)
    assert f"<div class='card {card}'><div class='k'>latency (median, fresh)" in page
    assert "aria-label='time breakdown'" in page
    for level, starts in expected.items():
        assert f"<li class='{level}'>" in page


def test_reports_without_measurement_say_macs_are_not_latency():
    from dsrewrite.html import render_conversion_html
    from dsrewrite.report import conversion_findings

    torch.manual_seed(0)
    result = dsrewrite.convert(torchvision.models.resnet18(), (1, 3, 64, 64), "default")
    findings = conversion_findings(result.report.to_dict())
    assert findings[0][0] == "warn" and "fewer MACs is not lower latency" in findings[0][1] and \
        "--measure" in findings[0][1]
    # the random-input fidelity is labelled as what it is, seeded, and coloured by its value
    level, text = findings[-1]
    assert "seeded random N(0, 1) inputs" in text and "pessimistic bound" in text and "--calibrate" in text
    page = render_conversion_html(result.report, result.plan)
    assert f"<div class='card {level}'><div class='k'>output fidelity" in page
    assert "<div class='card warn'><div class='k'>latency</div><div class='v'>not measured" in page


def test_factories_build_the_same_untrained_weights_every_run():
    """Fidelity on an untrained model used to change from run to run (0.458, then 0.414)."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = load_model("examples/resnet.py").model, load_model("examples/resnet.py").model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(torch.get_rng_state(), state), "the caller's random state is left as it was"


def test_no_cache_neither_reads_nor_writes_the_cache(tmp_path, monkeypatch):
    calls = fake_layer_timing(monkeypatch, tmp_path)
    args = ["convert", "examples/resnet.py", "--input-shape", "1,3,32,32", "--rules", "latency", "--dry-run", "-q"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    first = len(calls)
    assert first > 0 and (tmp_path / "latency-v1.json").exists()
    r = CliRunner().invoke(cli, args + ["--format", "json"])
    assert len(calls) == first, "a second run reads the cache"
    assert all(d["timing"]["source"] == "cached" for d in json.loads(r.stdout)["decisions"] if d.get("timing"))
    (tmp_path / "latency-v1.json").unlink()
    r = CliRunner().invoke(cli, args + ["--no-cache", "--format", "json"])
    assert r.exit_code == 0 and len(calls) == 2 * first, "--no-cache measures every geometry afresh, once"
    assert all(d["timing"]["source"] == "fresh" for d in json.loads(r.stdout)["decisions"] if d.get("timing"))
    assert not (tmp_path / "latency-v1.json").exists(), "--no-cache writes nothing"
