"""The accuracy-budgeted search: the fastest point of the plan's front whose validation top-1 is within a drop.

``fxrebirth run MODEL --max-drop 0.5`` asks for "as fast as possible within half a point". The plan's front
(:attr:`fxrebirth.retraining.plandata.Plan.front`: for every estimated speed-up on the plan's runtime, the set of
merges with the least summed importance that reaches it) orders the sets of merges from safe to aggressive. The
search retrains points of that front and measures each on the validation split (never the test split):

1. **The points**: the front's distinct sets of merges, by estimated speed-up, the last being every candidate
   worth merging (:func:`front_points`).
2. **The order**: the fastest point first (a generous drop is met at once); then a bisection between the
   fastest point known to be within the drop (at first: the teacher) and the slowest known to be over it. It
   assumes the validation drop grows along the front, as the importance it is ranked by estimates; at most
   ``1 + ceil(log2 n)`` points of ``n`` are retrained (:func:`bisection_order`).
3. **The budget**: every point retrains on the same number of images, the overall budget divided by the most
   points the bisection can try, so the search never spends more than the budget; a search that stops early
   spends less. Each point's checkpoints are under ``points/<merges>-<hash of its set>/``
   (:func:`point_folder`): an interrupted search resumes, and a set of merges already trained with the same
   options is read back instead of retrained.

What it returns (:class:`SearchResult`) records every point tried with its validation top-1, its estimated
speed-up, and the images it trained on (forward and backward) and passed forward only (calibration).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from torch import fx, nn

from fxrebirth.errors import FxRebirthError
from fxrebirth.retraining.engine import RebirthConfig, RebirthReport, rebirth
from fxrebirth.retraining.plandata import FrontPoint, Plan, kept_ids
from fxrebirth.retraining.train import ProgressFn

__all__ = ["Trial", "SearchResult", "NothingWithinDrop", "front_points", "bisection_order", "most_tries", "search",
           "save_search", "point_folder"]

log = logging.getLogger(__name__)


class NothingWithinDrop(FxRebirthError):
    """No point of the front tried was within the accuracy budget on the validation split."""


@dataclass
class Trial:
    """One retrained point of the front."""

    index: int
    """Its position among :func:`front_points` (0: the slowest, fewest merges)."""
    chosen: list[str]
    estimated_speedup: float
    val_top1: float
    teacher_val_top1: float
    trained_images: int
    """Images passed forward and backward in this point's retraining."""
    forward_images: int
    """Images passed forward only (calibration of its rebirth layers, training BatchNorms' first statistics)."""
    wall_s: float

    @property
    def drop(self) -> float:
        """Validation top-1 lost against the teacher, in points (negative: a gain)."""
        return 100 * (self.teacher_val_top1 - self.val_top1)


@dataclass
class SearchResult:
    """What the search tried and chose."""

    max_drop: float
    points: list[FrontPoint]
    trials: list[Trial] = field(default_factory=list)
    chosen: int | None = None
    """The index of the fastest point tried within the drop (None: none was)."""
    per_point_images: int = 0
    budget_images: int | None = None
    teacher_images: int | None = None

    @property
    def trained_images(self) -> int:
        return sum(t.trained_images for t in self.trials)

    @property
    def forward_images(self) -> int:
        return sum(t.forward_images for t in self.trials)

    def trial(self, index: int) -> Trial:
        return next(t for t in self.trials if t.index == index)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["trained_images"], data["forward_images"] = self.trained_images, self.forward_images
        data["teacher_share"] = self.trained_images / self.teacher_images if self.teacher_images else None
        for trial, record in zip(self.trials, data["trials"]):
            record["drop"] = trial.drop
        return data


def front_points(plan: Plan, keep: "list[str] | tuple[str, ...]" = ()) -> list[FrontPoint]:
    """The plan's front as distinct sets of merges, by estimated speed-up (the ``keep`` candidates never
    merged); the last point is every candidate worth merging (:meth:`Plan.select` without a target)."""
    probe = Plan.from_json(plan.to_json())
    probe.select(keep=keep)
    everything = FrontPoint(probe.estimated_speedup, sum(c.importance or 0.0 for c in probe.selected),
                            sorted(c.region.id for c in probe.selected))
    kept = set(kept_ids([c.region.id for c in plan.candidates], keep))
    seen: set[tuple[str, ...]] = set()
    points = []
    for point in sorted([*probe.front, everything], key=lambda p: (p.speedup, p.importance)):
        ids = tuple(sorted(point.chosen))
        if not ids or ids in seen or kept & set(ids):
            continue
        seen.add(ids)
        points.append(FrontPoint(point.speedup, point.importance, list(ids)))
    return points


def bisection_order(n: int) -> Iterator[int]:
    """Indices to try among ``n`` points sorted from slowest to fastest: the fastest, then a bisection between
    the fastest within the drop and the slowest over it. Send each tried point's verdict (True: within) with
    ``generator.send``; the generator ends when the boundary is found."""
    if n == 0:
        return
    within, over = -1, n - 1
    if (yield n - 1):
        return
    while over - within > 1:
        middle = (within + over) // 2
        if (yield middle):
            within = middle
        else:
            over = middle


def most_tries(n: int) -> int:
    """The most points :func:`bisection_order` tries among ``n``."""
    if n <= 1:
        return n
    return 1 + math.ceil(math.log2(n))


def search(model: nn.Module, plan: Plan, train: Any, val: Any, *, max_drop: float, config: RebirthConfig,
           folder: str, budget_images: int | None = None, teacher_images: int | None = None,
           keep: "list[str] | tuple[str, ...]" = (), progress: ProgressFn | None = None,
           on_trial: Callable[[SearchResult], None] | None = None
           ) -> tuple[SearchResult, Plan | None, fx.GraphModule | None, RebirthReport | None]:
    """Retrain points of ``plan``'s front on ``train``, each measured on ``val``, and return the search record
    with the fastest point within ``max_drop`` (points of top-1): its plan, reborn model and report (None when
    none was). Every point retrains as ``config`` says (its ``epochs`` of ``train``); checkpoints go under
    :func:`point_folder`. ``on_trial`` is called after every point (the caller saves the record)."""
    if max_drop <= 0 or not math.isfinite(max_drop):
        raise FxRebirthError(f"max_drop={max_drop}: the accuracy budget is a positive number of points")
    points = front_points(plan, keep)
    result = SearchResult(max_drop, points, per_point_images=int(round(config.epochs * len(train))),
                          budget_images=budget_images, teacher_images=teacher_images)
    if not points:
        return result, None, None, None
    best: tuple[Plan, fx.GraphModule, RebirthReport] | None = None
    order = bisection_order(len(points))
    index = next(order)
    while True:
        chosen, reborn, report = _retrain(model, plan, points[index], train, val, config,
                                          point_folder(folder, points[index]), progress)
        trial = Trial(index, points[index].chosen, points[index].speedup, report.student["top1"],
                      report.teacher["top1"], report.trained_images, report.calibration_images,
                      report.wall_s)
        result.trials.append(trial)
        within = trial.drop <= max_drop
        log.info("search: point %d of %d (%.2fx estimated, %d merges): validation top-1 %.2f%%, %+.2f pt against "
                 "the teacher: %s", index + 1, len(points), trial.estimated_speedup, len(trial.chosen),
                 100 * trial.val_top1, -trial.drop, "within the drop" if within else "over the drop")
        if within and (result.chosen is None or index > result.chosen):
            result.chosen, best = index, (chosen, reborn, report)
        if on_trial is not None:
            on_trial(result)
        try:
            index = order.send(within)
        except StopIteration:
            break
    return (result, *best) if best else (result, None, None, None)


def point_folder(folder: str, point: FrontPoint) -> str:
    """Where a point's checkpoints live: named by its set of merges, so that a search resumed with other
    settings (``keep``, another drop) reads back every set it already trained and retrains only new ones (a
    checkpoint also records the model, data and options it belongs to, and is refused for another job)."""
    digest = hashlib.sha256("\n".join(sorted(point.chosen)).encode()).hexdigest()[:12]
    return os.path.join(folder, "points", f"{len(point.chosen)}-{digest}")


def _retrain(model: nn.Module, plan: Plan, point: FrontPoint, train: Any, val: Any, config: RebirthConfig,
             folder: str, progress: ProgressFn | None) -> tuple[Plan, fx.GraphModule, RebirthReport]:
    """One point: ``plan`` with ``point``'s merges selected, retrained as ``config`` says, measured on ``val``."""
    chosen = Plan.from_json(plan.to_json())
    wanted = set(point.chosen)
    for c in chosen.candidates:
        c.selected = c.region.id in wanted
    reborn, report = rebirth(model, chosen, train, test_data=val, config=config,
                             checkpoint_dir=os.path.join(folder, "checkpoints"), progress=progress)
    return chosen, reborn, report


def save_search(path: str, result: SearchResult) -> None:
    """``result`` as JSON at ``path`` (written whole, then renamed: a killed run never leaves half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result.to_dict(), f, indent=1, default=str)
    os.replace(tmp, path)
