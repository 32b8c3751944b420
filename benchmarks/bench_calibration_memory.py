"""Calibration memory: activations kept in memory up to a limit, the rest on disk.

The streamed calibration holds the activations live at one point of the network for every
calibration image; past ``--calibration-memory`` (``calibrate(memory=...)``, default 1 GiB)
further batch values go to a temporary directory and are read back one batch at a time. This
benchmark converts a model once (no calibration) and calibrates copies of it on the same images
with several limits, one after another in one process, and reports for each: time (and its
multiple of one forward pass of the original over the same images, measured in the same run),
peak RSS growth (sampled every millisecond), the activations the stream held in memory at most,
what went to disk, the held-out error, and whether the weights are bit-identical to those of the
unbounded run. Run with more images to see the memory stay put while the data grow.

    pip install -e '.[bench]'
    python benchmarks/bench_calibration_memory.py   # writes benchmarks/results/calibration_memory.md
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
from bench_calibration import forward_seconds  # noqa: E402
from common import PeakMemory, fingerprint, md_table  # noqa: E402

import dsrewrite  # noqa: E402
from dsrewrite.units import format_bytes, parse_bytes  # noqa: E402


def limit_of(text: str) -> int | None:
    return None if text == "none" else int(parse_bytes(text))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision model (random weights)")
    parser.add_argument("--images", default="256,512", help="calibration image counts (224², N(0,1))")
    parser.add_argument("--limits", default="none,1GiB,256MiB", help="memory limits, 'none' for no bound")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", default=str(HERE / "results" / "calibration_memory.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torchvision

    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:.0f}s] {msg}", file=sys.stderr, flush=True)

    torch.manual_seed(0)
    original = torchvision.models.get_model(args.model, weights=None).eval()
    converted = dsrewrite.convert(original, (1, 3, 224, 224), "default").model.eval()
    rows = []
    for count in (int(n) for n in args.images.split(",")):
        generator = torch.Generator().manual_seed(1)
        data = [torch.randn(args.batch, 3, 224, 224, generator=generator) for _ in range(count // args.batch)]
        forward = forward_seconds(original, data)
        reference = None
        for text in args.limits.split(","):
            model = copy.deepcopy(converted)
            with PeakMemory() as peak:
                start = time.perf_counter()
                report = dsrewrite.calibrate(model, original, data, memory=limit_of(text))
                seconds = time.perf_counter() - start
            if reference is None:
                reference = model.state_dict()
                same = "(reference)"
            else:
                same = "yes" if all(torch.equal(a, b) for a, b in zip(reference.values(),
                                                                         model.state_dict().values())) else "**no**"
            rows.append([f"{args.model}, {count} images", text, f"{forward:.2f}s",
                         f"{seconds:.1f}s (**{seconds / forward:.1f}×**)", f"{peak.peak / 2 ** 20:.0f} MiB",
                         format_bytes(report.activations_peak), format_bytes(report.spilled_bytes),
                         f"{report.before['relative_error']:.3f} → {report.after['relative_error']:.4f}", same])
            log(" | ".join(rows[-1]))
            del model
            write(args.output, rows, args)
    log(f"wrote {args.output}")
    return 0


def write(path: str, rows: list, args) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join([
        "# Calibration memory: activations in memory up to a limit, the rest on disk", "",
        f"Measured with `python benchmarks/bench_calibration_memory.py` on {fingerprint()}. torchvision "
        f"{args.model} (random weights), converted with the `default` preset (no calibration), then calibrated "
        f"(fast mode) on N(0,1) images at 224², batches of {args.batch}, with each memory limit "
        "(`--calibration-memory`, `calibrate(memory=...)`), one after another in one process. **one forward**: "
        "the original over the same images (eval, no grad; median of 3), measured in the same run. **peak RSS "
        "growth**: the process's resident memory, sampled every millisecond, over its level before the "
        "calibration (the images themselves, 19 MiB per 32, are already in memory). **held in memory**: the "
        "stream's activations kept in memory at most; **to disk**: what it wrote to its temporary directory "
        "(removed at the end). **same weights**: bit-identical to the unbounded run on the same images.", "",
        md_table(["model, images", "memory limit", "one forward", "calibration (× one forward)", "peak RSS growth",
                  "held in memory", "to disk", "held-out error before → after", "same weights"], rows), ""]))


if __name__ == "__main__":
    raise SystemExit(main())
