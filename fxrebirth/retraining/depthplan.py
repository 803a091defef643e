r"""Depth planning: which activations to remove, for the runtime that will run the model.

``plan = fxrebirth.retraining.depthplan.plan_depth(model, x_deploy, calibration, target_speedup=1.5)``

1. **Candidates.** Every depth segment of the captured model (:func:`fxrebirth.passes.depth.find_segments`)
   and, as LayerMerge does, its cuts: each of its convolutions that keeps its input's shape pruned to the
   identity, each operand of one of its additions dropped (``prune="grown"``, the default: only for segments
   whose merge computes more than the layers it replaces; ``"all"``; ``"none"``).
2. **Importance** of each candidate alone, on calibration images (no training, the original's weights): the
   student form with only that candidate linearised, scored by the mean ``KL(p_original || p_student)`` of
   the two models' softmax outputs, in nats per image. It needs no labels.
3. **Latency** of each candidate on the target runtime, at the deployment input: its layers cut out of the
   graph and its merged convolution (fresh weights: the time does not depend on them) timed A/B in
   interleaved rounds; ``gain = now - merged``. A candidate that is not faster merged is never chosen.
4. **Choice** (:func:`choose`), optimal under two stated approximations, as in Kim et al. (ICML 2023):
   importances and gains add up over the chosen candidates. Candidates are ordered by where their span (first
   to last node in graph order) ends; two whose spans overlap conflict (this also keeps apart candidates that
   share a node). With ``w_j = floor(gain_j / unit)``, the dynamic programme over candidates ``j`` and
   gains ``g``::

       best[j][g] = min(best[j-1][g], importance_j + best[p(j)][max(0, g - w_j)])

   (``p(j)``: the last candidate ending before ``j`` starts) gives the least summed importance that saves at
   least ``g`` units; flooring makes every claimed gain a lower bound of the estimate. The **front** is
   ``best[n][g]`` over every ``g``: estimated speed-up against summed importance.

The returned :class:`DepthPlan` is plain data (JSON in and out); its selected candidates are
:class:`~fxrebirth.graph.regions.Region` s with a :class:`~fxrebirth.graph.regions.DepthProposal`, and
:meth:`DepthPlan.segments` gives them back as segments of a captured model for
:func:`fxrebirth.passes.linearise.linearise`.
"""

from __future__ import annotations

import bisect
import copy
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxrebirth.graph.capture import as_input_tuple, capture
from fxrebirth.graph.regions import DepthProposal, Region, RegionError, check_regions, extract
from fxrebirth.passes.depth import Segment, find_segments, members_of, prunable, segment_between, stage_of
from fxrebirth.passes.linearise import linearise
from fxrebirth.retraining.layers import build_rebirth
from fxrebirth.rewrite.validate import COUNT, NOT_NEGATIVE, POSITIVE, validate_numbers

__all__ = ["plan_depth", "segment_pairs", "DepthPlan", "DepthCandidate", "FrontPoint", "candidates", "importance",
           "choose", "region_of", "segment_of"]

log = logging.getLogger(__name__)
PRUNE = ("grown", "all", "none")


def region_of(segment: Segment) -> Region:
    """``segment`` as a region of kind ``depth`` whose proposal is its merged convolution."""
    geo = segment.geometry
    proposal = DepthProposal(geo.in_channels, geo.out_channels, list(geo.kernel_size), list(geo.stride),
                             list(geo.padding), geo.groups, list(segment.activations), list(segment.pruned),
                             list(segment.dropped))
    return Region(segment.id, "depth", segment.nodes, segment.input, segment.output, segment.replaces, proposal)


def segment_of(gm: fx.GraphModule, region: Region, max_convs: int = 8) -> Segment:
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


def candidates(gm: fx.GraphModule, max_convs: int = 4, prune: str = "grown") -> list[Segment]:
    """Every segment of ``gm`` and its single cuts (see the module docstring), without repeats."""
    if prune not in PRUNE:
        raise ValueError(f"prune={prune!r}; choose one of {PRUNE}")
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


def importance(gm: fx.GraphModule, segments: list[Segment], images: torch.Tensor, batch: int = 64) -> dict[str, float]:
    """Per segment id: the mean ``KL(p_gm || p_student)`` (nats per image) over ``images`` when that segment
    alone is linearised (``gm`` captured at the images' size)."""
    reference = F.log_softmax(_logits(gm, images, batch), 1)
    out = {}
    for seg in segments:
        student = _logits(linearise(gm, [seg]), images, batch)
        kl = float(F.kl_div(F.log_softmax(student, 1), reference, log_target=True, reduction="batchmean"))
        out[seg.id] = max(kl, 0.0)  # KL >= 0; a rounding error below it is 0
    return out


@dataclass
class DepthCandidate:
    """A candidate with its importance and its latencies (seconds) now and merged, on the plan's runtime."""

    region: Region
    importance: float
    latency_now_s: float
    latency_merged_s: float
    macs_now: int
    macs_merged: int
    span: tuple[int, int]
    selected: bool = False

    @property
    def gain_s(self) -> float:
        return self.latency_now_s - self.latency_merged_s

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["region"] = self.region.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DepthCandidate":
        data = dict(data, region=Region.from_dict(data["region"]), span=tuple(data["span"]))
        return cls(**data)


@dataclass
class FrontPoint:
    """One point of the estimated front: the speed-up, the summed importance, the candidates chosen."""

    speedup: float
    importance: float
    chosen: list[str]


def choose(cands: list[DepthCandidate], need_s: float, unit_s: float, limit_s: float = math.inf
           ) -> tuple[list[int], list[tuple[float, float, list[str]]], float]:
    """The dynamic programme of the module docstring (``unit_s``: the gain grid's step). Returns the indices
    (into ``cands``) of the least important conflict-free set saving at least ``need_s`` (``[]`` if none
    does), the front as ``(gain_s, summed importance, chosen ids)`` at each gain where the least importance
    rises (``best[n][g]`` never falls as ``g`` grows), and the most any set saves on the grid. The grid stops
    at ``limit_s`` (a set saving more counts as saving that much)."""
    usable = sorted((i for i, c in enumerate(cands) if c.gain_s > 0), key=lambda i: cands[i].span[1])
    ends = [cands[i].span[1] for i in usable]
    weights = [int(cands[i].gain_s // unit_s) for i in usable]
    top = min(sum(weights), int(limit_s // unit_s) if math.isfinite(limit_s) else sum(weights))
    inf = math.inf
    best = [[0.0] + [inf] * top]
    take: list[list[bool]] = [[False] * (top + 1)]
    before = [bisect.bisect_left(ends, cands[i].span[0]) for i in usable]  # rows of candidates ending earlier
    for j, i in enumerate(usable):
        prev, base, w, imp = best[j], best[before[j]], weights[j], cands[i].importance
        row, took = list(prev), [False] * (top + 1)
        for g in range(top + 1):
            with_it = imp + base[max(0, g - w)]
            if with_it < row[g]:
                row[g], took[g] = with_it, True
        best.append(row)
        take.append(took)

    def chosen_for(g: int) -> list[int]:
        picked, j = [], len(usable)
        while j > 0 and g > 0:
            if take[j][g]:
                picked.append(usable[j - 1])
                g, j = max(0, g - weights[j - 1]), before[j - 1]
            else:
                j -= 1
        return sorted(picked)

    need = math.ceil(need_s / unit_s - 1e-9) if need_s > 0 else 0
    final = best[-1]
    picked = chosen_for(need) if need <= top and final[need] < inf else []
    front = [(g * unit_s, final[g], [cands[i].region.id for i in chosen_for(g)])
             for g in range(top + 1) if final[g] < inf and (g == top or final[g + 1] > final[g])]
    return picked, front, top * unit_s


@dataclass
class DepthPlan:
    """Candidates, their importance and latency gain, the chosen ones and the estimated front."""

    model: str
    input_shape: list[int]
    calibration_shape: list[int]
    latency_s: float
    source: str
    candidates: list[DepthCandidate] = field(default_factory=list)
    front: list[FrontPoint] = field(default_factory=list)

    @property
    def selected(self) -> list[DepthCandidate]:
        return [c for c in self.candidates if c.selected]

    @property
    def estimated_latency_s(self) -> float:
        return self.latency_s - sum(c.gain_s for c in self.selected)

    @property
    def estimated_speedup(self) -> float:
        left = self.estimated_latency_s
        return self.latency_s / left if left > 0 else math.inf

    def select(self, target_speedup: float | None = None, budget_s: float | None = None,
               steps: int = 2000) -> None:
        """Choose by :func:`choose` for a target speed-up or a latency budget (neither: no choice, only the
        front); ``steps``: the gain grid's resolution, in steps of the whole latency."""
        if target_speedup is not None and budget_s is not None:
            raise ValueError("give target_speedup= or budget_s=, not both")
        goal = budget_s if budget_s is not None else self.latency_s / target_speedup if target_speedup else None
        unit = self.latency_s / steps
        need = self.latency_s - goal if goal is not None else 0.0
        if sum(c.gain_s for c in self.candidates if c.gain_s > 0) >= self.latency_s:
            log.warning("depth plan: the candidates' summed gains reach the whole latency (noisy timings, or "
                        "gains that do not add up); the estimate is capped one grid step below it")
        picked, front, most = choose(self.candidates, need, unit, self.latency_s - unit)
        for c in self.candidates:
            c.selected = False
        for i in picked:
            self.candidates[i].selected = True
        self.front = [FrontPoint(self.latency_s / (self.latency_s - gain), imp, ids) for gain, imp, ids in front]
        if goal is not None and not picked and need > 0:
            raise ValueError(f"no set of depth merges reaches {self.latency_s / goal:.2f}x on this runtime (the most, "
                             f"estimated: {self.latency_s / (self.latency_s - most):.2f}x); lower the target")

    def validate(self, gm: fx.GraphModule) -> list[Segment]:
        """The selected candidates as segments of ``gm`` (checked: valid, disjoint regions that ``gm`` has)."""
        regions = [c.region for c in self.selected]
        check_regions(gm.graph, regions)
        return [segment_of(gm, r) for r in regions]

    def to_json(self, **kwargs: Any) -> str:
        data = asdict(self)
        data["candidates"] = [c.to_dict() for c in self.candidates]
        return json.dumps(data, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "DepthPlan":
        data = json.loads(text)
        data["candidates"] = [DepthCandidate.from_dict(c) for c in data["candidates"]]
        data["front"] = [FrontPoint(**p) for p in data["front"]]
        return cls(**data)

    def table(self, limit: int = 40) -> str:
        """The candidates (selected first, then by gain), the choice and the front, as text."""
        lines = [f"depth plan: {self.model}, input {self.input_shape}, latency {self.latency_s * 1e3:.2f} ms "
                 f"({self.source}); importance: KL nats/image at {self.calibration_shape}",
                 f"  {'candidate':<58} {'KL':>9} {'now ms':>7} {'merged':>7} {'MACs x':>7}  sel  merged layer"]
        ranked = sorted(self.candidates, key=lambda c: (not c.selected, -c.gain_s))
        for c in ranked[:limit]:
            lines.append(f"  {c.region.id[:58]:<58} {c.importance:>9.2e} {c.latency_now_s * 1e3:>7.3f} "
                         f"{c.latency_merged_s * 1e3:>7.3f} {c.macs_merged / max(c.macs_now, 1):>7.2f}  "
                         f"{'yes' if c.selected else ' no'}  {c.region.summary()}")
        if len(ranked) > limit:
            lines.append(f"  ... {len(ranked) - limit} more")
        lines.append(f"  selected {len(self.selected)} of {len(self.candidates)}; estimated {self.estimated_speedup:.2f}x, "
                     f"summed KL {sum(c.importance for c in self.selected):.3g}, before retraining")
        lines.append("  front (estimated speed-up: summed KL): " + ", ".join(
            f"{p.speedup:.2f}x: {p.importance:.3g}" for p in self.front[:: max(1, len(self.front) // 12)]))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _shape_of(gm: fx.GraphModule, name: str) -> tuple[int, ...]:
    return tuple(next(n for n in gm.graph.nodes if n.name == name).meta["tensor_meta"].shape)


def _span(gm: fx.GraphModule, seg: Segment) -> tuple[int, int]:
    position = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return min(position[n] for n in seg.nodes), position[seg.output]


def segment_pairs(deploy: fx.GraphModule, segs: list[Segment]) -> dict[str, tuple[nn.Module, nn.Module, torch.Tensor]]:
    """Per candidate: its layers cut out of ``deploy``, its merged convolution (freshly initialised) and a
    random input of its shape: what the planner times A/B."""
    pairs = {}
    for seg in segs:
        x = torch.randn(_shape_of(deploy, seg.input))
        pairs[seg.id] = (extract(deploy, seg.input, seg.nodes, seg.output, seg.id),
                         build_rebirth(region_of(seg).proposal).eval(), x)
    return pairs


_RANGES = {"target_speedup": POSITIVE, "budget_s": NOT_NEGATIVE, "max_convs": COUNT, "rounds": COUNT, "batch": COUNT}


def plan_depth(model: nn.Module, example_inputs: Any, calibration: torch.Tensor, *, runtime: str = "eager",
               target_speedup: float | None = None, budget_s: float | None = None, max_convs: int = 4,
               prune: str = "grown", rounds: int = 20, lowering: Any = None, batch: int = 64,
               device_table: Any = None) -> DepthPlan:
    """Plan depth merges (see the module docstring): ``example_inputs`` at the deployment size (latency),
    ``calibration`` images at the training size (importance). ``runtime``: any of
    :data:`fxrebirth.measure.runners.RUNTIMES`; ``lowering`` as in :func:`fxrebirth.retraining.planning.plan`.
    ``device_table``: the A/B timings read from a table measured on the device (see
    :func:`fxrebirth.retraining.profiling.profile`). Neither a target nor a budget: nothing selected, the
    front computed. The model is not changed."""
    from fxrebirth.retraining.planning import check_example, timed_pairs

    validate_numbers("plan_depth", {"target_speedup": target_speedup, "budget_s": budget_s, "max_convs": max_convs,
                                    "rounds": rounds, "batch": batch}, _RANGES, optional=("target_speedup", "budget_s"))
    inputs = as_input_tuple(example_inputs)
    check_example("plan_depth", inputs)
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 4 or len(calibration) == 0:
        shape = list(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise RegionError(f"plan_depth: calibration must be a batch of images [N >= 1, C, H, W], got {shape}")
    frozen = copy.deepcopy(model).eval()
    deploy = capture(frozen, inputs, copy_model=False)
    calib = capture(frozen, (calibration[:2],), copy_model=False)
    segs = candidates(deploy, max_convs, prune)
    start = time.perf_counter()
    weights = importance(calib, [segment_of(calib, region_of(s), max_convs) for s in segs], calibration, batch)
    log.info("importance of %d candidates on %d images: %.1f s", len(segs), len(calibration),
             time.perf_counter() - start)
    with torch.no_grad():
        whole, measured, source = timed_pairs(segment_pairs(deploy, segs), (deploy, inputs[0]), "depth", runtime,
                                              rounds, lowering, device_table)
    cands = [DepthCandidate(region_of(s), weights[s.id], *measured[s.id], s.geometry.macs_now, s.geometry.macs_merged,
                            _span(deploy, s)) for s in segs]
    shape = list(inputs[0].shape)
    plan = DepthPlan(type(model).__name__, shape, list(calibration.shape), whole, source, cands)
    plan.select(target_speedup, budget_s)
    return plan
