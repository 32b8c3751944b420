"""Block families, measured one layer at a time: which factorization of a 3×3 conv is faster here?

For conv geometries from narrow to wide, each family (separable, pointwise-first, spatial,
bottleneck) is built at the rank whose MACs come closest to a third of the dense conv's, and
timed against the dense conv on the same input (CPU, contiguous and channels_last, batch 1
and 16; the dense conv and the blocks of one geometry are interleaved round by round, so
drift on a shared machine hits them alike). The numbers motivate a planner that chooses the
family per layer by measured latency (issue #15): no family wins everywhere.

    python benchmarks/bench_families.py            # writes benchmarks/results/families.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import fingerprint, md_table  # noqa: E402

from dsrewrite.blocks import FAMILIES  # noqa: E402
from dsrewrite.measure import MeasureSettings, measure, prepare  # noqa: E402

# (C_in, C_out, H×W): a narrow layer of a small net, ResNet stages, a wide late layer
GEOMETRIES = [(24, 24, 28), (64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7)]
TARGET = 1 / 3  # MACs of each block as a share of the dense conv's


def rank_for(family, conv, hw, batch) -> int:
    """The rank whose MACs are closest to TARGET × the dense conv's (at least 1)."""
    dense = conv.in_channels * conv.out_channels * 9 * hw * hw * batch
    best, best_gap = 1, float("inf")
    for rank in range(1, family.max_rank(conv) + 1):
        _, macs = family.costs(conv.in_channels, conv.out_channels, (3, 3), (hw, hw), (hw, hw), rank, batch)
        gap = abs(macs / dense - TARGET)
        if gap < best_gap:
            best, best_gap = rank, gap
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(HERE / "results" / "families.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for c_in, c_out, hw in GEOMETRIES:
        torch.manual_seed(0)
        conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        for batch in (1, 16):
            candidates = {"dense 3×3": (conv, None, 1.0)}
            for name, family in FAMILIES.items():
                rank = rank_for(family, conv, hw, batch)
                _, macs = family.costs(c_in, c_out, (3, 3), (hw, hw), (hw, hw), rank, batch)
                candidates[name] = (family.build(conv, rank), rank, macs / (c_in * c_out * 9 * hw * hw * batch))
            x = torch.randn(batch, c_in, hw, hw)
            for fmt in ("contiguous", "channels_last"):
                settings = MeasureSettings(device="cpu", threads=2, memory_format=fmt, warmup=2,
                                           repeats=args.repeats)
                prepared = {n: prepare(m, (x,), settings) for n, (m, _, _) in candidates.items()}
                times: dict[str, list[float]] = {n: [] for n in candidates}
                for _ in range(args.rounds):
                    for n, (model, inputs) in prepared.items():
                        times[n].append(measure(model, inputs, settings, prepared=True).median)
                dense = statistics.median(times["dense 3×3"])
                cells = [f"{c_in}→{c_out} @{hw}²", batch, fmt, f"{dense * 1e3:.3g} ms"]
                for n in FAMILIES:
                    _, rank, share = candidates[n]
                    speedup = dense / statistics.median(times[n])
                    cells.append(f"{speedup:.2f}× (r={rank}, {100 * share:.0f}% MACs)")
                best = max(FAMILIES, key=lambda n: dense / statistics.median(times[n]))
                cells.append(best if dense / statistics.median(times[best]) > 1 else "dense")
                rows.append(cells)
                print(" | ".join(map(str, cells)), flush=True)
    text = "\n".join([
        "# Block families, one layer at a time",
        "",
        f"Measured with `python benchmarks/bench_families.py` on {fingerprint()}. Each family at the rank whose "
        f"MACs come closest to {TARGET:.0%} of the dense 3×3 conv's; the cell is dense latency ÷ block latency "
        "(> 1: the block is faster), median of "
        f"{args.rounds} interleaved rounds × median of {args.repeats} repeats. Random weights (latency does not "
        "depend on them). `winner`: the fastest family, or `dense` when none beats the conv.",
        "",
        md_table(["layer", "batch", "memory format", "dense 3×3"] + list(FAMILIES) + ["winner"], rows),
        "",
    ])
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
