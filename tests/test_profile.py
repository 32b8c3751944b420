"""The per-conv profile on small hand-written models, one feature per case."""

import pytest
import torch
from torch import nn

import dsrewrite
import dsrewrite.profile
from dsrewrite.errors import InputError
from models import (Attention, ConvZoo, Convs1d3d, FunctionalConv, DataDependentShape, NoConv, SharedConv,
                    UntraceableInside, UntraceableRoot, WithFFT)


def by_name(analysis):
    return {c.name: c for c in analysis.convs}


def test_every_conv_kind_is_classified_and_costed():
    a = dsrewrite.analyze(ConvZoo(), (2, 8, 32, 32))
    rows = by_name(a)
    expected = {
        # name: (kind, kernel, stride, groups, in, out, output HxW, MACs)
        "standard": ("standard", (3, 3), (1, 1), 1, 8, 16, (32, 32), 2 * 16 * 32 * 32 * 8 * 9),
        "depthwise": ("depthwise", (3, 3), (1, 1), 16, 16, 16, (32, 32), 2 * 16 * 32 * 32 * 1 * 9),
        "grouped": ("grouped", (3, 3), (2, 2), 4, 16, 32, (16, 16), 2 * 32 * 16 * 16 * 4 * 9),
        "pointwise": ("pointwise", (1, 1), (1, 1), 1, 32, 32, (16, 16), 2 * 32 * 16 * 16 * 32),
        "dilated": ("standard", (3, 3), (1, 1), 1, 32, 32, (16, 16), 2 * 32 * 16 * 16 * 32 * 9),
        # transposed: every input element scatters over C_out × k² outputs
        "up": ("transposed", (2, 2), (2, 2), 1, 32, 8, (32, 32), 2 * 16 * 16 * 32 * 8 * 4),
    }
    assert set(rows) == set(expected)
    for name, (kind, kernel, stride, groups, cin, cout, hw, macs) in expected.items():
        c = rows[name]
        assert (c.kind, c.kernel, c.stride, c.groups, c.in_channels, c.out_channels) == \
            (kind, kernel, stride, groups, cin, cout), name
        assert c.output_shape[2:] == hw and c.macs == macs, name
    assert rows["dilated"].dilation == (2, 2) and rows["dilated"].padding == (2, 2)
    assert rows["grouped"].downsamples and not rows["up"].downsamples
    assert rows["pointwise"].has_bias and rows["pointwise"].params == 32 * 32 + 32
    assert a.profile.macs == sum(c.macs for c in a.convs)
    assert sum(c.macs_share for c in a.convs) == pytest.approx(1.0)
    assert [c.index for c in a.convs] == list(range(6))
    assert a.convs[-1].depth_fraction == 1.0 and a.convs[0].depth_fraction < a.convs[1].depth_fraction
    assert rows["standard"].activation_bytes == (2 * 8 * 32 * 32 + 2 * 16 * 32 * 32) * 4


def test_functional_conv_is_recognized():
    a = dsrewrite.analyze(FunctionalConv(), (1, 3, 20, 20))
    (c,) = a.convs
    assert c.module_name is None and c.module_type == "functional"
    assert c.name == "conv2d" and c.weight_name == "weight"
    assert c.macs == 16 * 20 * 20 * 3 * 9 and c.params == 16 * 27 + 16
    assert a.profile.by_kind["conv"].params == 16 * 27 + 16


def test_module_called_twice_is_two_call_sites_with_params_counted_once():
    a = dsrewrite.analyze(SharedConv(), (1, 3, 16, 16))
    rows = [c for c in a.convs if c.module_name == "conv"]
    assert [(c.call_index, c.calls) for c in rows] == [(1, 2), (2, 2)]
    assert len({c.name for c in a.convs}) == 3, "call sites get distinct names"
    assert a.profile.params == (8 * 27 + 8) + (8 * 72 + 8)
    assert a.profile.by_kind["conv"].params == a.profile.params
    assert a.profile.macs == 8 * 256 * 27 + 2 * 8 * 256 * 72


def test_untraceable_block_becomes_a_costed_leaf():
    a = dsrewrite.analyze(UntraceableInside(), (1, 3, 16, 16))
    assert list(a.profile.untraced) == ["gate"]
    assert "control flow" in a.profile.untraced["gate"] or "Proxy" in a.profile.untraced["gate"]
    rows = by_name(a)
    assert set(rows) == {"stem", "gate.conv", "head"}
    assert not rows["gate.conv"].traced and rows["stem"].traced
    assert rows["gate.conv"].macs == 8 * 256 * 72
    assert a.profile.trace_method == "fx"
    # the leaf's data-dependent branch needs real values: the profile says it ran one real forward
    assert a.profile.propagation == "real" and "real forward" in a.profile.notes[0]


def test_untraceable_root_is_still_profiled():
    a = dsrewrite.analyze(UntraceableRoot(), (1, 3, 8, 8))
    assert "" in a.profile.untraced and a.profile.trace_method == "none"
    assert [c.name for c in a.convs][:1] == ["a"]
    assert all(not c.traced for c in a.convs)
    assert a.profile.macs == sum(c.macs for c in a.convs)


def test_registered_leaf_module_is_not_entered():
    @dsrewrite.register_leaf_module
    class Opaque(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3)

        def forward(self, x):
            return self.conv(x)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Opaque()

        def forward(self, x):
            return self.block(x)

    a = dsrewrite.analyze(Outer(), (1, 3, 8, 8))
    graph_targets = [n.target for n in a.trace.graph.nodes if n.op == "call_module"]
    assert graph_targets == ["block"]
    assert [c.name for c in a.convs] == ["block.conv"] and a.convs[0].macs == 3 * 36 * 27


def test_conv1d_conv3d_and_several_inputs():
    a = dsrewrite.analyze(Convs1d3d(), (torch.empty(2, 4, 33), torch.empty(1, 2, 4, 8, 8)))
    rows = by_name(a)
    assert rows["c1"].kernel == (5,) and rows["c1"].output_shape == (2, 8, 15)
    assert rows["c1"].macs == 2 * 8 * 15 * 4 * 5
    assert rows["c3"].kernel == (3, 3, 3) and rows["c3"].macs == 4 * 4 * 8 * 8 * 2 * 27
    assert a.profile.input_shapes == [(2, 4, 33), (1, 2, 4, 8, 8)]


def test_model_without_convs_is_valid():
    a = dsrewrite.analyze(NoConv(), (4, 32))
    assert a.convs == []
    assert a.profile.by_kind["linear"].macs == 4 * (32 * 64 + 64 * 10)
    assert a.profile.by_kind["linear"].params == a.profile.params


def test_matmul_and_attention_are_counted_as_matmul():
    a = dsrewrite.analyze(Attention(), (2, 10, 16))
    kinds = a.profile.by_kind
    assert kinds["linear"].macs == 2 * 10 * 16 * 48
    # q @ kᵀ: 2 × (10×16 · 16×10); SDPA: Q·Kᵀ and A·V, each 2 × 10 × 10 × 16
    assert kinds["matmul"].macs == 2 * 10 * 16 * 10 + 2 * 10 * 10 * (16 + 16)
    assert a.profile.unsupported_ops == {}


def test_op_without_handler_is_listed_not_silently_zero():
    a = dsrewrite.analyze(WithFFT(), (1, 3, 8, 8))
    assert any("fft" in op for op in a.profile.unsupported_ops)
    entry = next(v for k, v in a.profile.unsupported_ops.items() if "fft" in k)
    assert entry["calls"] >= 1
    doc = a.to_dict()
    assert any("fft" in u["op"] for u in doc["unsupported_ops"])


def test_custom_handler_overrides_and_is_counted():
    op = torch.ops.aten._fft_r2c
    a = dsrewrite.analyze(WithFFT(), (1, 3, 8, 8), costs={op: (lambda call: 1000, "other")})
    assert a.profile.unsupported_ops == {}
    assert a.profile.by_kind["other"].macs == 1000
    # the override belonged to that analysis only: the next one reports the op as unsupported again
    assert any("fft" in k for k in dsrewrite.analyze(WithFFT(), (1, 3, 8, 8)).profile.unsupported_ops)
    assert op not in dsrewrite.COST_HANDLERS
    # None: free on purpose, neither counted nor unsupported
    free = dsrewrite.analyze(WithFFT(), (1, 3, 8, 8), costs={op: None})
    assert free.profile.unsupported_ops == {} and free.profile.by_kind["other"].macs == 0


def test_data_dependent_shapes_fall_back_to_one_real_forward():
    a = dsrewrite.analyze(DataDependentShape(), (1, 3, 8, 8))
    assert a.convs[0].macs == 4 * 64 * 27
    assert a.profile.trace_method == "fx"
    assert a.profile.propagation == "real" and "real forward" in a.profile.notes[0]


def test_analysis_writes_facts_on_nodes_and_never_edits_the_graph():
    model = SharedConv()
    a = dsrewrite.analyze(model, (1, 3, 16, 16))
    before = [(n.op, n.target) for n in a.trace.graph.nodes]
    nodes = {n.name: n for n in a.trace.graph.nodes}
    assert nodes["stem"].meta["val"].shape == (1, 8, 16, 16)
    assert nodes["stem"].meta["dsrewrite_macs"] == 8 * 256 * 27
    assert [(n.op, n.target) for n in a.trace.graph.nodes] == before
    assert all(not p.is_meta for p in model.parameters())


def test_wrong_input_shape_is_an_input_error():
    with pytest.raises(dsrewrite.DsrewriteError, match="3 channels"):
        dsrewrite.analyze(ConvZoo(), (1, 3, 32, 32))
    with pytest.raises(dsrewrite.DsrewriteError, match="too small"):
        dsrewrite.analyze(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 7)), (1, 3, 4, 4))


class EarlyDataDependent(nn.Module):
    """Fails meta propagation at once (a value-dependent branch on the input), then grows big activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        type(self).calls = []  # real forwards, on the class: analysis traces a copy of the root

    def forward(self, x):
        if type(x) is torch.Tensor and not x.is_meta:  # not meta, not torch.export's fake tensors
            type(self).calls.append(1)
        if x.sum().item() != 12345.0:
            kept = [self.conv(x + i) for i in range(8)]  # 8 × 64 channels, all alive at the end
            return torch.stack(kept).mean()
        return x.mean()


class LateDataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        type(self).calls = []  # real forwards, on the class: analysis traces a copy of the root

    def forward(self, x):
        if type(x) is torch.Tensor and not x.is_meta:  # real arithmetic: not meta, not torch.export's fake tensors
            type(self).calls.append(1)
        x = torch.relu(self.stem(x))
        return x.mean() if x.mean().item() > -1 else x.sum()


def test_real_forward_fallback_is_refused_before_it_starts_when_the_meta_pass_shows_it_too_big():
    model = LateDataDependent()
    with pytest.raises(InputError, match=r"needs at least 128 MiB of activations for input 1×3×512×512, over the "
                                         r"9.54 MiB allowed; use a smaller --input-shape, or raise the limit with "
                                         r"--max-memory SIZE"):
        dsrewrite.analyze(model, (1, 3, 512, 512), max_memory=10e6)
    assert len(model.calls) == 0, "nothing ran for real"
    analysis = dsrewrite.analyze(model, (1, 3, 64, 64), max_memory=100e6)
    assert analysis.profile.propagation == "real" and analysis.profile.macs == 64 * 64 * 64 * 27


def test_real_forward_fallback_is_stopped_when_it_grows_past_the_limit():
    model = EarlyDataDependent()
    # each conv output is 64×256×256×4 = 16 MiB; eight of them stay alive
    with pytest.raises(InputError, match=r"stopped the real forward .* over the 47.7 MiB allowed"):
        dsrewrite.analyze(model, (1, 3, 256, 256), max_memory=50e6)
    assert len(model.calls) == 1


def test_cli_max_memory(tmp_path):
    from click.testing import CliRunner

    from dsrewrite.cli import cli

    (tmp_path / "dd.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.stem = nn.Conv2d(3, 16, 3, padding=1)\n\n"
        "    def forward(self, x):\n        x = self.stem(x)\n"
        "        return x.mean() if x.mean().item() > -1 else x.sum()\n")
    r = CliRunner().invoke(cli, ["analyze", str(tmp_path / "dd.py"), "--input-shape", "1,3,4096,4096"])
    if dsrewrite.profile.available_memory() * dsrewrite.profile.MEMORY_SHARE < 1 << 30:
        assert r.exit_code == 2 and "--max-memory" in r.output
    r = CliRunner().invoke(cli, ["analyze", str(tmp_path / "dd.py"), "--input-shape", "1,3,4096,4096",
                                 "--max-memory", "512MiB"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "needs at least 2 GiB of activations for input 1×3×4096×4096, over the 512 MiB allowed" in r.output
    r = CliRunner().invoke(cli, ["analyze", str(tmp_path / "dd.py"), "--input-shape", "1,3,4096,4096",
                                 "--max-memory", "500MB"])
    assert "needs at least 2.15 GB of activations for input 1×3×4096×4096, over the 500 MB allowed" in r.output, \
        "answered in the user's own units"
    r = CliRunner().invoke(cli, ["analyze", str(tmp_path / "dd.py"), "--max-memory", "lots"])
    assert r.exit_code == 2 and "--max-memory: expected a size such as 512MiB" in r.output
