"""Writing a converted model: the whole module, its state_dict, standalone code, ONNX.

Every writer goes through a temporary file (or folder) and a rename, so a failure never
leaves a half-written output behind.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
import tempfile
import textwrap
import types
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_flatten_with_path

from .errors import UsageError
from .files import atomic_write
from .rewrite import run_eval


def check_output_path(path: str | os.PathLike, inputs: list[str] = (), what: str = "output") -> Path:
    """Refuse an output path in a missing folder, or one that is also an input."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write {what} {target}: folder {folder} does not exist")
    for src in inputs:
        # a spec may be file.py:NAME; compare the file part
        src_path = Path(src) if Path(src).exists() or ":" not in src else Path(src.rsplit(":", 1)[0])
        if src_path.resolve() == target.resolve():
            raise UsageError(f"refusing to overwrite the input {src} with the {what}")
    return target


MODEL_SUFFIXES = (".pt", ".pth", ".pt2")


def save_model(model: nn.Module, path: str | os.PathLike, inputs: tuple | None = None) -> str:
    """Save the whole model; returns a sentence saying how to load it.

    ``.pt``/``.pth``: ``torch.save`` of the module (a pickle: it trains and fine-tunes, and
    loading needs dsrewrite and the modules its classes come from). ``.pt2``: a
    ``torch.export`` program of the eval-mode forward on ``inputs`` (portable, needs no source,
    inference only; the batch axis is dynamic when the model allows it).
    """
    if str(path).lower().endswith(".pt2"):
        if inputs is None:
            raise UsageError(".pt2 needs example inputs to export with")
        program, dynamic = _export_program(model, inputs)
        atomic_write(path, lambda tmp: torch.export.save(program, tmp))
        return (f"a torch.export program (no source needed; inference only; batch "
                f"{'dynamic' if dynamic else 'fixed'}): torch.export.load(path).module()")
    atomic_write(path, lambda tmp: torch.save(model, tmp))
    needs = pickle_modules(model)
    where = "; ".join(f"{name} ({file})" if file else name for name, file in needs.items())
    return ("a pickled module: torch.load(path, weights_only=False) needs dsrewrite" +
            (f" and {where} importable (dsrewrite itself finds {', '.join(needs)} beside the file or in the "
             "current folder)" if needs else "") + "; for a file that needs no source, write .pt2 or --export-code")


def pickle_modules(model: nn.Module) -> dict[str, str | None]:
    """Module name -> source file of every class a pickle of ``model`` refers to, besides torch and dsrewrite."""
    out: dict[str, str | None] = {}
    for m in model.modules():
        name = type(m).__module__
        file = getattr(sys.modules.get(name), "__file__", None)
        installed = file is not None and any(part in Path(file).parts for part in ("site-packages", "dist-packages"))
        if name.split(".")[0] in ("torch", "dsrewrite", "builtins") or installed:
            continue  # installed packages (torchvision, timm) load wherever they are installed
        out[name] = os.path.relpath(file) if file and not os.path.relpath(file).startswith("..") else file
    return out


def _export_program(model: nn.Module, inputs: tuple):
    """``torch.export`` of the eval-mode model: with a dynamic batch axis when it allows one, else as it is."""
    from .trace import eval_mode

    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    with eval_mode(model):
        if tensors and all(x.dim() for x in tensors):
            batch = torch.export.Dim("batch", min=1)
            doubled = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) else x for x in inputs)
            try:
                shapes = tuple({0: batch} if isinstance(x, torch.Tensor) else None for x in inputs)
                return torch.export.export(model, doubled, dynamic_shapes=shapes), True
            except Exception:
                pass  # the forward fixes the batch size: export it as it is
        try:
            return torch.export.export(model, inputs), False
        except Exception as e:
            raise UsageError(f"-o .pt2: torch.export cannot export this model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); write .pt instead") from e


def save_state_dict(model: nn.Module, path: str | os.PathLike) -> None:
    """``torch.save(model.state_dict())``."""
    atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))


def export_onnx(model: nn.Module, inputs: tuple, path: str | os.PathLike, *, dynamic_batch: bool = True,
                opset: int | None = None) -> dict:
    """ONNX export that deploys: named inputs and outputs, a dynamic batch axis, checked in onnxruntime.

    Inputs are named after ``forward``'s parameters, outputs after the keys of a dict output
    (``logits``, ``boxes``; nested keys joined with ``.``), else ``output`` / ``output_0`` ...
    With ``dynamic_batch`` (the default) the first axis of every input, and of every output
    that carries the batch, is named ``batch``. When onnxruntime is installed, the file is run
    at the example batch size and at one more, and compared with torch, before it is moved into
    place. Returns what was written: names, dynamic axes, opset, and the check's result.
    """
    if importlib.util.find_spec("onnx") is None:
        raise UsageError("--onnx needs the onnx package: pip install onnx")
    from .trace import eval_mode

    input_names = _input_names(model, inputs)
    outputs = run_eval(model, inputs)
    output_names = _output_names(outputs)
    batch = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim()), None)
    dynamic = {}
    if dynamic_batch and batch is not None:
        dynamic = {n: {0: "batch"} for n, x in zip(input_names, inputs) if isinstance(x, torch.Tensor) and x.dim()}
        flat = tree_flatten(outputs)[0]
        dynamic.update({n: {0: "batch"} for n, t in zip(output_names, flat)
                        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch})
    tensor_inputs = [n for n, x in zip(input_names, inputs) if isinstance(x, torch.Tensor)]
    info = {"inputs": tensor_inputs, "outputs": output_names, "dynamic_axes": dynamic, "opset": opset,
            "checked": None}

    def write(tmp):
        with eval_mode(model), torch.no_grad():
            kwargs = dict(input_names=input_names, output_names=output_names, dynamic_axes=dynamic or None)
            if opset is not None:
                kwargs["opset_version"] = opset
            try:
                torch.onnx.export(model, inputs, tmp, dynamo=False, **kwargs)
            except TypeError:  # torch without the dynamo switch
                torch.onnx.export(model, inputs, tmp, **kwargs)
            except Exception as e:
                raise UsageError(f"--onnx: the exporter failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        info["checked"] = _check_onnx(model, inputs, tmp, tensor_inputs, batch if dynamic else None)

    atomic_write(path, write)
    return info


def _input_names(model: nn.Module, inputs: tuple) -> list[str]:
    """``forward``'s parameter names for the positional inputs (``input``, ``input_1`` ... when unknown)."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:len(inputs)]]
    names += [f"input_{i}" if i else "input" for i in range(len(names), len(inputs))]
    return names


def _output_names(outputs) -> list[str]:
    """Names for the flattened outputs: dict keys (nested ones joined with "."), else output / output_i."""
    leaves = tree_flatten_with_path(outputs)[0]
    if len(leaves) == 1 and not leaves[0][0]:
        return ["output"]
    names = []
    for i, (path, _) in enumerate(leaves):
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
        named = any(hasattr(k, "key") or hasattr(k, "name") for k in path)
        names.append(".".join(keys) if named else f"output_{i}")
    return names


def _check_onnx(model: nn.Module, inputs: tuple, path, names: list[str], batch: int | None) -> dict | None:
    """Run the exported file in onnxruntime (when installed) and compare with torch; at batch and batch + 1."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sizes = [batch, batch + 1] if batch is not None else [None]
    worst = 0.0
    for size in sizes:
        feed_inputs = tuple(_resize_batch(x, size) for x in inputs)
        expected = [t for t in tree_flatten(run_eval(model, feed_inputs))[0] if isinstance(t, torch.Tensor)]
        feed = {n: x.detach().cpu().numpy() for n, x in zip(names, [x for x in feed_inputs
                                                                   if isinstance(x, torch.Tensor)])}
        try:
            got = session.run(None, feed)
        except Exception as e:
            what = f" at batch {size}" if size is not None else ""
            raise UsageError(f"--onnx: the exported model fails in onnxruntime{what} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); the forward probably fixes the batch size "
                             "(e.g. view(1, -1)): use --onnx-static") from None
        for want, have in zip(expected, got):
            have = torch.from_numpy(have)
            if have.shape != want.shape:
                raise UsageError(f"--onnx: onnxruntime returns shape {tuple(have.shape)} where torch returns "
                                 f"{tuple(want.shape)} at batch {size}; use --onnx-static")
            scale = float(want.abs().max()) or 1.0
            worst = max(worst, float((have - want.float()).abs().max()) / scale)
    if worst > 1e-3:
        raise UsageError(f"--onnx: onnxruntime's outputs differ from torch's by {worst:.2g} (relative to the "
                         "largest output)")
    return {"runtime": f"onnxruntime {ort.__version__}", "batch_sizes": sizes, "max_relative_difference": worst}


def _resize_batch(x, size: int | None):
    if size is None or not isinstance(x, torch.Tensor) or not x.dim() or x.shape[0] == size:
        return x
    reps = -(-size // x.shape[0])
    return torch.cat([x] * reps)[:size] + 0.01 * torch.randn(size, *x.shape[1:], dtype=x.dtype) \
        if x.is_floating_point() else torch.cat([x] * reps)[:size]


# ------------------------------------------------------------------------- standalone code

_HEADER = '''"""{title}

Generated by dsrewrite {version} from {source}. It needs only PyTorch:

    from {module} import load_model
    model = load_model()          # weights from weights.pt beside this file
"""
import os

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_flatten_with_path
'''

_LOADER = '''

def load_model(weights=None, map_location="cpu", train=False):
    """Build the model and load its weights, in eval mode unless ``train``.

    ``weights`` defaults to weights.pt beside this file; the state_dict written by
    ``dsrewrite convert --state-dict`` has the same keys and loads as well.
    """
    model = {cls}()
    path = weights or os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights.pt")
    model.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))
    return model.train(train)
'''


def export_code(model: nn.Module, inputs: tuple, folder: str | os.PathLike, source: str = "a model",
                class_name: str = "ConvertedModel") -> Path:
    """Write ``model.py`` (readable, torch-only source of ``model``) and ``weights.pt`` into ``folder``.

    The model is traced with torch.fx; every module the graph calls must be a plain
    ``torch.nn`` layer (dsrewrite's own blocks are traced through). The written code is
    imported back and checked against ``model`` on ``inputs`` before anything is moved
    into place.
    """
    from . import __version__
    from .trace import trace

    target = Path(folder)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"cannot write code to {target}: folder {parent} does not exist")
    traced = trace(model)
    if traced.graph is None or traced.untraced:
        names = ", ".join(n or "(whole model)" for n in traced.untraced)
        raise UsageError(f"--export-code needs a model torch.fx can trace; untraced: {names}")
    graph = fx.Graph()
    out = graph.graph_copy(traced.graph, {})
    graph.output(out)
    # The generated class keeps the original module paths (``stem.0``, ``layer1.0.conv1``), so its
    # state_dict keys are the converted model's own: weights.pt and a --state-dict file share one layout.
    init_lines, state, made = [], {}, {""}

    def container(path: str) -> str:
        """Source for the parent module of ``path``, creating empty parent containers on the way."""
        up = path.rpartition(".")[0]
        if up and up not in made:
            container(up)
            init_lines.append(f"{_at(up.rpartition('.')[0])}.add_module({up.rpartition('.')[2]!r}, nn.Module())")
            made.add(up)
        return _at(up)

    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        original = str(node.target)
        if original in made:
            continue
        owner = container(original)
        leaf = original.rpartition(".")[2]
        made.add(original)
        if node.op == "call_module":
            module = model.get_submodule(original)
            init_lines.append(f"{owner}.add_module({leaf!r}, {_constructor(original, module)})")
            state.update({f"{original}.{k}": v for k, v in module.state_dict().items()})
        else:
            value = _fetch(model, original)
            if not isinstance(value, torch.Tensor):
                raise UsageError(f"--export-code: attribute {original} is a {type(value).__name__}, not a tensor")
            shape, dtype = tuple(value.shape), str(value.dtype)
            empty = f"torch.empty({shape}, dtype={dtype})"
            init_lines.append(f"{owner}.register_parameter({leaf!r}, nn.Parameter({empty}))"
                              if isinstance(value, nn.Parameter) else f"{owner}.register_buffer({leaf!r}, {empty})")
            state[original] = value.detach()
    code = graph.python_code(root_module="self")
    used = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code.src))
    imports = _imports({k: v for k, v in code.globals.items() if k in used})
    body = textwrap.indent(code.src.strip("\n"), "    ")
    init = textwrap.indent("\n".join(["super().__init__()"] + init_lines), "        ")
    source_text = "\n".join([
        _HEADER.format(title=f"{class_name}: a standalone copy of a model converted by dsrewrite.",
                       version=__version__, source=source, module="model"),
        *(imports + [""] if imports else []), "",
        f"class {class_name}(nn.Module):",
        '    """The converted model, flattened to plain torch.nn layers."""',
        "",
        "    def __init__(self):",
        init,
        "",
        body,
        _LOADER.format(cls=class_name),
    ])
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=parent) as tmp:
        (Path(tmp) / "model.py").write_text(source_text)
        torch.save(state, Path(tmp) / "weights.pt")
        _verify(model, Path(tmp), inputs)
        target.mkdir(exist_ok=True)
        for name in ("model.py", "weights.pt"):
            os.replace(Path(tmp) / name, target / name)
    return target / "model.py"


def _at(path: str) -> str:
    """Source that reaches the submodule at ``path`` from ``self``."""
    return f"self.get_submodule({path!r})" if path else "self"


def _constructor(name: str, module: nn.Module) -> str:
    """Source that rebuilds a plain torch.nn layer, checked to rebuild the same parameter shapes."""
    cls = type(module)
    if not cls.__module__.startswith("torch.nn") or getattr(nn, cls.__name__, None) is not cls:
        raise UsageError(f"--export-code: {name} is a {cls.__module__}.{cls.__name__}, which has no torch-only "
                         "source; only plain torch.nn layers can be written out")
    text = f"nn.{repr(module)}"
    try:
        rebuilt = eval(text, {"nn": nn, "torch": torch, "inf": float("inf")})  # noqa: S307 (our own repr)
    except Exception:
        rebuilt = None
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if rebuilt is None or {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} != expected:
        raise UsageError(f"--export-code: cannot rebuild {name} ({cls.__name__}) from its repr")
    return text


def _fetch(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _imports(globals_: dict) -> list[str]:
    lines = []
    for name, value in sorted(globals_.items()):
        if name in ("torch", "nn", "os") or (hasattr(__builtins__, name) if not isinstance(__builtins__, dict)
                                              else name in __builtins__):
            continue
        if value is type(None):
            lines.append(f"{name} = type(None)")
        elif isinstance(value, types.ModuleType):
            lines.append(f"import {value.__name__}" + (f" as {name}" if name != value.__name__ else ""))
        elif isinstance(value, float) and name in ("inf", "nan"):
            lines.append(f"from math import {name}")
        elif getattr(value, "__module__", "") and (value.__module__.split(".")[0] in ("torch", "math", "operator",
                                                                                     "_operator", "builtins")):
            lines.append(f"from {value.__module__} import {value.__qualname__} as {name}")
        else:
            raise UsageError(f"--export-code: the forward uses {name} ({value!r}), which is not part of torch")
    return lines


def _verify(model: nn.Module, folder: Path, inputs: tuple) -> None:
    spec = importlib.util.spec_from_file_location(f"_dsrewrite_export_{abs(hash(str(folder)))}", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        standalone = module.load_model(str(folder / "weights.pt"))
        ok = _same(run_eval(model, inputs), run_eval(standalone, inputs))
    except Exception as e:
        raise UsageError(f"--export-code: the generated code does not run ({type(e).__name__}: {e})") from e
    finally:
        sys.modules.pop(spec.name, None)
    if not ok:
        raise UsageError("--export-code: the generated code does not reproduce the model's outputs")


def _same(a, b) -> bool:
    fa, fb = tree_flatten(a)[0], tree_flatten(b)[0]
    return len(fa) == len(fb) and all(
        torch.allclose(x, y, rtol=1e-4, atol=1e-5) if isinstance(x, torch.Tensor) else x == y for x, y in zip(fa, fb))

