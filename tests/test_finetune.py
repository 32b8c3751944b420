"""Calibration, distillation (single process and torchrun/DDP), rank choice, Fashion-MNIST reading."""

import copy
import gzip
import itertools
import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import dsrewrite
from dsrewrite.calibrate import agreement, relu_gates, split_held_out
from dsrewrite.cli import cli
from dsrewrite.data import read_idx
from dsrewrite.rank import _module_macs, choose_ranks, data_errors, energy_errors
from dsrewrite.report import render_conversion

HERE = Path(__file__).resolve().parent


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))


def batches(n=4, seed=1, size=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 12, 12, generator=g) for _ in range(n)]


AGGRESSIVE = ["replace.min_in_channels=0", "replace.min_mac_reduction=0"]


@pytest.mark.parametrize("overrides", [[], ["block.activation=relu6"], ["block.bn=false", "block.activation=none"]])
def test_calibration_reduces_the_output_error(overrides):
    model = small_cnn()
    result = dsrewrite.convert(model, (2, 3, 12, 12), "aggressive", AGGRESSIVE + overrides)
    data = batches()
    before = agreement(model, result.model, data)
    report = dsrewrite.calibrate(result.model, model, data)
    assert report.blocks == len(result.report.layers) == 3
    fit, held = split_held_out(data, 0.125)
    assert report.held_out_samples == sum(x.shape[0] for x in held) > 0
    assert report.samples == sum(x.shape[0] for x in fit)
    assert report.before["relative_error"] != pytest.approx(before["relative_error"]), "judged on held-out data"
    assert report.after["relative_error"] < 0.5 * report.before["relative_error"]
    held_out = agreement(model, result.model, batches(seed=9))
    assert held_out["relative_error"] < before["relative_error"], "it generalizes to unseen inputs"


def test_held_out_samples_are_not_fit_on():
    model = small_cnn()
    result = dsrewrite.convert(model, (2, 3, 12, 12), "aggressive", AGGRESSIVE)
    data = batches()
    fit, held = split_held_out(data, 0.25)
    assert sum(x.shape[0] for x in held) == round(0.25 * sum(x.shape[0] for x in data))
    a, b = copy.deepcopy(result.model), copy.deepcopy(result.model)
    ra = dsrewrite.calibrate(a, model, data, held_out=0.25)
    rb = dsrewrite.calibrate(b, model, fit, held_out=0)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb), "the held-out samples changed the fit"
    assert ra.after == agreement(model, a, held) and rb.held_out_samples == 0
    one = [torch.zeros(1, 3)]
    assert split_held_out(one, 0.5)[1] == [], "a single sample is never held out"


def test_calibration_at_full_rank_is_exact_and_sets_bn_statistics():
    model = small_cnn()
    result = dsrewrite.convert(model, (2, 3, 12, 12), "aggressive",
                               AGGRESSIVE + ["block.depth_multiplier=9", "block.activation=relu"])
    data = batches(n=6)
    report = dsrewrite.calibrate(result.model, model, data, ridge=1e-9, held_out=0)
    assert report.after["relative_error"] < 1e-4 and report.after["top1_agreement"] == 1.0
    block = result.model[3]
    with torch.no_grad():
        x = torch.cat([nn.Sequential(*list(result.model)[:3]).eval()(b) for b in data])
        z = block.depthwise(x)
    assert torch.allclose(block.bn.running_mean, z.mean((0, 2, 3)), atol=1e-4)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_joint_depthwise_refit_is_never_worse_than_the_pointwise_refit(padding_mode):
    torch.manual_seed(3)
    # correlated input channels: a mixing 1×1 conv in front, so the data-aware filters differ from the SVD's
    model = nn.Sequential(nn.Conv2d(3, 12, 1), nn.Conv2d(12, 24, 3, padding=1, padding_mode=padding_mode))
    result = dsrewrite.convert(model, (2, 3, 12, 12), "aggressive", AGGRESSIVE + ["block.activation=none"])
    data = batches(n=6)
    errors = {}
    for joint in (False, True):
        converted = copy.deepcopy(result.model)
        report = dsrewrite.calibrate(converted, model, data, refit_depthwise=joint)
        assert report.depthwise_refit == (1 if joint else 0)
        errors[joint] = report.after["relative_error"]
    assert errors[True] < 0.9 * errors[False]


@pytest.mark.parametrize("c_in,rank,taps", [(5, 1, 9), (4, 3, 9), (3, 2, 1), (6, 4, 25)])
def test_the_joint_fits_depthwise_system_acts_as_the_dense_matrix(c_in, rank, taps):
    """The depthwise half-step's matrix A[i, j]·Σ[o(i), k, o(j), l] (mid channel i reads input channel
    o(i) = i // r), applied through Σ (formed only at r = 1): the same products, diagonal and CG solution as
    the dense matrix."""
    from dsrewrite.calibrate import _conjugate_gradient, _depthwise_normal

    torch.manual_seed(0)
    x = torch.randn(4 * c_in * taps, c_in * taps, dtype=torch.float64)
    s4 = (x.T @ x).reshape(c_in, taps, c_in, taps)
    mid = c_in * rank
    owner = torch.arange(mid) // rank
    p = torch.randn(7, mid, dtype=torch.float64)
    a = p.T @ p + 0.1 * torch.eye(mid, dtype=torch.float64)
    dense = (a[:, None, :, None] * s4[owner][:, :, owner]).reshape(mid * taps, mid * taps)
    apply, diagonal = _depthwise_normal(s4, a, rank)
    v = torch.randn(mid * taps, dtype=torch.float64)
    assert torch.allclose(apply(v), dense @ v, rtol=1e-10, atol=1e-9)
    assert torch.allclose(diagonal, dense.diagonal())
    b = dense @ torch.randn(mid * taps, dtype=torch.float64)
    solved = _conjugate_gradient(apply, diagonal, b, torch.zeros_like(b), iterations=500, tolerance=1e-12)
    assert torch.allclose(solved, torch.linalg.solve(dense, b), rtol=1e-6, atol=1e-6)


def _errors_by_relu_awareness(model):
    """{relu_aware: the calibrated model's output relative error} for one conversion of ``model``."""
    result = dsrewrite.convert(model, (2, 3, 12, 12), "aggressive", AGGRESSIVE + ["block.activation=none"])
    errors = {}
    for aware in (False, True):
        converted = copy.deepcopy(result.model)
        errors[aware] = dsrewrite.calibrate(converted, model, batches(n=6), relu_aware=aware).after["relative_error"]
    return errors


class Gated(nn.Module):
    """A conv → BN → ReLU (module, functional or none) between a mixing conv and a head conv."""

    def __init__(self, relu: str):
        super().__init__()
        torch.manual_seed(5)
        self.pre, self.conv = nn.Conv2d(3, 12, 1), nn.Conv2d(12, 24, 3, padding=1)
        self.bn, self.relu, self.tail = nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 8, 1)
        self.kind = relu
        with torch.no_grad():  # about half of the units cut off
            self.bn.running_var.fill_(0.5)
            self.bn.weight.uniform_(0.5, 2.0)
            self.bn.bias.uniform_(-0.5, 0.1)

    def forward(self, x):
        z = self.bn(self.conv(self.pre(x)))
        if self.kind == "module":
            z = self.relu(z)
        elif self.kind == "functional":
            z = torch.nn.functional.relu(z)
        elif self.kind == "method":
            z = z.relu()
        elif self.kind == "shared":  # the BN output is read twice: no gate
            z = self.relu(z) + z
        return self.tail(z)


@pytest.mark.parametrize("kind, gated", [("module", True), ("functional", True), ("method", True), ("none", False),
                                         ("shared", False)])
def test_relu_aware_calibration_behind_bn_relu(kind, gated):
    model = Gated(kind).eval()
    assert set(relu_gates(model, ["conv", "pre"])) == ({"conv"} if gated else set())
    errors = _errors_by_relu_awareness(model)
    if gated:
        assert errors[True] < 0.95 * errors[False], "refitting to what the ReLU lets through lowers the error"
    else:
        assert errors[True] == pytest.approx(errors[False]), "no gate, the same plain least squares"


class Residual(nn.Module):
    """Two basic-block-like stages: relu(bn(conv(h)) + h) after a replaced conv → BN → ReLU."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.pre = nn.Conv2d(3, 12, 1)
        self.conv0, self.bn0 = nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.conv1, self.bn1 = nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 4, 1)
        with torch.no_grad():
            for bn in (self.bn0, self.bn1):
                bn.running_var.fill_(0.5)
                bn.bias.uniform_(-0.5, 0.1)

    def forward(self, x):
        h = torch.relu(self.bn0(self.conv0(self.pre(x))))
        return self.head(torch.relu(self.bn1(self.conv1(h)) + h))


def test_residual_aware_calibration_compensates_the_shortcut():
    model = Residual().eval()
    gates = relu_gates(model, ["conv0", "conv1"])
    assert gates["conv0"].other is None and gates["conv1"].other == "relu", "the shortcut operand is conv0's ReLU"
    errors = _errors_by_relu_awareness(model)
    assert errors[True] < 0.95 * errors[False], "the conv makes up the error its shortcut brings"


def test_convert_with_calibration_reports_before_and_after():
    model = small_cnn()
    result = dsrewrite.convert(model, (2, 3, 12, 12), "aggressive", AGGRESSIVE, calibration=[(b, None) for b in
                                                                                              batches()])
    cal = result.report.calibration
    assert cal["samples"] == 28 and cal["held_out_samples"] == 4, "1/8 of the 32 samples are held out"
    assert cal["after"]["relative_error"] < cal["before"]["relative_error"]
    assert set(cal["after"]) == {"relative_error", "cosine", "top1_agreement"}
    # one fidelity headline, and it is the held-out one, not the random-input number
    text = render_conversion(result.report, result.plan, "markdown")
    summary = text.split("## Summary")[1].split("##")[0]
    assert f"Output fidelity on 4 held-out calibration samples (not used in the fit): relative error " \
           f"{cal['after']['relative_error']:.3g}" in summary
    assert "random" not in summary
    assert "fast mode (each fit on a sample of output positions)" in text
    assert f"{cal['blocks']} of {cal['blocks']} blocks fit from one streamed pass of both models" in text
    assert "## Output on seeded random inputs (not your data; see Calibration)" in text


def test_distill_improves_the_student_and_never_touches_the_teacher():
    teacher = small_cnn()
    student = dsrewrite.convert(teacher, (2, 3, 12, 12), "aggressive", AGGRESSIVE).model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = [p.requires_grad for p in teacher.parameters()]
    data = [(x, torch.randint(0, 5, (x.shape[0],))) for x in batches(n=8)]

    def divergence():
        with torch.no_grad():
            s, t = student.eval()(data[0][0]) / 4, teacher.eval()(data[0][0]) / 4
            return float(nn.functional.kl_div(s.log_softmax(1), t.log_softmax(1), log_target=True,
                                              reduction="batchmean"))

    start = divergence()
    teacher.train()
    history = dsrewrite.distill(student, teacher, data, epochs=3, lr=3e-3, alpha=1.0, eval_loader=data,
                                feature_loss=0.1, device="cpu")
    assert teacher.training and [p.requires_grad for p in teacher.parameters()] == flags, "teacher restored"
    assert [h.epoch for h in history] == [1, 2, 3] and history[-1].steps == 24
    assert history[-1].loss < history[0].loss and 0.0 <= history[-1].accuracy <= 1.0
    assert divergence() < start
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_distill_with_own_optimizer_unlabeled_batches_and_amp():
    teacher = small_cnn()
    student = dsrewrite.convert(teacher, (2, 3, 12, 12), "aggressive", AGGRESSIVE).model
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    history = dsrewrite.distill(student, teacher, batches(n=2, size=4), optimizer=opt, amp=True, device="cpu",
                                max_steps=1)
    assert history[0].steps == 1 and history[0].accuracy is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distill_under_torchrun_with_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(HERE / "ddp_distill_job.py"), str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**__import__("os").environ,
                                                                                "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["teacher_unchanged"] for r in results)
    assert results[0]["digest"] == pytest.approx(results[1]["digest"], rel=1e-9), "DDP keeps the ranks in sync"
    metrics = [[(h["epoch"], h["steps"], h["loss"], h["accuracy"]) for h in r["history"]] for r in results]
    assert metrics[0] == metrics[1], "loss and accuracy are averaged across ranks (wall time is per rank)"
    assert len(metrics[0]) == 2 and metrics[0][-1][1] == 8, "64 samples / 2 ranks / batch 8, two epochs"


def test_rank_choice_meets_a_mac_target_and_an_error_bound():
    model = small_cnn()
    analysis = dsrewrite.analyze(model, (2, 3, 12, 12))
    plan = dsrewrite.plan_model(model, (2, 3, 12, 12), "aggressive", AGGRESSIVE, analysis=analysis)
    total = analysis.profile.macs
    energy = energy_errors(model, plan)
    data = data_errors(model, plan, batches())
    for errors in (energy, data):
        for name, by_rank in errors.items():
            values = [by_rank[r] for r in sorted(by_rank)]
            assert values == sorted(values, reverse=True), "more rank, less error"
    loose = choose_ranks(plan, data, total, target_macs=0.9, judged_by="data")
    tight = choose_ranks(plan, data, total, target_macs=0.5, judged_by="data")
    for p, target in ((loose, 0.9), (tight, 0.5)):
        after = total - sum(d.macs_before - d.macs_after for d in p.replacements)
        assert after <= target * total
    assert _summed_error(loose, data) < _summed_error(tight, data), "a looser budget buys less error"
    # the allocation is the best one: brute force over every assignment (each rank, or keeping the dense conv)
    sites = {}
    for d in plan.replacements:
        sites.setdefault(d.module_name, []).append(d)
    names = list(sites)
    dense = {n: sum(d.macs_before for d in ds) for n, ds in sites.items()}
    fixed = total - sum(dense.values())
    for target, chosen in ((0.9, loose), (0.5, tight)):
        best = min(
            sum(data[n][r] for n, r in zip(names, combo) if r is not None)
            for combo in itertools.product(*[[*data[n], None] for n in names])
            if fixed + sum(dense[n] if r is None else _module_macs(sites[n], r, plan) for n, r in zip(names, combo))
            <= target * total)
        assert _summed_error(chosen, data) == pytest.approx(best, abs=1e-9)
    assert "depth multiplier" in tight.replacements[0].reason and "output error after refit" in tight.replacements[0].reason
    bounded = choose_ranks(plan, energy, total, max_error=0.3)
    for d in bounded.replacements:
        assert energy[d.module_name][d.depth_multiplier] <= 0.3
        smaller = [r for r in energy[d.module_name] if r < d.depth_multiplier]
        assert all(energy[d.module_name][r] > 0.3 for r in smaller), "the smallest rank within the bound"
    unreachable = choose_ranks(plan, energy, total, target_macs=0.01)
    assert any("out of reach" in n for n in unreachable.notes)


def _summed_error(plan, errors):
    """Summed per-layer error of a rank assignment (a kept dense conv counts 0)."""
    return sum(errors[d.module_name][d.depth_multiplier] for d in plan.replacements)


def test_cli_calibrate_and_target(tmp_path):
    data = tmp_path / "calib.py"
    data.write_text("import torch\ndef batches():\n    return [torch.randn(4, 3, 32, 32) for _ in range(3)]\n")
    report = tmp_path / "r.json"
    r = CliRunner().invoke(cli, ["convert", "examples/resnet.py", "--input-shape", "1,3,32,32", "--rules", "finetune",
                                 "--calibrate", f"{data}:batches", "--target-macs", "0.4", "--report", str(report),
                                 "--calibration-mode", "thorough", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    assert doc["calibration"]["samples"] == 10 and doc["calibration"]["held_out_samples"] == 2
    cal = doc["calibration"]
    assert cal["mode"] == "thorough" and cal["streamed_blocks"] == cal["blocks"] > 0 and cal["seconds"] > 0
    assert doc["findings"][-1]["text"].startswith("Output fidelity on 2 held-out calibration samples")
    assert doc["after"]["macs"] <= 0.4 * doc["before"]["macs"]
    assert cal["memory_limit"] == 2 ** 30 and cal["spilled_bytes"] == 0 < cal["activations_peak"]
    r = CliRunner().invoke(cli, ["convert", "examples/resnet.py", "--input-shape", "1,3,32,32", "--rules", "finetune",
                                 "--calibrate", f"{data}:batches", "--calibration-memory", "64KiB",
                                 "--report", str(report), "-q"])
    assert r.exit_code == 0, r.output
    cal = json.loads(report.read_text())["calibration"]
    assert cal["memory_limit"] == 65536 and cal["activations_peak"] <= 65536 and cal["spilled_bytes"] > 0
    for args, words in [(["--calibrate", "nope.py:x"], "no such file"),
                        (["--calibrate", f"{data}:missing"], "defines no 'missing'"),
                        (["--target-macs", "0.5", "--max-error", "0.1"], "goes alone"),
                        (["--target-macs", "3"], "between 0 and 1"),
                        (["--calibration-memory", "lots"], "--calibration-memory"),
                        (["--calibration-memory", "-1MiB"], "takes a size such as 512MiB")]:
        r = CliRunner().invoke(cli, ["convert", "examples/resnet.py", "--input-shape", "1,3,32,32", *args, "-q"])
        assert r.exit_code == 2 and words in r.output, (args, r.output)


def test_read_idx(tmp_path):
    images = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 3, 4, 5) + images.numpy().tobytes())
    assert torch.equal(read_idx(path), images)


FT_MODEL = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(32, 5))

    def forward(self, x):
        return self.body(x)

INPUT_SHAPE = (1, 3, 12, 12)
"""
FT_DATA = """
import torch
g = torch.Generator().manual_seed(3)
X, Y = torch.randn(48, 3, 12, 12, generator=g), torch.randint(0, 5, (48,), generator=g)
def train():
    return [(X[i:i + 8], Y[i:i + 8]) for i in range(0, 48, 8)]
def unlabeled():
    return [X[i:i + 8] for i in range(0, 48, 8)]
def one_shot():
    return (x for x in unlabeled())
def wrong_channels():
    return [torch.randn(4, 1, 12, 12)]
def float_labels():
    return [(X[:8], torch.randn(8))]
TENSOR = X
"""


_FT_FILES = itertools.count()


@pytest.fixture
def finetune_files(tmp_path, monkeypatch):
    """A model file (its name returned), its converted student (student.pt) and a data file, in a fresh folder.

    The model file gets a name of its own per test: a pickle names the module its class came
    from, and a stem already imported from another folder in this process would not do.
    """
    monkeypatch.chdir(tmp_path)
    stem = f"ftnet{next(_FT_FILES)}"
    (tmp_path / f"{stem}.py").write_text(FT_MODEL)
    (tmp_path / "ftdata.py").write_text(FT_DATA)
    r = CliRunner().invoke(cli, ["convert", f"{stem}.py", "--rules", "aggressive", "--set", "replace.min_in_channels=0",
                                 "--set", "replace.min_mac_reduction=0", "-o", "student.pt", "-q"])
    assert r.exit_code == 0, r.output
    return f"{stem}.py"


def test_cli_finetune_distills_and_saves(finetune_files):
    student = torch.load("student.pt", weights_only=False)
    r = CliRunner().invoke(cli, ["finetune", "student.pt", finetune_files, "--data", "ftdata.py:train", "--eval",
                                 "ftdata.py:train", "--epochs", "3", "--lr", "5e-3", "--trust-pickle", "-o", "tuned.pt",
                                 "--state-dict", "tuned.pth", "--history", "h.json", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(Path("h.json").read_text())
    assert doc["world_size"] == 1 and doc["accuracy_before"] is not None
    assert [e["steps"] for e in doc["epochs"]] == [6, 12, 18]
    losses = [e["loss"] for e in doc["epochs"]]
    assert losses[-1] < losses[0], losses
    tuned = torch.load("tuned.pt", weights_only=False)
    assert any(isinstance(m, dsrewrite.DepthwiseSeparableConv2d) for m in tuned.modules())
    assert not all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), tuned.state_dict().values()))
    state = torch.load("tuned.pth", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in tuned.state_dict().items())
    assert "epoch" in r.output and "accuracy" in r.output
    # unlabeled batches: pure distillation
    r = CliRunner().invoke(cli, ["finetune", "student.pt", finetune_files, "--data", "ftdata.py:unlabeled",
                                 "--trust-pickle", "-o", "tuned2.pt", "--max-steps", "2", "-q"])
    assert r.exit_code == 0 and Path("tuned2.pt").exists(), r.output


@pytest.mark.parametrize("args, words", [
    (["--data", "ftdata.py:wrong_channels"], "fails in the teacher"),
    (["--data", "ftdata.py:one_shot", "--epochs", "2"], "one-shot iterator"),
    (["--data", "ftdata.py:TENSOR"], "expected an iterable of batches"),
    (["--data", "ftdata.py:float_labels"], "labels must be one class index per input"),
    (["--data", "ftdata.py:train", "--eval", "ftdata.py:unlabeled"], "needs (inputs, labels)"),
    (["--data", "nope.py:train"], "no such file"),
    (["--data", "ftdata.py:train", "--alpha", "1.5"], "between 0 and 1"),
    (["--data", "ftdata.py:train", "--epochs", "0"], "at least 1"),
    (["--data", "ftdata.py:train", "-o", "student.pt"], "refusing to overwrite"),
])
def test_cli_finetune_bad_input(finetune_files, args, words):
    argv = ["finetune", "student.pt", finetune_files, "--trust-pickle", "-q", *args]
    if "-o" not in args:
        argv += ["-o", "tuned.pt"]
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == 2 and words in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, "one line, no traceback"
    assert not Path("tuned.pt").exists()


def test_cli_finetune_needs_trust_for_the_pickled_student(finetune_files):
    r = CliRunner().invoke(cli, ["finetune", "student.pt", finetune_files, "--data", "ftdata.py:train", "-o", "t.pt"])
    assert r.exit_code == 2 and "--trust-pickle" in r.output and not Path("t.pt").exists()


def test_cli_finetune_under_torchrun(finetune_files):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "dsrewrite.cli", "finetune", "student.pt", finetune_files,
           "--data", "ftdata.py:train", "--eval", "ftdata.py:train", "--device", "cpu", "--trust-pickle",
           "-o", "tuned.pt", "--history", "h.json", "-q"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(Path("h.json").read_text())
    assert doc["world_size"] == 2
    assert doc["epochs"][0]["steps"] == 3, "six batches split across two ranks"
    assert torch.load("tuned.pt", weights_only=False) is not None


def test_finetune_threads(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    r = CliRunner().invoke(cli, ["finetune", str(tmp_path / "missing.pt"), "examples/resnet.py", "--data", "x.py:d",
                                 "-o", str(tmp_path / "o.pt"), "--threads", "1"])
    assert r.exit_code == 2 and calls == [1], "threads are set before any work"
    r = CliRunner().invoke(cli, ["finetune", "s.pt", "examples/resnet.py", "--data", "x.py:d", "-o", "o.pt",
                                 "--threads", "0"])
    assert r.exit_code == 2 and "--threads must be at least 1" in r.output


class WindowedNet(nn.Module):
    """A conv inside shape control flow (generic fx leaves it a leaf) between two traceable convs."""

    class Windowed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)

        def forward(self, x):
            h, w = x.shape[-2:]
            if h % 8:
                x = nn.functional.pad(x, (0, (-w) % 8, 0, (-h) % 8))
            return torch.relu(self.bn(self.conv(x)))[..., :h, :w]

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.stem, self.middle = nn.Conv2d(3, 16, 3, padding=1), self.Windowed()
        self.head = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))

    def forward(self, x):
        return self.head(self.middle(torch.relu(self.stem(x))))


def _blockwise(monkeypatch):
    """Calibration with the streamed pass turned off: every block gets its data by running both models up to it."""
    from dsrewrite.calibrate import _Stream

    monkeypatch.setattr(_Stream, "build", classmethod(lambda cls, *a: None))


@pytest.mark.parametrize("make, overrides, streamed", [
    (small_cnn, [], 3),
    (lambda: Residual().eval(), ["block.activation=none"], 2),  # a residual gate: the shortcut streamed too
    (WindowedNet, [], 1),  # the windowed conv is not in the calibration graph: fitted block by block
    (small_cnn, ["block.family=bottleneck"], 3),
])
def test_streamed_calibration_fits_what_block_by_block_fits(monkeypatch, make, overrides, streamed):
    model = make().eval()
    result = dsrewrite.convert(model, (2, 3, 12, 12), "aggressive", AGGRESSIVE + overrides)
    data = batches(n=5)
    a, b = copy.deepcopy(result.model), copy.deepcopy(result.model)
    report = dsrewrite.calibrate(a, model, data)
    assert report.streamed_blocks == streamed and report.blocks == len(result.report.layers)
    assert report.after["relative_error"] < report.before["relative_error"]
    with monkeypatch.context() as m:
        _blockwise(m)
        assert dsrewrite.calibrate(b, model, data).streamed_blocks == 0
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-6), name


class InPlaceShared(nn.Module):
    """A value read again after an in-place op changed it (eager semantics: the changed value)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv0, self.conv1, self.conv2 = (nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 12, 3, padding=1),
                                              nn.Conv2d(12, 12, 3, padding=1))

    def forward(self, x):
        a = self.conv0(x)
        b = self.conv1(a)
        a.relu_()
        return self.conv2(a + b).mean((2, 3))


@pytest.mark.parametrize("make, overrides, width", [
    (small_cnn, [], None),
    (lambda: Residual().eval(), ["block.activation=none"], None),  # the residual operand read back too
    (small_cnn, ["block.family=bottleneck"], None),
    (InPlaceShared, [], None),  # the value an in-place op changes stays in memory
    (small_cnn, ["replace.min_in_channels=100000"], 0.5),  # the width refit (reconstruct)
])
def test_calibration_bounded_in_memory_fits_exactly_what_unbounded_fits(monkeypatch, tmp_path, make, overrides,
                                                                         width):
    """Activations beyond the memory limit go to disk and come back bit for bit: the same weights; the
    spill directory is gone afterwards."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = make().eval()
    data = batches(n=5)
    results = {memory: dsrewrite.convert(model, (2, 3, 12, 12), "aggressive", AGGRESSIVE + overrides, width=width,
                                         calibration=data, calibration_memory=memory)
               for memory in (None, 0, 2 ** 30)}
    reports = {m: r.report.reconstruction if width else r.report.calibration for m, r in results.items()}
    assert reports[0]["spilled_bytes"] > 0 and reports[None]["spilled_bytes"] == reports[2 ** 30]["spilled_bytes"] == 0
    assert reports[None]["activations_peak"] == reports[2 ** 30]["activations_peak"] > 0
    assert reports[0]["memory_limit"] == 0 and reports[None]["memory_limit"] is None
    assert reports[0]["after"] == reports[None]["after"]
    for m in (0, 2 ** 30):
        for (name, a), b in zip(results[None].model.state_dict().items(), results[m].model.state_dict().values()):
            assert torch.equal(a, b), (m, name)
    assert list(tmp_path.iterdir()) == [], "the spill directory is removed"
    text = render_conversion(results[0].report, results[0].plan, "table")
    assert "written to a temporary directory (removed)" in text and "limit 0 B" in text


def test_spill_directory_is_removed_when_calibration_fails(monkeypatch, tmp_path):
    import importlib
    import tempfile

    cal = importlib.import_module("dsrewrite.calibrate")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = small_cnn()
    converted = dsrewrite.convert(model, (2, 3, 12, 12), "aggressive", AGGRESSIVE).model
    seen = []

    def fail(block, layer):
        seen.append([p.name for p in tmp_path.iterdir()])
        raise RuntimeError("fit failed")

    monkeypatch.setattr(cal, "_reset_bn", fail)
    with pytest.raises(RuntimeError, match="fit failed"):
        dsrewrite.calibrate(converted, model, batches(), memory=0)
    assert seen and seen[0], "activations were on disk while fitting"
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_calibrating_is_one_clear_error_and_leaves_nothing(monkeypatch, tmp_path):
    import tempfile

    from dsrewrite.errors import UsageError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = small_cnn()
    converted = dsrewrite.convert(model, (2, 3, 12, 12), "aggressive", AGGRESSIVE).model
    calls = []

    def save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    real_save = torch.save
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UsageError, match="No space left on device.*TMPDIR.*--calibration-memory"):
        dsrewrite.calibrate(converted, model, batches(), memory=0)
    assert list(tmp_path.iterdir()) == [], "nothing half-written is left"


def test_calibration_runs_each_batch_through_the_model_once():
    """Streamed: the original's first layer sees each fit batch once, however many blocks follow it."""
    model = small_cnn()
    result = dsrewrite.convert(model, (2, 3, 12, 12), "aggressive", AGGRESSIVE)
    data = batches(n=8)
    fit, held = split_held_out(data, 0.125)
    calls = []
    handle = model[0].register_forward_hook(lambda *a: calls.append(1))
    report = dsrewrite.calibrate(result.model, model, data)
    handle.remove()
    assert report.blocks == 3 and report.streamed_blocks == 3
    # the fit batches once; held-out batches for fidelity before and after; one batch through the graph and
    # the model, checking one against the other; one forward for the consumer BN scales
    assert len(calls) == len(fit) + 2 * len(held) + 3


@pytest.mark.parametrize("kernel, stride, dilation, padding, mode", [
    (3, 1, 1, 1, "zeros"), (3, 2, 1, 1, "reflect"), (5, 1, 2, 4, "zeros"), ((3, 1), (2, 1), 1, (1, 0), "zeros")])
def test_sampled_patches_are_the_unfolded_rows(kernel, stride, dilation, padding, mode):
    from dsrewrite.calibrate import _conv_patches, _flat

    conv = nn.Conv2d(4, 6, kernel, stride=stride, dilation=dilation, padding=padding, padding_mode=mode)
    x = torch.randn(3, 4, 11, 9)
    every = _conv_patches(conv, x)
    y = conv(x)
    assert every.shape[0] == y.shape[0] * y.shape[2] * y.shape[3]
    for n in (5, every.shape[0] // 2):  # gathered directly / unfolded, then picked
        keep = torch.randperm(every.shape[0])[:n].sort().values
        assert torch.equal(_conv_patches(conv, x, keep), every[keep])
        assert torch.equal(_flat(y, keep), _flat(y)[keep])


def test_fast_calibration_samples_positions_and_matches_thorough():
    model = small_cnn()
    result = dsrewrite.convert(model, (2, 3, 12, 12), "aggressive", AGGRESSIVE)
    data = batches(n=12, size=16)  # 192 images: 27,648 positions at 12², over 64 per unknown for 16·9 + 1
    fast, thorough = copy.deepcopy(result.model), copy.deepcopy(result.model)
    rf = dsrewrite.calibrate(fast, model, data)
    rt = dsrewrite.calibrate(thorough, model, data, thorough=True)
    assert (rf.mode, rt.mode) == ("fast", "thorough")
    assert any(not torch.equal(p, q) for p, q in zip(fast.state_dict().values(), thorough.state_dict().values()))
    assert rf.after["relative_error"] < 0.5 * rf.before["relative_error"]
    assert rf.after["relative_error"] <= 1.05 * rt.after["relative_error"] + 1e-4


class Twins(nn.Module):
    """Half of conv1's filters are the other half at half scale: after ReLU their outputs are too,
    so a width resize that drops them loses nothing a least-squares refit of conv2 cannot restore."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 5, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight[8:] = 0.5 * self.conv1.weight[:8]
            self.conv1.bias[8:] = 0.5 * self.conv1.bias[:8]

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def test_width_resize_refits_the_layers_that_lost_input_channels():
    model = Twins().eval()
    keep_all = ["replace.min_in_channels=100000"]
    result = dsrewrite.convert(model, (1, 3, 12, 12), "default", keep_all, width=0.5, calibration=batches())
    rec = result.report.reconstruction
    assert result.model.conv1.out_channels == 8 and rec["layers"] == ["conv2"] and rec["streamed_layers"] == 1
    assert rec["before"]["relative_error"] > 0.3 and rec["after"]["relative_error"] < 5e-3, rec
    assert agreement(model, result.model, batches(seed=9))["relative_error"] < 5e-3, "exact on unseen inputs too"
    plain = dsrewrite.convert(model, (1, 3, 12, 12), "default", keep_all, width=0.5)
    assert plain.report.reconstruction is None, "no data, no refit"
    text = render_conversion(result.report, result.plan, "markdown")
    assert "## Refit after the width resize (1 layers that lost input channels" in text
    summary = text.split("## Summary")[1].split("##")[0]
    assert f"relative error {rec['after']['relative_error']:.3g}" in summary, "the headline is the final model's"
    assert "after the width resize, before the refit" in summary


def test_width_resize_refit_through_residuals_and_the_classifier():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(4)]
    result = dsrewrite.convert(model, (1, 3, 32, 32), "default", ["replace.min_in_channels=100000"], width=0.5,
                               calibration=data)
    rec = result.report.reconstruction
    assert "fc" in rec["layers"] and "layer4.1.conv2" in rec["layers"] and rec["streamed_layers"] == len(rec["layers"])
    assert rec["after"]["relative_error"] < 0.5 * rec["before"]["relative_error"], rec
    assert result.model.fc.in_features == 256
