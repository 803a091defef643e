"""Static cost estimates from recorded shapes: FLOPs per node and stored tensor sizes.

The estimate counts a multiply-add as 2 FLOPs. Only layer kinds in :data:`_FLOPS` are counted; other
nodes count as one FLOP per output element when they compute a tensor, which is the right order of
magnitude for elementwise ops and a deliberate simplification for anything else.
"""

from __future__ import annotations

import math
import operator
from typing import Callable

import torch
import torch.fx as fx

from .ops import kind_of

__all__ = ["node_flops", "graph_flops", "stored_elements"]


def _numel(node: fx.Node) -> int:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return math.prod(shape) if shape is not None else 0


def _shape(value: object) -> tuple[int, ...] | None:
    if isinstance(value, fx.Node):
        shape = getattr(value.meta.get("tensor_meta"), "shape", None)
        return tuple(shape) if shape is not None else None
    return None


def _conv(node: fx.Node) -> int:
    w = _shape(node.kwargs["weight"])
    return 2 * _numel(node) * math.prod(w[1:]) if w else 0


def _conv_transpose(node: fx.Node) -> int:
    w = _shape(node.kwargs["weight"])
    x = _shape(node.kwargs["input"])
    return 2 * math.prod(x) * math.prod(w[1:]) if w and x else 0


def _linear(node: fx.Node) -> int:
    w = _shape(node.kwargs["weight"])
    return 2 * _numel(node) * w[1] if w else 0


def _pool(node: fx.Node) -> int:
    return _numel(node) * math.prod(node.kwargs["kernel_size"])


def _input_size(node: fx.Node) -> int:
    x = _shape(node.kwargs["input"])
    return math.prod(x) if x else 0


_FLOPS: dict[str, Callable[[fx.Node], int]] = {
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "linear": _linear,
    "batch_norm": lambda n: 2 * _numel(n),
    "max_pool": _pool,
    "avg_pool": _pool,
    "adaptive_avg_pool": _input_size,
    "lrn": lambda n: (n.kwargs["size"] + 3) * _numel(n),
    "flatten": lambda n: 0,
    "reshape": lambda n: 0,
    "dropout": lambda n: 0,
}

_FREE = {operator.getitem, getattr}


def node_flops(node: fx.Node) -> int:
    """Estimated FLOPs of one node (0 for placeholders, attributes and outputs)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return 0
    kind = kind_of(node)
    if kind in _FLOPS:
        return _FLOPS[kind](node)
    if node.op == "call_function" and node.target in _FREE:
        return 0
    return _numel(node)


def graph_flops(gm: fx.GraphModule) -> int:
    """Sum of :func:`node_flops` over the graph (needs shape metadata)."""
    return sum(node_flops(n) for n in gm.graph.nodes)


def stored_elements(module: torch.nn.Module) -> int:
    """Number of elements in all parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total
