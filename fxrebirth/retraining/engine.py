r"""The retraining engine: ONE job that trains any plan, whatever strategies its candidates come from.

``gm, report = fxrebirth.rebirth(model, plan, train_data, test_data=...)``

1. **Rebuild.** The model is captured at the data's image size and the plan checked against it. The
   student is the captured graph with each selected candidate in its strategy's trainable form
   (:mod:`fxrebirth.retraining.student`): a streamline or branch region behind a
   :class:`~fxrebirth.retraining.strategy.RegionSwitch` (the original region and its rebirth layer), a depth
   segment linearised (:mod:`fxrebirth.retraining.strategies`). The returned model is what each strategy
   finishes it into: the rebirth layers alone, each depth segment merged into one convolution (verified).
   A training option that none of the plan's strategies reads is refused before any work.
2. **Initialise** each rebirth layer of a switch strategy (``init=``, :mod:`fxrebirth.retraining.initialise`;
   a depth student starts from the original's weights):

   * ``"auto"`` (default): each candidate start below (``original``, ``lstsq``) applied in turn and the one
     nearest the teacher kept, by the KL of the student's logits to the teacher's on held calibration images
     (:mod:`fxrebirth.retraining.startpoint`; per region the winner, ``start_kl`` and ``start_agreement`` are
     recorded).
   * ``"original"``: the original weights re-laid, the BatchNorm after the convolution folded in: a
     streamline convolution's kernel placed inside the larger kernel where the pooling window's centre reads;
     inception branches copied with the first channels of each thinned reduce layer; the absorbed
     pool-projection channels Glorot-initialised.
   * ``"lstsq"``: a closed-form ridge-regression fit on calibration images. A streamline region's
     convolution ``W`` minimises ``||[unfold(x) 1] W - y||^2 + lambda ||W||^2`` over the region's inputs
     ``x`` (unfolded into the rebirth kernel's patches) and outputs ``y``. In an inception region the 1x1
     branch is the original layer, the thinned reduce layers keep the channels that carry the most output
     energy (``E[r_c^2] * ||W_2[:, c]||^2``), and each branch's last convolution is fitted from the kept
     channels to the original pre-activation (plus, in the absorbing branch, the pool projection's).
     Regions are fitted bottom-up, each reading its input from the student (regions below merged) and its
     targets from the original. The best start before training; not after it, on the default GoogLeNet.
   * ``"xavier"``: Glorot-uniform weights, zero biases (the paper's).

3. **Train** (``schedule=``):

   * ``"distill"`` (default): optional layer-wise distillation (each rebirth layer regresses its region's
     output in the original from its input in the student; ``layerwise_epochs``, off by default), then
     end-to-end knowledge distillation with the original as teacher: ``kd_weight * T^2 KL(p_T(teacher) ||
     p_T(student)) + (1 - kd_weight) * CE(student, labels) + feature_weight * mean_r relMSE(region r)`` for
     ``epochs`` epochs, with a BatchNorm after every convolution during training, folded away afterwards
     (:mod:`fxrebirth.retraining.batchnorm`).
   * ``"paper"``: DeepRebirth's schedule: bottom-up, one region per step, ``epochs`` epochs per step of
     end-to-end training on labels, the new layer at ``new_layer_lr_mult`` times the learning rate.

   A depth student trains end to end only, its model's BatchNorms in batch statistics (``train_batch_norm``),
   the trained network's own weights at ``finetune_lr`` (new layers at ``lr``). Every end-to-end step ends by
   recomputing the running statistics of the BatchNorms that trained on batch statistics, on training images
   with the trained weights (forward only, counted with the calibration images).
   The student trains with dropout off (distillation is its regulariser, and data-parallel runs then match a
   single process). Under ``torchrun`` the end-to-end training is data-parallel (DDP); every rank must call
   :func:`rebirth` with the same arguments. ``device=`` (``cuda`` under torchrun: ``cuda:$LOCAL_RANK``) is where
   calibration, training and evaluation run; ``precision=`` (``bf16``, ``fp16``) autocasts the gradient
   steps' forward passes; the reborn model comes back on the CPU in float32.

4. **Checkpoint** after every step (``checkpoint_dir``): a crash, even ``kill -9``, loses at most the step in
   progress, and ``resume=True`` continues from the last finished step with the same result as an
   uninterrupted run (every step is seeded from ``seed`` and its index).

Retraining cost is counted as the paper counts epochs: images passed forward *and backward* through any
training, summed over all steps, divided by the training-set size (layer-wise distillation included, though
its backward pass only reaches the rebirth layers); forward-only calibration images are reported apart.

The options are :class:`~fxrebirth.retraining.config.RebirthConfig` (re-exported here); the gradient steps
(layer-wise and end-to-end training) are in :mod:`fxrebirth.retraining.steps`.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict, fields
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from fxrebirth.errors import FxRebirthError
from fxrebirth.graph.capture import capture
from fxrebirth.graph.regions import Region, RegionError
from fxrebirth.measure.speed import eager_latency
from fxrebirth.retraining.config import INITS, SCHEDULES, RebirthConfig
from fxrebirth.retraining.data import DataError, check_dataset
from fxrebirth.retraining.initialise import probe_nodes
from fxrebirth.retraining.plandata import Plan
from fxrebirth.retraining.planning import check_example
from fxrebirth.retraining.report import RebirthReport, StepRecord
from fxrebirth.retraining.steps import control_schedule, end_to_end, layerwise, schedule
from fxrebirth.retraining.strategy import RegionSwitch, check_options
from fxrebirth.retraining.student import build_student, finish_student, strategies_of
from fxrebirth.retraining.train import (Arithmetic, ProgressFn, batches, evaluate, fingerprint,
                                        load_checkpoint, paired_difference, resolve_device, save_checkpoint)
from fxrebirth.retraining.weights import reinitialise

__all__ = ["rebirth", "RebirthJob", "RebirthConfig", "RebirthReport", "RegionSwitch", "INITS", "SCHEDULES"]

log = logging.getLogger(__name__)


def check_training_options(plan: Plan, config: RebirthConfig) -> None:
    """Refuse (:class:`OptionError`, one line) a training option set away from its default that none of the
    plan's selected strategies reads (``init`` for a plan of depth merges only, ...); ``init="auto"`` is each
    strategy's own default."""
    defaults = RebirthConfig()
    changed = {f.name: getattr(config, f.name) for f in fields(RebirthConfig)
               if getattr(config, f.name) != getattr(defaults, f.name) and (f.name, config.init) != ("init", "auto")}
    check_options(sorted({c.strategy for c in plan.selected}), changed)


class RebirthJob:
    """One retraining run of a plan: the student, its steps, and the checkpoint that records the finished ones.
    Strategies reach it through :attr:`teacher`, :attr:`config`, :attr:`train_data`, :attr:`progress`,
    :attr:`region_facts`, :meth:`switch` and :meth:`student_input`."""

    def __init__(self, model: nn.Module, plan: Plan, train_data: Any, test_data: Any, config: RebirthConfig,
                 progress: ProgressFn | None, checkpoint_dir: str | None, control_images: int | None = None) -> None:
        self.config, self.progress, self.train_data, self.test_data = config, progress, train_data, test_data
        self.plan = _checked_plan(plan, model, config)
        image, _ = _first(train_data, "train_data")
        model = copy.deepcopy(model).eval().cpu()  # the user's model is never touched
        num_classes = _num_classes(model, image)
        check_dataset(train_data, name="train_data", num_classes=num_classes)
        if test_data is not None:
            check_dataset(test_data, name="test_data", num_classes=num_classes, image_size=tuple(image.shape[1:]))
        self.teacher = capture(model, (image[None],))
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        torch.manual_seed(config.seed)
        self._build_student(list(image.shape))
        self.device = resolve_device(config.device)
        Arithmetic.check(config.precision, self.device)  # say so before any work
        self.teacher.to(self.device)
        self.student.to(self.device)
        ids = [r.id for r in self.regions]
        # the scratch control (control_images: the rebirth run's budget) or the rebirth run itself
        self.steps = schedule(config, ids) if control_images is None else \
            control_schedule(config, ids, control_images, len(train_data))
        # the plan's regions, not its timings
        self.key = fingerprint(config.key_settings(), [r.to_dict() for r in self.regions], len(train_data),
                               model.state_dict(), control_images)
        name = "rebirth.ckpt" if control_images is None else "control.ckpt"
        self.path = os.path.join(checkpoint_dir, name) if checkpoint_dir else None
        self.report = RebirthReport(asdict(config), len(train_data))
        self.region_facts: dict[str, dict[str, Any]] = {r.id: {} for r in self.regions}
        self.eval_reference: torch.Tensor | None = None
        self.observed = 0  # forward-only images of the last end-to-end step's BatchNorm statistics

    def _build_student(self, image_shape: list[int]) -> None:
        """``self.planned``/``self.regions`` (graph order), ``self.switches`` and ``self.student``."""
        try:
            self.student, self.switches = build_student(self.teacher, self.plan)
        except RegionError as exc:
            raise RegionError(f"the plan does not fit this model at the data's image size {image_shape}: "
                              f"{exc}") from None
        position = {n.name: i for i, n in enumerate(self.teacher.graph.nodes)}
        self.planned = sorted(self.plan.selected, key=lambda c: position[c.region.output])
        self.regions = [c.region for c in self.planned]
        for p in self.student.parameters():
            p.requires_grad_(True)

    # ----------------------------------------------------------------------------------------- checkpoints
    def resume(self) -> int:
        state = load_checkpoint(self.path) if self.path else None
        if state is None:
            return 0
        if state.get("key") != self.key:
            raise FxRebirthError(f"{self.path} belongs to another rebirth job (other model, plan, data or "
                                 "options); use another checkpoint_dir, or delete it to start over")
        self.student.load_state_dict(state["student"])
        self.report.steps = [StepRecord(**s) for s in state["steps"]]
        self.region_facts = state["regions"]
        self.report.resumed_from = self.path
        log.info("rebirth: resuming after step %d of %d (%s)", state["done"], len(self.steps), self.path)
        return int(state["done"])

    def save(self, done: int) -> None:
        if self.path:
            save_checkpoint(self.path, {"key": self.key, "done": done, "student": self.student.state_dict(),
                                        "steps": [asdict(s) for s in self.report.steps],
                                        "regions": self.region_facts})

    # --------------------------------------------------------------------------------------------- steps
    def run(self, resume: bool) -> None:
        start = self.resume() if resume else 0
        for index in range(start, len(self.steps)):
            step = self.steps[index]
            seed = self.config.seed * 7919 + index
            torch.manual_seed(seed)
            began = time.perf_counter()
            record = step.run(self, seed)
            record.wall_s = time.perf_counter() - began
            self._evaluate_step(record)
            self.report.steps.append(record)
            self.save(index + 1)
            log.info("rebirth: %s done in %.1f s", step.name, record.wall_s)

    def initialise(self, ids: list[str], seed: int) -> int:
        """Each strategy initialises its regions among ``ids`` (bottom-up within it); returns the
        forward-only calibration images used."""
        used = 0
        for strategy, regions in strategies_of(self.plan):
            mine = [r for r in self.regions if r.id in ids and r.kind == strategy.name]
            if mine:
                used += strategy.initialise(self, mine, seed)
        return used

    def switch(self, region_id: str) -> RegionSwitch:
        """The switch of a region of a switch strategy."""
        return self.switches[region_id]

    def scratch(self) -> None:
        """The control's start: every weight of the student anew (He), every switch on its rebirth layer."""
        kept = reinitialise(self.student)
        if kept:
            log.warning("rebirth control: %d parameter(s) not re-initialised: %s", len(kept), kept[:5])
        for switch in self.switches.values():
            switch.active.fill_(True)

    def student_input(self, region: Region) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The student's value at the input of ``region``'s switch, when any region before it is merged."""
        if not any(bool(s.active) for s in self.switches.values()):
            return None
        probe = probe_nodes(self.student, [self._switch_input(region)]).eval()
        return lambda x: probe(x)[0]

    def _switch_input(self, region: Region) -> str:
        """The name of the student's node that feeds ``region``'s switch."""
        switch = self.switches[region.id]
        node = next(n for n in self.student.graph.nodes
                    if n.op == "call_module" and self.student.get_submodule(n.target) is switch)
        return node.args[0].name

    def layerwise(self, stage: str, seed: int) -> tuple[int, float | None, list]:
        images = int(round(self.config.layerwise_epochs * len(self.train_data)))
        switched = [r for r in self.regions if r.id in self.switches]
        if images == 0 or not switched:
            return 0, None, []
        # inputs from the student (every region merged), targets from the original: each layer learns to
        # correct what the layers below it got wrong, as its least-squares fit did
        targets = probe_nodes(self.teacher, [r.output for r in switched]).eval()
        inputs = probe_nodes(self.student, [self._switch_input(r) for r in switched]).eval()
        rebirths = [self.switches[r.id].rebirth for r in switched]
        return layerwise(rebirths, inputs, targets, self.train_data, self.config, images, seed, self.progress, stage)

    def end_to_end(self, stage: str, epochs: float, seed: int, kd_weight: float) -> tuple[int, float | None, list]:
        images = int(round(epochs * len(self.train_data)))
        self.observed = 0
        if images == 0:
            return 0, None, []
        strategies = [s for s, _ in strategies_of(self.plan)]
        for strategy in strategies:
            strategy.train_mode(self.student, self.config.train_batch_norm)
        try:
            done, loss, curve, self.observed = end_to_end(self.student, self.teacher, self.switches, self.regions,
                                                          self.train_data, self.config, images, seed, kd_weight,
                                                          self.progress, stage)
        finally:
            for strategy in strategies:
                strategy.train_mode(self.student, False)
        return done, loss, curve

    def _evaluate_step(self, record: StepRecord) -> None:
        if self.test_data is None or self.config.eval_images == 0:
            return
        subset = torch.utils.data.Subset(self.test_data, range(min(self.config.eval_images, len(self.test_data))))
        if self.eval_reference is None:
            self.eval_reference = evaluate(self.teacher, subset, device=self.device, name="test_data").predictions
        result = evaluate(self.student, subset, reference=self.eval_reference, device=self.device)
        record.top1, record.agreement = result.top1, result.agreement

    def result(self) -> fx.GraphModule:
        """The reborn model (on the job's device): the trained student finished by each strategy."""
        return finish_student(self.student, self.plan)


def _checked_plan(plan: Any, model: nn.Module, config: RebirthConfig) -> Plan:
    if not isinstance(plan, Plan):
        raise FxRebirthError(f"plan must be a fxrebirth.Plan (got {type(plan).__name__}); make one with "
                             "fxrebirth.plan(model, example_inputs)")
    if not plan.selected:
        raise FxRebirthError("the plan selects no candidate: nothing to rebuild (Plan.select() with a lower target, "
                             "or another strategy)")
    if plan.model and plan.model != type(model).__name__:
        raise RegionError(f"the plan was made for a {plan.model}, the model is a {type(model).__name__}")
    check_training_options(plan, config)
    return plan


def _num_classes(model: nn.Module, image: torch.Tensor) -> int:
    with torch.no_grad():
        try:
            out = model(image[None])
        except Exception as exc:
            raise DataError(f"the model does not accept the data's images {list(image.shape)}: "
                            f"{type(exc).__name__}: {exc}") from None
    if out.dim() != 2:
        raise FxRebirthError(f"the model must return logits [batch, classes]; it returned {list(out.shape)}")
    return out.shape[1]


def _first(data: Any, name: str) -> tuple[torch.Tensor, Any]:
    try:
        if len(data) == 0:
            raise DataError(f"{name}: the dataset is empty")
        item = data[0]
    except TypeError:
        raise DataError(f"{name}: a map-style dataset of (image, label) is needed") from None
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor)
            and item[0].dim() == 3):
        raise DataError(f"{name}: items must be (image tensor [C, H, W], label)")
    return item[0], item[1]


def rebirth(model: nn.Module, plan: Plan, train_data: Any, *, test_data: Any = None,
            config: RebirthConfig | None = None, checkpoint_dir: str | os.PathLike | None = None,
            resume: bool = True, progress: ProgressFn | None = None,
            latency_input: torch.Tensor | None = None, latency_rounds: int = 20, control: bool = False,
            teacher_cost: dict[str, Any] | None = None, **options: Any) -> tuple[fx.GraphModule, RebirthReport]:
    """Replace every region ``plan`` selects by its rebirth layer and retrain (see the module docstring);
    whatever strategies the plan's candidates come from (:class:`RebirthJob`).

    ``model`` is not modified. ``train_data``/``test_data``: map-style datasets of ``(image [3, H, W], label)``
    (:class:`fxrebirth.paper.data.Shapes`, :func:`~fxrebirth.paper.data.image_folder`, ...). Options are the fields of
    :class:`RebirthConfig`, as ``config=`` or keywords. ``latency_input``: measure the latency of the original
    and the reborn model on it (interleaved). ``control``: also train the scratch control, the same reborn
    architecture with every weight re-initialised (He) and trained end to end with the same loss, learning
    rate and training-time BatchNorms on the same number of images (``report.control``). ``teacher_cost``:
    what training ``model`` cost, ``{"images": forward-and-backward images, "wall_s": seconds}`` (either may
    be missing), to report the retraining as a share of it. Returns the reborn GraphModule (eval mode) and a
    :class:`RebirthReport`.
    """
    unknown = sorted(set(options) - {f.name for f in fields(RebirthConfig)})
    if unknown:
        raise FxRebirthError(f"unknown rebirth option(s) {unknown}; options: {[f.name for f in fields(RebirthConfig)]}")
    config = RebirthConfig(**{**(asdict(config) if config is not None else {}), **options})
    if latency_input is not None:
        check_example("rebirth: latency_input", (latency_input,))
    folder = os.fspath(checkpoint_dir) if checkpoint_dir is not None else None
    job = RebirthJob(model, plan, train_data, test_data, config, progress, folder)
    job.run(resume)
    reborn = job.result()
    report = job.report
    for planned in job.planned:
        facts = job.region_facts.get(planned.region.id, {})
        report.regions.append({"id": planned.region.id, "replaces": list(planned.region.replaces),
                               "planned_gain_s": planned.gain_s, **{k: v for k, v in facts.items()
                                                                    if k != "kept_reduce_channels"}})
    report.teacher_cost = dict(teacher_cost) if teacher_cost else None
    evaluated = _evaluate(job.teacher, reborn, test_data, report, job.device) if test_data is not None else None
    if control:
        scratch = RebirthJob(model, plan, train_data, test_data, config, progress, folder,
                       control_images=report.trained_images)
        scratch.run(resume)
        report.control = _control_record(scratch, evaluated, test_data)
    reborn = reborn.cpu()
    if latency_input is not None:
        report.latency = {**eager_latency(model, reborn, latency_input, latency_rounds),
                          "planned_speedup": plan.estimated_speedup}
    return reborn, report


def _evaluate(teacher: nn.Module, reborn: nn.Module, test_data: Any, report: RebirthReport,
              device: torch.device) -> tuple[Any, Any, Any]:
    """Both models' accuracy on ``test_data`` (on ``device``) and the paired interval of their difference,
    into ``report``; returns the two evaluations and the labels."""
    teacher_eval = evaluate(teacher, test_data, device=device, name="test_data")
    student_eval = evaluate(reborn, test_data, reference=teacher_eval.predictions, device=device)
    report.teacher, report.student = teacher_eval.to_dict(), student_eval.to_dict()
    labels = torch.cat([y for _, y in batches(test_data, 1000)])
    report.difference_interval = paired_difference(student_eval.predictions, teacher_eval.predictions, labels)
    return teacher_eval, student_eval, labels


def _control_record(job: RebirthJob, evaluated: tuple[Any, Any, Any] | None, test_data: Any) -> dict[str, Any]:
    """The scratch control's cost and steps, and with test data its accuracy and the paired interval of the
    reborn model's top-1 minus the control's."""
    record: dict[str, Any] = {"trained_images": job.report.trained_images,
                              "calibration_images": job.report.calibration_images, "wall_s": job.report.wall_s,
                              "steps": [asdict(s) for s in job.report.steps]}
    if evaluated is not None:
        teacher_eval, student_eval, labels = evaluated
        control_eval = evaluate(job.result(), test_data, reference=teacher_eval.predictions, device=job.device)
        record.update(control_eval.to_dict())
        record["reborn_minus_control"] = paired_difference(student_eval.predictions, control_eval.predictions, labels)
    return record

