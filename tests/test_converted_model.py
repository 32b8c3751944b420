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
