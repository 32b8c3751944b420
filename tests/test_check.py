"""dsrewrite check and compare: budgets, baselines, formats and every exit code."""

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import dsrewrite.measure
from dsrewrite.cli import cli

GOLDEN = Path(__file__).parent / "data" / "golden"
MODEL = """
from torch import nn

def build_encoder():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, {width}, 3, padding=1), nn.ReLU(),
        nn.Conv2d({width}, 16, 3, padding=1),
    )
"""
PARAMS_32 = (3 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * 16 * 9 + 16)
PARAMS_48 = (3 * 16 * 9 + 16) + (16 * 48 * 9 + 48) + (48 * 16 * 9 + 16)
CONFIG = """
[tool.dsrewrite.check]
baseline = ".dsrewrite/baseline.json"

[[tool.dsrewrite.check.budget]]
name = "encoder"
model = "models.py:build_encoder"
input-shape = [1, 3, 64, 64]
params = {{ max = "{max_params}", max-increase = "2%" }}
macs = {{ max = "200M", max-increase = "1%" }}
activation-memory = {{ max = "512MiB" }}
param-bytes = {{ max = "100MB" }}
message = "Read docs/perf-budgets.md before raising a limit"
{extra}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's repository: a model file and a pyproject with one budget."""
    monkeypatch.chdir(tmp_path)

    def setup(width=32, max_params="20K", extra=""):
        (tmp_path / "models.py").write_text(MODEL.format(width=width))
        (tmp_path / "pyproject.toml").write_text(CONFIG.format(max_params=max_params, extra=extra))
        return tmp_path

    setup()
    return setup


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def test_new_user_story(project):
    """Pass, write a baseline, widen a layer: exit 1 with a readable diff."""
    r = run("check")
    assert r.exit_code == 0, r.output
    assert "all 1 budget(s) within limits" in r.output and "No baseline" in r.output
    r = run("check", "--update-baseline")
    assert r.exit_code == 0 and Path(".dsrewrite/baseline.json").exists()
    assert run("check").exit_code == 0
    project(width=48)
    r = run("check", "--why", "-q")
    assert r.exit_code == 1
    growth = 100 * (PARAMS_48 - PARAMS_32) / PARAMS_32
    assert f"params grew +{growth:.1f}% vs baseline" in r.output
    assert "Read docs/perf-budgets.md" in r.output and "pyproject.toml" in r.output
    assert "layers that changed most" in r.output and "+4.62K" in r.output  # layer 4: 16×16×9 more params


def test_json_reports_exact_deltas(project):
    run("check", "--update-baseline")
    project(width=48)
    r = run("check", "--format", "json", "-q")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["schema_version"] == 1 and doc["kind"] == "dsrewrite-check"
    params = doc["budgets"][0]["metrics"]["params"]
    assert params["value"] == PARAMS_48 and params["baseline"] == PARAMS_32
    assert params["delta"] == PARAMS_48 - PARAMS_32
    assert params["delta_pct"] == pytest.approx(100 * (PARAMS_48 - PARAMS_32) / PARAMS_32)
    assert params["status"] == "fail" and params["level"] == "error"
    assert doc["budgets"][0]["metrics"]["param-bytes"]["status"] == "pass"


def test_absolute_limit_without_baseline(project):
    project(max_params="9K")
    r = run("check", "-q")
    assert r.exit_code == 1
    assert f"params exceed the limit by {PARAMS_32 - 9000}" in r.output


def test_relative_limit_only_counts_the_change_own_growth(project):
    project(max_params="9K")
    run("check", "--update-baseline")  # the baseline is already over the absolute max
    r = run("check", "-q")
    assert r.exit_code == 1
    assert "the baseline was already over it" in r.output
    assert "grew" not in r.output, "no growth, so the relative limit passes"


def test_budgets_added_and_removed_are_not_failures(project, tmp_path):
    run("check", "--update-baseline")
    second = '[[tool.dsrewrite.check.budget]]\nname = "decoder"\nmodel = "models.py:build_encoder"\n' \
             'input-shape = [1, 3, 64, 64]\nparams = { max-increase = "1%" }\n'
    project(extra=second)
    r = run("check", "-q")
    assert r.exit_code == 0 and "decoder (models.py:build_encoder, 1×3×64×64) (new" in r.output
    text = (tmp_path / "pyproject.toml").read_text().replace('name = "encoder"', 'name = "renamed"')
    (tmp_path / "pyproject.toml").write_text(text)
    r = run("check", "-q")
    assert r.exit_code == 0 and "encoder: in the baseline but no longer in the config (removed" in r.output


class FakeClock:
    """Each timed call takes exactly ``step`` seconds."""

    def __init__(self, step):
        self.now, self.step = 0.0, step

    def __call__(self):  # measure() reads the clock before and after each call
        self.now += self.step
        return self.now


def test_latency_is_a_warning_and_compared_only_in_the_same_environment(project, monkeypatch):
    project(extra='latency = { max = "10ms", max-increase = "15%" }')
    monkeypatch.setattr(dsrewrite.measure, "clock", FakeClock(0.008))
    run("check", "--update-baseline")
    monkeypatch.setattr(dsrewrite.measure, "clock", FakeClock(0.012))
    r = run("check", "-q")
    assert r.exit_code == 0, "latency is noisy: warn by default"
    assert "latency exceed the limit by 2 ms (+50.0% vs baseline)" in r.output
    assert run("check", "-q", "--fail-on", "warn").exit_code == 1
    doc = json.loads(Path(".dsrewrite/baseline.json").read_text())
    doc["budgets"]["encoder"]["latency_fingerprint"]["threads"] += 7
    Path(".dsrewrite/baseline.json").write_text(json.dumps(doc))
    monkeypatch.setattr(dsrewrite.measure, "clock", FakeClock(0.009))
    r = run("check", "-q", "--format", "json")
    latency = json.loads(r.stdout)["budgets"][0]["metrics"]["latency"]
    assert latency["status"] == "not-comparable" and latency["baseline"] is None
    assert latency["value"] == pytest.approx(0.009)


def test_github_annotations_point_at_the_model(project):
    project(max_params="9K")
    r = run("check", "--format", "github", "-q")
    assert r.exit_code == 1
    line = next(x for x in r.stdout.splitlines() if x.startswith("::error"))
    assert line.startswith("::error file=models.py,line=4,title=dsrewrite check encoder::params exceed the limit")


def test_summary_appends_markdown(project, tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    r = run("check", "--summary", "-q", env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert r.exit_code == 0
    assert summary.read_text().startswith("earlier step\n<!-- dsrewrite-check -->")


@pytest.mark.parametrize("fmt,name", [("markdown", "check_comment.md"), ("junit", "check_junit.xml")])
def test_golden(project, fmt, name):
    """Refresh: DSREWRITE_UPDATE_GOLDEN=1 python -m pytest tests/test_check.py"""
    run("check", "--update-baseline")
    project(width=48)
    r = run("check", "--format", fmt, "--why", "-q")
    assert r.exit_code == 1
    path = GOLDEN / name
    if os.environ.get("DSREWRITE_UPDATE_GOLDEN"):
        path.write_text(r.stdout)
    assert r.stdout == path.read_text()


def test_output_file_and_adhoc_mode(project, tmp_path):
    r = run("check", "models.py:build_encoder", "--input-shape", "1,3,64,64", "--max-params", "30K",
            "--max-macs", "1G", "-o", tmp_path / "out.txt")
    assert r.exit_code == 0 and "within limits" in (tmp_path / "out.txt").read_text()
    r = run("check", "models.py:build_encoder", "--input-shape", "1,3,64,64", "--max-macs", "5M", "-q")
    assert r.exit_code == 1 and "MACs exceed the limit" in r.output
    assert "removed" not in r.output, "ad hoc mode ignores the config's baseline"


BAD = {
    "missing config": ("none", [], 2, "no budgets"),
    "unknown key": ('[tool.dsrewrite.check]\n[[tool.dsrewrite.check.budget]]\nname="a"\nmodel="models.py"\n'
                    'parms={max="1M"}\n', [], 2, "unknown key 'parms'"),
    "bad unit": ('[[tool.dsrewrite.check.budget]]\nname="a"\nmodel="models.py"\nmacs={max="4.1Q"}\n',
                 [], 2, "macs.max: expected a count such as 25M or 4.1G, got '4.1Q'"),
    "bad level": ('[[tool.dsrewrite.check.budget]]\nname="a"\nmodel="models.py"\nmacs={max="1G",level="fatal"}\n',
                  [], 2, "macs.level must be error or warn"),
    "no limits": ('[[tool.dsrewrite.check.budget]]\nname="a"\nmodel="models.py"\n', [], 2, "no limits"),
    "model fails": ('[[tool.dsrewrite.check.budget]]\nname="a"\nmodel="nope.py"\nmacs={max="1G"}\n',
                    [], 3, "nope.py: no such file"),
    "adhoc model fails": ("none", ["broken.py", "--max-macs", "1G"], 3, "syntax error"),
    "adhoc bad unit": ("none", ["models.py", "--max-macs", "lots"], 2, "--max-macs: expected a count"),
    "update without path": ('[[tool.dsrewrite.check.budget]]\nname="a"\nmodel="models.py"\nmacs={max="1G"}\n',
                            ["--update-baseline"], 2, "needs a baseline path"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exit_codes(project, tmp_path, case):
    body, args, code, words = BAD[case]
    (tmp_path / "broken.py").write_text("def build_model(:\n")
    if body == "none":
        (tmp_path / "pyproject.toml").unlink()
    else:
        (tmp_path / "pyproject.toml").write_text("[tool.dsrewrite.check]\n" + body
                                                 if not body.startswith("[tool") else body)
    r = run("check", *args)
    assert r.exit_code == code, r.output
    assert words in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("content,words", [
    ("{not json", "corrupt baseline"),
    ('{"kind": "something-else"}', "not a dsrewrite check baseline"),
    ('{"kind": "dsrewrite-check-baseline", "schema_version": 99, "budgets": {}}', "schema version 99"),
])
def test_bad_baseline_is_exit_2(project, content, words):
    Path(".dsrewrite").mkdir()
    Path(".dsrewrite/baseline.json").write_text(content)
    r = run("check")
    assert r.exit_code == 2 and words in r.output


def test_baseline_for_another_input_shape_is_exit_2(project, tmp_path):
    run("check", "--update-baseline")
    text = (tmp_path / "pyproject.toml").read_text().replace("[1, 3, 64, 64]", "[1, 3, 32, 32]")
    (tmp_path / "pyproject.toml").write_text(text)
    r = run("check")
    assert r.exit_code == 2 and "taken with input 1×3×64×64" in r.output and "--update-baseline" in r.output


def test_update_baseline_is_atomic_on_failure(project, tmp_path):
    run("check", "--update-baseline")
    before = Path(".dsrewrite/baseline.json").read_text()
    (tmp_path / "models.py").write_text("raise RuntimeError('broken on purpose')\n")
    r = run("check", "--update-baseline")
    assert r.exit_code == 3
    assert Path(".dsrewrite/baseline.json").read_text() == before
    assert sorted(p.name for p in Path(".dsrewrite").iterdir()) == ["baseline.json"]


def test_compare_two_analyze_reports(project, tmp_path):
    run("analyze", "models.py:build_encoder", "--input-shape", "1,3,64,64", "--format", "json", "-o", "base.json")
    project(width=48)
    run("analyze", "models.py:build_encoder", "--input-shape", "1,3,64,64", "--format", "json", "-o", "head.json")
    r = run("compare", "base.json", "head.json", "--format", "json")
    assert r.exit_code == 0
    models = json.loads(r.stdout)["models"]
    params = next(m for m in models[0]["metrics"] if m["metric"] == "params")
    assert params["delta"] == PARAMS_48 - PARAMS_32
    assert {row["name"] for row in models[0]["layers"]} == {"2", "4"}
    text = run("compare", "base.json", "head.json").output
    assert "Layers that changed most" in text and f"+{PARAMS_48 - PARAMS_32:,}" not in text
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert run("compare", "base.json", bad).exit_code == 2


def test_example_budgets_table_passes_on_the_example_model(monkeypatch, request, tmp_path):
    """The table README tells new users to paste (examples/ci/pyproject-budgets.toml) passes as shipped."""
    root = request.config.rootpath
    monkeypatch.chdir(root)
    config = tmp_path / "dsrewrite.toml"
    text = (root / "examples" / "ci" / "pyproject-budgets.toml").read_text()
    config.write_text(text.replace("[tool.dsrewrite.check]", "[check]")
                      .replace("[[tool.dsrewrite.check.budget]]", "[[check.budget]]")
                      .replace('".dsrewrite/baseline.json"', repr(str(tmp_path / "baseline.json")).replace("'", '"')))
    r = run("--config", config, "check", "-q", "--threads", "2")
    assert r.exit_code == 0, r.output
    assert "params 11.7M params within budget" in r.output
