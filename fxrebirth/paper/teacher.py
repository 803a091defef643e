"""The default teacher: the Caffe-style GoogLeNet trained on the embedded :class:`~fxrebirth.paper.data.Shapes`
set at low resolution, trained once and cached; or, with ``arch=``, a torchvision architecture
(``mobilenet_v2``, ``resnet18``, any of :data:`TORCHVISION_TEACHERS`) trained the same way, its BatchNorms kept.

Caffe trained GoogLeNet's 22 layers with two auxiliary classifiers; here a BatchNorm after every
convolution plays that role during training and is then folded into the convolutions (exactly:
:func:`fxrebirth.paper.models.fold_batch_norm`), so the teacher is the paper's architecture, LRN included and no
BatchNorm. Training: AdamW with a one-cycle schedule, random horizontal flips, He initialisation.

The cache holds a state_dict and plain metadata (loaded with ``weights_only=True``) under
``$FXREBIRTH_CACHE`` (default ``~/.cache/fxrebirth``), keyed by every setting that changes the result.
An interrupted training resumes from its last finished epoch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fxrebirth.paper.data import Shapes
from fxrebirth.paper.models import fold_batch_norm, googlenet_lrn, he_init
from fxrebirth.retraining.train import (Meter, ProgressFn, batch_count, batches, evaluate, fingerprint, load_checkpoint,
                                        resolve_device, save_checkpoint)

__all__ = ["TeacherConfig", "cache_dir", "train_teacher", "default_teacher", "TORCHVISION_TEACHERS", "build_teacher"]

TORCHVISION_TEACHERS = ("mobilenet_v2", "mobilenet_v3_small", "resnet18", "resnet34", "regnet_y_400mf")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherConfig:
    """Everything that decides the default teacher (a change retrains it)."""

    image_size: int = 32
    train_images: int = 20000
    test_images: int = 10000
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: float = 1.0
    seed: int = 0
    arch: str = "googlenet_lrn"

    def key(self) -> str:
        """The cache key (``arch`` joins it only when it is not the default, so older caches still load)."""
        settings = asdict(self)
        if self.arch == "googlenet_lrn":
            settings.pop("arch")
        return fingerprint(settings)


def build_teacher(arch: str, num_classes: int, width: float = 1.0, batch_norm: bool = False) -> nn.Module:
    """The untrained teacher architecture: ``googlenet_lrn`` (with a BatchNorm after every convolution when
    ``batch_norm``, for training) or a torchvision one (its own BatchNorms and initialisation)."""
    if arch == "googlenet_lrn":
        model = googlenet_lrn(num_classes, width=width, batch_norm=batch_norm)
        return he_init(model) if batch_norm else model
    if arch not in TORCHVISION_TEACHERS:
        raise ValueError(f"no teacher architecture {arch!r}; known: googlenet_lrn, {', '.join(TORCHVISION_TEACHERS)}")
    if width != 1.0:
        raise ValueError(f"width={width}: only googlenet_lrn takes a width")
    import torchvision

    return getattr(torchvision.models, arch)(num_classes=num_classes)


def cache_dir() -> str:
    """``$FXREBIRTH_CACHE``, or ``~/.cache/fxrebirth``."""
    return os.environ.get("FXREBIRTH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fxrebirth")


def train_teacher(config: TeacherConfig, train_data: Any, *, checkpoint: str | None = None,
                  progress: ProgressFn | None = None, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Train the BatchNorm variant of ``googlenet_lrn`` on ``train_data``, fold the BatchNorms, and return the
    plain Caffe-style model (eval mode, on the CPU) and training metadata (a torchvision ``config.arch``:
    trained and returned as it is). ``checkpoint``: a file to resume
    from and write after every epoch. ``device``: where it trains (not part of the cache key: the same
    settings on another device give the same teacher up to rounding)."""
    torch.manual_seed(config.seed)
    num_classes = len(train_data.classes)
    where = resolve_device(device)
    model = build_teacher(config.arch, num_classes, config.width, batch_norm=True).to(where)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = batch_count(len(train_data), config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * steps_per_epoch,
                                                   pct_start=0.15)
    key = config.key()
    start_epoch, wall = 0, 0.0
    state = load_checkpoint(checkpoint) if checkpoint else None
    if state is not None and state.get("key") == key:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, wall = state["epoch"], state["wall_s"]
        log.info("teacher: resuming after epoch %d", start_epoch)
    meter = Meter(progress, "teacher", config.epochs * len(train_data))
    meter.done = start_epoch * len(train_data)
    for epoch in range(start_epoch, config.epochs):
        began = time.perf_counter()
        model.train()
        torch.manual_seed(config.seed * 1000 + epoch)  # dropout: the same whether resumed or not
        for x, y in batches(train_data, config.batch_size, seed=config.seed * 1000 + epoch, augment=True,
                            device=where):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            meter.update(len(x), loss.item(), epoch=epoch + 1)
        wall += time.perf_counter() - began
        if checkpoint:
            save_checkpoint(checkpoint, {"key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "schedule": schedule.state_dict(), "epoch": epoch + 1, "wall_s": wall})
    model.eval().cpu()
    meta = {"epochs": config.epochs, "train_images": len(train_data), "wall_s": wall, "key": key, "arch": config.arch}
    if config.arch != "googlenet_lrn":
        return model, meta
    fold_batch_norm(model)
    plain = googlenet_lrn(num_classes, width=config.width)
    plain.load_state_dict(model.state_dict())
    return plain.eval(), meta


def default_teacher(config: TeacherConfig | None = None, *, progress: ProgressFn | None = None,
                    directory: str | None = None, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The cached default teacher (trained on first use, on ``device``: about 4 minutes on 2 CPU cores) and
    its metadata, including its held-out accuracy."""
    config = config or TeacherConfig()
    directory = directory or cache_dir()
    key = config.key()
    path = os.path.join(directory, f"teacher-{config.arch}-{key}.pt")
    cached = load_checkpoint(path)
    model = build_teacher(config.arch, len(Shapes.classes), config.width)
    if cached is not None:
        model.load_state_dict(cached["model"])
        log.info("teacher: loaded %s", path)
        return model.eval(), dict(cached["meta"], cached=True, path=path)
    train = Shapes("train", config.train_images, config.image_size, seed=config.seed)
    test = Shapes("test", config.test_images, config.image_size, seed=config.seed)
    partial = os.path.join(directory, f"teacher-{key}.partial.pt")
    model, meta = train_teacher(config, train, checkpoint=partial, progress=progress, device=device)
    result = evaluate(model, test)
    meta.update(top1=result.top1, top1_interval=list(result.top1_interval), test_images=result.images)
    save_checkpoint(path, {"model": model.state_dict(), "meta": meta})
    if os.path.exists(partial):
        os.remove(partial)
    log.info("teacher: trained in %.0f s, top-1 %.4f on %d held-out images", meta["wall_s"], result.top1,
             result.images)
    return model.eval(), dict(meta, cached=False, path=path)
