"""Non-linear regions: where they live in the graph, and what makes a set of them valid.

A region is a connected piece of the canonical graph that no exact rule can merge (it contains LRN or
max-pooling, or parallel branches joined by a concatenation) and that a retrained "rebirth" layer can
replace. Marking passes (``fxrebirth.passes.streamline``, ``fxrebirth.passes.inception``) find them and
record, without changing the graph:

* ``node.meta[REGION_KEY]``: the id of the region a node belongs to;
* ``graph_module.meta[REGIONS_KEY]``: ``{id: Region}``.

Each region carries a typed :class:`Proposal`, the rebirth layer proposed for it: :class:`ConvProposal`
(one convolution, for streamline regions) or :class:`InceptionProposal` (parallel convolution branches, for
branch regions). The proposal types are an open union: a subclass that names its JSON ``type`` registers
itself, so a new kind of region adds its proposal type (and, in :mod:`fxrebirth.retraining`, its builder and
its initialiser) without touching the others. A proposal also names the original nodes its initialiser
reads, so that nothing re-derives them from the marking pass.

A valid region has one input and one output and is convex (no path leaves it and comes back); valid
regions never overlap. :func:`check_regions` proves this with networkx and raises :class:`RegionError`
naming the region and the node at fault.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Iterable

import networkx as nx
import torch.fx as fx

from fxrebirth.errors import FxRebirthError

__all__ = ["Region", "RegionError", "REGION_KEY", "REGIONS_KEY", "check_regions", "regions_of", "record",
           "to_networkx", "extract", "Proposal", "ConvProposal", "PoolStage", "InceptionProposal", "InceptionBranch",
           "BranchLayer", "DepthProposal"]

REGION_KEY = "fxrebirth.region"
REGIONS_KEY = "fxrebirth.graph.regions"


class RegionError(FxRebirthError):
    """A region or a plan is not valid (overlap, several outputs, not convex, shapes that do not fit)."""


class Proposal:
    """The rebirth layer proposed for a region: plain data, JSON-able by :meth:`to_dict`.

    A subclass is a dataclass with a class attribute ``type`` (its JSON tag); defining it registers it with
    :meth:`from_dict`. It states :attr:`depth` (weighted layers on the rebirth layer's longest path),
    :meth:`summary` (what the plan table prints) and :meth:`check` (that it fits its region).
    """

    type: ClassVar[str] = ""
    _types: ClassVar[dict[str, type["Proposal"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.type:
            Proposal._types[cls.type] = cls

    @property
    def depth(self) -> int:
        raise NotImplementedError

    def summary(self, region: "Region") -> str:
        """What the region's replacement does, in one line."""
        return ", ".join(region.replaces)

    def check(self, region: "Region") -> None:
        """Raise :class:`RegionError` unless the proposal fits ``region`` (the nodes it names are members)."""

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}

    @classmethod
    def _from_data(cls, data: dict[str, Any], region_nodes: tuple[str, ...]) -> "Proposal":
        return cls(**data)

    @staticmethod
    def from_dict(data: dict[str, Any], region_nodes: Iterable[str] = ()) -> "Proposal":
        """The proposal ``data`` describes (``region_nodes``: its region's nodes, for plans saved by
        fxrebirth 0.2, whose proposals did not name them)."""
        data = dict(data)
        kind = data.pop("type", None)
        cls = Proposal._types.get(kind)
        if cls is None:
            raise RegionError(f"unknown proposal type {kind!r}; known: {sorted(Proposal._types)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RegionError(f"{kind} proposal: unknown field(s) {unknown}; fields: {sorted(known)}")
        return cls._from_data(data, tuple(region_nodes))


@dataclass
class PoolStage:
    """A max-pooling that a streamline rebirth layer keeps after its convolution (the ``"pool"`` policy of
    :mod:`fxrebirth.passes.streamline`), with the region's own window."""

    kernel_size: list[int]
    stride: list[int]
    padding: list[int]
    ceil_mode: bool


@dataclass
class ConvProposal(Proposal):
    """One convolution (+ ReLU when the region had one) for a streamline region, followed by ``pool`` where
    the proposal keeps the region's pooling (then only its normalisation is removed); ``valid_from``/``valid_to``
    per spatial dimension: the input sizes for which its output size equals the region's (``None``: every
    larger size)."""

    type: ClassVar[str] = "conv"
    in_channels: int
    out_channels: int
    kernel_size: list[int]
    stride: list[int]
    padding: list[int]
    relu: bool
    valid_from: list[int] | None = None
    valid_to: list[int | None] | None = None
    pool: PoolStage | None = None

    @property
    def depth(self) -> int:
        return 1

    def summary(self, region: "Region") -> str:
        kept = f"; keeps the {'x'.join(map(str, self.pool.kernel_size))} max-pool" if self.pool else ""
        return ", ".join(region.replaces) + kept

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if self.pool is None:
            data.pop("pool")  # a plan without it reads as older versions wrote it
        return data

    @classmethod
    def _from_data(cls, data: dict[str, Any], region_nodes: tuple[str, ...]) -> "Proposal":
        pool = data.get("pool")
        return cls(**{**data, "pool": PoolStage(**pool) if pool is not None else None})


@dataclass
class BranchLayer:
    """One convolution of an inception branch (+ ReLU)."""

    out_channels: int
    kernel_size: list[int]
    stride: list[int]
    padding: list[int]
    relu: bool


@dataclass
class InceptionBranch:
    """A branch of the rebirth layer: the original branch it keeps (``nodes``, the fx names from the
    region's input to the concatenation; ``source``, their module names), its layers, and, for the branch
    that absorbs the pool projection, the absorbed branch's module names and where its channels sit in the
    widened output (``"after"`` or ``"before"`` the branch's own)."""

    source: list[str]
    layers: list[BranchLayer]
    absorbs: list[str] = field(default_factory=list)
    absorbed_position: str | None = None
    nodes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers = [layer if isinstance(layer, BranchLayer) else BranchLayer(**layer) for layer in self.layers]


@dataclass
class InceptionProposal(Proposal):
    """Parallel convolution branches on the region's input, concatenated: the original module's branches
    without its pool projection (``pool``: the fx names of that removed branch), one of them widened to
    absorb the projection's channels, the reduce layers thinned to ``reduce_ratio``."""

    type: ClassVar[str] = "inception"
    in_channels: int
    out_channels: int
    branches: list[InceptionBranch]
    reduce_ratio: float
    collapse_reduce: bool = False
    pool: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.branches = [b if isinstance(b, InceptionBranch) else InceptionBranch(**b) for b in self.branches]

    @property
    def depth(self) -> int:
        return max(len(b.layers) for b in self.branches)

    def summary(self, region: "Region") -> str:
        into = next((i for i, b in enumerate(self.branches) if b.absorbs), None)
        text = f"{len(region.replaces)} layers"
        if into is not None:
            text += f"; pool branch absorbed into branch {into + 1}"
        return text + f", reduce layers x{self.reduce_ratio}"

    def check(self, region: "Region") -> None:
        members = set(region.nodes)
        named = [n for b in self.branches for n in b.nodes] + list(self.pool)
        if not all(b.nodes for b in self.branches) or not self.pool or not set(named) <= members:
            raise RegionError(f"region {region.id!r}: its proposal's branches must name nodes of the region")

    @classmethod
    def _from_data(cls, data: dict[str, Any], region_nodes: tuple[str, ...]) -> "Proposal":
        proposal = cls(**data)
        if region_nodes and not proposal.pool:
            proposal._name_nodes(list(region_nodes))
        return proposal

    def _name_nodes(self, region_nodes: list[str]) -> None:
        """Split a 0.2 region's nodes (the branches' chains in concatenation order, then the concatenation)
        into the branches: a kept branch has one node per ``source`` entry, the pool branch one per
        ``absorbs`` entry, next to the absorbing branch on the side ``absorbed_position`` says."""
        sizes: list[tuple[int, int | None]] = []
        for i, branch in enumerate(self.branches):
            if branch.absorbs and branch.absorbed_position == "before":
                sizes.append((len(branch.absorbs), None))
            sizes.append((len(branch.source), i))
            if branch.absorbs and branch.absorbed_position != "before":
                sizes.append((len(branch.absorbs), None))
        if sum(n for n, _ in sizes) + 1 != len(region_nodes):
            raise RegionError("an inception proposal from fxrebirth 0.2 does not fit its region's nodes")
        start = 0
        for size, index in sizes:
            chain = region_nodes[start:start + size]
            if index is None:
                self.pool = chain
            else:
                self.branches[index].nodes = chain
            start += size


@dataclass
class DepthProposal(Proposal):
    """One convolution for a depth segment (:mod:`fxrebirth.passes.depth`): the merged layer's channels, kernel,
    stride, padding (the segment's moved padding) and groups, once the segment's ``activations`` are the
    identity, its ``pruned`` convolutions the identity and its ``dropped`` addition operands zero."""

    type: ClassVar[str] = "depth"
    in_channels: int
    out_channels: int
    kernel_size: list[int]
    stride: list[int]
    padding: list[int]
    groups: int
    activations: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return 1

    def summary(self, region: "Region") -> str:
        kernel = "x".join(map(str, self.kernel_size))
        text = f"one {kernel} conv{f' (groups {self.groups})' if self.groups > 1 else ''}, " \
               f"{len(self.activations)} activation(s) removed"
        cuts = [f"-{n}" for n in self.pruned + self.dropped]
        return text + (f", {' '.join(cuts)}" if cuts else "")

    def check(self, region: "Region") -> None:
        members = set(region.nodes)
        if not set(self.activations + self.pruned) <= members or not set(self.dropped) <= members | {region.input}:
            raise RegionError(f"region {region.id!r}: its proposal names nodes outside the region")


@dataclass
class Region:
    """A region: its nodes (fx names), its single input and output, the original layers it replaces (module
    names, in graph order), and the proposed rebirth layer (None: a region nothing can rebuild yet)."""

    id: str
    kind: str
    nodes: tuple[str, ...]
    input: str
    output: str
    replaces: tuple[str, ...]
    proposal: Proposal | None = None

    def __post_init__(self) -> None:
        if isinstance(self.proposal, dict):  # a plan's JSON ({}: no proposal, as fxrebirth 0.2 wrote it)
            self.proposal = Proposal.from_dict(self.proposal, self.nodes) if self.proposal else None

    def summary(self) -> str:
        """What replacing the region does, in one line (the plan table's "replaces" column)."""
        return self.proposal.summary(self) if self.proposal is not None else ", ".join(self.replaces)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["proposal"] = self.proposal.to_dict() if self.proposal is not None else {}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Region":
        data = dict(data)
        for key in ("nodes", "replaces"):
            data[key] = tuple(data[key])
        return cls(**data)


def extract(gm: fx.GraphModule, input: str, nodes: Iterable[str], output: str, label: str) -> fx.GraphModule:
    """The nodes named ``nodes`` (graph order) as a GraphModule of one input (the value ``input``) and one
    output (``output``), sharing ``gm``'s parameters. Raises :class:`RegionError` naming ``label`` if one
    of them reads a computed value from outside."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {input: graph.placeholder("x")}
    members = set(nodes)
    for node in gm.graph.nodes:
        if node.name not in members:
            continue
        for arg in node.all_input_nodes:
            if arg.name not in env:
                if arg.op != "get_attr":
                    raise RegionError(f"{label}: node {node.name!r} reads {arg.name!r} from outside")
                env[arg.name] = graph.node_copy(arg)
        env[node.name] = graph.node_copy(node, lambda a: env[a.name])
    graph.output(env[output])
    return fx.GraphModule(gm, graph)


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
    if region.proposal is not None:
        region.proposal.check(region)


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
