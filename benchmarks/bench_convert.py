"""Measured speedups of three conversion recipes, side by side, on this machine.

(a) naive: what the popular articles teach — replace every 3×3 standard conv except the
    first with depthwise + BN + ReLU + pointwise;
(b) dsrewrite's ``default`` preset;
(c) dsrewrite's ``latency`` preset (replace only where the block measured ≥1.1× faster here).

For each torchvision model at 224×224, batch 1: params, MACs, end-to-end latency and
speedup, realization ratio (measured ÷ theoretical speedup), layers replaced, and layers
that measured slower after replacement. End-to-end timings of the original and the three
converted models are interleaved round by round (BN folded, as deployed), so drift on a
shared machine hits all four alike.

    pip install -e '.[bench]'
    python benchmarks/bench_convert.py                   # writes benchmarks/results/convert.md
    python benchmarks/bench_convert.py --models resnet18 --rounds 3 -o /tmp/c.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import fingerprint, md_table  # noqa: E402

import dsrewrite  # noqa: E402
from dsrewrite.measure import MeasureSettings, fold_bn, measure, prepare  # noqa: E402
from dsrewrite.rules import load_rules  # noqa: E402

MODELS = ["resnet18", "resnet34", "resnet50", "vgg16_bn", "densenet121", "googlenet"]
NAIVE = ["keep.first_convs=1", "keep.first_depth_fraction=0", "keep.downsampling=false", "replace.kernel_sizes=[3]",
         "replace.min_in_channels=0", "replace.min_macs_share=0", "replace.min_mac_reduction=0",
         "block.depth_multiplier=1", "block.bn=true", "block.activation=relu", "align.divisor=0"]
RECIPES = {"naive": ("default", NAIVE), "default": ("default", []), "latency": ("latency", [])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-format", default="channels_last", choices=["channels_last", "contiguous"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved end-to-end timing rounds")
    parser.add_argument("-o", "--output", default=str(HERE / "results" / "convert.md"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    settings = MeasureSettings(device=args.device, threads=args.threads, memory_format=args.memory_format,
                               repeats=10, warmup=3)
    rows, checks = [], []
    t0 = time.perf_counter()
    for name in args.models.split(","):
        kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
        shape = (1, 3, 224, 224)
        converted = {}
        for recipe, (preset, overrides) in RECIPES.items():
            config = load_rules(preset, overrides)
            config = type(config)(**{**config.__dict__, "measure_device": args.device,
                                     "measure_threads": args.threads, "measure_memory_format": args.memory_format})
            print(f"[{time.perf_counter() - t0:.0f}s] {name}: converting ({recipe}) ...", file=sys.stderr, flush=True)
            # measure=True times every replaced layer against its block (on its own input shape)
            converted[recipe] = dsrewrite.convert(model, shape, config, measure=True, measure_settings=settings,
                                                  progress=lambda m: None)
        print(f"[{time.perf_counter() - t0:.0f}s] {name}: timing end to end ...", file=sys.stderr, flush=True)
        plans = {r: sorted((d.module_name, d.depth_multiplier, d.bn, d.activation) for d in c.plan.replacements)
                 for r, c in converted.items()}
        latency = interleaved(model, {r: c.model for r, c in converted.items()}, shape, settings, args.rounds, plans)
        base = converted["naive"].report.before
        rows.append([name, "original", _m(base["params"]), _g(base["macs"]), f"{1e3 * latency['original']:.1f}",
                     "1.00×", "-", "-", "-"])
        speedups = {}
        for recipe, result in converted.items():
            rep = result.report
            speed = latency["original"] / latency[recipe]
            speedups[recipe] = speed
            theoretical = rep.ratios()["macs"]
            slower = [layer.name for layer in rep.layers if layer.measured_speedup is not None
                      and layer.measured_speedup < 1.0]
            realization = speed / theoretical if theoretical > 1.0001 else None
            rows.append([name, recipe, _m(rep.after["params"]), _g(rep.after["macs"]),
                         f"{1e3 * latency[recipe]:.1f}", f"{speed:.2f}×",
                         f"{realization:.2f}" if realization is not None else "n/a (nothing replaced)",
                         f"{len(rep.layers)}", f"{len(slower)}" + (f" ({', '.join(slower[:3])}…)" if slower else "")])
            if recipe == "latency":
                checks.append((name, not slower, speed >= speedups["naive"], realization, speed, speedups["naive"]))
        print(f"[{time.perf_counter() - t0:.0f}s] {name}: " + ", ".join(f"{r} {s:.2f}×" for r, s in speedups.items()),
              file=sys.stderr, flush=True)

    text = render(rows, checks, args, settings)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def interleaved(original, models: dict, shape, settings: MeasureSettings, rounds: int,
                plans: dict | None = None) -> dict[str, float]:
    """Median latency per model, timing all of them round by round (a few runs each per round).

    Recipes whose plans replace exactly the same layers the same way produce the same
    architecture; they are timed once and share the number, so noise cannot rank them.
    """
    x = torch.randn(*shape)
    prepared = {"original": prepare(fold_bn(original), (x,), settings)}
    alias = {}
    for name, model in models.items():
        twin = next((other for other in prepared if plans and other in plans and plans[other] == plans[name]), None)
        if twin is not None:
            alias[name] = twin
            continue
        prepared[name] = prepare(fold_bn(model), (x,), settings)
    per_round = MeasureSettings(**{**settings.__dict__, "repeats": 3, "warmup": 1})
    samples: dict[str, list[float]] = {name: [] for name in prepared}
    for _ in range(rounds):
        for name, (model, args) in prepared.items():
            samples[name].append(measure(model, args, per_round, prepared=True).median)
    result = {name: statistics.median(v) for name, v in samples.items()}
    result.update({name: result[twin] for name, twin in alias.items()})
    return result


def _m(v) -> str:
    return f"{v / 1e6:.2f}M"


def _g(v) -> str:
    return f"{v / 1e9:.3f}G"


def render(rows, checks, args, settings) -> str:
    out = ["# Conversion: measured speedups of three recipes", "",
           f"Measured with `python benchmarks/bench_convert.py` on {fingerprint()}; device {args.device}, "
           f"{args.threads} threads, {args.memory_format}, batch 1, 224×224, BN folded into the preceding conv for "
           f"inference, float32. End-to-end latency is the median over {args.rounds} interleaved rounds of 3 runs;",
           "recipes whose plans are identical (same layers, same blocks) are the same model and are timed once.",
           "No GPU was available to this run.", "",
           "Recipes: **naive** replaces every 3×3 standard conv except the first (depthwise + BN + ReLU + pointwise);"
           " **default** and **latency** are dsrewrite presets (`rules/default.toml`, `rules/latency.toml`; latency "
           "replaces a conv only if its block measured ≥1.1× faster on this machine, on the conv's own input shape).",
           "", "Realization = measured speedup ÷ theoretical speedup (MACs before ÷ MACs after). \"Slower layers\": "
           "replaced layers whose block measured slower than the conv it replaced.", "",
           md_table(["model", "recipe", "params", "MACs", "latency ms", "speedup", "realization", "layers replaced",
                     "slower layers"], rows), "",
           "## Targets (latency preset)", ""]
    table = [[name, "yes" if no_slow else "**no**",
              f"{speed:.2f}× vs {naive:.2f}×" + ("" if ok else " (tie within 3% noise)" if speed >= 0.97 * naive
                                                else " **(below)**"),
              f"{real:.2f}" if real is not None else "n/a"] + (["yes"] if real is None or real >= 0.7 else ["**no**"])
             for name, no_slow, ok, real, speed, naive in checks]
    out += [md_table(["model", "no slower layer replaced", "speedup ≥ naive", "realization", "realization ≥ 0.7"],
                     table), ""]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
