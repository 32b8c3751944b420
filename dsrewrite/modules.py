"""The per-module view of a profile: params and MACs of every module, rolled up its tree.

What torchinfo, fvcore and ptflops users expect: every module (not only convs), each with
its own subtree's parameters (trainable and frozen) and MACs, and its share of the model,
to a chosen depth. MACs come from the profile's per-module attribution (every op is
charged to the innermost module running it); parameters from the module tree, each tensor
counted once even when modules share it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn


@dataclasses.dataclass
class ModuleRow:
    """One module and its whole subtree."""

    name: str  # "" for the model itself
    type: str
    depth: int  # 0 for the model, 1 for its children, ...
    params: int
    trainable: int
    macs: int
    params_share: float
    macs_share: float
    leaf: bool  # no child modules

    @property
    def frozen(self) -> int:
        """Parameters that do not require grad."""
        return self.params - self.trainable

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {**dataclasses.asdict(self), "frozen": self.frozen}


def module_rows(model: nn.Module, module_macs: dict[str, int], depth: int | None = None) -> list[ModuleRow]:
    """Every module of ``model`` in definition order (depth-first), down to ``depth`` levels (None: all).

    ``module_macs`` is :attr:`~dsrewrite.profile.ModelProfile.module_macs`; MACs charged to a
    path that is not a module of ``model`` (a name from a traced graph) go to its nearest ancestor.
    """
    modules = dict(model.named_modules())
    own: dict[str, int] = {name: 0 for name in modules}
    for path, macs in module_macs.items():
        while path and path not in own:
            path = path.rpartition(".")[0]
        own[path if path in own else ""] += macs
    tensors: dict[str, set[int]] = {}
    sizes: dict[int, tuple[int, bool]] = {}
    for name, mod in modules.items():
        ids = set()
        for p in mod.parameters(recurse=False):
            sizes[id(p)] = (p.numel(), p.requires_grad)
            ids.add(id(p))
        tensors[name] = ids
    total_params = sum(n for n, _ in sizes.values())
    total_macs = sum(own.values())
    # every module's tensors and MACs go to it and to each of its ancestors
    subtree_ids: dict[str, set[int]] = {name: set() for name in modules}
    subtree_macs: dict[str, int] = {name: 0 for name in modules}
    for name in modules:
        for ancestor in _ancestors(name, modules):
            subtree_ids[ancestor] |= tensors[name]
            subtree_macs[ancestor] += own[name]
    rows = []
    for name, mod in modules.items():
        level = 0 if not name else name.count(".") + 1
        if depth is not None and level > depth:
            continue
        ids = subtree_ids[name]
        params = sum(sizes[i][0] for i in ids)
        trainable = sum(sizes[i][0] for i in ids if sizes[i][1])
        macs = subtree_macs[name]
        rows.append(ModuleRow(name, type(mod).__name__, level, params, trainable, macs,
                              params / total_params if total_params else 0.0,
                              macs / total_macs if total_macs else 0.0,
                              leaf=not any(True for _ in mod.children())))
    return rows


def parametrized_layers(model: nn.Module, module_macs: dict[str, int]) -> list[dict[str, Any]]:
    """Every leaf module that holds parameters (conv, linear, norm, embedding, ...) with its params and MACs.

    What ``check --why`` and ``compare`` line up between two versions of a model.
    """
    return [{"name": r.name, "type": r.type, "params": r.params, "macs": r.macs}
            for r in module_rows(model, module_macs) if r.leaf and r.params and r.name]


def block_rows(model: nn.Module, module_macs: dict[str, int], depth: int = 2) -> list[dict[str, Any]]:
    """Modules with children down to ``depth`` levels, with params and MACs (the blocks ``check --why`` names)."""
    return [{"name": r.name, "type": r.type, "depth": r.depth, "params": r.params, "macs": r.macs}
            for r in module_rows(model, module_macs, depth) if r.name and not r.leaf]


def _ancestors(name: str, modules: dict) -> list[str]:
    """``name`` and every enclosing module path that is a module, up to the model ("")."""
    out = [name]
    while name:
        name = name.rpartition(".")[0]
        if name in modules or not name:
            out.append(name)
    return out
