"""Non-linear regions: where they live in the graph, and what makes a set of them valid.

A region is a connected piece of the canonical graph that no exact rule can merge (it contains LRN or
max-pooling, or parallel branches joined by a concatenation) and that a retrained "rebirth" layer can
replace. Marking passes (``fxrebirth.passes.streamline``, ``fxrebirth.passes.inception``) find them and
record, without changing the graph:

* ``node.meta[REGION_KEY]``: the id of the region a node belongs to;
* ``graph_module.meta[REGIONS_KEY]``: ``{id: Region}``.

A valid region has one input and one output and is convex (no path leaves it and comes back); valid
regions never overlap. :func:`check_regions` proves this with networkx and raises :class:`RegionError`
naming the region and the node at fault.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import networkx as nx
import torch.fx as fx

from fxrebirth.errors import FxRebirthError

__all__ = ["Region", "RegionError", "REGION_KEY", "REGIONS_KEY", "check_regions", "regions_of", "record",
           "to_networkx"]

REGION_KEY = "fxrebirth.region"
REGIONS_KEY = "fxrebirth.graph.regions"


class RegionError(FxRebirthError):
    """A region or a plan is not valid (overlap, several outputs, not convex, shapes that do not fit)."""


@dataclass
class Region:
    """A region: its nodes (fx names), its single input and output, the original layers it replaces (module
    names, in graph order), and the proposed rebirth layer (plain data, JSON-able)."""

    id: str
    kind: str
    nodes: tuple[str, ...]
    input: str
    output: str
    replaces: tuple[str, ...]
    proposal: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Region":
        data = dict(data)
        for key in ("nodes", "replaces"):
            data[key] = tuple(data[key])
        return cls(**data)


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The data-flow graph of ``graph`` (edges from each value to its users), get_attr nodes left out."""
    g = nx.DiGraph()
    for node in graph.nodes:
        if node.op == "get_attr":
            continue
        g.add_node(node.name)
        for arg in node.all_input_nodes:
            if arg.op != "get_attr":
                g.add_edge(arg.name, node.name)
    return g


def _check_one(g: nx.DiGraph, region: Region) -> None:
    members = set(region.nodes)
    missing = [n for n in members | {region.input} if n not in g]
    if missing:
        raise RegionError(f"region {region.id!r}: node(s) {missing} are not in the graph")
    if region.input in members or region.output not in members:
        raise RegionError(f"region {region.id!r}: its input must be outside it and its output inside it")
    entries = {u for n in members for u in g.predecessors(n) if u not in members}
    if entries != {region.input}:
        raise RegionError(f"region {region.id!r} reads {sorted(entries)}; a region has exactly one input")
    leaks = sorted(n for n in members if n != region.output and any(u not in members for u in g.successors(n)))
    if leaks:
        raise RegionError(
            f"region {region.id!r}: the value of {leaks[0]!r} is used outside the region; a region has one output"
        )
    reached_outside = set().union(*(nx.descendants(g, n) for n in members)) - members
    if any(members & nx.descendants(g, n) for n in reached_outside):
        raise RegionError(f"region {region.id!r} is not convex: a path leaves it and comes back")


def check_regions(graph: fx.Graph, regions: Iterable[Region]) -> None:
    """Raise :class:`RegionError` unless every region is valid and no two share a node."""
    g = to_networkx(graph)
    owner: dict[str, str] = {}
    for region in regions:
        _check_one(g, region)
        for name in region.nodes:
            if name in owner:
                raise RegionError(f"regions {owner[name]!r} and {region.id!r} overlap at node {name!r}")
            owner[name] = region.id


def record(gm: fx.GraphModule, regions: Iterable[Region]) -> list[Region]:
    """Check ``regions`` together with those already recorded on ``gm``, then record them."""
    known = dict(gm.meta.get(REGIONS_KEY, {}))
    new = list(regions)
    check_regions(gm.graph, list(known.values()) + new)
    by_name = {n.name: n for n in gm.graph.nodes}
    for region in new:
        known[region.id] = region
        for name in region.nodes:
            by_name[name].meta[REGION_KEY] = region.id
    gm.meta[REGIONS_KEY] = known
    return new


def regions_of(gm: fx.GraphModule) -> list[Region]:
    """The regions recorded on ``gm``, in the order they were marked."""
    return list(gm.meta.get(REGIONS_KEY, {}).values())
