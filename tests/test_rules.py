"""Each rule alone on a tiny model, the rules config, and the replacement block."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsrewrite
from dsrewrite.errors import ConfigError
from dsrewrite.layers import DepthwiseSeparableConv2d, decouple
from dsrewrite.rules import SCHEMA, AlignChannels, load_rules, preset_names
from models import FunctionalConv, SharedConv, UntraceableInside, UntraceableRoot


class Tower(nn.Module):
    """stem 3→64 → 3×3 64→64 ×2 → stride-2 3×3 64→128 → 3×3 128→128 → 5×5 128→128 → 3×3 16→16 head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.a = nn.Conv2d(64, 64, 3, padding=1)
        self.b = nn.Conv2d(64, 64, 3, padding=1)
        self.down = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.c = nn.Conv2d(128, 128, 3, padding=1)
        self.big = nn.Conv2d(128, 128, 5, padding=2)
        self.squeeze = nn.Conv2d(128, 16, 1)
        self.head = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        for m in (self.stem, self.a, self.b, self.down, self.c, self.big, self.squeeze, self.head):
            x = torch.relu(m(x))
        return x


def decisions(model, shape=(1, 3, 32, 32), rules="default", overrides=()):
    plan = dsrewrite.plan_model(model, shape, rules, list(overrides))
    return {d.name: d for d in plan.decisions}


NO_EARLY = ["keep.first_depth_fraction=0"]

RULE_CASES = [
    # (overrides, conv, expected action, words in the reason)
    (NO_EARLY, "stem", "keep", "stem conv"),
    (NO_EARLY + ["keep.first_convs=3"], "b", "keep", "first 3 convs"),
    (["keep.first_depth_fraction=0.3"], "a", "keep", "early layer"),
    (NO_EARLY, "a", "replace", "3×3 64→64 at 32×32"),
    (NO_EARLY, "down", "keep", "downsampling, stride 2×2"),
    (NO_EARLY + ["keep.downsampling=false"], "down", "replace", "fewer MACs"),
    (NO_EARLY, "big", "keep", "kernel 5×5 not in replace.kernel_sizes"),
    (NO_EARLY + ["replace.kernel_sizes=[3, 5]"], "big", "replace", "5×5 128→128"),
    (NO_EARLY, "squeeze", "keep", "already pointwise"),
    (NO_EARLY, "head", "keep", "16 input channels < replace.min_in_channels 64"),
    (NO_EARLY + ["replace.min_in_channels=100"], "a", "keep", "< replace.min_in_channels 100"),
    (NO_EARLY + ["replace.min_macs_share=0.5"], "a", "keep", "replace.min_macs_share 50%"),
    (NO_EARLY + ["replace.min_mac_reduction=20"], "a", "keep", "replace.min_mac_reduction 20×"),
]


@pytest.mark.parametrize("overrides,conv,action,words", RULE_CASES,
                         ids=[f"{c[1]}-{c[2]}-{i}" for i, c in enumerate(RULE_CASES)])
def test_rule(overrides, conv, action, words):
    d = decisions(Tower(), overrides=overrides)[conv]
    assert d.action == action and words in d.reason, d.reason


def test_replacement_reason_states_the_saving():
    d = decisions(Tower(), overrides=NO_EARLY)["c"]
    assert d.reason == "replaced: 3×3 128→128 at 16×16, 8.4× fewer MACs"
    assert d.macs_after == 16 * 16 * 128 * (9 + 128)
    assert d.depth_multiplier == 1 and d.mid_channels == 128


def test_functional_conv_is_listed_not_converted():
    d = decisions(FunctionalConv(), (1, 3, 16, 16), "aggressive", ["replace.min_in_channels=0", "keep.first_convs=0"])
    (only,) = d.values()
    assert only.action == "keep" and "functional" in only.reason


def test_conv_inside_untraced_leaf_is_kept():
    d = decisions(UntraceableInside(), (1, 3, 16, 16), "aggressive", ["replace.min_in_channels=0"])
    assert d["gate.conv"].action == "keep" and "untraced" in d["gate.conv"].reason


def test_untraceable_model_converts_by_module_swap():
    model = UntraceableRoot()
    result = dsrewrite.convert(model, (1, 3, 8, 8), "aggressive", ["replace.min_in_channels=0", "block.activation=none",
                                                                    "block.depth_multiplier=9",
                                                                    "replace.min_mac_reduction=0"])
    assert [layer.name for layer in result.report.layers] == ["b"]
    assert isinstance(result.model.b, DepthwiseSeparableConv2d)
    assert result.report.fidelity["relative_error"] < 1e-4


def test_module_called_twice_is_replaced_everywhere_or_nowhere():
    model = SharedConv()
    overrides = ["replace.min_in_channels=0", "replace.min_mac_reduction=0", "keep.first_convs=1"]
    d = decisions(model, (1, 3, 16, 16), "aggressive", overrides)
    assert d["conv#1"].action == d["conv#2"].action == "replace"
    result = dsrewrite.convert(model, (1, 3, 16, 16), "aggressive", overrides + ["block.depth_multiplier=9",
                                                                                  "block.activation=none"])
    assert result.report.fidelity["relative_error"] < 1e-4

    class TwoScales(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            x = self.stem(x)
            return self.conv(x).mean() + self.conv(F.avg_pool2d(x, 4)).mean()

    # the low-resolution call is too small a share: both calls keep the conv
    d = decisions(TwoScales(), (1, 3, 16, 16), "aggressive", overrides + ["replace.min_macs_share=0.1"])
    assert d["conv#1"].action == d["conv#2"].action == "keep"
    assert "called at 2 sites" in d["conv#1"].reason and "min_macs_share" in d["conv#2"].reason


def test_weight_read_directly_is_kept():
    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(64, 64, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + F.conv2d(x, self.conv.weight, padding=1)

    d = decisions(ReadsWeight(), (1, 64, 8, 8), "aggressive", ["keep.first_convs=0", "replace.min_mac_reduction=0"])
    assert d["conv"].action == "keep" and "reads conv.weight" in d["conv"].reason


def test_align_channels_raises_the_depth_multiplier():
    assert AlignChannels().depth_multiplier(100, 1, 8) == 2
    assert AlignChannels().depth_multiplier(64, 1, 8) == 1
    assert AlignChannels().depth_multiplier(3, 1, 8) == 8
    assert AlignChannels().depth_multiplier(100, 1, 0) == 1

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 100, 3, padding=1)
            self.conv = nn.Conv2d(100, 100, 3, padding=1)

        def forward(self, x):
            return self.conv(self.stem(x))

    d = decisions(Odd(), (1, 3, 16, 16), "aggressive")["conv"]
    assert d.action == "replace" and d.depth_multiplier == 2 and d.mid_channels == 200
    assert "to align 200 channels to 8" in d.reason


def test_plan_has_no_side_effects():
    model = Tower()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dsrewrite.plan_model(model, (1, 3, 32, 32), "aggressive")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(isinstance(m, nn.Conv2d) for m in model.children())


# ------------------------------------------------------------------------ the rules config


def test_presets_exist_and_load():
    assert {"default", "conservative", "aggressive", "mobile"} <= set(preset_names())
    for name in preset_names():
        assert load_rules(name).preset == name
    assert load_rules("mobile").activation == "relu6"


def test_overrides_and_files(tmp_path):
    c = load_rules("default", ["replace.min_in_channels=128", "replace.kernel_sizes=[3, 5]", "block.bn=false"])
    assert (c.min_in_channels, c.kernel_sizes, c.bn) == (128, (3, 5), False)
    f = tmp_path / "mine.toml"
    f.write_text('extends = "mobile"\n[replace]\nmin_in_channels = 256\n')
    c = load_rules(str(f))
    assert c.min_in_channels == 256 and c.activation == "relu6" and c.source == str(f)
    assert set(c.to_dict()) >= {"keep", "replace", "block", "align"}
    assert len(SCHEMA) == sum(len(v) for k, v in c.to_dict().items() if isinstance(v, dict))


@pytest.mark.parametrize("text,words", [
    ("[replace]\nmin_in_chanels = 3\n", "unknown rules key 'replace.min_in_chanels'"),
    ("[replace]\nmin_in_channels = 'many'\n", "replace.min_in_channels must be a non-negative integer"),
    ("[block]\nactivation = 'gelu'\n", "block.activation must be one of relu, relu6, none"),
    ("[block]\ndepth_multiplier = 0\n", "at least 1"),
    ("[keep]\ndownsampling = 1\n", "keep.downsampling must be true or false"),
    ("extends = 'turbo'\n", "extends = 'turbo': no such preset; built-in presets"),
    ("[keep\n", "not valid TOML"),
    ("speed = 3\n", "unknown key 'speed'"),
])
def test_bad_rules_file_names_key_and_file(tmp_path, text, words):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_rules(str(f))
    assert words in str(e.value) and ("bad.toml" in str(e.value) or "preset" in str(e.value))


def test_bad_set_and_preset():
    with pytest.raises(ConfigError, match="unknown rules preset 'fast'"):
        load_rules("fast")
    with pytest.raises(ConfigError, match="--set: unknown rules key 'replace.nope'"):
        load_rules("default", ["replace.nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_rules("default", ["replace.min_in_channels"])


# --------------------------------------------------------------------- the replacement block


@pytest.mark.parametrize("c_in,c_out,k,rank", [(8, 16, 3, 9), (16, 4, 3, 4), (4, 8, 5, 8), (6, 6, 1, 1)])
def test_decouple_is_exact_at_full_rank(c_in, c_out, k, rank):
    w = torch.randn(c_out, c_in, k, k, dtype=torch.float64)
    dw, pw, energy = decouple(w, rank)
    rebuilt = torch.einsum("om,mk->omk", pw, dw.reshape(c_in * rank, k * k)).reshape(c_out, c_in, rank, k * k).sum(2)
    assert torch.allclose(rebuilt.reshape(w.shape), w, atol=1e-10) and energy == pytest.approx(1.0)


def test_rank_one_keeps_the_top_singular_value():
    w = torch.randn(32, 8, 3, 3)
    _, _, energy = decouple(w, 1)
    s = torch.linalg.svdvals(w.permute(1, 0, 2, 3).reshape(8, 32, 9).double())
    assert energy == pytest.approx(float((s[:, 0] ** 2).sum() / (s**2).sum()), rel=1e-6)


@pytest.mark.parametrize("bn,activation", [(False, "none"), (True, "none"), (True, "relu"), (True, "relu6")])
def test_from_conv_reproduces_the_conv(bn, activation):
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=1, bias=True)
    x = torch.randn(2, 8, 12, 12)
    block = DepthwiseSeparableConv2d.from_conv(conv, depth_multiplier=9, bn=bn, activation=activation,
                                               sample_input=x).eval()
    with torch.no_grad():
        assert torch.allclose(block(x), conv(x), rtol=1e-4, atol=1e-5)
    assert block.depthwise.groups == 8 and block.depthwise.stride == (2, 2)
    if activation == "relu6":
        z = block.bn(block.depthwise(x))
        assert float(z.min()) >= 0 and float(z.max()) <= 6
    assert "DepthwiseSeparableConv2d" in repr(block) and "depthwise" in repr(block)


# ----------------------------------------------------- rules that declare preserves_computation

from dsrewrite.rules import RULES, RuleConfig  # noqa: E402

PRESERVING = [name for name, rule in RULES.items() if rule.preserves_computation]
_zoo = {}


def _zoo_model(name):
    if name not in _zoo:
        import torchvision

        torch.manual_seed(0)
        kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
        for m in model.modules():  # non-trivial BN statistics, so a non-neutral change would show
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        _zoo[name] = (model, dsrewrite.analyze(model, (2, 3, 64, 64)))
    return _zoo[name]


@pytest.mark.parametrize("model_name", ["resnet18", "googlenet", "densenet121"])
@pytest.mark.parametrize("rule", PRESERVING)
def test_rules_that_preserve_computation_do(model_name, rule):
    """Every rule declaring preserves_computation, run as the whole rule list (with exact channel alignment to 24
    on top), leaves the model's outputs unchanged."""
    from dsrewrite.facts import PlanFacts
    from dsrewrite.plan import plan_conversion
    from dsrewrite.rewrite import apply_plan

    model, analysis = _zoo_model(model_name)
    assert RULES[rule].preserves_computation
    config = RuleConfig(rules=(rule,), keep_first_convs=0, keep_first_depth_fraction=0.0, keep_downsampling=False,
                        min_in_channels=0, min_macs_share=0.0, min_mac_reduction=0.0, min_measured_speedup=1.0)
    plan = plan_conversion(analysis, config, PlanFacts(channels=analysis.channel_groups()), align=24)
    assert plan.resize.exact and plan.resize.changed, "alignment to 24 pads every torchvision width"
    x = torch.randn(2, 3, 64, 64)
    converted = apply_plan(model, plan, (x,)).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), atol=1e-4, rtol=1e-4)


def test_the_replacing_rule_does_not_claim_to_preserve():
    assert not RULES["ReplaceHeavyConv"].preserves_computation
    assert "ReplaceHeavyConv" not in PRESERVING and len(PRESERVING) == len(RULES) - 1
