r"""Pooling and padding rewrites.

Explicit zero padding folds into the convolution that reads it (per dimension, symmetric pads only,
since a convolution pads both sides alike)::

    conv(pad(x, (p, p), value=0), padding=q) = conv(x, padding=q + p)

Global average pooling commutes with an unpadded, stride-1 1x1 convolution (both are linear, and the
bias is constant over positions), which then runs on one position instead of H x W::

    mean_hw(conv1x1(x)) = conv1x1(mean_hw(x))

A ceil-mode max pooling whose last window is partial can be written in floor mode after padding the
end of each such dimension with -inf (the lowering :class:`PadCeilMaxPool`, for runtimes that refuse a
window wider than its padded input; exact at the input size it was made for, guarded elsewhere)::

    max_pool(x, k, s, p, ceil_mode=True) = max_pool(pad_end(x, e, value=-inf), k, s, p, ceil_mode=False)

Average pooling as a convolution is not a rule of its own: the chain and branch rules treat an
average pooling next to a convolution as a depthwise kernel (see ``_kernel``). The other direction of the
commutation (a Linear after global pooling, moved before it) is never cheaper, so it is not offered.
"""

from __future__ import annotations

import math

import torch.fx as fx
import torch.nn.functional as F

from fxrebirth.graph.guards import SizeGuard
from fxrebirth.graph.ops import kind_of
from fxrebirth.rewrite.rules import Match, Rule, RuleContext, by_phase, describe, producer, users_of

__all__ = ["FoldPadIntoConv", "CommuteGlobalPool", "PadCeilMaxPool", "rules", "lowering_rules"]


class FoldPadIntoConv(Rule):
    """A zero constant pad of the spatial dimensions, the same on both sides, moved into the following
    convolution's own padding; asymmetric, non-zero, reflect/replicate pads and pads of the batch or
    channel dimensions are refused."""

    name = "fold_pad_into_conv"
    identity = "conv(pad(x, p, value=0), padding=q) = conv(x, padding=q + p) for symmetric p"
    changes_parameters = False

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        pad = producer(node, "pad") if kind_of(node) == "conv" else None
        if pad is None:
            return None
        return Match(output=node, inputs=(pad.kwargs["input"],), nodes=(pad, node), bindings={"pad": pad})

    def _padding(self, match: Match) -> tuple[int, ...] | str:
        pad, conv = match["pad"], match.output
        kw = pad.kwargs
        if kw["mode"] != "constant" or (kw["value"] not in (None, 0, 0.0)):
            return f"{describe(pad)} pads with mode={kw['mode']!r}, value={kw['value']!r}, not zeros"
        if len(users_of(pad)) > 1:
            return f"the output of {describe(pad)} has {len(users_of(pad))} users"
        if isinstance(conv.kwargs["padding"], str):
            return f"{describe(conv)} has padding={conv.kwargs['padding']!r}"
        ndim = len(conv.kwargs["padding"])
        amounts = list(kw["pad"]) + [0] * (2 * ndim - len(kw["pad"]))
        if len(amounts) > 2 * ndim:
            return f"{describe(pad)} pads the batch or channel dimension"
        per_dim = []  # F.pad lists the last dimension first
        for i in range(ndim):
            left, right = amounts[2 * (ndim - 1 - i)], amounts[2 * (ndim - 1 - i) + 1]
            if left != right or left < 0:
                return f"{describe(pad)} pads asymmetrically ({left}, {right}); a convolution pads both sides alike"
            per_dim.append(left)
        return tuple(p + q for p, q in zip(conv.kwargs["padding"], per_dim))

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        padding = match.computed("padding", lambda: self._padding(match))
        return padding if isinstance(padding, str) else None

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        conv = match.output
        kwargs = dict(conv.kwargs, input=match.inputs[0], padding=match.computed("padding", lambda: self._padding(match)))
        return ctx.call(conv.target, like=conv, **kwargs)


class CommuteGlobalPool(Rule):
    """Global average pooling moved before an unpadded stride-1 1x1 convolution, which then runs on a 1x1
    map (and :class:`~fxrebirth.passes.conv_chain.MergeFlattenedConvIntoLinear` can merge it into a
    following Linear). Gated: it only pays where the pooled map is large."""

    name = "commute_global_pool"
    identity = "mean_hw(conv1x1(x)) = conv1x1(mean_hw(x)) for stride 1, padding 0"
    changes_parameters = False
    gated = True

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        if kind_of(node) != "adaptive_avg_pool" or tuple(node.kwargs["output_size"]) != (1, 1):
            return None
        conv = producer(node, "conv")
        if conv is None:
            return None
        return Match(output=node, inputs=(conv.kwargs["input"],), nodes=(conv, node), bindings={"conv": conv})

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        conv = match["conv"]
        weight = ctx.shape(conv.kwargs["weight"])
        kw = conv.kwargs
        if weight is None or any(k != 1 for k in weight[2:]) or any(s != 1 for s in kw["stride"]) \
                or isinstance(kw["padding"], str) or any(p != 0 for p in kw["padding"]):
            return f"{describe(conv)} is not an unpadded stride-1 1x1 convolution"
        if len(users_of(conv)) > 1:
            return f"the output of {describe(conv)} has {len(users_of(conv))} users"
        return None

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        conv, x = match["conv"], match.inputs[0]
        pooled = ctx.call(F.adaptive_avg_pool2d, input=x, output_size=(1, 1))
        shape = ctx.shape(x)
        ctx.set_shape(pooled, (shape[0], shape[1], 1, 1), x.meta["tensor_meta"].dtype)
        return ctx.call(conv.target, like=match.output, **dict(conv.kwargs, input=pooled))


def _ceil_extra(n: int, k: int, s: int, p: int, d: int) -> int:
    """The -inf positions to append to a dimension of ``n`` so that floor-mode pooling gives the windows of
    PyTorch's ceil mode (0 when the last window is whole)."""
    span = n + 2 * p - d * (k - 1) - 1
    out = (span + s - 1) // s + 1
    if (out - 1) * s >= n + p:  # PyTorch drops a last window that starts in the right padding
        out -= 1
    return max(0, (out - 1) * s + d * (k - 1) + 1 - (n + 2 * p))


class PadCeilMaxPool(Rule):
    """A 2-D ceil-mode max pooling with a partial last window, written in floor mode after padding the
    end of each such dimension with -inf. A lowering, not an optimisation (it is not among :func:`rules`):
    OpenVINO refuses a ceil-mode window wider than its padded input, which the Caffe GoogLeNet has at
    32x32. The padding depends on the input size, so the rewrite is guarded to it. ``return_indices`` (the
    indices would count the padding) and average pooling (whose divisor would count it) are refused."""

    name = "pad_ceil_max_pool"
    identity = "max_pool(x, k, s, p, ceil_mode=True) = max_pool(pad_end(x, e, -inf), k, s, p) at the traced size"
    changes_parameters = False

    def __init__(self, wider_only: bool = False) -> None:
        self.wider_only = wider_only  # only where a window is wider than the padded input (OpenVINO's refusal)

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        if kind_of(node) != "max_pool" or node.target is not F.max_pool2d or not node.kwargs["ceil_mode"]:
            return None
        return Match(output=node, inputs=(node.kwargs["input"],), nodes=(node,))

    def _extra(self, match: Match, ctx: RuleContext) -> tuple[int, ...] | str:
        kw, shape = match.output.kwargs, ctx.shape(match.inputs[0])
        if kw["return_indices"]:
            return f"{describe(match.output)} returns indices, which the padding would shift"
        if shape is None:
            return f"the input of {describe(match.output)} has no recorded shape"
        stride = kw["stride"] or kw["kernel_size"]
        dims = list(zip(shape[2:], kw["kernel_size"], stride, kw["padding"], kw["dilation"]))
        if self.wider_only and not any(d * (k - 1) + 1 > n + 2 * p for n, k, _, p, d in dims):
            return f"every window of {describe(match.output)} fits in its padded input"
        extra = tuple(_ceil_extra(*dim) for dim in dims)
        return extra if any(extra) else f"{describe(match.output)} has no partial window at this size"

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        extra = match.computed("extra", lambda: self._extra(match, ctx))
        return extra if isinstance(extra, str) else None

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        pool, x = match.output, match.inputs[0]
        (eh, ew), shape = match.computed("extra", lambda: self._extra(match, ctx)), ctx.shape(x)
        ctx.guard(x, SizeGuard(f"{describe(pool)} was padded for a {shape[2]}x{shape[3]} input",
                               equals_dims=(2, 3), equals=(shape[2], shape[3])))
        padded = ctx.call(F.pad, input=x, pad=(0, ew, 0, eh), mode="constant", value=-math.inf)
        ctx.set_shape(padded, (*shape[:2], shape[2] + eh, shape[3] + ew), x.meta["tensor_meta"].dtype)
        return ctx.call(pool.target, like=pool, **dict(pool.kwargs, input=padded, ceil_mode=False))


def lowering_rules(wider_only: bool = False) -> list[Rule]:
    """Exact rewrites a runtime needs, not speed: :class:`PadCeilMaxPool` (``wider_only``: only the
    poolings with a window wider than their padded input)."""
    return [PadCeilMaxPool(wider_only)]


def rules(phase: str | None = None) -> list[Rule]:
    """The pooling/padding rules, in the order they run: all in the phase ``pooling`` of
    :data:`fxrebirth.rewrite.rules.PHASES` (``phase`` names another: none)."""
    return by_phase({"pooling": [FoldPadIntoConv(), CommuteGlobalPool()]}, phase)
