"""Graph surgery shared by the tiers: tidying a GraphModule after its nodes were rewritten."""

from __future__ import annotations

import torch.fx as fx

__all__ = ["prune_unused_attributes"]


def prune_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete parameters and buffers that no node reads any more; return how many were deleted."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    modules = [n.target + "." for n in gm.graph.nodes if n.op == "call_module"]
    removed = 0
    names = [name for name, _ in gm.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if name in used or any(name.startswith(prefix) for prefix in modules):
            continue
        *path, last = name.split(".")
        owner = gm.get_submodule(".".join(path)) if path else gm
        if last in owner._parameters:
            del owner._parameters[last]
        elif last in owner._buffers:
            del owner._buffers[last]
        removed += 1
    gm.delete_all_unused_submodules()
    return removed
