"""How far the default teacher is from convergence: the same recipe trained for several epoch counts.

Not collected by the plain test command. Run::

    python -m benchmarks.teacher_curve [--epochs 4 8 16 32]

Each teacher is the cached one of :func:`fxrebirth.paper.teacher.default_teacher` (``$FXREBIRTH_CACHE``),
trained on first use and resumable after every epoch, so an interrupted curve continues where it stopped
(about a minute an epoch on 2 cores). Prints the Markdown table of docs/results.md; the issue's criterion
for "near convergence" is a doubling that gains < 0.3 pt.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from fxrebirth.paper.teacher import TeacherConfig, default_teacher
from fxrebirth.retraining.train import ProgressFn


@dataclass
class TeacherPoint:
    """One teacher of :func:`teacher_curve`: its training budget and held-out top-1."""

    epochs: int
    images: int
    """Training images passed forward and backward (epochs x training images)."""
    top1: float
    top1_interval: tuple[float, float]
    wall_s: float | None
    """Training wall time as recorded when it was trained (it includes whatever else the machine ran)."""


def teacher_curve(epochs: list[int], config: TeacherConfig | None = None, *, directory: str | None = None,
                  progress: ProgressFn | None = None, device: str = "cpu") -> list[TeacherPoint]:
    """The same recipe trained for each of ``epochs`` (everything else from ``config``): how far a teacher
    is from convergence. Each teacher is the cached one of :func:`default_teacher`, trained (resumably) on
    first use, so the curve resumes where it stopped."""
    base = asdict(config or TeacherConfig())
    points = []
    for count in sorted(set(int(e) for e in epochs)):
        if count < 1:
            raise ValueError(f"teacher_curve: epochs must be >= 1, not {count}")
        _, meta = default_teacher(TeacherConfig(**{**base, "epochs": count}), progress=progress,
                                  directory=directory, device=device)
        points.append(TeacherPoint(count, count * meta["train_images"], meta["top1"],
                                   tuple(meta["top1_interval"]), meta.get("wall_s")))
    return points


def teacher_curve_table(points: list[TeacherPoint]) -> str:
    """The curve as a Markdown table; "gain from doubling" compares a teacher with the one of half its
    epochs when the curve has it."""
    by_epochs = {p.epochs: p for p in points}
    lines = ["| teacher epochs (images forward and backward) | top-1 (95% interval) | gain from doubling | wall |",
             "|---|---|---|---|"]
    for p in points:
        half = by_epochs.get(p.epochs // 2) if p.epochs % 2 == 0 else None
        gain = f"{100 * (p.top1 - half.top1):+.2f} pt" if half else ""
        wall = f"{p.wall_s / 60:.1f} min" if p.wall_s is not None else ""
        lo, hi = p.top1_interval
        lines.append(f"| {p.epochs} ({p.images:,}) | {p.top1:.2%} [{lo:.2%}, {hi:.2%}] | {gain} | {wall} |")
    return "\n".join(lines)


def main(epochs: list[int]) -> str:
    return teacher_curve_table(teacher_curve(epochs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[4, 8, 16, 32])
    print(main(parser.parse_args().epochs))
