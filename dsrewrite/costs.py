"""Cost handlers: one small function per aten op kind, in a table a user can extend.

Counting convention (the one torchvision uses for the GFLOPS it publishes): MACs of
convolutions, linear layers and matrix products, bias excluded. FLOPs are 2 × MACs and
are only ever derived, never mixed in.

``COST_HANDLERS`` maps an aten op (``torch.ops.aten.mm``) to a function returning the
op's MACs, or to ``None``: "carries no MACs by this convention, ignored on purpose".
An op that is neither handled nor known to be free is reported as unsupported, never
silently counted as zero. Override or extend with :func:`set_op_handle`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

aten = torch.ops.aten


@dataclasses.dataclass
class OpCall:
    """One dispatched aten op: what a handler sees."""

    func: Any  # torch._ops.OpOverload
    args: tuple
    kwargs: dict
    out: Any


#: A handler returns the MACs of one op call.
CostHandler = Callable[[OpCall], float]


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def convolution_macs(call: OpCall) -> float:
    """``aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)``.

    Each output element of a standard conv takes C_in/groups × prod(kernel) MACs. A transposed
    conv scatters each *input* element over C_out/groups × prod(kernel) outputs. The weight
    shape already holds (channels/groups × kernel), so both are batch × weight.numel × spatial,
    with the output spatial size for standard and the input spatial size for transposed convs.
    """
    x, w = call.args[0], call.args[1]
    transposed = bool(call.args[6]) if len(call.args) > 6 else False
    out = call.out[0] if isinstance(call.out, (tuple, list)) else call.out
    spatial = x.shape[2:] if transposed else out.shape[2:]
    batch = x.shape[0] if x.dim() == w.dim() else 1  # unbatched conv input has no batch dim
    return batch * _numel(w.shape) * _numel(spatial)


def mm_macs(call: OpCall) -> float:
    """``mm(a[m,k], b[k,n])``: m·k·n."""
    a, b = call.args[0], call.args[1]
    return a.shape[0] * a.shape[1] * b.shape[1]


def addmm_macs(call: OpCall) -> float:
    """``addmm(bias, a, b)``: the product only; adding the bias is not a MAC."""
    a, b = call.args[1], call.args[2]
    return a.shape[0] * a.shape[1] * b.shape[1]


def bmm_macs(call: OpCall) -> float:
    """``bmm(a[B,m,k], b[B,k,n])``: B·m·k·n."""
    a, b = call.args[0], call.args[1]
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def baddbmm_macs(call: OpCall) -> float:
    """``baddbmm(bias, a, b)``: the batched product only."""
    a, b = call.args[1], call.args[2]
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def mv_macs(call: OpCall) -> float:
    """``mv(a[m,k], v[k])``: m·k."""
    return _numel(call.args[0].shape)


def dot_macs(call: OpCall) -> float:
    """``dot(a[k], b[k])``: k."""
    return _numel(call.args[0].shape)


def sdpa_macs(call: OpCall) -> float:
    """Scaled dot-product attention: Q·Kᵀ (L·S·E) plus attention·V (L·S·Ev), per batch and head."""
    q, k, v = call.args[0], call.args[1], call.args[2]
    batch = _numel(q.shape[:-2])
    length, embed = q.shape[-2], q.shape[-1]
    source = k.shape[-2]
    return batch * length * source * (embed + v.shape[-1])


def deform_conv2d_macs(call: OpCall) -> float:
    """``torchvision::deform_conv2d(input, weight, offset, mask, bias, ...)``: counted as the conv it generalizes.

    Each output element takes C_in/groups × K_h × K_w MACs (batch × weight.numel × output
    positions, as :func:`convolution_macs`), as fvcore and ptflops count it; the bilinear
    sampling at the offsets and the modulation mask are elementwise work, not MACs.
    """
    x, w = call.args[0], call.args[1]
    out = call.out[0] if isinstance(call.out, (tuple, list)) else call.out
    return x.shape[0] * _numel(w.shape) * _numel(out.shape[2:])


#: Ops outside aten, by schema name (their namespace exists only once their library is imported).
NAMED_HANDLERS: dict[str, tuple[CostHandler | None, str]] = {
    "torchvision::deform_conv2d": (deform_conv2d_macs, "conv"),
    # detection post-processing: comparisons and gathers, no MACs by this convention
    "torchvision::nms": (None, "other"),
    "torchvision::roi_align": (None, "other"),
    "torchvision::roi_pool": (None, "other"),
    "torchvision::ps_roi_align": (None, "other"),
    "torchvision::ps_roi_pool": (None, "other"),
}

#: Which op kind each MAC-bearing op belongs to; matrix products under an ``nn.Linear``
#: (or ``F.linear``) are reported as ``linear`` by the profiler.
OP_KINDS: dict[Any, str] = {}

#: The default table: what every analysis starts from (``analyze(..., costs=...)`` adds to a copy).
COST_HANDLERS: dict[Any, CostHandler | None] = {}


class CostTable:
    """The cost handlers one analysis uses: the defaults plus that analysis's own overrides.

    ``overrides`` maps an aten op (packet or overload) to a handler, ``None`` (free on
    purpose), or ``(handler, kind)``. Nothing here is process-global: two analyses with
    different overrides do not see each other's.
    """

    def __init__(self, overrides: dict | None = None):
        self.handlers = dict(COST_HANDLERS)
        self.kinds = dict(OP_KINDS)
        for op, value in (overrides or {}).items():
            handler, kind = value if isinstance(value, tuple) else (value, "other")
            _put(self.handlers, self.kinds, op, handler, kind)

    def handler_for(self, func) -> tuple[bool, CostHandler | None]:
        """``(known, handler)`` for a dispatched op: known is False when the op is unsupported."""
        packet = func.overloadpacket
        if packet in self.handlers:
            return True, self.handlers[packet]
        named = NAMED_HANDLERS.get(func._schema.name)
        if named is not None:
            return True, named[0]
        if is_cost_free(func):
            return True, None
        # An in-place variant (hardswish_) costs what its functional op (hardswish) costs.
        name = packet.__name__
        if torch.Tag.inplace in func.tags and name.endswith("_") and hasattr(aten, name[:-1]):
            functional = getattr(aten, name[:-1])
            overload = getattr(functional, func._overloadname, None) or functional.default
            return self.handler_for(overload)
        return False, None

    def op_kind(self, func) -> str:
        """The op-kind column (conv / matmul / other) of a MAC-bearing op."""
        named = NAMED_HANDLERS.get(func._schema.name)
        return self.kinds.get(func.overloadpacket, named[1] if named else "other")


def _put(handlers: dict, kinds: dict, op, handler, kind: str) -> None:
    key = getattr(op, "overloadpacket", op)
    handlers[key] = handler
    if handler is None:
        kinds.pop(key, None)
    else:
        kinds[key] = kind


def set_op_handle(op, handler: CostHandler | None, kind: str = "other") -> None:
    """Register (or replace) the cost handler of an aten op in the *default* table (every later analysis).

    ``op`` is an ``OpOverloadPacket`` (``torch.ops.aten.mm``) or an ``OpOverload``
    (``torch.ops.aten.mm.default``); ``handler=None`` declares the op free of MACs.
    ``kind`` is the column its MACs are reported under (conv / linear / matmul / other).
    For one analysis only, pass ``costs={op: handler}`` to :func:`dsrewrite.analyze`.
    """
    _put(COST_HANDLERS, OP_KINDS, op, handler, kind)


def _register_defaults() -> None:
    conv_ops = ["convolution", "_convolution", "convolution_overrideable", "mkldnn_convolution",
                "cudnn_convolution", "cudnn_convolution_transpose", "miopen_convolution",
                "_slow_conv2d_forward", "slow_conv3d_forward", "slow_conv_transpose2d",
                "slow_conv_dilated2d", "thnn_conv2d", "_nnpack_spatial_convolution"]
    for name in conv_ops:
        if hasattr(aten, name):
            set_op_handle(getattr(aten, name), convolution_macs, "conv")
    set_op_handle(aten.mm, mm_macs, "matmul")
    set_op_handle(aten.addmm, addmm_macs, "matmul")
    set_op_handle(aten._addmm_activation, addmm_macs, "matmul")
    set_op_handle(aten.bmm, bmm_macs, "matmul")
    set_op_handle(aten.baddbmm, baddbmm_macs, "matmul")
    set_op_handle(aten.mv, mv_macs, "matmul")
    set_op_handle(aten.dot, dot_macs, "matmul")
    set_op_handle(aten.vdot, dot_macs, "matmul")
    for name in ["_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_attention_math"]:
        if hasattr(aten, name):
            set_op_handle(getattr(aten, name), sdpa_macs, "matmul")
    # Ops that move, reshape, normalize, pool, reduce or create data: no MACs by convention.
    # Pointwise and view ops are recognized by their tags (see is_cost_free) and need no entry.
    for name in [
        "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit_functional", "batch_norm", "native_layer_norm", "native_group_norm",
        "_batch_norm_with_update", "_batch_norm_no_update", "instance_norm", "rms_norm", "_fused_rms_norm",
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
        "avg_pool1d", "avg_pool2d", "avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
        "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_avg_pool1d", "adaptive_max_pool1d",
        "mean", "sum", "prod", "amax", "amin", "max", "min", "argmax", "argmin", "var", "std", "var_mean",
        "norm", "linalg_vector_norm", "logsumexp", "cumsum", "any", "all",
        "_softmax", "_log_softmax", "softmax", "log_softmax", "_safe_softmax",
        "cat", "stack", "split", "split_with_sizes", "unbind", "chunk", "_to_copy", "copy_", "clone",
        "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
        "fill_", "zero_", "arange", "linspace", "logspace", "scalar_tensor", "lift_fresh", "lift_fresh_copy", "new_empty", "new_zeros",
        "new_ones", "new_full", "new_empty_strided", "_local_scalar_dense", "item", "sym_size", "sym_stride",
        "sym_numel", "sym_storage_offset",
        "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d",
        "replication_pad3d", "reflection_pad3d", "pad",
        "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d",
        "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d", "_upsample_nearest_exact2d",
        "_upsample_bilinear2d_aa", "grid_sampler_2d", "affine_grid_generator", "pixel_shuffle",
        "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
        "index", "index_select", "gather", "scatter", "scatter_add", "index_put", "index_put_", "embedding",
        "masked_fill", "masked_fill_", "where", "topk", "sort", "nonzero", "flip", "roll", "repeat",
        "_unique", "_unique2", "unique_dim", "unique_consecutive",
        "tril", "triu", "col2im", "im2col", "unfold", "native_dropout", "dropout", "bernoulli_", "bernoulli",
        "rand", "randn", "rand_like", "randn_like", "randint", "uniform_", "normal_", "contiguous",
        "_reshape_alias", "reshape", "flatten", "resize_", "set_", "alias", "_unsafe_view", "lift",
        "eq", "ne", "lt", "gt", "le", "ge", "isnan", "isinf", "_assert_async", "_assert_scalar",
        "_assert_tensor_metadata", "_functional_assert_async",
        # activations that are elementwise but not tagged pointwise
        "hardswish", "hardsigmoid", "hardtanh", "relu6", "gelu", "silu", "mish", "elu", "selu", "celu",
        "leaky_relu", "softplus", "softshrink", "hardshrink", "threshold", "prelu", "_prelu_kernel", "glu",
        "rrelu", "rrelu_with_noise", "log_sigmoid_forward", "clamp", "clamp_min", "clamp_max",
    ]:
        if hasattr(aten, name):
            set_op_handle(getattr(aten, name), None)


_register_defaults()


def is_cost_free(func) -> bool:
    """Pointwise, view and metadata ops carry no MACs by this convention."""
    tags = func.tags
    return (
        torch.Tag.pointwise in tags
        or func.is_view
        or torch.Tag.inplace_view in tags
        or func.namespace == "prim"
    )
