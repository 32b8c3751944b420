"""Golden files for the markdown and JSON reports.

Refresh them after an intended change with:
    DSREWRITE_UPDATE_GOLDEN=1 python -m pytest tests/test_report.py
"""

import json
import os
from pathlib import Path

import pytest

import dsrewrite
from dsrewrite.report import render_analysis

GOLDEN = Path(__file__).parent / "data" / "golden"
ROOT = Path(__file__).parent.parent


def _analysis():
    return dsrewrite.analyze_spec(str(ROOT / "examples" / "resnet.py"))


def _normalize(fmt: str, text: str) -> str:
    """Drop what legitimately differs between machines (tool versions, absolute paths)."""
    if fmt == "json":
        doc = json.loads(text)
        doc["tool"] = {"name": "dsrewrite"}
        doc["model"] = "examples/resnet.py"
        return json.dumps(doc, indent=2) + "\n"
    return text.replace(str(ROOT) + "/", "")


@pytest.mark.parametrize("fmt,suffix", [("markdown", "md"), ("json", "json")])
def test_golden(fmt, suffix):
    text = _normalize(fmt, render_analysis(_analysis(), fmt, max_rows=None))
    path = GOLDEN / f"resnet_analysis.{suffix}"
    if os.environ.get("DSREWRITE_UPDATE_GOLDEN"):
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"report changed; if intended, refresh: DSREWRITE_UPDATE_GOLDEN=1 pytest {__file__}"


def test_table_caps_rows_to_the_costliest():
    text = render_analysis(_analysis(), "table", max_rows=5)
    assert "Showing the 5 most expensive of 20 conv calls" in text
