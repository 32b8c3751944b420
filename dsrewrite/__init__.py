"""dsrewrite: profile every conv of a PyTorch model, rewrite heavy ones as depthwise-separable blocks.

Pipeline, one module per stage: load → trace → profile → plan → rewrite → measure → report.
"""

__version__ = "0.1.0"

from .api import Analysis, analyze, analyze_spec  # noqa: E402
from .costs import COST_HANDLERS, set_op_handle  # noqa: E402
from .errors import DsrewriteError, ExitCode  # noqa: E402
from .load import load_model  # noqa: E402
from .trace import register_leaf_module  # noqa: E402

__all__ = [
    "Analysis", "analyze", "analyze_spec", "COST_HANDLERS", "set_op_handle",
    "DsrewriteError", "ExitCode", "load_model", "register_leaf_module", "__version__",
]
