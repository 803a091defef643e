r"""Planning: every strategy's candidates, measured on the target runtime, one choice across them.

``plan = fxrebirth.plan(model, x, strategies=None, calibration=None, target_speedup=None)``

1. **Candidates.** The model is captured at ``x`` (the deployment input) and every chosen strategy
   (:mod:`fxrebirth.retraining.strategy`; default: every registered one that finds a candidate) marks its
   candidates, each a region with its proposed layer and geometry.
2. **Importance** (strategies that measure it, on ``calibration`` images at the training size): what
   merging each candidate alone costs, in the strategy's unit (the depth strategy: KL nats per image).
   Without calibration images, or for a strategy that does not measure it, it is ``None``.
3. **Latency** on the runtime that will run the model (``runtime``, a name of
   :mod:`fxrebirth.measure.runtimes`; default eager PyTorch): each candidate cut out of the graph and its
   replacing layer, timed A/B in interleaved rounds (``gain = now - new``); or read from a table measured on
   a device (``device_table``, :mod:`fxrebirth.retraining.profiling`) or from per-node latencies
   (``latency_table``). A candidate that is not faster merged is never chosen.
4. **Choice** (:func:`fxrebirth.retraining.selection.choose`): with a target speed-up or a latency budget,
   the least summed importance that reaches it; without either, the set that saves the most, plus every
   other candidate worth merging that conflicts with none chosen. Candidates conflict when their spans in
   graph order overlap, whatever strategies marked them. ``keep`` names regions never chosen.

A :class:`Plan` is plain data: JSON in and out (plans written by fxrebirth 0.2's two planners load too),
editable (:meth:`Plan.drop`, :meth:`Plan.keep`, :meth:`Plan.select`), checked against a model by
:meth:`Plan.validate`.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxrebirth.graph.capture import as_input_tuple, capture
from fxrebirth.graph.ops import kind_of
from fxrebirth.graph.regions import Region, RegionError
from fxrebirth.retraining.plandata import Candidate, Plan, kept_ids
from fxrebirth.retraining.strategy import Strategy, get_strategy, strategy_names
from fxrebirth.retraining.timing import time_candidates
from fxrebirth.rewrite.cost import graph_flops, node_flops
from fxrebirth.rewrite.validate import COUNT, NOT_NEGATIVE, POSITIVE, OptionError, Range, validate_numbers

__all__ = ["plan", "Plan", "Candidate", "kept_ids", "check_example", "mark", "rebuild", "planner_name"]

log = logging.getLogger(__name__)

PLAN_RANGES = {"target_speedup": POSITIVE, "budget_s": NOT_NEGATIVE, "rounds": COUNT, "batch": COUNT,
               "reduce_ratio": Range(0, 1, open_low=True), "max_convs": COUNT}
"""The numeric options of :func:`plan` and the values each accepts (None: not given)."""


def check_example(owner: str, inputs: tuple) -> None:
    """Raise :class:`RegionError` when the first example input is a tensor of batch 0: a plan times and
    shapes its regions on it, and an empty batch measures nothing."""
    first = inputs[0] if inputs else None
    if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == 0:
        raise RegionError(f"{owner}: the example input has batch 0 (shape {list(first.shape)}); give at least one "
                          "image, e.g. torch.randn(1, 3, H, W)")


def _depth(gm: fx.GraphModule, region: Region) -> int:
    """Weighted layers (convolutions) on the longest path through the region."""
    members = set(region.nodes)
    best: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.name in members:
            here = 1 if kind_of(node) == "conv" else 0
            best[node.name] = here + max((best.get(a.name, 0) for a in node.all_input_nodes), default=0)
    return best.get(region.output, 0)


def _chosen(strategies: Any) -> list[Strategy]:
    if strategies is None:
        return [get_strategy(n) for n in strategy_names()]
    if isinstance(strategies, str):
        strategies = [strategies]
    chosen = [s if isinstance(s, Strategy) else get_strategy(s) for s in strategies]
    if not chosen:
        raise OptionError("strategies=[]: choose at least one strategy, or None for every one that applies")
    return chosen


def _options_for(strategy: Strategy, options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in strategy.options and v is not None}


def _refuse_unread(chosen: list[Strategy], options: dict[str, Any]) -> None:
    """Refuse an option (given, not None) that no chosen strategy reads, naming who would."""
    for key, value in options.items():
        if value is None or any(key in s.options for s in chosen):
            continue
        users = [n for n in strategy_names() if key in get_strategy(n).options]
        names = ", ".join(s.name for s in chosen) or "none"
        raise OptionError(f"{key}: read by the {' and '.join(users) or 'no'} strateg{'ies' if len(users) > 1 else 'y'}"
                          f"; the strategies that apply here are {names}: drop {key}")


def mark(model_or_gm: Any, example_inputs: Any = None, *, strategies: Any = None,
         **options: Any) -> dict[str, list[Region]]:
    """Per chosen strategy that finds any, its candidates on the captured model (``model_or_gm`` captured at
    ``example_inputs``, or an already captured GraphModule); options are routed to the strategies that read
    them, and one that none of the applicable strategies reads is refused."""
    chosen = _chosen(strategies)
    validate_numbers("plan", {"reduce_ratio": options.get("reduce_ratio"), "max_convs": options.get("max_convs")},
                     PLAN_RANGES, optional=("reduce_ratio", "max_convs"))
    unknown = [k for k in options if not any(k in get_strategy(n).options for n in strategy_names())]
    if unknown:
        raise OptionError(f"unknown planning option(s) {unknown}; options: "
                          f"{sorted(set().union(*(get_strategy(n).options for n in strategy_names())))}")
    gm = model_or_gm if isinstance(model_or_gm, fx.GraphModule) and example_inputs is None else \
        capture(model_or_gm, as_input_tuple(example_inputs))
    found: dict[str, list[Region]] = {}
    for strategy in chosen:
        try:
            regions = strategy.mark(gm, **_options_for(strategy, options))
        except ValueError as exc:
            raise OptionError(f"{strategy.name} strategy: {exc}") from None
        if regions or strategies is not None:
            found[strategy.name] = regions
    _refuse_unread([get_strategy(n) for n in found] if strategies is None else chosen, options)
    return found


def _importance(model: nn.Module, found: dict[str, list[Region]], calibration: Any,
                batch: int) -> dict[str, float]:
    """Per candidate id, its importance where its strategy measures one on ``calibration`` images."""
    out: dict[str, float] = {}
    if calibration is not None and (not isinstance(calibration, torch.Tensor) or calibration.dim() != 4
                                    or len(calibration) == 0):
        shape = list(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise RegionError(f"plan: calibration must be a batch of images [N >= 1, C, H, W], got {shape}")
    needing = [n for n in found if get_strategy(n).needs_calibration and found[n]]
    if not needing:
        return out
    if calibration is None:
        log.warning("plan: no calibration images: the importance of the %s candidates is not measured, they are "
                    "chosen by gain alone (give calibration=, images at the training size)", ", ".join(needing))
        return out
    calib = capture(model, (calibration[:2],), copy_model=False)
    for name in needing:
        start = time.perf_counter()
        out.update(get_strategy(name).importance(calib, found[name], calibration, batch) or {})
        log.info("importance of %d %s candidates on %d images: %.1f s", len(found[name]), name, len(calibration),
                 time.perf_counter() - start)
    return out


def plan(model: nn.Module, example_inputs: Any, *, strategies: Any = None, calibration: torch.Tensor | None = None,
         target_speedup: float | None = None, budget_s: float | None = None, keep: "list[str] | tuple[str, ...]" = (),
         runtime: str | None = None, rounds: int = 10, latency_table: dict | None = None, device_table: Any = None,
         leaf_modules: tuple = (), batch: int = 64, **options: Any) -> Plan:
    """Mark, measure and choose (see the module docstring). ``strategies``: names (or
    :class:`~fxrebirth.retraining.strategy.Strategy` objects); None: every registered strategy that finds a
    candidate. ``options``: the strategies' planning options (``streamline_kernel``, ``reduce_ratio``,
    ``collapse_reduce``, ``max_convs``, ``prune``); one that no applicable strategy reads is refused.
    A runtime's lowering (what it has no kernel for) is applied before timing, as its record says.
    The model is not changed."""
    validate_numbers("plan", {"target_speedup": target_speedup, "budget_s": budget_s, "rounds": rounds,
                              "batch": batch, "reduce_ratio": options.get("reduce_ratio"),
                              "max_convs": options.get("max_convs")}, PLAN_RANGES,
                     optional=("target_speedup", "budget_s", "reduce_ratio", "max_convs"))
    if target_speedup is not None and budget_s is not None:
        raise OptionError("plan: give target_speedup= or budget_s=, not both")
    inputs = as_input_tuple(example_inputs)
    check_example("plan", inputs)
    frozen = copy.deepcopy(model).eval()
    gm = capture(frozen, inputs, leaf_modules=leaf_modules, copy_model=False)
    found = mark(gm, strategies=strategies, **options)
    importance = _importance(frozen, found, calibration, batch)
    regions = [r for rs in found.values() for r in rs]
    with torch.no_grad():
        latency, measured, source = time_candidates(gm, inputs, regions, runtime=runtime, rounds=rounds,
                                                    latency_table=latency_table, device_table=device_table,
                                                    planner=planner_name(found))
    position = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    nodes = {n.name: n for n in gm.graph.nodes}
    cands = []
    for region in regions:
        strategy = get_strategy(region.kind)
        x = torch.randn(tuple(nodes[region.input].meta["tensor_meta"].shape))
        new = capture(strategy.layer(region).eval(), x)
        now_s, new_s = measured[region.id]
        cands.append(Candidate(region, now_s, new_s, importance.get(region.id),
                               (min(position[n] for n in region.nodes), position[region.output]),
                               sum(node_flops(nodes[n]) for n in region.nodes), graph_flops(new),
                               _depth(gm, region), region.proposal.depth if region.proposal is not None else 0))
    shape = list(inputs[0].shape) if inputs and isinstance(inputs[0], torch.Tensor) else []
    result = Plan(type(model).__name__, shape, latency, source, cands, list(found),
                  list(calibration.shape) if isinstance(calibration, torch.Tensor) else None)
    result.select(target_speedup, budget_s, keep=keep)
    return result


def planner_name(found: dict[str, list[Region]]) -> str:
    """The name a device table of these strategies' candidates is written under (``fxrebirth profile``):
    ``regions`` for the paper's two strategies and ``depth`` for depth, as fxrebirth 0.2's bundles say."""
    names = sorted(found)
    if set(names) <= {"streamline", "branch"}:
        return "regions"
    return "+".join(names)


def rebuild(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """A copy of ``gm`` (the captured model) with the plan's selected candidates merged with freshly
    initialised layers (untrained: for measuring speed; :func:`fxrebirth.rebirth` retrains)."""
    from fxrebirth.retraining.student import build_student, finish_student

    student, _ = build_student(gm, plan, activate=True)
    return finish_student(student, plan).eval()
