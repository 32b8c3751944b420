"""``dsrewrite compare``: the difference between two saved reports, offline.

Reads ``analyze --format json`` documents, ``check`` baselines and ``check --format json``
reports, and lines up their models by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .check import BASELINE_KIND, METRICS, diff_layers, format_delta, format_value, shapes_text
from .errors import ConfigError, UsageError


def read_report(path: str) -> dict[str, dict[str, Any]]:
    """``{model or budget name: {"metrics": {...}, "layers": [...] or None}}`` from any supported JSON."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a JSON report ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: not a dsrewrite report")
    if doc.get("kind") == BASELINE_KIND:
        return {name: {"metrics": b.get("metrics", {}), "layers": b.get("layers"), "model": b.get("model"),
                       "input_shapes": b.get("input_shapes")} for name, b in doc["budgets"].items()}
    if doc.get("kind") == "dsrewrite-check":
        return {b["name"]: {"metrics": {k: v["value"] for k, v in b.get("metrics", {}).items()}, "layers": None,
                            "model": b.get("model"), "input_shapes": b.get("input_shapes")}
                for b in doc.get("budgets", [])}
    if "totals" in doc and "layers" in doc:
        t = doc["totals"]
        metrics = {"params": t.get("params"), "macs": t.get("macs"), "param-bytes": t.get("param_bytes"),
                   "activation-memory": t.get("peak_activation_bytes")}
        if "modules" in doc:  # every parametrized layer, not only convs
            layers = [{"name": m["name"], "type": m["type"], "params": m["params"], "macs": m["macs"]}
                      for m in doc["modules"] if m["leaf"] and m["params"] and m["name"]]
        else:  # an analyze report from before modules were recorded: its convs
            layers = [{"name": c["name"], "type": c.get("module_type", ""), "params": c["params"], "macs": c["macs"]}
                      for c in doc["layers"]]
        return {doc.get("model", Path(path).stem): {"metrics": metrics, "layers": layers, "model": doc.get("model"),
                                                    "input_shapes": doc.get("input_shapes")}}
    raise ConfigError(f"{path}: not an analyze JSON report, check baseline or check JSON report")


def compare_files(base: str, head: str, top: int = 10, allow_different: bool = False) -> dict[str, Any]:
    """The comparison as plain data.

    Two reports of different models, or of the same model on different input shapes, are
    refused (:class:`~dsrewrite.errors.UsageError`) unless ``allow_different``; then each such
    difference is listed under ``"differences"`` and shown as a warning.
    """
    a, b = read_report(base), read_report(head)
    differences = []
    if len(a) == 1 and len(b) == 1 and set(a) != set(b):
        (name_a, entry_a), (name_b, entry_b) = next(iter(a.items())), next(iter(b.items()))
        differences.append(f"different models: {entry_a.get('model') or name_a} in {base}, "
                           f"{entry_b.get('model') or name_b} in {head}")
        label = f"{name_a} → {name_b}"
        a, b = {label: entry_a}, {label: entry_b}
    for name in set(a) & set(b):
        ma, mb = a[name].get("model"), b[name].get("model")
        if ma and mb and ma != mb and not differences:
            differences.append(f"{name}: different models ({ma} in {base}, {mb} in {head})")
        sa, sb = a[name].get("input_shapes"), b[name].get("input_shapes")
        if sa and sb and [list(x) for x in sa] != [list(x) for x in sb]:
            differences.append(f"{name}: different input shapes ({shapes_text(sa)} in {base}, {shapes_text(sb)} in {head})")
    if differences and not allow_different:
        raise UsageError(f"not comparable: {differences[0]}" + (f" (and {len(differences) - 1} more)"
                                                                if len(differences) > 1 else "")
                         + "; pass --allow-different to compare anyway")
    models = []
    for name in list(a) + [n for n in b if n not in a]:
        before, after = a.get(name), b.get(name)
        entry: dict[str, Any] = {"name": name, "state": "added" if before is None else "removed" if after is None
                                 else "both", "metrics": [], "layers": []}
        if before and after:
            for metric in METRICS:
                x, y = before["metrics"].get(metric), after["metrics"].get(metric)
                if x is None and y is None:
                    continue
                delta = None if x is None or y is None else y - x
                pct = None if delta is None or not x else 100.0 * delta / x
                entry["metrics"].append({"metric": metric, "before": x, "after": y, "delta": delta, "delta_pct": pct})
            if before.get("layers") is not None and after.get("layers") is not None:
                entry["layers"] = diff_layers(before["layers"], after["layers"], top)
        models.append(entry)
    return {"base": base, "head": head, "differences": differences, "models": models}



def render_comparison(data: dict[str, Any], fmt: str) -> str:
    """Text, markdown or JSON."""
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    tfmt = "github" if fmt == "markdown" else "simple"
    out = [f"{'## ' if fmt == 'markdown' else ''}dsrewrite compare: {data['base']} → {data['head']}", ""]
    for d in data.get("differences", []):
        out.append(("> **Warning**: " if fmt == "markdown" else "WARNING: ") + f"{d}; the numbers below compare "
                   "unlike things (--allow-different).")
    if data.get("differences"):
        out.append("")
    for m in data["models"]:
        out.append(f"{'### ' if fmt == 'markdown' else ''}{m['name']}"
                   + ("" if m["state"] == "both" else f" ({m['state']})"))
        if m["metrics"]:
            rows = [[METRICS[r["metric"]].label, format_value(r["metric"], r["before"]),
                     format_value(r["metric"], r["after"]),
                     format_delta(r["metric"], r["delta"]) if r["delta"] is not None else "-",
                     f"{r['delta_pct']:+.2f}%" if r["delta_pct"] is not None else "-"] for r in m["metrics"]]
            out += [tabulate(rows, headers=["metric", "before", "after", "change", "%"], tablefmt=tfmt,
                             disable_numparse=True), ""]
        if m["layers"]:
            rows = [[r["name"], r.get("type", ""), r["change"], f"{r['delta_params']:+,}", f"{r['delta_macs']:+,}"]
                    for r in m["layers"]]
            out += ["Layers that changed most:",
                    tabulate(rows, headers=["layer", "type", "change", "Δ params", "Δ MACs"], tablefmt=tfmt,
                             disable_numparse=True), ""]
    return "\n".join(out).rstrip() + "\n"
