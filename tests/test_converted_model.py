"""The converted model is an ordinary nn.Module: it trains, saves, loads, compiles, exports, wraps in DDP."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dsrewrite
from dsrewrite import export

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (2, 3, 32, 32)


@pytest.fixture(scope="module")
def converted():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import resnet
    finally:
        sys.path.remove(str(ROOT / "examples"))
    torch.manual_seed(0)
    result = dsrewrite.convert(resnet.build_model(num_classes=10), SHAPE)
    assert result.report.layers, "the example has convs to replace"
    return result.model


def test_trains_with_an_optimizer_and_bn_in_train_mode(converted):
    model = converted
    model.train()
    block = model.get_submodule(next(n for n, m in model.named_modules()
                                     if isinstance(m, dsrewrite.DepthwiseSeparableConv2d)))
    running = block.bn.running_mean.clone()
    weight = block.pointwise.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(*SHAPE), torch.tensor([1, 2])
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert not torch.equal(block.bn.running_mean, running), "inserted BN updates its statistics in train mode"
    assert not torch.equal(block.pointwise.weight, weight), "the optimizer moves the block's weights"
    assert losses[-1] < losses[0]


def test_saves_and_loads(converted, tmp_path):
    model = converted.eval()
    x = torch.randn(*SHAPE)
    export.save_model(model, tmp_path / "whole.pt")
    export.save_state_dict(model, tmp_path / "weights.pth")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    state = torch.load(tmp_path / "weights.pth", weights_only=True)
    assert set(state) == set(model.state_dict())


def test_exported_code_loads_without_dsrewrite(converted, tmp_path):
    x = torch.randn(*SHAPE)
    folder = tmp_path / "code"
    export.export_code(converted, (x,), folder, source="examples/resnet.py")
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(converted.eval()(x), tmp_path / "y.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["dsrewrite"] = None  # importing dsrewrite would fail
        sys.path.insert(0, {str(folder)!r})
        import torch
        from model import load_model
        model = load_model().eval()
        x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})
        with torch.no_grad():
            assert torch.allclose(model(x), y, atol=1e-5), "outputs differ"
        print("standalone ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "standalone ok" in run.stdout
    assert "class ConvertedModel(nn.Module)" in (folder / "model.py").read_text()


def test_torch_compile(converted):
    compiled = torch.compile(converted.train(), backend="aot_eager")
    out = compiled(torch.randn(*SHAPE))
    out.sum().backward()
    assert out.shape == (2, 10)


def test_onnx_export(converted, tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx is in the dev extra; install it to test ONNX export")
    path = tmp_path / "m.onnx"
    export.export_onnx(converted, (torch.randn(*SHAPE),), path)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert any(node.op_type == "Conv" for node in proto.graph.node)


def test_wraps_in_ddp(converted, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(converted.train())
        loss = ddp(torch.randn(*SHAPE)).sum()
        loss.backward()
        assert all(p.grad is not None for p in ddp.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()


class TwoInputsDictOut(nn.Module):
    """Named inputs and a dict output, as detection and multi-task models have."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Linear(64, 5)

    def forward(self, image, mask):
        features = self.body(image * mask)
        return {"logits": self.head(features.mean((2, 3))), "features": features}


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        batch = int(x.shape[0])  # a Python int: the exporter bakes the example's batch size into the graph
        return self.conv(x).reshape(batch, -1)


def test_onnx_deploys_with_names_and_a_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extra")
    torch.manual_seed(0)
    model = TwoInputsDictOut().eval()
    inputs = (torch.randn(1, 3, 16, 16), torch.ones(1, 1, 16, 16))
    converted = dsrewrite.convert(model, inputs, "aggressive").model
    path = tmp_path / "m.onnx"
    info = export.export_onnx(converted, inputs, path)
    assert info["checked"]["batch_sizes"] == [1, 2] and info["checked"]["max_relative_difference"] < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "mask"]
    assert [o.name for o in session.get_outputs()] == ["logits", "features"]
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 4):  # a batch size the export never saw
        image, mask = torch.randn(batch, 3, 16, 16), (torch.rand(batch, 1, 16, 16) > 0.5).float()
        want = converted.eval()(image, mask)
        logits, features = session.run(None, {"image": image.numpy(), "mask": mask.numpy()})
        assert torch.allclose(torch.from_numpy(logits), want["logits"], atol=1e-4)
        assert torch.allclose(torch.from_numpy(features), want["features"], atol=1e-4)


def test_onnx_static_batch_and_opset(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extra")
    onnx = pytest.importorskip("onnx", reason="onnx is in the dev extra")
    path = tmp_path / "fixed.onnx"
    with pytest.raises(dsrewrite.errors.UsageError, match="use --onnx-static"):
        export.export_onnx(FixedBatch(), (torch.randn(1, 3, 8, 8),), path)
    assert not path.exists() and not list(tmp_path.iterdir()), "nothing half-written"
    info = export.export_onnx(FixedBatch(), (torch.randn(1, 3, 8, 8),), path, dynamic_batch=False, opset=17)
    assert info["dynamic_axes"] == {} and info["checked"]["batch_sizes"] == [None]
    assert onnx.load(str(path)).opset_import[0].version == 17


def test_export_code_loads_in_eval_mode_with_the_state_dict_layout(converted, tmp_path):
    path = export.export_code(converted, (torch.randn(*SHAPE),), tmp_path / "code")
    spec = __import__("importlib.util").util.spec_from_file_location("exported_model", path)
    module = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(module)
    standalone = module.load_model()
    assert not standalone.training, "load_model() is for inference: eval mode"
    assert module.load_model(train=True).training
    assert list(standalone.state_dict()) == list(converted.state_dict()), "one key layout"
    state = tmp_path / "converted.pth"
    export.save_state_dict(converted, state)
    module.load_model(str(state))  # the --state-dict file loads as it is


def _dsrewrite(cwd, *args):
    """The command as the console script runs it: the current folder is NOT on sys.path (-I)."""
    return subprocess.run([sys.executable, "-I", "-c", "from dsrewrite.cli import main; main()", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_saved_models_reload_from_the_folder_and_from_elsewhere(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from dsrewrite.cli import cli

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "fnet.py").write_text((ROOT / "examples" / "resnet.py").read_text())
    # converting runs in this process (the file is named by path); loading the result runs as the console
    # script does, in a fresh process whose sys.path lacks the current folder
    monkeypatch.chdir(work)
    r = CliRunner().invoke(cli, ["convert", "fnet.py", "--input-shape", "1,3,32,32", "-o", "out.pt", "--report", "r.md"])
    assert r.exit_code == 0, r.output
    assert "needs dsrewrite and fnet (fnet.py) importable" in r.output
    # fnet.py is beside the file: found without PYTHONPATH, from another folder too
    r = _dsrewrite(elsewhere, "analyze", work / "out.pt", "--trust-pickle", "--input-shape", "1,3,32,32")
    assert r.returncode == 0, r.stderr
    (elsewhere / "out.pt").write_bytes((work / "out.pt").read_bytes())
    r = _dsrewrite(elsewhere, "analyze", "out.pt", "--trust-pickle")
    assert r.returncode == 2 and "classes live in the module 'fnet'" in r.stderr and "PYTHONPATH" in r.stderr
    # the portable format needs no source at all, and keeps a dynamic batch axis
    r = CliRunner().invoke(cli, ["convert", "fnet.py", "--input-shape", "1,3,32,32", "-o", "out.pt2",
                                 "--report", "r.md"])
    assert r.exit_code == 0 and "no source needed" in r.output and "batch dynamic" in r.output, r.output
    (elsewhere / "out.pt2").write_bytes((work / "out.pt2").read_bytes())
    r = _dsrewrite(elsewhere, "analyze", "out.pt2", "--input-shape", "3,3,32,32")
    assert r.returncode == 0, r.stderr
    r = CliRunner().invoke(cli, ["convert", "fnet.py", "-o", "out.onnx"])
    assert r.exit_code == 2 and ".pt2 (torch.export, portable)" in r.output
