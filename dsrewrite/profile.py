"""Stage 3, profile: shapes and costs of every op, one row per conv call site.

The model runs once on **meta tensors**: tensors that carry shape and dtype but no memory,
so analysis time and memory do not grow with resolution or batch size. A
``TorchDispatchMode`` sees every aten op, inside traced code and inside untraced leaves
alike, prices it with the handlers in :mod:`dsrewrite.costs`, and attributes it to the
fx node and the module that ran it. Facts go onto ``node.meta`` (``val``,
``dsrewrite_macs``, ``dsrewrite_depth``); the graph itself is never edited.

Shape functions for the commonest shape-preserving ops (pointwise, in-place, batch and
layer norm) answer directly, because torch's meta kernels for them are Python
decompositions that would dominate analysis time. Everything else runs its meta kernel.
If an op has no meta kernel, or the model mixes real tensors into its forward, the
profile is taken with one real forward instead, and the report says so.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

from .costs import CostTable, OpCall
from .errors import InputError
from .trace import (TraceResult, eval_mode, fetch_attr, meta_like, meta_parameters, meta_run_state,
                    node_arguments)
from .units import format_bytes

aten = torch.ops.aten
OP_KIND_NAMES = ("conv", "linear", "matmul", "other")
_LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, aten.linear.default}
_CONV_TYPE_NAMES = {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                    "LazyConv1d", "LazyConv2d", "LazyConv3d"}


@dataclasses.dataclass
class ConvProfile:
    """One convolution call site: its geometry, cost and place in the network."""

    index: int
    name: str
    #: Qualified name of the conv module (None for a functional ``F.conv*d`` call).
    module_name: str | None
    module_type: str
    #: 1-based call number of this module, and how many times the module is called.
    call_index: int
    calls: int
    kind: str  # standard / depthwise / grouped / pointwise / transposed
    transposed: bool
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    in_channels: int
    out_channels: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    macs: int
    activation_bytes: int
    macs_share: float
    depth: int
    depth_fraction: float
    downsamples: bool
    weight_name: str | None
    #: The fx node that ran it (None when it ran in an untraced model).
    fx_node: str | None
    #: False when the conv sits inside an untraced leaf (it is costed, but cannot be rewritten in-graph).
    traced: bool
    has_bias: bool
    #: how the conv module's class runs it: "" torch's own forward; "pads" its forward zero-pads the
    #: input (``input_padding``) and runs the conv (timm's ``Conv2dSame``); "custom" anything else
    own_forward: str = ""
    #: the zero padding that forward added, in ``F.pad`` order (left, right, top, bottom for 2-D)
    input_padding: tuple[int, ...] = ()

    @property
    def block_padding(self) -> tuple[int, ...] | None:
        """The padding a replacement block must use when the module pads its own input, else None.

        Only where that padding is the same at every input size: stride 1 and the TF "same"
        amount, ``(K − 1)·dilation`` split evenly (timm's ``Conv2dSame`` and static "same"
        padding). With stride 2 TF "same" depends on the input size, and is not carried.
        """
        if self.own_forward != "pads" or len(self.kernel) != 2 or any(s != 1 for s in self.stride):
            return None
        left, right, top, bottom = self.input_padding
        if left != right or top != bottom:
            return None
        if top + bottom != (self.kernel[0] - 1) * self.dilation[0] or left + right != (self.kernel[1] - 1) * self.dilation[1]:
            return None
        return (self.padding[0] + top, self.padding[1] + left)

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclasses.dataclass
class KindTotals:
    """MACs, parameters and call count of one op kind."""

    macs: int = 0
    params: int = 0
    calls: int = 0


@dataclasses.dataclass
class ModelProfile:
    """Everything the profiler learned about a model on given inputs."""

    input_shapes: list[tuple[int, ...]]
    output_shapes: list[tuple[int, ...]]
    dtype: str
    convs: list[ConvProfile]
    params: int
    param_bytes: int
    buffer_bytes: int
    macs: int
    activation_bytes: int
    peak_activation_bytes: int | None
    by_kind: dict[str, KindTotals]
    #: ``aten.op -> {"calls": n, "where": first module or node}`` for ops no handler prices.
    unsupported_ops: dict[str, dict]
    untraced: dict[str, str]
    trace_method: str
    #: ``meta`` (no arithmetic) or ``real`` (fell back to one real forward; see notes).
    propagation: str
    notes: list[str]
    #: MACs of the ops run directly inside each module (innermost module path; "" for the model itself);
    #: :func:`dsrewrite.modules.module_rows` rolls them up the module tree
    module_macs: dict[str, int] = dataclasses.field(default_factory=dict)
    #: modules traced with the input's concrete shapes -> why generic torch.fx refused them
    specialized: dict[str, str] = dataclasses.field(default_factory=dict)
    #: conv modules whose own forward torch.fx refused, called as one conv -> why
    opaque_convs: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def flops(self) -> int:
        """FLOPs, derived as 2 × MACs (never counted separately)."""
        return 2 * self.macs


def classify_conv(groups: int, in_channels: int, out_channels: int, kernel: tuple, transposed: bool) -> str:
    """standard / depthwise / grouped / pointwise / transposed."""
    if transposed:
        return "transposed"
    if groups > 1 and groups == in_channels and out_channels % in_channels == 0:
        return "depthwise"
    if groups > 1:
        return "grouped"
    if all(k == 1 for k in kernel):
        return "pointwise"
    return "standard"


def profile(traced: TraceResult, inputs: tuple, dtype: torch.dtype | None = None,
            costs: CostTable | None = None, max_memory: float | None = None) -> ModelProfile:
    """Propagate shapes and costs through a traced model (see module docstring).

    ``costs`` is the cost-handler table to price ops with (default: :class:`~dsrewrite.costs.CostTable`
    of the defaults). ``max_memory`` (bytes) bounds the memory a real-forward fallback may
    take (default: :data:`MEMORY_SHARE` of what the machine has available): a fallback the
    meta pass already shows to need more is refused before it starts, and one that grows past
    it is stopped between two ops; either way an :class:`~dsrewrite.errors.InputError`.
    """
    costs = costs or CostTable()
    model = traced.root
    notes: list[str] = []
    can_meta = not isinstance(model, torch.jit.ScriptModule)
    if not can_meta:
        notes.append("TorchScript archive: profiled with one real forward (its parameters cannot become meta tensors)")
    with eval_mode(model), torch.no_grad():
        if can_meta:
            try:
                return _profile_once(traced, inputs, dtype, meta=True, notes=notes, costs=costs)
            except _NeedsRealForward as e:
                notes.append(f"profiled with one real forward: meta propagation failed at {e.where}: {e.reason}")
                limit = max_memory if max_memory is not None else MEMORY_SHARE * available_memory()
                si = getattr(max_memory, "style", None) == "si"  # a units.SizeText answers in the user's terms
                if e.known_bytes > limit:
                    raise InputError(
                        f"meta propagation failed at {e.where} ({e.reason}), and the real forward that would "
                        f"replace it needs at least {format_bytes(e.known_bytes, si=si)} of activations for input "
                        f"{_shapes_text(inputs)}, over the {format_bytes(limit, si=si)} allowed; use a smaller "
                        "--input-shape, or raise the limit with --max-memory SIZE") from None
                return _profile_once(traced, inputs, dtype, meta=False, notes=notes, costs=costs, memory_limit=limit,
                                     failed_at=e.where)
        return _profile_once(traced, inputs, dtype, meta=False, notes=notes, costs=costs)


#: share of the available memory a real-forward fallback may use by default
MEMORY_SHARE = 0.8


def available_memory() -> float:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup limit (inf if unknown)."""
    found = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read().strip())
        if limit != "max":
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return float(min(found)) if found else float("inf")


def _rss_bytes() -> int:
    """This process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _shapes_text(inputs) -> str:
    return ", ".join("×".join(map(str, x.shape)) for x in inputs if isinstance(x, torch.Tensor))


class _NeedsRealForward(Exception):
    def __init__(self, where: str, reason: str, known_bytes: int = 0):
        super().__init__(reason)
        self.where, self.reason = where, reason
        #: activation memory the meta pass saw before it failed: the least a real forward needs
        self.known_bytes = known_bytes


def _real_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=True)) + list(model.named_buffers()):
        names.setdefault(id(t), name)
    return names


def _profile_once(traced: TraceResult, inputs: tuple, dtype, meta: bool, notes: list[str],
                  costs: CostTable, memory_limit: float | None = None, failed_at: str = "") -> ModelProfile:
    model = traced.root
    if meta:
        run_inputs = tuple(_as_meta(x) for x in inputs)
        state = _meta_state(model, dtype)
    else:
        run_inputs = tuple(_as_real(x) for x in inputs)
        state = contextlib.nullcontext(_real_names(model))
    with state as tensor_names:
        counter = _Counter(model, tensor_names, meta, traced.untraced, costs)
        counter.input_desc = _shapes_text(inputs)
        counter.input_dims = [x.dim() for x in inputs if isinstance(x, torch.Tensor)]
        if memory_limit is not None:
            counter.memory_limit, counter.rss_start, counter.failed_at = memory_limit, _rss_bytes(), failed_at
        with counter.hooks(), counter:
            if traced.graph is not None:
                outputs = _run_graph(traced.graph, model, run_inputs, counter)
            else:
                outputs = counter.guard(lambda: model(*run_inputs), "forward")
    return counter.finish(traced, inputs, outputs, dtype, "meta" if meta else "real", notes)


@contextlib.contextmanager
def _meta_state(model: nn.Module, dtype):
    with meta_run_state(model), meta_parameters(model, dtype) as names:
        yield names


def _as_meta(x):
    return meta_like(x) if isinstance(x, torch.Tensor) else x


def _as_real(x):
    if isinstance(x, torch.Tensor):
        return torch.zeros(x.shape, dtype=x.dtype) if x.is_meta else x
    return x


# ---------------------------------------------------------------------------- graph walk


def _run_graph(graph: fx.Graph, root: nn.Module, inputs: tuple, counter: "_Counter"):
    """Execute an fx graph node by node (like ``fx.Interpreter``, without building a GraphModule)."""
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]
    if len(inputs) < len(required) or len(inputs) > len(placeholders):
        names = ", ".join(n.target for n in placeholders)
        raise InputError(
            f"the model takes {len(required)}–{len(placeholders)} inputs ({names}) but {len(inputs)} "
            "were given; pass --input-shape once per input"
            if len(required) != len(placeholders) else
            f"the model takes {len(placeholders)} input(s) ({names}) but {len(inputs)} were given; "
            "pass --input-shape once per input"
        )
    fed = 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in graph.nodes}
    release: dict[int, list[fx.Node]] = collections.defaultdict(list)
    for n, i in last_use.items():
        release[i].append(n)

    def load(a):
        return node_arguments(a, env.__getitem__)

    for node in graph.nodes:
        counter.enter(node)
        if node.op == "placeholder":
            value = inputs[fed] if fed < len(inputs) else (node.args[0] if node.args else None)
            fed += 1
        elif node.op == "get_attr":
            value = fetch_attr(root, node.target)
        elif node.op == "call_module":
            mod = root.get_submodule(node.target)
            args, kwargs = load(node.args), load(node.kwargs)
            value = counter.guard(lambda: mod(*args, **kwargs), node.target)
        elif node.op == "call_function":
            args, kwargs = load(node.args), load(node.kwargs)
            value = counter.guard(lambda: node.target(*args, **kwargs), node.name)
        elif node.op == "call_method":
            args, kwargs = load(node.args), load(node.kwargs)
            value = counter.guard(lambda: getattr(args[0], node.target)(*args[1:], **kwargs), node.name)
        else:  # output
            counter.leave(node, None, env)
            return load(node.args[0])
        env[node] = value
        counter.leave(node, value, env)
        for done in release[order[node]]:
            counter.release(done)
    return None


# ------------------------------------------------------------------------- dispatch counter


@dataclasses.dataclass
class _RawConv:
    module_name: str | None
    module_type: str
    name_hint: str
    args: tuple
    out: Any
    macs: int
    depth: int
    weight_name: str | None
    fx_node: str | None
    traced: bool
    own_forward: str = ""
    input_padding: tuple[int, ...] = ()


#: the forwards of torch's own conv classes; a subclass that overrides them runs its own code
_TORCH_CONV_FORWARDS = {cls.forward for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                                nn.ConvTranspose2d, nn.ConvTranspose3d)}


class _Counter(TorchDispatchMode):
    """Prices every aten op and attributes it to the current fx node and module."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in dynamo.disable, whose first call imports
        # torch._dynamo (over a second). This mode never runs under torch.compile.
        return False

    def __init__(self, model: nn.Module, tensor_names: dict[int, str], meta: bool, untraced: dict[str, str],
                 costs: CostTable):
        super().__init__()
        self.costs = costs
        self.model = model
        self.tensor_names = tensor_names
        self.meta = meta
        self.untraced_prefixes = tuple(f"{n}." for n in untraced if n) + tuple(n for n in untraced if n)
        self.root_untraced = "" in untraced
        self.stack: list[tuple[str, nn.Module]] = []
        self.node: fx.Node | None = None
        self.node_base_depth = 0
        self.node_weighted = 0
        self.running_depth = 0
        self.raw_convs: list[_RawConv] = []
        self.by_kind = {k: KindTotals() for k in OP_KIND_NAMES}
        self.params_by_kind: dict[str, set[str]] = {k: set() for k in OP_KIND_NAMES}
        self.unsupported: dict[str, dict] = {}
        self.input_desc = ""
        self.input_dims: list[int] = []
        self.activation_bytes = 0
        self.live: dict[fx.Node, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest_output = 0
        self.module_macs: collections.Counter = collections.Counter()
        self.memory_limit: float | None = None  # real-forward fallback: stop when it grows past this
        self.rss_start = 0
        self.failed_at = ""
        #: conv modules whose class overrides forward -> the ops that forward ran before its conv
        self.own_forward_ids: set[int] = set()
        self.prelude: dict[int, list] = {}
        self.open_convs: dict[int, int] = {}  # such a module -> its conv row being recorded

    # -- module attribution
    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Module attribution through torch's global module hooks: two registrations, not two per
        module (a few hundred handles cost more than the rest of a small model's hook traffic)."""
        if isinstance(self.model, torch.jit.ScriptModule):
            yield
            return
        names = {}
        for name, mod in self.model.named_modules():
            names[id(mod)] = name
            if _overrides_forward(mod):
                self.own_forward_ids.add(id(mod))
        stack = self.stack

        def push(mod, args):
            name = names.get(id(mod))
            if name is not None:  # modules made during the forward stay unattributed, as before
                stack.append((name, mod))

        pre = nn.modules.module.register_module_forward_pre_hook(push)
        post = nn.modules.module.register_module_forward_hook(self._pop, always_call=True)
        try:
            yield
        finally:
            pre.remove()
            post.remove()

    def _pop(self, mod, args, out):
        if self.stack and self.stack[-1][1] is mod:
            self.stack.pop()
        if id(mod) in self.own_forward_ids:
            ops = self.prelude.pop(id(mod), [])
            row = self.open_convs.pop(id(mod), None)
            if row is not None:
                self.raw_convs[row].own_forward, self.raw_convs[row].input_padding = _own_forward(ops)

    # -- fx node bookkeeping
    def enter(self, node: fx.Node) -> None:
        self.node = node
        deps = node.all_input_nodes
        self.node_base_depth = max((d.meta.get("dsrewrite_depth", 0) for d in deps), default=0)
        self.node_weighted = 0
        node.meta["dsrewrite_macs"] = 0

    def leave(self, node: fx.Node, value, env) -> None:
        node.meta["dsrewrite_depth"] = self.node_base_depth + self.node_weighted
        if node.op == "output":
            return
        # Keep shapes, not activations: after a real-forward fallback the values are real tensors.
        node.meta["val"] = value if self.meta else tree_map_only(
            torch.Tensor, meta_like, value)
        # Bytes this node allocates: its output tensors that are neither views nor its inputs
        # (in-place ops return their input). This runs per node, so it avoids pytree.
        outputs = _tensors_in(value) if node.op != "get_attr" else []  # parameters are not activations
        fresh = 0
        if outputs:
            inputs = {id(t) for n in node.all_input_nodes for t in _tensors_in(env[n])}
            fresh = sum(_nbytes(t) for t in outputs if t._base is None and id(t) not in inputs)
        self.live[node] = fresh
        self.live_bytes += fresh
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def release(self, node: fx.Node) -> None:
        self.live_bytes -= self.live.pop(node, 0)

    def guard(self, fn, where: str):
        """Run one node; turn failures into a real-forward fallback or a clear input error."""
        try:
            return fn()
        except (InputError, _NeedsRealForward):
            raise
        except Exception as e:
            message = (str(e).strip().splitlines() or [""])[0]
            if self.meta and (isinstance(e, NotImplementedError) or "meta" in message.lower()):
                known = max(self.peak_bytes, self.live_bytes, 2 * self.largest_output)
                raise _NeedsRealForward(where, f"{type(e).__name__}: {message}", known) from e
            short = [x for x in self.input_dims if x < 4]
            if short and any(w in message for w in ("expected input", "channels", "dim", "D input")):
                raise InputError(
                    f"the model rejects input {self.input_desc} at {where}: its convs expect an N,C,H,W input "
                    f"(4 numbers, e.g. --input-shape 1,3,224,224), but the shape given has {short[0]}: "
                    f"{self.input_desc.replace('×', ',')}") from e
            raise InputError(f"the model rejects input {self.input_desc} at {where}: {message}") from e

    # -- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._compute(func, args, kwargs)
        if self.own_forward_ids and self.stack and id(self.stack[-1][1]) in self.own_forward_ids:
            self.prelude.setdefault(id(self.stack[-1][1]), []).append((func, args))
        known, handler = self.costs.handler_for(func)
        if not known:
            entry = self.unsupported.setdefault(str(func.overloadpacket), {"calls": 0, "where": self._where()})
            entry["calls"] += 1
        elif handler is not None:
            self._record(func, handler, args, kwargs, out)
        if not func.is_view and torch.Tag.inplace not in func.tags:
            written = sum(_nbytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
            self.activation_bytes += written
            self.largest_output = max(self.largest_output, written)
        if self.memory_limit is not None and _rss_bytes() - self.rss_start > self.memory_limit:
            used = _rss_bytes() - self.rss_start
            si = getattr(self.memory_limit, "style", None) == "si"
            raise InputError(
                f"stopped the real forward (needed because meta propagation failed at {self.failed_at}) at "
                f"{self._where() or 'the model'}: it had taken {format_bytes(used, si=si)} for input "
                f"{self.input_desc}, over the {format_bytes(self.memory_limit, si=si)} allowed; use a smaller "
                "--input-shape, or raise the limit with --max-memory SIZE")
        return out

    def _compute(self, func, args, kwargs):
        if self.meta:
            fast = _fast_shape(func, args, kwargs)
            if fast is not None:
                return fast
        return func(*args, **kwargs)

    def _record(self, func, handler, args, kwargs, out) -> None:
        macs = int(handler(OpCall(func, args, kwargs, out)))
        kind = self.costs.op_kind(func)
        linear_module = self._linear_module()
        if kind == "matmul" and linear_module is not None:
            kind = "linear"
            self.params_by_kind["linear"].update(
                n for n in (self.tensor_names.get(id(p)) for p in linear_module.parameters(recurse=False)) if n)
        elif kind == "matmul" and self._node_is_linear():
            kind = "linear"
            self.params_by_kind["linear"].update(self._node_param_names())
        totals = self.by_kind[kind]
        totals.macs += macs
        totals.calls += 1
        enclosing = self._enclosing()
        self.module_macs[enclosing[0]] += macs
        if self.node is not None:
            self.node.meta["dsrewrite_macs"] += macs
        if kind in ("conv", "linear", "matmul"):
            self.node_weighted += 1
            self.running_depth += 1
        depth = self.node_base_depth + self.node_weighted if self.node is not None else self.running_depth
        if kind == "conv":
            tensors = [a for a in args[1:3] if isinstance(a, torch.Tensor)]
            self.params_by_kind["conv"].update(n for n in (self.tensor_names.get(id(t)) for t in tensors) if n)
            if func.namespace == "aten":  # a conv row (what plans act on); deform_conv2d is counted, not planned
                self._record_conv(args, out, macs, depth, enclosing)

    def _linear_module(self) -> nn.Module | None:
        if self.stack and isinstance(self.stack[-1][1], nn.Linear):
            return self.stack[-1][1]
        return None

    def _node_is_linear(self) -> bool:
        return self.node is not None and self.node.op == "call_function" and self.node.target in _LINEAR_FUNCTIONS

    def _node_param_names(self) -> set[str]:
        names = set()
        for a in self.node.all_input_nodes:
            if a.op == "get_attr" and isinstance(a.meta.get("val"), torch.Tensor):
                name = self.tensor_names.get(id(a.meta["val"]))
                if name:
                    names.add(name)
        return names

    def _record_conv(self, args, out, macs: int, depth: int, enclosing: tuple[str, str, bool]) -> None:
        weight = args[1]
        weight_name = self.tensor_names.get(id(weight))
        path, type_name, is_conv = enclosing
        is_module = is_conv and weight_name == (f"{path}.weight" if path else "weight")
        node_name = self.node.name if self.node is not None else None
        own_forward = ""
        if is_module:
            module_name, module_type, hint = path, type_name, path
            called = self.stack[-1][1] if self.stack and self.stack[-1][0] == path else None
            if called is not None and id(called) in self.own_forward_ids:
                # classified when its forward returns (the ops after the conv count too)
                self.open_convs[id(called)] = len(self.raw_convs)
            elif called is None and _overrides_forward(self.model.get_submodule(path)):
                own_forward = "custom"  # its forward was traced through: what it adds is not observed here
        else:
            op = node_name if (self.node is not None and self.node.op != "call_module") else "conv"
            module_name, module_type = None, "functional"
            hint = f"{path}.{op}" if path else op
        self.raw_convs.append(_RawConv(
            module_name, module_type, hint, args, out, macs, depth, weight_name, node_name,
            traced=not self._inside_untraced(path), own_forward=own_forward,
        ))

    def _enclosing(self) -> tuple[str, str, bool]:
        """Path, class name and conv-ness of the innermost module running now.

        From the module hooks when a module is being called; else from the fx node's
        ``nn_module_stack`` (functional code inside traced modules, and exported programs,
        whose modules keep their names and class names only there).
        """
        if self.stack:
            path, mod = self.stack[-1]
            return path, type(mod).__name__, isinstance(mod, nn.modules.conv._ConvNd)
        if self.node is not None:
            stack = self.node.meta.get("nn_module_stack")
            if stack:
                entry = list(stack.values())[-1]
                cls = entry[1] if isinstance(entry, tuple) and len(entry) > 1 else ""
                if isinstance(cls, type):
                    return _stack_path(entry), cls.__name__, issubclass(cls, nn.modules.conv._ConvNd)
                type_name = str(cls).rsplit(".", 1)[-1]
                return _stack_path(entry), type_name, type_name in _CONV_TYPE_NAMES
        return "", "", False

    def _inside_untraced(self, path: str) -> bool:
        return self.root_untraced or bool(path) and path.startswith(self.untraced_prefixes)

    def _where(self) -> str:
        if self.stack:
            return self.stack[-1][0] or "(model)"
        return self.node.name if self.node is not None else "(model)"

    # -- results
    def finish(self, traced: TraceResult, inputs, outputs, dtype, propagation: str, notes: list[str]) -> ModelProfile:
        model = traced.root
        params = list(model.parameters())
        n_params = sum(p.numel() for p in params)
        eff = (lambda t: dtype if dtype is not None and t.is_floating_point() else t.dtype)
        param_bytes = sum(p.numel() * _itemsize(eff(p)) for p in params)
        buffer_bytes = sum(b.numel() * _itemsize(eff(b)) for b in model.buffers())
        sizes = dict(model.named_parameters())
        for kind in ("conv", "linear"):
            self.by_kind[kind].params = sum(sizes[n].numel() for n in self.params_by_kind[kind] if n in sizes)
        self.by_kind["other"].params = n_params - self.by_kind["conv"].params - self.by_kind["linear"].params
        total_macs = sum(k.macs for k in self.by_kind.values())
        convs = _conv_rows(self.raw_convs, total_macs)
        in_bytes = sum(_nbytes(t) for t in inputs if isinstance(t, torch.Tensor))
        peak = self.peak_bytes if traced.graph is not None else None
        if peak is not None:
            peak = max(peak, in_bytes)
        out_shapes = [tuple(t.shape) for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor)]
        return ModelProfile(
            input_shapes=[tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)],
            output_shapes=out_shapes,
            dtype=str(dtype or _first_dtype(inputs)).replace("torch.", ""),
            convs=convs,
            params=n_params,
            param_bytes=param_bytes,
            buffer_bytes=buffer_bytes,
            macs=total_macs,
            activation_bytes=self.activation_bytes + in_bytes,
            peak_activation_bytes=peak,
            by_kind=self.by_kind,
            unsupported_ops=self.unsupported,
            untraced=dict(traced.untraced),
            trace_method=traced.method,
            propagation=propagation,
            notes=notes,
            module_macs=dict(self.module_macs),
            specialized=dict(traced.specialized),
            opaque_convs=dict(traced.opaque_convs),
        )


def _conv_rows(raw: list[_RawConv], total_macs: int) -> list[ConvProfile]:
    calls = collections.Counter(r.module_name for r in raw if r.module_name)
    seen: collections.Counter = collections.Counter()
    hint_count = collections.Counter(r.name_hint for r in raw)
    hint_seen: collections.Counter = collections.Counter()
    max_depth = max((r.depth for r in raw), default=1) or 1
    rows = []
    for i, r in enumerate(raw):
        x, w, bias = r.args[0], r.args[1], r.args[2]
        stride, padding, dilation = (tuple(int(v) for v in r.args[k]) for k in (3, 4, 5))
        transposed, groups = bool(r.args[6]), int(r.args[8])
        out = r.out[0] if isinstance(r.out, (tuple, list)) else r.out
        batched = x.dim() == w.dim()
        in_channels = int(x.shape[1] if batched else x.shape[0])
        out_channels = int(out.shape[1] if batched else out.shape[0])
        kernel = tuple(int(k) for k in w.shape[2:])
        if r.module_name:
            seen[r.module_name] += 1
            call_index, n_calls = seen[r.module_name], calls[r.module_name]
        else:
            call_index, n_calls = 1, 1
        hint_seen[r.name_hint] += 1
        name = r.name_hint if hint_count[r.name_hint] == 1 else f"{r.name_hint}#{hint_seen[r.name_hint]}"
        rows.append(ConvProfile(
            index=i,
            name=name,
            module_name=r.module_name,
            module_type=r.module_type,
            call_index=call_index,
            calls=n_calls,
            kind=classify_conv(groups, in_channels, out_channels, kernel, transposed),
            transposed=transposed,
            kernel=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            in_channels=in_channels,
            out_channels=out_channels,
            input_shape=tuple(int(s) for s in x.shape),
            output_shape=tuple(int(s) for s in out.shape),
            params=int(w.numel() + (bias.numel() if isinstance(bias, torch.Tensor) else 0)),
            macs=r.macs,
            activation_bytes=_nbytes(x) + _nbytes(out),
            macs_share=r.macs / total_macs if total_macs else 0.0,
            depth=r.depth,
            depth_fraction=round(r.depth / max_depth, 4),
            downsamples=not transposed and any(s > 1 for s in stride),
            weight_name=r.weight_name,
            fx_node=r.fx_node,
            traced=r.traced,
            has_bias=isinstance(bias, torch.Tensor),
            own_forward=r.own_forward,
            input_padding=r.input_padding,
        ))
    return rows


def _overrides_forward(mod: nn.Module) -> bool:
    return isinstance(mod, nn.modules.conv._ConvNd) and type(mod).forward not in _TORCH_CONV_FORWARDS


def _own_forward(ops: list) -> tuple[str, tuple[int, ...]]:
    """What a conv module's own forward ran: its conv alone (""), zero padding then the conv
    ("pads", with the padding in ``F.pad`` order), or anything more ("custom")."""
    kinds = [func.overloadpacket for func, _ in ops]
    if kinds.count(aten.convolution) != 1 or kinds[-1] is not aten.convolution:
        return "custom", ()
    pads = [args for func, args in ops[:-1]]
    if any(k is not aten.constant_pad_nd for k in kinds[:-1]) or any(len(a) > 2 and a[2] != 0 for a in pads):
        return "custom", ()
    if not pads:
        return "", ()
    if len(pads) > 1 or len(pads[0][1]) != 4:
        return "custom", ()
    return "pads", tuple(int(p) for p in pads[0][1])


def innermost_module(node: fx.Node) -> str | None:
    """The qualified name of the innermost module whose forward recorded ``node`` (its
    ``nn_module_stack``), or None when the graph does not say."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return _stack_path(list(stack.values())[-1])


def _stack_path(entry) -> str:
    """An ``nn_module_stack`` value is ``(qualified path, type)``; export may write ``L['self'].a[0]``."""
    path = entry[0] if isinstance(entry, tuple) else str(entry)
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".").replace("[", ".").replace("]", "").replace("'", "")
    return path


def _tensors_in(value) -> list[torch.Tensor]:
    """Tensors in a node's value: a tensor, or a (nested) tuple/list of them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _first_dtype(inputs) -> torch.dtype:
    for t in inputs:
        if isinstance(t, torch.Tensor):
            return t.dtype
    return torch.float32


# --------------------------------------------------------------------- fast shape functions

_BOOL_RESULT = ("eq", "ne", "lt", "le", "gt", "ge", "isnan", "isinf", "isfinite", "signbit",
                "logical_and", "logical_or", "logical_not", "logical_xor", "isneginf", "isposinf")
_NORMS_WITH_STATS = {aten.native_batch_norm.default, aten._native_batch_norm_legit_no_training.default}


def _conv_shape(args):
    """``aten.convolution`` output on meta tensors, with torch's own input checks.

    torch's meta kernel for convolution is a Python function whose first call imports
    torch._dynamo (over a second); the arithmetic is a few lines.
    """
    x, w = args[0], args[1]
    stride, padding, dilation, transposed, output_padding, groups = args[3:9]
    spatial_dims = w.dim() - 2
    batched = x.dim() == w.dim()
    if x.dim() not in (w.dim(), w.dim() - 1):
        raise RuntimeError(f"expected a {w.dim()}-D (batched) or {w.dim() - 1}-D (unbatched) input to a "
                           f"{spatial_dims}-D conv, got input of shape {list(x.shape)}")
    channels = x.shape[1] if batched else x.shape[0]
    expected = w.shape[0] if transposed else w.shape[1] * groups
    if channels != expected:
        raise RuntimeError(f"expected input of shape {list(x.shape)} to have {expected} channels, "
                           f"but got {channels} channels instead")
    out_channels = w.shape[1] * groups if transposed else w.shape[0]
    sizes = []
    for i in range(spatial_dims):
        size, k = x.shape[x.dim() - spatial_dims + i], w.shape[2 + i]
        if transposed:
            out = (size - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k - 1) + output_padding[i] + 1
        else:
            out = (size + 2 * padding[i] - dilation[i] * (k - 1) - 1) // stride[i] + 1
        if out <= 0:
            raise RuntimeError(f"input of shape {list(x.shape)} is too small for a kernel of size "
                               f"{list(w.shape[2:])} (output size {out})")
        sizes.append(out)
    shape = ([x.shape[0]] if batched else []) + [out_channels] + sizes
    return torch.empty(shape, dtype=x.dtype, device="meta")


def _pool_size(size: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """torch's ``pooling_output_shape``."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    if out <= 0:
        raise RuntimeError(f"pooling input of spatial size {size} is too small for kernel {k} (output size {out})")
    return out


def _pair(v, n: int = 2) -> list[int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * n if len(v) == 1 else v


def _pool2d_shape(args, with_indices: bool):
    x = args[0]
    kernel = _pair(args[1])
    stride = _pair(args[2]) if len(args) > 2 and args[2] else kernel
    padding = _pair(args[3]) if len(args) > 3 else [0, 0]
    if with_indices:
        dilation = _pair(args[4]) if len(args) > 4 else [1, 1]
        ceil = bool(args[5]) if len(args) > 5 else False
    else:
        dilation, ceil = [1, 1], bool(args[4]) if len(args) > 4 else False
    h = _pool_size(x.shape[-2], kernel[0], stride[0], padding[0], dilation[0], ceil)
    w = _pool_size(x.shape[-1], kernel[1], stride[1], padding[1], dilation[1], ceil)
    out = torch.empty((*x.shape[:-2], h, w), dtype=x.dtype, device="meta")
    return (out, torch.empty(out.shape, dtype=torch.int64, device="meta")) if with_indices else out


def _reduce_shape(x, dims, keepdim: bool, dtype):
    rank = x.dim()
    dims = range(rank) if dims is None or len(dims) == 0 else [d % rank for d in dims]
    shape = [1 if i in dims else n for i, n in enumerate(x.shape)] if keepdim else \
        [n for i, n in enumerate(x.shape) if i not in dims]
    return torch.empty(shape, dtype=dtype or x.dtype, device="meta")


def _cat_shape(tensors, dim: int = 0):
    parts = [t for t in tensors if not (t.dim() == 1 and t.shape[0] == 0)]
    if not parts or any(t.dtype != parts[0].dtype or t.dim() != parts[0].dim() for t in parts):
        return None
    dim %= parts[0].dim()
    base = list(parts[0].shape)
    for t in parts[1:]:
        if any(a != b for i, (a, b) in enumerate(zip(base, t.shape)) if i != dim):
            raise RuntimeError(f"torch.cat: sizes of tensors must match except in dimension {dim}, "
                               f"got {list(parts[0].shape)} and {list(t.shape)}")
    base[dim] = sum(t.shape[dim] for t in parts)
    return torch.empty(base, dtype=parts[0].dtype, device="meta")


def _mm_shape(a, b):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({a.shape[0]}x{a.shape[1]} and "
                           f"{b.shape[0]}x{b.shape[1]})")
    return torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device="meta")


def _fast_shape(func, args, kwargs):
    """Output of a common op on meta tensors, or None to run the op's own meta kernel.

    Many of torch's meta kernels are Python references, some wrapped so that their first
    call imports torch._dynamo; these few formulas keep analysis at a few milliseconds.
    """
    if func is aten.convolution.default:
        return _conv_shape(args)
    if func is aten.max_pool2d_with_indices.default:
        return _pool2d_shape(args, with_indices=True)
    if func is aten.avg_pool2d.default:
        return _pool2d_shape(args, with_indices=False)
    if func is aten._adaptive_avg_pool2d.default:
        x, size = args[0], _pair(args[1])
        return torch.empty((*x.shape[:-2], *size), dtype=x.dtype, device="meta")
    if func is aten.mean.dim:
        return _reduce_shape(args[0], args[1], bool(args[2]) if len(args) > 2 else kwargs.get("keepdim", False),
                             kwargs.get("dtype"))
    if func is aten.cat.default and not kwargs:
        return _cat_shape(args[0], args[1] if len(args) > 1 else 0)
    if func is aten.mm.default:
        return _mm_shape(args[0], args[1])
    if func is aten.addmm.default and not kwargs:
        return _mm_shape(args[1], args[2])
    if func in _NORMS_WITH_STATS:
        x = args[0]
        stats = torch.empty((0,), dtype=x.dtype, device="meta")
        return meta_like(x), stats, stats.clone()
    if func is aten.native_layer_norm.default:
        x, normalized = args[0], args[1]
        stat_shape = tuple(x.shape[: x.dim() - len(normalized)]) + (1,) * len(normalized)
        stats = torch.empty(stat_shape, dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype,
                            device="meta")
        return meta_like(x), stats, stats.clone()
    tags = func.tags
    if "out" in kwargs or len(func._schema.returns) != 1:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or not all(isinstance(a, (torch.Tensor, int, float, bool)) or a is None for a in args):
        return None
    if torch.Tag.inplace in tags and torch.Tag.inplace_view not in tags and args[0] is tensors[0]:
        return args[0] if tensors[0].shape == _broadcast_shapes([t.shape for t in tensors]) else None
    if torch.Tag.pointwise not in tags:
        return None
    dtype = tensors[0].dtype
    if not dtype.is_floating_point or any(t.dtype != dtype for t in tensors):
        return None
    if func.__name__.split(".")[0] in _BOOL_RESULT:
        dtype = torch.bool
    return torch.empty(_broadcast_shapes([t.shape for t in tensors]), dtype=dtype, device="meta")


def _broadcast_shapes(shapes: list) -> tuple[int, ...]:
    """``torch.broadcast_shapes`` for concrete shapes (torch's imports sympy on its first call: most of a second)."""
    ndim = max(len(s) for s in shapes)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, ndim - len(shape)):
            if size != 1:
                if out[i] not in (1, size):
                    raise RuntimeError(f"shapes {[list(s) for s in shapes]} cannot be broadcast together")
                out[i] = size
    return tuple(out)
