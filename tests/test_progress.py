"""Progress off a terminal: whole lines that keep moving, with totals that match the work."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from dsrewrite import progress as progress_mod
from dsrewrite.finetune import distill
from dsrewrite.progress import Progress, heartbeat


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_mod.time, "monotonic", fake)
    return fake


def test_lines_every_interval_and_heartbeats_inside_a_long_step(clock):
    out = io.StringIO()  # not a terminal
    with Progress("calibrating blocks", 12, stream=out, interval=5) as bar:
        clock.now = 1
        bar.advance("a")  # 1 s after the first line: no new line yet
        for i in range(6):  # one block that takes 60 s, reporting inside
            clock.now += 10
            heartbeat(f"pointwise refit: batch {i + 1}/6")
        bar.advance("b")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("calibrating blocks [") and "0/12" in lines[0]
    assert sum("pointwise refit" in line for line in lines) == 6, "a line at least every interval while work moves"
    assert lines[-1].startswith("calibrating blocks: stopped at 2/12")


def test_heartbeat_without_a_bar_is_harmless():
    heartbeat("nothing listens")


def test_quarter_steps_no_longer_hide_progress(clock):
    out = io.StringIO()
    with Progress("distilling", 469, stream=out, interval=5) as bar:
        for _ in range(100):
            clock.now += 0.2  # 20 s of work in all, 100 of 469 steps (the old bar printed at 117)
            bar.advance()
    text = out.getvalue()
    assert "25/469" in text and "100/469" in text


def test_finetune_progress_total_is_the_steps_that_run(clock, capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "LINE_INTERVAL", 0.0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    data = [torch.randn(2, 4) for _ in range(50)]
    distill(student, teacher, data, epochs=1, max_steps=7, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "7/7" in err and "/50" not in err


def test_unknown_length_counts_steps(clock):
    out = io.StringIO()
    with Progress("distilling", None, stream=out, interval=0) as bar:
        bar.advance()
        bar.advance()
    assert "2 done" in out.getvalue()


def test_calibration_reports_inside_each_block(monkeypatch, capsys):
    """A block's fit can take minutes: off a terminal, its batches and alternations show as lines."""
    import dsrewrite

    monkeypatch.setattr(progress_mod, "LINE_INTERVAL", 0.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))
    converted = dsrewrite.convert(model, (2, 3, 8, 8), "aggressive",
                                  ["keep.first_convs=0", "replace.min_in_channels=1", "replace.min_macs_share=0",
                                   "keep.first_depth_fraction=0"]).model
    dsrewrite.calibrate(converted, model, [torch.randn(4, 3, 8, 8) for _ in range(3)], progress=True)
    err = capsys.readouterr().err
    assert "calibrating blocks" in err and "pointwise refit: batch 1/" in err
