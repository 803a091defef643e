"""Random DAGs of the exact tier's vocabulary, for property tests of the whole pipeline.

:func:`random_graphs` draws a GraphModule built from convolutions (grouped, padded, 1x1/3x3), eval
BatchNorm, constant scale/shift, average pooling, explicit zero padding, ReLU, sums, concatenations and
a pooled Linear head, with all feature maps at one spatial size so that sums and concatenations of any
two values are well formed. ``graph_module.code`` is readable PyTorch for a failing example. The vocabulary is a dict of op builders
(:data:`VOCABULARY`); users add their own ops to it.
"""

from __future__ import annotations

import operator
import random
from typing import Callable, Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

__all__ = ["random_graphs", "GraphBuilder", "OpBuilder", "VOCABULARY", "synthetic_cnn"]

class GraphBuilder:
    """What an op of the vocabulary may use to grow a random graph.

    ``draw`` draws from hypothesis; ``graph`` is the fx graph being built; ``pick()`` returns a random
    existing ``(node, channels)``; ``tensor(kind, shape)`` registers a random constant and returns its
    ``get_attr`` node; ``add(node, channels)`` makes a new value available to later ops. Every value is
    a ``(N, channels, 6, 6)`` feature map.
    """

    def __init__(self, draw: st.DrawFn, dtype: torch.dtype, channels: int) -> None:
        self.draw, self.dtype = draw, dtype
        self.root, self.graph = nn.Module(), fx.Graph()
        self.values: list[tuple[fx.Node, int]] = [(self.graph.placeholder("x"), channels)]
        self.count = 0

    def tensor(self, kind: str, shape: tuple[int, ...], low: float = -1.0, high: float = 1.0) -> fx.Node:
        self.count += 1
        name = f"{kind}{self.count}"
        gen = torch.Generator().manual_seed(self.draw(st.integers(0, 2**16)))
        value = torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low
        self.root.register_buffer(name, value.to(self.dtype))
        return self.graph.get_attr(name)

    def pick(self) -> tuple[fx.Node, int]:
        return self.draw(st.sampled_from(self.values))

    def add(self, node: fx.Node, channels: int) -> None:
        self.values.append((node, channels))

    def conv(self, x: fx.Node, cin: int, kernel: int, padding: int) -> tuple[fx.Node, int]:
        groups = self.draw(st.sampled_from([g for g in (1, 2, cin) if cin % g == 0]))
        cout = groups * self.draw(st.integers(1, max(1, 6 // groups)))
        w = self.tensor("w", (cout, cin // groups, kernel, kernel))
        b = self.tensor("b", (cout,)) if self.draw(st.booleans()) else None
        return self.graph.call_function(F.conv2d, (x, w, b, 1, padding, 1, groups)), cout

    def finish(self) -> fx.GraphModule:
        g = self.graph
        outputs = [n for n, _ in self.values if not n.users][-2:] or [self.values[-1][0]]
        out, c = outputs[-1], dict((id(n), ch) for n, ch in self.values)[id(outputs[-1])]
        if self.draw(st.booleans()):
            pooled = g.call_function(torch.flatten, (g.call_function(F.adaptive_avg_pool2d, (out, 1)), 1))
            out = g.call_function(F.linear, (pooled, self.tensor("lw", (3, c)), self.tensor("lb", (3,))))
            outputs[-1] = out
        g.output(tuple(outputs) if len(outputs) > 1 else outputs[0])
        return fx.GraphModule(self.root, g)


OpBuilder = Callable[[GraphBuilder], None]


def _conv(b: GraphBuilder) -> None:
    x, c = b.pick()
    k = b.draw(st.sampled_from([1, 3]))
    b.add(*b.conv(x, c, k, k // 2))


def _sibling(b: GraphBuilder) -> None:  # two convs of the same input, used separately
    x, c = b.pick()
    b.add(*b.conv(x, c, 1, 0))
    b.add(*b.conv(x, c, 1, 0))


def _bn(b: GraphBuilder) -> None:
    x, c = b.pick()
    args = (x, b.tensor("m", (c,)), b.tensor("v", (c,), 0.25, 2.0), b.tensor("g", (c,)), b.tensor("beta", (c,)),
            False, 0.1, 1e-5)
    b.add(b.graph.call_function(F.batch_norm, args), c)


def _affine(b: GraphBuilder) -> None:
    x, c = b.pick()
    fn = b.draw(st.sampled_from([operator.mul, operator.add, operator.sub]))
    const = b.tensor("c", (c, 1, 1), 0.5, 1.5) if b.draw(st.booleans()) else 0.75
    b.add(b.graph.call_function(fn, (x, const)), c)


def _avg_pool(b: GraphBuilder) -> None:
    x, c = b.pick()
    b.add(b.graph.call_function(F.avg_pool2d, (x, 3, 1, 1)), c)


def _pad_conv(b: GraphBuilder) -> None:
    x, c = b.pick()
    b.add(*b.conv(b.graph.call_function(F.pad, (x, (1, 1, 1, 1))), c, 3, 0))


def _relu(b: GraphBuilder) -> None:
    x, c = b.pick()
    b.add(b.graph.call_function(F.relu, (x,)), c)


def _add(b: GraphBuilder) -> None:
    x, c = b.pick()
    same = [v for v in b.values if v[1] == c and v[0] is not x]
    other = b.draw(st.sampled_from(same))[0] if same else x
    b.add(b.graph.call_function(operator.add, (x, other)), c)


def _cat(b: GraphBuilder) -> None:
    (x, c), (y, d) = b.pick(), b.pick()
    b.add(b.graph.call_function(torch.cat, ([x, y], 1)), c + d)


VOCABULARY: dict[str, OpBuilder] = {
    "conv": _conv, "sibling": _sibling, "bn": _bn, "affine": _affine, "avg_pool": _avg_pool,
    "pad_conv": _pad_conv, "relu": _relu, "add": _add, "cat": _cat,
}
"""The default op vocabulary. Extend it: ``random_graphs(ops={**VOCABULARY, "mine": my_builder})``."""

_WEIGHTS = {"conv": 2}  # convolutions are drawn twice as often


@st.composite
def random_graphs(draw: st.DrawFn, max_ops: int = 8, dtype: torch.dtype = torch.float64,
                  ops: Mapping[str, OpBuilder] | None = None) -> fx.GraphModule:
    """A random DAG GraphModule taking one ``(N, C, 6, 6)`` input (``C`` is ``graph_module.meta["in_channels"]``),
    built from ``ops`` (default :data:`VOCABULARY`)."""
    ops = VOCABULARY if ops is None else ops
    names = [n for n in ops for _ in range(_WEIGHTS.get(n, 1))]
    channels = draw(st.integers(1, 4))
    builder = GraphBuilder(draw, dtype, channels)
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=max_ops)):
        ops[name](builder)
    gm = builder.finish()
    gm.meta["in_channels"] = channels
    return gm


def synthetic_cnn(nodes: int, *, seed: int = 0, channels: int = 4, dtype: torch.dtype = torch.float32
                  ) -> fx.GraphModule:
    """A deterministic CNN-shaped GraphModule of about ``nodes`` graph nodes (get_attr nodes included),
    for measuring how the pipeline's time grows with graph size. It is a chain of blocks drawn with
    ``random.Random(seed)``, every one of which gives the exact tier work: conv -> BatchNorm -> ReLU,
    a RepVGG-style block (3x3 + BN and 1x1 + BN summed, ReLU), an inception-style pair of 1x1 convs
    concatenated and reduced by a 1x1 conv, a constant scale and shift, and avg-pool -> conv. Input:
    ``(N, channels, 6, 6)``."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    root, graph = nn.Module(), fx.Graph()
    count = 0

    def tensor(shape: tuple[int, ...], low: float = -1.0, high: float = 1.0) -> fx.Node:
        nonlocal count
        count += 1
        root.register_buffer(f"t{count}", (torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low)
                                           + low).to(dtype))
        return graph.get_attr(f"t{count}")

    def conv(x: fx.Node, cin: int, cout: int, k: int) -> fx.Node:
        return graph.call_function(F.conv2d, (x, tensor((cout, cin, k, k), -0.5, 0.5), tensor((cout,)), 1, k // 2))

    def bn(x: fx.Node, c: int) -> fx.Node:
        args = (x, tensor((c,)), tensor((c,), 0.25, 2.0), tensor((c,), 0.5, 1.5), tensor((c,)), False, 0.1, 1e-5)
        return graph.call_function(F.batch_norm, args)

    def block(x: fx.Node) -> fx.Node:
        c = channels
        kind = rng.choice(("conv_bn_relu", "conv_bn_relu", "repvgg", "inception", "affine", "pool_conv"))
        if kind == "conv_bn_relu":
            return graph.call_function(F.relu, (bn(conv(x, c, c, 3), c),))
        if kind == "repvgg":
            total = graph.call_function(operator.add, (bn(conv(x, c, c, 3), c), bn(conv(x, c, c, 1), c)))
            return graph.call_function(F.relu, (total,))
        if kind == "inception":
            both = graph.call_function(torch.cat, ([conv(x, c, c, 1), conv(x, c, c, 1)], 1))
            return conv(graph.call_function(F.relu, (both,)), 2 * c, c, 1)
        if kind == "affine":
            scaled = graph.call_function(operator.mul, (x, tensor((c, 1, 1), 0.5, 1.5)))
            return graph.call_function(operator.add, (scaled, tensor((c, 1, 1))))
        return conv(graph.call_function(F.avg_pool2d, (x, 3, 1, 1)), c, c, 3)

    x = graph.placeholder("x")
    while len(graph.nodes) < nodes - 1:
        x = block(x)
    graph.output(x)
    return fx.GraphModule(root, graph)
