"""Graph surgery shared by the tiers: reading a GraphModule's attributes, and tidying it after its nodes
were rewritten."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = ["fetch_attr", "device_of", "prune_unused_attributes"]


def fetch_attr(module: nn.Module, target: str) -> Any:
    """The object a ``get_attr`` target names (``"layer1.0.weight"``): the tensor itself, not a copy."""
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


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
