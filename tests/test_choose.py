"""Block families in plans and the block chooser: per-layer family × rank (or keep) for a MAC or latency target.

Table-driven over real models; timings come from fake timers where a decision must be
deterministic (the latency search is tested against a model of the measurement), and from
this machine where the CLI runs end to end.
"""

import json

import pytest
import torch
import torchvision
from click.testing import CliRunner

import dsrewrite
from dsrewrite.blocks import FAMILIES, FAMILY_BLOCKS, block_costs, family_errors, rank_ladder
from dsrewrite.rules import AUTO_FAMILIES
from dsrewrite.choose import TOLERANCE, Candidate, choose_blocks, fit_latency, front
from dsrewrite.cli import cli
from dsrewrite.errors import ConfigError
from dsrewrite.layers import DepthwiseSeparableConv2d
from dsrewrite.plan import PlanMismatch, load_plan
from dsrewrite.report import render_plan
from models import fashion_resnet

SHAPE = (1, 3, 64, 64)
SMALL = (1, 1, 28, 28)
CLASSES = {"separable": DepthwiseSeparableConv2d, **{cls.family: cls for cls in FAMILY_BLOCKS}}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def small():
    return fashion_resnet(32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_is_planned_applied_and_reloaded_exactly(small, family):
    result = dsrewrite.convert(small, SMALL, "auto", [f"block.family={family}", "plan.target_latency=0"])
    plan = result.plan
    assert plan.replacements and all(d.family == family for d in plan.replacements)
    for name, d in plan.modules_to_replace.items():
        block = result.model.get_submodule(name)
        assert type(block) is CLASSES[family]
        assert sum(p.numel() for p in block.parameters()) == d.params_after, name
    doc = json.loads(json.dumps(plan.to_dict()))
    assert doc["schema_version"] == 2 and all(d["block"] for d in doc["decisions"] if d["action"] == "replace")
    again = load_plan(doc, result.before)
    assert [(d.action, d.family, d.rank, d.macs_after) for d in again.decisions] == \
        [(d.action, d.family, d.rank, d.macs_after) for d in plan.decisions]
    reapplied = dsrewrite.convert(small, SMALL, plan=again)
    for a, b in zip(result.model.state_dict().items(), reapplied.model.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), "the saved plan applies to the same model"
    assert result.report.after["macs"] == plan.macs_after, "the planned MACs are the analyzer's count"


@pytest.mark.parametrize("family", ["spatial", "bottleneck", "pointwise-first", "inverted-residual", "mbconv"])
def test_full_rank_blocks_are_exact_through_convert(small, family):
    result = dsrewrite.convert(small, SMALL, "auto", [f"block.family={family}", "plan.target_latency=0",
                                                      "block.rank=100000", "replace.min_mac_reduction=0"])
    assert len(result.plan.replacements) == 10
    assert result.report.fidelity["relative_error"] < 1e-5
    assert all(layer.kept_energy > 1 - 1e-9 for layer in result.report.layers)


@pytest.mark.parametrize("family,rank", [("spatial", 0), ("bottleneck", 0), ("pointwise-first", 2),
                                         ("inverted-residual", 0), ("mbconv", 0)])
def test_calibration_refits_family_blocks(small, family, rank):
    torch.manual_seed(1)
    data = [torch.randn(12, *SMALL[1:]) for _ in range(2)]
    result = dsrewrite.convert(small, SMALL, "auto", [f"block.family={family}", "plan.target_latency=0",
                                                      f"block.rank={rank}"], calibration=data)
    cal = result.report.calibration
    assert cal["blocks"] == len(result.plan.modules_to_replace)
    assert cal["after"]["relative_error"] < 0.6 * cal["before"]["relative_error"]


def test_mbconv_converts_calibrates_and_exports_as_the_inverted_residual_block_plus_an_identity_gate(small, tmp_path):
    """Same plan, same weights after calibration (the refit sees the gate's identity output), the same
    function; the SE layers are extra parameters and MACs, counted exactly; code export carries them."""
    import importlib.util

    from dsrewrite.export import export_code

    torch.manual_seed(1)
    data = [torch.randn(12, *SMALL[1:]) for _ in range(2)]
    results = {f: dsrewrite.convert(small, SMALL, "auto", [f"block.family={f}", "plan.target_latency=0",
                                                          "block.rank=48"], calibration=data)
               for f in ("inverted-residual", "mbconv")}
    ir, mb = results["inverted-residual"], results["mbconv"]
    assert [(d.name, d.rank) for d in ir.plan.replacements] == [(d.name, d.rank) for d in mb.plan.replacements]
    ir_state = ir.model.state_dict()
    for name, value in mb.model.state_dict().items():
        if ".se." not in name:
            assert torch.equal(value, ir_state[name]), name
    x = torch.randn(4, *SMALL[1:])
    with torch.no_grad():
        assert torch.equal(mb.model(x), ir.model(x))
    assert mb.report.after["macs"] == mb.plan.macs_after > ir.plan.macs_after
    assert all("SE" in d.block_text for d in mb.plan.replacements)
    path = export_code(mb.model, (x,), tmp_path / "code")
    spec = importlib.util.spec_from_file_location("exported_mbconv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.no_grad():
        assert torch.allclose(module.load_model()(x), mb.model(x), atol=1e-6)


def test_layer_family_patterns_and_keep(resnet):
    plan = dsrewrite.plan_model(resnet, SHAPE, "default", ["block.layer_family={'layer4.*' = 'bottleneck', "
                                                           "'layer3.1.*' = 'keep'}"])
    by_name = {d.name: d for d in plan.decisions}
    assert by_name["layer4.1.conv2"].family == "bottleneck"
    assert by_name["layer3.0.conv2"].family == "separable"
    assert not by_name["layer3.1.conv1"].replaced and "layer_family says keep" in by_name["layer3.1.conv1"].reason


@pytest.mark.parametrize("value,message", [
    ("block.family=tucker", "block.family"),
    ("block.layer_family={'layer4.*' = 'botleneck'}", "did you mean 'bottleneck'"),
    ("plan.target_latency=2", "between 0 and 1"),
])
def test_bad_family_settings_get_one_clear_error(value, message):
    with pytest.raises(ConfigError, match=message):
        dsrewrite.plan_model(torchvision.models.resnet18(), SHAPE, "default", [value])


def test_auto_without_a_target_is_a_config_error(resnet):
    with pytest.raises(ConfigError, match="target"):
        dsrewrite.plan_model(resnet, SHAPE, "default", ["block.family=auto"])


@pytest.mark.parametrize("target", [0.4])
def test_auto_is_never_worse_than_any_single_family_at_the_same_mac_target(small, target):
    totals = {}
    for family in ["auto", *FAMILIES]:
        plan = dsrewrite.plan_model(small, SMALL, "auto", [f"block.family={family}"], target_macs=target)
        assert plan.macs_after <= target * plan.macs_before * 1.0001 or plan.notes
        if family == "separable":  # separable alone keeps the depth-multiplier chooser (dsrewrite.rank): same error
            assert plan.rank_choice.get("chooser") is None
            totals[family] = sum(d.candidate_errors[d.depth_multiplier] if d.replaced else 0.0
                                 for d in _first_sites(plan) if d.candidate_errors)
        else:
            assert plan.rank_choice["chooser"] == "blocks"
            totals[family] = plan.rank_choice["error"]
    assert all(totals["auto"] <= e + 1e-9 for e in totals.values()), totals


def _first_sites(plan):
    seen = {}
    for d in plan.decisions:
        seen.setdefault(d.module_name, d)
    return list(seen.values())


def test_candidates_cover_every_family_with_exact_costs_and_weight_errors(small):
    plan = dsrewrite.plan_model(small, SMALL, "auto", target_macs=0.5)
    d = next(d for d in plan.decisions if d.name == "blocks.4.conv1")
    families = {c["family"] for c in d.candidates}
    assert families == {"keep", *AUTO_FAMILIES} and "mbconv" not in families
    conv = small.get_submodule("blocks.4.conv1")
    for c in d.candidates:
        if c["family"] == "keep":
            assert c["macs"] == d.macs_before and c["error"] == 0
            continue
        macs, _ = block_costs(c["family"], c["rank"], 128, 128, (3, 3), d.input_shape, d.output_shape,
                              c["family"] == "separable")
        assert c["macs"] == macs < d.macs_before
        assert c["error"] == pytest.approx(family_errors(conv.weight, c["family"], [c["rank"]])[c["rank"]])
    assert sum(c["chosen"] for c in d.candidates) == 1


def test_min_measured_speedup_leaves_out_slow_blocks_under_a_mac_target(small):
    """With a block planner, ``replace.min_measured_speedup`` keeps out each candidate block measured below
    it (it used to keep every site, for want of a site timing), and the plan says how many it left out."""
    from dsrewrite.measure import LayerTiming

    def timer(conv, rank, bn, activation, family="separable"):  # dense 1 ms; spatial, bottleneck 2× faster
        return LayerTiming(1e-3, 5e-4 if family in ("spatial", "bottleneck") else 2e-3)

    plan = dsrewrite.plan_model(small, SMALL, "auto", ["replace.min_measured_speedup=1.5"], target_macs=0.5,
                                layer_timer=timer)
    offered = {c["family"] for d in plan.decisions for c in (d.candidates or [])}
    assert offered == {"keep", "spatial", "bottleneck"}
    assert plan.replacements and plan.macs_after <= 0.5 * plan.macs_before
    assert any("min_measured_speedup" in n and "not offered" in n for n in plan.notes)
    free = dsrewrite.plan_model(small, SMALL, "auto", target_macs=0.5, layer_timer=timer)
    assert {c["family"] for d in free.decisions for c in (d.candidates or [])} == {"keep", *AUTO_FAMILIES}
    assert not any("min_measured_speedup" in n for n in free.notes)


def test_rank_ladder_stays_under_the_dense_macs_and_aligns():
    for family in ("spatial", "bottleneck"):
        ranks = rank_ladder(family, 256, 256, (3, 3), (1, 256, 14, 14), (1, 256, 14, 14))
        assert ranks and all(r % 8 == 0 for r in ranks if r >= 8)
        dense = 14 * 14 * 256 * 256 * 9
        assert all(block_costs(family, r, 256, 256, (3, 3), (1, 256, 14, 14), (1, 256, 14, 14))[0] <= 0.5 * dense
                   for r in ranks)


# ------------------------------------------------------------------- the latency search


def _candidates(n_layers=6):
    """Layers with a keep (4 ms) and three blocks trading time for error."""
    return {f"l{i}": [Candidate("keep", None, 100, 10, 0.0, 0.004, 0.004),
                      Candidate("spatial", 64, 50, 5, 0.2, 0.003, 0.004),
                      Candidate("spatial", 32, 30, 3, 0.4, 0.002, 0.004),
                      Candidate("bottleneck", 16, 10, 1, 0.7, 0.001, 0.004)] for i in range(n_layers)}


def _plan_for(candidates, resnet):
    """A real plan whose first replaced modules stand for the synthetic layers."""
    plan = dsrewrite.plan_model(resnet, SHAPE, "default")
    names = list(plan.modules_to_replace)[:len(candidates)]
    return plan, dict(zip(names, candidates.values()))


def test_latency_search_meets_the_target_the_measurement_sets(resnet):
    plan, cands = _plan_for(_candidates(), resnet)
    rest = 0.002

    def time_plan(p):  # the layers save only 60% of what they promise, in context
        saved = sum(cands[d.module_name][0].time_s - next(c.time_s for c in cands[d.module_name]
                                                           if (c.family, c.rank) == (d.family, d.rank))
                    for d in p.modules_to_replace.values() if d.module_name in cands)
        original = rest + 6 * 0.004
        return original, original - 0.6 * saved

    chosen = fit_latency(plan, cands, 0.75, rest + 6 * 0.004, time_plan)
    choice = chosen.rank_choice
    assert choice["reachable"] and 0.75 * (1 - 2 * TOLERANCE) <= choice["measured_fraction"] <= 0.75
    assert len(choice["rounds"]) > 1, "the first layer-sum plan measures too slow and the budget is searched"
    assert choice["rounds"][0]["measured_fraction"] > 0.75
    assert all(d.candidates and d.rule == "ChooseBlock" for d in chosen.decisions if d.module_name in cands)


def test_latency_search_says_when_the_target_is_out_of_reach(resnet):
    plan, cands = _plan_for(_candidates(2), resnet)
    chosen = fit_latency(plan, cands, 0.3, 0.1, lambda p: (0.1, 0.09))
    assert not chosen.rank_choice["reachable"]
    assert any("not reached" in n for n in chosen.notes)


def test_front_and_reasons_name_the_neighbours(resnet):
    plan, cands = _plan_for(_candidates(1), resnet)
    name = next(iter(cands))
    chosen = choose_blocks(plan, cands, target_latency=0.96, original_latency_s=0.02)
    d = chosen.modules_to_replace[name]
    assert (d.family, d.rank) == ("spatial", 64)
    assert "more accurate keep" in d.reason and "faster spatial 32" in d.reason
    assert [c.label for c in front(cands[name], True)] == ["bottleneck 16", "spatial 32", "spatial 64", "keep"]
    assert [(c["family"], c["rank"]) for c in d.candidates if c["front"]] == \
        [("keep", None), ("spatial", 64), ("spatial", 32), ("bottleneck", 16)], "the plan marks the front it reasoned on"


# ------------------------------------------------------------------------------- CLI


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def in_repo(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


@pytest.mark.parametrize("args,message", [
    (["--target-latency", "1.5"], "between 0 and 1"),
    (["--target-latency", "0.5", "--max-error", "0.1"], "goes alone"),
    (["--set", "block.family=auto"], "target"),
])
def test_cli_rejects_bad_targets(in_repo, args, message):
    r = run("convert", "examples/resnet.py", "--input-shape", "1,3,32,32", "--dry-run", *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_cli_latency_plan_is_the_plan_applied(in_repo, tmp_path):
    plan_path = tmp_path / "plan.json"
    # one layer planned (stages.3.0.conv2: the others are kept by rule), to keep the weight judging short
    r = run("convert", "examples/resnet.py", "--input-shape", "1,3,64,64", "--rules", "auto", "--target-latency",
            "0.7", "--target-macs", "0.95", "--repeats", "3", "--no-cache", "--set", "replace.min_in_channels=512",
            "--set", 'block.layer_family={"stages.3.1.*" = "keep"}', "--dry-run", "--format", "json", "-o", plan_path,
            "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(plan_path.read_text())
    choice = doc["rank_choice"]
    assert choice["target_latency"] == 0.7 and choice["rounds"] and choice["measured_fraction"] > 0
    assert choice["target_macs"] == 0.95 and doc["macs_after"] <= 0.95 * doc["macs_before"]
    rows = [d for d in doc["decisions"] if d.get("candidates")]
    assert rows and all(sum(c["chosen"] for c in d["candidates"]) == 1 for d in rows)
    out = tmp_path / "model.pt"
    r = run("convert", "examples/resnet.py", "--input-shape", "1,3,64,64", "--plan", plan_path, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    model = torch.load(out, weights_only=False)
    for d in doc["decisions"]:
        if d["action"] == "replace":
            assert type(model.get_submodule(d["module_name"])) is CLASSES[d["family"]]
    text = run("convert", "examples/resnet.py", "--input-shape", "1,3,64,64", "--plan", plan_path, "--dry-run")
    assert "Candidates" in text.output and "measured end to end against the original" in text.output
    assert "and at most 0.95 of the original MACs" in text.output


def test_saved_plan_with_a_bad_family_rank_is_refused(resnet):
    plan = dsrewrite.plan_model(resnet, SHAPE, "default", ["block.family=spatial"])
    doc = json.loads(json.dumps(plan.to_dict()))
    row = next(d for d in doc["decisions"] if d["action"] == "replace")
    row["rank"] = 10 ** 6
    with pytest.raises(PlanMismatch, match="rank must be an integer"):
        load_plan(doc, dsrewrite.analyze(resnet, SHAPE))
    row["rank"], row["family"] = 8, "tucker"
    with pytest.raises(PlanMismatch, match="family must be one of"):
        load_plan(doc, dsrewrite.analyze(resnet, SHAPE))


@pytest.mark.parametrize("family", ["spatial", "bottleneck", "inverted-residual"])
def test_a_width_resize_follows_the_family_blocks(small, family):
    """The chain's first and last convs take the resized channel counts; the block in between keeps its rank."""
    result = dsrewrite.convert(small, SMALL, "auto", [f"block.family={family}", "plan.target_latency=0",
                                                      "align.width=0.5"])
    assert result.plan.resize is not None and result.plan.resize.changed
    blocks = {n: result.model.get_submodule(n) for n in result.plan.modules_to_replace}
    assert blocks and all(type(b) is CLASSES[family] for b in blocks.values())
    first, last = {"spatial": ("vertical", "horizontal"), "bottleneck": ("reduce", "expand"),
                   "inverted-residual": ("expand", "project")}[family]
    narrowed = [b for b in blocks.values()
                if getattr(b, first).in_channels < small.get_submodule(_name_of(blocks, b)).in_channels]
    assert narrowed, "some block's input channels were resized"
    out = result.model(torch.randn(2, *SMALL[1:]))
    assert out.shape == small(torch.randn(2, *SMALL[1:])).shape
    for b in blocks.values():  # the block's own channel counts follow its convs (what plans and costs read)
        assert (b.in_channels, b.out_channels) == (getattr(b, first).in_channels, getattr(b, last).out_channels)
    result.model.train()(torch.randn(2, *SMALL[1:])).square().mean().backward()


def _name_of(blocks, block):
    return next(n for n, b in blocks.items() if b is block)


def _timers(original_s=0.02):
    """A layer timer where time and MACs disagree (spatial and bottleneck blocks 2.5× faster than the dense
    conv at any rank, the others 1.25×), and an end-to-end timer that adds up what the plan's blocks save."""
    from dsrewrite.measure import LayerTiming

    def timer(conv, rank, bn, activation, family="separable"):
        return LayerTiming(1e-3, 4e-4 if family in ("spatial", "bottleneck") else 8e-4)

    def plan_timer(plan):
        if plan is None:
            return original_s, original_s
        saved = sum(d.measured_original_s - d.measured_replacement_s for d in plan.replacements)
        return original_s, original_s - saved

    return timer, plan_timer


def test_a_mac_target_beside_a_latency_target_bounds_both(small):
    """``target_latency`` with ``target_macs``: the least-error plan within both. The latency plan alone
    takes the fast blocks at their most accurate (high-MAC) ranks; a MAC cap below its MACs makes the
    planner pay error for MACs, and the plan kept meets both targets; one out of reach is said."""
    timer, plan_timer = _timers()
    alone = dsrewrite.plan_model(small, SMALL, "auto", target_latency=0.8, layer_timer=timer, plan_timer=plan_timer)
    assert alone.rank_choice["reachable"] and alone.rank_choice["measured_fraction"] <= 0.8
    cap = round(0.8 * alone.macs_after / alone.macs_before, 3)
    both = dsrewrite.plan_model(small, SMALL, "auto", target_latency=0.8, target_macs=cap, layer_timer=timer,
                                plan_timer=plan_timer)
    choice = both.rank_choice
    assert choice["reachable"] and choice["measured_fraction"] <= 0.8
    assert choice["target_latency"] == 0.8 and choice["target_macs"] == cap
    assert both.macs_after <= cap * both.macs_before < alone.macs_after
    assert choice["error"] > alone.rank_choice["error"], "fewer MACs at the same speed cost error here"
    assert all(f"≤{cap:g} of the MACs" in d.reason for d in both.decisions if d.rule == "ChooseBlock")
    assert f"and ≤{cap:g} of the MACs" not in "".join(d.reason for d in alone.decisions)
    text = render_plan(both, "text")
    assert f"at most 0.8 of the original's measured latency and at most {cap:g} of the original MACs" in text
    tiny = dsrewrite.plan_model(small, SMALL, "auto", target_latency=0.8, target_macs=0.01, layer_timer=timer,
                                plan_timer=plan_timer)
    assert not tiny.rank_choice["reachable"]
    assert any("--target-macs 0.01 is out of reach within this latency budget" in n for n in tiny.notes)
    with pytest.raises(ValueError, match="max_error"):
        dsrewrite.plan_model(small, SMALL, "auto", target_macs=0.5, max_error=0.1)


@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_the_mac_price_search_finds_the_same_plan_whatever_the_errors_scale(scale):
    """Data errors are orders of magnitude below weight errors: the price per MAC is searched from the
    errors' own scale (doubled or halved from 1, then bisected geometrically), so scaling every error
    leaves the plan within both budgets unchanged."""
    from dsrewrite.choose import _within_macs
    from dsrewrite.rank import least_error_within

    def layers(s):
        return {f"l{i}": [Candidate("keep", None, 100, 10, 0.0, 0.004),
                          Candidate("spatial", 64, 60, 5, (0.2 + 0.01 * i) * s, 0.002),
                          Candidate("spatial", 32, 35, 3, (0.5 + 0.01 * i) * s, 0.002),
                          Candidate("bottleneck", 16, 10, 1, (0.9 + 0.01 * i) * s, 0.001)] for i in range(6)}

    def pick(blocks, widths):  # least error within 0.018 s of the six layers' 0.024 s
        options = {n: [(i, c.error, c.time_s) for i, c in enumerate(opts)] for n, opts in blocks.items()}
        return {n: blocks[n][i] for n, i in least_error_within(options, 0.018).items()}, {}

    plans = []
    for s in (1.0, scale):
        chosen, groups, note = _within_macs(layers(s), {}, pick, 1000, 0.7)
        assert note is None and not groups
        assert 1000 - sum(100 - c.macs for c in chosen.values()) <= 700
        plans.append(sorted((n, c.family, c.rank) for n, c in chosen.items()))
    alone, _ = pick(layers(1.0), {})
    assert 1000 - sum(100 - c.macs for c in alone.values()) > 700, "the cap binds"
    assert plans[0] == plans[1]
