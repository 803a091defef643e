"""Rebirth layers: the module a region's proposal describes (untrained; see the retraining issue).

``build_rebirth(proposal)`` reads the plain-data proposal a marking pass recorded and returns the
module that replaces the region. The proposal types are a small table (:data:`BUILDERS`):

* ``"conv"`` (streamline regions): one ``Conv2d`` (+ ``ReLU`` when the region had one);
* ``"inception"`` (branch regions): the module's branches without the pool projection, each a
  sequence of ``Conv2d`` + ``ReLU``, concatenated in the original order.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from fxrebirth.graph.regions import RegionError
from fxrebirth.graph.surgery import device_of

__all__ = ["build_rebirth", "BUILDERS", "InceptionRebirth", "rebuild"]


def _conv(proposal: dict[str, Any]) -> nn.Module:
    conv = nn.Conv2d(proposal["in_channels"], proposal["out_channels"], tuple(proposal["kernel_size"]),
                     tuple(proposal["stride"]), tuple(proposal["padding"]))
    return nn.Sequential(conv, nn.ReLU()) if proposal["relu"] else nn.Sequential(conv)


class InceptionRebirth(nn.Module):
    """Parallel conv branches on one input, concatenated along channels."""

    def __init__(self, in_channels: int, branches: list[list[dict[str, Any]]]) -> None:
        super().__init__()
        self.branches = nn.ModuleList()
        for layers in branches:
            seq, cin = [], in_channels
            for layer in layers:
                seq.append(nn.Conv2d(cin, layer["out_channels"], tuple(layer["kernel_size"]),
                                     tuple(layer["stride"]), tuple(layer["padding"])))
                if layer["relu"]:
                    seq.append(nn.ReLU())
                cin = layer["out_channels"]
            self.branches.append(nn.Sequential(*seq))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


def _inception(proposal: dict[str, Any]) -> nn.Module:
    return InceptionRebirth(proposal["in_channels"], [b["layers"] for b in proposal["branches"]])


BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {"conv": _conv, "inception": _inception}


def build_rebirth(proposal: dict[str, Any]) -> nn.Module:
    """The (untrained) module a proposal describes."""
    builder = BUILDERS.get(proposal.get("type"))
    if builder is None:
        raise RegionError(f"unknown proposal type {proposal.get('type')!r}; known: {sorted(BUILDERS)}")
    return builder(proposal)


def rebuild(gm: "torch.fx.GraphModule", plan: "Any", modules: dict[str, nn.Module] | None = None
            ) -> "torch.fx.GraphModule":
    """A copy of ``gm`` (the captured model) with every selected region of ``plan`` replaced by its
    rebirth layer, freshly initialised (untrained: for measuring speed; :func:`fxrebirth.retraining.layers` retrains),
    or by ``modules[region id]`` where given (inserted as is, not copied)."""
    import copy

    import torch.fx as fx

    plan.validate(gm)
    out = copy.deepcopy(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    device = device_of(out)
    position = {n.name: i for i, n in enumerate(out.graph.nodes)}
    replaced: dict[str, fx.Node] = {}  # a region's output -> its rebirth call (a later region's input)
    for i, planned in enumerate(sorted(plan.selected, key=lambda r: position[r.region.output])):
        region = planned.region
        name = f"rebirth_{i}"
        module = (modules or {}).get(region.id)
        out.add_submodule(name, module if module is not None else build_rebirth(region.proposal).to(device))
        old = nodes[region.output]
        with out.graph.inserting_before(old):
            new = out.graph.call_module(name, (replaced.get(region.input, nodes[region.input]),))
        replaced[region.output] = new
        new.meta["tensor_meta"] = old.meta.get("tensor_meta")
        new.meta["fxrebirth.replaces"] = region.replaces
        old.replace_all_uses_with(new)
    out.graph.eliminate_dead_code()
    out.delete_all_unused_submodules()
    out.recompile()
    return out
