"""A plan's student: the captured model with every selected candidate in its strategy's trainable form, and
the deployed model its strategies make of it after training (:mod:`fxrebirth.retraining.strategy`).

Strategies place their forms in ascending ``order`` (the depth strategy, which rewrites the graph's own nodes,
first; the switch strategies, which call a module in place of a region, after) and finish in descending
order. Their candidates are disjoint (the plan's choice keeps overlapping ones apart), so the forms compose.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.fx as fx

from fxrebirth.graph.regions import Region, RegionError
from fxrebirth.retraining.strategy import RegionSwitch, Strategy, get_strategy

__all__ = ["build_student", "finish_student", "switches_of", "strategies_of"]


def strategies_of(plan: Any) -> list[tuple[Strategy, list[Region]]]:
    """The plan's strategies with their selected regions (graph order), in the order their forms are placed."""
    groups = [(get_strategy(name), [c.region for c in cands]) for name, cands in plan.by_strategy().items()]
    return sorted(groups, key=lambda g: g[0].order)


def switches_of(gm: fx.GraphModule) -> dict[str, RegionSwitch]:
    """The :class:`RegionSwitch` modules of ``gm`` by the id of the region each stands for."""
    return {n.meta.get("fxrebirth.region", n.name): gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), RegionSwitch)}


def build_student(teacher: fx.GraphModule, plan: Any, activate: bool = False
                  ) -> tuple[fx.GraphModule, dict[str, RegionSwitch]]:
    """The student of ``plan`` on ``teacher`` (checked: :meth:`~fxrebirth.retraining.plandata.Plan.validate`)
    and its switches by region id; ``activate`` switches every one on (a model to time, not to train)."""
    plan.validate(teacher)
    student = teacher
    for strategy, regions in strategies_of(plan):
        try:
            student = strategy.student(student, regions)
        except KeyError as exc:
            raise RegionError(f"the {strategy.name} candidates do not fit the model once the others are in their "
                              f"trainable form (node {exc} is gone); drop one of the overlapping candidates") from None
    switches = switches_of(student)
    if student is teacher:
        student = copy.deepcopy(teacher)
    if activate:
        for switch in switches.values():
            switch.active.fill_(True)
    return student, switches


def finish_student(student: fx.GraphModule, plan: Any) -> fx.GraphModule:
    """The deployed model: a copy of the trained ``student`` with each strategy's candidates finished."""
    reborn = copy.deepcopy(student)
    meta = dict(getattr(student, "meta", {}))
    for strategy, _ in reversed(strategies_of(plan)):
        reborn.meta.update({k: v for k, v in meta.items() if k not in reborn.meta})
        reborn = strategy.finish(reborn)
    for p in reborn.parameters():
        p.requires_grad_(False)
    return reborn.eval()
