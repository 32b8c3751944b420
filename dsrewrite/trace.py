"""Stage 2, trace: a torch.fx graph of the model, with untraceable parts kept as leaves.

``torch.fx`` cannot enter code with control flow on its inputs, tuple unpacking of
proxies and the like. Rather than give up, :func:`trace` marks the smallest module whose
``forward`` failed as a leaf (an opaque call in the graph) and traces again, until the
graph builds.

Most such failures are Python control flow on *shapes* (``if H % ws:``, TF-style "same"
padding, window partitions), which is known statically once the input shape is. Given
example inputs, a second pass traces exactly those modules again with concrete shapes:
inside them ``x.shape``, ``x.size()``, ``x.dim()``, ``len(x)`` are the numbers the input
gives (computed on meta tensors, lazily, only for the values asked for), and a branch on a
shape-derived value takes the branch the input takes. Their ops join the graph, so their
convs get full rows, channel groups and replacements like any other; the graph of such a
module holds for the analyzed input shape (``TraceResult.specialized`` says which). Only
control flow on tensor *values* keeps a module a leaf, with that reason. A conv module
whose forward torch.fx cannot enter (timm's ``Conv2dSame`` pads by its input size) is
called as one conv, not made a leaf. The profiler still costs every op inside a leaf at
dispatch level; the report lists each leaf and the error that made it one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import operator
from typing import Iterator

import torch
import torch.fx as fx
from torch import nn

#: Module classes that torch.fx should not enter (see :func:`register_leaf_module`).
_LEAF_CLASSES: set[type] = set()


def register_leaf_module(cls: type) -> type:
    """Mark an ``nn.Module`` class as opaque to tracing (usable as a decorator).

    Like timm's ``register_notrace_module``: a model author marks a block whose forward
    torch.fx cannot (or should not) enter; dsrewrite still costs the ops inside it.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module expects an nn.Module subclass, got {cls!r}")
    _LEAF_CLASSES.add(cls)
    return cls


@dataclasses.dataclass
class TraceResult:
    """A traced graph (``None`` when even the top-level forward cannot be traced)."""

    root: nn.Module
    graph: fx.Graph | None
    #: qualified name of every untraced leaf -> why it is not traced.
    untraced: dict[str, str]
    #: ``fx`` when traced here, ``export`` for a torch.export graph, ``none`` when untraced.
    method: str
    #: modules traced with the input's concrete shapes (the second pass) -> why generic fx refused them
    specialized: dict[str, str] = dataclasses.field(default_factory=dict)
    #: conv modules whose own forward fx refused, called as one conv op -> why
    opaque_convs: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def traced(self) -> bool:
        """Whether a graph exists."""
        return self.graph is not None


#: what the second pass says when a branch depends on tensor values, which no input shape decides
VALUE_DEPENDENT = "control flow on tensor values (not shapes)"


class _LeafTracer(fx.Tracer):
    """A tracer that treats given qualified names as leaves and records where tracing failed.

    With ``specialize`` (module paths; ``""`` is the whole model) and ``inputs`` (example
    tensors, any device), code inside those modules sees concrete shapes (module docstring).
    """

    def __init__(self, leaves: set[str], specialize: set[str] = frozenset(), inputs: tuple | None = None):
        super().__init__()
        self.leaves = leaves
        self.failed_in: str | None = None
        self.specialize = set(specialize)
        self.inputs = inputs
        self._paths: list[str] = []  # qualified names of the modules being traced into, outermost first
        self._values: dict[fx.Node, object] = {}
        self._placeholders = 0
        self._evaluating = False

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves or isinstance(m, tuple(_LEAF_CLASSES)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:  # computing a meta value: run the module, record nothing
            return forward(*args, **kwargs)
        path = self.path_of_module(m)
        self._paths.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost module whose forward was running when the error was raised
            # is the first to see it: that is the smallest untraceable piece.
            if self.failed_in is None:
                self.failed_in = path
            raise
        finally:
            self._paths.pop()

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # -- the second pass: concrete shapes inside ``specialize``
    def proxy(self, node: fx.Node) -> fx.Proxy:
        if self.inputs is None:
            return super().proxy(node)
        if node.op == "placeholder":
            self._values[node] = (self.inputs[self._placeholders] if self._placeholders < len(self.inputs)
                                  else (node.args[0] if node.args else None))
            self._placeholders += 1
        return _ShapeProxy(node, self)

    def specializing(self) -> bool:
        """Whether the code running now belongs to a module traced with concrete shapes."""
        if self.inputs is None:
            return False
        return "" in self.specialize or any(p in self.specialize for p in self._paths)

    def value_of(self, node: fx.Node):
        """The node's value on the example inputs, computed on meta tensors (memoized)."""
        if node in self._values:
            return self._values[node]
        pending = [node]
        order = []
        while pending:  # every input this value needs, computed first
            n = pending.pop()
            if n in self._values or n in order:
                continue
            order.append(n)
            pending.extend(a for a in n.all_input_nodes if a not in self._values)
        index = {n: i for i, n in enumerate(node.graph.nodes)}
        self._evaluating = True
        try:
            with torch.no_grad():
                for n in sorted(order, key=index.__getitem__):
                    self._values[n] = self._evaluate(n)
        finally:
            self._evaluating = False
        return self._values[node]

    def _evaluate(self, n: fx.Node):
        args = node_arguments(n.args, self._values.__getitem__)
        kwargs = node_arguments(n.kwargs, self._values.__getitem__)
        if n.op == "get_attr":
            value = self.root
            for part in str(n.target).split("."):
                value = getattr(value, part)
            return value
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "call_module":
            return self.root.get_submodule(n.target)(*args, **kwargs)
        raise TraceError(f"no value for {n.op} {n.target}")

    def concrete(self, proxy: fx.Proxy):
        """The value of a proxy that Python code needs as a number: known from shapes, else an error."""
        try:
            value = self.value_of(proxy.node)
        except TraceError:
            raise
        except Exception as e:
            if "meta tensor" in str(e):  # .item() and the like: the value, not the shape, is needed
                raise TraceError(f"{VALUE_DEPENDENT}: {proxy.node.format_node()[:120]}") from e
            raise TraceError(f"could not compute {proxy.node.name} on the example input: {_one_line(e)}") from e
        if isinstance(value, torch.Tensor):
            raise TraceError(f"{VALUE_DEPENDENT}: {proxy.node.format_node()[:120]}")
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        if self.specializing():
            return bool(self.concrete(obj))
        return super().to_bool(obj)

    def iter(self, obj: fx.Proxy):
        if self.specializing():
            value = self.value_of(obj.node)
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)


class TraceError(Exception):
    """Why a module cannot be traced even with concrete shapes (a branch on tensor values, say)."""


#: tensor attributes and methods that answer with concrete values inside specialized modules
_SHAPE_ATTRIBUTES = {"shape", "ndim"}
_SHAPE_METHODS = {"size", "dim", "numel", "nelement"}


class _ShapeProxy(fx.Proxy):
    """A proxy that answers shape questions with numbers inside modules traced with concrete shapes."""

    def __getattr__(self, k: str):
        tracer = self.tracer
        if (k in _SHAPE_ATTRIBUTES or k in _SHAPE_METHODS) and tracer.specializing():
            value = tracer.value_of(self.node)
            if isinstance(value, torch.Tensor):
                return getattr(value, k)
        return super().__getattr__(k)

    def __setitem__(self, key, value) -> None:
        # ``attn[:, :, 1:] = ...``: an in-place write into a tensor, recorded where it happens (the graph
        # keeps node order). Anything else (a ``**kwargs`` dict) has no place in a graph.
        if not isinstance(self.tracer.value_of(self.node), torch.Tensor):
            raise TypeError(f"'{type(self).__name__}' object does not support item assignment")
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __len__(self) -> int:
        if self.tracer.specializing():
            return len(self.tracer.value_of(self.node))
        return super().__len__()

    def __int__(self) -> int:
        if self.tracer.specializing():
            return int(self.tracer.concrete(self))
        raise TraceError("symbolically traced variables cannot be converted to int")

    def __index__(self) -> int:
        if self.tracer.specializing():
            return operator.index(self.tracer.concrete(self))
        raise TypeError("symbolically traced variables cannot be used as an index")

    def __float__(self) -> float:
        if self.tracer.specializing():
            return float(self.tracer.concrete(self))
        raise TraceError("symbolically traced variables cannot be converted to float")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (as published counts are taken), restoring every module's flag after."""
    flags = [(m, m.training) for m in model.modules()]
    # Set the flags directly: an exported program's module refuses .eval(), and user
    # overrides of .train() (freezing BN, say) are not analysis's business.
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def trace(model: nn.Module, training: bool = False, inputs: tuple | None = None) -> TraceResult:
    """Trace ``model`` in eval mode with torch.fx, turning untraceable submodules into leaves.

    Eval mode, because Python control flow on ``self.training`` (auxiliary heads, dropout
    paths) is baked into the graph; ``training=True`` traces the training-mode graph instead
    (the channel graph needs the layers only training runs). A graph produced by
    ``torch.export`` (a ``.pt2`` program's module) is used as it is. With example
    ``inputs`` (tensors on any device; only their shapes and dtypes matter), the modules
    generic fx refuses are traced again with concrete shapes (module docstring).
    """
    if training:
        flags = [(m, m.training) for m in model.modules()]
        for m, _ in flags:
            m.training = True
        try:
            return _trace(model, inputs)
        finally:
            for m, flag in flags:
                m.training = flag
    with eval_mode(model):
        return _trace(model, inputs)


def _trace(model: nn.Module, inputs: tuple | None) -> TraceResult:
    """Trace, then undo what tracing wrote into the modules' own state (see :func:`_module_state`)."""
    model = _own_root(model)
    saved = _module_state(model)
    try:
        result = _trace_once(model)
        if inputs is not None and result.untraced and not isinstance(model, torch.jit.ScriptModule):
            result = _trace_specialized(model, result, inputs)
            if result.graph is None:
                result = _trace_exported(model, result, inputs)
        return result
    finally:
        _restore_proxy_state(saved)


def _own_root(model: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` to trace (the result's ``root``): its children, parameters and
    buffers are the user's (the same dicts), but what tracing writes on the root itself —
    torch.fx keeps the tensor constants a forward creates as ``_tensor_constant0…`` attributes of
    the traced root — lands on the copy, so analysis leaves the user's model as it was."""
    if isinstance(model, (torch.jit.ScriptModule, fx.GraphModule)):
        return model
    return copy.copy(model)


#: nn.Module's own bookkeeping (parameters, buffers, children, hook tables): never a forward's cache
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}


def _module_state(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    """A shallow snapshot of every module's plain attributes (containers copied one level deep).

    Forwards that cache tensors on the module (timm's LeViT keeps ``attention_bias_cache``
    keyed by device) store *proxies* there while torch.fx traces them. Left in place, the
    next trace of the same model (or of a deep copy) reads a proxy of the earlier graph and
    builds a graph whose nodes refer to another graph's nodes.
    """
    skip = _MODULE_INTERNALS
    out = []
    for module in model.modules():
        state = {}
        for key, value in vars(module).items():
            if key in skip:
                continue
            state[key] = (value, _shallow(value))
        out.append((module, state))
    return out


def _shallow(value):
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (list, set)):
        return type(value)(value)
    return None


def _is_proxy(value) -> bool:
    return isinstance(value, fx.Proxy)


def _is_meta(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_meta


def _holds(value, test, depth: int = 0) -> bool:
    if test(value):
        return True
    if depth > 2:
        return False
    if isinstance(value, dict):
        return any(_holds(v, test, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds(v, test, depth + 1) for v in value)
    return False


@contextlib.contextmanager
def meta_run_state(model: nn.Module) -> Iterator[None]:
    """Around a forward on meta tensors: put back module attributes it left holding meta tensors.

    Forwards that cache device-specific copies on the module (torchvision's AnchorGenerator
    moves ``cell_anchors`` to the input's device) would otherwise keep meta tensors, and
    the next real forward fails on them.
    """
    saved = _module_state(model)
    try:
        yield
    finally:
        _restore_state(saved, _is_meta)


def _restore_proxy_state(saved: list[tuple[nn.Module, dict]]) -> None:
    """Put back every attribute that tracing left holding a proxy; other changes are the model's own."""
    _restore_state(saved, _is_proxy)


def _restore_state(saved: list[tuple[nn.Module, dict]], test) -> None:
    """Put back every attribute that now holds a value ``test`` picks out (a proxy, a meta tensor)."""
    skip = _MODULE_INTERNALS
    for module, state in saved:
        attributes = vars(module)
        for key in [k for k in attributes if k not in skip]:
            value = attributes[key]
            before = state.get(key)
            if before is not None and value is before[0] and (
                    before[1] is None or not _changed(value, before[1])):
                continue  # untouched: it holds what it held before
            if not _holds(value, test):
                continue
            if key not in state:
                delattr(module, key)
                continue
            original, contents = state[key]
            if contents is not None and value is original:
                # the same container, filled in place: restore its contents, keep its identity
                value.clear()
                if isinstance(value, list):
                    value.extend(contents)
                else:
                    value.update(contents)
            else:
                object.__setattr__(module, key, original)


def _changed(container, contents) -> bool:
    """Whether a list/set/dict differs from its shallow copy ``contents`` (by identity of items)."""
    if len(container) != len(contents):
        return True
    if isinstance(container, dict):
        return any(contents.get(k, _MISSING) is not v for k, v in container.items())
    if isinstance(container, list):
        return any(a is not b for a, b in zip(container, contents))
    return container != contents


_MISSING = object()


def _trace_once(model: nn.Module) -> TraceResult:
    if isinstance(model, torch.jit.ScriptModule):
        return TraceResult(model, None, {"": "TorchScript module: torch.fx cannot trace it"}, "none")
    if isinstance(model, fx.GraphModule) and _is_export_graph(model):
        return TraceResult(model, model.graph, {}, "export")

    graph, leaves = _narrow(model)
    if graph is None:
        return TraceResult(model, None, leaves, "none")
    return TraceResult(model, graph, leaves, "fx")


def _narrow(model: nn.Module, fixed: frozenset = frozenset(), specialize: frozenset = frozenset(),
            inputs: tuple | None = None, concrete_args: dict | None = None) -> tuple[fx.Graph | None, dict[str, str]]:
    """Trace, turning the smallest module that fails into a leaf and retrying, until the graph builds.

    Returns the graph (None when even the model's own forward fails: then ``leaves[""]`` says
    why) and every module made a leaf, with the error that made it one. ``fixed`` modules are
    leaves from the start; ``specialize`` and ``inputs`` are :class:`_LeafTracer`'s.
    """
    leaves: dict[str, str] = {}
    for _ in range(sum(1 for _ in model.modules()) + 1):
        tracer = _LeafTracer(set(leaves) | fixed, specialize, inputs)
        try:
            return tracer.trace(model, concrete_args=concrete_args), leaves
        except Exception as e:  # any failure inside user code: narrow it down, then retry
            culprit = tracer.failed_in
            if not culprit or culprit in leaves:  # the model's own forward (or a leaf call) fails
                return None, {"": _one_line(e), **leaves}
            leaves[culprit] = _one_line(e)
    return None, {"": "tracing did not converge", **leaves}


def _trace_specialized(model: nn.Module, first: TraceResult, inputs: tuple) -> TraceResult:
    """The second pass: trace the leaves of ``first`` again with the inputs' concrete shapes.

    Parameters and inputs are meta tensors meanwhile (shapes without memory). A leaf that
    fails again at the same module keeps its reason from the first pass unless the new one
    says more (a branch on tensor values); a conv module that fails is called as one op.
    """
    metas = tuple(meta_like(x) if isinstance(x, torch.Tensor) else x for x in inputs)
    floating = [x.dtype for x in metas if isinstance(x, torch.Tensor) and x.is_floating_point()]
    refused = dict(first.untraced)
    convs = frozenset(n for n in refused if n and isinstance(model.get_submodule(n), nn.modules.conv._ConvNd))
    specialize = frozenset(refused) - convs
    concrete = _unfed_defaults(model, metas) if "" in specialize else None
    with meta_run_state(model), meta_parameters(model, floating[0] if floating else None):
        graph, leaves = _narrow(model, convs, specialize, metas, concrete)
    # a module that fails again keeps its first reason, unless the new one says more
    leaves = {n: why if VALUE_DEPENDENT in why or n not in refused else refused[n] for n, why in leaves.items()}
    if graph is None:  # the first pass stands; where its root failed too, with the better reason
        root = leaves.get("", "")
        if first.graph is None and VALUE_DEPENDENT in root:
            return dataclasses.replace(first, untraced={**first.untraced, "": root})
        return first
    specialized = {n: why for n, why in refused.items()
                   if n not in convs and n not in leaves and not any(_inside(n, leaf) for leaf in leaves)}
    return TraceResult(model, graph, leaves, "fx", specialized, {n: refused[n] for n in convs})


def _trace_exported(model: nn.Module, first: TraceResult, inputs: tuple) -> TraceResult:
    """The last resort for a model whose own forward fx cannot trace even with concrete shapes
    (HuggingFace models: ``**kwargs`` forwards, output dataclasses): ``torch.export`` in non-strict
    mode at the inputs' shapes, an aten-level graph that keeps each op's module path.

    The graph's root is the exported module (the model's parameters under their own names);
    its convs are called as aten ops, so they are costed and planned, but not swapped in place.
    """
    why = first.untraced.get("", "the model's forward cannot be traced")
    # export traces with fake tensors: real inputs of the right shape, never filled
    real = tuple(torch.empty(x.shape, dtype=x.dtype) if isinstance(x, torch.Tensor) else x for x in inputs)
    try:
        with meta_run_state(model), _quiet():
            program = torch.export.export(model, real, strict=False)
    except Exception as e:  # noqa: BLE001 - any failure keeps the fx result and says why
        untraced = dict(first.untraced)
        untraced[""] = f"{why}; torch.export: {_one_line(e).split('. ')[0]}"
        return dataclasses.replace(first, untraced=untraced)
    module = program.module()
    return TraceResult(module, module.graph, {}, "export", {"": f"{why} (traced with torch.export at the input shapes)"})


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence what torch.export prints or logs while it fails (whole graphs on data-dependent errors)."""
    import io
    import logging

    loggers = [logging.getLogger(n) for n in ("torch", "torch._dynamo", "torch._export", "torch.export",
                                               "torch.fx.experimental.symbolic_shapes", "torch._subclasses")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def fetch_attr(root: nn.Module, target: str):
    """The attribute a ``get_attr`` node names (a dotted path from ``root``)."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def node_arguments(a, lookup):
    """A node's args or kwargs with each node replaced by ``lookup(node)``, as plain (mutable) lists
    and dicts: a wrapped function (``torch.fx.wrap``) may change the list it is given."""
    if isinstance(a, fx.Node):
        return lookup(a)
    if isinstance(a, tuple):
        return tuple(node_arguments(x, lookup) for x in a)
    if isinstance(a, list):
        return [node_arguments(x, lookup) for x in a]
    if isinstance(a, dict):
        return {k: node_arguments(v, lookup) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(node_arguments(a.start, lookup), node_arguments(a.stop, lookup), node_arguments(a.step, lookup))
    return a


def _unfed_defaults(model: nn.Module, inputs: tuple) -> dict | None:
    """The model's own forward parameters that the inputs do not feed, at their defaults.

    Traced with concrete shapes, ``if targets is not None:`` must see the ``None`` that this
    call passes (a placeholder proxy is never ``None``), as torchvision's detection models need.
    """
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unfed = {p.name: p.default for p in named[len(inputs):] if p.default is not inspect.Parameter.empty}
    return unfed or None


def _inside(name: str, outer: str) -> bool:
    return outer == "" or name == outer or name.startswith(outer + ".")


def meta_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A meta tensor with ``t``'s shape and strides. (``torch.empty_like`` of a meta tensor goes
    through a Python reference whose first call imports sympy: most of a second.)"""
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device="meta")


@contextlib.contextmanager
def meta_parameters(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[dict[int, str]]:
    """Swap every parameter and buffer for a meta tensor; yield ``id(meta tensor) -> name``.

    Shared tensors stay shared (one meta tensor per original), so a parameter used at two
    call sites is recognized as one; a module reachable under two names is swapped once
    (and put back once). ``dtype`` casts floating-point tensors.
    """
    replacements: dict[int, torch.Tensor] = {}
    names: dict[int, str] = {}
    saved: list[tuple[dict, str, object]] = []
    swapped: set[tuple[int, str]] = set()
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for key, t in list(store.items()):
                if t is None or (id(store), key) in swapped:
                    continue
                swapped.add((id(store), key))
                meta = replacements.get(id(t))
                if meta is None:
                    target = dtype if dtype is not None and t.is_floating_point() else t.dtype
                    meta = meta_like(t, target)
                    if isinstance(t, nn.Parameter):
                        meta = nn.Parameter(meta, requires_grad=t.requires_grad)
                    replacements[id(t)] = meta
                    names[id(meta)] = f"{mod_name}.{key}" if mod_name else key
                saved.append((store, key, t))
                store[key] = meta
    try:
        yield names
    finally:
        for store, key, t in reversed(saved):
            store[key] = t


def _is_export_graph(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}"[:300]
