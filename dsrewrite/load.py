"""Stage 1, load: turn a model spec (a file, a module path, a zoo name, a saved model) into a module.

Spec grammar (see README):

* ``path/to/file.py`` — the model is found by convention (``build_model`` / ``get_model`` /
  ``create_model``, then a module-level ``model``, then the one ``nn.Module`` subclass the file
  defines that takes no arguments). ``example_inputs()`` or ``INPUT_SHAPE`` in the file give
  the default input.
* ``path/to/file.py:NAME`` and ``package.module:NAME`` — a factory, a class or an instance.
* ``torchvision:NAME`` and ``timm:NAME`` — zoo models with random weights.
* ``transformers:NAME`` — a HuggingFace model built from its config, random weights, nothing
  downloaded: a model class (``transformers:BertModel``, its default config), a config file or
  folder (``transformers:path/to/config.json``), or a hub id whose config is already in the
  local cache (``transformers:bert-base-uncased``). ``--arg key=value`` overrides config fields.
* ``model.pt`` / ``model.pth`` — a TorchScript archive, or a pickled module (``trust_pickle``).
* ``program.pt2`` — a ``torch.export`` program.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import importlib
import keyword
import importlib.util
import inspect
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import InputError, ModelLoadError, UsageError

FACTORY_NAMES = ("build_model", "get_model", "create_model")
DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)
DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "double": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32,
}


@dataclasses.dataclass
class LoadedModel:
    """A model and what the loader learned about it."""

    model: nn.Module
    spec: str
    #: Inputs the model's source proposes (``example_inputs()``, ``INPUT_SHAPE``, a .pt2's own inputs).
    example_inputs: tuple | None = None
    #: The file and line where the model is defined, when known (for CI annotations).
    source_file: str | None = None
    source_line: int | None = None
    #: ``python`` (fx-traceable source), ``torchscript``, ``export`` or ``pickle``.
    origin: str = "python"


def parse_kwargs(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``['num_classes=10', 'name=tiny'] -> {'num_classes': 10, 'name': 'tiny'}``."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"--arg expects key=value with a Python identifier as key, got {pair!r}")
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out


def load_model(spec: str, kwargs: dict[str, Any] | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Resolve a model spec to a :class:`LoadedModel`; raises :class:`ModelLoadError` on failure."""
    kwargs = kwargs or {}
    spec = spec.strip()
    if not spec:
        raise ModelLoadError("empty model spec: give a file (model.py), module:NAME or torchvision:NAME")
    zoo, sep, name = spec.partition(":")
    if sep and zoo in ("torchvision", "timm"):
        return _load_zoo(zoo, name, kwargs, spec)
    if sep and zoo == "transformers":
        return _load_transformers(name.strip(), kwargs, spec)
    path_part, name = _split_file_spec(spec)
    suffix = Path(path_part).suffix.lower()
    if suffix in (".pt", ".pth", ".ts", ".pt2", ".pkl", ".bin"):
        if name:
            raise ModelLoadError(f"{spec}: a saved model takes no :NAME part")
        if kwargs:
            raise UsageError("--arg is for factories; a saved model takes no arguments")
        return _load_saved(Path(path_part), trust_pickle, spec)
    if suffix == ".py" or os.sep in path_part or "/" in path_part:
        return _load_file(Path(path_part), name, kwargs, spec)
    if sep:
        return _load_module_attr(path_part, name, kwargs, spec)
    raise ModelLoadError(
        f"cannot read model spec {spec!r}: give a file (model.py or model.py:NAME), "
        "package.module:NAME, torchvision:NAME, timm:NAME, or a saved .pt/.pth/.pt2 file"
    )


def _split_file_spec(spec: str) -> tuple[str, str]:
    """Split ``file.py:NAME`` (a Windows drive letter ``C:`` is not a separator)."""
    head, sep, tail = spec.rpartition(":")
    if not sep or (len(head) == 1 and head.isalpha()) or "/" in tail or "\\" in tail:
        return spec, ""
    return head, tail


# ---------------------------------------------------------------------------------- zoo


def _load_zoo(zoo: str, name: str, kwargs: dict, spec: str) -> LoadedModel:
    if not name:
        raise ModelLoadError(f"{spec}: name a model, e.g. {zoo}:resnet50")
    try:
        lib = importlib.import_module("torchvision.models" if zoo == "torchvision" else "timm")
    except ImportError:
        raise ModelLoadError(f"{spec}: {zoo} is not installed; run: pip install {zoo}") from None
    if zoo == "torchvision":
        available = sorted(lib.list_models())
        if name not in available:
            raise ModelLoadError(f"{spec}: torchvision has no model {name!r}{_did_you_mean(name, available)}")
        build: Callable = lambda: lib.get_model(name, weights=None, **kwargs)  # noqa: E731
        factory = getattr(lib, name, None)
    else:
        available = sorted(lib.list_models())
        if name not in available:
            raise ModelLoadError(f"{spec}: timm has no model {name!r}{_did_you_mean(name, available)}")
        build = lambda: lib.create_model(name, pretrained=False, **kwargs)  # noqa: E731
        factory = None
    model = _call_factory(build, f"{zoo} {name}()", kwargs, factory)
    file, line = _source_of(factory or type(model))
    return LoadedModel(model, spec, None, file, line)


def _load_transformers(name: str, kwargs: dict, spec: str) -> LoadedModel:
    """A HuggingFace model from a config (see the module docstring); its example input from the config."""
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(f"{spec}: transformers is not installed; run: pip install 'dsrewrite[transformers]'") \
            from None
    if not name:
        raise ModelLoadError(f"{spec}: name a model: transformers:BertModel, transformers:path/to/config.json, or a "
                             "hub id whose config is in the local cache")
    path = Path(name)
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    try:
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            config = cls.config_class(**kwargs)
            build: Callable = lambda: cls(config)  # noqa: E731
        else:
            if name.endswith(".json") or os.sep in name or path.exists():
                if not path.exists():
                    raise ModelLoadError(f"{spec}: {name}: no such file")
                config = transformers.AutoConfig.from_pretrained(str(path), **kwargs)
            else:
                try:
                    config = transformers.AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
                except OSError:
                    classes = [n for n in dir(transformers) if n.endswith("Model")]
                    raise ModelLoadError(
                        f"{spec}: no config for {name!r} in the local Hugging Face cache, and dsrewrite downloads "
                        "nothing; give transformers:path/to/config.json or a model class such as transformers:BertModel"
                        f"{_did_you_mean(name, classes)}") from None
            build = lambda: transformers.AutoModel.from_config(config)  # noqa: E731
    except ModelLoadError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{spec}: the config cannot be built: {type(e).__name__}: {e}") from None
    known = set(type(config)().to_dict())
    unknown = [k for k in kwargs if k not in known]
    if unknown:  # a config takes any key silently; a typo would change nothing
        raise ModelLoadError(f"{spec}: {type(config).__name__} has no field {unknown[0]!r}"
                             f"{_did_you_mean(unknown[0], sorted(known))}")
    model = _call_factory(build, f"transformers {name}", kwargs, None).eval()
    file, line = _source_of(type(model))
    return LoadedModel(model, spec, _transformers_inputs(model, config), file, line)


#: sequence length of a text model's default example input (capped by its position embeddings)
TEXT_LENGTH = 128


def _transformers_inputs(model: nn.Module, config) -> tuple | None:
    """The example input a HuggingFace model's config implies: token ids or pixels (meta tensors)."""
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        length = min(TEXT_LENGTH, getattr(config, "max_position_embeddings", TEXT_LENGTH) or TEXT_LENGTH)
        return (torch.zeros((1, length), dtype=torch.long, device="meta"),)
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return (torch.empty((1, getattr(config, "num_channels", 3), *size), device="meta"),)
    if main == "input_values":  # audio waveforms: one second at 16 kHz
        return (torch.empty((1, 16000), device="meta"),)
    return None


def _did_you_mean(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# ---------------------------------------------------------------------------- python files


def _load_file(path: Path, name: str, kwargs: dict, spec: str) -> LoadedModel:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder; give a .py file that builds the model")
    module = _import_file(path)
    if name:
        if not hasattr(module, name):
            raise ModelLoadError(f"{path}: defines no {name!r}{_did_you_mean(name, _public_names(module))}")
        loaded = _materialize(getattr(module, name), kwargs, f"{path}:{name}", spec)
    else:
        loaded = _materialize(_discover(module, path), kwargs, str(path), spec)
    loaded.example_inputs = _example_inputs_of(module, path)
    return loaded


def _import_file(path: Path):
    """Import a user's file as a fresh module, with its folder importable for sibling imports.

    The module is named after the file (``models/net.py`` → ``net``) when that name is free,
    so a converted model saved whole with pickle refers to ``net.Net`` and loads wherever
    ``net.py`` is importable; otherwise (the name belongs to another module) a private name.
    """
    module_name = _module_name_for(path)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        sys.modules.pop(module_name, None)
        raise ModelLoadError(f"{path}:{e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:  # the user's module-level code raised
        sys.modules.pop(module_name, None)
        raise ModelLoadError(f"{path}: importing the file raised {type(e).__name__}: {e}") from e
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    return module


def _module_name_for(path: Path) -> str:
    stem = path.stem
    resolved = path.resolve()
    existing = sys.modules.get(stem)
    if stem.isidentifier() and not keyword.iskeyword(stem):
        if existing is not None:
            if Path(getattr(existing, "__file__", "") or "").resolve() == resolved:
                return stem  # the same file again: re-import it under its own name
        else:
            try:
                found = importlib.util.find_spec(stem)
            except (ImportError, ValueError):
                found = None
            if found is None or (found.origin and Path(found.origin).resolve() == resolved):
                return stem
    return f"_dsrewrite_user_{abs(hash(str(resolved)))}"


def _public_names(module) -> list[str]:
    return [n for n in vars(module) if not n.startswith("_")]


def _discover(module, path: Path):
    """Find the model in a file by the documented convention."""
    for factory in FACTORY_NAMES:
        obj = getattr(module, factory, None)
        if callable(obj):
            return obj
    obj = getattr(module, "model", None)
    if isinstance(obj, nn.Module):
        return obj
    classes = [
        c for c in vars(module).values()
        if inspect.isclass(c) and issubclass(c, nn.Module) and c.__module__ == module.__name__
    ]
    buildable = [c for c in classes if _constructible_without_args(c)]
    if len(buildable) == 1:
        return buildable[0]
    if not classes:
        raise ModelLoadError(
            f"{path}: no model found; define build_model() (or get_model/create_model), "
            "a module-level `model`, or an nn.Module class"
        )
    names = ", ".join(sorted(c.__name__ for c in (buildable or classes)))
    if not buildable:
        raise ModelLoadError(
            f"{path}: its nn.Module classes ({names}) all need arguments; "
            f"name a factory as {path}:NAME and pass --arg key=value"
        )
    raise ModelLoadError(f"{path}: several nn.Module classes ({names}); pick one as {path}:NAME")


def _constructible_without_args(cls) -> bool:
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in list(params)[1:]
    )


def _materialize(obj, kwargs: dict, where: str, spec: str) -> LoadedModel:
    """Turn a factory, class or instance into a module."""
    if isinstance(obj, nn.Module):
        if kwargs:
            raise UsageError(f"{where} is a module instance; --arg only applies to factories and classes")
        model = obj
        file, line = _source_of(type(obj))
    elif callable(obj):
        model = _call_factory(lambda: obj(**kwargs), f"{_factory_name(obj, where)}()", kwargs, obj)
        file, line = _source_of(obj)
    else:
        raise ModelLoadError(f"{where} is a {type(obj).__name__}, not a model, a class or a factory")
    return LoadedModel(model, spec, None, file, line)


#: Seed of the random initialization of models built by a factory, so that two runs on an
#: untrained model (and the fidelity numbers they report) agree.
INIT_SEED = 0


def _call_factory(build: Callable[[], Any], what: str, kwargs: dict | None = None, factory=None) -> nn.Module:
    """Build a model with the global RNG seeded (:data:`INIT_SEED`) and left as it was afterwards.

    A failure names the factory and, when ``--arg`` values were given, the argument that
    does not fit its signature or its default's type.
    """
    kwargs = kwargs or {}
    problem = _argument_problem(factory, kwargs) if factory is not None else None
    if problem:
        raise ModelLoadError(f"{what}: {problem}")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            model = build()
    except Exception as e:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        call = f"{what[:-2]}({given})" if given and what.endswith("()") else what
        hint = (f"; check the --arg values ({', '.join(f'{k} is a {type(v).__name__}' for k, v in kwargs.items())})"
                if kwargs else " (pass arguments with --arg key=value)" if isinstance(e, TypeError) else "")
        raise ModelLoadError(f"calling {call} raised {type(e).__name__}: {e}{hint}") from e
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{what} returned a {type(model).__name__}, not an nn.Module")
    return model


def _argument_problem(factory, kwargs: dict) -> str | None:
    """Why ``kwargs`` cannot be passed to ``factory``, from its signature (None if they can, or if unknown)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    params = sig.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key, value in kwargs.items():
        if key not in params:
            if takes_any:
                continue
            return (f"--arg {key}=...: the factory takes no argument {key!r}"
                    f"{_did_you_mean(key, named)} (it takes: {', '.join(named) or 'nothing'})")
        default = params[key].default
        if default is inspect.Parameter.empty or default is None or value is None:
            continue
        if isinstance(default, bool) != isinstance(value, bool) or (
                isinstance(default, (int, float)) and not isinstance(value, (int, float))):
            return (f"--arg {key}={value!r}: expected {_a(type(default).__name__)} like its default "
                    f"({key}={default!r}), got {_a(type(value).__name__)}")
    return None


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _factory_name(obj, where: str) -> str:
    """``examples/resnet.py:build_model`` for a factory found in a file without a :NAME."""
    name = getattr(obj, "__name__", None)
    return where if not name or where.endswith(f":{name}") else f"{where}:{name}"


def _source_of(obj) -> tuple[str | None, int | None]:
    try:
        file = inspect.getsourcefile(obj)
        _, line = inspect.getsourcelines(obj)
        return file, line
    except (TypeError, OSError):
        return None, None


def _example_inputs_of(module, path: Path) -> tuple | None:
    """Default inputs a file proposes: ``example_inputs()`` or ``INPUT_SHAPE``."""
    fn = getattr(module, "example_inputs", None)
    if callable(fn):
        try:
            value = fn()
        except Exception as e:
            raise ModelLoadError(f"{path}: example_inputs() raised {type(e).__name__}: {e}") from e
        return as_input_tuple(value, f"{path}: example_inputs()")
    shape = getattr(module, "INPUT_SHAPE", None)
    if shape is not None:
        shapes = [shape] if shape and isinstance(shape[0], int) else list(shape)
        return make_inputs([tuple(s) for s in shapes], torch.float32)
    return None


def _load_module_attr(module_name: str, name: str, kwargs: dict, spec: str) -> LoadedModel:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ModelLoadError(f"{spec}: cannot import {module_name!r} ({e}); is it installed or on PYTHONPATH?") from e
    except Exception as e:
        raise ModelLoadError(f"{spec}: importing {module_name} raised {type(e).__name__}: {e}") from e
    if not name:
        raise ModelLoadError(f"{spec}: name the factory, class or instance as {module_name}:NAME")
    if not hasattr(module, name):
        raise ModelLoadError(f"{spec}: {module_name} defines no {name!r}{_did_you_mean(name, _public_names(module))}")
    loaded = _materialize(getattr(module, name), kwargs, spec, spec)
    loaded.example_inputs = _example_inputs_of(module, Path(getattr(module, "__file__", module_name)))
    return loaded


def load_object(spec: str, what: str = "data"):
    """``file.py:NAME`` or ``module:NAME`` → that object, called (without arguments) if callable."""
    path_part, name = _split_file_spec(spec)
    if not name:
        raise UsageError(f"{what} spec {spec!r} must name an object: file.py:NAME or module:NAME")
    if path_part.endswith(".py") or "/" in path_part:
        path = Path(path_part)
        if not path.exists():
            raise UsageError(f"{path}: no such file")
        module = _import_file(path)
    else:
        try:
            module = importlib.import_module(path_part)
        except Exception as e:
            raise UsageError(f"{spec}: cannot import {path_part} ({type(e).__name__}: {e})") from e
    if not hasattr(module, name):
        raise UsageError(f"{spec}: defines no {name!r}")
    obj = getattr(module, name)
    if callable(obj):
        try:
            obj = obj()
        except Exception as e:
            raise UsageError(f"{spec}: calling {name}() raised {type(e).__name__}: {e}") from e
    return obj


# ------------------------------------------------------------------------------ saved models


def _load_saved(path: Path, trust_pickle: bool, spec: str) -> LoadedModel:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.suffix.lower() == ".pt2":
        try:
            program = torch.export.load(str(path))
        except Exception as e:
            raise ModelLoadError(f"{path}: not a torch.export program ({type(e).__name__}: {e})") from e
        args, kwargs = program.example_inputs or ((), {})
        return LoadedModel(program.module(), spec, tuple(args) or None, str(path), None, origin="export")
    if _is_torchscript(path):
        try:
            return LoadedModel(torch.jit.load(str(path), map_location="cpu"), spec, None, str(path), None,
                               origin="torchscript")
        except Exception as e:
            raise ModelLoadError(f"{path}: broken TorchScript archive ({type(e).__name__}: {e})") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        if not trust_pickle:
            raise ModelLoadError(
                f"{path}: holds a pickled module, and loading a pickle runs code from the file; "
                "re-run with --trust-pickle if you trust its source"
            ) from e
        obj = _load_pickle(path)
    if isinstance(obj, nn.Module):
        return LoadedModel(obj, spec, None, str(path), None, origin="pickle")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            f"{path}: holds a state_dict (weights only), not a model; "
            "analyze the code that builds it (file.py:factory) instead"
        )
    raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not an nn.Module")


def _load_pickle(path: Path):
    """``torch.load`` of a whole pickled module, finding the modules its classes live in.

    A module saved by ``convert -o`` refers to its classes by module name (``resnet.ResNet``).
    When that module is not importable (the ``dsrewrite`` script does not put the current
    folder on ``sys.path``), its file is looked for beside the ``.pt`` and in the current folder,
    and imported from there.
    """
    tried: set[str] = set()
    while True:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=False)
        except ModuleNotFoundError as e:
            name = (e.name or "").split(".")[0]
            if not name or name in tried:
                raise ModelLoadError(_missing_module_message(path, e.name)) from e
            tried.add(name)
            folder = _find_source(name, [path.resolve().parent, Path.cwd()])
            if folder is None:
                raise ModelLoadError(_missing_module_message(path, e.name)) from e
            sys.path.insert(0, str(folder))
            try:
                importlib.import_module(name)
            except Exception as err:
                raise ModelLoadError(f"{path}: importing {name} from {folder} for its classes raised "
                                     f"{type(err).__name__}: {err}") from err
            finally:
                with contextlib.suppress(ValueError):
                    sys.path.remove(str(folder))
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from e


def _find_source(name: str, folders: list[Path]) -> Path | None:
    """The first folder holding ``name.py`` or the package ``name/``."""
    for folder in folders:
        if (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file():
            return folder
    return None


def _missing_module_message(path: Path, name: str | None) -> str:
    return (f"{path}: the pickled model's classes live in the module {name!r}, which is neither importable nor "
            f"found as {name}.py beside {path.name} or in the current folder; put {name}.py there or add its "
            "folder to PYTHONPATH (a .pt2 from convert -o model.pt2 needs no source)")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder (pickled torch.save zips have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


# ------------------------------------------------------------------------------------ inputs


def parse_shape(text: str) -> tuple[int, ...]:
    """``'1,3,224,224'`` (or ``1x3x224x224``) ``-> (1, 3, 224, 224)``."""
    parts = [p for p in text.replace("x", ",").replace("×", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--input-shape expects comma-separated integers such as 1,3,224,224, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape expects positive sizes such as 1,3,224,224, got {text!r}")
    return shape


def parse_dtype(name: str) -> torch.dtype:
    """``'bfloat16' -> torch.bfloat16``."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; choose from {', '.join(sorted(set(DTYPES)))}") from None


def make_inputs(shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Meta tensors of the given shapes: they carry shape and dtype, no memory and no values."""
    return tuple(torch.empty(s, dtype=dtype, device="meta") for s in shapes)


def as_input_tuple(value, what: str) -> tuple:
    """Normalize a user's example inputs (a tensor, a tuple or list of them) to a tuple."""
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise InputError(f"{what} must return a tensor or a tuple of tensors, got {type(value).__name__}")


def resolve_inputs(
    loaded: LoadedModel,
    shapes: list[tuple[int, ...]] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple:
    """Inputs to analyze with: explicit shapes win, then the model's own proposal, then 1×3×224×224.

    Explicit shapes keep the dtype of the model's own example input where it is an integer
    one (token ids stay int64 at any length).
    """
    if shapes:
        inputs = make_inputs(shapes, dtype or torch.float32)
        own = loaded.example_inputs or ()
        return tuple(torch.empty(x.shape, dtype=o.dtype, device="meta")
                     if isinstance(o, torch.Tensor) and not o.is_floating_point() else x
                     for x, o in zip(inputs, [*own, *[None] * len(inputs)]))
    if loaded.example_inputs is not None:
        if dtype is None:
            return loaded.example_inputs
        return tuple(t.to(dtype) if t.is_floating_point() else t for t in loaded.example_inputs)
    return make_inputs([DEFAULT_INPUT_SHAPE], dtype or torch.float32)
