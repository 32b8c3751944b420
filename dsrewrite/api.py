"""The plain Python API: the pipeline stages wired together, with no click in sight."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from . import __version__
from .load import LoadedModel, as_input_tuple, load_model, make_inputs, resolve_inputs
from .profile import ModelProfile, profile
from .trace import TraceResult, trace

#: Version of the JSON document written by ``analyze --format json``; bumped on incompatible change.
SCHEMA_VERSION = 1
CONVENTION = "MACs of conv, linear and matmul ops, bias excluded (torchvision's GFLOPS convention); FLOPs = 2 x MACs"


@dataclasses.dataclass
class Analysis:
    """The result of :func:`analyze`: a profile plus what tracing found."""

    model_name: str
    profile: ModelProfile
    trace: TraceResult
    loaded: LoadedModel | None = None

    @property
    def convs(self):
        """One :class:`~dsrewrite.profile.ConvProfile` per conv call site, in execution order."""
        return self.profile.convs

    def totals(self) -> dict[str, Any]:
        """Whole-model totals (params, MACs, FLOPs, bytes)."""
        p = self.profile
        return {
            "params": p.params,
            "macs": p.macs,
            "flops": p.flops,
            "param_bytes": p.param_bytes,
            "buffer_bytes": p.buffer_bytes,
            "activation_bytes": p.activation_bytes,
            "peak_activation_bytes": p.peak_activation_bytes,
            "conv_calls": len(p.convs),
        }

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON document (see README, "JSON schema")."""
        p = self.profile
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "dsrewrite", "version": __version__, "torch": torch.__version__},
            "model": self.model_name,
            "input_shapes": [list(s) for s in p.input_shapes],
            "output_shapes": [list(s) for s in p.output_shapes],
            "dtype": p.dtype,
            "convention": CONVENTION,
            "totals": self.totals(),
            "by_kind": {k: dataclasses.asdict(v) for k, v in p.by_kind.items()},
            "layers": [c.to_dict() for c in p.convs],
            "untraced": [{"module": name or "(whole model)", "reason": why} for name, why in p.untraced.items()],
            "unsupported_ops": [{"op": op, **info} for op, info in sorted(p.unsupported_ops.items())],
            "trace": {"method": p.trace_method, "propagation": p.propagation},
            "notes": list(p.notes),
        }


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    dtype: torch.dtype | None = None,
    name: str | None = None,
) -> Analysis:
    """Trace and profile ``model`` on ``example_inputs`` without running real arithmetic.

    ``example_inputs`` is a tensor, a tuple of tensors, or a shape tuple such as
    ``(1, 3, 224, 224)``; only shapes and dtypes are used. Default: one 1×3×224×224 input.
    """
    if example_inputs is None:
        inputs = make_inputs([(1, 3, 224, 224)], dtype or torch.float32)
    elif isinstance(example_inputs, (tuple, list)) and example_inputs and all(isinstance(d, int) for d in example_inputs):
        inputs = make_inputs([tuple(example_inputs)], dtype or torch.float32)
    else:
        inputs = as_input_tuple(example_inputs, "example_inputs")
    traced = trace(model)
    return Analysis(name or type(model).__name__, profile(traced, inputs, dtype), traced)


def analyze_spec(
    spec: str,
    input_shapes: list[tuple[int, ...]] | None = None,
    dtype: torch.dtype | None = None,
    kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
) -> Analysis:
    """Load a model from a spec (see :func:`dsrewrite.load.load_model`) and analyze it."""
    loaded = load_model(spec, kwargs, trust_pickle=trust_pickle)
    inputs = resolve_inputs(loaded, input_shapes, dtype)
    traced = trace(loaded.model)
    return Analysis(spec, profile(traced, inputs, dtype), traced, loaded)
