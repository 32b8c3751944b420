"""``dsrewrite compare``: the difference between two saved reports, offline.

Reads ``analyze --format json`` documents, ``check`` baselines and ``check --format json``
reports, and lines up their models by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .check import BASELINE_KIND, METRICS, diff_layers, format_delta, format_value
from .errors import ConfigError


def read_report(path: str) -> dict[str, dict[str, Any]]:
    """``{model or budget name: {"metrics": {...}, "layers": [...] or None}}`` from any supported JSON."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a JSON report ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: not a dsrewrite report")
    if doc.get("kind") == BASELINE_KIND:
        return {name: {"metrics": b.get("metrics", {}), "layers": b.get("layers")} for name, b in doc["budgets"].items()}
    if doc.get("kind") == "dsrewrite-check":
        return {b["name"]: {"metrics": {k: v["value"] for k, v in b.get("metrics", {}).items()}, "layers": None}
                for b in doc.get("budgets", [])}
    if "totals" in doc and "layers" in doc:
        t = doc["totals"]
        metrics = {"params": t.get("params"), "macs": t.get("macs"), "param-bytes": t.get("param_bytes"),
                   "activation-memory": t.get("peak_activation_bytes")}
        layers = [{"name": c["name"], "params": c["params"], "macs": c["macs"]} for c in doc["layers"]]
        return {doc.get("model", Path(path).stem): {"metrics": metrics, "layers": layers}}
    raise ConfigError(f"{path}: not an analyze JSON report, check baseline or check JSON report")


def compare_files(base: str, head: str, top: int = 10) -> dict[str, Any]:
    """The comparison as plain data."""
    a, b = read_report(base), read_report(head)
    # a single model on each side is compared even if it was given under different names
    if len(a) == 1 and len(b) == 1 and set(a) != set(b):
        b = {next(iter(a)): next(iter(b.values()))}
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
    return {"base": base, "head": head, "models": models}


def render_comparison(data: dict[str, Any], fmt: str) -> str:
    """Text, markdown or JSON."""
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    tfmt = "github" if fmt == "markdown" else "simple"
    out = [f"{'## ' if fmt == 'markdown' else ''}dsrewrite compare: {data['base']} → {data['head']}", ""]
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
            rows = [[r["name"], r["change"], f"{r['delta_params']:+,}", f"{r['delta_macs']:+,}"] for r in m["layers"]]
            out += ["Layers that changed most:",
                    tabulate(rows, headers=["layer", "", "Δ params", "Δ MACs"], tablefmt=tfmt, disable_numparse=True),
                    ""]
    return "\n".join(out).rstrip() + "\n"
