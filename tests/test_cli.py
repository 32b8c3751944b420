"""The CLI through click's CliRunner: output formats, settings, and every exit code."""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dsrewrite.cli import cli

EXAMPLE = "examples/resnet.py"


def run(*args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def write(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def test_analyze_example_table():
    r = run("analyze", EXAMPLE)
    assert r.exit_code == 0, r.output
    assert "stages.3.1.conv2" in r.output and "1.81G MACs" in r.output and "FLOPs = 2 × MACs" in r.output


@pytest.mark.parametrize("fmt,check", [
    ("json", lambda t: json.loads(t)["totals"]["macs"] == 1814073344),
    ("markdown", lambda t: t.startswith("# dsrewrite analysis") and "| stem.0 " in t),
    ("csv", lambda t: t.splitlines()[0].startswith("index,name,kind") and len(t.splitlines()) == 21),
])
def test_formats(fmt, check):
    r = run("analyze", EXAMPLE, "--format", fmt)
    assert r.exit_code == 0 and check(r.output)


def test_output_file_and_factory_args(tmp_path):
    out = tmp_path / "r.json"
    r = run("analyze", EXAMPLE, "--arg", "num_classes=10", "--input-shape", "2,3,64,64", "--format", "json", "-o", out)
    assert r.exit_code == 0
    doc = json.loads(out.read_text())
    assert doc["input_shapes"] == [[2, 3, 64, 64]] and doc["output_shapes"] == [[2, 10]]
    assert doc["schema_version"] == 1 and doc["layers"][0]["name"] == "stem.0"


def test_zoo_spec():
    r = run("analyze", "torchvision:squeezenet1_1", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.output)["totals"]["params"] == 1235496


def test_module_spec(tmp_path, monkeypatch):
    write(tmp_path, "mypkg_models.py", """
        from torch import nn
        def build_encoder(width=4):
            return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU())
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = run("analyze", "mypkg_models:build_encoder", "--arg", "width=8", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["layers"][0]["out_channels"] == 8


def test_file_conventions(tmp_path):
    single = write(tmp_path, "single.py", """
        import torch
        from torch import nn
        class Net(nn.Module):
            def __init__(self, c=4):
                super().__init__()
                self.conv = nn.Conv2d(1, c, 3)
            def forward(self, x):
                return self.conv(x)
        def example_inputs():
            return torch.randn(1, 1, 28, 28)
    """)
    r = run("analyze", single, "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["input_shapes"] == [[1, 1, 28, 28]]
    r = run("analyze", f"{single}:Net", "--arg", "c=6", "--format", "json")
    assert json.loads(r.output)["layers"][0]["out_channels"] == 6


def test_saved_models(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    torch.save(model, tmp_path / "whole.pt")
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 16, 16),)), str(tmp_path / "prog.pt2"))
    r = run("analyze", tmp_path / "whole.pt")
    assert r.exit_code == 2 and "--trust-pickle" in r.output and "Traceback" not in r.output
    r = run("analyze", tmp_path / "whole.pt", "--trust-pickle", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.output)["totals"]["macs"] == 8 * 222 * 222 * 27
    r = run("analyze", tmp_path / "scripted.pt", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.output)["totals"]["macs"] == 8 * 222 * 222 * 27
    r = run("analyze", tmp_path / "prog.pt2", "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["input_shapes"] == [[1, 3, 16, 16]], "a .pt2 program brings its own example inputs"
    assert doc["layers"][0]["name"] == "0" and doc["totals"]["macs"] == 8 * 14 * 14 * 27


def test_model_without_convs_is_exit_0(tmp_path):
    f = write(tmp_path, "mlp.py", """
        from torch import nn
        INPUT_SHAPE = (1, 16)
        model = nn.Sequential(nn.Linear(16, 4))
    """)
    r = run("analyze", f)
    assert r.exit_code == 0 and "no convolutions" in r.output


BAD_INPUTS = {
    "missing file": (["analyze", "does/not/exist.py"], "no such file"),
    "syntax error": (["analyze", "{tmp}/broken.py"], "syntax error"),
    "no model": (["analyze", "{tmp}/empty.py"], "no model found"),
    "factory raises": (["analyze", "{tmp}/raises.py"], "raised ValueError: bad width"),
    "wrong shape": (["analyze", EXAMPLE, "--input-shape", "1,1,224,224"], "3 channels"),
    "too small": (["analyze", "torchvision:squeezenet1_1", "--input-shape", "1,3,1,1"], "too small"),
    "unknown zoo model": (["analyze", "torchvision:resnet5"], "did you mean"),
    "uninstalled zoo": (["analyze", "timm:resnet50"], "timm is not installed"),
    "state dict": (["analyze", "{tmp}/weights.pth"], "state_dict"),
    "bad shape text": (["analyze", EXAMPLE, "--input-shape", "1,3,a"], "comma-separated integers"),
    "bad dtype": (["analyze", EXAMPLE, "--dtype", "float7"], "unknown dtype"),
    "bad arg": (["analyze", EXAMPLE, "--arg", "nokey"], "key=value"),
    "bad factory arg": (["analyze", EXAMPLE, "--arg", "depth=3"], "build_model(): --arg depth=...: the factory takes "
                                                                  "no argument 'depth'"),
    "misspelt factory arg": (["analyze", EXAMPLE, "--arg", "num_clases=3"], "did you mean num_classes"),
    "factory arg of the wrong type": (["analyze", EXAMPLE, "--arg", "num_classes=ten"],
                                      "--arg num_classes='ten': expected an int like its default"),
    "zoo arg of the wrong type": (["analyze", "torchvision:resnet18", "--arg", "num_classes=ten"],
                                  "calling torchvision resnet18(num_classes='ten') raised TypeError"),
    "three-number shape": (["analyze", EXAMPLE, "--input-shape", "1,3,224"],
                           "expect an N,C,H,W input (4 numbers, e.g. --input-shape 1,3,224,224), but the shape "
                           "given has 3: 1,3,224"),
    "output folder missing": (["analyze", EXAMPLE, "-o", "{tmp}/nope/out.txt"], "does not exist"),
    "bad spec": (["analyze", "justaname"], "cannot read model spec"),
    "extends a misspelt preset": (["analyze", EXAMPLE, "--rules", "{tmp}/extends.toml"],
                                  "extends.toml: extends = 'defualt': no such preset (did you mean 'default'?)"),
    "misspelt rules key": (["analyze", EXAMPLE, "--rules", "{tmp}/typo.toml"],
                           "typo.toml: unknown rules key 'replace.min_in_chanels' (did you mean "
                           "'replace.min_in_channels'?)"),
    "misspelt --set key": (["analyze", EXAMPLE, "--set", "block.depth_multipler=2"],
                           "did you mean 'block.depth_multiplier'?"),
    "misspelt preset": (["analyze", EXAMPLE, "--rules", "latncy"], "did you mean 'latency'?"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, monkeypatch):
    write(tmp_path, "broken.py", "def build_model(:\n")
    write(tmp_path, "empty.py", "x = 1\n")
    write(tmp_path, "raises.py", "def build_model():\n    raise ValueError('bad width')\n")
    write(tmp_path, "extends.toml", 'extends = "defualt"\n')
    write(tmp_path, "typo.toml", 'extends = "default"\n[replace]\nmin_in_chanels = 3\n')
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pth")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    args, message = BAD_INPUTS[case]
    r = run(*[a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_failure_leaves_existing_output_untouched(tmp_path):
    out = tmp_path / "report.md"
    out.write_text("previous report\n")
    r = run("analyze", EXAMPLE, "--input-shape", "1,1,8,8", "-o", out)
    assert r.exit_code == 2
    assert out.read_text() == "previous report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"], "no temporary file left behind"


def test_internal_error_is_exit_70_and_debug_shows_traceback(monkeypatch):
    import dsrewrite.api

    def boom(*a, **k):
        raise RuntimeError("kaput")

    monkeypatch.setattr(dsrewrite.api, "analyze_spec", boom)
    r = run("analyze", EXAMPLE)
    assert r.exit_code == 70 and "internal error" in r.output and "--debug" in r.output
    r = run("--debug", "analyze", EXAMPLE)
    assert r.exit_code == 70 and "Traceback" in r.output


def test_usage_error_is_exit_2():
    r = run("analyze")
    assert r.exit_code == 2 and "Missing argument" in r.output


def test_settings_from_pyproject(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.dsrewrite.analyze]\nformat = "json"\ninput-shape = ["1,3,32,32"]\n')
    monkeypatch.chdir(tmp_path)
    example = str((__import__("pathlib").Path(__file__).parent.parent / EXAMPLE).resolve())
    r = run("analyze", example)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["input_shapes"] == [[1, 3, 32, 32]]
    r = run("analyze", example, "--format", "csv")  # a flag overrides the file
    assert r.output.startswith("index,name")


def test_broken_config_is_exit_2(tmp_path, monkeypatch):
    (tmp_path / "dsrewrite.toml").write_text("[analyze\n")
    monkeypatch.chdir(tmp_path)
    r = run("analyze", "x.py")
    assert r.exit_code == 2 and "cannot read TOML" in r.output


# ------------------------------------------------------------------------------------ convert


def test_convert_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    r = run("convert", EXAMPLE, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "kept: stem conv" in r.output and "replaced: 3×3 256→256 at 14×14, 8.7× fewer MACs" in r.output
    assert "13 of 20 conv calls replaced" in r.output and "dw×1 → BN → relu → pw" in r.output
    # with --dry-run, -o names the plan file: a model file's name is refused, nothing is written
    r = run("convert", EXAMPLE, "--dry-run", "-o", tmp_path / "out.pt")
    assert r.exit_code == 2 and "-o writes the plan" in r.output
    assert not (tmp_path / "out.pt").exists()
    doc = json.loads(run("convert", EXAMPLE, "--dry-run", "--format", "json").stdout)
    assert doc["replaced"] == 13 and doc["rules"]["preset"] == "default"


def test_convert_writes_a_model_that_loads_and_trains(tmp_path):
    out, report = tmp_path / "resnet_ds.pt", tmp_path / "report.md"
    r = run("convert", EXAMPLE, "--input-shape", "1,3,64,64", "-o", out, "--report", report,
            "--state-dict", tmp_path / "w.pth", "--export-code", tmp_path / "code")
    assert r.exit_code == 0, r.output
    model = torch.load(out, weights_only=False)
    loss = model(torch.randn(2, 3, 64, 64)).sum()
    loss.backward()
    # the pickle names the user's class by its file (resnet.ResNet), so a fresh process loads it
    # wherever the file is importable
    assert type(model).__module__ == "resnet"
    import subprocess

    code = ("import sys, torch; sys.path.insert(0, 'examples'); "
            f"m = torch.load({str(out)!r}, weights_only=False); print(type(m).__name__)")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "ResNet", loaded.stderr[-500:]
    text = report.read_text()
    assert "## Totals" in text and "Output fidelity" in text and "kept energy" in text
    assert (tmp_path / "code" / "model.py").exists() and (tmp_path / "w.pth").exists()


def test_convert_report_json_and_set(tmp_path):
    report = tmp_path / "r.json"
    r = run("convert", "torchvision:vgg16_bn", "--input-shape", "1,3,32,32", "--rules", "mobile",
            "--set", "replace.min_in_channels=128", "--report", report, "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    assert doc["rules"]["replace"]["min_in_channels"] == 128 and doc["rules"]["preset"] == "mobile"
    assert all(layer["in_channels"] >= 128 for layer in doc["layers"]) and doc["layers"]
    assert doc["ratios"]["macs"] > 1 and 0 < doc["fidelity"]["cosine"] <= 1.0 + 1e-9


def test_convert_nothing_to_replace_is_exit_0(tmp_path):
    r = run("convert", "torchvision:mobilenet_v2", "--input-shape", "1,3,32,32", "-o", tmp_path / "m.pt")
    assert r.exit_code == 0, r.output
    assert "nothing to replace" in r.output and (tmp_path / "m.pt").exists()


CONVERT_BAD = {
    "unknown preset": (["--rules", "turbo"], "unknown rules preset 'turbo'"),
    "bad set key": (["--set", "replace.bogus=1"], "unknown rules key 'replace.bogus'"),
    "bad set value": (["--set", "block.activation=tanh"], "block.activation must be one of"),
    "bad rules file": (["--rules", "{tmp}/bad.toml"], "bad.toml: unknown rules key 'keep.stem'"),
    "missing output folder": (["-o", "{tmp}/nope/out.pt"], "folder {tmp}/nope does not exist"),
    "output equals input": (["-o", EXAMPLE], "refusing to overwrite the input"),
    "report type": (["--report", "{tmp}/r.pdf"], "unknown report type .pdf"),
}


@pytest.mark.parametrize("case", sorted(CONVERT_BAD))
def test_convert_bad_input_is_exit_2(case, tmp_path):
    (tmp_path / "bad.toml").write_text("[keep]\nstem = true\n")
    args, message = CONVERT_BAD[case]
    r = run("convert", EXAMPLE, "--input-shape", "1,3,32,32", *[a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    assert message.format(tmp=tmp_path) in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"], "nothing written"


def test_analyze_shows_decisions():
    r = run("analyze", EXAMPLE, "--rules", "conservative")
    assert r.exit_code == 0
    assert "convert would" in r.output and "kept: downsampling, stride 2×2" in r.output
    assert "Rules: preset conservative" in r.output


def test_help_lists_every_preset_every_report_type_and_examples():
    import importlib.metadata
    import importlib.resources

    presets = sorted(p.name[:-5] for p in importlib.resources.files("dsrewrite.presets").iterdir()
                     if p.name.endswith(".toml"))
    assert len(presets) >= 7
    for command in ("analyze", "convert", "check", "finetune", "compare"):
        text = " ".join(run(command, "--help").output.split())
        assert "Examples:" in text, command
        if command in ("analyze", "convert"):
            assert f"Rule preset ({', '.join(presets)})" in text
    assert ".html (charts), .md, .json or .txt" in " ".join(run("convert", "--help").output.split())
    assert "-q, --quiet" in run("analyze", "--help").output
    requires = importlib.metadata.requires("dsrewrite")
    assert any(r.startswith("numpy") for r in requires), "torch warns 'Failed to initialize NumPy' without it"


def test_help_does_not_import_torch():
    """``dsrewrite --help`` and ``dsrewrite CMD --help`` answer without loading torch (it takes seconds)."""
    import subprocess

    code = ("import sys\nfrom click.testing import CliRunner\nfrom dsrewrite.cli import cli\n"
            "for args in ([], ['analyze'], ['convert'], ['check'], ['finetune'], ['compare']):\n"
            "    r = CliRunner().invoke(cli, args + ['--help'])\n"
            "    assert r.exit_code == 0 and 'Usage:' in r.output, (args, r.output)\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "assert not loaded, loaded[:5]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_analysis_loads_nothing_it_does_not_need():
    """``dsrewrite analyze`` costs about an ``import torch``: torch's symbolic-shape machinery (sympy, most of a
    second) is not imported by analyzing a traceable model (it once was, by ``empty_like`` and
    ``broadcast_shapes`` on meta tensors)."""
    import subprocess

    code = ("import sys\nfrom click.testing import CliRunner\nfrom dsrewrite.cli import cli\n"
            "r = CliRunner().invoke(cli, ['analyze', 'examples/resnet.py'])\n"
            "assert r.exit_code == 0, r.output\n"
            "loaded = [m for m in ('sympy', 'torch._dynamo', 'torch.fx.experimental.symbolic_shapes') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr


def test_lazy_public_names():
    import dsrewrite

    assert callable(dsrewrite.analyze) and dsrewrite.DepthwiseSeparableConv2d.__name__ == "DepthwiseSeparableConv2d"
    assert dsrewrite.report.render_conversion and set(dsrewrite.__all__) <= set(dir(dsrewrite))
    with pytest.raises(AttributeError):
        dsrewrite.no_such_thing
