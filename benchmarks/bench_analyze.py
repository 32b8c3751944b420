"""dsrewrite analyze vs the established counters: counts and analysis time, one process, one run.

Peers: fvcore FlopCountAnalysis, ptflops, thop, torchinfo, torch.utils.flop_counter.FlopCounterMode.
For each of torchvision's 15 reference models it records the MAC count each tool reports at
the published input size (compared with torchvision's published GFLOPS, which are GMACs), and
the wall time and peak memory growth of one analysis at the published size and at 1024×1024.

    pip install -e '.[bench]'
    python benchmarks/bench_analyze.py            # writes benchmarks/results/analyze.md
    python benchmarks/bench_analyze.py --models resnet18,vgg16 --sizes 224 -o /tmp/a.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import PeakMemory, fingerprint, md_table  # noqa: E402

import dsrewrite  # noqa: E402

REFERENCE_CANDIDATES = [HERE.parent.parent / "shared" / "reference" / "torchvision_published.json",
                        HERE.parent / "tests" / "data" / "torchvision_published.json"]


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


# Each tool: (model, input) -> MACs. Peers run a real forward, as their users run them.
def run_dsrewrite(model, x):
    return dsrewrite.analyze(model, x).profile.macs


def run_fvcore(model, x):
    from fvcore.nn import FlopCountAnalysis  # fvcore counts one "flop" per MAC
    analysis = FlopCountAnalysis(model, x)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis.total()


def run_ptflops(model, x):
    from ptflops import get_model_complexity_info
    with _quiet():
        macs, _ = get_model_complexity_info(model, tuple(x.shape[1:]), as_strings=False,
                                            print_per_layer_stat=False, verbose=False)
    return macs


def run_thop(model, x):
    import thop
    with _quiet():
        macs, _ = thop.profile(model, inputs=(x,), verbose=False)
    return macs


def run_torchinfo(model, x):
    import torchinfo
    return torchinfo.summary(model, input_data=x, verbose=0).total_mult_adds


def run_flopcounter(model, x):
    from torch.utils.flop_counter import FlopCounterMode
    mode = FlopCounterMode(display=False)
    with mode:
        model(x)
    return mode.get_total_flops() / 2  # it counts 2 FLOPs per MAC


def run_fx_trace(model, x):
    torch.fx.symbolic_trace(model)
    return float("nan")


def run_forward(model, x):
    model(x)
    return float("nan")


#: not peers: what one analysis cannot be faster than, measured beside them (time columns only)
FLOORS = {"fx trace alone": run_fx_trace, "real forward alone": run_forward}

TOOLS = {
    "dsrewrite": run_dsrewrite,
    "fvcore": run_fvcore,
    "ptflops": run_ptflops,
    "thop": run_thop,
    "torchinfo": run_torchinfo,
    "FlopCounterMode/2": run_flopcounter,
}


def measure(tool, model, x, repeats: int = 1):
    """Run a tool on a fresh copy of the model; return (MACs, median seconds, peak bytes) or an error."""
    times, peak, macs = [], 0, None
    for _ in range(repeats):
        m = copy.deepcopy(model)  # thop and ptflops attach buffers/hooks; each tool gets a clean model
        with torch.no_grad(), warnings.catch_warnings(), PeakMemory() as mem:
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            try:
                macs = float(tool(m, x))
            except Exception as e:  # a peer that fails on a model is a result, not a crash
                return None, None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            times.append(time.perf_counter() - start)
        peak = max(peak, mem.peak)
        del m
    return macs, statistics.median(times), peak, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated subset of the reference models")
    parser.add_argument("--sizes", default="ref,1024", help="'ref' (published size) and/or square sizes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", default=str(HERE / "results" / "analyze.md"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    ref_path = next(p for p in REFERENCE_CANDIDATES if p.exists())
    table = json.loads(ref_path.read_text())["models"]
    names = [n for n in table if not args.models or n in args.models.split(",")]
    sizes = args.sizes.split(",")
    tools = dict(TOOLS, **FLOORS)
    for name in list(tools):
        try:
            if name != "dsrewrite":
                tools[name](torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))  # warm-up, imports
        except ImportError:
            print(f"skipping {name}: not installed", file=sys.stderr)
            tools.pop(name)
    run_dsrewrite(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))

    results = {}  # (model, size, tool) -> (macs, seconds, peak, error)
    total = len(names) * len(sizes) * len(tools)
    done = 0
    t0 = time.perf_counter()
    for name in names:
        ref = table[name]
        model = torchvision.models.get_model(name, weights=None, **ref.get("constructor_kwargs", {})).eval()
        for size in sizes:
            hw = tuple(ref["input_size"]) if size == "ref" else (int(size), int(size))
            x = torch.randn(1, 3, *hw)
            for tool_name, tool in tools.items():
                # medians of 3 where times are small enough for noise to matter
                repeats = 3 if tool_name == "dsrewrite" or size == "ref" else 1
                results[(name, size, tool_name)] = measure(tool, model, x, repeats)
                done += 1
                r = results[(name, size, tool_name)]
                status = r[3] or f"{r[0] / 1e9:.3f} GMACs in {r[1]:.3f}s"
                print(f"[{done}/{total} {time.perf_counter() - t0:.0f}s] {name} {hw[0]}x{hw[1]} {tool_name}: {status}",
                      file=sys.stderr, flush=True)
        del model

    text = render(results, table, names, sizes, [t for t in tools if t not in FLOORS],
                  [t for t in tools if t in FLOORS], args.threads)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def render(results, table, names, sizes, tools, floors, threads) -> str:
    out = ["# Analysis: dsrewrite vs established counters", "",
           f"Measured with `python benchmarks/bench_analyze.py` on {fingerprint()}.",
           "Every tool analyzes the same model objects in one process, one after another; each gets a fresh",
           "copy of the model. Peers run a real forward (as their users run them); dsrewrite runs none.", ""]
    # Counts at the published input size.
    out += ["## Counts at the published input size (GMACs; published GFLOPS are GMACs)", ""]
    headers = ["model", "published"] + tools
    rows, within = [], {t: 0 for t in tools}
    for name in names:
        ref = table[name]["gflops"]
        row = [name, f"{ref:.3f}"]
        for t in tools:
            macs, _, _, err = results.get((name, "ref", t), (None, None, None, "not run"))
            if err:
                row.append(f"fails ({err[:40]})")
                continue
            dev = macs / 1e9 / ref - 1
            within[t] += abs(dev) <= 0.005
            mark = "" if abs(dev) <= 0.005 else " ✗"
            row.append(f"{macs / 1e9:.3f} ({100 * dev:+.1f}%){mark}")
        rows.append(row)
    rows.append(["**within 0.5%**", ""] + [f"**{within[t]}/{len(names)}**" for t in tools])
    out += [md_table(headers, rows), ""]
    # Time and memory.
    for size in sizes:
        label = "published input size" if size == "ref" else f"{size}×{size}"
        out += [f"## Analysis time and peak memory growth at {label}", ""]
        headers = (["model"] + [f"{t} s" for t in tools] + ["fastest peer", "dsrewrite speedup", "dsrewrite peak MiB"]
                   + [f"{f} s" for f in floors])
        rows, faster, five = [], 0, 0
        for name in names:
            row = [name]
            peer_times = {}
            for t in tools:
                macs, secs, peak, err = results.get((name, size, t), (None, None, None, "not run"))
                row.append("fails" if err else f"{secs:.3f}")
                if not err and t != "dsrewrite":
                    peer_times[t] = secs
            ds = results.get((name, size, "dsrewrite"))
            fastest = min(peer_times, key=peer_times.get) if peer_times else None
            speedup = peer_times[fastest] / ds[1] if fastest and ds and not ds[3] else None
            row += [fastest or "-", f"{speedup:.1f}×" if speedup else "-",
                    f"{ds[2] / 2**20:.0f}" if ds and not ds[3] else "-"]
            for f in floors:
                _, secs, _, err = results.get((name, size, f), (None, None, None, "not run"))
                row.append("fails" if err else f"{secs:.3f}")
            faster += bool(speedup and speedup > 1)
            five += bool(speedup and speedup >= 5)
            rows.append(row)
        out += [md_table(headers, rows), "",
                f"dsrewrite faster than the fastest peer on **{faster}/{len(names)}**, "
                f"at least 5× faster on **{five}/{len(names)}**.", ""]
    out += ["Times are wall seconds of one analysis (dsrewrite: median of 3) after a warm-up of every tool;",
            "peak memory is the growth of the process's resident set during dsrewrite's analysis, sampled every",
            "millisecond. At the published size every tool's time is a median of 3. The last columns are not",
            "peers but floors: `torch.fx.symbolic_trace` of the model alone (dsrewrite traces with torch.fx,",
            "then propagates shapes on meta tensors) and one plain forward with no counting (what peers",
            "instrument). Absolute times on this shared machine are noisy; the ratios are the point.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
