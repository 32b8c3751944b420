"""One conversion plan: what --dry-run shows is what convert applies, and a saved plan reproduces it.

Table: every preset × {resnet18, densenet121, googlenet, examples/resnet.py} × {plain,
target_macs 0.3, align 8 + width 0.75}. For each case the plan printed by ``--dry-run``
(``render_plan(..., "json")``) must equal the plan ``convert`` applied, the converted model
must have exactly the planned blocks and channel widths, and the saved plan read back
(``load_plan``) must reproduce the same converted weights.
"""

import copy
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

import dsrewrite
from dsrewrite.cli import cli
from dsrewrite.layers import DepthwiseSeparableConv2d
from dsrewrite.plan import PlanMismatch, load_plan
from dsrewrite.report import render_plan
from dsrewrite.rewrite import apply_plan, real_inputs
from dsrewrite.rules import preset_names

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64
VARIANTS = {
    "plain": {},
    "target": {"target_macs": 0.3},
    "resize": {"align": 8, "width": 0.75},
}
MODELS = ["resnet18", "densenet121", "googlenet", "examples/resnet.py"]
_models = {}
_analyses = {}


def model_of(name):
    if name not in _models:
        torch.manual_seed(0)
        if name.startswith("examples/"):
            sys.path.insert(0, str(ROOT / "examples"))
            import resnet

            _models[name] = resnet.build_model()
        else:
            kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
            _models[name] = torchvision.models.get_model(name, weights=None, **kwargs)
    return _models[name]


def analysis_of(name):
    if name not in _analyses:
        _analyses[name] = dsrewrite.analyze(model_of(name), (1, 3, SIZE, SIZE), name=name)
    return _analyses[name]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_model_follows(plan, converted):
    """What the converted model *is* matches the plan: blocks where it replaces, convs where it keeps, widths."""
    for d in plan.decisions:
        if d.module_name is None:
            continue
        module = converted.get_submodule(d.module_name)
        if d.replaced and d.family != "separable":
            assert type(module).family == d.family, d.name
        elif d.replaced:
            assert isinstance(module, DepthwiseSeparableConv2d), d.name
            assert module.depth_multiplier * module.in_channels == module.mid_channels
            assert (module.depth_multiplier, isinstance(module.bn, torch.nn.BatchNorm2d), module.activation_name) == \
                (d.depth_multiplier, d.bn, d.activation), d.name
        else:
            assert isinstance(module, torch.nn.Conv2d), d.name
    if plan.resize is not None:
        for change in plan.resize.changed:
            for producer in change.producers:
                module = converted.get_submodule(producer.rpartition(".")[0])
                width = module.out_channels if hasattr(module, "out_channels") else module.out_features
                assert width == change.new_width, producer


# the block chooser (preset auto) on one model here, by latency and with a resize: its own tests cover the
# rest (tests/test_choose.py, the MAC target there too);
# densenet121 (the slowest: concatenations everywhere, what the resize variant is for) with the resize
# variant of three presets whose rules differ most, the others with every preset (the suite's time budget)
DENSENET_PRESETS = {"default", "aggressive", "finetune"}
CASES = [(m, p, v) for m in MODELS for p in preset_names() for v in VARIANTS
         if (p != "auto" or (m == "googlenet" and v != "target"))
         and (m != "densenet121" or (p in DENSENET_PRESETS and v == "resize"))]


@pytest.mark.parametrize("name,preset,variant", CASES, ids=[f"{m.split('/')[-1]}-{p}-{v}" for m, p, v in CASES])
def test_dry_run_plan_is_the_plan_applied(name, preset, variant):
    model, analysis, shape = model_of(name), analysis_of(name), (1, 3, SIZE, SIZE)
    kwargs = VARIANTS[variant]
    if preset == "latency":  # no real timing in the table: a fixed fake timer, the same for both runs
        kwargs = {**kwargs, "layer_timer": _fake_timer}
    if preset == "auto" and variant != "target":  # latency plans: fake layer and end-to-end timers
        kwargs = {**kwargs, "layer_timer": _fake_timer, "plan_timer": _fake_plan_timer}
    before = state(model)
    shown = json.loads(render_plan(dsrewrite.plan_model(model, shape, preset, analysis=analysis, **kwargs), "json"))
    result = dsrewrite.convert(model, shape, preset, analysis=analysis, **kwargs)
    assert result.plan.to_dict() == shown
    assert_model_follows(result.plan, result.model)
    # the saved plan, read back and applied, gives the same weights
    loaded = load_plan(shown, analysis)
    assert loaded.to_dict() == shown
    got, want = state(apply_plan(model, loaded, real_inputs(analysis.inputs)).model), state(result.model)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the user's model is never touched
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())


def _fake_plan_timer(plan):
    """End to end, the planned model "measures" its share of the MACs (the original: 1 s)."""
    return 1.0, (plan.macs_after / plan.macs_before if plan is not None else None)


def _fake_timer(conv, depth_multiplier, bn, activation, family="separable"):
    from dsrewrite.measure import LayerTiming

    # wider layers "measure" faster as blocks: deterministic, and some pass 1.1× and some do not
    return LayerTiming(1.0, 1.0 / (0.6 + conv.in_channels / 256), measured_at="2026-01-01T00:00:00+00:00",
                       environment="fake", depth_multiplier=depth_multiplier)


# ------------------------------------------------------------------------- the CLI, end to end


def run(*args):
    torch.manual_seed(0)  # examples/resnet.py initializes randomly: the same weights in every run
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


ARGS = ["examples/resnet.py", "--input-shape", "1,3,64,64", "--rules", "finetune", "--target-macs", "0.3",
        "--align", "8", "-q"]


def test_cli_dry_run_json_then_plan(tmp_path, in_repo):
    plan_file = tmp_path / "plan.json"
    r = run("convert", *ARGS, "--dry-run", "--format", "json", "-o", plan_file)
    assert r.exit_code == 0, r.output
    doc = json.loads(plan_file.read_text())
    assert doc["format"] == "dsrewrite-plan" and doc["rank_choice"]["target_macs"] == 0.3
    assert doc["channels"]["divisor"] == 8
    # the table shows the same decisions
    table = run("convert", *ARGS, "--dry-run").stdout
    for d in doc["decisions"]:
        assert d["reason"] in table
    # convert applies exactly the printed plan, and --plan reproduces it
    r = run("convert", *ARGS, "-o", tmp_path / "a.pt", "--report", tmp_path / "a.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "a.json").read_text())["plan"] == doc
    r = run("convert", "examples/resnet.py", "--input-shape", "1,3,64,64", "--plan", plan_file, "-q",
            "-o", tmp_path / "b.pt", "--report", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b.json").read_text())["plan"] == doc
    a = torch.load(tmp_path / "a.pt", weights_only=False).state_dict()
    b = torch.load(tmp_path / "b.pt", weights_only=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hand_edited_plan_is_validated_and_applied(tmp_path, in_repo):
    plan_file = tmp_path / "plan.json"
    assert run("convert", *ARGS, "--dry-run", "--format", "json", "-o", plan_file).exit_code == 0
    doc = json.loads(plan_file.read_text())
    first = next(d for d in doc["decisions"] if d["action"] == "replace")
    first["action"] = "keep"  # the user keeps one layer
    second = next(d for d in doc["decisions"] if d["action"] == "replace")
    second["depth_multiplier"] = 3  # and gives another a bigger block
    second["macs_after"] = 1  # a stale number is recomputed, not trusted
    plan_file.write_text(json.dumps(doc))
    r = run("convert", "examples/resnet.py", "--input-shape", "1,3,64,64", "--plan", plan_file, "--dry-run",
            "--format", "json")
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    by_name = {d["name"]: d for d in shown["decisions"]}
    assert by_name[first["name"]]["action"] == "keep" and "edited by hand" in by_name[first["name"]]["reason"]
    assert by_name[second["name"]]["depth_multiplier"] == 3 and by_name[second["name"]]["macs_after"] > 1
    r = run("convert", "examples/resnet.py", "--input-shape", "1,3,64,64", "--plan", plan_file, "-q",
            "-o", tmp_path / "c.pt")
    assert r.exit_code == 0, r.output
    model = torch.load(tmp_path / "c.pt", weights_only=False)
    assert isinstance(model.get_submodule(first["module_name"]), torch.nn.Conv2d)
    assert model.get_submodule(second["module_name"]).depth_multiplier == 3


def _edit(doc, how):
    doc = copy.deepcopy(doc)
    how(doc)
    return doc


def _replace_stem(doc):
    doc["decisions"][0].update(action="replace", depth_multiplier=1, bn=True, activation="relu")


def _split_module_sites(doc):
    # a module that one plan decision replaces but whose "other call site" is kept: here the pointwise shortcut
    # cannot be replaced at all (already 1×1)
    d = next(d for d in doc["decisions"] if "shortcut" in d["name"])
    d.update(action="replace", depth_multiplier=1, bn=True, activation="relu")


MISMATCHES = [
    ("other input", lambda d: d.update(input_shapes=[[1, 3, 32, 32]]), "made for input shape(s) 1,3,32,32"),
    ("fewer sites", lambda d: d["decisions"].pop(), "has 19 conv call sites, the model has 20"),
    ("other name", lambda d: d["decisions"][3].update(name="body.conv"), "decision 3 expects name 'body.conv'"),
    ("other width", lambda d: d["decisions"][5].update(out_channels=100), "decision 5 expects out_channels 100"),
    ("stem replaced", _replace_stem, None),
    ("pointwise replaced", _split_module_sites, "cannot be replaced (kept: already pointwise)"),
    ("bad multiplier", lambda d: next(x for x in d["decisions"] if x["action"] == "replace").update(
        depth_multiplier=0), "depth_multiplier must be a positive integer"),
    ("bad activation", lambda d: next(x for x in d["decisions"] if x["action"] == "replace").update(
        activation="gelu"), "activation must be one of"),
    ("bad action", lambda d: d["decisions"][2].update(action="drop"), "action must be 'replace' or 'keep'"),
    ("other group", lambda d: d["channels"]["groups"][0].update(members=["nowhere.out"]),
     "no channel group with members nowhere.out"),
    ("group width", lambda d: d["channels"]["groups"][1].update(old_width=7), "the plan says 7"),
    ("bad keep", lambda d: d["channels"]["groups"][1].update(new_width=8, keep=[5, 1]), "keep must be increasing"),
    ("not a plan", lambda d: d.update(format="something else"), "not a dsrewrite plan"),
    ("version", lambda d: d.update(schema_version=99), "schema_version 99"),
]


@pytest.mark.parametrize("what,edit,words", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_mismatched_plan_is_one_line_exit_2(tmp_path, in_repo, what, edit, words):
    plan_file = tmp_path / "plan.json"
    assert run("convert", *ARGS, "--dry-run", "--format", "json", "-o", plan_file).exit_code == 0
    plan_file.write_text(json.dumps(_edit(json.loads(plan_file.read_text()), edit)))
    out = tmp_path / "out.pt"
    r = run("convert", "examples/resnet.py", "--input-shape", "1,3,64,64", "--plan", plan_file, "-q", "-o", out)
    if words is None:  # replacing the stem is the user's call: allowed, it is a standard 3×3 conv
        assert r.exit_code == 0, r.output
        assert isinstance(torch.load(out, weights_only=False).get_submodule("stem.0"), DepthwiseSeparableConv2d)
        return
    assert r.exit_code == 2, r.output
    message = r.output.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("dsrewrite: error:") and words in message[0], r.output
    assert not out.exists()


def test_plan_file_problems(tmp_path, in_repo):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path, words in ((tmp_path / "missing.json", "no such file"), (bad, "not a JSON plan")):
        r = run("convert", "examples/resnet.py", "--plan", path)
        assert r.exit_code == 2 and words in r.output, r.output
    r = run("convert", "examples/resnet.py", "--plan", bad, "--rules", "mobile", "--target-macs", "0.5")
    assert r.exit_code == 2 and "drop --rules, --target-macs" in r.output


def test_plan_is_pure_and_latency_facts_are_recorded():
    """Planning from gathered facts touches nothing; the timings it used say where they came from."""
    from dsrewrite.facts import gather_facts
    from dsrewrite.plan import plan_conversion
    from dsrewrite.rules import load_rules

    model = model_of("resnet18")
    analysis = analysis_of("resnet18")
    config = load_rules("latency")
    calls = []

    def timer(conv, dm, bn, act, family="separable"):
        calls.append(conv.name)
        return _fake_timer(conv, dm, bn, act)

    facts = gather_facts(model, analysis, config, timer=timer)
    assert calls, "the latency rule needs timings, gathered before planning"
    n = len(calls)
    plan = plan_conversion(analysis, config, facts)
    again = plan_conversion(analysis, config, facts)
    assert len(calls) == n  # deciding timed nothing
    assert plan.to_dict() == again.to_dict()
    timed = [d for d in plan.decisions if d.timing]
    assert timed and all(d.timing["source"] == "fresh" and d.timing["environment"] == "fake" for d in timed)
    kept = [d for d in plan.decisions if d.rule == "MinMeasuredSpeedup"]
    assert kept and all("below 1.1×" in d.reason for d in kept)


def test_rule_order_comes_from_the_preset(tmp_path):
    """A rules file lists the rules it runs: dropping KeepDownsampling lets stride-2 convs be replaced."""
    rules = tmp_path / "mine.toml"
    rules.write_text(textwrap.dedent("""
        extends = "default"
        [plan]
        rules = ["SkipNonStandard", "SkipFunctional", "SkipUntraced", "SkipWeightReads", "KeepStem",
                 "AlignChannels", "ReplaceHeavyConv"]
    """))
    analysis = analysis_of("resnet18")
    plan = dsrewrite.plan_model(model_of("resnet18"), (1, 3, SIZE, SIZE), str(rules), analysis=analysis)
    default = dsrewrite.plan_model(model_of("resnet18"), (1, 3, SIZE, SIZE), "default", analysis=analysis)
    down = [d for d in plan.decisions if d.name == "layer2.0.conv1"][0]
    assert down.replaced and not [d for d in default.decisions if d.name == "layer2.0.conv1"][0].replaced
    with pytest.raises(dsrewrite.DsrewriteError, match="unknown rule 'KeepEverything'"):
        dsrewrite.load_rules("default", ["plan.rules=['KeepEverything', 'ReplaceHeavyConv']"])
    with pytest.raises(dsrewrite.DsrewriteError, match="must include ReplaceHeavyConv"):
        dsrewrite.load_rules("default", ["plan.rules=['KeepStem']"])


def test_load_plan_refuses_another_model():
    shown = dsrewrite.plan_model(model_of("resnet18"), (1, 3, SIZE, SIZE), "default",
                                 analysis=analysis_of("resnet18")).to_dict()
    with pytest.raises(PlanMismatch, match="has 20 conv call sites, the model has"):
        load_plan(shown, analysis_of("googlenet"))
