"""Sweep: analyze every model torchvision builds, and list the ops no cost handler prices.

    python benchmarks/sweep_torchvision.py [-o benchmarks/results/torchvision_sweep.md]

Random weights (``weights=None``, ``weights_backbone=None``: nothing is downloaded), one
analysis per model at an input its family takes: 224² (inception 299²), detection and
segmentation 320², video 16 frames (112², MViT 224²), optical flow two 128² frames. Per
model: status, GMACs, how it was traced (leaves, modules traced at the input shape) and how
shapes were propagated; then every op that no handler prices, with the models it appears in.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import fingerprint  # noqa: E402


def inputs_for(name: str, family: str):
    if family == "video":
        return (1, 3, 16, 224, 224) if name.startswith(("mvit", "s3d")) else (1, 3, 16, 112, 112)
    if family == "optical_flow":
        return (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128))
    if family in ("detection", "segmentation"):
        return (1, 3, 320, 320)
    return (1, 3, 299, 299) if name.startswith("inception") else (1, 3, 224, 224)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, default=HERE / "results" / "torchvision_sweep.md")
    args = parser.parse_args()
    import torchvision.models as tvm

    import dsrewrite

    torch.set_num_threads(2)
    families = {f: set(tvm.list_models(module=getattr(tvm, f))) for f in
                ("detection", "segmentation", "video", "optical_flow", "quantization")}
    rows, unsupported = [], {}
    for name in tvm.list_models():
        family = next((f for f, names in families.items() if name in names), "classification")
        kwargs = {"weights_backbone": None} if family in ("detection", "segmentation") else {}
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = tvm.get_model(name, weights=None, **kwargs).eval()
                analysis = dsrewrite.analyze(model, inputs_for(name, family), name=name)
            p, t = analysis.profile, analysis.trace
            for op in p.unsupported_ops:
                unsupported.setdefault(op, []).append(name)
            rows.append([name, family, "ok", f"{p.macs / 1e9:.3f}", len(t.untraced),
                         len(t.specialized) + len(t.opaque_convs), t.method, p.propagation,
                         ", ".join(p.unsupported_ops), f"{time.perf_counter() - start:.1f}"])
        except Exception as e:  # noqa: BLE001 - a sweep reports every failure and goes on
            rows.append([name, family, f"{type(e).__name__}: {str(e)[:120]}", "", "", "", "", "", "",
                         f"{time.perf_counter() - start:.1f}"])
        print(name, rows[-1][2], flush=True)
    ok = sum(r[2] == "ok" for r in rows)
    full = sum(r[2] == "ok" and r[4] == 0 for r in rows)
    lines = ["# torchvision sweep: every model analyzed, ops without a cost handler", "",
             f"`python benchmarks/sweep_torchvision.py`; {fingerprint()}. Random weights, nothing downloaded.", "",
             f"**{len(rows)} models: {ok} analyzed, {full} with no untraced leaf.** `at shape`: modules torch.fx "
             "refused that the second pass traced at the input's shapes (or the whole model through torch.export).",
             "", "| model | family | status | GMACs | leaves | at shape | trace | shapes | unsupported ops | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    lines += ["", "## Ops without a cost handler", ""]
    lines += [f"- `{op}`: {', '.join(names)}" for op, names in sorted(unsupported.items())] or \
        ["None: every op of every model is costed or free on purpose."]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
