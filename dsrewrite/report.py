"""Stage 7, report: plain data in, text out (terminal table, markdown, JSON, CSV).

Nothing here computes a cost; it only formats what the earlier stages produced. Every
number is printed with its unit word (params, MACs, FLOPs, bytes), and FLOPs are only
ever shown as what they are: 2 × MACs.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .errors import UsageError
from .units import format_bytes, format_count

FORMATS = ("table", "markdown", "json", "csv")
CSV_COLUMNS = [
    "index", "name", "kind", "module_type", "kernel", "stride", "padding", "dilation", "groups",
    "in_channels", "out_channels", "input_shape", "output_shape", "params", "macs", "activation_bytes",
    "macs_share", "depth", "depth_fraction", "downsamples", "call_index", "calls", "traced",
]


def shape_text(shape) -> str:
    """``(1, 64, 56, 56) -> '1×64×56×56'``."""
    return "×".join(str(s) for s in shape)


def render_analysis(analysis, fmt: str = "table", max_rows: int | None = None) -> str:
    """Render an :class:`~dsrewrite.api.Analysis` in one of :data:`FORMATS`."""
    if fmt == "json":
        return json.dumps(analysis.to_dict(), indent=2) + "\n"
    if fmt == "csv":
        return _csv(analysis.to_dict()["layers"])
    if fmt in ("table", "markdown"):
        return _text(analysis.to_dict(), markdown=fmt == "markdown", max_rows=max_rows)
    raise UsageError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


def _csv(layers: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in layers:
        writer.writerow({k: "x".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})
    return buf.getvalue()


def layer_rows(layers: list[dict], extra: dict[int, list] | None = None) -> list[list]:
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
        rows.append(row + (extra or {}).get(c["index"], []))
    return rows


LAYER_HEADERS = ["#", "conv", "kind", "kernel", "stride", "groups", "channels", "output (C×H×W)",
                 "params", "MACs", "share", "depth", "downsamples"]


def _text(doc: dict[str, Any], markdown: bool, max_rows: int | None) -> str:
    fmt = "github" if markdown else "simple"
    t = doc["totals"]
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
        out.append(tabulate(layer_rows(shown), headers=LAYER_HEADERS, tablefmt=fmt, disable_numparse=True))
        out.append("")
    out.append(_totals_block(doc, fmt, markdown))
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


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename: never a half-written file."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write {target}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
