"""Calibration memory: activations kept in memory up to a limit, the rest on disk.

The streamed calibration holds the activations live at one point of the network for every
calibration image; past ``--calibration-memory`` (``calibrate(memory=...)``, default 1 GiB)
further batch values go to a temporary directory and are read back one batch at a time. This
benchmark converts a model (no calibration) and calibrates it on the same images with several
limits, **each in a fresh process** (so one run's freed memory does not hide the next one's
growth), one after another, and reports for each: time (and its multiple of one forward pass of
the original over the same images, measured in the same process), peak RSS growth (sampled every
millisecond), the activations the stream held in memory at most, what went to disk, the held-out
error, and whether the weights are bit-identical to those of the unbounded run. Run with more
images to see the memory stay put while the data grow.

    pip install -e '.[bench]'
    python benchmarks/bench_calibration_memory.py   # writes benchmarks/results/calibration_memory.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import PeakMemory, fingerprint, md_table  # noqa: E402

import dsrewrite  # noqa: E402
from dsrewrite.units import format_bytes, parse_bytes  # noqa: E402


def one(model_name: str, count: int, batch: int, limit: str, threads: int, weights: str) -> dict:
    """Convert, then calibrate with one memory limit, in this process; the weights go to ``weights``."""
    import torchvision

    from bench_calibration import forward_seconds

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    original = torchvision.models.get_model(model_name, weights=None).eval()
    converted = dsrewrite.convert(original, (1, 3, 224, 224), "default").model.eval()
    generator = torch.Generator().manual_seed(1)
    data = [torch.randn(batch, 3, 224, 224, generator=generator) for _ in range(count // batch)]
    forward = forward_seconds(original, data)
    with PeakMemory() as peak:
        start = time.perf_counter()
        report = dsrewrite.calibrate(converted, original, data, memory=None if limit == "none" else int(parse_bytes(limit)))
        seconds = time.perf_counter() - start
    torch.save(converted.state_dict(), weights)
    return dict(forward=forward, seconds=seconds, peak=peak.peak, held=report.activations_peak,
                written=report.spilled_bytes, before=report.before["relative_error"],
                after=report.after["relative_error"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision model (random weights)")
    parser.add_argument("--images", default="256,512", help="calibration image counts (224², N(0,1))")
    parser.add_argument("--limits", default="none,1GiB,256MiB", help="memory limits, 'none' for no bound")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=3, metavar=("COUNT", "LIMIT", "WEIGHTS"), help=argparse.SUPPRESS)
    parser.add_argument("-o", "--output", default=str(HERE / "results" / "calibration_memory.md"))
    args = parser.parse_args(argv)
    if args.one:
        count, limit, weights = args.one
        print(json.dumps(one(args.model, int(count), args.batch, limit, args.threads, weights)))
        return 0
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:.0f}s] {msg}", file=sys.stderr, flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for count in (int(n) for n in args.images.split(",")):
            reference = None
            for limit in args.limits.split(","):
                weights = str(Path(scratch) / f"{count}-{limit}.pt")
                done = subprocess.run([sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
                                       "--threads", str(args.threads), "--one", str(count), limit, weights],
                                      capture_output=True, text=True, check=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                state = torch.load(weights, weights_only=True)
                if reference is None:
                    reference, same = state, "(reference)"
                else:
                    same = "yes" if all(torch.equal(a, b) for a, b in zip(reference.values(), state.values())) \
                        else "**no**"
                rows.append([f"{args.model}, {count} images", limit, f"{r['forward']:.2f}s",
                             f"{r['seconds']:.1f}s (**{r['seconds'] / r['forward']:.1f}×**)",
                             f"{r['peak'] / 2 ** 20:.0f} MiB", format_bytes(r["held"]), format_bytes(r["written"]),
                             f"{r['before']:.3f} → {r['after']:.4f}", same])
                log(" | ".join(rows[-1]))
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
        "(`--calibration-memory`, `calibrate(memory=...)`), each row in a fresh process, one after another. "
        "**one forward**: the original over the same images (eval, no grad; median of 3), measured in the same "
        "process. **peak RSS growth**: the process's resident memory, sampled every millisecond, over its level "
        "before the calibration (the images themselves, 18.4 MiB per 32, were already in memory). **held in "
        "memory**: the stream's activations kept in memory at most; **to disk**: what it wrote to its temporary "
        "directory (removed at the end). **same weights**: bit-identical to the unbounded run on the same "
        "images. No GPU was available to this run.", "",
        md_table(["model, images", "memory limit", "one forward", "calibration (× one forward)", "peak RSS growth",
                  "held in memory", "to disk", "held-out error before → after", "same weights"], rows), ""]))


if __name__ == "__main__":
    raise SystemExit(main())
