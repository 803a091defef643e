"""Running a graph for its shapes without side effects (capture's shape recording, the symbolic run of
:mod:`fxrebirth.graph.metadata`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxrebirth.equivalence import flush_denormals
from fxrebirth.graph.mutation import mutated_input

__all__ = ["no_side_effects", "written_attributes"]


class no_side_effects:
    """Run ``gm`` for its shapes only: in eval mode (a BatchNorm left in training mode must not update its
    statistics), without gradients, and with every buffer and every parameter that a mutation in the
    graph may write restored afterwards (a forward that increments a buffer must not have counted)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm

    def __enter__(self) -> None:
        gm = self.gm
        self.modes = {m: m.training for m in gm.modules()}
        written = {n.target for n in written_attributes(gm.graph)}
        tensors = dict(gm.named_buffers())
        tensors.update((name, p) for name, p in gm.named_parameters() if name in written)
        self.saved = [(t, t._version, t.detach().clone()) for t in tensors.values()]
        gm.eval()
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        self.denormals = flush_denormals()  # shapes only: no reason to pay for denormal arithmetic
        self.denormals.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.denormals.__exit__(None, None, None)
        torch.set_grad_enabled(self.grad)
        for m, mode in self.modes.items():
            m.training = mode
        with torch.no_grad():
            for t, version, value in self.saved:
                if t._version != version:
                    t.copy_(value)


def written_attributes(graph: fx.Graph) -> list[fx.Node]:
    """``get_attr`` nodes a mutation in ``graph`` may write to (directly or through a view)."""
    found = []
    for node in graph.nodes:
        stack = [mutated_input(node)]
        seen: set[fx.Node] = set()
        while stack:
            value = stack.pop()
            if not isinstance(value, fx.Node) or value in seen:
                continue
            seen.add(value)
            if value.op == "get_attr":
                found.append(value)
            elif value.op in ("call_method", "call_function"):
                stack += value.all_input_nodes
    return found
