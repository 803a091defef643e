"""Initialising rebirth layers, and the graph plumbing it needs (a region as its own module, probes).

``Initialiser(gm, regions, method, ridge)`` initialises rebirth layers from the original captured graph
``gm``: ``lstsq`` (ridge regression on calibration data, streamed as float64 Gram matrices), ``xavier``,
``original`` (the original weights re-laid, the BatchNorm that reads a convolution folded in), or ``auto``
(:meth:`Initialiser.candidates`, measured by :mod:`fxrebirth.retraining.startpoint`). The identities and choices
are in :mod:`fxrebirth.retraining.engine` and docs/retraining.md.
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

from fxrebirth.graph.mutation import eliminate_dead_code, mutated_input, tainted
from fxrebirth.graph.ops import kind_of
from fxrebirth.graph.surgery import device_of, fetch_attr
from fxrebirth.passes.inception import is_branch_activation
from fxrebirth.retraining.layers import InceptionRebirth
from fxrebirth.graph.regions import ConvProposal, InceptionProposal, Proposal, Region, RegionError, extract
from fxrebirth.retraining.train import Meter, batches, world

__all__ = ["Initialiser", "FITS", "extract_region", "probe_nodes", "xavier_init"]


def extract_region(gm: fx.GraphModule, region: Region) -> fx.GraphModule:
    """The region's nodes as a GraphModule of one input (the region's input) and one output (sharing
    ``gm``'s parameters)."""
    return extract(gm, region.input, region.nodes, region.output, f"region {region.id!r}")


def probe_nodes(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its parameters) that returns the values of the nodes ``names``, as the
    graph reads them: in-place statements are kept (mutation-aware dead-code elimination), and a value
    written in place somewhere is returned as a copy taken just before its first reader
    (:func:`_as_read`), so a write after that read does not leak into it."""
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    output = next(n for n in graph.nodes if n.op == "output")
    written = tainted(graph)
    output.args = (tuple(_as_read(graph, nodes[n], written) if nodes[n] in written else nodes[n] for n in names),)
    probe = fx.GraphModule(gm, graph)
    eliminate_dead_code(probe.graph)
    probe.recompile()
    return probe


def _as_read(graph: fx.Graph, node: fx.Node, written: frozenset[fx.Node]) -> fx.Node:
    """A copy of ``node`` taken just before its first reader: the first user that neither writes to it nor
    may alias it (a view's writes reach it), or a module call (it computes from it); ``node`` itself when
    it has none."""
    reader = next((u for u in sorted(node.users) if mutated_input(u) is None and
                   (u not in written or u.op == "call_module")), None)
    if reader is None:
        return node
    with graph.inserting_before(reader):
        taken = graph.call_function(torch.clone, (node,))
    taken.meta.update({k: v for k, v in node.meta.items() if k == "tensor_meta"})
    return taken


class _Ridge:
    """Streams ``A^T A`` and ``A^T Y`` (float64) for ``min ||[A 1] W - Y||^2 + lam ||W||^2``."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.rows = 0

    def add(self, a: torch.Tensor, y: torch.Tensor) -> None:
        a = torch.cat([a.double(), torch.ones(a.shape[0], 1, dtype=torch.float64, device=a.device)], 1)
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
        """``(W [outputs, inputs], b [outputs])`` (on the CPU), optionally using only input ``columns``."""
        gram, cross = self.gram.cpu(), self.cross.cpu()
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
    """An inception branch of the original graph: its conv nodes, each conv's value as the branch uses it
    (after the BatchNorm that reads it, if any) and the node after each conv's activation."""

    convs: list[fx.Node]
    outputs: list[fx.Node]
    activations: list[fx.Node]

    @classmethod
    def of(cls, nodes: dict[str, fx.Node], chain: list[str]) -> "_Branch":
        """The branch whose nodes (in order, from the region's input to the concatenation) are ``chain``."""
        members = [nodes[name] for name in chain]
        convs, outs, acts = [], [], []
        for i, node in enumerate(members):
            if kind_of(node) != "conv":
                continue
            after = i + 1 if i + 1 < len(members) and kind_of(members[i + 1]) == "batch_norm" else i
            outs.append(members[after])
            while after + 1 < len(members) and is_branch_activation(members[after + 1]):
                after += 1
            convs.append(node)
            acts.append(members[after])
        return cls(convs, outs, acts)


class _Fit:
    """How one region type's rebirth layer is initialised: the original values its least-squares fit reads
    (:meth:`probes`), the statistics it accumulates from them, and the weights it sets (:meth:`apply`)."""

    auto = "original"  # the method ``init="auto"`` picks for this region type

    def __init__(self, init: "Initialiser", region: Region) -> None:
        self.init, self.region = init, region
        self.stats: dict[int, _Ridge] = {}

    def probes(self) -> list[str]:
        return [self.region.input, self.region.output]

    def fittable(self) -> bool:
        """Whether a least-squares fit can differ from the original weights re-laid."""
        return True

    def accumulate(self, rebirth: nn.Module, values: dict[str, torch.Tensor],
                   targets: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def all_reduce(self) -> None:
        for ridge in self.stats.values():
            ridge.all_reduce()

    def apply(self, rebirth: nn.Module, method: str) -> dict[str, Any]:
        raise NotImplementedError


class _ConvFit(_Fit):
    """A streamline region's one convolution: ridge-fitted from the region's input patches to its output,
    or the original convolution's kernel placed where the pooling window's centre reads. Where the proposal
    keeps the pooling, the convolution is the original's, copied (also for ``lstsq``: nothing to fit)."""

    def fittable(self) -> bool:
        return self.region.proposal.pool is None  # a kept pooling: the original kernel is the fit

    def accumulate(self, rebirth: nn.Module, values: dict[str, torch.Tensor],
                   targets: dict[str, torch.Tensor]) -> None:
        if self.region.proposal.pool is not None:
            return  # the original kernel, unchanged, is the layer's best fit to its own output: nothing to fit
        conv = _convs(rebirth)[0]
        region = self.region
        self.stats.setdefault(0, _Ridge()).add(_patches(values[region.input], conv), _rows(targets[region.output]))

    def apply(self, rebirth: nn.Module, method: str) -> dict[str, Any]:
        conv = _convs(rebirth)[0]
        if method == "lstsq" and 0 in self.stats:
            weight, bias = self.stats[0].solve(self.init.ridge)
            conv.weight.copy_(weight.reshape(conv.weight.shape))
            conv.bias.copy_(bias)
            return {"fit": "ridge", "rows": self.stats[0].rows}
        nodes = self.init.nodes
        first = nodes[self.region.nodes[0]]
        w, b = self.init.folded(first)
        pool = None if self.region.proposal.pool is not None else \
            next((nodes[n] for n in self.region.nodes if kind_of(nodes[n]) in ("max_pool", "avg_pool")), None)
        conv.weight.zero_()
        offsets = []
        for d in range(2):
            s_c, p_c = first.kwargs["stride"][d], first.kwargs["padding"][d]
            centre = (-pool.kwargs["padding"][d] + (pool.kwargs["kernel_size"][d] - 1) // 2) * s_c if pool else 0
            offset = centre - p_c + conv.padding[d]
            offsets.append(min(max(offset, 0), conv.kernel_size[d] - w.shape[2 + d]))
        conv.weight[:, :, offsets[0]:offsets[0] + w.shape[2], offsets[1]:offsets[1] + w.shape[3]] = w
        conv.bias.copy_(b)
        return {"fit": "original", "offset": offsets}


class _InceptionFit(_Fit):
    """A branch region's kept branches: the 1x1 branch copied; in the others, the thinned reduce layer keeps
    its most energetic channels and the last convolution is ridge-fitted from them (``lstsq``), or both are
    copied (``original``); the absorbed pool projection's channels are fitted, or Glorot-initialised."""

    auto = "lstsq"

    def __init__(self, init: "Initialiser", region: Region) -> None:
        super().__init__(init, region)
        proposal = region.proposal
        self.branches = [_Branch.of(init.nodes, b.nodes) for b in proposal.branches]
        self.pool = _Branch.of(init.nodes, proposal.pool)
        self.energy: dict[int, torch.Tensor] = {}

    def probes(self) -> list[str]:
        names = [self.region.input]
        for b in self.branches:
            if len(b.convs) >= 2:
                names += [b.activations[0].name, b.outputs[-1].name]
        names.append(self.pool.outputs[-1].name)
        return names

    def _absorbed_after(self, index: int) -> bool:
        return (self.region.proposal.branches[index].absorbed_position or "after") == "after"

    def accumulate(self, rebirth: nn.Module, values: dict[str, torch.Tensor],
                   targets: dict[str, torch.Tensor]) -> None:
        for i, (branch, seq) in enumerate(zip(self.branches, rebirth.branches)):
            if len(branch.convs) < 2:
                continue
            reduced = values[branch.activations[0].name]
            last = _convs(seq)[-1]
            target = targets[branch.outputs[-1].name]
            if last.out_channels - target.shape[1]:
                projection = targets[self.pool.outputs[-1].name]
                target = torch.cat([target, projection] if self._absorbed_after(i) else [projection, target], 1)
            full = nn.Conv2d(reduced.shape[1], 1, last.kernel_size, last.stride, last.padding)
            self.stats.setdefault(i, _Ridge()).add(_patches(reduced, full), _rows(target))
            self.energy[i] = self.energy.get(i, 0) + reduced.double().pow(2).sum((0, 2, 3))

    def all_reduce(self) -> None:
        super().all_reduce()
        if world()[1] > 1:
            for energy in self.energy.values():
                dist.all_reduce(energy)

    def apply(self, rebirth: InceptionRebirth, method: str) -> dict[str, Any]:
        kept_report = []
        for i, (branch, seq) in enumerate(zip(self.branches, rebirth.branches)):
            convs = _convs(seq)
            weights, biases = (list(t) for t in zip(*(self.init.folded(n) for n in branch.convs)))
            if len(convs) == 1:  # the same layer, widened when it absorbs the pool branch
                self._copy_out(convs[0], weights[0], biases[0], i)
                continue
            reduce, last = convs[0], convs[-1]
            fitted = method == "lstsq" and i in self.stats
            if fitted:
                score = self.energy[i].cpu() * weights[-1].double().pow(2).sum((0, 2, 3)).cpu()
                kept = score.argsort(descending=True)[:reduce.out_channels].sort().values
            else:
                kept = torch.arange(reduce.out_channels)
            reduce.weight.copy_(weights[0][kept])
            reduce.bias.copy_(biases[0][kept])
            kept_report.append(kept.tolist())
            if fitted:
                area = last.kernel_size[0] * last.kernel_size[1]
                columns = (kept[:, None] * area + torch.arange(area)[None]).reshape(-1)
                weight, bias = self.stats[i].solve(self.init.ridge, columns)
                last.weight.copy_(weight.reshape(last.weight.shape))
                last.bias.copy_(bias)
            else:
                self._copy_out(last, weights[-1][:, kept], biases[-1], i)
        return {"fit": method, "kept_reduce_channels": kept_report}

    def _copy_out(self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor, index: int) -> None:
        """Copy an original layer into ``conv``; extra output channels (the absorbed pool branch) Glorot."""
        extra = conv.out_channels - weight.shape[0]
        if weight.shape[1:] != conv.weight.shape[1:]:
            raise RegionError(f"region {self.region.id!r}: branch {index + 1}'s layer does not fit its original")
        if extra == 0:
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
            return
        fresh = torch.empty(extra, *weight.shape[1:], device=weight.device)
        nn.init.xavier_uniform_(fresh)
        after = self._absorbed_after(index)
        conv.weight.copy_(torch.cat([weight, fresh] if after else [fresh, weight]))
        zeros = torch.zeros(extra, device=bias.device)
        conv.bias.copy_(torch.cat([bias, zeros] if after else [zeros, bias]))


FITS: dict[type[Proposal], type[_Fit]] = {ConvProposal: _ConvFit, InceptionProposal: _InceptionFit}
"""How each proposal type's rebirth layer is initialised (a new region type registers its own)."""


class Initialiser:
    """Initialises the rebirth layers of some regions; ``lstsq`` collects statistics from calibration data."""

    def __init__(self, gm: fx.GraphModule, regions: list[Region], method: str, ridge: float) -> None:
        self.gm, self.regions, self.init, self.ridge = gm, regions, method, ridge
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.fits: dict[str, _Fit] = {}
        for region in regions:
            fit = FITS.get(type(region.proposal))
            if fit is None:
                raise RegionError(f"region {region.id!r}: no initialiser for {type(region.proposal).__name__}")
            self.fits[region.id] = fit(self, region)

    def param(self, node: fx.Node, name: str) -> torch.Tensor | None:
        """The (detached) tensor ``node`` reads as its argument ``name`` (a parameter or buffer), or None."""
        value = node.kwargs.get(name)
        return fetch_attr(self.gm, value.target).detach() if isinstance(value, fx.Node) else None

    def folded(self, conv: fx.Node) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias that ``conv`` and the inference-mode BatchNorm reading it alone (if any) compute
        together: ``w * s`` and ``(b - mean) * s + beta`` per output channel, ``s = gamma / sqrt(var + eps)``
        (the original layer as the region computes it; a rebirth layer has no BatchNorm of its own)."""
        weight, bias = self.param(conv, "weight"), self.param(conv, "bias")
        bias = bias if bias is not None else torch.zeros(weight.shape[0], device=weight.device)
        bn = next(iter(conv.users)) if len(conv.users) == 1 else None
        if bn is None or kind_of(bn) != "batch_norm" or bn.kwargs.get("training", True) \
                or self.param(bn, "running_var") is None:
            return weight, bias
        mean, var = self.param(bn, "running_mean"), self.param(bn, "running_var")
        gamma, beta = self.param(bn, "weight"), self.param(bn, "bias")
        scale = (gamma if gamma is not None else 1.0) / torch.sqrt(var + bn.kwargs.get("eps", 1e-5))
        shift = beta if beta is not None else torch.zeros_like(mean)
        return weight * scale.reshape(-1, *[1] * (weight.dim() - 1)), (bias - mean) * scale + shift

    def method(self, region: Region) -> str:
        """The initialisation of ``region`` without measuring: ``auto`` is the region type's own default
        (``original`` for streamline regions, ``lstsq`` for branch regions)."""
        return self.init if self.init != "auto" else self.fits[region.id].auto

    def candidates(self, region: Region) -> tuple[str, ...]:
        """The initialisations ``auto`` measures for ``region`` (the original weights re-laid, and the
        least-squares fit where the region has something to fit); the one method otherwise."""
        if self.init != "auto":
            return (self.init,)
        fit = self.fits[region.id]
        return ("original", "lstsq") if fit.fittable() else ("original",)

    def probes(self, region: Region) -> list[str]:
        """The original nodes whose values ``region``'s least-squares fit reads (its input first)."""
        return self.fits[region.id].probes()

    def calibrate(self, region: Region, rebirth: nn.Module, data: Any, images: int, batch_size: int, seed: int,
                  meter: Meter, student_input: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
        """Accumulate the ridge statistics of one region over ``images`` calibration images; return how many
        were used. Targets are the original model's values; the layer's inputs too, or with
        ``student_input`` the region's input in the student (so the fit also corrects the error of the
        regions merged before it) pushed through the original region's own layers."""
        if "lstsq" not in self.candidates(region) + (self.method(region),) or images == 0:
            return 0
        fit = self.fits[region.id]
        names = fit.probes()
        probe = probe_nodes(self.gm, names).eval()
        inner = probe_nodes(extract_region(self.gm, region), ["x"] + names[1:]).eval() if student_input else None
        used = 0
        with torch.no_grad():
            for x, _ in batches(data, batch_size, seed=seed, images=images, device=device_of(self.gm)):
                targets = dict(zip(names, probe(x)))
                sources = targets
                if inner is not None:
                    sources = dict(zip(names, inner(student_input(x))))
                fit.accumulate(rebirth, sources, targets)
                used += len(x) * world()[1]
                meter.update(len(x) * world()[1])
        fit.all_reduce()
        return used

    @torch.no_grad()
    def apply(self, region: Region, rebirth: nn.Module, method: str | None = None) -> dict[str, Any]:
        """Initialise ``rebirth`` by ``method`` (default :meth:`method`); return facts for the report."""
        method = method or self.method(region)
        if method == "xavier":
            xavier_init(rebirth)
            return {}
        return self.fits[region.id].apply(rebirth, method)
