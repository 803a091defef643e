"""Random DAGs of the exact tier's vocabulary, for property tests of the whole pipeline.

:func:`random_graphs` draws a GraphModule built from convolutions (grouped, padded, 1x1/3x3), eval
BatchNorm, constant scale/shift, average pooling, explicit zero padding, ReLU, sums, concatenations and
a pooled Linear head, with all feature maps at one spatial size so that sums and concatenations of any
two values are well formed. ``graph_module.code`` is readable PyTorch for a failing example.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

__all__ = ["random_graphs", "OPS"]

OPS = ("conv", "conv", "bn", "affine", "avg_pool", "pad_conv", "add", "cat", "relu", "sibling")


class _Builder:
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

    def conv(self, x: fx.Node, cin: int, kernel: int, padding: int) -> tuple[fx.Node, int]:
        groups = self.draw(st.sampled_from([g for g in (1, 2, cin) if cin % g == 0]))
        cout = groups * self.draw(st.integers(1, max(1, 6 // groups)))
        w = self.tensor("w", (cout, cin // groups, kernel, kernel))
        b = self.tensor("b", (cout,)) if self.draw(st.booleans()) else None
        return self.graph.call_function(F.conv2d, (x, w, b, 1, padding, 1, groups)), cout

    def step(self, op: str) -> None:
        x, c = self.pick()
        g = self.graph
        if op == "conv":
            k = self.draw(st.sampled_from([1, 3]))
            self.values.append(self.conv(x, c, k, k // 2))
        elif op == "sibling":  # two convs of the same input, used separately
            self.values.append(self.conv(x, c, 1, 0))
            self.values.append(self.conv(x, c, 1, 0))
        elif op == "bn":
            args = (x, self.tensor("m", (c,)), self.tensor("v", (c,), 0.25, 2.0), self.tensor("g", (c,)),
                    self.tensor("beta", (c,)), False, 0.1, 1e-5)
            self.values.append((g.call_function(F.batch_norm, args), c))
        elif op == "affine":
            fn = self.draw(st.sampled_from([operator.mul, operator.add, operator.sub]))
            const = self.tensor("c", (c, 1, 1), 0.5, 1.5) if self.draw(st.booleans()) else 0.75
            self.values.append((g.call_function(fn, (x, const)), c))
        elif op == "avg_pool":
            self.values.append((g.call_function(F.avg_pool2d, (x, 3, 1, 1)), c))
        elif op == "pad_conv":
            padded = g.call_function(F.pad, (x, (1, 1, 1, 1)))
            self.values.append(self.conv(padded, c, 3, 0))
        elif op == "relu":
            self.values.append((g.call_function(F.relu, (x,)), c))
        elif op == "add":
            same = [v for v in self.values if v[1] == c and v[0] is not x]
            other = self.draw(st.sampled_from(same))[0] if same else x
            self.values.append((g.call_function(operator.add, (x, other)), c))
        elif op == "cat":
            y, d = self.pick()
            self.values.append((g.call_function(torch.cat, ([x, y], 1)), c + d))

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


@st.composite
def random_graphs(draw: st.DrawFn, max_ops: int = 8, dtype: torch.dtype = torch.float64) -> fx.GraphModule:
    """A random DAG GraphModule taking one ``(2, C, 6, 6)`` input (``C`` in ``graph_module.meta``)."""
    channels = draw(st.integers(1, 4))
    builder = _Builder(draw, dtype, channels)
    for op in draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=max_ops)):
        builder.step(op)
    gm = builder.finish()
    gm.meta["in_channels"] = channels
    return gm
