"""Sweep: analyze + convert + one training step over every Nth timm model (no internal errors allowed).

    python benchmarks/sweep_timm.py [--every 10] [--max-params 60e6] [--rules default] [--timeout 600]

Each model runs in its own process (one CPU thread) at its default input size with random
weights, through the CLI's code path: ``analyze``, ``convert`` (the plan applied), then one
SGD step of the converted model in training mode. A model's outcome is ``ok``, ``bad input``
(dsrewrite refused it with a documented one-line error), ``internal error`` (a bug), or
``timeout``. Writes ``benchmarks/results/timm_sweep.md``. Needs ``pip install timm``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "timm_sweep.md"

CHILD = r"""
import json, sys, time, torch, timm
torch.set_num_threads(1)
import dsrewrite
from dsrewrite.errors import DsrewriteError
name, rules = sys.argv[1], sys.argv[2]
out = {"model": name}
t0 = time.perf_counter()
try:
    with torch.device("meta"):
        params = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    out["params"] = params
    if params > float(sys.argv[3]):
        out["status"] = "skipped"
        print(json.dumps(out)); sys.exit(0)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    shape = (1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    out["input"] = list(shape)
    analysis = dsrewrite.analyze(model, shape, name=name)
    out["convs"] = len(analysis.convs)
    out["leaves"] = len(analysis.trace.untraced)
    out["at_shape"] = len(analysis.trace.specialized) + len(analysis.trace.opaque_convs)
    out["unsupported"] = {op: info["calls"] for op, info in analysis.profile.unsupported_ops.items()}
    out["untraced"] = {k or "(model)": v for k, v in analysis.trace.untraced.items()}
    result = dsrewrite.convert(model, shape, rules=rules, analysis=analysis)
    out["replaced"] = len(result.report.layers)
    out["macs_ratio"] = result.report.ratios()["macs"]
    converted = result.model.train()
    x = torch.randn(2, *shape[1:])
    opt = torch.optim.SGD(converted.parameters(), lr=1e-3)
    y = converted(x)
    y = y[0] if isinstance(y, (tuple, list)) else y
    y.float().square().mean().backward()
    opt.step()
    out["status"] = "ok"
except DsrewriteError as e:
    out["status"] = "bad input"
    out["error"] = f"{type(e).__name__}: {e}"[:300]
except Exception as e:
    import traceback
    out["status"] = "internal error"
    out["error"] = f"{type(e).__name__}: {e}"[:300]
    out["where"] = traceback.format_exc().strip().splitlines()[-3][:200]
out["seconds"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--max-params", type=float, default=60e6)
    parser.add_argument("--rules", default="default")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--only", nargs="*", help="These models instead of the sample.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import timm

    names = args.only or timm.list_models()[::args.every]
    saved = args.out.with_suffix(".json")
    # --only reruns a few models and updates their rows in the last full run (kept as JSON beside the table)
    earlier = json.loads(saved.read_text()) if args.only and saved.exists() else []
    rows = [r for r in earlier if r["model"] not in set(names)]
    for i, name in enumerate(names, 1):
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD, name, args.rules, str(args.max_params)],
                                  capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"model": name, "status": "crashed",
                                                         "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "status": "timeout", "seconds": time.perf_counter() - start}
        rows.append(row)
        print(f"[{i}/{len(names)}] {name}: {row['status']} {row.get('error', '')}", flush=True)
        rows.sort(key=lambda r: r["model"])
        write(rows, args)
        saved.write_text(json.dumps(rows, indent=1) + "\n")


def write(rows: list[dict], args) -> None:
    from collections import Counter

    sys.path.insert(0, str(HERE))
    from common import fingerprint

    ran = [r for r in rows if r["status"] != "skipped"]
    counts = Counter(r["status"] for r in ran)
    full = [r for r in ran if r["status"] == "ok" and not r.get("leaves")]
    lines = [
        "# timm sweep: analyze + convert + one training step",
        "",
        f"Every {args.every}th model of `timm.list_models()` with ≤ {args.max_params / 1e6:g}M params, at its "
        f"default input size, random weights, rules `{args.rules}`, one CPU thread per model "
        f"(`python benchmarks/sweep_timm.py`). {fingerprint()}.",
        "",
        f"**{len(ran)} models run** ({len(rows) - len(ran)} skipped for size): "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"; traced with no leaf: {len(full)} of {counts.get('ok', 0)} ok.",
        "",
        "`at shape`: modules generic torch.fx refused that the second pass traced at the input's shapes (or "
        "conv modules it calls as one conv); `leaves`: what stayed opaque.",
        "",
        "| model | input | status | convs | replaced | MACs ÷ | at shape | leaves | s | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ran:
        ratio = f"{r['macs_ratio']:.2f}" if r.get("macs_ratio") else ""
        shape = "×".join(map(str, r.get("input", [])[1:]))
        error = (r.get("error", "") + (f" ({r['where']})" if r.get("where") else "")).replace("|", "\\|")
        lines.append(f"| {r['model']} | {shape} | {r['status']} | {r.get('convs', '')} | {r.get('replaced', '')} "
                     f"| {ratio} | {r.get('at_shape', '')} | {r.get('leaves', '')} | {r.get('seconds', 0):.0f} "
                     f"| {error} |")
    unsupported: dict[str, list[str]] = {}
    for r in ran:
        for op in r.get("unsupported") or {}:
            unsupported.setdefault(op, []).append(r["model"])
    lines += ["", "## Ops without a cost handler", ""]
    lines += [f"- `{op}`: {', '.join(models)}" for op, models in sorted(unsupported.items())] or \
        ["None: every op of every model run is costed or free on purpose."]
    partial = [r for r in ran if r.get("untraced")]
    if partial:
        lines += ["", "## Untraced leaves", ""]
        for r in partial:
            for where, why in r["untraced"].items():
                lines.append(f"- {r['model']} `{where}`: {why}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
