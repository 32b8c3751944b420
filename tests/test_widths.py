"""Channel widths chosen per group by the planner, beside the block families.

Facts are checked against what applying them does (MACs of the resized model, kept channels);
the choice against synthetic candidates whose best answer is known; the plan end to end on the
ResNet-style Fashion-MNIST net, through a saved plan and the CLI's bad-input paths.
"""

import json

import pytest
import torch
from click.testing import CliRunner

import dsrewrite
from dsrewrite.choose import (Candidate, WidthCandidate, alternatives, choose_blocks, combined_saving, compare_on_data,
                              gather_widths, plan_signature)
from dsrewrite.cli import cli
from dsrewrite.errors import ConfigError
from dsrewrite.plan import load_plan
from dsrewrite.rules import load_rules
from models import fashion_resnet

SMALL = (1, 1, 28, 28)


@pytest.fixture(scope="module")
def small():
    return fashion_resnet(16)


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(32, *SMALL[1:], generator=generator) for _ in range(2)]


def _all_macs(model):
    return dsrewrite.analyze(model, SMALL).profile.macs


def test_width_candidates_save_what_the_resize_saves(small, data):
    config = load_rules("auto", ["plan.group_widths=[0.75, 0.5]"])
    widths = gather_widths(small, dsrewrite.analyze(small, SMALL), config, data)
    assert widths, "the net has resizable groups"
    base = _all_macs(small)
    checked = 0
    for gid, options in widths.items():
        assert [w.new_width for w in options] == sorted({w.new_width for w in options}, reverse=True)
        for w in options:
            assert w.new_width < w.old_width and w.new_width % 8 == 0 and len(w.keep) == w.new_width
            assert w.error >= 0 and w.consumers and w.modules
        w = options[-1]
        plan = dsrewrite.plan_model(small, SMALL, "default", ["replace.min_in_channels=100000"])
        from dsrewrite.choose import _resize_of

        plan.resize = _resize_of({gid: w}, False, "test", plan.config)
        resized = dsrewrite.convert(small, SMALL, plan=plan).model
        assert base - _all_macs(resized) == w.macs_saved, f"group {gid}"
        checked += 1
    assert checked == len(widths)


def test_combined_saving_counts_a_conv_thinned_on_both_sides_once():
    def group(module_role_share):
        return WidthCandidate(0, (), 0.5, 8, 4, [0, 1, 2, 3], 0.0,
                              sum(round(100 * (1 - s)) for _, _, s in module_role_share),
                              parts=tuple((m, r, s, 100, None) for m, r, s in module_role_share))

    a, b = group([("conv", "out", 0.5)]), group([("conv", "in", 0.5)])
    assert combined_saving([a], False) == 50
    assert combined_saving([a, b], False) == pytest.approx(75)  # 100 · (1 − 0.5·0.5), not 100
    c = group([("conv", "in", 0.75)])  # two groups concatenated on one input: their removals add up
    assert combined_saving([b, c], False) == pytest.approx(75)


def _synthetic(resnet_plan_names):
    """Two layers with blocks, and a group whose thinning forces one of them dense."""
    cands = {n: [Candidate("keep", None, 100, 10, 0.0, 0.004),
                 Candidate("spatial", 32, 50, 5, 0.3, 0.002)] for n in resnet_plan_names}
    first = resnet_plan_names[0]
    cheap = WidthCandidate(1, ("g",), 0.5, 64, 32, list(range(32)), 0.05, 50, 0.002, None, (first,),
                           parts=((first, "out", 0.5, 100, 0.004),))
    costly = WidthCandidate(2, ("h",), 0.5, 64, 32, list(range(32)), 5.0, 50, 0.002, None, (resnet_plan_names[1],),
                            parts=((resnet_plan_names[1], "out", 0.5, 100, 0.004),))
    return cands, {1: [cheap], 2: [costly]}


def test_widths_win_where_they_cost_less_error_and_their_convs_stay_dense(small):
    plan = dsrewrite.plan_model(small, SMALL, "auto", target_macs=0.5)
    names = list(plan.modules_to_replace)[:2]
    cands, widths = _synthetic(names)
    whole = 0.004 * 2 + 0.002
    chosen = choose_blocks(plan, cands, target_latency=0.65, original_latency_s=whole, widths=widths)
    # the budget needs both layers to save 2 ms: thinning group 1 (error 0.05) beats a block (0.3);
    # the costly group 2 (error 5) loses to the other layer's block
    assert [c.group for c in chosen.resize.changed] == [1]
    first = next(d for d in chosen.decisions if d.module_name == names[0])
    second = chosen.modules_to_replace[names[1]]
    assert not first.replaced and first.rule == "ChooseWidth" and "thinned ×0.5" in first.reason
    assert second.family == "spatial"
    assert chosen.rank_choice["predicted_fraction"] <= 0.65 + 1e-9
    assert chosen.rank_choice["error"] == pytest.approx(0.35)
    # without the widths the same budget needs both blocks
    alone = choose_blocks(plan, cands, target_latency=0.65, original_latency_s=whole)
    assert alone.resize is None and alone.rank_choice["error"] == pytest.approx(0.6)


def test_plan_with_widths_is_applied_exactly_and_round_trips(small, data):
    # blocks only in the last two stages: 0.3 of the MACs is out of their reach, so groups are thinned too
    plan = dsrewrite.plan_model(small, SMALL, "auto", ["plan.group_widths=[0.5]", "plan.compare_on_data=false",
                                'block.layer_family={"blocks.0.*" = "keep", "blocks.1.*" = "keep", "blocks.2.*" = '
                                '"keep"}'], target_macs=0.3,
                                calibration=data)
    assert plan.resize is not None and plan.resize.changed, "at 0.3 of the MACs some group is thinned"
    assert plan.modules_to_replace, "and some blocks chosen"
    thinned = {m for c in plan.rank_choice["widths"] if c["chosen"] < c["old_width"] for m in c["members"]}
    assert thinned
    forced = [d for d in plan.decisions if d.rule == "ChooseWidth"]
    assert all(not d.replaced for d in forced)
    result = dsrewrite.convert(small, SMALL, plan=plan, calibration=data)
    assert dsrewrite.analyze(result.model, SMALL).profile.macs == plan.macs_after
    assert result.report.reconstruction is not None and result.report.reconstruction["layers"]
    doc = json.loads(json.dumps(plan.to_dict()))
    again = load_plan(doc, dsrewrite.analyze(small, SMALL))
    assert [(c.group, c.new_width, c.keep) for c in again.resize.changed] == \
        [(c.group, c.new_width, c.keep) for c in plan.resize.changed]
    applied = dsrewrite.convert(small, SMALL, plan=again, calibration=data).model
    with torch.no_grad():
        assert torch.allclose(applied(data[0]), result.model(data[0]), atol=1e-5)


def test_bad_width_settings_get_one_clear_error(small):
    with pytest.raises(ConfigError, match="between 0 and 1"):
        dsrewrite.plan_model(small, SMALL, "default", ["plan.group_widths=[1.5]"], target_macs=0.5)


def test_widths_without_data_or_beside_a_global_resize_are_not_offered_and_the_plan_says_so(small, data):
    plan = dsrewrite.plan_model(small, SMALL, "auto", ["plan.group_widths=[0.5]"], target_macs=0.5)
    assert plan.resize is None
    assert any("--calibrate" in n for n in plan.notes)
    plan = dsrewrite.plan_model(small, SMALL, "auto", ["plan.group_widths=[0.5]"], target_macs=0.5, width=0.75,
                                calibration=data)
    assert plan.resize.width == 0.75 and "widths" not in plan.rank_choice
    assert any("--width" in n for n in plan.notes)


@pytest.mark.parametrize("args,message", [
    (["--target-macs", "0.5", "--group-widths", "0.5,2"], "--group-widths takes widths between 0 and 1"),
    (["--group-widths", "0.5"], "for a target: give --target-latency or --target-macs"),
])
def test_cli_rejects_bad_group_widths(args, message):
    r = CliRunner().invoke(cli, ["convert", "examples/resnet.py", "--dry-run", *args])
    assert r.exit_code == 2 and message in r.output


def test_width_errors_are_weighted_by_each_readers_sensitivity(small, data):
    from dsrewrite.choose import gather_widths
    from dsrewrite.rules import load_rules

    config = load_rules("auto", ["plan.group_widths=[0.5]"])
    analysis = dsrewrite.analyze(small, SMALL)
    plain = gather_widths(small, analysis, config, data)
    readers = {n for options in plain.values() for n in options[0].consumers}
    # one reader counted four times, the others not at all: each group's error is its readers' weighted sum
    heavy = sorted(readers)[0]
    weighted = gather_widths(small, analysis, config, data, sensitivity={n: 4.0 if n == heavy else 0.0
                                                                          for n in readers})
    for gid, options in plain.items():
        for a, b in zip(options, weighted[gid]):
            if heavy not in a.consumers:
                assert b.error == 0.0
            elif a.consumers == (heavy,):
                assert b.error == pytest.approx(4.0 * a.error, rel=1e-9)
            else:
                assert 0.0 < b.error


def _three_families(names):
    """Two layers, each with keep, spatial and bottleneck; the widths of :func:`_synthetic`."""
    cands, widths = _synthetic(names)
    for n in names:
        cands[n].append(Candidate("bottleneck", 16, 60, 6, 0.2, 0.0024))
    return cands, widths


def test_alternatives_are_every_option_then_blocks_only_widths_only_and_each_family(small):
    plan = dsrewrite.plan_model(small, SMALL, "auto", target_macs=0.5)
    cands, widths = _three_families(list(plan.modules_to_replace)[:2])
    options = alternatives(cands, widths)
    assert [label for label, _, _ in options] == ["all", "blocks only", "widths only", "bottleneck", "spatial"]
    by_label = {label: (blocks, w) for label, blocks, w in options}
    assert by_label["all"] == (cands, widths) and by_label["blocks only"] == (cands, {})
    assert all([c.family for c in opts] == ["keep"] for opts in by_label["widths only"][0].values())
    assert by_label["widths only"][1] == widths
    for family in ("bottleneck", "spatial"):
        blocks, w = by_label[family]
        assert w == {} and all([c.family for c in opts] == ["keep", family] for opts in blocks.values())
    # one family and no widths: nothing to compare against
    one = {n: opts[:2] for n, opts in cands.items()}
    assert [label for label, _, _ in alternatives(one, {})] == ["all"]
    # no block offered anywhere: the widths alone are every option, nothing to compare
    assert [label for label, _, _ in alternatives({n: opts[:1] for n, opts in cands.items()}, widths)] == ["all"]


def test_compare_on_data_keeps_the_least_held_out_error_among_plans_that_meet_the_target(small):
    plan = dsrewrite.plan_model(small, SMALL, "auto", target_macs=0.5)
    cands, widths = _three_families(list(plan.modules_to_replace)[:2])
    measured = {"all": 0.60, "blocks only": 0.64, "widths only": 0.70, "bottleneck": 0.66, "spatial": 0.50}
    held_out = {"all": 0.30, "blocks only": 0.20, "widths only": 0.05, "bottleneck": 0.01, "spatial": 0.25}
    options = []
    for label, blocks, w in alternatives(cands, widths):
        made = choose_blocks(plan, blocks, target_latency=0.65, original_latency_s=0.01, widths=w)
        made.rank_choice["measured_fraction"] = measured[label]
        options.append((label, made))
    calls = []

    def judge(p, label):
        calls.append(label)
        return {"relative_error": held_out[label], "cosine": 1.0, "top1_agreement": 1.0, "samples": 8, "seconds": 0.1}

    chosen = compare_on_data(options, judge, True, 0.65)
    rows = chosen.rank_choice["compared"]
    assert [r["plan"] for r in rows] == [label for label, _ in options]
    # widths only (0.05) and bottleneck (0.01) measured above the target: the least error within it is blocks only
    assert [r["fits"] for r in rows] == [True, True, False, False, True]
    assert [r["chosen"] for r in rows] == [False, True, False, False, False]
    assert plan_signature(chosen) == plan_signature(options[1][1])
    assert any("'blocks only' measured less output error" in n for n in chosen.notes)
    # plans making the same changes are judged once, and say which they equal
    assert len(calls) == len({plan_signature(p) for _, p in options})
    for r, (_, p) in zip(rows, options):
        first = next(label for label, q in options if plan_signature(q) == plan_signature(p))
        assert r["same_as"] == (None if first == r["plan"] else first)
    # timed again in order of error, a plan whose two checks average above the target is passed over
    again = {plan_signature(options[1][1]): 0.70, plan_signature(options[4][1]): 0.52}
    rechecked = []

    def recheck(p):
        rechecked.append(plan_signature(p))
        return 1.0, again.get(plan_signature(p), 0.60)

    chosen = compare_on_data(options, judge, True, 0.65, recheck=recheck)
    rows = chosen.rank_choice["compared"]
    spatial = next(r for r in rows if r["plan"] == "spatial")
    assert rows[1]["checks"] == pytest.approx([0.64, 0.70]) and not rows[1]["fits"]
    assert spatial["checks"] == pytest.approx([0.50, 0.52]) and spatial["fraction"] == pytest.approx(0.51)
    assert spatial["chosen"] and rechecked == [plan_signature(options[1][1]), plan_signature(options[4][1])]
    assert "checks" not in rows[0]  # never reached: its error is higher than the kept plan's
    # with a MAC cap beside the latency target, a plan above it misses the target however fast it measured
    share = {label: p.macs_after / p.macs_before for label, p in options}
    cap = share["blocks only"] * (1 - 1e-6)
    assert share["all"] <= cap or share["spatial"] <= cap, share
    capped = compare_on_data(options, judge, True, 0.65, macs_cap=cap)
    rows = capped.rank_choice["compared"]
    assert [r["fits"] for r in rows] == [measured[label] <= 0.65 and share[label] <= cap for label, _ in options]
    assert not rows[1]["fits"] and rows[1]["fraction"] == 0.64, "blocks only: fast enough, too many MACs"
    fitting = [(held_out[r["plan"]], i) for i, r in enumerate(rows) if r["fits"]]
    assert [r["chosen"] for r in rows] == [i == min(fitting)[1] for i in range(len(rows))]
    # nothing meets the target: the plan with every option stays, unannotated
    for _, p in options:
        p.rank_choice["measured_fraction"] = 0.9
    kept = compare_on_data(options, judge, True, 0.65)
    assert plan_signature(kept) == plan_signature(options[0][1])
    assert [n for n in kept.notes if "held-out" not in n] == options[0][1].notes


def test_plans_compared_on_data_are_the_conversion_measured(small, data):
    plan = dsrewrite.plan_model(small, SMALL, "auto", ["plan.group_widths=[0.5]"], target_macs=0.4, calibration=data)
    rows = plan.rank_choice["compared"]
    families = sorted({c["family"] for d in plan.decisions for c in (d.candidates or [])} - {"keep"})
    assert [r["plan"] for r in rows] == ["all", "blocks only", "widths only", *families]
    assert all(r["fits"] == (r["fraction"] <= 0.4 + 1e-9) for r in rows)
    kept = next(r for r in rows if r["chosen"])
    assert kept["relative_error"] == min(r["relative_error"] for r in rows if r["fits"])
    assert kept["samples"] == 8  # the 1/8 of the 64 samples that calibration holds out
    assert any("only 8 held-out calibration samples" in n for n in plan.notes)
    # what the comparison measured for the kept plan is what converting with it gives
    result = dsrewrite.convert(small, SMALL, plan=plan, calibration=data)
    fidelity = (result.report.reconstruction or result.report.calibration)["after"]
    assert fidelity["relative_error"] == pytest.approx(kept["relative_error"], rel=1e-6)
    from dsrewrite.html import render_conversion_html
    from dsrewrite.report import render_conversion, render_plan

    text = render_plan(plan)
    assert "Plans compared on data" in text and f"✓ {kept['plan']}" in text
    assert result.report.to_dict()["plans_compared"] == rows
    assert f"Plan kept: '{kept['plan']}', the least output error" in render_conversion(result.report, plan)
    page = render_conversion_html(result.report, plan)
    assert "Plans compared on data" in page and f"{kept['relative_error']:.4f}" in page
    again = load_plan(json.loads(json.dumps(plan.to_dict())), dsrewrite.analyze(small, SMALL))
    assert again.rank_choice["compared"] == rows
    off = dsrewrite.plan_model(small, SMALL, "auto", ["plan.group_widths=[0.5]", "plan.compare_on_data=false"],
                               target_macs=0.4, calibration=data)
    assert "compared" not in off.rank_choice
    assert rows[0]["predicted_error"] == pytest.approx(off.rank_choice["error"])


def test_latency_plans_are_compared_on_data_and_the_kept_one_is_timed_twice(small, data):
    from dsrewrite.measure import LayerTiming

    def layer_timer(conv, rank, bn, activation, family="separable"):  # every block halves its layer's time
        return LayerTiming(1e-3, 5e-4)

    checks = []

    def plan_timer(plan):  # the model in context: each block or thinned group saves 7% of the original
        if plan is None:
            return 1.0, None
        changes = len(plan.modules_to_replace) + (len(plan.resize.changed) if plan.resize else 0)
        checks.append(changes)
        return 1.0, max(1.0 - 0.07 * changes, 0.05)

    plan = dsrewrite.plan_model(small, SMALL, "auto", ["plan.group_widths=[0.5]"], target_latency=0.6,
                                calibration=data, layer_timer=layer_timer, plan_timer=plan_timer)
    rows = plan.rank_choice["compared"]
    assert rows[0]["plan"] == "all" and all(r["by"] == "measured latency" for r in rows)
    kept = next(r for r in rows if r["chosen"])
    assert kept["fits"] and len(kept["checks"]) == 2 and kept["fraction"] == pytest.approx(sum(kept["checks"]) / 2)
    assert kept["fraction"] <= 0.6
    # the timing model is exact here, so the first plan timed again in order of error is kept
    assert kept["relative_error"] == min(r["relative_error"] for r in rows if r["fits"])
    assert all("checks" not in r for r in rows if r["relative_error"] > kept["relative_error"])
    assert plan.rank_choice["measured_fraction"] == pytest.approx(kept["checks"][0])
