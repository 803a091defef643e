r"""Convolutions as data: the algebra behind the merging families (conv chains, branches, pooling).

A :class:`Kernel` is a linear shift-invariant map written as one convolution (float64)::

    y = conv(x, weight, bias, stride, padding, dilation, groups)

Identity, per-channel affine maps and average pooling are kernels too (depthwise, ``groups = C``):

    x            = conv(x, 1 at the centre, 0)
    x * s + t    = conv(x, s, t)
    avg_pool(x)  = conv(x, 1 / prod(k))         (zero padding counted, i.e. count_include_pad or no padding)

Three operations build every merge:

* **sum** of kernels on the same input (RepVGG, ACNet, Diverse Branch Block): align them (a kernel of
  size ``k`` with padding ``p`` equals one of size ``K`` with padding ``P`` when it sits at offset
  ``(P - p) / d`` inside it), then add weights and biases;
* **stack** (horizontal fusion): align, then concatenate along output channels;
* **compose** (a chain, ``k2`` after ``k1``): with ``u = s1 * d2 * j + d1 * i``::

      M[c2, c0, u] = sum_{c1, i, j} W2[c2, c1, j] W1[c1, c0, i],   b = b2 + sum_{c1, j} W2[c2, c1, j] b1[c1]
      stride s1 * s2, padding p1, kernel s1 * d2 * (k2 - 1) + d1 * (k1 - 1) + 1

  exact when the second kernel has no padding, or when the first is a bias-free, unpadded 1x1 with
  stride 1 (then the second's zero padding sees exactly the zeros the first would compute).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxrebirth.graph.guards import Geometry, SizeGuard
from fxrebirth.graph.ops import kind_of
from fxrebirth.rewrite.rules import RuleContext, describe

__all__ = [
    "Kernel", "layer_tensors", "kernel_of_conv", "kernel_of_avg_pool", "identity_kernel", "affine_kernel", "align",
    "sum_kernels", "stack_kernels", "compose", "conv_output_size", "emit_conv",
]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(frozen=True)
class Kernel:
    """One convolution's parameters in float64 (weight ``(C_out, C_in / groups, *k)``, bias ``(C_out,)``).

    ``guards``: conditions on the input's spatial size under which the map is exact (an average pooling
    in ceil mode is a convolution only where its last window is whole); they travel through every
    operation and :func:`emit_conv` records them on the merged layer's input.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    guards: tuple[SizeGuard, ...] = ()

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.stride, self.padding, self.dilation)

    @property
    def ndim(self) -> int:
        return self.weight.dim() - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    def negated(self) -> "Kernel":
        """The kernel of ``-conv(x)``: ``conv(x; -W, -b)``."""
        return replace(self, weight=-self.weight, bias=-self.bias)

    def output_size(self, in_size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(
            conv_output_size(n, k, s, p, d)
            for n, k, s, p, d in zip(in_size, self.size, self.stride, self.padding, self.dilation)
        )

    def dense(self) -> "Kernel":
        """The same map with ``groups = 1`` (block-diagonal weight)."""
        if self.groups == 1:
            return self
        cout_g, cin_g = self.out_channels // self.groups, self.weight.shape[1]
        weight = self.weight.new_zeros((self.out_channels, self.in_channels) + self.size)
        for g in range(self.groups):
            rows, cols = slice(g * cout_g, (g + 1) * cout_g), slice(g * cin_g, (g + 1) * cin_g)
            weight[rows, cols] = self.weight[rows]
        return replace(self, weight=weight, groups=1)

    def regroup(self, groups: int) -> "Kernel | None":
        """This dense kernel as a ``groups``-grouped one, if its weight is block-diagonal that way."""
        if groups == 1 or self.groups != 1:
            return self if groups == self.groups else None
        if self.out_channels % groups or self.in_channels % groups:
            return None
        cout_g, cin_g = self.out_channels // groups, self.in_channels // groups
        blocks = []
        mask = torch.ones_like(self.weight, dtype=torch.bool)
        for g in range(groups):
            rows, cols = slice(g * cout_g, (g + 1) * cout_g), slice(g * cin_g, (g + 1) * cin_g)
            blocks.append(self.weight[rows, cols])
            mask[rows, cols] = False
        if bool(self.weight[mask].any()):
            return None
        return replace(self, weight=torch.cat(blocks, dim=0), groups=groups)

    def undilated(self) -> "Kernel":
        """The same map with dilation 1 (zeros between the taps)."""
        if all(d == 1 for d in self.dilation):
            return self
        size = tuple(d * (k - 1) + 1 for k, d in zip(self.size, self.dilation))
        weight = self.weight.new_zeros(self.weight.shape[:2] + size)
        index = (slice(None), slice(None)) + tuple(slice(None, None, d) for d in self.dilation)
        weight[index] = self.weight
        return replace(self, weight=weight, dilation=(1,) * self.ndim)

    def embedded(self, size: tuple[int, ...], offset: tuple[int, ...], padding: tuple[int, ...]) -> "Kernel":
        """The same map with a ``size`` kernel (this one at ``offset``) and the given padding."""
        weight = self.weight.new_zeros(self.weight.shape[:2] + size)
        index = (slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(offset, self.size))
        weight[index] = self.weight
        return replace(self, weight=weight, padding=padding)


def layer_tensors(layer: fx.Node, ctx: RuleContext) -> tuple[torch.Tensor, torch.Tensor] | str:
    """A conv / conv-transpose / linear node's weight and bias as float64 constants (a zero bias when it
    has none), or why they are not constants."""
    weight = ctx.constant(layer.kwargs["weight"])
    if weight is None:
        return f"the weight of {describe(layer)} is not a constant"
    weight = weight.to(torch.float64)
    if layer.kwargs["bias"] is None:
        out_channels = weight.shape[1] * layer.kwargs["groups"] if kind_of(layer) == "conv_transpose" \
            else weight.shape[0]
        return weight, torch.zeros(out_channels, dtype=torch.float64, device=weight.device)
    bias = ctx.constant(layer.kwargs["bias"])
    if bias is None:
        return f"the bias of {describe(layer)} is not a constant"
    return weight, bias.to(device=weight.device, dtype=torch.float64)


def kernel_of_conv(node: fx.Node, ctx: RuleContext) -> Kernel | str:
    """The :class:`Kernel` of a canonical convolution node, or why it has none."""
    if kind_of(node) != "conv":
        return f"{describe(node)} is not a convolution"
    kw = node.kwargs
    if isinstance(kw["padding"], str):
        return f"{describe(node)} has padding={kw['padding']!r}"
    tensors = layer_tensors(node, ctx)
    if isinstance(tensors, str):
        return tensors
    return Kernel(*tensors, tuple(kw["stride"]), tuple(kw["padding"]), tuple(kw["dilation"]), kw["groups"])


def _channels_and_rank(node: fx.Node) -> tuple[int, int] | None:
    shape = RuleContext.shape(node)
    return (shape[1], len(shape) - 2) if shape is not None and len(shape) >= 3 else None


def kernel_of_avg_pool(node: fx.Node, ctx: RuleContext) -> Kernel | str:
    """Average pooling as a depthwise kernel, where that is exact."""
    if kind_of(node) != "avg_pool":
        return f"{describe(node)} is not an average pooling"
    kw = node.kwargs
    info = _channels_and_rank(kw["input"])
    if info is None:
        return f"no recorded shape for the input of {describe(node)}"
    channels, rank = info
    if any(p != 0 for p in kw["padding"]) and not kw["count_include_pad"]:
        return f"{describe(node)} excludes its zero padding from the average (count_include_pad=False)"
    kernel, stride, padding = tuple(kw["kernel_size"]), tuple(kw["stride"]), tuple(kw["padding"])
    in_shape = RuleContext.shape(kw["input"])
    guards: tuple[SizeGuard, ...] = ()
    if kw["ceil_mode"] and any(s > 1 for s in stride):
        # ceil mode adds a partial last window at some sizes: exact only where it adds none
        guard = SizeGuard(f"{describe(node)} uses ceil_mode: its last window must be whole",
                          ceil_pool=Geometry(kernel, stride, padding, (1,) * rank))
        if not guard.holds(in_shape):
            return f"{describe(node)} uses ceil_mode and its last window is partial"
        guards = (guard,)
    divisor = kw.get("divisor_override") or math.prod(kernel)
    device = ctx.device
    weight = torch.full((channels, 1) + kernel, 1.0 / divisor, dtype=torch.float64, device=device)
    return Kernel(weight, torch.zeros(channels, dtype=torch.float64, device=device), stride, padding, (1,) * rank,
                  channels, guards)


def identity_kernel(channels: int, rank: int, device: torch.device | None = None) -> Kernel:
    """``x`` as a 1x1 depthwise kernel of ones."""
    ones = torch.ones((channels, 1) + (1,) * rank, dtype=torch.float64, device=device)
    return Kernel(ones, torch.zeros(channels, dtype=torch.float64, device=device), (1,) * rank, (0,) * rank,
                  (1,) * rank, channels)


def affine_kernel(scale: torch.Tensor, shift: torch.Tensor, rank: int) -> Kernel:
    """``x * scale + shift`` (per channel) as a 1x1 depthwise kernel."""
    channels = scale.numel()
    return Kernel(scale.reshape((channels, 1) + (1,) * rank).to(torch.float64), shift.to(torch.float64),
                  (1,) * rank, (0,) * rank, (1,) * rank, channels)


def align(kernels: list[Kernel], in_size: tuple[int, ...], out_size: tuple[int, ...]) -> list[Kernel] | str:
    """Rewrite ``kernels`` (same input) to share kernel size and padding, keeping each one's map."""
    if len({k.stride for k in kernels}) > 1:
        return "the branches have different strides"
    if len({k.dilation for k in kernels}) > 1:
        kernels = [k.undilated() for k in kernels]
    dilation = kernels[0].dilation
    padding = tuple(max(k.padding[i] for k in kernels) for i in range(kernels[0].ndim))
    offsets = []
    for k in kernels:
        offset = []
        for P, p, d in zip(padding, k.padding, dilation):
            if (P - p) % d:
                return "the branches' kernel centres do not line up on the dilation grid"
            offset.append((P - p) // d)
        offsets.append(tuple(offset))
    size = tuple(max(o[i] + k.size[i] for o, k in zip(offsets, kernels)) for i in range(kernels[0].ndim))
    # n -> (n + c) // s + 1 with c = 2p - d(k - 1) - 1: the branches' output sizes agree at every input
    # size only if they share c (same stride); otherwise they agree at some sizes and broadcast at others
    reach = {tuple(2 * p - d * (n - 1) - 1 for p, d, n in zip(k.padding, k.dilation, k.size)) for k in kernels}
    if len(reach) > 1:
        return "the branches' output sizes agree at this input size only (different padding for their kernel size)"
    aligned = [k.embedded(size, o, padding) for k, o in zip(kernels, offsets)]
    if any(a.output_size(in_size) != tuple(out_size) for a in aligned):
        return "the branches do not read the same input windows (their centres or output sizes differ)"
    return aligned


def _common_groups(kernels: list[Kernel]) -> list[Kernel]:
    groups = {k.groups for k in kernels}
    if len(groups) == 1:
        return kernels
    common = math.gcd(*groups)
    dense = [k.dense() for k in kernels]
    regrouped = [d.regroup(common) for d in dense]
    return regrouped if all(r is not None for r in regrouped) else dense


def sum_kernels(kernels: list[Kernel], in_size: tuple[int, ...], out_size: tuple[int, ...]) -> Kernel | str:
    """One kernel computing the sum of ``kernels`` applied to the same input."""
    aligned = align(kernels, in_size, out_size)
    if isinstance(aligned, str):
        return aligned
    aligned = _common_groups(aligned)
    return replace(aligned[0], weight=sum(k.weight for k in aligned), bias=sum(k.bias for k in aligned),
                   guards=_union(aligned))


def _union(kernels: list[Kernel]) -> tuple[SizeGuard, ...]:
    """The guards of kernels that read the same input."""
    return tuple(dict.fromkeys(g for k in kernels for g in k.guards))


def stack_kernels(kernels: list[Kernel], in_size: tuple[int, ...], out_size: tuple[int, ...]) -> Kernel | str:
    """One kernel whose output channels are those of ``kernels`` (same input) in order."""
    aligned = align(kernels, in_size, out_size)
    if isinstance(aligned, str):
        return aligned
    if len({k.groups for k in aligned}) > 1 or aligned[0].groups != 1:
        aligned = [k.dense() for k in aligned]
    return replace(aligned[0], weight=torch.cat([k.weight for k in aligned]), bias=torch.cat([k.bias for k in aligned]),
                   guards=_union(aligned))


def compose(first: Kernel, second: Kernel) -> Kernel | str:
    """One kernel computing ``second(first(x))``, or why that would not be exact."""
    pointwise_first = (
        all(k == 1 for k in first.size) and all(s == 1 for s in first.stride)
        and all(p == 0 for p in first.padding) and not bool(first.bias.any())
    )
    if any(p != 0 for p in second.padding) and not pointwise_first:
        return (
            f"the second layer zero-pads the first one's output (padding={second.padding}); a merged layer "
            "would see the first layer's response to the border instead of zeros"
        )
    w1, w2 = first.dense().weight, second.dense().weight
    s1, d1, d2 = first.stride, first.dilation, second.dilation
    k1, k2 = first.size, second.size
    size = tuple(s * e * (b - 1) + a * (c - 1) + 1 for s, e, b, a, c in zip(s1, d2, k2, d1, k1))
    merged = w2.new_zeros((w2.shape[0], w1.shape[1]) + size)
    for tap in itertools.product(*(range(k) for k in k2)):
        start = [s * e * j for s, e, j in zip(s1, d2, tap)]
        index = (slice(None), slice(None)) + tuple(
            slice(b, b + a * (c - 1) + 1, a) for b, a, c in zip(start, d1, k1)
        )
        w2_tap = w2[(slice(None), slice(None)) + tap]
        merged[index] += torch.einsum("ab,bc...->ac...", w2_tap, w1)
    bias = second.bias + w2.sum(dim=tuple(range(2, w2.dim()))) @ first.bias
    padding = second.padding if pointwise_first else first.padding
    stride = tuple(a * b for a, b in zip(s1, second.stride))
    guards = first.guards + tuple(g.after(first.geometry) for g in second.guards)
    result = Kernel(merged, bias, stride, padding, (1,) * len(size), 1, guards)
    groups = math.gcd(first.groups, second.groups)
    return result.regroup(groups) or result


def emit_conv(ctx: RuleContext, kernel: Kernel, x: fx.Node, like: fx.Node, hint: str,
              like_weight: fx.Node) -> fx.Node:
    """Insert ``conv(x)`` for ``kernel``, storing tensors in the dtype/device of ``like_weight``."""
    target = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[kernel.ndim]
    stored = ctx.stored(like_weight)
    weight = ctx.add_tensor(f"{hint}_weight", kernel.weight, stored)
    bias = ctx.add_tensor(f"{hint}_bias", kernel.bias, stored)
    for guard in kernel.guards:
        ctx.guard(x, guard)
    return ctx.call(target, like=like, input=x, weight=weight, bias=bias, stride=kernel.stride,
                    padding=kernel.padding, dilation=kernel.dilation, groups=kernel.groups)
