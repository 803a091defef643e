"""What a plan's candidates cost on the runtime that will run the model: each candidate's layers and its
replacing layer timed A/B in interleaved rounds, or read from a table measured on a device or per node.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxrebirth.graph.capture import capture
from fxrebirth.graph.regions import Region
from fxrebirth.measure.runtimes import DEFAULT_RUNTIME, get_runtime
from fxrebirth.rewrite.cost import TableCost

__all__ = ["candidate_pairs", "runtime_ab", "time_candidates"]

Pairs = dict[str, tuple[nn.Module, nn.Module, torch.Tensor]]


def candidate_pairs(gm: fx.GraphModule, regions: list[Region]) -> Pairs:
    """Per region: its layers cut out of ``gm`` (one input, one output), its strategy's freshly initialised
    replacing layer, and a random input of the region's shape: what :func:`runtime_ab` times."""
    from fxrebirth.retraining.strategy import strategy_of

    nodes = {n.name: n for n in gm.graph.nodes}
    pairs = {}
    for region in regions:
        strategy = strategy_of(region)
        x = torch.randn(tuple(nodes[region.input].meta["tensor_meta"].shape))
        pairs[region.id] = (strategy.cut(gm, region), strategy.layer(region).eval(), x)
    return pairs


def runtime_ab(pairs: Pairs, runtime: str, rounds: int, whole: tuple[nn.Module, torch.Tensor] | None = None
               ) -> tuple[float | None, dict[str, tuple[float, float]], float]:
    """Per key of ``pairs`` (``(now, new, x)``), the median seconds of ``now(x)`` and ``new(x)`` under
    ``runtime`` (lowered first as its record says), the two timed in ``rounds`` interleaved A/B rounds; with
    the median seconds of ``whole`` (a model and its input) first, and the wall seconds spent."""
    from fxrebirth.measure.speed import runtime_runner
    from fxrebirth.measure.timing import interleaved_medians

    record = get_runtime(runtime)
    start = time.perf_counter()

    def runner(module: nn.Module, x: torch.Tensor, folder: str, name: str):
        module, _ = record.lower(module, x)
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


def _from_latency_table(gm: fx.GraphModule, regions: list[Region], pairs: Pairs,
                        latency_table: dict) -> tuple[float, dict[str, tuple[float, float]], str]:
    """Costs summed from per-node latencies (``node_signature`` -> seconds) measured on the target; entries
    the table lacks are estimated by the roofline model."""
    table = TableCost(latency_table)
    costs = {n.name: table.node_cost(n) for n in gm.graph.nodes}
    out = {}
    for region in regions:
        _, new, x = pairs[region.id]
        out[region.id] = (sum(costs.get(n, 0.0) for n in region.nodes),
                          sum(table.node_cost(n) for n in capture(new, x).graph.nodes))
    return sum(costs.values()), out, "latency table"


def time_candidates(gm: fx.GraphModule, inputs: tuple, regions: list[Region], *, runtime: str | None, rounds: int,
                    latency_table: dict | None = None, device_table: Any = None, planner: str = "regions"
                    ) -> tuple[float, dict[str, tuple[float, float]], str]:
    """The whole model's seconds, ``(now, new)`` seconds per region, and where they come from: timed here
    through ``runtime`` (default eager) in ``rounds`` interleaved A/B rounds, or read from ``device_table``
    (:func:`fxrebirth.measure.bundle.read_table`; ``planner`` names the bundle's kind) or ``latency_table``."""
    from fxrebirth.rewrite.validate import OptionError

    if (runtime not in (None, DEFAULT_RUNTIME)) + (latency_table is not None) + (device_table is not None) > 1:
        raise OptionError("give one of latency_table=, device_table= or runtime=: each was measured on one runtime")
    pairs = candidate_pairs(gm, regions)
    if latency_table is not None:
        return _from_latency_table(gm, regions, pairs, latency_table)
    if device_table is not None:
        from fxrebirth.measure.bundle import read_table

        return read_table(device_table, planner, {k: tuple(x.shape) for k, (_, _, x) in pairs.items()},
                          tuple(inputs[0].shape))
    runtime = runtime or DEFAULT_RUNTIME
    total, out, spent = runtime_ab(pairs, runtime, rounds, (gm, inputs[0]))
    return total, out, f"measured here through {runtime}, median of {rounds} interleaved A/B rounds ({spent:.0f} s)"
