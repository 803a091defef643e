"""The steps of a rebirth run, and the gradient steps they drive.

A schedule is a list of :class:`Step` objects (:func:`schedule`): :class:`InitStep` (initialise the rebirth
layers and switch them on), :class:`LayerwiseStep`, :class:`EndToEndStep`, and :class:`PaperStep`
(DeepRebirth's: one region initialised, then end-to-end training on labels). A step runs on the job
(:class:`fxrebirth.retraining.engine`'s, which owns the student, the teacher and the data) and returns its
:class:`~fxrebirth.retraining.report.StepRecord`.

The gradient steps, :func:`layerwise` (each rebirth layer against its region in the original) and
:func:`end_to_end` (knowledge distillation, or labels only), train what they are handed, with their
optimisers, learning-rate schedules, training BatchNorms and loss curves, and report ``(images trained on,
last loss, loss curve)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.fx as fx
from torch import nn

from fxrebirth.graph.regions import Region
from fxrebirth.graph.surgery import device_of
from fxrebirth.passes.linearise import STUDENT_KEY
from fxrebirth.retraining.batchnorm import TrainingBatchNorm, batch_statistics_nodes, recompute_statistics
from fxrebirth.retraining.config import RebirthConfig
from fxrebirth.retraining.report import StepRecord
from fxrebirth.retraining.initialise import probe_nodes
from fxrebirth.retraining.train import (Arithmetic, Meter, ProgressFn, all_reduce_grads, batch_count, batches,
                                        feature_loss, kd_loss, world)

__all__ = ["Step", "InitStep", "LayerwiseStep", "EndToEndStep", "PaperStep", "ScratchStep", "schedule",
           "control_schedule", "layerwise", "end_to_end"]


class Job(Protocol):
    """What a step needs of the job that runs it."""

    observed: int  # forward-only images of the last end-to-end step's training BatchNorms

    def initialise(self, ids: list[str], seed: int) -> int: ...

    def scratch(self) -> None: ...

    def layerwise(self, stage: str, seed: int) -> tuple[int, float | None, list]: ...

    def end_to_end(self, stage: str, epochs: float, seed: int, kd_weight: float
                   ) -> tuple[int, float | None, list]: ...


@dataclass
class Step:
    """A step of a rebirth run: its name (in the report) and the ids of the regions it concerns."""

    name: str
    regions: list[str]

    def run(self, job: Job, seed: int) -> StepRecord:
        raise NotImplementedError


@dataclass
class InitStep(Step):
    """Initialise the rebirth layers of ``regions`` (bottom-up) and switch each on; forward passes only."""

    def run(self, job: Job, seed: int) -> StepRecord:
        return StepRecord(name=self.name, regions=self.regions, calibration_images=job.initialise(self.regions, seed))


@dataclass
class LayerwiseStep(Step):
    """Layer-wise distillation of every merged region (``layerwise_epochs``; none by default)."""

    def run(self, job: Job, seed: int) -> StepRecord:
        images, loss, curve = job.layerwise(self.name, seed)
        return StepRecord(name=self.name, regions=self.regions, trained_images=images, loss=loss, curve=curve)


@dataclass
class EndToEndStep(Step):
    """End-to-end training of the student for ``epochs``, distilled from the teacher by ``kd_weight``."""

    epochs: float = 1.0
    kd_weight: float = 0.0

    def run(self, job: Job, seed: int) -> StepRecord:
        images, loss, curve = job.end_to_end(self.name, self.epochs, seed, self.kd_weight)
        return StepRecord(name=self.name, regions=self.regions, trained_images=images,
                          calibration_images=job.observed, loss=loss, curve=curve)


@dataclass
class PaperStep(EndToEndStep):
    """DeepRebirth's step: initialise one region's rebirth layer, then train end to end on labels."""

    def run(self, job: Job, seed: int) -> StepRecord:
        calibration = job.initialise(self.regions, seed)
        record = super().run(job, seed)
        record.calibration_images += calibration
        return record


@dataclass
class ScratchStep(Step):
    """The control's start: every weight of the student re-initialised (He), every region merged."""

    def run(self, job: Job, seed: int) -> StepRecord:
        job.scratch()
        return StepRecord(name=self.name, regions=self.regions)


def control_schedule(config: RebirthConfig, ids: list[str], images: int, train_images: int) -> list[Step]:
    """The scratch control of a rebirth run that trained on ``images`` images: the same reborn architecture
    re-initialised, then trained end to end on the same number of images with the same loss (distillation
    under ``distill``, labels under ``paper``), learning rate and training-time BatchNorms."""
    kd_weight = config.kd_weight if config.schedule == "distill" else 0.0
    return [ScratchStep("re-initialise (He), every region merged", list(ids)),
            EndToEndStep("end-to-end from scratch", list(ids), epochs=images / max(1, train_images),
                         kd_weight=kd_weight)]


def schedule(config: RebirthConfig, ids: list[str]) -> list[Step]:
    """The steps of ``config.schedule`` over the regions ``ids`` (bottom-up)."""
    if config.schedule == "paper":
        return [PaperStep("merge " + rid, [rid], epochs=config.epochs) for rid in ids]
    return [InitStep("init " + config.init, list(ids)), LayerwiseStep("layer-wise distillation", list(ids)),
            EndToEndStep("end-to-end distillation", list(ids), epochs=config.epochs, kd_weight=config.kd_weight)]


def layerwise(rebirths: list[nn.Module], inputs: fx.GraphModule, targets: fx.GraphModule, data: Any,
              config: RebirthConfig, images: int, seed: int, progress: ProgressFn | None,
              stage: str) -> tuple[int, float | None, list]:
    """Layer-wise distillation on ``images`` images: each of ``rebirths`` regresses the value ``targets``
    returns for it (its region's output in the original) from the one ``inputs`` returns for it (its
    input in the student), the feature loss averaged over the layers."""
    params = [p for m in rebirths for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=config.layerwise_lr)
    steps = max(1, batch_count(len(data), config.batch_size, images))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    meter = Meter(progress, stage, images)

    def loss_of(x: torch.Tensor, y: Any) -> torch.Tensor:
        with torch.no_grad():
            sources, wanted = inputs(x), targets(x)
        return sum(feature_loss(m(a), t) for m, a, t in zip(rebirths, sources, wanted)) / len(rebirths)

    loss_value, curve = _train(loss_of, optimizer, schedule, lambda: all_reduce_grads(params), data, config,
                               images, seed, meter)
    return meter.done, loss_value, curve


def end_to_end(student: fx.GraphModule, teacher: fx.GraphModule, switches: dict[str, nn.Module],
               regions: list[Region], data: Any, config: RebirthConfig, images: int, seed: int, kd_weight: float,
               progress: ProgressFn | None, stage: str) -> tuple[int, float | None, list, int]:
    """End-to-end training of ``student`` on ``images`` images: labels and, with ``kd_weight > 0``, the
    ``teacher``'s logits and merged regions' outputs; only the active side of each switch learns. Every
    BatchNorm that trained with batch statistics gets its running statistics recomputed at the end
    (:func:`_recompute_statistics`). Returns the images trained on, the last loss, the loss curve and the
    forward-only images of the BatchNorms' statistics (observed first, recomputed last)."""
    c = config
    for switch in switches.values():  # parameters off the active path get no gradient
        switch.original.requires_grad_(not bool(switch.active))
        switch.rebirth.requires_grad_(bool(switch.active))
    norms, observed = _training_norms(student, switches, data, c, seed) if c.train_batch_norm else (None, 0)
    optimizer, schedule = _optimizer(student, switches, norms, c, max(1, batch_count(len(data), c.batch_size, images)))
    model: nn.Module = student
    device = device_of(student)
    if world()[1] > 1:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)
    student.eval()  # dropout off (see the engine's module docstring)
    if norms is not None:
        for bn in norms.modules():
            bn.train()
    # feature (hint) loss: each merged region's output against the original's
    active = [r for r in regions if r.id in switches and bool(switches[r.id].active)]
    features = c.feature_weight > 0 and kd_weight > 0 and bool(active)
    # one teacher forward per batch gives the logits and, with the feature loss, the regions' outputs
    logits = next(n for n in teacher.graph.nodes if n.op == "output").args[0].name
    probe = probe_nodes(teacher, [logits] + ([r.output for r in active] if features else [])).eval()
    captured: list[torch.Tensor] = []
    hooks = [switches[r.id].register_forward_hook(lambda m, i, o: captured.append(o)) for r in active] \
        if features else []
    meter = Meter(progress, stage, images)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft, *wanted = probe(x) if kd_weight > 0 else (None,)
        captured.clear()
        loss = kd_loss(model(x), soft, y, c.temperature, kd_weight)
        if wanted:
            loss = loss + c.feature_weight * sum(feature_loss(a, t) for a, t in zip(captured, wanted)) / len(wanted)
        return loss

    def reduce() -> None:
        if norms is not None:  # the rebirth layers' BatchNorms live outside the DDP module
            all_reduce_grads(norms.hooked_parameters())

    out = next(n for n in teacher.graph.nodes if n.op == "output").args[0].meta.get("tensor_meta")
    classes = out.shape[1] if out is not None and len(out.shape) == 2 else None
    loss_value, curve = _train(loss_of, optimizer, schedule, reduce, data, c, images, seed, meter, classes)
    for hook in hooks:
        hook.remove()
    observed += _recompute_statistics(student, norms, data, c, seed)
    if norms is not None:
        norms.fold()
    for p in student.parameters():
        p.requires_grad_(True)
    return meter.done, loss_value, curve, observed


def _training_norms(student: fx.GraphModule, switches: dict[str, nn.Module], data: Any, config: RebirthConfig,
                    seed: int) -> tuple[TrainingBatchNorm, int]:
    """A BatchNorm after every convolution of the active rebirth layers, its statistics first observed on
    up to 512 training images (forward only); returns them and the images observed."""
    norms = TrainingBatchNorm.add(student, [s.rebirth for s in switches.values() if bool(s.active)])
    observed = 0
    with torch.no_grad():
        observe = min(512, len(data))
        for x, _ in batches(data, config.batch_size, seed=seed + 1, images=observe, device=device_of(student)):
            student(x)
            observed += len(x) * world()[1]  # forward only: reported with the calibration images
    norms.start()
    return norms, observed


STATISTICS_IMAGES = 1024
"""Training images (forward only, unaugmented) whose batch statistics give the running statistics of the
BatchNorms that trained with batch statistics, once training ends."""


def _recompute_statistics(student: fx.GraphModule, norms: TrainingBatchNorm | None, data: Any,
                          config: RebirthConfig, seed: int) -> int:
    """The running statistics of the student's batch-statistics BatchNorms (its graph's, which a strategy's
    ``train_mode`` switched, and the training ones) recomputed on up to :data:`STATISTICS_IMAGES` training
    images with the trained weights (:func:`~fxrebirth.retraining.batchnorm.recompute_statistics`); returns
    the forward-only images. Measured on a user-style ResNet-18 (70.4% on Shapes 32x32) with two depth merges,
    retrained a quarter epoch of 8,000 images at ``lr=2e-3``: 46.0% top-1 with the momentum statistics that
    training left (below the 52.1% start), 57.9% with them recomputed, the same weights."""
    modules = norms.modules() if norms is not None else []
    if not modules and not batch_statistics_nodes(student):
        return 0
    images = min(STATISTICS_IMAGES, len(data))
    xs = (x for x, _ in batches(data, config.batch_size, seed=seed + 2, images=images, device=device_of(student)))
    return recompute_statistics(student, modules, xs, world()[1])


def _optimizer(student: fx.GraphModule, switches: dict[str, nn.Module], norms: TrainingBatchNorm | None,
               config: RebirthConfig, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """Adam over the student's trainable parameters (and the training BatchNorms'), the new layers at
    ``new_layer_lr_mult`` times ``lr``, the trained network's own weights at ``lr`` (``finetune_lr`` when the
    student holds depth segments), and its one-cycle schedule over ``steps`` steps."""
    c = config
    new = {id(p) for s in switches.values() if bool(s.active) for p in s.rebirth.parameters()}
    if norms is not None:
        new |= {id(p) for p in norms.parameters()}
    params = [p for p in student.parameters() if p.requires_grad]
    if norms is not None:
        params += [p for p in norms.parameters() if id(p) not in {id(q) for q in params}]
    # a depth student is the trained network fine-tuned: its own weights at finetune_lr (Adam at lr=2e-3
    # moves every weight by about lr per step, and a short budget never recovers from it)
    trained_lr = c.finetune_lr if student.meta.get(STUDENT_KEY) else c.lr
    groups = [{"params": [p for p in params if id(p) not in new], "lr": trained_lr},
              {"params": [p for p in params if id(p) in new], "lr": c.lr * c.new_layer_lr_mult}]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.Adam(groups)
    # a short warm-up (Adam's first steps, before its moment estimates settle, kicked a trained network
    # off its minimum here), then cosine decay
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, [g["lr"] for g in groups], total_steps=steps,
                                                   pct_start=c.warmup, div_factor=25, final_div_factor=100)
    return optimizer, schedule


def _train(loss_of: Callable[[torch.Tensor, Any], torch.Tensor], optimizer: torch.optim.Optimizer, schedule: Any,
           reduce: Callable[[], None], data: Any, config: RebirthConfig, images: int, seed: int,
           meter: Meter, classes: int | None = None) -> tuple[float | None, list]:
    """The loop both steps share: ``images`` images in batches seeded by ``seed`` on the parameters' device,
    augmented by ``config.augment`` (the teacher's targets come from the same augmented images), the forward
    pass in ``config.precision``, the gradients averaged over the ranks by ``reduce`` before each optimiser
    step; returns the last loss and the loss curve. ``classes``: the labels are checked against it as each batch is
    drawn (a clear error naming the item, before the loss indexes with it)."""
    curve, loss_value = [], None
    device = next(p.device for g in optimizer.param_groups for p in g["params"])
    arithmetic = Arithmetic(config.precision, device)
    for x, y in batches(data, config.batch_size, seed=seed, images=images, augment=config.augmentation(),
                        device=device, classes=classes, name="train_data"):
        with arithmetic:
            loss = loss_of(x, y)
        arithmetic.step(loss, optimizer, reduce)
        schedule.step()
        loss_value = loss.item()
        meter.update(len(x) * world()[1], loss_value)
        _sample(curve, meter.done, loss_value, images)
    return loss_value, curve


def _sample(curve: list, done: int, loss: float, total: int) -> None:
    if not curve or done - curve[-1][0] >= total / 50 or done >= total:
        curve.append((done, loss))
