"""What a new user of torchinfo/fvcore/ptflops expects: every module, every parametrized layer, human units,
and comparisons that refuse to mislead."""

from __future__ import annotations

import json

import pytest
import torchvision
from click.testing import CliRunner

import dsrewrite
from dsrewrite.cli import cli
from dsrewrite.units import byte_style, format_bytes, format_seconds

NET = """
from torch import nn

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn(self.conv(x)).relu()

class Net(nn.Module):
    def __init__(self, width={width}, hidden={hidden}):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.stage = nn.Sequential(Block(width), Block(width))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 8 * 8, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.stem.requires_grad_({train_stem})

    def forward(self, x):
        return self.head(self.stage(self.stem(x)))

def build_model():
    return Net()

INPUT_SHAPE = (1, 3, 8, 8)
"""


def write_net(tmp_path, width=8, hidden=32, train_stem=True):
    (tmp_path / "net.py").write_text(NET.format(width=width, hidden=hidden, train_stem=train_stem))
    return str(tmp_path / "net.py")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_module_view_counts_every_module_and_sums_to_the_totals(tmp_path):
    net = write_net(tmp_path, train_stem=False)
    doc = json.loads(run("analyze", net, "--by", "module", "--format", "json").stdout)
    rows = {m["name"]: m for m in doc["modules"]}
    analysis = dsrewrite.analyze_spec(net)
    assert rows[""]["params"] == analysis.profile.params and rows[""]["macs"] == analysis.profile.macs
    assert rows["stem"]["frozen"] == 8 * 27 + 8 and rows[""]["frozen"] == rows["stem"]["params"]
    assert rows["head.1"]["type"] == "Linear" and rows["head.1"]["macs"] == 512 * 32
    assert rows["stage"]["params"] == rows["stage.0"]["params"] + rows["stage.1"]["params"]
    assert rows["stage"]["macs"] == sum(rows[f"stage.{i}.conv"]["macs"] for i in (0, 1))
    assert rows["stage.0.bn"]["params"] == 16 and rows["stage.0.bn"]["leaf"]
    # to a depth: deeper modules are summed into their parents
    shallow = json.loads(run("analyze", net, "--by", "module", "--depth", "1", "--format", "json").stdout)
    assert {m["name"] for m in shallow["modules"]} == {"", "stem", "stage", "head"}
    assert {m["name"]: m["macs"] for m in shallow["modules"]}["stage"] == rows["stage"]["macs"]


@pytest.mark.parametrize("fmt,expect", [
    ("table", "│ ├ stage.0 (Block)"),
    ("markdown", "| ├ head (Sequential)"),
    ("csv", "stage.0.conv,Conv2d,3,"),
])
def test_module_view_in_every_format(tmp_path, fmt, expect):
    r = run("analyze", write_net(tmp_path, train_stem=False), "--by", "module", "--format", fmt)
    assert r.exit_code == 0 and expect in r.stdout
    if fmt != "csv":
        assert "frozen params" in r.stdout


def test_module_view_on_a_zoo_model_matches_the_published_params():
    analysis = dsrewrite.analyze(torchvision.models.resnet50(), (1, 3, 224, 224))
    rows = {r.name: r for r in analysis.modules(2)}
    assert rows[""].params == 25557032 and rows["fc"].params == 2049000
    assert sum(rows[n].macs for n in ("conv1", "layer1", "layer2", "layer3", "layer4", "fc")) == rows[""].macs


@pytest.mark.parametrize("args,message", [
    (["--depth", "2"], "--depth applies to --by module"),
    (["--by", "module", "--depth", "-1"], "--depth must be 0 or more"),
    (["--by", "module", "--groups"], "not both"),
])
def test_module_view_bad_flags(tmp_path, args, message):
    r = run("analyze", write_net(tmp_path), *args)
    assert r.exit_code == 2 and message in r.output


def test_analyze_quiet_writes_silently(tmp_path):
    r = run("analyze", write_net(tmp_path), "-q", "-o", tmp_path / "a.txt")
    assert r.exit_code == 0 and r.output == "" and (tmp_path / "a.txt").exists()


def test_check_why_lists_linear_layers_and_names_the_block_that_grew(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_net(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.dsrewrite.check]\nbaseline = "baseline.json"\n\n[[tool.dsrewrite.check.budget]]\nname = "net"\n'
        'model = "net.py"\nparams = { max-increase = "1%" }\n')
    assert run("check", "--update-baseline").exit_code == 0
    write_net(tmp_path, hidden=48)  # widen the head: +8K params in Linear layers only
    r = run("check", "--why", "-q")
    assert r.exit_code == 1
    assert "head (Sequential) changed most: +8.37K params" in r.stdout
    lines = [line.split() for line in r.stdout.splitlines()]
    assert ["head.1", "Linear", "changed", "+8.21K", "+8.19K"] in lines
    assert ["head.3", "Linear", "changed", "+160", "+160"] in lines
    assert ["layer", "type", "change", "Δ", "params", "Δ", "MACs"] in lines, "every column has a header"
    doc = json.loads(run("check", "--why", "--format", "json", "-q").stdout)
    assert doc["budgets"][0]["why_blocks"][0]["name"] == "head"


@pytest.mark.parametrize("flags,expect", [
    (["--max-param-bytes", "50MB"], "parameter bytes 72.7 kB within budget (limit 50 MB, headroom 49.9 MB, 99.9%)"),
    (["--max-param-bytes", "50KiB"], "parameter bytes exceed the limit by 21 KiB"),
    (["--max-params", "20K"], "params 18.2K params within budget (limit 20K params, headroom 1.83K, 9.2%)"),
    (["--max-macs", "100K"], "MACs exceed the limit by 4.26K MACs"),
])
def test_check_speaks_in_the_users_units(tmp_path, flags, expect):
    r = run("check", write_net(tmp_path), *flags, "-q")
    assert expect in r.stdout, r.stdout
    assert "e+" not in r.stdout and "e-0" not in r.stdout


@pytest.mark.parametrize("value,text", [(2.664, "2.66 s"), (0.0123, "12.3 ms"), (4.2e-5, "42 µs"), (2660.0, "2660 s")])
def test_seconds_never_use_an_exponent(value, text):
    assert format_seconds(value) == text


def test_byte_styles():
    assert byte_style("50MB") == "si" and byte_style("512MiB") == "iec" and byte_style("1000") is None
    assert format_bytes(50e6, si=True) == "50 MB" and format_bytes(50e6) == "47.7 MiB"


def test_compare_refuses_different_models_and_shapes(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.json", "b.json", "c.json"))
    net = write_net(tmp_path)
    run("analyze", net, "--format", "json", "-o", a)
    run("analyze", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--format", "json", "-o", b)
    r = run("compare", a, b)
    assert r.exit_code == 2 and "not comparable: different models" in r.output and "--allow-different" in r.output
    run("analyze", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--format", "json", "-o", c)
    r = run("compare", b, c)
    assert r.exit_code == 2 and f"different input shapes (1×3×32×32 in {b}, 1×3×64×64 in {c})" in r.output
    r = run("compare", a, b, "--allow-different")
    assert r.exit_code == 0 and r.stdout.count("WARNING: different models") == 1
    assert f"{net} → torchvision:resnet18" in r.stdout


def test_compare_lists_linear_layers(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    run("analyze", write_net(tmp_path), "--format", "json", "-o", a)
    run("analyze", write_net(tmp_path, hidden=48), "--format", "json", "-o", b)
    r = run("compare", a, b)
    assert r.exit_code == 0
    rows = [line.split() for line in r.stdout.splitlines()]
    assert ["head.1", "Linear", "changed", "+8,208", "+8,192"] in rows
