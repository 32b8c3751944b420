"""The separable block's joint depthwise + pointwise fit at higher depth multipliers: calibration time and fit.

``bench_calibration.py`` calibrates the ``finetune`` preset's plans (depth multiplier 1). Plans the
MAC or latency planner makes for the separable family use depth multipliers up to 4, where the
joint fit's depthwise half-step — a (C_in·r·K²)² system — is most of the calibration's time. This
script takes a width-32 Fashion-MNIST net (examples/fashion_cnns.py), trained one epoch on
12,000 images (a quick original: the fit's cost does not depend on how well it is trained),
plans separable blocks at ``--target-macs`` (weight error, depth multiplier per layer), and
calibrates the plan ``--repeats`` times on 1024 training images (fast mode): time, its multiple of
one forward pass of the original over the same images, the held-out relative output error, top-1
agreement and test accuracy (5000 test images).

To compare two versions of dsrewrite, run it from each checkout, one after the other::

    python benchmarks/bench_joint_fit.py --models resnet,vgg -o /tmp/joint.md
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
from common import fingerprint, md_table  # noqa: E402
from fashion_cnns import build_model  # noqa: E402
from finetune_fashion_mnist import loader, train  # noqa: E402

import dsrewrite  # noqa: E402
from dsrewrite.data import fashion_mnist  # noqa: E402
from dsrewrite.rules import load_rules  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,vgg")
    parser.add_argument("--target-macs", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", default=str(HERE / "results" / "joint_fit.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = fashion_mnist("train")
    xt, yt = fashion_mnist("test")
    test = loader(xt[:5000], yt[:5000], 500, shuffle=False)
    calibration = [x[50000 + i:50000 + i + 64] for i in range(0, 1024, 64)]
    rows = []
    for kind in args.models.split(","):
        torch.manual_seed(0)
        original = train(build_model(kind, 32), x[:12000], y[:12000], 1, log=lambda m: None).eval()
        with torch.no_grad():
            for batch in calibration[:2]:
                original(batch)
            start = time.perf_counter()
            for batch in calibration:
                original(batch)
            forward_s = time.perf_counter() - start
        config = load_rules("auto", ["block.family=separable", "plan.group_widths=[]"])
        plan = dsrewrite.plan_model(original, (64, 1, 28, 28), config, target_macs=args.target_macs)
        raw = dsrewrite.convert(original, (64, 1, 28, 28), config, plan=plan).model
        multipliers = ", ".join(str(d.rank) for d in plan.replacements)
        for repeat in range(args.repeats):
            model = copy.deepcopy(raw)
            start = time.perf_counter()
            report = dsrewrite.calibrate(model, original, calibration)
            seconds = time.perf_counter() - start
            rows.append([kind, str(len(plan.replacements)), multipliers, str(repeat + 1), f"{forward_s:.2f}s",
                         f"{seconds:.1f}s ({seconds / forward_s:.0f}×)", f"{report.after['relative_error']:.5f}",
                         f"{report.after['top1_agreement']:.4f}", f"{100 * dsrewrite.evaluate(model, test):.2f}%"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    text = "\n".join([
        "# The separable block's joint fit at depth multipliers up to 4", "",
        f"Measured with `python benchmarks/bench_joint_fit.py` on {fingerprint()}; CPU, {args.threads} threads. "
        f"Width-32 Fashion-MNIST nets trained one epoch on 12,000 images, separable blocks planned at "
        f"`--target-macs {args.target_macs:g}` (weight error), calibrated (fast mode) on 1024 training images, "
        "each calibration from the same uncalibrated model. Error and top-1 agreement: the output against the "
        "original on the held-out eighth of the images; accuracy: 5000 test images.", "",
        md_table(["model", "blocks", "depth multipliers", "run", "one forward", "calibration (× one forward)",
                  "held-out error", "top-1 agreement", "accuracy"], rows), ""])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
