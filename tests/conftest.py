"""Shared helpers for the test suite."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "reference" / "torchvision_published.json"
LOCAL_REFERENCE = Path(__file__).resolve().parent / "data" / "torchvision_published.json"


def published_table() -> dict:
    """torchvision's published params/GFLOPS (a copy ships in tests/data for a lone checkout)."""
    path = REFERENCE if REFERENCE.exists() else LOCAL_REFERENCE
    return json.loads(path.read_text())["models"]


@pytest.fixture
def examples_dir() -> Path:
    return ROOT / "examples"
