r"""Retraining for depth merges: the rebirth engine's job with the student form as its student.

``reborn, report = fxrebirth.rebirth(model, depth_plan, train_data, test_data=...)`` takes a
:class:`~fxrebirth.retraining.depthplan.DepthPlan` where :mod:`fxrebirth.retraining.engine` takes a rebirth
plan, and runs the same job (distillation, checkpoints and resume, DDP, device and precision, the budget unit
and the scratch control; see that module) on another student:

* **Student**: :func:`fxrebirth.passes.linearise.linearise` of the captured model with the plan's selected
  segments: their activations the identity, pruned convolutions the identity, dropped residual operands zero,
  the padding moved to each segment's input. It starts from the original's weights, so there is nothing to
  initialise (``init`` must be ``original`` or ``auto``; layer-wise distillation, which trains rebirth layers
  alone, is refused).
* **Training**: end to end, every weight of the student, with the engine's loss (``kd_weight * T^2 KL +
  (1 - kd_weight) CE``), the model's own BatchNorms normalising with batch statistics (and updating their
  running statistics) while it trains, as fine-tuning a BatchNorm network does
  (``train_batch_norm=False``: with their running statistics, fixed); evaluation and the merge use the
  running statistics.
* **Result**: :func:`fxrebirth.passes.linearise.merge` of the trained student: each segment becomes one
  convolution, verified in float64 (1e-9) at three sizes, or :class:`~fxrebirth.errors.EquivalenceError`.
* **Control**: the student form with every weight re-initialised (He), trained on the same budget with the
  same loss, then merged the same way: the same architecture, over-parameterised the same way while it trains.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxrebirth.errors import FxRebirthError
from fxrebirth.graph.regions import RegionError
from fxrebirth.passes.linearise import linearise, merge
from fxrebirth.retraining.depthplan import DepthPlan
from fxrebirth.retraining.engine import _Job
from fxrebirth.retraining.weights import reinitialise

__all__ = ["DepthJob"]

log = logging.getLogger(__name__)


class DepthJob(_Job):
    """The engine's job on a depth plan (see the module docstring)."""

    @staticmethod
    def _check_plan(plan: Any, model: nn.Module) -> None:
        if not isinstance(plan, DepthPlan):
            raise FxRebirthError(f"a depth job takes a DepthPlan (got {type(plan).__name__})")
        if not plan.selected:
            raise FxRebirthError("the depth plan selects no segment: give DepthPlan.select() a target speed-up "
                                 "or a latency budget first")
        if plan.model and plan.model != type(model).__name__:
            raise RegionError(f"the plan was made for a {plan.model}, the model is a {type(model).__name__}")

    def _build_student(self, plan: Any, image_shape: list[int]) -> None:
        if self.config.init not in ("original", "auto") or self.config.layerwise_epochs > 0:
            raise FxRebirthError(f"init={self.config.init!r}, layerwise_epochs={self.config.layerwise_epochs}: a depth "
                                 "student starts from the original's weights (init='original') and trains end to "
                                 "end (layerwise_epochs=0)")
        try:
            segments = plan.validate(self.teacher)
        except RegionError as exc:
            raise RegionError(f"the plan does not fit this model at the data's image size {image_shape}: "
                              f"{exc}") from None
        position = {n.name: i for i, n in enumerate(self.teacher.graph.nodes)}
        order = sorted(range(len(segments)), key=lambda i: position[segments[i].output])
        self.planned = [plan.selected[i] for i in order]
        self.regions = [p.region for p in self.planned]
        self.switches = {}
        self.student = linearise(self.teacher, [segments[i] for i in order])

    def end_to_end(self, stage: str, epochs: float, seed: int, kd_weight: float) -> tuple[int, float | None, list]:
        _batch_statistics(self.student, self.config.train_batch_norm)  # False: the running statistics stay
        try:
            return super().end_to_end(stage, epochs, seed, kd_weight)
        finally:
            _batch_statistics(self.student, False)

    def initialise(self, ids: list[str], seed: int) -> int:
        for rid in ids:
            self.region_facts[rid]["init"] = "original"
        return 0

    def scratch(self) -> None:
        kept = reinitialise(self.student)
        if kept:
            log.warning("depth control: %d parameter(s) not re-initialised: %s", len(kept), kept[:5])

    def result(self) -> fx.GraphModule:
        """The trained student with every segment merged into one convolution (verified)."""
        student = copy.deepcopy(self.student).eval()
        reborn = merge(student)
        for p in reborn.parameters():
            p.requires_grad_(False)
        return reborn.eval()


def _batch_statistics(gm: fx.GraphModule, training: bool) -> None:
    """Switch every BatchNorm of the captured graph ``gm`` to batch statistics (``training``) or back."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.batch_norm and "training" in node.kwargs:
            node.kwargs = {**node.kwargs, "training": training}
    gm.recompile()
