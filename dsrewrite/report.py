"""Stage 7, report: plain data in, text out (terminal table, markdown, JSON, CSV).

Nothing here computes a cost; it only formats what the earlier stages produced. Every
number is printed with its unit word (params, MACs, FLOPs, bytes), and FLOPs are only
ever shown as what they are: 2 × MACs.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .errors import UsageError
from .units import format_bytes, format_count, format_seconds

FORMATS = ("table", "markdown", "json", "csv")
CSV_COLUMNS = [
    "index", "name", "kind", "module_type", "kernel", "stride", "padding", "dilation", "groups",
    "in_channels", "out_channels", "input_shape", "output_shape", "params", "macs", "activation_bytes",
    "macs_share", "depth", "depth_fraction", "downsamples", "call_index", "calls", "traced", "decision", "reason",
]


def shape_text(shape) -> str:
    """``(1, 64, 56, 56) -> '1×64×56×56'``."""
    return "×".join(str(s) for s in shape)


def render_analysis(analysis, fmt: str = "table", max_rows: int | None = None, plan=None) -> str:
    """Render an :class:`~dsrewrite.api.Analysis` (with each conv's decision when a plan is given)."""
    doc = analysis.to_dict()
    if plan is not None:
        doc["rules"] = plan.config.to_dict()
        for layer, decision in zip(doc["layers"], plan.decisions):
            layer["decision"] = "replace" if decision.replaced else "keep"
            layer["reason"] = decision.reason
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    if fmt == "csv":
        return _csv(doc["layers"])
    if fmt in ("table", "markdown"):
        return _text(doc, markdown=fmt == "markdown", max_rows=max_rows)
    raise UsageError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


def _csv(layers: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in layers:
        writer.writerow({k: "x".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})
    return buf.getvalue()


def layer_rows(layers: list[dict]) -> list[list]:
    """Human-scaled rows of the per-conv table."""
    rows = []
    for c in layers:
        name = c["name"] + (f" (call {c['call_index']}/{c['calls']})" if c["calls"] > 1 else "")
        if not c["traced"]:
            name += " [untraced]"
        row = [
            c["index"], name, c["kind"], "×".join(map(str, c["kernel"])),
            "×".join(map(str, c["stride"])) if len(set(c["stride"])) > 1 else c["stride"][0],
            c["groups"], f"{c['in_channels']}→{c['out_channels']}", shape_text(c["output_shape"][1:]),
            format_count(c["params"]), format_count(c["macs"]), f"{100 * c['macs_share']:.1f}%",
            f"{c['depth_fraction']:.2f}", "yes" if c["downsamples"] else "",
        ]
        if "reason" in c:
            row.append(c["reason"])
        rows.append(row)
    return rows


LAYER_HEADERS = ["#", "conv", "kind", "kernel", "stride", "groups", "channels", "output (C×H×W)",
                 "params", "MACs", "share", "depth", "downsamples"]


def _text(doc: dict[str, Any], markdown: bool, max_rows: int | None) -> str:
    fmt = "github" if markdown else "simple"
    out: list[str] = []
    inputs = ", ".join(shape_text(s) for s in doc["input_shapes"])
    if markdown:
        out.append(f"# dsrewrite analysis: `{doc['model']}`\n")
    else:
        out.append(f"dsrewrite analysis: {doc['model']}")
    out.append(f"Input {inputs} ({doc['dtype']}); traced with {doc['trace']['method']}, "
               f"shapes propagated on {doc['trace']['propagation']} tensors.\n")
    layers = doc["layers"]
    if not layers:
        out.append("This model has no convolutions.\n")
    else:
        shown = layers
        if max_rows is not None and len(layers) > max_rows:
            shown = sorted(sorted(layers, key=lambda c: -c["macs"])[:max_rows], key=lambda c: c["index"])
            out.append(f"Showing the {max_rows} most expensive of {len(layers)} conv calls (--all shows every one).\n")
        headers = LAYER_HEADERS + (["convert would"] if "reason" in layers[0] else [])
        out.append(tabulate(layer_rows(shown), headers=headers, tablefmt=fmt, disable_numparse=True))
        out.append("")
    out.append(_totals_block(doc, fmt, markdown))
    specialized = doc["trace"].get("specialized") or []
    if specialized:
        out.append(("## " if markdown else "") + "Traced at this input shape (generic torch.fx refused them; "
                   "their graph holds for this input shape)")
        out.append(tabulate([[u["module"], u["reason"]] for u in specialized], headers=["module", "why fx refused"],
                            tablefmt=fmt))
        out.append("")
    if doc["untraced"]:
        out.append(("## " if markdown else "") + "Not traced (costed at dispatch level, not rewritable in-graph)")
        out.append(tabulate([[u["module"], u["reason"]] for u in doc["untraced"]],
                            headers=["module", "why"], tablefmt=fmt))
        out.append("")
    if doc["unsupported_ops"]:
        out.append(("## " if markdown else "") + "Unsupported ops (no cost handler; their MACs are NOT in the totals)")
        out.append(tabulate([[u["op"], u["calls"], u["where"]] for u in doc["unsupported_ops"]],
                            headers=["op", "calls", "first seen in"], tablefmt=fmt))
        out.append("")
    for note in doc["notes"]:
        out.append(f"Note: {note}")
    if "rules" in doc:
        replaced = sum(1 for c in layers if c.get("decision") == "replace")
        out.append(f"Rules: {doc['rules']['source']} ({replaced} of {len(layers)} conv calls would be replaced; "
                   "see dsrewrite convert --dry-run).")
    out.append(f"Convention: {doc['convention']}.")
    return "\n".join(out).rstrip() + "\n"


def _totals_block(doc: dict, fmt: str, markdown: bool) -> str:
    t = doc["totals"]
    peak = t["peak_activation_bytes"]
    rows = [
        ["params", f"{format_count(t['params'])} params", f"{t['params']:,}"],
        ["MACs", f"{format_count(t['macs'])} MACs", f"FLOPs = 2 × MACs = {format_count(t['flops'])} FLOPs"],
        ["parameter memory", format_bytes(t["param_bytes"]), f"buffers {format_bytes(t['buffer_bytes'])}"],
        ["activation memory", f"{format_bytes(peak)} peak (inference)" if peak is not None else "n/a (untraced)",
         f"{format_bytes(t['activation_bytes'])} written in all (what training keeps)"],
        ["conv calls", str(t["conv_calls"]), ""],
    ]
    kinds = [[k, f"{format_count(v['macs'])} MACs", f"{100 * v['macs'] / t['macs']:.1f}%" if t["macs"] else "-",
              f"{format_count(v['params'])} params", v["calls"]] for k, v in doc["by_kind"].items()]
    head = "## Totals" if markdown else "Totals"
    return "\n".join([
        head, tabulate(rows, tablefmt=fmt, headers=["", "value", "detail"]), "",
        ("## " if markdown else "") + "By op kind",
        tabulate(kinds, headers=["kind", "MACs", "share", "params", "calls"], tablefmt=fmt), "",
    ])


# ------------------------------------------------------------------------------ modules

MODULE_CSV_COLUMNS = ["name", "type", "depth", "params", "trainable", "frozen", "macs", "params_share", "macs_share",
                      "leaf"]


def render_modules(analysis, fmt: str = "table", depth: int | None = None) -> str:
    """``analyze --by module``: every module (to ``depth``), its params (trainable/frozen), MACs and shares."""
    rows = analysis.modules(depth)
    doc = {"model": analysis.model_name, "input_shapes": [list(s) for s in analysis.profile.input_shapes],
           "depth": depth, "convention": analysis.to_dict()["convention"], "modules": [r.to_dict() for r in rows]}
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=MODULE_CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in doc["modules"]:
            writer.writerow(r)
        return buf.getvalue()
    md = fmt == "markdown"
    tfmt = "github" if md else "simple"
    frozen_any = any(r.frozen for r in rows)
    table = []
    for r in rows:
        tree = "│ " * (r.depth - 1) + "├ " if r.depth else ""  # table formats strip leading spaces
        label = tree + (r.name or "(model)") + f" ({r.type})"
        row = [label, format_count(r.params) if r.params else "-", f"{100 * r.params_share:.1f}%" if r.params else "",
               format_count(r.macs) if r.macs else "-", f"{100 * r.macs_share:.1f}%" if r.macs else ""]
        if frozen_any:
            row.insert(3, format_count(r.frozen) if r.frozen else "")
        table.append(row)
    headers = ["module", "params", "% params", "MACs", "% MACs"]
    if frozen_any:
        headers.insert(3, "frozen params")
    root = rows[0]
    shapes = ", ".join(shape_text(s) for s in doc["input_shapes"])
    head = f"# dsrewrite modules: `{doc['model']}`\n" if md else f"dsrewrite modules: {doc['model']}"
    out = [head, f"Input {shapes}; {format_count(root.params)} params ({format_count(root.trainable)} trainable, "
                 f"{format_count(root.frozen)} frozen), {format_count(root.macs)} MACs. "
                 + (f"Modules to depth {depth}; deeper ones are summed into their parents." if depth is not None
                    else "Every module; --depth N stops at N levels."), "",
           tabulate(table, headers=headers, tablefmt=tfmt, disable_numparse=True), "",
           f"Each row counts its whole subtree; a parameter shared by two modules is counted once. "
           f"Convention: {doc['convention']}."]
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------ plans


def render_plan(plan, fmt: str = "table") -> str:
    """A conversion plan (``convert --dry-run``): every conv's decision, block and reason, and the channel changes.

    ``json`` is the saved-plan document that ``convert --plan`` applies.
    """
    doc = plan.to_dict()
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    md = fmt == "markdown"
    tfmt = "github" if md else "simple"
    rows = [[d["index"], d["name"], d["action"], f"{d['in_channels']}→{d['out_channels']}", _block_text(d),
             format_count(d["macs_before"]),
             format_count(d["macs_after"]) if d["macs_after"] is not None else "",
             d["reason"]] for d in doc["decisions"]]
    rules = doc["rules"]
    head = f"# dsrewrite plan: `{doc['model']}`\n" if md else f"dsrewrite plan: {doc['model']}"
    shapes = " ".join("×".join(map(str, s)) for s in doc["input_shapes"])
    lines = [head, f"Rules: {rules['source']}; input {shapes}; {doc['replaced']} of {len(rows)} conv calls "
                   "replaced.", ""]
    choice = doc.get("rank_choice")
    if choice:
        lines += [_choice_text(choice), ""]
    timed = [d["timing"] for d in doc["decisions"] if d.get("timing")]
    if timed:
        fresh = sum(t["source"] == "fresh" for t in timed)
        lines += [f"Timings: {len(timed)} layers measured on {doc['environment']} ({fresh} fresh, "
                  f"{len(timed) - fresh} from the latency cache).", ""]
    if rows:
        lines.append(tabulate(rows, headers=["#", "conv", "decision", "channels", "block", "MACs", "MACs after",
                                             "reason"], tablefmt=tfmt, disable_numparse=True))
    else:
        lines.append("This model has no convolutions.")
    before, after = doc["macs_before"], doc["macs_after"]
    if before and any(d["macs_before"] for d in doc["decisions"]):
        lines += ["", f"Model MACs {format_count(before)} → {format_count(after)} MACs "
                      f"({before / after:.2f}× fewer) from the replacements" +
                      (" and the chosen channel widths." if (choice or {}).get("widths") is not None else
                       ", before the channel changes below." if doc["channels"] else ".")]
    candidates = _candidates_section(doc, md, tfmt)
    if candidates:
        lines += [""] + candidates
    if (choice or {}).get("widths"):
        lines += [""] + _widths_section(choice, md, tfmt)
    if (choice or {}).get("compared"):
        lines += [""] + _compared_section(choice["compared"], md, tfmt)
    if plan.resize is not None:
        lines += [""] + _channel_section(plan.resize.to_dict(), md, tfmt)
    for note in doc["notes"]:
        lines.append(f"Note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def _choice_text(choice: dict) -> str:
    """One sentence: what the ranks or blocks were chosen for, how they were judged, and (latency) the prediction."""
    if choice.get("target_latency") is not None:
        goal = f"at most {choice['target_latency']:g} of the original's measured latency"
        if choice.get("target_macs") is not None:
            goal += f" and at most {choice['target_macs']:g} of the original MACs"
    elif choice.get("target_macs") is not None:
        goal = f"at most {choice['target_macs']:g} of the original MACs"
    else:
        goal = f"error ≤ {choice['max_error']:g} per layer"
    if choice.get("chooser") == "blocks":
        families = ", ".join(choice.get("families") or []) or "none"
        judged = ("the output error on the layer's calibration inputs after the least-squares refit of each "
                  "block's last conv (and of each thinned group's consumers)" if choice.get("judged_by") == "data" else
                  "the weight error ‖W − Ŵ‖²/‖W‖² (no data)")
        if choice.get("sensitivity"):
            judged += (", weighted by how much of an error at each layer reaches the model's output (measured: "
                       f"{_sensitivity_range(choice['sensitivity'])})")
        widths = choice.get("widths")
        thinned = sum(g["chosen"] < g["old_width"] for g in widths or [])
        also = (f" and a width for each of {len(widths)} channel groups ({thinned} thinned)" if widths is not None
                else "")
        spent = f" (judging took {format_seconds(choice['judging_s'])})" if choice.get("judging_s") is not None else ""
        text = f"Blocks chosen for {goal} from {families} (or keep){also}, judged by {judged}{spent}."
        if choice.get("measured_fraction") is not None:
            batch = f", batch {choice['batch_size']}" if choice.get("batch_size") else ""
            rounds = choice.get("rounds") or []
            text += (f" Planned model measured end to end against the original, side by side on "
                     f"{choice['environment']}{batch}: {format_seconds(choice['measured_planned_s'])} vs "
                     f"{format_seconds(choice['measured_original_s'])} ({choice['measured_fraction']:.2f}×; "
                     f"per-layer timings predicted {choice['predicted_fraction']:.2f}×); the least-error plan within the "
                     f"target out of {len(rounds)} planning round(s), which measured "
                     + ", ".join(f"{r['measured_fraction']:.2f}×" for r in rounds) + ".")
        elif choice.get("original_latency_s") is not None:
            text += (f" Original measured end to end: {format_seconds(choice['original_latency_s'])} on "
                     f"{choice['environment']}; predicted from per-layer timings: "
                     f"{format_seconds(choice['predicted_latency_s'])} ({choice['predicted_fraction']:.2f}×).")
        return text
    judged = "output error after refit on the calibration data" if choice["judged_by"] == "data" else \
        "1 − kept SVD energy (no data)"
    return f"Depth multipliers chosen for {goal}, judged by {judged}."


def _sensitivity_range(sensitivity: dict) -> str:
    """The measured output sensitivities in a few words: their range and the layers at its ends."""
    ordered = sorted(sensitivity.items(), key=lambda kv: kv[1])
    (low, a), (high, b) = ordered[0], ordered[-1]
    return f"{a:.3g} at {low} to {b:.3g} at {high}" if len(ordered) > 1 else f"{a:.3g} at {low}"


def _compared_section(compared: list[dict], md: bool, tfmt: str) -> list[str]:
    """The plans made for the same target and measured on held-out calibration samples (plan.compare_on_data)."""
    rows = []
    for r in compared:
        what = f"{r['replaced']} blocks" + (f", {r['thinned']} group{'s' * (r['thinned'] > 1)} thinned"
                                             if r["thinned"] else "")
        fraction = f"{r['fraction']:.2f}×" if r["fraction"] is not None else "–"
        if r.get("checks"):  # timed twice: the mean, and the two checks
            fraction += f" ({', '.join(f'{c:.2f}' for c in r['checks'])})"
        agree = f"{100 * r['top1_agreement']:.1f}%" if r.get("top1_agreement") is not None else "–"
        rows.append([("✓ " if r["chosen"] else "") + r["plan"], what, fraction + ("" if r["fits"] else " (misses)"),
                     f"{r['predicted_error']:.4f}" if r.get("predicted_error") is not None else "–",
                     f"{r['relative_error']:.4f}", agree,
                     f"same as {r['same_as']}" if r.get("same_as") else format_seconds(r["seconds"])])
    first = compared[0]
    title = "## Plans compared on data" if md else "Plans compared on data (✓ kept):"
    return [title, "", f"Each plan made for the same target, applied and calibrated as the conversion will be, and "
                       f"its output measured against the original on the {first['samples']} held-out calibration "
                       f"samples; the least error among the plans that meet the target ({first['by']}) is kept" +
                       (" (a plan timed twice, in order of error, meets a latency target if the mean of its two "
                        "end-to-end checks does)." if first["by"] == "measured latency" else "."), "",
            tabulate(rows, headers=["plan", "changes", first["by"], "predicted error", "held-out relative error",
                                    "top-1 agreement", "took"], tablefmt=tfmt, disable_numparse=True)]


def _widths_section(choice: dict, md: bool, tfmt: str) -> list[str]:
    """Per channel group offered a smaller width: its candidates (error after the consumers' refit, what it
    saves), the chosen one marked."""
    rows = []
    for g in choice["widths"]:
        members = ", ".join(g["members"][:3]) + (", …" if len(g["members"]) > 3 else "")
        text = " · ".join(
            ("✓ " if c["chosen"] else "") + f"{c['new_width']}: err {c['error']:.3f}, saves " +
            (format_seconds(c["time_saved_s"]) if c.get("time_saved_s") is not None else
             f"{format_count(c['macs_saved'])} MACs") for c in g["candidates"])
        keep = "✓ " if g["chosen"] == g["old_width"] else ""
        rows.append([g["group"], members, f"{keep}{g['old_width']}", text])
    title = "## Channel widths considered" if md else "Channel widths considered (✓ chosen):"
    return [title, "", tabulate(rows, headers=["group", "members", "width", "thinner (✓ chosen)"], tablefmt=tfmt,
                                disable_numparse=True)]


def _candidates_section(doc: dict, md: bool, tfmt: str) -> list[str]:
    """Per planned layer, the candidates on its time/error front, the chosen one marked."""
    from .rules import candidate_label

    rows = []
    for d in doc["decisions"]:
        cands = d.get("candidates")
        if not cands:
            continue
        by_time = all(c.get("time_s") is not None for c in cands)
        key = (lambda c: (c["time_s"], c["error"])) if by_time else (lambda c: (c["macs"], c["error"]))
        front = sorted((c for c in cands if c.get("front") or c.get("chosen")), key=key)
        text = " · ".join(
            ("✓ " if c.get("chosen") else "") + candidate_label(c["family"], c["rank"]) +
            (f" {format_seconds(c['time_s'])}" if by_time else f" {format_count(c['macs'])} MACs") +
            (f" err {c['error']:.3f}" if c["family"] != "keep" else "") for c in front)
        rows.append([d["index"], d["name"], text])
    if not rows:
        return []
    return [("## " if md else "") + "Candidates (each layer's time/error front; ✓ chosen)",
            tabulate(rows, headers=["#", "conv", "candidates"], tablefmt=tfmt, disable_numparse=True), ""]


def _block_text(d: dict) -> str:
    """``dw×2 → BN → relu → pw`` / ``1×1 → 48 → 3×3 → 1×1`` for a replacement, empty for a kept conv."""
    return d.get("block") or ""


# -------------------------------------------------------------------------- conversions


#: relative output error at or below which fidelity is good, and above which it is bad
FIDELITY_GOOD, FIDELITY_BAD = 0.05, 0.2
MARKS = {"bad": "✗", "warn": "!", "good": "✓", "info": "·"}


def speed_level(speedup: float) -> str:
    """Verdict of a measured speedup: faster, about the same, slower."""
    return "good" if speedup >= 1.05 else "warn" if speedup >= 0.95 else "bad"


def fidelity_level(relative_error: float) -> str:
    """Verdict of a relative output error."""
    return "good" if relative_error <= FIDELITY_GOOD else "warn" if relative_error <= FIDELITY_BAD else "bad"


def realization_level(realization: float | None) -> str:
    """Verdict of measured ÷ theoretical speedup."""
    if realization is None:
        return "info"
    return "good" if realization >= 0.7 else "warn" if realization >= 0.4 else "bad"


def spread_text(d: dict) -> str:
    """``p10–p90 770–801 ms`` for a timing dict (median_s, p10_s, p90_s)."""
    return f"p10–p90 {duration(d['p10_s'])}–{duration(d['p90_s'])}"


def conversion_findings(doc: dict) -> list[tuple[str, str]]:
    """The verdicts of a conversion report, headline first: ``[(level, sentence)]``.

    ``level`` is bad, warn, good or info. Every renderer (text, markdown, HTML) shows these,
    so a slower model, slower layers, noisy timings, a poor realization and the meaning of the
    fidelity number are said in words, not only drawn.
    """
    out: list[tuple[str, str]] = []
    meas, r = doc.get("measurement"), doc["ratios"]
    by_macs = doc.get("chosen_by", "MACs") != "measured latency"
    if meas:
        b, a = meas["before"], meas["after"]
        if meas["speedup"] < 1:
            out.append(("bad", f"The converted model is SLOWER: {1 / meas['speedup']:.2f}× the original's latency "
                               f"({duration(b['median_s'])} → {duration(a['median_s'])} median), although it has "
                               f"{r['macs']:.2f}× fewer MACs." +
                        (" Fewer MACs is not lower latency; plan by measured speed with --rules latency."
                         if by_macs else "")))
        else:
            out.append((speed_level(meas["speedup"]),
                        f"Measured {meas['speedup']:.2f}× faster end to end ({duration(b['median_s'])} → "
                        f"{duration(a['median_s'])} median, fresh), {r['macs']:.2f}× fewer MACs."))
    elif by_macs and doc["layers"]:
        out.append(("warn", f"Not timed: these replacements were chosen by MACs ({r['macs']:.2f}× fewer), and fewer "
                            "MACs is not lower latency (depthwise convs are memory-bound). --measure times both "
                            "models; --rules latency keeps only replacements that measure faster."))
    target = doc.get("latency_target")
    if target and target.get("measured_fraction") is not None:
        goal, check = target["target_latency"], target["measured_fraction"]
        text = (f"Latency target {goal:g}× of the original: the planner's end-to-end check measured {check:.2f}× "
                f"(planned model with random-weight blocks, side by side on {target['environment']}; per-layer "
                f"timings predicted {target['predicted_fraction']:.2f}×)")
        if meas:
            now = 1 / meas["speedup"] if meas["speedup"] else float("inf")
            hit = now <= goal * 1.05
            out.append(("good" if hit else "bad", text + f"; measured now: {now:.2f}×" +
                        ("." if hit else ", above the target by more than 5%.")))
        else:
            out.append(("info" if target.get("reachable") else "bad",
                        text + ("." if target.get("reachable") else ": the target was out of reach.") +
                        " --measure times the result."))
    compared = doc.get("plans_compared")
    if compared:
        kept = next(r for r in compared if r["chosen"])
        others = ", ".join(f"{r['plan']} {r['relative_error']:.4f}" + ("" if r["fits"] else " (missed the target)")
                           for r in compared if not r["chosen"])
        out.append(("info" if kept["fits"] else "bad",
                    f"Plan kept: '{kept['plan']}', " + ("the least output error" if kept["fits"] else
                                                        "none of the plans met the target; the one with every option")
                    + f" ({kept['relative_error']:.4f} relative, on {kept['samples']} held-out calibration samples "
                      f"after calibration) of {len(compared)} plans made for the target; the others: {others}."))
    slower = [c for c in doc["layers"] if c["measured_speedup"] is not None and c["measured_speedup"] < 1]
    if slower:
        names = ", ".join(c["name"] for c in slower[:4]) + (f" (+{len(slower) - 4} more)" if len(slower) > 4 else "")
        out.append(("bad", f"{len(slower)} of {len(doc['layers'])} replaced layers measured slower than the conv "
                           f"they replace: {names}." +
                    (" --rules latency keeps only replacements that measure faster." if by_macs else "")))
    if meas:
        noisy = [n for n, t in (("before", meas["before"]), ("after", meas["after"])) if t.get("noisy")]
        if noisy:
            out.append(("warn", f"Noisy end-to-end timing ({' and '.join(noisy)}: p10–p90 spread "
                                f"{100 * max(meas[n]['spread'] for n in noisy):.0f}% of the median); use "
                                "--repeats 30 or a quieter machine before trusting the speedup."))
        level = realization_level(meas.get("realization"))
        bd = meas.get("breakdown")
        if level != "good" and meas.get("realization") is not None:
            text = (f"Realization {meas['realization']:.2f}: {meas['speedup']:.2f}× measured of "
                    f"{meas['theoretical_speedup']:.2f}× fewer MACs.")
            if bd and bd.get("replaced_share_before") is not None:
                text += (f" The replaced convs took {100 * bd['replaced_share_before']:.0f}% of the original's time "
                         f"({duration(bd['replaced_before_s'])} of {duration(meas['before']['median_s'])}, timed one by one); "
                         f"the rest ({duration(bd['rest_before_s'])}: kept layers and non-conv ops) does not shrink, "
                         f"so their own speedups predict {bd['predicted_speedup']:.2f}× end to end.")
            out.append((level, text))
    timed = [c["timing"] for c in doc["layers"] if c.get("timing")]
    if timed:
        cached = [t for t in timed if t["source"] == "cached"]
        if cached:
            when = sorted(t["measured_at"] for t in cached if t.get("measured_at"))
            span = f" (measured {when[0][:16].replace('T', ' ')} UTC" + (
                f" to {when[-1][:16].replace('T', ' ')}" if when and when[-1] != when[0] else "") + \
                f" on {cached[0]['environment']})" if when else ""
            out.append(("info", f"Per-layer timings: {len(cached)} of {len(timed)} from the latency cache{span}, "
                                f"{len(timed) - len(cached)} fresh; --no-cache measures every layer afresh."))
        else:
            out.append(("info", f"Per-layer timings: all {len(timed)} measured fresh in this run."))
    out.append(fidelity_finding(doc))
    return out


def _fidelity_line(d: dict) -> str:
    """``relative error …, cosine …[, top-1 agreement …%]`` of a before/after fidelity dict."""
    agree = f", top-1 agreement {100 * d['top1_agreement']:.1f}%" if d.get("top1_agreement") is not None else ""
    return f"relative error {d['relative_error']:.4g}, cosine {d['cosine']:.6f}{agree}"


def fidelity_finding(doc: dict) -> tuple[str, str]:
    """The fidelity headline: on held-out calibration data when there was calibration, else on example inputs."""
    cal, rec = doc.get("calibration"), doc.get("reconstruction")
    if cal or rec:
        # the last data-driven step measured the final model: the refit after a width resize, if any
        last = rec or cal
        after = last["after"]
        before = f"before calibration: relative error {cal['before']['relative_error']:.3g}" if cal else (
            f"after the width resize, before the refit: relative error {rec['before']['relative_error']:.3g}")
        where = (f"{last['held_out_samples']} held-out calibration samples (not used in the fit)"
                 if last.get("held_out_samples") else f"the {last['samples']} calibration samples it was fit on")
        agree = (f", top-1 agreement {100 * after['top1_agreement']:.1f}%"
                 if after.get("top1_agreement") is not None else "")
        return (fidelity_level(after["relative_error"]),
                f"Output fidelity on {where}: relative error {after['relative_error']:.3g}, cosine "
                f"{after['cosine']:.4f}{agree} ({before}).")
    f = doc["fidelity"]
    what = ("seeded random N(0, 1) inputs" if doc.get("fidelity_inputs", "random") == "random"
            else "the model's example inputs")
    return (fidelity_level(f["relative_error"]),
            f"Output fidelity on {what}: relative error {f['relative_error']:.3g}, cosine {f['cosine']:.4f}. "
            "With untrained weights and random inputs this is a pessimistic bound; --calibrate DATA refits each "
            "block on your data and measures fidelity on held-out samples of it.")


def _finding_lines(findings, md: bool, color: bool) -> list[str]:
    out = []
    for level, text in findings:
        line = f"{MARKS[level]} {text}"
        if md:
            line = f"- {MARKS[level]} " + (f"**{text}**" if level == "bad" else text)
        elif color and level in ("bad", "warn", "good"):
            import click

            line = click.style(line, fg={"bad": "red", "warn": "yellow", "good": "green"}[level],
                               bold=level == "bad")
        out.append(line)
    return out


def render_conversion(report, plan, fmt: str = "table", color: bool = False) -> str:
    """Before/after report of a conversion (table, markdown, json or html); ``color``: ANSI colours (terminal)."""
    if fmt == "html":
        from .html import render_conversion_html

        return render_conversion_html(report, plan)
    doc = report.to_dict()
    if fmt == "json":
        doc["plan"] = plan.to_dict()
        doc["findings"] = [{"level": lv, "text": t} for lv, t in conversion_findings(doc)]
        return json.dumps(doc, indent=2) + "\n"
    md = fmt == "markdown"
    tfmt = "github" if md else "simple"
    b, a, r = doc["before"], doc["after"], doc["ratios"]
    out = [f"# dsrewrite conversion: `{doc['model']}`\n" if md else f"dsrewrite conversion: {doc['model']}",
           f"Rules: {doc['rules']['source']}; replaced {doc['replaced_modules']} conv module(s) "
           f"({len(plan.replacements)} of {doc['conv_calls']} conv calls), chosen by {doc['chosen_by']}.", ""]
    out += [("## " if md else "") + "Summary", *_finding_lines(conversion_findings(doc), md, color), ""]
    totals = [
        ["params", f"{format_count(b['params'])} params", f"{format_count(a['params'])} params",
         f"{r['params']:.2f}×"],
        ["MACs", f"{format_count(b['macs'])} MACs", f"{format_count(a['macs'])} MACs", f"{r['macs']:.2f}×"],
        ["parameter memory", format_bytes(b["param_bytes"]), format_bytes(a["param_bytes"]),
         f"{r['param_bytes']:.2f}×"],
        ["activation memory (peak)", _maybe_bytes(b["peak_activation_bytes"]), _maybe_bytes(a["peak_activation_bytes"]),
         ""],
    ]
    meas = doc.get("measurement")
    if meas:
        totals.append(["latency (median, fresh)", f"{duration(meas['before']['median_s'])} ({spread_text(meas['before'])})",
                       f"{duration(meas['after']['median_s'])} ({spread_text(meas['after'])})", f"{meas['speedup']:.2f}×"])
    out += [("## " if md else "") + "Totals",
            tabulate(totals, headers=["", "before", "after", "before/after"], tablefmt=tfmt, disable_numparse=True),
            ""]
    if meas:
        fp = meas["fingerprint"]
        out += [("## " if md else "") + "Measured speedup",
                f"measured {meas['speedup']:.2f}× end to end vs {meas['theoretical_speedup']:.2f}× fewer MACs: "
                f"realization ratio {meas['realization']:.2f} (measured ÷ theoretical).",
                f"Measured fresh in this run on {fp['device']} ({fp['device_name']}), {fp['threads']} threads, "
                f"{fp['dtype']}, {fp['memory_format']}, batch {meas['batch_size']}, "
                f"BN {'folded' if meas['fold_bn'] else 'not folded'}, torch {fp['torch']}; median of "
                f"{meas['before']['repeats']} / {meas['after']['repeats']} runs after {meas['settings']['warmup']} "
                f"warm-up (p10–p90 spread {100 * meas['before']['spread']:.0f}% / "
                f"{100 * meas['after']['spread']:.0f}% of the median).", ""]
        bd = meas.get("breakdown")
        if bd:
            rows = [["replaced convs (each timed alone)", duration(bd["replaced_before_s"]), duration(bd["replaced_after_s"]),
                     f"{100 * bd['replaced_share_before']:.0f}%" if bd["replaced_share_before"] is not None else "-"],
                    ["everything else (kept layers, non-conv ops)", duration(bd["rest_before_s"]), duration(bd["rest_after_s"]),
                     f"{100 * (1 - bd['replaced_share_before']):.0f}%" if bd["replaced_share_before"] is not None
                     else "-"],
                    ["end to end", duration(meas["before"]["median_s"]), duration(meas["after"]["median_s"]), "100%"]]
            out += [("## " if md else "") + "Where the time goes",
                    tabulate(rows, headers=["", "before", "after", "share of the original"], tablefmt=tfmt,
                             disable_numparse=True),
                    f"If only the replaced convs changed, by their own measured speedups, the model would run "
                    f"{bd['predicted_speedup']:.2f}× faster; measured: {meas['speedup']:.2f}×.", ""]
    cal = doc.get("calibration")
    if cal:
        judged = (f"fidelity on {cal['held_out_samples']} held-out samples" if cal.get("held_out_samples")
                  else "fidelity on the fit data (too few samples to hold any out)")
        out += [("## " if md else "") + f"Calibration ({cal['samples']} samples fit, {cal['blocks']} blocks refit; "
                                        f"{judged})",
                f"before: {_fidelity_line(cal['before'])}",
                f"after:  {_fidelity_line(cal['after'])}"]
        if "mode" in cal:
            rest = cal["blocks"] - cal["streamed_blocks"]
            fits = "each fit on a sample of output positions" if cal["mode"] == "fast" else "every position"
            out.append(
                f"{cal['mode']} mode ({fits}), {cal['seconds']:.1f} s; {cal['streamed_blocks']} of {cal['blocks']} "
                "blocks fit from one streamed pass of both models"
                + (f", {rest} by running both models up to the block per batch (inside code the graph does not "
                   "reach)" if rest else "") + _memory_note(cal))
        out.append("")
    ch = doc.get("channels")
    if ch:
        out += _channel_section(ch, md, tfmt)
    rec = doc.get("reconstruction")
    if rec:
        out += [("## " if md else "") + f"Refit after the width resize ({len(rec['layers'])} layers that lost input "
                                        f"channels, least squares on {rec['samples']} samples; fidelity on "
                                        f"{rec['held_out_samples']} held-out samples)",
                f"after the resize: {_fidelity_line(rec['before'])}",
                f"after the refit:  {_fidelity_line(rec['after'])}",
                f"{rec['mode']} mode, {rec['seconds']:.1f} s; refit: {', '.join(rec['layers'][:8])}"
                + (f" and {len(rec['layers']) - 8} more" if len(rec["layers"]) > 8 else "") + _memory_note(rec), ""]
    f = doc["fidelity"]
    what = "seeded random inputs" if doc["fidelity_inputs"] == "random" else "the model's example inputs"
    out += [("## " if md else "") + f"Output on {what}" + (" (not your data; see Calibration)" if cal else ""),
            f"relative error {f['relative_error']:.4g}, cosine similarity {f['cosine']:.6f}, "
            f"max abs error {f['max_abs_error']:.4g}", ""]
    if doc["layers"]:
        measured = any(c["measured_speedup"] is not None for c in doc["layers"])
        rows = []
        for c in doc["layers"]:
            row = [c["name"], "×".join(map(str, c["kernel"])), f"{c['in_channels']}→{c['out_channels']}",
                   c.get("block") or "", f"{format_count(c['params_before'])} → {format_count(c['params_after'])}",
                   f"{format_count(c['macs_before'])} → {format_count(c['macs_after'])}",
                   f"{c['theoretical_speedup']:.1f}×", f"{100 * c['kept_energy']:.1f}%"]
            if measured:
                row += [f"{duration(c['measured_original_s'])} → {duration(c['measured_replacement_s'])}"
                        if c["measured_speedup"] is not None else "-",
                        _layer_speedup(c, md), timing_source(c.get("timing"))]
            rows.append(row)
        headers = ["conv", "kernel", "channels", "block", "params", "MACs", "theoretical speedup", "kept energy"]
        if measured:
            headers += ["measured latency (median)", "measured speedup", "timing"]
        out += [("## " if md else "") + "Replaced layers",
                tabulate(rows, headers=headers, tablefmt=tfmt, disable_numparse=True), ""]
        out.append("Kept energy: the share of the conv weight's squared norm that the rank-r depthwise/pointwise "
                   "factorization keeps (100% = exact).")
        if measured:
            out.append("Timing: fresh (measured in this run) or cached (from the latency cache, with its date), "
                       "and the wider p10–p90 spread of the two medians.")
        out.append("")
    kept = [d for d in plan.decisions if not d.replaced]
    if kept:
        out += [("## " if md else "") + "Kept standard",
                tabulate([[d.name, d.reason] for d in kept], headers=["conv", "reason"], tablefmt=tfmt), ""]
    for note in doc["notes"]:
        out.append(f"Note: {note}")
    out.append(f"Convention: {doc['convention']}.")
    return "\n".join(out).rstrip() + "\n"


def _layer_speedup(c: dict, md: bool) -> str:
    if c["measured_speedup"] is None:
        return "-"
    text = f"{c['measured_speedup']:.2f}×"
    if c["measured_speedup"] < 1:
        text += " slower"
        return f"**{text}**" if md else text
    return text


def timing_source(t: dict | None) -> str:
    if not t:
        return "-"
    spread = f", ±{50 * t['spread']:.0f}%" if t.get("spread") is not None else ""
    if t["source"] == "cached":
        when = f" {t['measured_at'][:10]}" if t.get("measured_at") else ""
        return f"cached{when}{spread}"
    return f"fresh{spread}"


def _channel_section(ch: dict, md: bool, tfmt: str) -> list[str]:
    what = (f"width ×{ch['width']:g}, multiples of {ch['divisor']}" if ch["width"] is not None
            else f"widths chosen per group, multiples of {ch['divisor']}" if ch.get("chosen")
            else f"aligned to multiples of {ch['divisor']}")
    exact = "exact: no channel removed, outputs unchanged" if ch["exact"] else "lossy: channels removed"
    counts = (f"{len(ch['changed'])} group(s) thinned; every other group keeps its width." if ch.get("chosen") else
              f"{len(ch['changed'])} group(s) changed, {ch['unchanged']} unchanged, {len(ch['frozen'])} frozen.")
    out = [("## " if md else "") + f"Channel groups ({what}; {exact})", counts]
    if ch["changed"]:
        rows = [[c["group"], f"{c['old_width']} → {c['new_width']}", c["removed"], c["added"],
                 _first(c["producers"], 3), c["reason"]] for c in ch["changed"]]
        out += ["", tabulate(rows, headers=["group", "width", "removed", "added", "produced by", "why"],
                             tablefmt=tfmt, disable_numparse=True)]
    if ch["frozen"]:
        rows = [[f["group"], f["width"], "; ".join(f["reasons"][:2])] for f in ch["frozen"]]
        out += ["", "Frozen groups (left as they are):",
                tabulate(rows, headers=["group", "width", "why"], tablefmt=tfmt, disable_numparse=True)]
    return out + [""]


def _first(items: list[str], n: int) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def render_groups(graph, fmt: str = "table", model_name: str = "", show_all: bool = False) -> str:
    """The channel groups of :func:`dsrewrite.channels.channel_graph` (``analyze --groups``)."""
    doc = {"model": model_name, **graph.to_dict()}
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    if fmt == "csv":
        raise UsageError("--groups: use --format table, markdown or json")
    md = fmt == "markdown"
    tfmt = "github" if md else "simple"
    shown = [g for g in graph.groups if g.members]
    hidden = len(graph.groups) - len(shown)
    limit = None if show_all else 6
    rows = []
    for g in shown:
        members = g.members if limit is None else g.members[:limit]
        more = f" (+{len(g.members) - len(members)} more)" if len(members) < len(g.members) else ""
        status = "resizable" if g.resizable else "frozen: " + "; ".join(g.frozen[:2] or ["no producing conv"])
        rows.append([g.id, g.width, status, ", ".join(members) + more])
    out = [f"# Channel groups: `{model_name}`\n" if md else f"Channel groups: {model_name}",
           f"{len(graph.resizable)} resizable, {len(shown) - len(graph.resizable)} frozen. Each group's members "
           "must keep the same width; resizing changes all of them at once.", "",
           tabulate(rows, headers=["group", "width", "status", "members"], tablefmt=tfmt, disable_numparse=True)]
    if hidden:
        out += ["", f"({hidden} frozen group(s) with no module parameters, e.g. outputs of ops not understood, "
                    "not shown.)"]
    if limit is not None and any(len(g.members) > limit for g in shown):
        out += ["", "Member lists are cut at 6; --all shows every member."]
    return "\n".join(out).rstrip() + "\n"


def _memory_note(cal: dict) -> str:
    """How much of the streamed pass's activations stayed in memory and how much went to disk."""
    if "activations_peak" not in cal:
        return ""
    limit = cal.get("memory_limit")
    text = (f"; activations held in memory: {format_bytes(cal['activations_peak'])} at most"
            + (f" (limit {format_bytes(limit)})" if limit is not None else " (no limit)"))
    if cal.get("spilled_bytes"):
        text += f", {format_bytes(cal['spilled_bytes'])} written to a temporary directory (removed)"
    return text


def duration(seconds) -> str:
    """A duration in human units (``12.3 ms``, ``2.66 s``; never an exponent), ``-`` when unknown."""
    return "-" if seconds is None else format_seconds(seconds)


def _maybe_bytes(v) -> str:
    return format_bytes(v) if v is not None else "n/a"


def format_for_path(path: str, default: str = "table") -> str:
    """Report format from a file suffix: .md → markdown, .json → json, .txt → table."""
    suffix = Path(path).suffix.lower()
    formats = {".md": "markdown", ".markdown": "markdown", ".json": "json", ".txt": "table", ".csv": "csv"}
    formats[".html"] = "html"
    formats[".htm"] = "html"
    if suffix not in formats:
        raise UsageError(f"{path}: unknown report type {suffix or '(no suffix)'}; use .md, .json, .txt or .html")
    return formats[suffix]
