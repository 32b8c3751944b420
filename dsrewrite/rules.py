"""Rules: small named objects that decide, per conv, whether to keep it or replace it.

A rule has one job, a name and a declared contract (:class:`Rule`): given a conv and the
block drafted for it so far, it returns the draft (changed or not) or :class:`Keep` with
the reason. A preset lists the rules it runs, in order (``plan.rules``). Rules read
:class:`~dsrewrite.profile.ConvProfile` rows and the traced graph; they never touch a model.

Their thresholds come from a :class:`RuleConfig`, loaded from a preset in the top-level
``rules/`` folder (shipped as ``dsrewrite.presets``), a user's TOML file, and ``--set``
overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import sys
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError
from .profile import ConvProfile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# ------------------------------------------------------------------------------ configuration


@dataclasses.dataclass(frozen=True)
class RuleConfig:
    """Every threshold and switch the rules read (TOML key in brackets)."""

    preset: str = "default"
    source: str = "built-in"
    #: [keep.first_convs] keep this many convs at the start of the network standard.
    keep_first_convs: int = 1
    #: [keep.first_depth_fraction] keep convs in the first fraction of network depth standard.
    keep_first_depth_fraction: float = 0.1
    #: [keep.downsampling] keep stride > 1 convs standard.
    keep_downsampling: bool = True
    #: [replace.kernel_sizes] square kernel sizes that may be replaced.
    kernel_sizes: tuple[int, ...] = (3,)
    #: [replace.min_in_channels] only convs with at least this many input channels.
    min_in_channels: int = 64
    #: [replace.min_macs_share] only convs with at least this share of the model's MACs.
    min_macs_share: float = 0.005
    #: [replace.min_mac_reduction] only if the block has at least this many times fewer MACs.
    min_mac_reduction: float = 2.0
    #: [block.depth_multiplier] depthwise filters per input channel (the SVD rank).
    depth_multiplier: int = 1
    #: [block.bn] insert BatchNorm after the depthwise conv.
    bn: bool = True
    #: [block.activation] activation after the depthwise conv: relu, relu6 or none.
    activation: str = "relu"
    #: [block.family] the block a replaced conv becomes: separable, pointwise-first, spatial,
    #: bottleneck (dsrewrite.blocks), or auto (the planner picks per layer; needs a target).
    family: str = "separable"
    #: [block.rank] rank of the non-separable families (0: the largest rank with at least
    #: replace.min_mac_reduction× fewer MACs; above the exact rank: the exact rank);
    #: separable uses block.depth_multiplier.
    rank: int = 0
    #: [block.layer_family] per-layer families: {"layer4.*" = "bottleneck"} (module-name globs,
    #: first match wins; "keep" keeps the layer standard).
    layer_family: tuple[tuple[str, str], ...] = ()
    #: [align.divisor] channel counts the rewrite creates are multiples of this (0 or 1: off).
    align_divisor: int = 8
    #: [align.groups] also round every resizable channel group of the whole model up to a
    #: multiple of align.divisor, exactly (zero channels; see dsrewrite.resize).
    align_groups: bool = False
    #: [align.width] width multiplier α for every resizable channel group (0: off; lossy).
    align_width: float = 0.0
    #: [replace.min_measured_speedup] only if the block measured at least this much faster here (0: off).
    min_measured_speedup: float = 0.0
    #: [plan.target_latency] plan for this fraction of the original's measured latency (0: off;
    #: --target-latency overrides it).
    target_latency: float = 0.0
    #: [plan.group_widths] widths the planner may give each resizable channel group, beside the
    #: block families, for a target (e.g. [0.75, 0.5]; needs calibration data, whose least-squares
    #: refit repairs the thinned groups' consumers; empty: every group keeps its width).
    group_widths: tuple[float, ...] = ()
    #: [plan.compare_on_data] with calibration data and a target, also plan without the channel widths,
    #: with the widths alone and with each block family alone, apply and calibrate every such plan, and
    #: keep the one with the least output error on the held-out calibration samples among those that meet
    #: the target (dsrewrite.choose.compare_on_data). Costs one calibration per distinct plan.
    compare_on_data: bool = False
    #: [measure.device] where to time: auto, cpu, cuda, cuda:N, mps.
    measure_device: str = "auto"
    #: [measure.threads] CPU threads while timing (0: torch's default).
    measure_threads: int = 0
    #: [measure.dtype] float32, bfloat16 or float16.
    measure_dtype: str = "float32"
    #: [measure.memory_format] contiguous or channels_last.
    measure_memory_format: str = "contiguous"
    #: [measure.fold_bn] time with BatchNorm folded into the preceding conv, as deployed.
    measure_fold_bn: bool = True
    #: [measure.repeats] timed repeats per measurement (the median is used).
    measure_repeats: int = 10
    #: [measure.warmup] untimed runs before timing.
    measure_warmup: int = 3
    #: [plan.rules] the rules planning runs, in order (see dsrewrite.rules.RULES).
    rules: tuple[str, ...] = (
        "SkipNonStandard", "SkipFunctional", "SkipUntraced", "SkipWeightReads", "KeepStem", "KeepDownsampling",
        "AlignChannels", "ReplaceHeavyConv", "MinMeasuredSpeedup")

    def measure_settings(self):
        """The :class:`~dsrewrite.measure.MeasureSettings` the ``[measure]`` keys describe."""
        from .measure import MeasureSettings

        return MeasureSettings(device=self.measure_device, threads=self.measure_threads or None,
                               dtype=self.measure_dtype, memory_format=self.measure_memory_format,
                               warmup=self.measure_warmup, repeats=max(self.measure_repeats, 1))

    def to_dict(self) -> dict[str, Any]:
        """TOML-shaped dict (``{"keep": {...}, ...}``) plus the preset name and source."""
        out: dict[str, Any] = {"preset": self.preset, "source": self.source}
        for key, (field, kind) in SCHEMA.items():
            section, name = key.split(".")
            value = getattr(self, field)
            if kind == "patterns":
                value = dict(value)
            out.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
        return out

    def family_of(self, module_name: str | None) -> str:
        """The block family for a conv module: the first matching ``block.layer_family`` glob, else ``block.family``."""
        import fnmatch

        for pattern, family in self.layer_family:
            if module_name is not None and fnmatch.fnmatchcase(module_name, pattern):
                return family
        return self.family


#: TOML key -> (RuleConfig field, expected type). One table for files and --set alike.
SCHEMA: dict[str, tuple[str, type]] = {
    "keep.first_convs": ("keep_first_convs", int),
    "keep.first_depth_fraction": ("keep_first_depth_fraction", float),
    "keep.downsampling": ("keep_downsampling", bool),
    "replace.kernel_sizes": ("kernel_sizes", list),
    "replace.min_in_channels": ("min_in_channels", int),
    "replace.min_macs_share": ("min_macs_share", float),
    "replace.min_mac_reduction": ("min_mac_reduction", float),
    "block.depth_multiplier": ("depth_multiplier", int),
    "block.bn": ("bn", bool),
    "block.activation": ("activation", str),
    "block.family": ("family", str),
    "block.rank": ("rank", int),
    "block.layer_family": ("layer_family", "patterns"),
    "plan.target_latency": ("target_latency", float),
    "plan.group_widths": ("group_widths", "widths"),
    "plan.compare_on_data": ("compare_on_data", bool),
    "align.divisor": ("align_divisor", int),
    "align.groups": ("align_groups", bool),
    "align.width": ("align_width", float),
    "replace.min_measured_speedup": ("min_measured_speedup", float),
    "measure.device": ("measure_device", str),
    "measure.threads": ("measure_threads", int),
    "measure.dtype": ("measure_dtype", str),
    "measure.memory_format": ("measure_memory_format", str),
    "measure.fold_bn": ("measure_fold_bn", bool),
    "measure.repeats": ("measure_repeats", int),
    "measure.warmup": ("measure_warmup", int),
    "plan.rules": ("rules", "rules"),
}
#: block families by name (dsrewrite.blocks.FAMILIES; listed here so that rules load without torch work)
FAMILY_NAMES = ("separable", "pointwise-first", "spatial", "bottleneck", "inverted-residual", "mbconv")
#: the families ``block.family = "auto"`` chooses among (mbconv starts as inverted-residual at more cost)
AUTO_FAMILIES = ("separable", "pointwise-first", "spatial", "bottleneck", "inverted-residual")


def candidate_label(family: str, rank: int | None) -> str:
    """How a block candidate reads: ``keep``, ``separable×1`` (multiplier families), ``bottleneck 96`` (widths)."""
    if family == "keep":
        return "keep"
    return f"{family}×{rank}" if family in ("separable", "pointwise-first") else f"{family} {rank}"


_CHOICES = {
    "block.activation": ("relu", "relu6", "none"),
    "block.family": FAMILY_NAMES + ("auto",),
    "measure.dtype": ("float32", "bfloat16", "float16"),
    "measure.memory_format": ("contiguous", "channels_last"),
}


def preset_names() -> list[str]:
    """Names of the built-in presets."""
    from .presets import names

    return names()


def load_rules(spec: str | Path | None = "default", overrides: list[str] | tuple[str, ...] = ()) -> RuleConfig:
    """A :class:`RuleConfig` from a preset name or TOML path, then ``key=value`` overrides."""
    spec = str(spec or "default")
    if spec.endswith(".toml") or "/" in spec or "\\" in spec:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"{spec}: no such rules file")
        config = _from_toml(path.read_text(encoding="utf-8"), str(path), depth=0)
    else:
        config = _preset(spec, depth=0)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value (e.g. replace.min_in_channels=128), got {item!r}")
        config = _apply(config, {key.strip(): _parse_value(raw.strip())}, "--set")
    return config


def load_rules_dict(doc: dict[str, Any], where: str) -> RuleConfig:
    """A :class:`RuleConfig` back from :meth:`RuleConfig.to_dict` (a saved plan's ``rules``), checked key by key."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a table of rules sections, got {doc!r}")
    flat: dict[str, Any] = {}
    for section, table in doc.items():
        if section in ("preset", "source"):
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: unknown key {section!r}")
        for key, value in table.items():
            flat[f"{section}.{key}"] = value
    config = _apply(RuleConfig(), flat, where)
    return dataclasses.replace(config, preset=str(doc.get("preset", "custom")), source=str(doc.get("source", where)))


def _preset(name: str, depth: int, where: str | None = None) -> RuleConfig:
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        head = f"{where}: extends = {name!r}: no such preset" if where else f"unknown rules preset {name!r}"
        raise ConfigError(f"{head}{f' (did you mean {close[0]!r}?)' if close else ''}; built-in presets: "
                          f"{', '.join(names)}" + ("" if where else " (or give a path to a .toml file)"))
    text = (importlib.resources.files("dsrewrite.presets") / f"{name}.toml").read_text(encoding="utf-8")
    return dataclasses.replace(_from_toml(text, f"preset {name}", depth), preset=name, source=f"preset {name}")


def _from_toml(text: str, where: str, depth: int) -> RuleConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from e
    base_name = data.pop("extends", None)
    if depth > 5:
        raise ConfigError(f"{where}: 'extends' chain is too deep")
    if base_name is not None and not isinstance(base_name, str):
        raise ConfigError(f"{where}: 'extends' must name a preset, got {base_name!r}")
    base = _preset(base_name, depth + 1, where) if base_name else RuleConfig()
    flat: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: unknown key {section!r}; expected sections "
                              f"{', '.join(sorted({k.split('.')[0] for k in SCHEMA}))} and 'extends'")
        for key, value in table.items():
            flat[f"{section}.{key}"] = value
    config = _apply(base, flat, where)
    return dataclasses.replace(config, preset=base_name or "custom", source=where)


def _apply(config: RuleConfig, values: dict[str, Any], where: str) -> RuleConfig:
    changes = {}
    for key, value in values.items():
        if key not in SCHEMA:
            close = difflib.get_close_matches(key, list(SCHEMA), n=1)
            hint = (f" (did you mean {close[0]!r}?)" if close
                    else f"; known keys: {', '.join(SCHEMA)}")
            raise ConfigError(f"{where}: unknown rules key {key!r}{hint}")
        field, expected = SCHEMA[key]
        changes[field] = _check_type(key, value, expected, where)
    return dataclasses.replace(config, **changes)


def _check_type(key: str, value: Any, expected: type, where: str) -> Any:
    bad = ConfigError(f"{where}: {key} must be {_type_word(expected)}, got {value!r}")
    if expected is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad
        if key == "block.depth_multiplier" and value < 1:
            raise ConfigError(f"{where}: {key} must be at least 1, got {value}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise bad
        if key == "plan.target_latency" and value > 1:
            raise ConfigError(f"{where}: plan.target_latency is a fraction of the original's latency between 0 and 1 "
                              f"(0: off), got {value!r}")
        if key == "align.width" and value > 1:
            raise ConfigError(f"{where}: align.width is a multiplier between 0 and 1 (0: off), got {value!r}")
        return float(value)
    if expected is list:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                  for v in value):
            raise bad
        return tuple(value)
    if expected == "patterns":
        if isinstance(value, (list, tuple)) and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
            value = dict(value)  # a saved plan's rules round-trip
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise bad
        for pattern, family in value.items():
            if family not in FAMILY_NAMES + ("keep",):
                close = difflib.get_close_matches(family, FAMILY_NAMES, n=1)
                raise ConfigError(f"{where}: {key}: {pattern!r} = {family!r} is no block family"
                                  f"{f' (did you mean {close[0]!r}?)' if close else ''}; families: "
                                  f"{', '.join(FAMILY_NAMES)}, or keep")
        return tuple(value.items())
    if expected == "widths":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in value):
            raise bad
        return tuple(sorted({float(v) for v in value}, reverse=True))
    if expected == "rules":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        unknown = [v for v in value if v not in RULES]
        if unknown:
            raise ConfigError(f"{where}: {key}: unknown rule {unknown[0]!r}; known rules: {', '.join(RULES)}")
        if "ReplaceHeavyConv" not in value:
            raise ConfigError(f"{where}: {key} must include ReplaceHeavyConv (the rule that chooses to replace)")
        return tuple(value)
    if not isinstance(value, str):
        raise bad
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    if key == "measure.device" and not (value in ("auto", "cpu", "mps", "cuda") or value.startswith("cuda:")):
        raise ConfigError(f"{where}: measure.device must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
    return value


def _type_word(t: type) -> str:
    return {bool: "true or false", int: "a non-negative integer", float: "a non-negative number",
            list: "a list of kernel sizes such as [3, 5]", str: "a string",
            "patterns": "a table of module-name globs to families such as {\"layer4.*\" = \"bottleneck\"}",
            "rules": "a list of rule names such as [\"KeepStem\", \"ReplaceHeavyConv\"]",
            "widths": "a list of channel widths between 0 and 1 such as [0.75, 0.5]"}[t]


def _parse_value(raw: str) -> Any:
    """``--set`` values are TOML values (``128``, ``0.02``, ``true``, ``[3, 5]``, ``relu6``)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


# ------------------------------------------------------------------------------------ rules


@dataclasses.dataclass
class PlanContext:
    """What rules may look at besides the conv itself."""

    config: RuleConfig
    convs: list[ConvProfile]
    #: conv module name -> names of its parameters read directly by the traced graph (get_attr).
    weight_reads: dict[str, list[str]]
    #: whether the top-level forward could not be traced (convs are swapped by name).
    root_untraced: bool
    #: the model's MACs after the replacements planned so far (what shares are measured against).
    total_macs: int = 0
    #: conv index -> measured timing of the conv and its replacement (latency-aware planning).
    timings: dict = dataclasses.field(default_factory=dict)
    #: where the timings were taken, for reasons ("cpu/2 threads").
    environment: str = ""

    def macs_share(self, conv: ConvProfile) -> float:
        """``conv``'s share of the model's MACs after the planned replacements."""
        return conv.macs / self.total_macs if self.total_macs else conv.macs_share


@dataclasses.dataclass(frozen=True)
class Draft:
    """The block a conv would get, as the rules have shaped it so far.

    Every conv starts with the configured block (``block.*`` keys) and no costs; a rule
    that chooses to replace (:class:`ReplaceHeavyConv`) costs it and gives the reason.
    A conv whose draft reaches the end of the rule list costed is replaced.
    """

    depth_multiplier: int
    bn: bool
    activation: str
    #: the block family (dsrewrite.blocks.FAMILIES, or "auto": a target-driven planner picks)
    family: str = "separable"
    #: rank of a non-separable family (0: chosen from replace.min_mac_reduction)
    rank: int = 0
    macs_after: int | None = None
    params_after: int | None = None
    #: the reason to replace ("replaced: ..."), set by the rule that chose to
    reason: str = ""
    #: remarks later rules add to the reason (an aligned multiplier, a measured speedup)
    remarks: tuple[str, ...] = ()

    @property
    def chosen(self) -> bool:
        """Whether a rule has chosen to replace the conv (and costed the block)."""
        return self.macs_after is not None


@dataclasses.dataclass(frozen=True)
class Keep:
    """A rule's verdict: keep the conv standard, for this reason (``kept: ...``)."""

    reason: str


class Rule:
    """One step of planning: look at a conv and the draft block, return the draft (maybe changed) or :class:`Keep`.

    Every rule has a ``name`` (used in presets' ``plan.rules`` lists and in each decision)
    and declares ``preserves_computation``: True when the rule never changes what the model
    computes (it only keeps convs, or changes nothing a forward pass can see). A test runs
    every rule that declares it on real models and checks the outputs are unchanged.
    """

    name: ClassVar[str] = "Rule"
    preserves_computation: ClassVar[bool] = True

    def decide(self, conv: ConvProfile, ctx: PlanContext, draft: Draft) -> Draft | Keep:  # pragma: no cover
        """The draft to pass on, or :class:`Keep` with the reason."""
        raise NotImplementedError


class SkipNonStandard(Rule):
    """Only standard convs (groups == 1, not 1×1, not transposed) that run as plain convs are candidates.

    A conv module whose class runs its own code around the conv is kept, except one that only
    zero-pads its input by an amount a block's fixed padding reproduces at every input size
    (TF "same" at stride 1, :attr:`~dsrewrite.profile.ConvProfile.block_padding`).
    """

    name = "SkipNonStandard"

    def decide(self, conv, ctx, draft):
        if conv.kind == "transposed":
            return Keep("kept: transposed conv")
        if conv.kind != "standard":
            return Keep(f"kept: already {conv.kind}")
        if len(conv.kernel) != 2:
            return Keep(f"kept: Conv{len(conv.kernel)}d (only 2-D convs are rewritten)")
        if conv.own_forward == "custom":
            return Keep(f"kept: {conv.module_type}.forward runs its own code around the conv; a block would not "
                        "keep it")
        if conv.own_forward == "pads" and conv.block_padding is None:
            pad = ",".join(map(str, conv.input_padding))
            return Keep(f"kept: {conv.module_type} pads its input by ({pad}) (left, right, top, bottom) before the "
                        f"conv; at stride {'×'.join(map(str, conv.stride))} that padding depends on the input size "
                        "(TF 'same'), which a block's fixed padding cannot follow")
        return draft


class SkipFunctional(Rule):
    """Functional ``F.conv2d`` calls have no module to swap; they are listed, never mangled."""

    name = "SkipFunctional"

    def decide(self, conv, ctx, draft):
        if conv.module_name is None:
            return Keep("kept: functional F.conv call (not convertible; write it as an nn.Conv2d module)")
        return draft


class SkipUntraced(Rule):
    """Convs inside an untraced leaf of a traced model are costed but never replaced."""

    name = "SkipUntraced"

    def decide(self, conv, ctx, draft):
        if not conv.traced and not ctx.root_untraced:
            return Keep("kept: inside an untraced block")
        return draft


class SkipWeightReads(Rule):
    """A conv whose parameters the model reads directly (``self.conv.weight``) cannot be swapped."""

    name = "SkipWeightReads"

    def decide(self, conv, ctx, draft):
        reads = ctx.weight_reads.get(conv.module_name or "")
        if reads:
            return Keep(f"kept: the model reads {', '.join(reads)} directly")
        return draft


class KeepStem(Rule):
    """Keep early layers standard: the first N convs and the first fraction of network depth."""

    name = "KeepStem"

    def decide(self, conv, ctx, draft):
        c = ctx.config
        if conv.index < c.keep_first_convs:
            return Keep("kept: stem conv" if conv.index == 0 else f"kept: among the first {c.keep_first_convs} convs")
        if conv.depth_fraction < c.keep_first_depth_fraction:
            return Keep(f"kept: early layer (depth {conv.depth_fraction:.2f} < {c.keep_first_depth_fraction:g})")
        return draft


class KeepDownsampling(Rule):
    """Keep stride > 1 convs standard."""

    name = "KeepDownsampling"

    def decide(self, conv, ctx, draft):
        if ctx.config.keep_downsampling and conv.downsamples:
            return Keep(f"kept: downsampling, stride {'×'.join(map(str, conv.stride))}")
        return draft


class AlignChannels(Rule):
    """Make the channel count a replacement creates (C_in × depth multiplier) a multiple of ``align.divisor``.

    The depthwise conv's output count must be a multiple of C_in, so alignment raises the
    depth multiplier to the smallest value whose C_in × multiplier is divisible; the
    model's external widths are left to channel alignment of the whole graph. It changes
    only the block a later rule may choose, never a model by itself.
    """

    name = "AlignChannels"
    preserves_computation = True

    def decide(self, conv, ctx, draft):
        c = ctx.config
        if c.family_of(conv.module_name) not in ("separable", "auto"):
            return draft  # the other families' ranks are aligned where they are chosen
        dm = self.depth_multiplier(conv.in_channels, draft.depth_multiplier, c.align_divisor)
        if dm == draft.depth_multiplier:
            return draft
        remark = (f" (depth multiplier {draft.depth_multiplier}→{dm} to align {conv.in_channels * dm} channels to "
                  f"{c.align_divisor})")
        return dataclasses.replace(draft, depth_multiplier=dm, remarks=draft.remarks + (remark,))

    def depth_multiplier(self, in_channels: int, depth_multiplier: int, divisor: int) -> int:
        """The aligned depth multiplier (≥ the requested one)."""
        if divisor <= 1:
            return depth_multiplier
        step = divisor // math.gcd(in_channels, divisor)
        return -(-depth_multiplier // step) * step


class ReplaceHeavyConv(Rule):
    """Replace deep, heavy K×K convs with depthwise K×K + pointwise 1×1, if it pays enough."""

    name = "ReplaceHeavyConv"
    preserves_computation = False

    def decide(self, conv, ctx, draft):
        from .blocks import block_costs

        c = ctx.config
        k = conv.kernel
        if k[0] != k[1] or k[0] not in c.kernel_sizes:
            return Keep(f"kept: kernel {'×'.join(map(str, k))} not in replace.kernel_sizes {list(c.kernel_sizes)}")
        if conv.in_channels < c.min_in_channels:
            return Keep(f"kept: {conv.in_channels} input channels < replace.min_in_channels {c.min_in_channels}")
        share = ctx.macs_share(conv)
        if share < c.min_macs_share:
            return Keep(f"kept: {100 * share:.2f}% of model MACs < replace.min_macs_share {100 * c.min_macs_share:g}%")
        family = c.family_of(conv.module_name)
        if family == "keep":
            return Keep("kept: block.layer_family says keep")
        if family in ("separable", "auto"):  # auto is costed as separable until a planner picks
            rank = draft.depth_multiplier
            macs, params = block_costs("separable", rank, conv.in_channels, conv.out_channels, k, conv.input_shape,
                                       conv.output_shape, draft.bn)
        else:
            from .blocks import max_rank_of

            top = max_rank_of(family, conv.in_channels, conv.out_channels, conv.kernel)
            rank = min(draft.rank, top) if draft.rank else self.rank_for(family, conv, c.min_mac_reduction,
                                                                           c.align_divisor)
            if rank is None:
                return Keep(f"kept: no {family} rank gives replace.min_mac_reduction {c.min_mac_reduction:g}× "
                            "fewer MACs")
            macs, params = block_costs(family, rank, conv.in_channels, conv.out_channels, k, conv.input_shape,
                                       conv.output_shape)
        reduction = conv.macs / macs if macs else float("inf")
        if reduction < c.min_mac_reduction:
            return Keep(f"kept: only {reduction:.1f}× fewer MACs < replace.min_mac_reduction {c.min_mac_reduction:g}×")
        hw = "×".join(map(str, conv.output_shape[2:]))
        reason = f"replaced: {k[0]}×{k[1]} {conv.in_channels}→{conv.out_channels} at {hw}, {reduction:.1f}× fewer MACs"
        if family not in ("separable", "auto"):
            return dataclasses.replace(draft, family=family, rank=rank, bn=False, activation="none",
                                       macs_after=macs, params_after=params, reason=reason + f" ({family} rank {rank})")
        return dataclasses.replace(draft, family=family, macs_after=macs, params_after=params, reason=reason)

    @staticmethod
    def rank_for(family: str, conv: ConvProfile, reduction: float, divisor: int) -> int | None:
        """The largest rank of ``family`` with at least ``reduction``× fewer MACs than ``conv`` (aligned), or None."""
        from .blocks import block_costs, max_rank_of

        top = max_rank_of(family, conv.in_channels, conv.out_channels, conv.kernel)
        budget = conv.macs / max(reduction, 1.0)
        fits = [r for r in range(1, top) if block_costs(family, r, conv.in_channels, conv.out_channels, conv.kernel,
                                                        conv.input_shape, conv.output_shape)[0] <= budget]
        if not fits:
            return None
        r = fits[-1]
        return r // divisor * divisor if divisor > 1 and r >= divisor else r


class MinMeasuredSpeedup(Rule):
    """Replace only if the block measured at least ``replace.min_measured_speedup`` times faster here."""

    name = "MinMeasuredSpeedup"
    preserves_computation = True  # it only ever keeps convs

    def decide(self, conv, ctx, draft):
        threshold = ctx.config.min_measured_speedup
        if threshold <= 0 or not draft.chosen:
            return draft
        timing = ctx.timings.get(conv.index)
        if timing is None:
            return Keep("kept: no latency measurement for this layer")
        if timing.speedup < threshold:
            return Keep(f"kept: measured {timing.speedup:.2f}× on {ctx.environment}, below {threshold:g}×")
        return dataclasses.replace(draft, remarks=draft.remarks + (f", measured {timing.speedup:.2f}×",))


#: Every rule by name, in the order the built-in presets run them.
RULES: dict[str, Rule] = {r.name: r for r in (
    SkipNonStandard(), SkipFunctional(), SkipUntraced(), SkipWeightReads(), KeepStem(), KeepDownsampling(),
    AlignChannels(), ReplaceHeavyConv(), MinMeasuredSpeedup())}
DEFAULT_ORDER: tuple[str, ...] = tuple(RULES)


def rules_in_order(config: RuleConfig) -> list[Rule]:
    """The rules ``config.rules`` names, in its order."""
    return [RULES[name] for name in config.rules]
