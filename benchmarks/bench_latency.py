"""Converting for a measured latency target: does the result measure what the planner promised?

For each torchvision model (weights=None, 224×224, channels_last, BN folded, CPU):

1. ``auto`` at ``--target-latency`` (default 0.5): the block chooser (dsrewrite.choose) times
   every candidate block on its layer's input shape, and every channel group thinned to 0.75 /
   0.5 (judged on 16 N(0,1) images, ``--calibration``), chooses family × rank (or keep) per
   layer and a width per group, and checks each plan by timing it end to end; the plan it keeps
   is then applied (weights factorized from the model's) and the original and the converted
   model are timed again, interleaved round by round, by this script;
2. today's separable-only plan (preset ``default``) and ``auto`` at that plan's MAC fraction
   (``--target-macs``; the chooser minimizes weight error there, not time), timed in the same
   interleaved rounds; with ``--macs-only``, also with the speed floor
   (``replace.min_measured_speedup``) and within both that MAC fraction and separable-only's
   measured latency (``--target-macs`` with ``--target-latency``).

Reported per model: what the planner predicted from per-layer timings, what its own
end-to-end check measured, what this script measured for the applied model, and whether that
is within ±5% of the target (or below it); the time planning took; the families chosen.

    pip install -e '.[bench]'
    python benchmarks/bench_latency.py                  # writes benchmarks/results/latency.md
    python benchmarks/bench_latency.py --models resnet18 --rounds 5 -o /tmp/l.md
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_convert import interleaved  # noqa: E402
from common import fingerprint, md_table  # noqa: E402

import dsrewrite  # noqa: E402
from dsrewrite.measure import MeasureSettings, time_side_by_side  # noqa: E402
from dsrewrite.rules import load_rules  # noqa: E402

MODELS = ["resnet18", "resnet34", "resnet50", "vgg16_bn", "densenet121", "googlenet", "mobilenet_v2"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved end-to-end timing rounds")
    parser.add_argument("--calibration", type=int, default=16,
                        help="N(0,1) images the planner judges candidates on (0: none; then no channel widths are "
                             "offered). Latency does not depend on the weights, so the applied plan is not calibrated")
    parser.add_argument("--macs-only", action="store_true",
                        help="only the comparison with the separable-only plan at its MAC count, with auto also "
                             "planned under replace.min_measured_speedup (--min-speedup); writes latency_macs.md")
    parser.add_argument("--min-speedup", type=float, default=1.0)
    parser.add_argument("--no-both", action="store_true", help="--macs-only without the plan within both the "
                        "MACs and separable-only's measured latency")
    parser.add_argument("--quiet", action="store_true", help="no planner progress on stderr (by default the "
                        "planner's progress lines go there: planning a model at batch 64 takes minutes to an hour)")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = str(HERE / "results" / ("latency_macs.md" if args.macs_only else "latency.md"))
    if args.macs_only:
        return macs_only(args)
    settings, shape, say = _setup(args)
    rows, checks, families = [], [], []
    for name, model, analysis in _zoo(args, shape):
        config = _config("auto", args)
        say(f"{name}: planning for {args.target:g} of the measured latency ...")
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(1)
        data = [torch.randn(min(8, args.calibration - i), *shape[1:], generator=generator)
                for i in range(0, args.calibration, 8)] or None
        plan = dsrewrite.plan_model(model, shape, config, analysis=analysis, target_latency=args.target,
                                    measure_settings=settings, progress=None if args.quiet else say,
                                    calibration=data)
        planning_s = time.perf_counter() - start
        say(f"{name}: planned in {planning_s:.0f}s; applying ...")
        auto = dsrewrite.convert(model, shape, config, analysis=analysis, plan=plan)
        separable = dsrewrite.convert(model, shape, _config("default", args), analysis=analysis)
        fraction = separable.plan.macs_after / separable.plan.macs_before
        say(f"{name}: auto at the separable plan's MAC fraction {fraction:.3f} ...")
        auto_macs = dsrewrite.convert(model, shape, config, analysis=analysis, target_macs=fraction)
        say(f"{name}: timing end to end ...")
        latency = interleaved(model, {"auto": auto.model, "separable": separable.model,
                                      "auto_macs": auto_macs.model}, shape, settings, args.rounds)
        choice = plan.rank_choice
        measured = latency["auto"] / latency["original"]
        on_target = measured <= args.target * 1.05
        checked = choice.get("measured_fraction")
        rows.append([name, f"{1e3 * latency['original']:.1f}", f"{choice['predicted_fraction']:.2f}",
                     f"{checked:.2f} ({len(choice['rounds'])})" if checked is not None else "- (nothing to replace)",
                     f"{measured:.2f}",
                     "yes" if choice["reachable"] else "**no**",
                     ("yes" if on_target else "**no**") if choice["reachable"] else "n/a",
                     f"{len(plan.modules_to_replace)}", f"{len(plan.resize.changed) if plan.resize else 0}",
                     f"{auto.report.after['macs'] / auto.report.before['macs']:.2f}", f"{planning_s:.0f}s"])
        sep_speed = latency["original"] / latency["separable"]
        auto_speed = latency["original"] / latency["auto_macs"]
        checks.append([name, f"{fraction:.3f}", f"{sep_speed:.2f}×", f"{auto_speed:.2f}×",
                       "yes" if auto_speed >= sep_speed else ("tie (within 3%)" if auto_speed >= 0.97 * sep_speed
                                                              else "**no**")])
        count = collections.Counter(d.family for d in plan.modules_to_replace.values())
        families.append([name, ", ".join(f"{f} {n}" for f, n in count.most_common()) or "none"])
        say(f"{name}: target {args.target:g}: predicted {choice['predicted_fraction']:.2f}, checked "
            f"{checked}, measured {measured:.2f}; separable {sep_speed:.2f}× vs auto at its "
            f"MACs {auto_speed:.2f}×")
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(render(rows, checks, families, args))  # after each model: a partial run counts

    text = render(rows, checks, families, args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _setup(args):
    """(timing settings, input shape, a logger with elapsed seconds), threads set."""
    torch.set_num_threads(args.threads)
    settings = MeasureSettings(device="cpu", threads=args.threads, memory_format="channels_last", repeats=10,
                               warmup=3)
    t0 = time.perf_counter()

    def say(message):
        print(f"[{time.perf_counter() - t0:.0f}s] {message}", file=sys.stderr, flush=True)

    return settings, (args.batch_size, 3, args.size, args.size), say


def _zoo(args, shape):
    """(name, model with random weights in eval mode, its analysis) for each of ``--models``."""
    for name in args.models.split(","):
        kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
        yield name, model, dsrewrite.analyze(model, shape, name=name)


def macs_only(args) -> int:
    """Separable-only (preset ``default``) against ``auto`` at its MAC fraction, planned by weight error alone
    and with ``replace.min_measured_speedup`` (every candidate block timed on its layer; slower ones not
    offered), all timed end to end in the same interleaved rounds."""
    import dataclasses

    settings, shape, say = _setup(args)
    rows = []
    for name, model, analysis in _zoo(args, shape):
        config = _config("auto", args)
        separable = dsrewrite.convert(model, shape, _config("default", args), analysis=analysis)
        fraction = separable.plan.macs_after / separable.plan.macs_before
        say(f"{name}: auto at the separable plan's MAC fraction {fraction:.3f}, by weight error ...")
        plain = dsrewrite.convert(model, shape, config, analysis=analysis, target_macs=fraction)
        say(f"{name}: ... and with replace.min_measured_speedup={args.min_speedup:g} ...")
        start = time.perf_counter()
        timed = dsrewrite.convert(model, shape, dataclasses.replace(config, min_measured_speedup=args.min_speedup),
                                  analysis=analysis, target_macs=fraction, measure_settings=settings,
                                  progress=None if args.quiet else say)
        planning_s = time.perf_counter() - start
        results = {"separable": separable, "plain": plain, "timed": timed}
        both = None
        if not args.no_both:
            # separable-only's latency, measured here side by side, becomes a second target beside its MACs
            before_s, separable_s = time_side_by_side([model, separable.model], (torch.randn(shape),), settings,
                                                      rounds=3)
            sep_fraction = separable_s / before_s
            if sep_fraction < 1:
                say(f"{name}: auto within {fraction:.3f} of the MACs and separable-only's {sep_fraction:.3f} of the "
                    "latency ...")
                start = time.perf_counter()
                both = dsrewrite.convert(model, shape, config, analysis=analysis, target_macs=fraction,
                                         target_latency=sep_fraction, measure_settings=settings,
                                         batch_size=args.batch_size, progress=None if args.quiet else say)
                both_s = time.perf_counter() - start
                results["both"] = both
        say(f"{name}: timing end to end ...")
        plans = {k: sorted((d.name, d.family, d.rank) for d in r.plan.replacements) for k, r in results.items()}
        # the same plan is the same architecture: timed once, so that noise cannot rank a plan against itself
        latency = interleaved(model, {k: r.model for k, r in results.items()}, shape, settings, args.rounds, plans)
        speed = {k: latency["original"] / latency[k] for k in results}

        def verdict(k):
            return "yes" if speed[k] >= speed["separable"] else (
                "tie (within 3%)" if speed[k] >= 0.97 * speed["separable"] else "**no**")

        def macs(result):
            return f"{result.plan.macs_after / result.plan.macs_before:.3f}"

        dropped = next((n.split(" candidate")[0] for n in timed.plan.notes if "min_measured_speedup" in n), "0")
        rows.append([name, f"{fraction:.3f}", f"{1e3 * latency['original']:.1f}", f"{speed['separable']:.2f}×",
                     f"{speed['plain']:.2f}× ({macs(plain)}; {len(plain.plan.replacements)} blocks)",
                     verdict("plain"),
                     f"{speed['timed']:.2f}× ({macs(timed)}; {len(timed.plan.replacements)} blocks"
                     + ("; the same plan)" if plans["timed"] == plans["plain"] else ")"),
                     verdict("timed"), dropped, f"{planning_s:.0f}s"])
        if both is not None:
            choice = both.plan.rank_choice
            rows[-1] += [f"{speed['both']:.2f}× ({macs(both)}; {len(both.plan.replacements)} blocks; target "
                         f"{sep_fraction:.2f}, checked {choice['measured_fraction']:.2f}"
                         + ("" if choice["reachable"] else ", out of reach")
                         + ("; the same plan as by weight error" if plans["both"] == plans["plain"] else "") + ")",
                         verdict("both"), f"{both_s:.0f}s"]
        elif not args.no_both:
            rows[-1] += [f"- (separable-only measured {sep_fraction:.2f} of the original: no faster)", "n/a", "-"]
        say(" | ".join(rows[-1]))
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(render_macs(rows, args))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def render_macs(rows, args) -> str:
    wins = sum(r[7] != "**no**" for r in rows)
    both = not args.no_both
    both_wins = sum(r[11] != "**no**" for r in rows) if both else 0
    return "\n".join([
        "# At the separable-only plan's MAC count: does auto measure at least as fast?", "",
        f"Measured with `python benchmarks/bench_latency.py --macs-only` on {fingerprint()}; CPU, {args.threads} "
        f"threads, channels_last, BN folded, float32, batch {args.batch_size}, {args.size}×{args.size}, torchvision "
        "models with random weights. No GPU was available to this run.", "",
        "Per model: today's separable-only plan (preset `default`), then `auto` at that plan's MAC fraction "
        "(`--target-macs`), once choosing by weight error alone (no timing: fewer MACs is not lower latency) and "
        f"once with `--set replace.min_measured_speedup={args.min_speedup:g}` (every candidate block timed on its "
        "layer's input shape and offered only if it measured at least that much faster than the dense conv). "
        f"Speedups: the original's latency ÷ the converted model's, median of {args.rounds} interleaved rounds, "
        "all models in the same rounds (identical plans timed once). In brackets: the MAC fraction reached, "
        "the blocks placed, and whether the speed floor changed the plan. "
        "**planning**: the timed plan, timing included." + (
            " **auto within both**: `--target-macs` at the same fraction *and* `--target-latency` at "
            "separable-only's latency fraction, measured before planning (3 interleaved rounds; the target in "
            "brackets, and the planner's own end-to-end check): the least weight error within both budgets "
            "(every candidate timed, each plan checked end to end); its planning time beside it." if both else ""),
        "",
        md_table(["model", "MAC target", "original ms", "separable-only", "auto, by weight error",
                  "≥ separable", f"auto, min speedup {args.min_speedup:g}", "≥ separable",
                  "candidate blocks left out", "planning"]
                 + (["auto within both", "≥ separable", "planning (both)"] if both else []), rows), "",
        f"auto with the speed floor measures at least as fast as separable-only (or within 3%) on **{wins} of "
        f"{len(rows)}** models" + (f"; auto within both budgets on **{both_wins} of {len(rows)}**." if both else "."),
        ""]) + "\n"


def _config(preset: str, args):
    config = load_rules(preset)
    # plans are not compared on data here: the models have random weights and the 16 images are N(0, 1) noise, so
    # held-out output errors would say nothing about accuracy (accuracy at matched latency: bench_latency_accuracy)
    return type(config)(**{**config.__dict__, "measure_device": "cpu", "measure_threads": args.threads,
                           "measure_memory_format": "channels_last", "measure_fold_bn": True,
                           "compare_on_data": False})


def render(rows, checks, families, args) -> str:
    hits = sum(r[6] == "yes" for r in rows)
    reachable = sum(r[5] == "yes" for r in rows)
    out = [f"# Converting for a measured latency target ({args.target:g}× of the original)", "",
           f"Measured with `python benchmarks/bench_latency.py` on {fingerprint()}; CPU, {args.threads} threads, "
           f"channels_last, BN folded, float32, batch {args.batch_size}, {args.size}×{args.size}, torchvision models "
           "with random weights (`weights=None`: latency does not depend on them; errors do, so no accuracy here — "
           "see accuracy.md). No GPU was available to this run.", "",
           "Columns: **predicted** — the plan's latency from per-layer timings (each candidate block timed alone "
           "on its layer's input shape); **checked** — the planner's own end-to-end measurement of the plan it "
           "kept (planned model with random blocks vs original, side by side; planning rounds in brackets); "
           f"**measured** — this script, the applied model (weights factorized) vs the original, median of "
           f"{args.rounds} interleaved rounds. All as fractions of the original's latency.", "",
           md_table(["model", "original ms", "predicted", "checked (rounds)", "measured", "target reachable",
                     f"measured ≤ {args.target:g} +5%", "layers replaced", "groups thinned", "MACs after",
                     "planning"], rows), "",
           f"**{hits} of {reachable}** models where the planner reports the target reachable measure within it "
           "(+5%) in this run.", "",
           "## Blocks chosen", "", md_table(["model", "families (layers)"], families), "",
           "## Against today's separable-only plan, at its MAC count", "",
           "`default` preset (separable blocks only) against `auto` planned with `--target-macs` at the default "
           "plan's MAC fraction: the chooser there minimizes weight error within the MACs, it does not look at "
           "time. Same interleaved rounds.", "",
           md_table(["model", "MAC fraction", "separable-only speedup", "auto at same MACs speedup",
                     "auto ≥ separable"], checks), ""]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
