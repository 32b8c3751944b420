"""Channel alignment and width multiplier, measured: params, MACs, latency and fidelity side by side.

For each model: the original; ``--align 8`` and ``--align 16`` (exact: zero channels); ``--width
0.75`` and ``--width 0.5`` (lossy, most important channels kept). Latencies of all variants of
one model are interleaved round by round (CPU, BN folded, channels_last and contiguous), so
drift on a shared machine hits them alike. Fidelity is on seeded N(0, 1) inputs (the
width-reduced models are meant to be fine-tuned afterwards).

    pip install -e '.[bench]'
    python benchmarks/bench_align.py                     # writes benchmarks/results/align.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
from common import fingerprint, md_table  # noqa: E402
from odd_widths import build_model as odd_widths  # noqa: E402

import dsrewrite  # noqa: E402
from dsrewrite.measure import MeasureSettings, fold_bn, measure, prepare  # noqa: E402
from dsrewrite.rewrite import fidelity  # noqa: E402

MODELS = {
    "odd_widths (example, 50/100/120/130/250 channels)": odd_widths,
    "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(weights=None),
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(weights=None),
}
VARIANTS = [("original", {}), ("--align 8", {"align": 8}), ("--align 16", {"align": 16}),
            ("--width 0.75", {"width": 0.75}), ("--width 0.5", {"width": 0.5})]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", default=str(HERE / "results" / "align.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (args.batch, 3, args.size, args.size)
    rows = []
    for model_name, build in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        x = torch.randn(*shape)
        variants = {}
        for label, kwargs in VARIANTS:
            if not kwargs:
                variants[label] = (model, None)
                continue
            result = dsrewrite.convert(model, shape, "none", **kwargs)  # the channel step only
            variants[label] = (result.model.eval(), result)
            print(f"{model_name} {label}: {len(result.report.channels['changed'])} groups changed", file=sys.stderr)
        for fmt in ("channels_last", "contiguous"):
            settings = MeasureSettings(device="cpu", threads=args.threads, memory_format=fmt)
            latency = _interleaved({k: v[0] for k, v in variants.items()}, x, settings, args.rounds)
            base = latency["original"]
            for label, (converted, result) in variants.items():
                analysis = result.after if result else dsrewrite.analyze(model, shape)
                ch = result.report.channels if result else None
                fid = fidelity(model, converted, (x[:2],)) if result else {"relative_error": 0.0}
                rows.append([model_name, label, fmt, f"{analysis.profile.params / 1e6:.2f}M",
                             f"{analysis.profile.macs / 1e9:.3f}G",
                             f"{len(ch['changed'])}/{len(ch['changed']) + ch['unchanged']}" if ch else "-",
                             len(ch["frozen"]) if ch else "-",
                             f"{fid['relative_error']:.2g}", f"{1e3 * latency[label]:.1f}",
                             f"{base / latency[label]:.2f}×"])
            print(f"{model_name} {fmt}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in latency.items()),
                  file=sys.stderr)
    text = render(rows, args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _interleaved(models: dict, x, settings: MeasureSettings, rounds: int) -> dict[str, float]:
    prepared = {name: prepare(fold_bn(m), (x,), settings) for name, m in models.items()}
    per_round = MeasureSettings(**{**settings.__dict__, "repeats": 3, "warmup": 1})
    samples: dict[str, list[float]] = {name: [] for name in prepared}
    for _ in range(rounds):
        for name, (model, inputs) in prepared.items():
            samples[name].append(measure(model, inputs, per_round, prepared=True).median)
    return {name: statistics.median(v) for name, v in samples.items()}


def render(rows, args) -> str:
    return "\n".join([
        "# Channel alignment and width multiplier", "",
        f"Measured with `python benchmarks/bench_align.py` on {fingerprint()}. Batch {args.batch}, "
        f"{args.size}×{args.size}, CPU inference float32, BN folded; latency is the median over {args.rounds} "
        "interleaved rounds of 3 runs. Only the channel step runs (no separable rewrite). Relative error: "
        "‖y′ − y‖/‖y‖ of the logits on 2 seeded N(0, 1) images (alignment must be ~1e-7; a width-reduced model "
        "is meant to be fine-tuned). Groups: changed / resizable; frozen: groups left alone with a reason.", "",
        md_table(["model", "variant", "memory format", "params", "MACs", "groups changed", "frozen",
                  "relative error", "latency ms", "speedup"], rows), ""]) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
