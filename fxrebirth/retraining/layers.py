"""Rebirth layers: the module a region's proposal describes (untrained; see the retraining issue).

``build_rebirth(proposal)`` reads the typed proposal a marking pass recorded
(:class:`fxrebirth.graph.regions.Proposal`) and returns the module that replaces the region. The builders
are a table keyed by proposal type (:data:`BUILDERS`; a new region type registers its own):

* :class:`~fxrebirth.graph.regions.ConvProposal` (streamline regions): one ``Conv2d`` (+ ``ReLU`` when the
  region had one), then the region's ``MaxPool2d`` where the proposal keeps it;
* :class:`~fxrebirth.graph.regions.InceptionProposal` (branch regions): the module's branches without the
  pool projection, each a sequence of ``Conv2d`` + ``ReLU``, concatenated in the original order;
* :class:`~fxrebirth.graph.regions.DepthProposal` (depth segments): the one merged convolution (``Conv1d``,
  ``Conv2d`` or ``Conv3d`` by the kernel's rank), grouped where the segment stays grouped.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from fxrebirth.graph.regions import BranchLayer, ConvProposal, DepthProposal, InceptionProposal, Proposal, RegionError
from fxrebirth.graph.mutation import eliminate_dead_code

__all__ = ["build_rebirth", "BUILDERS", "InceptionRebirth", "replace_regions", "RENAMED"]

RENAMED = "fxrebirth.replaced_outputs"
"""``graph_module.meta`` key: region output name -> the node that now computes it (:func:`replace_regions`)."""


def _conv(proposal: ConvProposal) -> nn.Module:
    conv = nn.Conv2d(proposal.in_channels, proposal.out_channels, tuple(proposal.kernel_size),
                     tuple(proposal.stride), tuple(proposal.padding))
    layers = [conv, nn.ReLU()] if proposal.relu else [conv]
    if proposal.pool is not None:
        pool = proposal.pool
        layers.append(nn.MaxPool2d(tuple(pool.kernel_size), tuple(pool.stride), tuple(pool.padding),
                                   ceil_mode=pool.ceil_mode))
    return nn.Sequential(*layers)


class InceptionRebirth(nn.Module):
    """Parallel conv branches on one input, concatenated along channels."""

    def __init__(self, in_channels: int, branches: list[list[BranchLayer]]) -> None:
        super().__init__()
        self.branches = nn.ModuleList()
        for layers in branches:
            seq, cin = [], in_channels
            for layer in layers:
                seq.append(nn.Conv2d(cin, layer.out_channels, tuple(layer.kernel_size), tuple(layer.stride),
                                     tuple(layer.padding)))
                if layer.relu:
                    seq.append(nn.ReLU())
                cin = layer.out_channels
            self.branches.append(nn.Sequential(*seq))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


def _inception(proposal: InceptionProposal) -> nn.Module:
    return InceptionRebirth(proposal.in_channels, [b.layers for b in proposal.branches])


def _depth(proposal: DepthProposal) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(proposal.kernel_size)]
    return conv(proposal.in_channels, proposal.out_channels, tuple(proposal.kernel_size), tuple(proposal.stride),
                tuple(proposal.padding), groups=proposal.groups)


BUILDERS: dict[type[Proposal], Callable[[Any], nn.Module]] = {ConvProposal: _conv, InceptionProposal: _inception,
                                                              DepthProposal: _depth}


def build_rebirth(proposal: Proposal | dict[str, Any] | None) -> nn.Module:
    """The (untrained) module a proposal describes (a :class:`~fxrebirth.graph.regions.Proposal`, or its
    ``to_dict()`` form)."""
    if isinstance(proposal, dict):
        proposal = Proposal.from_dict(proposal)
    if proposal is None:
        raise RegionError("the region has no proposal: nothing says what its rebirth layer is")
    builder = BUILDERS.get(type(proposal))
    if builder is None:
        raise RegionError(f"no rebirth layer builder for {type(proposal).__name__}; "
                          f"known: {sorted(t.__name__ for t in BUILDERS)}")
    return builder(proposal)


def replace_regions(gm: "torch.fx.GraphModule", regions: "list[Any]", modules: dict[str, nn.Module]
                    ) -> "torch.fx.GraphModule":
    """A copy of ``gm`` (the captured model) with every one of ``regions`` (disjoint, checked by the caller)
    replaced by a call of ``modules[region id]`` (inserted as is, not copied)."""
    import copy

    import torch.fx as fx

    out = copy.deepcopy(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    position = {n.name: i for i, n in enumerate(out.graph.nodes)}
    # a region's output -> its rebirth call (a later region's input), kept across calls in the graph's meta
    renamed: dict[str, str] = out.meta.setdefault(RENAMED, {})
    replaced: dict[str, fx.Node] = {k: nodes[v] for k, v in renamed.items() if v in nodes}
    taken = {n for n in nodes if n.startswith("rebirth_")}
    index = 0
    for region in sorted(regions, key=lambda r: position[r.output]):
        while f"rebirth_{index}" in taken or hasattr(out, f"rebirth_{index}"):
            index += 1
        name = f"rebirth_{index}"
        index += 1
        out.add_submodule(name, modules[region.id])
        old = nodes[region.output]
        # where the region's first layer read its input: a write to the input after that read stays after it
        with out.graph.inserting_before(min(nodes[n] for n in region.nodes)):
            new = out.graph.call_module(name, (replaced.get(region.input, nodes[region.input]),))
        replaced[region.output] = new
        renamed[region.output] = new.name
        new.meta["tensor_meta"] = old.meta.get("tensor_meta")
        new.meta["fxrebirth.replaces"] = region.replaces
        new.meta["fxrebirth.region"] = region.id
        old.replace_all_uses_with(new)
    eliminate_dead_code(out.graph)  # mutation-aware: keeps in-place statements outside the regions
    out.delete_all_unused_submodules()
    out.recompile()
    return out
