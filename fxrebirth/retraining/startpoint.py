"""Choosing where a rebirth layer starts by measuring the candidates (``init="auto"``).

Each candidate initialisation of a region (:meth:`~fxrebirth.retraining.initialise.Initialiser.candidates`:
the original weights re-laid, the least-squares fit to the region's outputs) is applied in turn to the
region's rebirth layer, in the student as it stands (the regions below already started, those above still
the original's), and scored by ``KL(p_teacher || p_student)`` over a fixed set of training images drawn with
a seed of their own, not the fits' draw (nats per image, the measure the planner's importance uses). The
candidate with the smallest divergence is kept, and its top-1 agreement with the teacher recorded. The images
are forward-only passes: the teacher's once, the student's once per candidate, all counted in
:attr:`StartJudge.used`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from fxrebirth.graph.regions import Region
from fxrebirth.retraining.train import batches, world

__all__ = ["StartJudge", "JUDGE_IMAGES"]

log = logging.getLogger(__name__)

JUDGE_IMAGES = 256
"""The most held images a start is judged on (fewer when the calibration budget is smaller)."""


def _logits(model: nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(images[i:i + batch]).float() for i in range(0, len(images), batch)])
    finally:
        model.train(was)


class StartJudge:
    """Scores candidate starts of one job's student against its teacher on ``images`` images of ``data``
    drawn from ``seed`` (offset, so not the fits' draw; see the module docstring)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, data: Any, images: int, batch_size: int, seed: int,
                 device: torch.device | str | None = None) -> None:
        self.student, self.batch = student, batch_size
        drawn = [x for x, _ in batches(data, batch_size, seed=seed + 104729, images=images, device=device)]
        self.images = torch.cat(drawn) if drawn else torch.empty(0)
        self.reference = F.log_softmax(_logits(teacher, self.images, batch_size), 1)
        self.used = len(self.images) * world()[1]  # every rank's share

    def score(self) -> tuple[float, float]:
        """``KL(p_teacher || p_student)`` over the held images (nats per image, >= 0) and the share of them on
        which the student's top-1 class is the teacher's; under torch.distributed over every rank's share, so
        that every rank keeps the same candidate."""
        logits = _logits(self.student, self.images, self.batch)
        kl = F.kl_div(F.log_softmax(logits, 1), self.reference, log_target=True, reduction="sum")
        agree = (logits.argmax(1) == self.reference.argmax(1)).sum()
        totals = torch.stack([kl.double(), agree.double(), torch.tensor(float(len(logits)), dtype=torch.float64,
                                                                        device=logits.device)])
        if world()[1] > 1:
            dist.all_reduce(totals)
        self.used += int(totals[2])
        count = max(float(totals[2]), 1.0)
        return max(float(totals[0]) / count, 0.0), float(totals[1]) / count

    def choose(self, init: Any, region: Region, rebirth: nn.Module) -> dict[str, Any]:
        """Apply each of ``init``'s candidates for ``region`` to ``rebirth`` (switched on in the student), keep
        the one of least divergence; return its facts with ``init`` (the winner) and ``start_kl`` (per
        candidate, nats per image)."""
        scores: dict[str, float] = {}
        best: tuple[float, str, dict[str, Any], dict[str, torch.Tensor]] | None = None
        agreement = 0.0
        for method in init.candidates(region):
            facts = init.apply(region, rebirth, method)
            scores[method], agrees = self.score()
            if best is None or scores[method] < best[0]:
                best, agreement = (scores[method], method, facts, copy.deepcopy(rebirth.state_dict())), agrees
        assert best is not None  # every region has at least one candidate
        rebirth.load_state_dict(best[3])
        log.info("region %s starts from %s (KL to the teacher per candidate: %s)", region.id, best[1],
                 ", ".join(f"{m} {v:.4g}" for m, v in scores.items()))
        return {**best[2], "init": best[1], "start_kl": scores, "start_agreement": agreement}
