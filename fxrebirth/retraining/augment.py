"""Augmentation of training batches: random horizontal flips, random shifts and mixup.

A rebirth run sees a small share of the teacher's training images. Augmenting them shows the student more of
the teacher's function per image; with distillation the teacher sees the very same augmented image, so its
soft targets stay consistent with the student's input (Beyer et al., CVPR 2022, "Knowledge distillation: a
good teacher is patient and consistent", who found such consistent views, mixup among them, the key to
distilling on a small budget).

``augment`` names the transforms, joined by ``+`` (``"flip+shift+mixup"``; ``"none"`` for none), applied in
this order to every batch, each image independently:

* ``flip``: mirrored left-right with probability 1/2;
* ``shift``: moved by ``dy, dx`` pixels, each uniform in ``[-s, s]`` with ``s = max(1, round(shift * W))``,
  the border filled by reflection (reflect-pad by ``s``, then crop the original size);
* ``mixup`` (Zhang et al., ICLR 2018): ``x_i <- lam * x_i + (1 - lam) * x_perm(i)`` with one
  ``lam ~ Beta(alpha, alpha)`` and one random pairing ``perm`` per batch; the labels become
  :class:`MixedLabels`, whose cross-entropy is ``lam * CE(y_i) + (1 - lam) * CE(y_perm(i))``.

Every draw comes from the batch generator, so a seeded run augments identically on every device, on resume
and under torch.distributed (the global batch is augmented before each rank takes its rows).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from fxrebirth.errors import FxRebirthError

__all__ = ["AUGMENTS", "Augment", "MixedLabels", "parse_augment"]

AUGMENTS = ("flip", "shift", "mixup")


def parse_augment(spec: str) -> tuple[str, ...]:
    """The transforms ``spec`` names (``"none"`` or ``""``: none), in the order they are applied."""
    if spec in ("", "none"):
        return ()
    parts = tuple(spec.split("+"))
    if any(p not in AUGMENTS for p in parts) or len(set(parts)) != len(parts):
        raise FxRebirthError(f"augment={spec!r}: use 'none' or distinct names from {AUGMENTS} joined by '+', "
                             "e.g. 'flip+shift'")
    return tuple(a for a in AUGMENTS if a in parts)


class MixedLabels:
    """The labels of a mixup batch: image ``i`` is ``weight * x_i + (1 - weight) * x_j`` with labels
    ``first[i]`` and ``second[i]`` (``y_j``). Sliced and moved like a label tensor."""

    def __init__(self, first: torch.Tensor, second: torch.Tensor, weight: float) -> None:
        self.first, self.second, self.weight = first, second, weight

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, index: Any) -> MixedLabels:
        return MixedLabels(self.first[index], self.second[index], self.weight)

    def to(self, *args: Any, **kwargs: Any) -> MixedLabels:
        return MixedLabels(self.first.to(*args, **kwargs), self.second.to(*args, **kwargs), self.weight)

    def cross_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """``weight * CE(logits, first) + (1 - weight) * CE(logits, second)`` (mean over the batch)."""
        return (self.weight * F.cross_entropy(logits, self.first)
                + (1 - self.weight) * F.cross_entropy(logits, self.second))


@dataclass(frozen=True)
class Augment:
    """The transforms of a batch (see the module docstring): ``kinds`` from :data:`AUGMENTS`, the largest
    shift as a share of the image width, and mixup's Beta parameter."""

    kinds: tuple[str, ...] = ()
    shift: float = 0.0625
    mixup_alpha: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.shift < 0.5 or self.mixup_alpha <= 0:
            raise FxRebirthError(f"augment: need 0 < shift < 0.5 and mixup_alpha > 0 (got shift={self.shift}, "
                                 f"mixup_alpha={self.mixup_alpha})")

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | MixedLabels]:
        """The augmented batch ``(x, y)``; ``x`` is ``[N, C, H, W]``, ``y`` the labels."""
        n = len(x)
        if "flip" in self.kinds:
            flip = torch.rand(n, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if "shift" in self.kinds:
            x = _shifted(x, min(max(1, round(self.shift * x.shape[-1])), x.shape[-1] - 1, x.shape[-2] - 1),
                         generator)
        if "mixup" in self.kinds and n > 1:
            # Beta draws in torch take no generator: seed Python's from it
            lam = random.Random(int(torch.randint(2 ** 62, (1,), generator=generator))).betavariate(
                self.mixup_alpha, self.mixup_alpha)
            perm = torch.randperm(n, generator=generator)
            x = lam * x + (1 - lam) * x[perm]
            y = MixedLabels(y, y[perm], lam)
        return x, y


def _shifted(x: torch.Tensor, s: int, generator: torch.Generator | None) -> torch.Tensor:
    """Each image of ``x`` moved by its own ``dy, dx`` in ``[-s, s]``, the border reflected."""
    n, c, h, w = x.shape
    padded = F.pad(x, (s, s, s, s), mode="reflect")
    dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=generator)
    rows = (torch.arange(h)[None] + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w)[None] + dx[:, None])[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
