"""Accuracy at a matched *measured* latency (Fashion-MNIST, CPU): the block chooser against single families.

For the ResNet-style and VGG-style CNNs of examples/fashion_cnns.py, trained a few epochs:
each conversion is planned with ``--target-latency`` (a fraction of the original's latency
measured here at batch 64, channels_last, BN folded), calibrated on 1024 unlabeled training
images, then distilled for one epoch. Families: ``auto`` (the chooser picks family × rank or
keep per layer) and each single family (the chooser picks rank or keep per layer). Every
row's latency is measured again, after conversion, against the original side by side.

    apt-get install -y dataset-fashion-mnist
    pip install -e '.[bench]'
    python benchmarks/bench_latency_accuracy.py      # writes benchmarks/results/latency_accuracy.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
from bench_accuracy import DISTILL_LR, DISTILL_NOTE  # noqa: E402
from common import PeakMemory, fingerprint, md_table  # noqa: E402
from fashion_cnns import MODELS  # noqa: E402
from finetune_fashion_mnist import loader, train  # noqa: E402

import dsrewrite  # noqa: E402
from dsrewrite.data import fashion_mnist  # noqa: E402
from dsrewrite.measure import MeasureSettings, time_model  # noqa: E402
from dsrewrite.rules import load_rules  # noqa: E402

FAMILIES = ["auto", "separable", "spatial", "bottleneck", "pointwise-first"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,vgg")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="batch size the latency is planned and measured at")
    parser.add_argument("--targets", default="0.5")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--distill", default="auto", help="families distilled for one epoch (comma list, or none)")
    parser.add_argument("-o", "--output", default=str(HERE / "results" / "latency_accuracy.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = HERE / ".cache"
    cache.mkdir(exist_ok=True)
    settings = MeasureSettings(device="cpu", threads=args.threads, memory_format="channels_last", repeats=10,
                               warmup=3)
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    test = loader(x_test, y_test, 1000, shuffle=False)
    calibration = [x for x, _ in loader(x_train[:1024], y_train[:1024], 128, shuffle=False)]
    shape = (args.batch_size, 1, 28, 28)
    x_lat = torch.randn(*shape)
    t0 = time.perf_counter()
    rows = []

    def log(msg):
        print(f"[{time.perf_counter() - t0:.0f}s] {msg}", file=sys.stderr, flush=True)

    def flush():
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(render(rows, args))

    for kind in args.models.split(","):
        torch.manual_seed(0)
        original = MODELS[kind](args.width)
        weights = cache / f"fmnist_{kind}{args.width}_e{args.epochs}_n{len(x_train)}.pt"
        if weights.exists():
            original.load_state_dict(torch.load(weights, weights_only=True))
        else:
            log(f"{kind}: training {args.epochs} epochs ...")
            train(original, x_train, y_train, args.epochs, log=log)
            torch.save(original.state_dict(), weights)
        original.eval()
        base_acc = dsrewrite.evaluate(original, test)
        with torch.no_grad():
            start = time.perf_counter()
            for x in calibration:
                original(x)
            forward_s = time.perf_counter() - start
        analysis = dsrewrite.analyze(original, shape)
        rows.append([kind, "original", "-", f"{100 * base_acc:.2f}%", "+0.00", "1.00", "-", "-", "-",
                     f"{analysis.profile.macs / args.batch_size / 1e6:.2f}M", "-", "-", "-"])
        log(f"{kind}: original {100 * base_acc:.2f}%, one forward over the calibration images {forward_s:.2f}s")
        flush()
        for target in (float(t) for t in args.targets.split(",")):
            for family in args.families.split(","):
                config = load_rules("auto", [f"block.family={family}"])
                start = time.perf_counter()
                plan = dsrewrite.plan_model(original, shape, config, analysis=analysis, target_latency=target,
                                            measure_settings=settings, batch_size=args.batch_size)
                plan_s = time.perf_counter() - start
                start = time.perf_counter()
                with PeakMemory() as peak:
                    result = dsrewrite.convert(original, shape, config, analysis=analysis, plan=plan,
                                               calibration=calibration)
                cal_s = time.perf_counter() - start
                model = result.model.eval()
                before = time_model(original, (x_lat,), settings).median
                after = time_model(model, (x_lat,), settings).median
                acc = dsrewrite.evaluate(model, test)
                chosen = sorted({d.family for d in plan.modules_to_replace.values()}) or ["none"]
                row = [kind, family, f"{target:g}", f"{100 * acc:.2f}%", f"{100 * (acc - base_acc):+.2f}",
                       f"{after / before:.2f}", f"{plan.rank_choice['measured_fraction']:.2f}",
                       f"{len(plan.modules_to_replace)} ({', '.join(chosen)})",
                       f"{analysis.profile.macs / plan.macs_after:.2f}×",
                       f"{plan.macs_after / args.batch_size / 1e6:.2f}M", f"{plan_s:.0f}s",
                       f"{cal_s:.1f}s ({cal_s / forward_s:.0f}×), {peak.peak / 2 ** 20:.0f} MiB", "-"]
                log(f"{kind} {family} @{target:g}: {100 * acc:.2f}% at {after / before:.2f}× latency")
                if family in args.distill.split(","):
                    start = time.perf_counter()
                    student = copy.deepcopy(model)
                    history = dsrewrite.distill(student, original, loader(x_train, y_train, 128, shuffle=True, seed=7),
                                                epochs=1, lr=DISTILL_LR, eval_loader=test)
                    row[-1] = f"{100 * history[-1].accuracy:.2f}% ({time.perf_counter() - start:.0f}s)"
                    log(f"{kind} {family} @{target:g}: distilled {100 * history[-1].accuracy:.2f}%")
                rows.append(row)
                flush()
    log(f"wrote {args.output}")
    return 0


def render(rows, args) -> str:
    return "\n".join([
        "# Accuracy at a matched measured latency: Fashion-MNIST", "",
        f"Measured with `python benchmarks/bench_latency_accuracy.py` on {fingerprint()}. Originals: "
        f"examples/fashion_cnns.py, width {args.width}, trained {args.epochs} epochs (SGD one-cycle, seed 0). "
        f"Plans: preset `auto` with `block.family` as in the row, `--target-latency` at batch {args.batch_size}, "
        "CPU, channels_last, BN folded; each layer keeps or gets a block (the family's ranks, or every family's "
        "under auto) by weight error within the budget, checked end to end. Calibration: 1024 unlabeled training "
        "images (no gradients). Distillation: 1 epoch "
        f"({DISTILL_NOTE}). No GPU was available to this run.", "",
        "Columns: **latency** — the converted model ÷ the original, measured side by side after conversion; "
        "**checked** — the planner's own end-to-end check of its plan; **calibration** — wall time of the "
        "calibration, its multiple of one forward pass of the original over the same 1024 images, and peak memory "
        "growth.", "",
        md_table(["model", "family", "latency target", "accuracy (calibrated)", "Δ points", "latency", "checked",
                  "layers replaced", "fewer MACs", "MACs/image", "planning", "calibration", "+ 1 epoch distillation"],
                 rows), ""]) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
