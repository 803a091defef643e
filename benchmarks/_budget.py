"""The accuracy-vs-budget curve: the reborn model against its scratch control at several retraining budgets
(the experiment behind docs/results.md's budget tables; ``python -m benchmarks.budget_curve`` runs it).

``points = budget_curve(model, plan, train_data, test_data, [5000, 20000])`` runs
:func:`~fxrebirth.retraining.engine.rebirth` with its scratch control (``control=True``) once per budget. A
budget is training images passed forward and backward (the unit of :class:`~fxrebirth.retraining.report.RebirthReport`),
spent on end-to-end distillation (``epochs = images / len(train_data)``, no layer-wise step), and the
control trains on the same number. Each budget checkpoints in a folder of its own under ``checkpoint_dir``,
so an interrupted curve resumes where it stopped. :func:`budget_table` renders the points as a Markdown table,
:func:`budget_figure` as a chart (a Mermaid ``xychart-beta`` block, which GitHub renders; no plotting library).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from torch import nn

from fxrebirth.errors import FxRebirthError
from fxrebirth.retraining.config import RebirthConfig
from fxrebirth.retraining.engine import rebirth
from fxrebirth.retraining.planning import Plan
from fxrebirth.retraining.train import ProgressFn

__all__ = ["BudgetPoint", "budget_curve", "budget_table", "budget_figure"]


@dataclass
class BudgetPoint:
    """One budget of the curve: the reborn model's and the control's held-out top-1 after it."""

    images: int
    """Training images (forward and backward) each of the two spent."""
    teacher_share: float | None
    reborn_top1: float
    control_top1: float
    teacher_top1: float
    reborn_minus_teacher: tuple[float, float]
    """Paired 95% interval of the top-1 difference."""
    reborn_minus_control: tuple[float, float]
    wall_s: float
    control_wall_s: float


def budget_curve(model: nn.Module, plan: Plan, train_data: Any, test_data: Any, budgets: Sequence[int], *,
                 config: RebirthConfig | None = None, checkpoint_dir: str | os.PathLike | None = None,
                 teacher_cost: dict[str, Any] | None = None, progress: ProgressFn | None = None,
                 **options: Any) -> list[BudgetPoint]:
    """The reborn model and its scratch control at each of ``budgets`` (see the module docstring); options as
    for :func:`~fxrebirth.retraining.engine.rebirth` (the ``distill`` schedule; ``epochs`` and
    ``layerwise_epochs`` are set by the budget)."""
    base = {**(asdict(config) if config is not None else {}), **options}
    if base.get("schedule", "distill") != "distill":
        raise FxRebirthError("budget_curve varies the end-to-end epochs of the distill schedule; "
                             f"schedule={base['schedule']!r} is not supported")
    if not budgets or any(int(b) < 1 for b in budgets):
        raise FxRebirthError(f"budgets {list(budgets)}: give one or more numbers of training images, each >= 1")
    points = []
    for images in budgets:
        folder = os.path.join(os.fspath(checkpoint_dir), f"budget-{int(images)}") if checkpoint_dir else None
        _, report = rebirth(model, plan, train_data, test_data=test_data, checkpoint_dir=folder, progress=progress,
                            control=True, teacher_cost=teacher_cost,
                            config=RebirthConfig(**{**base, "epochs": int(images) / len(train_data),
                                                    "layerwise_epochs": 0.0}))
        control = report.control
        points.append(BudgetPoint(
            images=report.trained_images, teacher_share=report.teacher_share, reborn_top1=report.student["top1"],
            control_top1=control["top1"], teacher_top1=report.teacher["top1"],
            reborn_minus_teacher=tuple(report.difference_interval),
            reborn_minus_control=tuple(control["reborn_minus_control"]), wall_s=report.wall_s,
            control_wall_s=control["wall_s"]))
    return points


def budget_table(points: Sequence[BudgetPoint]) -> str:
    """The curve as a Markdown table (one row per budget)."""
    lines = ["| retraining images (share of the teacher's) | reborn top-1 | reborn - teacher (paired 95%) | "
             "scratch control top-1 | reborn - control (paired 95%) | wall s (reborn / control) |",
             "|---|---|---|---|---|---|"]
    for p in points:
        share = f" ({p.teacher_share:.0%})" if p.teacher_share is not None else ""
        lo, hi = p.reborn_minus_teacher
        clo, chi = p.reborn_minus_control
        lines.append(f"| {p.images:,}{share} | {p.reborn_top1:.2%} | {p.reborn_top1 - p.teacher_top1:+.2%} "
                     f"[{lo:+.2%}, {hi:+.2%}] | {p.control_top1:.2%} | {p.reborn_top1 - p.control_top1:+.2%} "
                     f"[{clo:+.2%}, {chi:+.2%}] | {p.wall_s:.0f} / {p.control_wall_s:.0f} |")
    if points:
        lines.append(f"\nTeacher: {points[0].teacher_top1:.2%} top-1 on the same held-out images.")
    return "\n".join(lines)


def budget_figure(points: Sequence[BudgetPoint], title: str = "Held-out top-1 by retraining budget") -> str:
    """The curve as a Mermaid line chart: the reborn model, its scratch control and the teacher (a flat
    line), top-1 in percent against the budget (its share of the teacher's when known). Mermaid's
    ``xychart-beta`` draws no legend, so the block is followed by one line saying which line is which."""
    if not points:
        raise FxRebirthError("budget_figure: no points")
    labels = [f"{p.teacher_share:.0%}" if p.teacher_share is not None else f"{p.images:,}" for p in points]
    axis = "share of the teacher's training images" if points[0].teacher_share is not None else "training images"

    def series(values: Sequence[float]) -> str:
        return "[" + ", ".join(f"{100 * v:.2f}" for v in values) + "]"

    lines = ["```mermaid", "xychart-beta", f'    title "{title}"',
             f'    x-axis "{axis}" [' + ", ".join(f'"{label}"' for label in labels) + "]",
             '    y-axis "top-1 (%)" 0 --> 100',
             f"    line {series([p.reborn_top1 for p in points])}",
             f"    line {series([p.control_top1 for p in points])}",
             f"    line {series([p.teacher_top1 for p in points])}", "```", "",
             "Lines in the order drawn (Mermaid's first, second and third colour): the reborn model, the "
             "scratch control, the teacher (flat)."]
    return "\n".join(lines)
