"""fxrebirth: make trained CNNs faster by merging their layers (torch.fx graph rewriting).

Exact tier: ``gm, report = fxrebirth.optimize(model, example_inputs)`` returns an equivalent
GraphModule with BatchNorm and constant scale/shift folded into neighbouring layers, and a report of
every rewrite and refusal. Retraining tier: ``plan = fxrebirth.plan(model, x)`` marks and prices the
candidates of every retraining strategy (streamline, branch, depth, or one registered with
``fxrebirth.register_strategy``) and chooses among them, ``gm, report = fxrebirth.rebirth(model, plan,
train_data, test_data=...)`` retrains and merges them. See docs/ for the architecture and every identity.
"""

from fxrebirth.errors import CaptureError, EquivalenceError, FxRebirthError, PipelineError, ShapeGuardError
from fxrebirth.frontends.library import default_rules, optimize, relative_error
from fxrebirth.graph.capture import capture
from fxrebirth.graph.regions import Region, RegionError
from fxrebirth.retraining.engine import RebirthConfig, RebirthReport, rebirth
from fxrebirth.retraining.planning import Candidate, Plan, plan
from fxrebirth.retraining.strategy import Strategy, get_strategy, register_strategy, strategy_names
from fxrebirth.rewrite.pipeline import PassResult, Pipeline, RulePass
from fxrebirth.rewrite.report import Refusal, Report, RuleStats
from fxrebirth.rewrite.rules import Match, Rule, RuleContext

__version__ = "0.2.0"

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
    "Candidate",
    "Strategy",
    "get_strategy",
    "register_strategy",
    "strategy_names",
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
