"""The self-contained HTML report of a conversion: tables and inline SVG charts, no network."""

from __future__ import annotations

import html
import json

from .report import (conversion_findings, duration, fidelity_finding, fidelity_level, realization_level,
                     speed_level, spread_text, timing_source)
from .units import format_bytes, format_count

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1d2430; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.sub { color: #5b6573; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; margin: 1rem 0; }
.card { border: 1px solid #d8dde4; border-radius: 8px; padding: .7rem 1rem; min-width: 150px; }
.card .k { color: #5b6573; font-size: .8rem; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 1.25rem; font-weight: 600; } .card .d { font-weight: 600; }
.card.good { border-color: #2e7d32; background: #f1f8f1; } .card.good .d { color: #2e7d32; }
.card.warn { border-color: #b26a00; background: #fff8e6; } .card.warn .d { color: #8a5300; }
.card.bad { border-color: #c62828; background: #fdecec; } .card.bad .d { color: #c62828; }
.card.info .d { color: #5b6573; }
ul.findings { list-style: none; padding: 0; } ul.findings li { padding: .35rem .6rem; margin: .3rem 0;
       border-left: 4px solid #9aa5b1; background: #f7f8fa; }
ul.findings li.bad { border-color: #c62828; background: #fdecec; font-weight: 600; }
ul.findings li.warn { border-color: #b26a00; background: #fff8e6; }
ul.findings li.good { border-color: #2e7d32; background: #f1f8f1; }
td.bad { color: #c62828; font-weight: 600; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0 1rem; font-size: 13px; }
th, td { border-bottom: 1px solid #e3e7ec; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f6f8; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.legend span { display: inline-block; margin-right: 1rem; } .sw { width: 12px; height: 12px; display: inline-block;
       vertical-align: middle; margin-right: 4px; border-radius: 2px; }
.note { color: #5b6573; font-size: 12px; }
svg text { font: 11px system-ui, sans-serif; fill: #1d2430; }
"""
BEFORE, AFTER = "#9aa5b1", "#1f77b4"


def _e(x) -> str:
    return html.escape(str(x))


def render_conversion_html(report, plan) -> str:
    """One HTML file: verdicts, summary cards coloured by verdict, charts (MACs, latency, time breakdown), tables."""
    doc = report.to_dict()
    b, a, r = doc["before"], doc["after"], doc["ratios"]
    meas = doc.get("measurement")
    smaller = lambda ratio: "good" if ratio > 1.0 else "warn"  # noqa: E731
    cards = [
        ("params", f"{format_count(b['params'])} → {format_count(a['params'])}", f"{r['params']:.2f}× smaller",
         smaller(r["params"])),
        ("MACs", f"{format_count(b['macs'])} → {format_count(a['macs'])}", f"{r['macs']:.2f}× fewer",
         smaller(r["macs"])),
        ("model size", f"{format_bytes(b['param_bytes'])} → {format_bytes(a['param_bytes'])}",
         f"{r['param_bytes']:.2f}× smaller", smaller(r["param_bytes"])),
    ]
    if meas:
        sp = meas["speedup"]
        cards += [("latency (median, fresh)", f"{duration(meas['before']['median_s'])} → {duration(meas['after']['median_s'])}",
                   (f"{sp:.2f}× faster" if sp >= 1 else f"{1 / sp:.2f}× SLOWER") +
                   f"; {spread_text(meas['after'])}", speed_level(sp)),
                  ("realization", f"{meas['realization']:.2f}", "measured ÷ theoretical speedup",
                   realization_level(meas["realization"]))]
    else:
        cards.append(("latency", "not measured", "MACs are not latency: --measure", "warn"))
    level, _ = fidelity_finding(doc)
    cal = doc.get("calibration")
    if cal:
        f = cal["after"]
        where = f"held-out data ({cal['held_out_samples']} samples)" if cal.get("held_out_samples") else "fit data"
        cards.append(("output fidelity", f"cos {f['cosine']:.4f}", f"relative error {f['relative_error']:.3g} on {where}",
                      fidelity_level(f["relative_error"])))
    else:
        f = doc["fidelity"]
        cards.append(("output fidelity", f"cos {f['cosine']:.4f}",
                      f"relative error {f['relative_error']:.3g} on random inputs: pessimistic, see below", level))
    findings = conversion_findings(doc)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>dsrewrite conversion: {_e(doc['model'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>dsrewrite conversion: {_e(doc['model'])}</h1>",
        f"<p class='sub'>Rules: {_e(doc['rules']['source'])}; replaced {doc['replaced_modules']} conv module(s), "
        f"{len(plan.replacements)} of {doc['conv_calls']} conv calls, chosen by {_e(doc['chosen_by'])}.</p>",
        "<div class='cards'>" + "".join(
            f"<div class='card {lv}'><div class='k'>{_e(k)}</div><div class='v'>{_e(v)}</div>"
            f"<div class='d'>{_e(d)}</div></div>" for k, v, d, lv in cards) + "</div>",
        "<h2>Summary</h2><ul class='findings'>" + "".join(
            f"<li class='{lv}'>{_e(text)}</li>" for lv, text in findings) + "</ul>",
    ]
    if meas:
        fp = meas["fingerprint"]
        parts += ["<h2>End-to-end latency</h2>", _latency_chart(meas),
                  f"<p class='note'>Measured fresh in this run on {_e(fp['device'])} ({_e(fp['device_name'])}), "
                  f"{fp['threads']} threads, {_e(fp['dtype'])}, {_e(fp['memory_format'])}, batch "
                  f"{meas['batch_size']}, BN {'folded' if meas['fold_bn'] else 'not folded'}, torch "
                  f"{_e(fp['torch'])}; median of {meas['before']['repeats']} / {meas['after']['repeats']} runs "
                  f"(before {_e(spread_text(meas['before']))}, after {_e(spread_text(meas['after']))}). Theoretical "
                  f"speedup (MACs) {meas['theoretical_speedup']:.2f}×.</p>"]
        if meas.get("breakdown"):
            parts += ["<h2>Where the time goes</h2>", _breakdown_chart(meas)]
    compared = (plan.rank_choice or {}).get("compared")
    if compared:
        parts += ["<h2>Plans compared on data</h2>", _compared_chart(compared)]
    parts += ["<h2>Where the MACs are, conv by conv</h2>",
              "<div class='legend'>" + f"<span><i class='sw' style='background:{BEFORE}'></i>before</span>"
              f"<span><i class='sw' style='background:{AFTER}'></i>after</span></div>",
              _macs_chart(plan)]
    measured_layers = [c for c in doc["layers"] if c["measured_speedup"] is not None]
    if measured_layers:
        parts += ["<h2>Measured latency of each replaced layer</h2>",
                  "<div class='legend'>" + f"<span><i class='sw' style='background:{BEFORE}'></i>conv</span>"
                  f"<span><i class='sw' style='background:{AFTER}'></i>block, faster</span>"
                  "<span><i class='sw' style='background:#d62728'></i>block, slower</span></div>",
                  _layer_latency_chart(measured_layers)]
    parts += ["<h2>Replaced layers</h2>", _layers_table(doc["layers"]),
              "<p class='note'>Kept energy: the share of the conv weight's squared norm the rank-r factorization "
              "keeps (100% = exact). Timing: fresh (measured in this run) or cached (from the latency cache, "
              "with its date); ± is half the p10–p90 spread.</p>",
              *_channels_html(doc.get("channels")),
              "<h2>Every conv and its decision</h2>", _plan_table(plan),
              f"<p class='note'>{_e(doc['convention'])}.</p>",
              f"<script type='application/json' id='dsrewrite-report'>{_json_for_html(doc)}</script>",
              "</body></html>"]
    return "\n".join(parts) + "\n"


def _breakdown_chart(meas) -> str:
    """Two stacked bars (before, after): replaced convs vs everything else."""
    bd = meas["breakdown"]
    rows = [("before", bd["replaced_before_s"], meas["before"]["median_s"]),
            ("after", bd["replaced_after_s"], meas["after"]["median_s"])]
    top = max(t for _, _, t in rows) or 1
    width = 600
    out = [f"<svg width='{width + 300}' height='96' role='img' aria-label='time breakdown'>"]
    for i, (label, conv, total) in enumerate(rows):
        y = 6 + i * 30
        conv = min(conv, total)
        wc, wt = width * conv / top, width * total / top
        out.append(f"<text x='60' y='{y + 15}' text-anchor='end'>{label}</text>")
        out.append(f"<rect x='66' y='{y}' width='{wc:.1f}' height='22' fill='{AFTER}'>"
                   f"<title>replaced convs: {duration(conv)}</title></rect>")
        out.append(f"<rect x='{66 + wc:.1f}' y='{y}' width='{max(wt - wc, 0):.1f}' height='22' fill='{BEFORE}'>"
                   f"<title>everything else: {duration(total - conv)}</title></rect>")
        out.append(f"<text x='{66 + wt + 6:.1f}' y='{y + 15}'>{duration(conv)} replaced convs + {duration(total - conv)} "
                   "rest</text>")
    out.append(f"<text x='66' y='84'>Blue: the replaced convs, each timed alone; grey: everything else. "
               f"Their own speedups predict {bd['predicted_speedup']:.2f}× end to end; measured "
               f"{meas['speedup']:.2f}×.</text>")
    out.append("</svg>")
    return "".join(out)


def _compared_chart(compared: list[dict]) -> str:
    """One bar per plan made for the target: its output error on the held-out calibration samples after
    calibration (blue: kept; grey: met the target; red: missed it), with its latency or MAC fraction."""
    top = max(r["relative_error"] for r in compared) or 1
    label_w, bar_w, row_h = 150, 480, 24
    height = row_h * len(compared) + 30
    out = [f"<svg width='{label_w + bar_w + 330}' height='{height}' role='img' aria-label='plans compared on data'>"]
    for i, r in enumerate(compared):
        y = 4 + i * row_h
        color = AFTER if r["chosen"] else BEFORE if r["fits"] else "#d62728"
        w = bar_w * r["relative_error"] / top
        fraction = f"{r['fraction']:.2f}× {'latency' if r['by'] == 'measured latency' else 'MACs'}" \
            if r["fraction"] is not None else ""
        verdict = "kept" if r["chosen"] else "meets the target" if r["fits"] else "misses the target"
        out.append(f"<text x='{label_w - 6}' y='{y + 15}' text-anchor='end'>{_e(r['plan'])}</text>")
        out.append(f"<rect x='{label_w}' y='{y + 3}' width='{max(w, 0.5):.1f}' height='16' fill='{color}'>"
                   f"<title>{_e(r['plan'])}: {r['replaced']} blocks, {r['thinned']} groups thinned</title></rect>")
        out.append(f"<text x='{label_w + w + 6:.1f}' y='{y + 15}'>{r['relative_error']:.4f} · {_e(fraction)} · "
                   f"{verdict}</text>")
    samples = compared[0]["samples"]
    out.append(f"<text x='{label_w}' y='{height - 6}'>Output relative error against the original on the {samples} "
               "held-out calibration samples, each plan applied and calibrated as the conversion is.</text>")
    out.append("</svg>")
    return "".join(out)


def _json_for_html(doc) -> str:
    return json.dumps(doc).replace("</", "<\\/")


def _macs_chart(plan) -> str:
    """Horizontal bars: each conv call's MACs before (grey) and after (blue)."""
    rows = [(d.name, d.macs_before, d.macs_after if d.replaced else d.macs_before, d.replaced) for d in plan.decisions]
    if not rows:
        return "<p>This model has no convolutions.</p>"
    top = max(max(r[1], r[2]) for r in rows) or 1
    label_w, bar_w, row_h = 230, 620, 16
    height = row_h * len(rows) + 24
    out = [f"<svg width='{label_w + bar_w + 90}' height='{height}' role='img' aria-label='MACs per conv'>"]
    for i, (name, before, after, replaced) in enumerate(rows):
        y = 4 + i * row_h
        wb, wa = bar_w * before / top, bar_w * after / top
        label = name if len(name) <= 34 else "…" + name[-33:]
        out.append(f"<text x='{label_w - 6}' y='{y + 11}' text-anchor='end'>{_e(label)}</text>")
        out.append(f"<rect x='{label_w}' y='{y + 1}' width='{wb:.1f}' height='6' fill='{BEFORE}'>"
                   f"<title>{_e(name)}: {format_count(before)} MACs before</title></rect>")
        out.append(f"<rect x='{label_w}' y='{y + 7}' width='{max(wa, 0.5):.1f}' height='6' fill='{AFTER}'>"
                   f"<title>{_e(name)}: {format_count(after)} MACs after</title></rect>")
        tag = f"{format_count(before)} → {format_count(after)}" if replaced else format_count(before)
        out.append(f"<text x='{label_w + max(wb, wa) + 4:.1f}' y='{y + 11}'>{_e(tag)}</text>")
    out.append("</svg>")
    return "".join(out)


def _latency_chart(meas) -> str:
    """Median bars with a p10–p90 whisker; the after bar is red when the model got slower."""
    top = max(meas["before"]["p90_s"], meas["after"]["p90_s"], meas["before"]["median_s"],
              meas["after"]["median_s"]) or 1
    width = 520
    after_color = AFTER if meas["speedup"] >= 1 else "#d62728"
    out = [f"<svg width='{width + 380}' height='70' role='img' aria-label='latency before and after'>"]
    for i, (label, t, color) in enumerate([("before", meas["before"], BEFORE), ("after", meas["after"], after_color)]):
        y = 6 + i * 30
        w = width * t["median_s"] / top
        lo, hi = 66 + width * t["p10_s"] / top, 66 + width * t["p90_s"] / top
        out.append(f"<text x='60' y='{y + 15}' text-anchor='end'>{label}</text>")
        out.append(f"<rect x='66' y='{y}' width='{w:.1f}' height='22' fill='{color}'/>")
        out.append(f"<line x1='{lo:.1f}' x2='{hi:.1f}' y1='{y + 11}' y2='{y + 11}' stroke='#1d2430' stroke-width='2'>"
                   f"<title>p10–p90</title></line>")
        out.append(f"<line x1='{lo:.1f}' x2='{lo:.1f}' y1='{y + 5}' y2='{y + 17}' stroke='#1d2430'/>"
                   f"<line x1='{hi:.1f}' x2='{hi:.1f}' y1='{y + 5}' y2='{y + 17}' stroke='#1d2430'/>")
        noisy = " (noisy)" if t.get("noisy") else ""
        out.append(f"<text x='{max(66 + w, hi) + 6:.1f}' y='{y + 15}'>{duration(t['median_s'])} median, p10–p90 "
                   f"{duration(t['p10_s'])}–{duration(t['p90_s'])}{noisy}</text>")
    out.append("</svg>")
    return "".join(out)


def _layer_latency_chart(layers) -> str:
    top = max(max(c["measured_original_s"], c["measured_replacement_s"]) for c in layers) or 1
    label_w, bar_w, row_h = 230, 560, 18
    out = [f"<svg width='{label_w + bar_w + 240}' height='{row_h * len(layers) + 10}' role='img' "
           "aria-label='measured latency per replaced layer'>"]
    for i, c in enumerate(layers):
        y = 4 + i * row_h
        wb = bar_w * c["measured_original_s"] / top
        wa = bar_w * c["measured_replacement_s"] / top
        color = AFTER if c["measured_speedup"] >= 1 else "#d62728"
        out.append(f"<text x='{label_w - 6}' y='{y + 12}' text-anchor='end'>{_e(c['name'])}</text>")
        out.append(f"<rect x='{label_w}' y='{y + 1}' width='{wb:.1f}' height='7' fill='{BEFORE}'/>")
        out.append(f"<rect x='{label_w}' y='{y + 8}' width='{wa:.1f}' height='7' fill='{color}'/>")
        out.append(f"<text x='{label_w + max(wb, wa) + 4:.1f}' y='{y + 12}'>{duration(c['measured_original_s'])} → "
                   f"{duration(c['measured_replacement_s'])} ({c['measured_speedup']:.2f}×)</text>")
    out.append("</svg>")
    return "".join(out)


def _layers_table(layers) -> str:
    if not layers:
        return "<p>Nothing was replaced.</p>"
    head = ("<tr><th>conv</th><th>kernel</th><th>channels</th><th>block</th><th>params</th><th>MACs</th>"
            "<th>theoretical</th><th>measured</th><th>timing</th><th>kept energy</th></tr>")
    rows = []
    for c in layers:
        measured = f"{c['measured_speedup']:.2f}×" if c["measured_speedup"] is not None else "-"
        slow = " bad" if c["measured_speedup"] is not None and c["measured_speedup"] < 1 else ""
        rows.append(
            f"<tr><td>{_e(c['name'])}</td><td>{'×'.join(map(str, c['kernel']))}</td>"
            f"<td>{c['in_channels']}→{c['out_channels']}</td><td>{_e(c.get('block') or '')}</td>"
            f"<td class='n'>{format_count(c['params_before'])} → {format_count(c['params_after'])}</td>"
            f"<td class='n'>{format_count(c['macs_before'])} → {format_count(c['macs_after'])}</td>"
            f"<td class='n'>{c['theoretical_speedup']:.1f}×</td><td class='n{slow}'>{measured}</td>"
            f"<td>{_e(timing_source(c.get('timing')))}</td>"
            f"<td class='n'>{100 * c['kept_energy']:.1f}%</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _channels_html(ch) -> list[str]:
    if not ch:
        return []
    what = f"width ×{ch['width']:g}, multiples of {ch['divisor']}" if ch["width"] is not None else \
        f"aligned to multiples of {ch['divisor']}"
    rows = "".join(f"<tr><td class='n'>{c['group']}</td><td class='n'>{c['old_width']} → {c['new_width']}</td>"
                   f"<td>{_e(', '.join(c['producers'][:3]))}{' …' if len(c['producers']) > 3 else ''}</td>"
                   f"<td>{_e(c['reason'])}</td></tr>" for c in ch["changed"])
    frozen = "".join(f"<tr><td class='n'>{f['group']}</td><td class='n'>{f['width']}</td>"
                     f"<td>{_e('; '.join(f['reasons'][:2]))}</td></tr>" for f in ch["frozen"])
    return [f"<h2>Channel groups ({_e(what)}; {'exact' if ch['exact'] else 'lossy'})</h2>",
            f"<table><tr><th>group</th><th>width</th><th>produced by</th><th>why</th></tr>{rows}</table>"
            if rows else "<p>No group changed.</p>",
            f"<p class='note'>Frozen groups (left as they are):</p><table><tr><th>group</th><th>width</th>"
            f"<th>why</th></tr>{frozen}</table>" if frozen else ""]


def _plan_table(plan) -> str:
    rows = "".join(f"<tr><td class='n'>{d.index}</td><td>{_e(d.name)}</td><td>{'replace' if d.replaced else 'keep'}"
                   f"</td><td>{_e(d.reason)}</td></tr>" for d in plan.decisions)
    return f"<table><tr><th>#</th><th>conv</th><th>decision</th><th>reason</th></tr>{rows}</table>"
