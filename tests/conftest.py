"""Shared helpers for the test suite."""

import os

# OpenMP worker threads spin while they wait for work. On a loaded machine (a shared CI runner)
# a spinning thread holds a core the thread it waits for needs: measured on 2 cores with two
# competing busy processes, three zoo conversion tests took 157 s with the default policy and
# 82 s with passive waiting (41 s vs 38 s idle). Set before torch (and its libgomp) loads;
# subprocesses (the torchrun tests) inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

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
