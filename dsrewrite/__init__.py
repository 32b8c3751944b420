"""dsrewrite: profile every conv of a PyTorch model, rewrite heavy ones as depthwise-separable blocks.

Pipeline, one module per stage: load → trace → profile → plan → rewrite → measure → report.
"""

__version__ = "0.1.0"

from .api import Analysis, ConversionResult, analyze, analyze_spec, convert, plan_model  # noqa: E402
from .calibrate import calibrate  # noqa: E402
from .channels import ChannelGraph, channel_graph  # noqa: E402
from .costs import COST_HANDLERS, set_op_handle  # noqa: E402
from .finetune import distill, evaluate  # noqa: E402
from .errors import DsrewriteError, ExitCode  # noqa: E402
from .layers import DepthwiseSeparableConv2d, make_divisible  # noqa: E402
from .load import load_model  # noqa: E402
from .plan import ConversionPlan, load_plan, plan_conversion  # noqa: E402
from .resize import ResizePlan, apply_resize, plan_resize  # noqa: E402
from .rules import RuleConfig, load_rules  # noqa: E402
from .trace import register_leaf_module  # noqa: E402

__all__ = [
    "Analysis", "ConversionResult", "analyze", "analyze_spec", "convert", "plan_model", "ConversionPlan",
    "load_plan", "plan_conversion", "COST_HANDLERS",
    "set_op_handle", "calibrate", "ChannelGraph", "channel_graph", "ResizePlan", "plan_resize", "apply_resize", "distill", "evaluate", "DepthwiseSeparableConv2d", "make_divisible", "RuleConfig", "load_rules",
    "DsrewriteError", "ExitCode", "load_model", "register_leaf_module", "__version__",
]
