"""The options of a rebirth run: :class:`RebirthConfig`, its validation, and the initialisations and
schedules it may name (:data:`INITS`, :data:`SCHEDULES`). What each option does is told in
:mod:`fxrebirth.retraining.engine`, which runs them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from fxrebirth.errors import FxRebirthError
from fxrebirth.retraining.augment import Augment, parse_augment
from fxrebirth.rewrite.validate import COUNT, NOT_NEGATIVE, POSITIVE, Range, validate_bool, validate_numbers

__all__ = ["RebirthConfig", "INITS", "SCHEDULES", "PRECISIONS", "RANGES"]

INITS = ("auto", "lstsq", "xavier", "original")
SCHEDULES = ("distill", "paper")
PRECISIONS = ("fp32", "bf16", "fp16")
# options added after checkpoints were in use, with their defaults: they join a job's key only when set
_LATER_OPTIONS = {"augment": "none", "shift": 0.0625, "mixup_alpha": 1.0, "finetune_lr": 2e-4}
_WHOLE = Range(0, integer=True)
RANGES = {"epochs": NOT_NEGATIVE, "layerwise_epochs": NOT_NEGATIVE, "calibration_images": _WHOLE,
          "ridge": NOT_NEGATIVE, "batch_size": COUNT, "lr": POSITIVE, "finetune_lr": POSITIVE, "new_layer_lr_mult": POSITIVE,
          "layerwise_lr": POSITIVE, "temperature": POSITIVE, "kd_weight": Range(0, 1), "feature_weight": NOT_NEGATIVE,
          "warmup": Range(0, 1, open_high=True), "eval_images": _WHOLE, "seed": Range(integer=True)}
"""The numeric options of :class:`RebirthConfig` and the values each accepts, checked when a config is made
(``shift`` and ``mixup_alpha`` by :class:`~fxrebirth.retraining.augment.Augment`)."""


@dataclass
class RebirthConfig:
    """Options of :func:`~fxrebirth.retraining.engine.rebirth` (see :mod:`fxrebirth.retraining.engine`)."""

    init: str = "auto"
    """How each streamline or branch rebirth layer starts (:data:`INITS`). ``auto`` (the default) applies each
    candidate (the original weights re-laid, with the BatchNorm that follows folded in; the least-squares fit to
    the region's outputs) and keeps the one whose student is nearest the teacher on held calibration images
    (:mod:`fxrebirth.retraining.startpoint`); ``original``, ``lstsq``, ``xavier`` force one."""
    schedule: str = "distill"
    epochs: float = 4.0
    """End-to-end epochs: in all (``distill``) or per merging step (``paper``). The default run measured
    -0.81 pt against its teacher after 3 epochs and +0.01 pt after 4 (docs/results.md)."""
    layerwise_epochs: float = 0.0
    calibration_images: int = 2048
    ridge: float = 1e-3
    batch_size: int = 128
    lr: float = 2e-3
    finetune_lr: float = 2e-4
    """Learning rate of the trained network's own weights when the plan holds depth merges (a depth student
    is the trained network with activations removed: fine-tuned, no new layer); ``lr`` is the rest's (new
    layers, and every weight of a plan without depth merges). On a user-style ResNet-18 with two depth merges,
    a quarter epoch: 66.1% top-1 at 2e-4, 57.9% at 2e-3 (start 52.1%, teacher 70.4%)."""
    new_layer_lr_mult: float = 1.0
    layerwise_lr: float = 1e-4
    temperature: float = 2.0
    kd_weight: float = 0.9
    feature_weight: float = 1.0
    """Weight of the feature loss in end-to-end distillation: each merged region's output against the
    original region's (relative mean squared error, averaged over regions)."""
    warmup: float = 0.1
    """Share of the end-to-end steps spent warming the learning rate up."""
    train_batch_norm: bool = True
    """Train end to end with a BatchNorm after every convolution, folded away afterwards
    (:mod:`fxrebirth.retraining.batchnorm`)."""
    augment: str = "none"
    """Augmentation of every gradient step's batches, the teacher seeing the same images: ``none`` or
    transforms from ``flip``, ``shift``, ``mixup`` joined by ``+`` (:mod:`fxrebirth.retraining.augment`)."""
    shift: float = 0.0625
    """``shift``'s largest move, as a share of the image width (2 pixels at 32)."""
    mixup_alpha: float = 1.0
    """``mixup``'s ``lam ~ Beta(alpha, alpha)`` (1: uniform)."""
    eval_images: int = 2000
    """Held-out images evaluated after every step (the final evaluation uses the whole test set)."""
    seed: int = 0
    device: str = "cpu"
    """Where calibration, training and evaluation run: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when
    present). Under ``torchrun``, ``cuda`` and ``auto`` mean ``cuda:$LOCAL_RANK``. The reborn model is
    returned on the CPU; a checkpoint resumes on any device."""
    precision: str = "fp32"
    """Arithmetic of the gradient steps: ``fp32``, ``bf16`` (autocast, on the CPU or a GPU) or ``fp16``
    (autocast with loss scaling, CUDA only). Least-squares fits (float64), BatchNorm statistics and
    evaluation stay in full precision, and the reborn model's weights are float32."""

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise FxRebirthError(f"init={self.init!r}: choose one of {INITS}")
        if self.schedule not in SCHEDULES:
            raise FxRebirthError(f"schedule={self.schedule!r}: choose one of {SCHEDULES}")
        validate_numbers("rebirth", asdict(self), RANGES)
        validate_bool("train_batch_norm", self.train_batch_norm)
        self.augmentation()  # a bad spec is an error now, not after calibration
        if self.precision not in PRECISIONS:
            raise FxRebirthError(f"precision={self.precision!r}: choose one of {PRECISIONS}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise FxRebirthError(f"device={self.device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None

    def augmentation(self) -> Augment:
        """The :class:`~fxrebirth.retraining.augment.Augment` that ``augment``, ``shift`` and ``mixup_alpha`` name."""
        return Augment(parse_augment(self.augment), self.shift, self.mixup_alpha)

    def key_settings(self) -> dict[str, Any]:
        """The options that identify a checkpointed job: all but ``device`` (a job may resume on another), and
        the later options only when set (so that older checkpoints still resume)."""
        return {k: v for k, v in asdict(self).items()
                if k != "device" and not (k in _LATER_OPTIONS and v == _LATER_OPTIONS[k])}
