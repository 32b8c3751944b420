"""Output formats of ``dsrewrite check``: text, json, markdown, github annotations, junit XML."""

from __future__ import annotations

import json
import os
from xml.sax.saxutils import escape, quoteattr

from tabulate import tabulate

from .check import (METRICS, REPORT_VERSION, BudgetResult, CheckResult, block_changes, format_delta, format_value,
                    layer_changes)
from .units import format_count

FORMATS = ("text", "json", "markdown", "github", "junit")
MARKER = "<!-- dsrewrite-check -->"
_ICON = {"pass": "✓", "fail": "✗", "warn": "!", "not-comparable": "~"}


def render(result: CheckResult, fmt: str, why: bool = False) -> str:
    """Render a check result in one of :data:`FORMATS`."""
    return {"text": _text, "json": _json, "markdown": _markdown, "github": _github, "junit": _junit}[fmt](result, why)


def _md_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table without padding: identical output whatever measures emoji widths."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _change(m) -> str:
    if m.delta is None:
        return "new" if m.baseline is None and m.status != "not-comparable" else "-"
    pct = f" ({m.delta_pct:+.1f}%)" if m.delta_pct is not None else ""
    return f"{format_delta(m.metric, m.delta, m.style)}{pct}"


def _limit_text(m) -> str:
    parts = []
    if m.limit is not None:
        parts.append(format_value(m.metric, m.limit, m.style))
    if m.max_increase is not None:
        parts.append(f"+{100 * m.max_increase:g}% vs baseline")
    return ", ".join(parts)


def _headline(result: CheckResult) -> str:
    failed = [b for b in result.budgets if b.failed]
    warned = [b for b in result.budgets if b.warned and not b.failed]
    if result.errors:
        return f"{len(result.errors)} model(s) could not be analyzed"
    if failed:
        return f"{len(failed)} of {len(result.budgets)} budget(s) exceeded"
    if warned:
        return f"all {len(result.budgets)} budget(s) within their error limits, {len(warned)} with warnings"
    return f"all {len(result.budgets)} budget(s) within limits"


# ------------------------------------------------------------------------------------ text


def _text(result: CheckResult, why: bool) -> str:
    lines = []
    for b in result.budgets:
        shapes = ", ".join("×".join(map(str, s)) for s in (b.measurement.input_shapes if b.measurement else []))
        state = " (new: not in the baseline yet)" if b.state == "added" else ""
        lines.append(f"{b.budget.name} ({b.budget.model}{', ' + shapes if shapes else ''}){state}")
        if b.state == "error":
            lines += [f"  ✗ could not analyze the model: {b.error}", ""]
            continue
        for m in b.metrics:
            lines.append(f"  {_ICON[m.status]} {m.message}")
            if m.status in ("fail", "warn"):
                lines.append(f"      limit {_limit_text(m)}   value {format_value(m.metric, m.value, m.style)}   "
                             f"baseline {format_value(m.metric, m.baseline, m.style)}   change {_change(m)}")
        if b.failed or b.warned:
            if b.budget.message:
                lines.append(f"      {b.budget.message}")
            if result.config.source == "command line":
                flags = ", ".join(f"--max-{m.metric}" for m in b.metrics if m.status in ("fail", "warn"))
                lines.append(f"      To raise a limit, change {flags} on the command line")
            else:
                lines.append(f"      To raise a limit, edit {result.config.table} name = {b.budget.name!r} "
                             f"in {result.config.source}")
        if why:
            lines += _why_lines(b)
        lines.append("")
    for name in result.removed:
        lines += [f"{name}: in the baseline but no longer in the config (removed; not a failure)", ""]
    if result.baseline_path and not result.baseline_found:
        lines.append(f"No baseline at {result.baseline_path}: relative limits were not checked "
                     "(write one with dsrewrite check --update-baseline).")
    lines.append(f"dsrewrite check: {_headline(result)}.")
    return "\n".join(lines) + "\n"


WHY_HEADERS = ["layer", "type", "change", "Δ params", "Δ MACs"]
BLOCK_HEADERS = ["block", "type", "change", "Δ params", "Δ MACs"]


def _why_rows(rows: list[dict]) -> list[list]:
    return [[r["name"], r.get("type", ""), r["change"], _signed(r["delta_params"]), _signed(r["delta_macs"])]
            for r in rows]


def _why_lines(b: BudgetResult) -> list[str]:
    rows = layer_changes(b)
    if not b.baseline_entry:
        return ["      why: no baseline to compare layers with"]
    if not rows:
        return ["      why: no layer changed since the baseline"]
    out = []
    blocks = block_changes(b)
    if blocks:
        grew = blocks[0]
        out.append(f"      {grew['name']} ({grew['type']}) changed most: {_signed(grew['delta_params'])} params, "
                   f"{_signed(grew['delta_macs'])} MACs")
        table = tabulate(_why_rows(blocks), headers=BLOCK_HEADERS, tablefmt="simple", disable_numparse=True)
        out += ["      blocks that changed most since the baseline:"] + ["      " + line for line in table.splitlines()]
    elif "blocks" not in b.baseline_entry:
        out.append("      (the baseline has no block records; refresh it with --update-baseline to see blocks)")
    table = tabulate(_why_rows(rows), headers=WHY_HEADERS, tablefmt="simple", disable_numparse=True)
    return out + ["      layers that changed most since the baseline:"] + ["      " + line for line in
                                                                             table.splitlines()]


def _signed(v: int) -> str:
    return ("+" if v >= 0 else "-") + format_count(abs(v))


# ------------------------------------------------------------------------------------ json


def to_dict(result: CheckResult, why: bool = False) -> dict:
    """The versioned JSON document."""
    budgets = []
    for b in result.budgets:
        entry = {"name": b.budget.name, "model": b.budget.model, "state": b.state,
                 "status": "error" if b.state == "error" else "fail" if b.failed else "warn" if b.warned else "pass",
                 "input_shapes": b.measurement.input_shapes if b.measurement else None,
                 "metrics": {m.metric: {"value": m.value, "limit": m.limit, "max_increase_pct":
                                        None if m.max_increase is None else 100 * m.max_increase,
                                        "baseline": m.baseline, "delta": m.delta, "delta_pct": m.delta_pct,
                                        "level": m.level, "status": m.status, "message": m.message}
                             for m in b.metrics}}
        if b.state == "error":
            entry["error"] = b.error
        if b.measurement and b.measurement.latency_fingerprint:
            entry["latency_fingerprint"] = b.measurement.latency_fingerprint
        if why:
            entry["why"] = layer_changes(b)
            entry["why_blocks"] = block_changes(b)
        budgets.append(entry)
    return {"schema_version": REPORT_VERSION, "kind": "dsrewrite-check", "summary": _headline(result),
            "config": result.config.source, "baseline": result.baseline_path,
            "baseline_found": result.baseline_found, "budgets": budgets, "removed_budgets": result.removed}


def _json(result: CheckResult, why: bool) -> str:
    return json.dumps(to_dict(result, why), indent=2) + "\n"


# -------------------------------------------------------------------------------- markdown


def _markdown(result: CheckResult, why: bool) -> str:
    bad = result.errors or any(b.failed for b in result.budgets)
    icon = "❌" if bad else "⚠️" if any(b.warned for b in result.budgets) else "✅"
    out = [MARKER, f"### {icon} dsrewrite check: {_headline(result)}", ""]
    headers = ["budget", "metric", "value", "limit", "baseline", "change", "status"]
    flagged, passing = [], []
    for b in result.budgets:
        if b.state == "error":
            flagged.append([b.budget.name, "-", "-", "-", "-", "-", f"❌ {b.error}"])
            continue
        for m in b.metrics:
            row = [b.budget.name + (" (new)" if b.state == "added" else ""), METRICS[m.metric].label,
                   format_value(m.metric, m.value, m.style), _limit_text(m),
                   format_value(m.metric, m.baseline, m.style), _change(m),
                   {"pass": "✅ pass", "fail": "❌ over limit", "warn": "⚠️ over (warning)",
                    "not-comparable": "➖ not comparable"}[m.status]]
            (flagged if m.status in ("fail", "warn") else passing).append(row)
    if flagged:
        out += [_md_table(headers, flagged), ""]
        for b in result.budgets:
            if (b.failed or b.warned) and b.budget.message:
                out.append(f"> **{b.budget.name}**: {b.budget.message}")
        out.append("")
    if passing:
        out += [f"<details><summary>{len(passing)} metric(s) within budget</summary>", "",
                _md_table(headers, passing), "", "</details>", ""]
    if why:
        for b in result.budgets:
            rows = layer_changes(b)
            blocks = block_changes(b)
            if blocks:
                out += [f"<details><summary>Blocks that changed most in {b.budget.name}</summary>", "",
                        _md_table(BLOCK_HEADERS, _why_rows(blocks)), "", "</details>", ""]
            if rows:
                out += [f"<details><summary>Layers that changed most in {b.budget.name}</summary>", "",
                        _md_table(WHY_HEADERS, _why_rows(rows)), "", "</details>", ""]
    if result.removed:
        out.append("Removed since the baseline: " + ", ".join(f"`{n}`" for n in result.removed))
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------- github


def _github(result: CheckResult, why: bool) -> str:
    """GitHub Actions workflow commands: one annotation per exceeded limit, at the model's definition."""
    lines = []
    for b in result.budgets:
        where = _location(b)
        if b.state == "error":
            lines.append(f"::error{where}title=dsrewrite check {b.budget.name}::{_escape(b.error)}")
            continue
        for m in b.metrics:
            if m.status in ("fail", "warn"):
                kind = "error" if m.status == "fail" else "warning"
                extra = f" {b.budget.message}" if b.budget.message else ""
                lines.append(f"::{kind}{where}title=dsrewrite check {b.budget.name}::"
                             f"{_escape(m.message + '.' + extra)}")
    lines.append(f"::notice title=dsrewrite check::{_escape(_headline(result))}")
    return "\n".join(lines) + "\n"


def _location(b: BudgetResult) -> str:
    m = b.measurement
    if m is None or not m.source_file:
        return " "
    path = os.path.relpath(m.source_file) if os.path.isabs(m.source_file) else m.source_file
    if path.startswith(".."):
        return " "
    line = f",line={m.source_line}" if m.source_line else ""
    return f" file={path}{line},"


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


# ----------------------------------------------------------------------------------- junit


def _junit(result: CheckResult, why: bool) -> str:
    cases = []
    failures = errors = 0
    for b in result.budgets:
        if b.state == "error":
            errors += 1
            cases.append(f'    <testcase classname={quoteattr("dsrewrite.check." + b.budget.name)} name="load">\n'
                         f'      <error message={quoteattr(b.error)}/>\n    </testcase>')
            continue
        for m in b.metrics:
            head = f'    <testcase classname={quoteattr("dsrewrite.check." + b.budget.name)} name={quoteattr(m.metric)}>'
            detail = (f"value {format_value(m.metric, m.value, m.style)}; limit {_limit_text(m)}; "
                      f"baseline {format_value(m.metric, m.baseline, m.style)}; change {_change(m)}")
            if m.status == "fail":
                failures += 1
                body = f"      <failure message={quoteattr(m.message)}>{escape(detail)}</failure>"
            elif m.status == "not-comparable":
                body = f"      <skipped message={quoteattr(m.message)}/>"
            elif m.status == "warn":
                body = f"      <system-out>{escape('warning: ' + m.message + '; ' + detail)}</system-out>"
            else:
                body = f"      <system-out>{escape(detail)}</system-out>"
            cases.append(f"{head}\n{body}\n    </testcase>")
    tests = len(cases)
    return ("<?xml version='1.0' encoding='utf-8'?>\n<testsuites>\n"
            f'  <testsuite name="dsrewrite-check" tests="{tests}" failures="{failures}" errors="{errors}">\n'
            + "\n".join(cases) + "\n  </testsuite>\n</testsuites>\n")
