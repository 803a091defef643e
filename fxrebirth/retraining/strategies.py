r"""The three retraining strategies that ship, registered under their names (:mod:`fxrebirth.retraining.strategy`).

* ``streamline`` (DeepRebirth): a convolution with the LRN and pooling after it (:mod:`fxrebirth.passes.streamline`)
  replaced by one convolution; options ``streamline_kernel``.
* ``branch`` (DeepRebirth): an inception module's parallel branches and pool projection replaced by thinner
  branches without it (:mod:`fxrebirth.passes.inception`); options ``reduce_ratio``, ``collapse_reduce``.
  Both train behind :class:`~fxrebirth.retraining.strategy.RegionSwitch` es, initialised by
  :class:`~fxrebirth.retraining.initialise.Initialiser` (``init``, ``ridge``, ``calibration_images``),
  optionally distilled layer by layer (``layerwise_epochs``) or on the paper's schedule (``schedule``).
* ``depth`` (depth compression, Kim et al., ICML 2023): a chain that one convolution computes once its chosen
  activations are removed (:mod:`fxrebirth.passes.depth`), with the cuts LayerMerge adds (a convolution pruned
  to the identity, an addition's operand dropped; ``prune``), up to ``max_convs`` convolutions. Its importance
  is the mean ``KL(p_original || p_student)`` over calibration images (nats per image) with only that
  candidate linearised; the student is :func:`fxrebirth.passes.linearise.linearise` of the model (original
  weights, activations the identity), trained end to end with the model's BatchNorms in batch statistics
  (``train_batch_norm``), and :func:`~fxrebirth.passes.linearise.merge` d exactly after training.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxrebirth.graph.regions import DepthProposal, Region, RegionError
from fxrebirth.passes.depth import Segment, find_segments, members_of, prunable, segment_between, stage_of
from fxrebirth.passes.linearise import STUDENT_KEY, linearise, merge
from fxrebirth.retraining.initialise import Initialiser
from fxrebirth.retraining.layers import RENAMED, replace_regions
from fxrebirth.retraining.startpoint import JUDGE_IMAGES, StartJudge
from fxrebirth.retraining.strategy import Strategy, SwitchStrategy, register_strategy
from fxrebirth.retraining.train import Meter
from fxrebirth.rewrite.validate import OptionError

__all__ = ["StreamlineStrategy", "BranchStrategy", "DepthStrategy", "SWITCH_TRAINING", "PRUNE", "region_of",
           "segment_of", "depth_candidates", "kl_importance"]

log = logging.getLogger(__name__)

SWITCH_TRAINING = frozenset({"init", "schedule", "layerwise_epochs", "calibration_images", "ridge",
                             "new_layer_lr_mult", "layerwise_lr", "feature_weight"})
"""The RebirthConfig fields a switch strategy's job reads beyond the common ones."""

PRUNE = ("grown", "all", "none")
_ANY_LENGTH = 64  # a segment's convolutions: enough for every segment a plan may hold


class _RegionSwitchStrategy(SwitchStrategy):
    """Initialisation of rebirth layers behind switches, bottom-up (``init``: original, lstsq, xavier, auto); the
    importance of a region: the mean KL of the model with that region alone replaced by its rebirth layer,
    initialised from the original weights re-laid (``init="original"``, the BatchNorm after the convolution
    folded in: the first start ``init="auto"`` measures)."""

    training: ClassVar[frozenset[str]] = SWITCH_TRAINING
    needs_calibration = True

    def importance(self, gm: fx.GraphModule, regions: list[Region], images: torch.Tensor,
                   batch: int = 64) -> dict[str, float]:
        def merged(region: Region) -> nn.Module:
            layer = self.layer(region)
            Initialiser(gm, [region], "original", 0.0).apply(region, layer)
            return replace_regions(gm, [region], {region.id: layer})

        return kl_importance(gm, ((r.id, lambda r=r: merged(r)) for r in regions), images, batch)

    def initialise(self, job: Any, regions: list[Region], seed: int) -> int:
        """Initialise each region's rebirth layer, switching it on once done; each least-squares fit reads its
        input from the student (the regions below merged) and its targets from the original. Under
        ``init="auto"`` each region keeps the candidate start nearest the teacher (:mod:`~fxrebirth.retraining.
        startpoint`); returns the forward-only images used (fits and judging)."""
        init = Initialiser(job.teacher, regions, job.config.init, job.config.ridge)
        per_region = min(job.config.calibration_images, len(job.train_data))
        fitted = [r for r in regions if "lstsq" in init.candidates(r) + (init.method(r),)]
        meter = Meter(job.progress, "calibration", per_region * len(fitted))
        judge = None
        if job.config.init == "auto" and per_region:
            judge = StartJudge(job.teacher, job.student, job.train_data, min(JUDGE_IMAGES, per_region),
                               job.config.batch_size, seed, getattr(job, "device", None))
        used = 0
        for region in regions:
            switch = job.switch(region.id)
            used += init.calibrate(region, switch.rebirth, job.train_data, per_region, job.config.batch_size,
                                   seed, meter, student_input=job.student_input(region))
            switch.active.fill_(True)
            if judge is not None:
                facts = judge.choose(init, region, switch.rebirth)
            else:
                facts = {**init.apply(region, switch.rebirth), "init": init.method(region)}
            job.region_facts[region.id].update(**facts)
        return used + (judge.used if judge is not None else 0)


class StreamlineStrategy(_RegionSwitchStrategy):
    """Convolution -> LRN -> pooling chains, one convolution each (see the module docstring)."""

    name = "streamline"
    options = frozenset({"streamline_kernel"})

    def mark(self, gm: fx.GraphModule, *, streamline_kernel: str = "field", **_: Any) -> list[Region]:
        from fxrebirth.passes.streamline import mark_streamline

        return mark_streamline(gm, streamline_kernel)


class BranchStrategy(_RegionSwitchStrategy):
    """Inception modules without their pool projection (see the module docstring)."""

    name = "branch"
    options = frozenset({"reduce_ratio", "collapse_reduce"})

    def mark(self, gm: fx.GraphModule, *, reduce_ratio: float | None = None, collapse_reduce: bool = False,
             **_: Any) -> list[Region]:
        from fxrebirth.passes.inception import mark_inception

        kwargs: dict[str, Any] = {"collapse_reduce": collapse_reduce}
        if reduce_ratio is not None:
            kwargs["reduce_ratio"] = reduce_ratio
        return mark_inception(gm, **kwargs)


def region_of(segment: Segment) -> Region:
    """``segment`` as a region of kind ``depth`` whose proposal is its merged convolution."""
    geo = segment.geometry
    proposal = DepthProposal(geo.in_channels, geo.out_channels, list(geo.kernel_size), list(geo.stride),
                             list(geo.padding), geo.groups, list(segment.activations), list(segment.pruned),
                             list(segment.dropped))
    return Region(segment.id, "depth", segment.nodes, segment.input, segment.output, segment.replaces, proposal)


def segment_of(gm: fx.GraphModule, region: Region, max_convs: int = _ANY_LENGTH) -> Segment:
    """The segment of ``gm`` that ``region`` (from :func:`region_of`) describes; :class:`RegionError` if
    ``gm`` has none there (another model, or a graph the region no longer fits)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    proposal = region.proposal
    if region.input not in nodes or region.output not in nodes or not isinstance(proposal, DepthProposal):
        raise RegionError(f"region {region.id!r} is not a depth region of this model")
    try:
        seg = segment_between(nodes[region.input], nodes[region.output], max_convs,
                              tuple(proposal.pruned), tuple(proposal.dropped))
    except ValueError as exc:
        raise RegionError(f"region {region.id!r}: {exc}") from None
    if seg is None or set(seg.nodes) != set(region.nodes):
        raise RegionError(f"region {region.id!r}: this model has no such segment (nodes differ)")
    return seg


def depth_candidates(gm: fx.GraphModule, max_convs: int = 4, prune: str = "grown") -> list[Segment]:
    """Every segment of ``gm`` and its single cuts (``prune="grown"``: only for segments whose merge computes
    more than the layers it replaces; ``"all"``; ``"none"``), without repeats."""
    if prune not in PRUNE:
        raise OptionError(f"prune={prune!r}; choose one of {', '.join(PRUNE)}")
    nodes = {n.name: n for n in gm.graph.nodes}
    found: dict[str, Segment] = {}
    for seg in find_segments(gm, max_convs):
        found.setdefault(seg.id, seg)
        if prune == "none" or (prune == "grown" and seg.geometry.growth <= 1):
            continue
        members = members_of(gm, seg)
        operands = [x.name for n in members if stage_of(n) == "add" for x in n.all_input_nodes]
        cuts = [((c,), ()) for c in prunable(members)] + [((), (o,)) for o in dict.fromkeys(operands)]
        for pruned, dropped in cuts:
            try:
                cut = segment_between(nodes[seg.input], nodes[seg.output], max_convs, pruned, dropped)
            except ValueError:  # an operand something else in the segment reads: not droppable
                continue
            if cut is not None:
                found.setdefault(cut.id, cut)
    return list(found.values())


def _logits(model: nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch]).float() for i in range(0, len(images), batch)])


def kl_importance(gm: fx.GraphModule, students: Iterable[tuple[str, Callable[[], nn.Module]]], images: torch.Tensor,
                  batch: int = 64) -> dict[str, float]:
    """Per ``(key, make)`` of ``students`` (``make()`` builds ``gm`` with one candidate in its merged or student
    form; one at a time, so that one copy of the model is alive): the mean ``KL(p_gm || p_student)`` over
    ``images``, in nats per image."""
    reference = F.log_softmax(_logits(gm, images, batch), 1)
    out = {}
    for key, make in students:
        logits = _logits(make(), images, batch)
        kl = float(F.kl_div(F.log_softmax(logits, 1), reference, log_target=True, reduction="batchmean"))
        out[key] = max(kl, 0.0)  # KL >= 0; a rounding error below it is 0
    return out


class DepthStrategy(Strategy):
    """Chains merged across their activations (see the module docstring)."""

    name = "depth"
    options = frozenset({"max_convs", "prune"})
    training = frozenset({"finetune_lr"})
    needs_calibration = True
    order = 0  # linearised before switches are placed: its student form rewrites the graph's nodes

    def mark(self, gm: fx.GraphModule, *, max_convs: int = 4, prune: str = "grown", **_: Any) -> list[Region]:
        return [region_of(s) for s in depth_candidates(gm, max_convs, prune)]

    def check(self, gm: fx.GraphModule, regions: list[Region]) -> None:
        for region in regions:
            segment_of(gm, region)

    def importance(self, gm: fx.GraphModule, regions: list[Region], images: torch.Tensor,
                   batch: int = 64) -> dict[str, float]:
        students = ((r.id, lambda r=r: linearise(gm, [segment_of(gm, r)])) for r in regions)
        return kl_importance(gm, students, images, batch)

    def student(self, gm: fx.GraphModule, regions: list[Region]) -> fx.GraphModule:
        return linearise(gm, [segment_of(gm, r) for r in regions])

    def initialise(self, job: Any, regions: list[Region], seed: int) -> int:
        for region in regions:
            job.region_facts[region.id]["init"] = "original"  # the student form starts from the original weights
        return 0

    def train_mode(self, gm: fx.GraphModule, training: bool) -> None:
        """The model's own BatchNorms in batch statistics while training (``training``), running ones after
        (recomputed for the trained weights when training ends: :func:`fxrebirth.retraining.steps.end_to_end`).
        The trained weights learn at ``finetune_lr``: the student is the trained network, fine-tuned."""
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is F.batch_norm and "training" in node.kwargs:
                node.kwargs = {**node.kwargs, "training": training}
        gm.recompile()

    def finish(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Each student segment merged into one convolution, verified in float64 (:func:`merge`). A segment whose
        input another strategy's layer now computes reads it from there."""
        parts = gm.meta.get(STUDENT_KEY)
        if not parts:
            return gm
        renamed = gm.meta.get(RENAMED, {})
        gm.meta[STUDENT_KEY] = [dataclasses.replace(p, input=renamed.get(p.input, p.input)) for p in parts]
        return merge(gm)


for _strategy in (StreamlineStrategy(), BranchStrategy(), DepthStrategy()):
    register_strategy(_strategy, replace=True)
