"""Stage 2, trace: a torch.fx graph of the model, with untraceable parts kept as leaves.

``torch.fx`` cannot enter code with data-dependent control flow, tuple unpacking of
proxies and the like. Rather than give up, :func:`trace` marks the smallest module whose
``forward`` failed as a leaf (an opaque call in the graph) and traces again, until the
graph builds. The profiler still costs every op inside a leaf at dispatch level; the
report lists each leaf and the error that made it one.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

    @property
    def traced(self) -> bool:
        """Whether a graph exists."""
        return self.graph is not None


class _LeafTracer(fx.Tracer):
    """A tracer that treats given qualified names as leaves and records where tracing failed."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves or isinstance(m, tuple(_LEAF_CLASSES)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost module whose forward was running when the error was raised
            # is the first to see it: that is the smallest untraceable piece.
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


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


def trace(model: nn.Module, training: bool = False) -> TraceResult:
    """Trace ``model`` in eval mode with torch.fx, turning untraceable submodules into leaves.

    Eval mode, because Python control flow on ``self.training`` (auxiliary heads, dropout
    paths) is baked into the graph; ``training=True`` traces the training-mode graph instead
    (the channel graph needs the layers only training runs). A graph produced by
    ``torch.export`` (a ``.pt2`` program's module) is used as it is.
    """
    if training:
        flags = [(m, m.training) for m in model.modules()]
        for m, _ in flags:
            m.training = True
        try:
            return _trace(model)
        finally:
            for m, flag in flags:
                m.training = flag
    with eval_mode(model):
        return _trace(model)


def _trace(model: nn.Module) -> TraceResult:
    """Trace, then undo what tracing wrote into the modules' own state (see :func:`_module_state`)."""
    saved = _module_state(model)
    try:
        return _trace_once(model)
    finally:
        _restore_proxy_state(saved)


def _module_state(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    """A shallow snapshot of every module's plain attributes (containers copied one level deep).

    Forwards that cache tensors on the module (timm's LeViT keeps ``attention_bias_cache``
    keyed by device) store *proxies* there while torch.fx traces them. Left in place, the
    next trace of the same model (or of a deep copy) reads a proxy of the earlier graph and
    builds a graph whose nodes refer to another graph's nodes.
    """
    skip = {"_parameters", "_buffers", "_modules"}
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


def _holds_proxy(value, depth: int = 0) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if depth > 2:
        return False
    if isinstance(value, dict):
        return any(_holds_proxy(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_proxy(v, depth + 1) for v in value)
    return False


def _restore_proxy_state(saved: list[tuple[nn.Module, dict]]) -> None:
    """Put back every attribute that tracing left holding a proxy; other changes are the model's own."""
    skip = {"_parameters", "_buffers", "_modules"}
    for module, state in saved:
        for key in [k for k in vars(module) if k not in skip]:
            value = vars(module)[key]
            if not _holds_proxy(value):
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


def _trace_once(model: nn.Module) -> TraceResult:
    if isinstance(model, torch.jit.ScriptModule):
        return TraceResult(model, None, {"": "TorchScript module: torch.fx cannot trace it"}, "none")
    if isinstance(model, fx.GraphModule) and _is_export_graph(model):
        return TraceResult(model, model.graph, {}, "export")

    leaves: dict[str, str] = {}
    for _ in range(sum(1 for _ in model.modules()) + 1):
        tracer = _LeafTracer(set(leaves))
        try:
            graph = tracer.trace(model)
            return TraceResult(model, graph, leaves, "fx")
        except Exception as e:  # any failure inside user code: narrow it down, then retry
            reason = _one_line(e)
            culprit = tracer.failed_in
            if not culprit or culprit in leaves:
                untraced = {"": reason, **leaves}
                return TraceResult(model, None, untraced, "none")
            leaves[culprit] = reason
    return TraceResult(model, None, {"": "tracing did not converge", **leaves}, "none")


def _is_export_graph(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}"[:300]
