"""fxrebirth: make trained CNNs faster by merging their layers (torch.fx graph rewriting).

Exact tier: ``gm, report = fxrebirth.optimize(model, example_inputs)`` returns an equivalent
GraphModule with BatchNorm and constant scale/shift folded into neighbouring layers, and a report of
every rewrite and refusal. Retraining tier: ``plan = fxrebirth.plan(model, x)`` marks and prices the
non-linear regions, ``gm, report = fxrebirth.rebirth(model, plan, train_data, test_data=...)`` replaces
them by retrained rebirth layers. See docs/ for the architecture and every identity.
"""

from .api import default_rules, optimize, relative_error
from .capture import capture
from .errors import CaptureError, EquivalenceError, FxRebirthError, PipelineError, ShapeGuardError
from .pipeline import PassResult, Pipeline, RulePass
from .plan import Plan, PlannedRegion, plan
from .regions import Region, RegionError
from .retrain import RebirthConfig, RebirthReport, rebirth
from .report import Refusal, Report, RuleStats
from .rules import Match, Rule, RuleContext

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "EquivalenceError",
    "ShapeGuardError",
    "FxRebirthError",
    "Match",
    "PassResult",
    "Pipeline",
    "PipelineError",
    "Refusal",
    "Report",
    "Rule",
    "RuleContext",
    "RulePass",
    "RuleStats",
    "Plan",
    "PlannedRegion",
    "Region",
    "RegionError",
    "capture",
    "plan",
    "rebirth",
    "RebirthConfig",
    "RebirthReport",
    "default_rules",
    "optimize",
    "relative_error",
]
