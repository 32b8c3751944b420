"""Calibration cost against one forward pass: the streamed, sampled fit vs every position vs block by block.

For each model and block family: the original is converted (no calibration), then calibrated
on the same unlabeled images three ways, side by side in one run:

- **fast** (the default): one streamed pass of both models, each least-squares fit on a fixed
  sample of output positions;
- **thorough**: one streamed pass, every position;
- **block by block** (the calibration before the stream, kept as the fallback for blocks the
  graph does not reach): both models run up to each block on each batch, every position.

Each is timed against one forward pass of the original over the same images (eval, no grad),
measured in the same run, and judged by the output's relative error on the held-out eighth of
the images and, for the Fashion-MNIST nets, test accuracy.

    apt-get install -y dataset-fashion-mnist
    pip install -e '.[bench]'
    python benchmarks/bench_calibration.py      # writes benchmarks/results/calibration.md
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
from dsrewrite.calibrate import _Stream  # noqa: E402
from dsrewrite.data import fashion_mnist  # noqa: E402

MODES = ["fast", "thorough", "block by block"]


def calibrate(mode: str, converted, original, data):
    """Calibrate a copy of ``converted``; (model, report, seconds, peak bytes)."""
    model = copy.deepcopy(converted)
    build = _Stream.build
    if mode == "block by block":
        _Stream.build = classmethod(lambda cls, *a: None)
    try:
        with PeakMemory() as peak:
            start = time.perf_counter()
            report = dsrewrite.calibrate(model, original, data, thorough=mode != "fast")
            seconds = time.perf_counter() - start
    finally:
        _Stream.build = build
    return model, report, seconds, peak.peak


def forward_seconds(model, data) -> float:
    """One forward pass over all the batches: the median of 3 after a warm-up batch."""
    times = []
    with torch.no_grad():
        model(data[0])
        for _ in range(3):
            start = time.perf_counter()
            for x in data:
                model(x)
            times.append(time.perf_counter() - start)
    return sorted(times)[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,vgg,resnet18")
    parser.add_argument("--families", default="separable,bottleneck")
    parser.add_argument("--zoo-families", default="separable", help="families for the torchvision models")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--widths", default="0.75,0.5", help="width multipliers for the refit-after-resize table "
                        "(Fashion-MNIST nets; empty: none)")
    parser.add_argument("--distill", type=int, default=1, help="distillation epochs after the width refit (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", default=str(HERE / "results" / "calibration.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = HERE / ".cache"
    cache.mkdir(exist_ok=True)
    modes = args.modes.split(",")
    t0 = time.perf_counter()
    rows, width_rows = [], []

    def log(msg):
        print(f"[{time.perf_counter() - t0:.0f}s] {msg}", file=sys.stderr, flush=True)

    def flush():
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(render(rows, modes, width_rows))

    fashion = None
    for kind in args.models.split(","):
        test = None
        if kind in MODELS:
            if fashion is None:
                fashion = fashion_mnist("train"), fashion_mnist("test")
            (x_train, y_train), (x_test, y_test) = fashion
            torch.manual_seed(0)
            original = MODELS[kind](16)
            weights = cache / f"fmnist_{kind}16_e1_n{len(x_train)}.pt"
            if weights.exists():
                original.load_state_dict(torch.load(weights, weights_only=True))
            else:
                log(f"{kind}: training 1 epoch ...")
                train(original, x_train, y_train, 1, log=log)
                torch.save(original.state_dict(), weights)
            data = [x for x, _ in loader(x_train[:1024], y_train[:1024], 128, shuffle=False)]
            test = loader(x_test, y_test, 1000, shuffle=False)
            shape, label = (1, 1, 28, 28), f"{kind} (Fashion-MNIST, width 16, trained 1 epoch)"
            images = "1024 training images, 28²"
        else:
            import torchvision

            torch.manual_seed(0)
            original = torchvision.models.get_model(kind, weights=None)
            generator = torch.Generator().manual_seed(1)
            data = [torch.randn(32, 3, 224, 224, generator=generator) for _ in range(8)]
            shape, label, images = (1, 3, 224, 224), f"{kind} (torchvision, random weights)", "256 N(0,1) images, 224²"
        original.eval()
        base = dsrewrite.evaluate(original, test) if test is not None else None
        if test is not None:
            for width in (float(w) for w in args.widths.split(",") if w):
                train_loader = loader(x_train, y_train, 128, shuffle=True, seed=7) if args.distill else None
                width_rows.append(width_row(kind, width, original, data, test, base, shape, log, train_loader,
                                            args.distill))
                flush()
        for family in (args.families if kind in MODELS else args.zoo_families).split(","):
            preset = "finetune" if kind in MODELS else "default"
            result = dsrewrite.convert(original, shape, preset, [f"block.family={family}"])
            converted = result.model.eval()
            forward = forward_seconds(original, data)
            row = [label, images, family, str(len(result.report.layers)), f"{forward:.2f}s",
                   f"{100 * base:.2f}% → {100 * dsrewrite.evaluate(converted, test):.2f}%" if test is not None else "-"]
            for mode in modes:
                if mode == "block by block" and kind not in MODELS:
                    row.append("not run (hours at this size)")
                    continue
                model, report, seconds, peak = calibrate(mode, converted, original, data)
                accuracy = f", {100 * dsrewrite.evaluate(model, test):.2f}%" if test is not None else ""
                row.append(f"{seconds:.1f}s (**{seconds / forward:.0f}×**), {peak / 2 ** 20:.0f} MiB; error "
                           f"{report.before['relative_error']:.3f} → {report.after['relative_error']:.4f}{accuracy}")
                log(f"{kind} {family} {mode}: {row[-1]}")
            rows.append(row)
            flush()
    log(f"wrote {args.output}")
    return 0


def width_row(kind, width, original, data, test, base, shape, log, train_loader=None, epochs=0) -> list:
    """Accuracy of a ``--width`` resize: as is, with BN statistics re-estimated on the data (what
    channel-pruning tools do), with dsrewrite's least-squares refit of the layers that lost input
    channels, and that refit model distilled ``epochs``; latency of the resized model against the
    original (batch 1 and 64, side by side)."""
    from dsrewrite.measure import MeasureSettings, time_model

    keep_all = ["replace.min_in_channels=100000"]  # no block replacements: the width alone
    plain = dsrewrite.convert(original, shape, "default", keep_all, width=width).model.eval()
    recal = recalibrate_bn(copy.deepcopy(plain), data)
    start = time.perf_counter()
    with PeakMemory() as peak:
        refit = dsrewrite.convert(original, shape, "default", keep_all, width=width, calibration=data)
    seconds = time.perf_counter() - start
    rec = refit.report.reconstruction
    forward = forward_seconds(original, data)
    settings = MeasureSettings(device="cpu", memory_format="channels_last", repeats=10, warmup=3)
    latency = []
    for batch in (1, 64):
        x = torch.randn(batch, *shape[1:])
        latency.append(time_model(plain, (x,), settings).median / time_model(original, (x,), settings).median)
    accs = [dsrewrite.evaluate(m, test) for m in (plain, recal, refit.model)]
    log(f"{kind} width {width}: {', '.join(f'{100 * a:.2f}%' for a in accs)}")
    distilled = "-"
    if epochs:
        start = time.perf_counter()
        student = copy.deepcopy(refit.model)
        history = dsrewrite.distill(student, original, train_loader, epochs=epochs, lr=DISTILL_LR, eval_loader=test)
        a = history[-1].accuracy
        distilled = f"{100 * a:.2f}% ({100 * (a - base):+.2f}; {time.perf_counter() - start:.0f}s)"
        log(f"{kind} width {width}: distilled {100 * a:.2f}%")
    return [kind, f"{width:g}", f"{refit.report.ratios()['macs']:.2f}×", f"{latency[0]:.2f} / {latency[1]:.2f}",
            f"{100 * base:.2f}%"] + [f"{100 * a:.2f}% ({100 * (a - base):+.2f})" for a in accs] + [
        distilled, f"{len(rec['layers'])}", f"{rec['seconds']:.1f}s ({rec['seconds'] / forward:.0f}×); convert total "
        f"{seconds:.1f}s, {peak.peak / 2 ** 20:.0f} MiB"]


def recalibrate_bn(model, data):
    """BN running statistics re-estimated on the data (cumulative average, no gradients)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)
    return model.eval()


def render(rows, modes, width_rows=()) -> str:
    headers = ["model", "calibration images", "family", "blocks", "one forward", "accuracy before calibration"] + [
        f"{m}: time (× one forward), peak memory growth; held-out error, accuracy" for m in modes]
    return "\n".join([
        "# Calibration cost: streamed and sampled vs every position vs block by block", "",
        f"Measured with `python benchmarks/bench_calibration.py` on {fingerprint()}. Each row: the original "
        "converted without calibration (preset `finetune` for the Fashion-MNIST nets, `default` for resnet18, "
        "`block.family` as in the row), then calibrated three ways on the same images, one after another in "
        "one process. **one forward**: the original over the same images (eval, no grad; median of 3), measured "
        "in the same run; a calibration's multiple of it is in bold. **fast** (default): one streamed pass of both models, "
        "each least-squares fit on a fixed sample of 64 output positions per unknown. **thorough**: the same "
        "pass, every position. **block by block**: both models run up to each block on each batch, every "
        "position (the calibration before the stream). Error: the output's relative error against the "
        "original on the held-out eighth of the images, before → after; accuracy: Fashion-MNIST test set. "
        "No GPU was available to this run.", "",
        md_table(headers, rows), "",
        "## Width resize: removed channels, then the layers that lost inputs refit", "",
        "`--width α` (`align.width`) on the same trained nets, no block replacements, the same 1024 "
        "unlabeled images: accuracy of the resized model as is (channels kept by filter L1 norm), with BN "
        "statistics re-estimated on the images (what channel-pruning tools such as Torch-Pruning do after "
        "L1 pruning), and with dsrewrite's least-squares refit of every conv and Linear that lost input "
        "channels (`convert --width α --calibrate DATA`; `dsrewrite.calibrate.reconstruct`), then that model "
        f"distilled one epoch from the original ({DISTILL_NOTE}; labels unused). Latency: the resized model ÷ "
        "the original at batch 1 / 64, CPU, channels_last, side by side. Refit time: its multiple of one "
        "forward pass of the original over the images.", "",
        md_table(["model", "width", "fewer MACs", "latency b1 / b64", "original", "resized", "+ BN re-estimated",
                  "+ least-squares refit (dsrewrite)", "+ 1 epoch distillation", "layers refit", "refit time"],
                 list(width_rows)), ""])


if __name__ == "__main__":
    raise SystemExit(main())
