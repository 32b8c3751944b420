"""dsrewrite: profile every conv of a PyTorch model, rewrite heavy ones as depthwise-separable blocks.

Pipeline, one module per stage: load → trace → profile → plan → rewrite → measure → report.
"""

import sys as _sys
import types as _types

__version__ = "0.1.0"

# The public names are imported on first use (PEP 562), so that ``import dsrewrite.cli`` (and
# ``dsrewrite --help``) does not load torch.
_EXPORTS = {
    "Analysis": "api", "ConversionResult": "api", "analyze": "api", "analyze_spec": "api", "convert": "api",
    "plan_model": "api", "calibrate": "calibrate", "ChannelGraph": "channels", "channel_graph": "channels",
    "COST_HANDLERS": "costs", "set_op_handle": "costs", "distill": "finetune", "evaluate": "finetune",
    "DsrewriteError": "errors", "ExitCode": "errors", "DepthwiseSeparableConv2d": "layers",
    "make_divisible": "layers", "load_model": "load", "ConversionPlan": "plan", "load_plan": "plan",
    "plan_conversion": "plan", "ResizePlan": "resize", "apply_resize": "resize", "plan_resize": "resize",
    "RuleConfig": "rules", "load_rules": "rules", "register_leaf_module": "trace",
}


def __getattr__(name: str):
    import importlib

    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule: dsrewrite.report, dsrewrite.measure, ...
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(_types.ModuleType):
    """Keeps ``dsrewrite.calibrate`` the function when the submodule of the same name is imported.

    Importing ``dsrewrite.calibrate`` (the module) binds it on the package; an exported name
    that is also its module's name then stays the exported object, as an eager import would leave it.
    """

    def __setattr__(self, name, value):
        if _EXPORTS.get(name) == name and isinstance(value, _types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


__all__ = [
    "Analysis", "ConversionResult", "analyze", "analyze_spec", "convert", "plan_model", "ConversionPlan",
    "load_plan", "plan_conversion", "COST_HANDLERS",
    "set_op_handle", "calibrate", "ChannelGraph", "channel_graph", "ResizePlan", "plan_resize", "apply_resize", "distill", "evaluate", "DepthwiseSeparableConv2d", "make_divisible", "RuleConfig", "load_rules",
    "DsrewriteError", "ExitCode", "load_model", "register_leaf_module", "__version__",
]
