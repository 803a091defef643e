"""Initialising rebirth layers, and the graph plumbing it needs (a region as its own module, probes).

``Initialiser(gm, regions, method, ridge)`` initialises rebirth layers from the original captured graph
``gm``: ``lstsq`` (ridge regression on calibration data, streamed as float64 Gram matrices), ``xavier``,
``original`` (the original weights re-laid), or ``auto`` (original for streamline regions, least squares
for branch regions). The identities and choices are in :mod:`fxrebirth.retraining.engine` and docs/retraining.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from fxrebirth.graph.ops import kind_of
from fxrebirth.retraining.layers import InceptionRebirth
from fxrebirth.graph.regions import Region, RegionError
from fxrebirth.retraining.train import Meter, batches, world

__all__ = ["Initialiser", "extract_region", "probe_nodes", "xavier_init"]


def extract_region(gm: fx.GraphModule, region: Region) -> fx.GraphModule:
    """The region's nodes as a GraphModule of one input (the region's input) and one output (sharing
    ``gm``'s parameters)."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {region.input: graph.placeholder("x")}
    members = set(region.nodes)
    for node in gm.graph.nodes:
        if node.name not in members:
            continue
        for arg in node.all_input_nodes:
            if arg.name not in env:
                if arg.op != "get_attr":
                    raise RegionError(f"region {region.id!r}: node {node.name!r} reads {arg.name!r} from outside")
                env[arg.name] = graph.node_copy(arg)
        env[node.name] = graph.node_copy(node, lambda a: env[a.name])
    graph.output(env[region.output])
    return fx.GraphModule(gm, graph)


def probe_nodes(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its parameters) that returns the values of the nodes ``names``."""
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(nodes[n] for n in names),)
    probe = fx.GraphModule(gm, graph)
    probe.graph.eliminate_dead_code()
    probe.recompile()
    return probe


class _Ridge:
    """Streams ``A^T A`` and ``A^T Y`` (float64) for ``min ||[A 1] W - Y||^2 + lam ||W||^2``."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.rows = 0

    def add(self, a: torch.Tensor, y: torch.Tensor) -> None:
        a = torch.cat([a.double(), torch.ones(a.shape[0], 1, dtype=torch.float64)], 1)
        y = y.double()
        gram, cross = a.T @ a, a.T @ y
        self.gram = gram if self.gram is None else self.gram + gram
        self.cross = cross if self.cross is None else self.cross + cross
        self.rows += a.shape[0]

    def all_reduce(self) -> None:
        if world()[1] > 1 and self.gram is not None:
            dist.all_reduce(self.gram)
            dist.all_reduce(self.cross)

    def solve(self, ridge: float, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W [outputs, inputs], b [outputs])``, optionally using only input ``columns``."""
        gram, cross = self.gram, self.cross
        d = gram.shape[0] - 1
        keep = torch.cat([columns, torch.tensor([d])]) if columns is not None else torch.arange(d + 1)
        gram, cross = gram[keep][:, keep], cross[keep]
        scale = gram.diagonal()[:-1].mean().clamp(min=1e-12)
        reg = torch.full((gram.shape[0],), ridge * float(scale), dtype=torch.float64)
        reg[-1] = 0.0  # the bias is not penalised
        solution = torch.linalg.solve(gram + torch.diag(reg), cross)
        return solution[:-1].T, solution[-1]


def _patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``unfold`` rows for ``conv``: ``[N * L, C * kh * kw]`` (the layout of ``conv.weight.flatten(1)``)."""
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _rows(y: torch.Tensor) -> torch.Tensor:
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def xavier_init(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases for every convolution (DeepRebirth's initialisation)."""
    for conv in _convs(module):
        nn.init.xavier_uniform_(conv.weight)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)


@dataclass
class _Branch:
    """An inception branch of the original graph: its conv nodes and the node after each conv's ReLU."""

    convs: list[fx.Node]
    activations: list[fx.Node]


def _inception_branches(gm: fx.GraphModule, region: Region) -> tuple[list[_Branch], _Branch]:
    """The region's non-pool branches (in the proposal's order) and its pool-projection branch."""
    from fxrebirth.passes.inception import branch_chain

    nodes = {n.name: n for n in gm.graph.nodes}
    cat = nodes[region.output]
    branches, pool = [], None
    for t in cat.kwargs["tensors"]:
        _, chain = branch_chain(t)
        convs = [n for n in chain if kind_of(n) == "conv"]
        acts = []
        for conv in convs:
            after = conv
            while len(after.users) == 1 and kind_of(next(iter(after.users))) == "relu":
                after = next(iter(after.users))
            acts.append(after)
        branch = _Branch(convs, acts)
        if kind_of(chain[0]) in ("max_pool", "avg_pool"):
            pool = branch
        else:
            branches.append(branch)
    return branches, pool


class Initialiser:
    """Initialises the rebirth layers of some regions; ``lstsq`` collects statistics from calibration data."""

    def __init__(self, gm: fx.GraphModule, regions: list[Region], method: str, ridge: float) -> None:
        self.gm, self.regions, self.init, self.ridge = gm, regions, method, ridge
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.branches = {r.id: _inception_branches(gm, r) for r in regions if r.kind == "branch"}
        self.stats: dict[tuple[str, int], _Ridge] = {}
        self.energy: dict[tuple[str, int], torch.Tensor] = {}

    def _param(self, node: fx.Node, name: str) -> torch.Tensor:
        value = node.kwargs[name]
        return self.gm.get_parameter(value.target).detach() if value is not None else None

    def method(self, region: Region) -> str:
        """The initialisation of ``region``: ``auto`` is ``original`` for streamline regions and ``lstsq``
        for branch regions (measured best on the default GoogLeNet, see docs/results.md)."""
        if self.init != "auto":
            return self.init
        return "lstsq" if region.kind == "branch" else "original"

    # which node values the lstsq statistics need, per region
    def probes(self, region: Region) -> list[str]:
        if region.kind != "branch":
            return [region.input, region.output]
        branches, pool = self.branches[region.id]
        names = [region.input]
        for b in branches:
            if len(b.convs) >= 2:
                names += [b.activations[0].name, b.convs[-1].name]
        names.append(pool.convs[-1].name)
        return names

    def calibrate(self, region: Region, rebirth: nn.Module, data: Any, images: int, batch_size: int, seed: int,
                  meter: Meter, student_input: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
        """Accumulate the ridge statistics of one region over ``images`` calibration images; return how many
        were used. Targets are the original model's values; the layer's inputs too, or with
        ``student_input`` the region's input in the student (so the fit also corrects the error of the
        regions merged before it) pushed through the original region's own layers."""
        if self.method(region) != "lstsq" or images == 0:
            return 0
        names = self.probes(region)
        probe = probe_nodes(self.gm, names).eval()
        inner = probe_nodes(extract_region(self.gm, region), ["x"] + names[1:]).eval() if student_input else None
        used = 0
        with torch.no_grad():
            for x, _ in batches(data, batch_size, seed=seed, images=images):
                targets = dict(zip(names, probe(x)))
                sources = targets
                if inner is not None:
                    sources = dict(zip(names, inner(student_input(x))))
                self._accumulate(region, rebirth, sources, targets)
                used += len(x) * world()[1]
                meter.update(len(x) * world()[1])
        for key, ridge in self.stats.items():
            if key[0] == region.id:
                ridge.all_reduce()
        if world()[1] > 1:
            for key, energy in self.energy.items():
                if key[0] == region.id:
                    dist.all_reduce(energy)
        return used

    def _accumulate(self, region: Region, rebirth: nn.Module, values: dict[str, torch.Tensor],
                    targets: dict[str, torch.Tensor]) -> None:
        if region.kind != "branch":
            conv = _convs(rebirth)[0]
            self.stats.setdefault((region.id, 0), _Ridge()).add(_patches(values[region.input], conv),
                                                                _rows(targets[region.output]))
            return
        branches, pool = self.branches[region.id]
        for i, (branch, seq) in enumerate(zip(branches, rebirth.branches)):
            if len(branch.convs) < 2:
                continue
            reduced = values[branch.activations[0].name]
            last = _convs(seq)[-1]
            target = targets[branch.convs[-1].name]
            extra = last.out_channels - target.shape[1]
            if extra:
                projection = targets[pool.convs[-1].name]
                after = self._absorbed_after(region, i)
                target = torch.cat([target, projection] if after else [projection, target], 1)
            full = nn.Conv2d(reduced.shape[1], 1, last.kernel_size, last.stride, last.padding)
            self.stats.setdefault((region.id, i), _Ridge()).add(_patches(reduced, full), _rows(target))
            energy = reduced.double().pow(2).sum((0, 2, 3))
            key = (region.id, i)
            self.energy[key] = self.energy.get(key, 0) + energy

    @staticmethod
    def _absorbed_after(region: Region, index: int) -> bool:
        return region.proposal["branches"][index].get("absorbed_position", "after") == "after"

    @torch.no_grad()
    def apply(self, region: Region, rebirth: nn.Module) -> dict[str, Any]:
        """Initialise ``rebirth``; return facts for the report (e.g. the fit's relative error)."""
        if self.method(region) == "xavier":
            xavier_init(rebirth)
            return {}
        if region.kind != "branch":
            return self._streamline(region, rebirth)
        return self._inception(region, rebirth)

    def _streamline(self, region: Region, rebirth: nn.Module) -> dict[str, Any]:
        conv = _convs(rebirth)[0]
        if self.method(region) == "lstsq" and (region.id, 0) in self.stats:
            weight, bias = self.stats[(region.id, 0)].solve(self.ridge)
            conv.weight.copy_(weight.reshape(conv.weight.shape))
            conv.bias.copy_(bias)
            return {"fit": "ridge", "rows": self.stats[(region.id, 0)].rows}
        first = self.nodes[region.nodes[0]]
        w, b = self._param(first, "weight"), self._param(first, "bias")
        pool = next((self.nodes[n] for n in region.nodes if kind_of(self.nodes[n]) in ("max_pool", "avg_pool")), None)
        conv.weight.zero_()
        offsets = []
        for d in range(2):
            s_c, p_c = first.kwargs["stride"][d], first.kwargs["padding"][d]
            centre = (-pool.kwargs["padding"][d] + (pool.kwargs["kernel_size"][d] - 1) // 2) * s_c if pool else 0
            offset = centre - p_c + conv.padding[d]
            offsets.append(min(max(offset, 0), conv.kernel_size[d] - w.shape[2 + d]))
        conv.weight[:, :, offsets[0]:offsets[0] + w.shape[2], offsets[1]:offsets[1] + w.shape[3]] = w
        conv.bias.copy_(b if b is not None else torch.zeros_like(conv.bias))
        return {"fit": "original", "offset": offsets}

    def _inception(self, region: Region, rebirth: InceptionRebirth) -> dict[str, Any]:
        branches, pool = self.branches[region.id]
        kept_report = []
        for i, (branch, seq) in enumerate(zip(branches, rebirth.branches)):
            convs = _convs(seq)
            weights = [self._param(n, "weight") for n in branch.convs]
            biases = [self._param(n, "bias") for n in branch.convs]
            if len(convs) == 1:  # the same layer, widened when it absorbs the pool branch
                self._copy_out(convs[0], weights[0], biases[0], region, i, pool)
                continue
            reduce, last = convs[0], convs[-1]
            r = reduce.out_channels
            key = (region.id, i)
            if self.method(region) == "lstsq" and key in self.stats:
                score = self.energy[key] * weights[-1].double().pow(2).sum((0, 2, 3))
                kept = score.argsort(descending=True)[:r].sort().values
            else:
                kept = torch.arange(r)
            reduce.weight.copy_(weights[0][kept])
            reduce.bias.copy_(biases[0][kept])
            kept_report.append(kept.tolist())
            if self.method(region) == "lstsq" and key in self.stats:
                area = last.kernel_size[0] * last.kernel_size[1]
                columns = (kept[:, None] * area + torch.arange(area)[None]).reshape(-1)
                weight, bias = self.stats[key].solve(self.ridge, columns)
                last.weight.copy_(weight.reshape(last.weight.shape))
                last.bias.copy_(bias)
            else:
                self._copy_out(last, weights[-1][:, kept], biases[-1], region, i, pool)
        return {"fit": self.method(region), "kept_reduce_channels": kept_report}

    def _copy_out(self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor, region: Region, index: int,
                  pool: _Branch) -> None:
        """Copy an original layer into ``conv``; extra output channels (the absorbed pool branch) Glorot."""
        extra = conv.out_channels - weight.shape[0]
        if weight.shape[1:] != conv.weight.shape[1:]:
            raise RegionError(f"region {region.id!r}: branch {index + 1}'s layer does not fit its original")
        if extra == 0:
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
            return
        fresh = torch.empty(extra, *weight.shape[1:])
        nn.init.xavier_uniform_(fresh)
        after = self._absorbed_after(region, index)
        conv.weight.copy_(torch.cat([weight, fresh] if after else [fresh, weight]))
        zeros = torch.zeros(extra)
        conv.bias.copy_(torch.cat([bias, zeros] if after else [zeros, bias]))
