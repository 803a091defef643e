"""Rebirth planning: mark the non-linear regions, measure what they cost, choose which to merge.

``fxrebirth.plan(model, example_inputs)`` captures the model, runs the marking passes (streamline and
branch), measures every node's latency on this machine (or reads a latency table measured elsewhere,
e.g. on a phone), estimates each region's rebirth layer the same way, and returns a :class:`Plan`: per
region, which original layers it replaces, its cost now, the estimated cost of its rebirth layer, the
gain, and whether it is selected. The gain is known before any training.

Selection: every region whose rebirth layer is faster (``select="all"``), or the biggest gains first
until a ``target_speedup`` or a latency ``budget_s`` is met. Regions whose rebirth layer would be slower
are never selected, nor those ``keep`` names (an id such as ``"streamline:conv1.conv"``, or a prefix such as
``"streamline:"``): the way to trade speed for accuracy where a region costs more accuracy than its gain is
worth (docs/results.md measures what each region of the paper's GoogLeNet costs). A Plan is plain data:
JSON in and out, editable (drop a region, change a width); :meth:`Plan.validate` rejects an edited plan
that would not fit the model, with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxrebirth.graph.capture import as_input_tuple, capture
from fxrebirth.rewrite.cost import TableCost, graph_flops, median_seconds, node_bytes, node_flops, profile_nodes
from fxrebirth.graph.ops import kind_of
from fxrebirth.retraining.layers import build_rebirth
from fxrebirth.graph.regions import Region, RegionError, check_regions
from fxrebirth.rewrite.validate import COUNT, NOT_NEGATIVE, POSITIVE, Range, validate_numbers

__all__ = ["plan", "mark_regions", "Plan", "PlannedRegion", "runtime_ab", "region_pairs", "timed_pairs", "kept_ids"]


def _time_module(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    return median_seconds(lambda: module(x), repeats, warmup=1)


def _depth(gm: fx.GraphModule, region: Region) -> int:
    """Weighted layers (convolutions) on the longest path through the region."""
    members = set(region.nodes)
    best: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.name not in members:
            continue
        here = 1 if kind_of(node) == "conv" else 0
        best[node.name] = here + max((best.get(a.name, 0) for a in node.all_input_nodes), default=0)
    return best.get(region.output, 0)


@dataclass
class PlannedRegion:
    """A region with its measured cost, its rebirth layer's estimated cost, and the decision."""

    region: Region
    cost_now_s: float
    cost_rebirth_s: float
    depth_now: int
    depth_rebirth: int
    flops_now: int = 0
    flops_rebirth: int = 0
    bytes_now: int = 0
    bytes_rebirth: int = 0
    selected: bool = False

    @property
    def gain_s(self) -> float:
        return self.cost_now_s - self.cost_rebirth_s

    def to_dict(self) -> dict[str, Any]:
        return {"region": self.region.to_dict(), "cost_now_s": self.cost_now_s,
                "cost_rebirth_s": self.cost_rebirth_s, "depth_now": self.depth_now,
                "depth_rebirth": self.depth_rebirth, "flops_now": self.flops_now,
                "flops_rebirth": self.flops_rebirth, "bytes_now": self.bytes_now,
                "bytes_rebirth": self.bytes_rebirth, "selected": self.selected}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PlannedRegion":
        data = dict(data)
        data["region"] = Region.from_dict(data["region"])
        return cls(**data)


@dataclass
class Plan:
    """Which regions to replace by rebirth layers, and what that is expected to gain."""

    model: str
    input_shape: list[int]
    latency_s: float
    source: str
    regions: list[PlannedRegion] = field(default_factory=list)

    @property
    def selected(self) -> list[PlannedRegion]:
        return [r for r in self.regions if r.selected]

    @property
    def estimated_latency_s(self) -> float:
        return self.latency_s - sum(r.gain_s for r in self.selected)

    @property
    def estimated_speedup(self) -> float:
        return self.latency_s / self.estimated_latency_s if self.estimated_latency_s > 0 else float("inf")

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps({"model": self.model, "input_shape": self.input_shape, "latency_s": self.latency_s,
                           "source": self.source, "regions": [r.to_dict() for r in self.regions]}, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        data["regions"] = [PlannedRegion.from_dict(r) for r in data["regions"]]
        return cls(**data)

    def drop(self, region_id: str) -> None:
        """Deselect a region by id (``KeyError`` naming the known ids if there is none)."""
        self._get(region_id).selected = False

    def keep(self, names: "list[str] | tuple[str, ...]") -> None:
        """Deselect every region whose id is one of ``names`` or starts with one of them (the original layers
        stay); :class:`RegionError` naming the known ids for a name that matches no region."""
        for region_id in kept_ids([r.region.id for r in self.regions], names):
            self.drop(region_id)

    def _get(self, region_id: str) -> PlannedRegion:
        for r in self.regions:
            if r.region.id == region_id:
                return r
        raise KeyError(f"no region {region_id!r}; regions: {[r.region.id for r in self.regions]}")

    def validate(self, gm: fx.GraphModule) -> None:
        """Raise :class:`RegionError` unless the selected regions fit ``gm`` (the captured model):
        valid, non-overlapping regions whose rebirth layers read and produce the regions' shapes."""
        regions = [r.region for r in self.selected]
        check_regions(gm.graph, regions)
        nodes = {n.name: n for n in gm.graph.nodes}
        for region in regions:
            x, out = nodes[region.input], nodes[region.output]
            in_shape, out_shape = tuple(x.meta["tensor_meta"].shape), tuple(out.meta["tensor_meta"].shape)
            try:
                module = build_rebirth(region.proposal)
                with torch.no_grad():
                    got = tuple(module(torch.zeros(in_shape)).shape)
            except RegionError:
                raise
            except Exception as exc:
                raise RegionError(f"region {region.id!r}: its rebirth layer does not fit: {exc}") from None
            if got != out_shape:
                raise RegionError(
                    f"region {region.id!r}: its rebirth layer produces {list(got)}, the region {list(out_shape)}"
                )

    def table(self) -> str:
        """Which layers each rebirth layer replaces, the depth lost, and the measured/estimated costs."""
        lines = [f"rebirth plan: {self.model}, input {self.input_shape}, latency {self.latency_s * 1e3:.2f} ms "
                 f"({self.source})",
                 f"  {'region':<32} {'depth':>7} {'now ms':>8} {'rebirth':>8} {'gain':>7} {'share':>6} "
                 f"{'MFLOPs':>15}  sel  replaces"]
        for r in self.regions:
            share = r.cost_now_s / self.latency_s if self.latency_s else 0.0
            replaces = r.region.summary()
            lines.append(
                f"  {r.region.id:<32} {r.depth_now:>3}->{r.depth_rebirth:<3} {r.cost_now_s * 1e3:>8.2f} "
                f"{r.cost_rebirth_s * 1e3:>8.2f} {r.gain_s * 1e3:>7.2f} {share:>6.1%} "
                f"{r.flops_now / 1e6:>7.0f}->{r.flops_rebirth / 1e6:<7.0f}  {'yes' if r.selected else ' no'}  "
                f"{replaces[:90]}{'...' if len(replaces) > 90 else ''}"
            )
        lines.append(f"  selected {len(self.selected)} of {len(self.regions)} regions; estimated latency "
                     f"{self.estimated_latency_s * 1e3:.2f} ms ({self.estimated_speedup:.2f}x), before retraining")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _here_or_from_table(gm: fx.GraphModule, inputs: tuple, regions: list[Region], latency_table: dict | None,
                        repeats: int) -> tuple[float, dict[str, tuple[float, float]], str]:
    """As :func:`_through_runtime`, in eager PyTorch: every node profiled here and each rebirth layer timed,
    or both read from ``latency_table`` (the roofline model for entries it lacks)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    if latency_table is None:
        costs = profile_nodes(gm, inputs, repeats=repeats)
        source = f"measured here, eager, median of {repeats}"
    else:
        table = TableCost(latency_table)
        costs = {n.name: table.node_cost(n) for n in gm.graph.nodes}
        source = "latency table"
    out = {}
    for region in regions:
        module = build_rebirth(region.proposal)
        x = torch.randn(tuple(nodes[region.input].meta["tensor_meta"].shape))
        if latency_table is None:
            rebirth = _time_module(module, x, repeats)
        else:
            rebirth = sum(table.node_cost(n) for n in capture(module, x).graph.nodes)
        out[region.id] = (sum(costs.get(name, 0.0) for name in region.nodes), rebirth)
    return sum(costs.values()), out, source


def runtime_ab(pairs: dict[str, tuple[nn.Module, nn.Module, torch.Tensor]], runtime: str, rounds: int,
               lowering: Any = None, whole: tuple[nn.Module, torch.Tensor] | None = None
               ) -> tuple[float | None, dict[str, tuple[float, float]], float]:
    """Per key of ``pairs`` (``(now, new, x)``), the median seconds of ``now(x)`` and ``new(x)`` under
    ``runtime``, the two timed in ``rounds`` interleaved A/B rounds, each after ``lowering`` where given;
    with the median seconds of ``whole`` (a model and its input) first, and the wall seconds spent."""
    import tempfile
    import time

    from fxrebirth.measure.speed import runtime_runner
    from fxrebirth.measure.timing import interleaved_medians

    start = time.perf_counter()

    def runner(module: nn.Module, x: torch.Tensor, folder: str, name: str):
        module, _ = lowering(module, runtime, x) if lowering is not None else (module, "")
        return runtime_runner(module, runtime, x, folder, name=name)

    out: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fxrebirth-plan-") as folder:
        total = None
        if whole is not None:
            total = interleaved_medians({"model": runner(*whole, folder, "model")}, rounds)["model"] / 1e3
        for i, (key, (now, new, x)) in enumerate(pairs.items()):
            runs = {"now": runner(now, x, folder, f"{i}-now"), "new": runner(new, x, folder, f"{i}-new")}
            ms = interleaved_medians(runs, rounds)
            out[key] = (ms["now"] / 1e3, ms["new"] / 1e3)
    return total, out, time.perf_counter() - start


def region_pairs(gm: fx.GraphModule, regions: list[Region]) -> dict[str, tuple[nn.Module, nn.Module, torch.Tensor]]:
    """Per region: the region cut out of the graph (one input, one output), a freshly initialised rebirth
    layer of its proposal, and a random input of the region's shape: what :func:`runtime_ab` times."""
    from fxrebirth.retraining.initialise import extract_region

    nodes = {n.name: n for n in gm.graph.nodes}
    pairs = {}
    for region in regions:
        x = torch.randn(tuple(nodes[region.input].meta["tensor_meta"].shape))
        pairs[region.id] = (extract_region(gm, region), build_rebirth(region.proposal).eval(), x)
    return pairs


def timed_pairs(pairs: dict[str, tuple[nn.Module, nn.Module, torch.Tensor]], whole: tuple[nn.Module, torch.Tensor],
                planner: str, runtime: str, rounds: int, lowering: Any, device_table: Any
                ) -> tuple[float, dict[str, tuple[float, float]], str]:
    """The whole model's seconds, ``(now, new)`` seconds per pair, and where they come from: timed here
    through ``runtime`` in ``rounds`` interleaved A/B rounds (:func:`runtime_ab`), or read from
    ``device_table``, a table measured on the device (:func:`fxrebirth.measure.bundle.read_table`)."""
    if device_table is not None:
        from fxrebirth.measure.bundle import read_table

        if runtime != "eager":
            raise ValueError(f"give device_table= or runtime={runtime!r}, not both: the table was measured on one "
                             "runtime")

        return read_table(device_table, planner, {k: tuple(x.shape) for k, (_, _, x) in pairs.items()},
                          tuple(whole[1].shape))
    total, out, spent = runtime_ab(pairs, runtime, rounds, lowering, whole)
    return total, out, f"measured here through {runtime}, median of {rounds} interleaved A/B rounds ({spent:.0f} s)"


def _through_runtime(gm: fx.GraphModule, inputs: tuple, regions: list[Region], runtime: str, repeats: int,
                     lowering: Any, device_table: Any = None) -> tuple[float, dict[str, tuple[float, float]], str]:
    """The whole model's latency and, per region, (its own latency, its rebirth layer's), in seconds,
    all under ``runtime``: each pair of :func:`region_pairs` timed in ``max(repeats, 5)`` interleaved
    rounds, so that a merge is judged by the runtime that will run it (its fusions included), or read
    from ``device_table``."""
    return timed_pairs(region_pairs(gm, regions), (gm, inputs[0]), "regions", runtime, max(repeats, 5), lowering,
                       device_table)


def kept_ids(ids: list[str], names: "list[str] | tuple[str, ...]") -> list[str]:
    """The region ids that ``names`` keep: equal to a name or starting with it. :class:`RegionError` for a name
    that matches none, naming the ids there are (a typo must not silently merge the region it meant)."""
    kept = []
    for name in names:
        matched = [i for i in ids if i == name or i.startswith(name)]
        if not matched:
            raise RegionError(f"keep {name!r}: no region has that id or prefix; regions: {', '.join(ids)}")
        kept += [i for i in matched if i not in kept]
    return kept


def _select(planned: list[PlannedRegion], latency_s: float, select: str, target_speedup: float | None,
            budget_s: float | None, keep: "list[str] | tuple[str, ...]" = ()) -> None:
    kept = set(kept_ids([r.region.id for r in planned], keep))
    candidates = sorted((r for r in planned if r.gain_s > 0 and r.region.id not in kept), key=lambda r: -r.gain_s)
    if target_speedup is None and budget_s is None:
        if select != "all":
            raise ValueError(f"select={select!r}: use 'all', or give target_speedup= or budget_s=")
        for r in candidates:
            r.selected = True
        return
    goal = budget_s if budget_s is not None else latency_s / target_speedup
    current = latency_s
    for r in candidates:
        if current <= goal:
            break
        r.selected = True
        current -= r.gain_s


def mark_regions(gm: fx.GraphModule, *, reduce_ratio: float | None = None, collapse_reduce: bool = False,
                 streamline_kernel: str = "field") -> list[Region]:
    """The streamline and inception regions of the captured ``gm``, their rebirth layers proposed with
    these options (what :func:`plan` and :func:`~fxrebirth.retraining.profiling.profile` both mark)."""
    from fxrebirth.passes import inception, streamline

    kwargs: dict[str, Any] = {"collapse_reduce": collapse_reduce}
    if reduce_ratio is not None and not 0 < reduce_ratio <= 1:
        raise ValueError(f"reduce_ratio={reduce_ratio}: give a fraction of the reduce layers' width in (0, 1]")
    if reduce_ratio is not None:
        kwargs["reduce_ratio"] = reduce_ratio
    return streamline.mark_streamline(gm, streamline_kernel) + inception.mark_inception(gm, **kwargs)


PLAN_RANGES = {"target_speedup": POSITIVE, "budget_s": NOT_NEGATIVE, "repeats": COUNT,
               "reduce_ratio": Range(0, 1, open_low=True)}
"""The numeric options of :func:`plan` and the values each accepts (the first three may be None)."""


def check_example(owner: str, inputs: tuple) -> None:
    """Raise :class:`RegionError` when the first example input is a tensor of batch 0: a plan times and
    shapes its regions on it, and an empty batch measures nothing."""
    first = inputs[0] if inputs else None
    if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == 0:
        raise RegionError(f"{owner}: the example input has batch 0 (shape {list(first.shape)}); give at least one "
                          "image, e.g. torch.randn(1, 3, H, W)")


def plan(
    model: nn.Module,
    example_inputs: Any,
    *,
    select: str = "all",
    target_speedup: float | None = None,
    budget_s: float | None = None,
    latency_table: dict[str, float] | None = None,
    reduce_ratio: float | None = None,
    collapse_reduce: bool = False,
    streamline_kernel: str = "field",
    keep: "list[str] | tuple[str, ...]" = (),
    repeats: int = 5,
    leaf_modules: tuple = (),
    runtime: str = "eager",
    lowering: Any = None,
    device_table: Any = None,
) -> Plan:
    """Mark, measure and plan (see the module docstring). ``latency_table`` (``node_signature`` ->
    seconds, measured on the target) replaces profiling here; rebirth layers missing from it are
    estimated by the roofline model. ``runtime`` (any of :data:`fxrebirth.measure.runners.RUNTIMES`) other
    than ``eager`` times every region A/B through that runtime instead (:func:`_through_runtime`);
    ``lowering`` (:data:`fxrebirth.measure.speed.Lowering`) rewrites what the runtime lacks first.
    ``device_table`` (a path or its JSON) reads the A/B timings from a table measured on the device from
    a bundle of :func:`fxrebirth.retraining.profiling.profile` instead of timing here.
    ``streamline_kernel`` is the streamline rebirth layers' kernel policy (``"field"``, ``"conv"`` or
    ``"pool"``, :mod:`fxrebirth.passes.streamline`). ``keep``: region ids or id prefixes never selected
    (:func:`kept_ids`); they are still measured and listed."""

    validate_numbers("plan", {"target_speedup": target_speedup, "budget_s": budget_s, "repeats": repeats,
                              "reduce_ratio": reduce_ratio}, PLAN_RANGES, optional=("target_speedup", "budget_s",
                                                                                    "reduce_ratio"))
    inputs = as_input_tuple(example_inputs)
    check_example("plan", inputs)
    gm = capture(model, inputs, leaf_modules=leaf_modules)
    regions = mark_regions(gm, reduce_ratio=reduce_ratio, collapse_reduce=collapse_reduce,
                           streamline_kernel=streamline_kernel)
    nodes = {n.name: n for n in gm.graph.nodes}
    if (runtime != "eager") + (latency_table is not None) + (device_table is not None) > 1:
        raise ValueError("give one of latency_table=, device_table= or runtime=: each was measured on one runtime")
    if runtime != "eager" or device_table is not None:
        latency, measured, source = _through_runtime(gm, inputs, regions, runtime, repeats, lowering, device_table)
    else:
        latency, measured, source = _here_or_from_table(gm, inputs, regions, latency_table, repeats)
    planned = []
    for region in regions:
        x = torch.randn(tuple(nodes[region.input].meta["tensor_meta"].shape))
        rebirth_gm = capture(build_rebirth(region.proposal), x)
        now, rebirth = measured[region.id]
        members = [nodes[name] for name in region.nodes]
        planned.append(PlannedRegion(
            region, now, rebirth, _depth(gm, region), region.proposal.depth,
            flops_now=sum(node_flops(n) for n in members), flops_rebirth=graph_flops(rebirth_gm),
            bytes_now=sum(node_bytes(n) for n in members),
            bytes_rebirth=sum(node_bytes(n) for n in rebirth_gm.graph.nodes if n.op == "call_function"),
        ))
    _select(planned, latency, select, target_speedup, budget_s, keep)
    shape = list(inputs[0].shape) if inputs and isinstance(inputs[0], torch.Tensor) else []
    return Plan(type(model).__name__, shape, latency, source, planned)
