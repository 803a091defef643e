"""The library entry point: :func:`optimize` and the default rule list."""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from .capture import as_input_tuple, capture, propagate_shapes
from .cost import CostModel, RooflineCost, graph_flops, stored_elements
from .equivalence import relative_error
from .errors import PipelineError
from .pipeline import Pipeline
from .report import Report
from .rules import Rule

__all__ = ["default_rules", "optimize", "relative_error"]

log = logging.getLogger(__name__)


def default_rules() -> list[Rule]:
    """The exact tier's rules in their default order: cleanup; folds into the preceding layer (always
    exact), then into the following layer (exact under conditions); padding and pooling; then the
    cost-gated merges: chains of linear layers, summed, concatenated and sibling branches."""
    from fxrebirth.passes import affine, batchnorm, branches, cleanup, conv_chain, pooling

    bn, aff = batchnorm.rules(), affine.rules()
    return (cleanup.rules() + [bn[0], aff[0], bn[1], aff[1]] + pooling.rules() + conv_chain.rules()
            + branches.rules())


def _select(rules: Sequence[Rule], disable: Iterable[str]) -> tuple[Rule, ...]:
    disable = set(disable)
    unknown = disable - {r.name for r in rules}
    if unknown:
        names = ", ".join(r.name for r in rules)
        raise PipelineError(f"unknown rule name(s) {sorted(unknown)} in disable=; known rules: {names}")
    return tuple(r for r in rules if r.name not in disable)


def optimize(
    model: nn.Module,
    example_inputs: Any,
    *,
    rules: Sequence[Rule] | None = None,
    disable: Iterable[str] = (),
    verify: bool = True,
    frozen: bool = True,
    leaf_modules: Sequence[type[nn.Module]] = (),
    check_output: bool = True,
    cost_model: CostModel | None = RooflineCost(),
    force: Iterable[str] = (),
) -> tuple[fx.GraphModule, Report]:
    """Apply the exact tier to ``model`` and return ``(graph_module, report)``.

    The model is copied, never modified; the result keeps its device and dtype. ``rules`` replaces the
    default rule list, ``disable`` drops rules by name; ``verify`` checks every rewrite locally in
    float64 and rolls back mismatches; ``frozen=False`` leaves parameters untouched (only cleanup runs);
    ``leaf_modules`` are module types kept as opaque calls; ``cost_model`` gates the merges that can
    make a layer slower (default: the deterministic :class:`~fxrebirth.cost.RooflineCost`; a
    :class:`~fxrebirth.cost.TableCost` of measured latencies; ``None`` accepts every exact merge);
    ``force`` names gated rules to apply regardless of cost; ``check_output`` runs the original and the
    result once on ``example_inputs`` and records the relative error in the report (skipped for a model
    in training mode, whose forward would update its statistics).
    """
    inputs = as_input_tuple(example_inputs)
    start = time.perf_counter()
    gm = capture(model, inputs, leaf_modules=leaf_modules)
    report = Report(model=type(model).__name__)
    report.capture_s = time.perf_counter() - start
    report.nodes_before = len(gm.graph.nodes)
    report.params_before = stored_elements(gm)
    report.flops_before = graph_flops(gm)
    selected = _select(default_rules() if rules is None else list(rules), disable)
    pipeline = Pipeline(selected, verify=verify, frozen=frozen, cost_model=cost_model, force=frozenset(force))
    pipeline.run(gm, report)
    propagate_shapes(gm, inputs)
    report.nodes_after = len(gm.graph.nodes)
    report.params_after = stored_elements(gm)
    report.flops_after = graph_flops(gm)
    if check_output and not any(m.training for m in model.modules()):
        with torch.no_grad():
            report.output_error = relative_error(model(*inputs), gm(*inputs))
    log.info("optimized %s: %d rewrites", report.model, report.rewrites)
    return gm, report
