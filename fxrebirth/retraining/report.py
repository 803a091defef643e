"""What a rebirth run did: its steps, per-region facts, accuracy before and after, retraining cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["StepRecord", "RebirthReport"]


@dataclass(kw_only=True)
class StepRecord:
    """One merging step: what it did, what it cost, and the held-out accuracy after it (built by keyword)."""

    name: str
    regions: list[str]
    trained_images: int = 0
    """Images passed forward and backward."""
    calibration_images: int = 0
    """Images passed forward only (least-squares statistics, training BatchNorms' first statistics)."""
    wall_s: float = 0.0
    loss: float | None = None
    top1: float | None = None
    agreement: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(images so far in this step, loss), about 50 points."""


@dataclass
class RebirthReport:
    """What :func:`rebirth` did: per step and region, accuracy before and after, and the retraining cost."""

    config: dict[str, Any]
    train_images: int
    steps: list[StepRecord] = field(default_factory=list)
    regions: list[dict[str, Any]] = field(default_factory=list)
    teacher: dict[str, Any] | None = None
    student: dict[str, Any] | None = None
    difference_interval: tuple[float, float] | None = None
    """95% interval of student minus teacher top-1 (paired, on the same held-out images)."""
    latency: dict[str, Any] | None = None
    resumed_from: str | None = None
    teacher_cost: dict[str, Any] | None = None
    """What training the original cost: ``images`` (forward and backward) and ``wall_s``, as stated."""
    control: dict[str, Any] | None = None
    """The scratch control (same reborn architecture re-initialised, same loss and budget): its cost, steps,
    held-out accuracy and ``reborn_minus_control`` (paired 95% interval of the top-1 difference)."""

    @property
    def teacher_share(self) -> float | None:
        """The retraining's images as a share of the teacher's training images (None when not stated)."""
        images = (self.teacher_cost or {}).get("images")
        return self.trained_images / images if images else None

    @property
    def trained_images(self) -> int:
        return sum(s.trained_images for s in self.steps)

    @property
    def retraining_epochs(self) -> float:
        """Images passed forward and backward in any training, divided by the training-set size."""
        return self.trained_images / self.train_images if self.train_images else 0.0

    @property
    def calibration_images(self) -> int:
        return sum(s.calibration_images for s in self.steps)

    @property
    def wall_s(self) -> float:
        return sum(s.wall_s for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(retraining_epochs=self.retraining_epochs, trained_images=self.trained_images,
                    calibration_images=self.calibration_images, wall_s=self.wall_s, teacher_share=self.teacher_share)
        return data

    def table(self) -> str:
        lines = [f"rebirth: init={self.config['init']} schedule={self.config['schedule']}; retraining "
                 f"{self.retraining_epochs:.2f} epochs ({self.trained_images} images forward+backward, "
                 f"{self.calibration_images} forward-only calibration images), {self.wall_s:.0f} s",
                 f"  {'step':<34} {'regions':>7} {'epochs':>7} {'wall s':>7} {'loss':>8} {'top-1':>7} {'agree':>7}"]
        for s in self.steps:
            epochs = s.trained_images / self.train_images if self.train_images else 0.0
            lines.append(f"  {s.name[:34]:<34} {len(s.regions):>7} {epochs:>7.2f} {s.wall_s:>7.1f} "
                         f"{_fmt(s.loss, '8.4f')} {_fmt(s.top1, '7.2%')} {_fmt(s.agreement, '7.2%')}")
        if self.teacher and self.student:
            t, st = self.teacher, self.student
            lines.append(f"  held-out top-1 on {st['images']} images: teacher {t['top1']:.2%} "
                         f"[{t['top1_interval'][0]:.2%}, {t['top1_interval'][1]:.2%}], reborn {st['top1']:.2%} "
                         f"[{st['top1_interval'][0]:.2%}, {st['top1_interval'][1]:.2%}], agreement "
                         f"{st['agreement']:.2%}")
            if self.difference_interval:
                lo, hi = self.difference_interval
                lines.append(f"  reborn - teacher: {st['top1'] - t['top1']:+.2%} (paired 95% interval "
                             f"[{lo:+.2%}, {hi:+.2%}])")
        lines += self._economics()
        return "\n".join(lines)

    def _economics(self) -> list[str]:
        """What the retraining cost against the teacher's training, and the scratch control's result."""
        lines = []
        cost = self.teacher_cost or {}
        if cost.get("images"):
            wall = f", {cost['wall_s']:.0f} s" if cost.get("wall_s") else ""
            lines.append(f"  teacher's training: {cost['images']} images forward+backward{wall}; retraining "
                         f"{self.teacher_share:.1%} of it")
        c = self.control
        if c is not None and c.get("top1") is not None:
            lo, hi = c["reborn_minus_control"]
            reborn = self.student["top1"] if self.student else float("nan")
            lines.append(f"  scratch control (same architecture, He init, same loss and {c['trained_images']} images): "
                         f"{c['top1']:.2%} [{c['top1_interval'][0]:.2%}, {c['top1_interval'][1]:.2%}]; reborn - "
                         f"control {reborn - c['top1']:+.2%} (paired 95% [{lo:+.2%}, {hi:+.2%}])")
        return lines

    def __str__(self) -> str:
        return self.table()


def _fmt(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{value:{spec}}" if value is not None else f"{'-':>{width}}"
