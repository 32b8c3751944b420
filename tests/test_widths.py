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
from dsrewrite.choose import Candidate, WidthCandidate, choose_blocks, combined_saving, gather_widths
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
    plan = dsrewrite.plan_model(small, SMALL, "auto", ["plan.group_widths=[0.5]", 'block.layer_family={"blocks.0.*" = '
                                '"keep", "blocks.1.*" = "keep", "blocks.2.*" = "keep"}'], target_macs=0.3,
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
