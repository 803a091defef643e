r"""Pooling and padding rewrites.

Explicit zero padding folds into the convolution that reads it (per dimension, symmetric pads only,
since a convolution pads both sides alike)::

    conv(pad(x, (p, p), value=0), padding=q) = conv(x, padding=q + p)

Global average pooling commutes with an unpadded, stride-1 1x1 convolution (both are linear, and the
bias is constant over positions), which then runs on one position instead of H x W::

    mean_hw(conv1x1(x)) = conv1x1(mean_hw(x))

Average pooling as a convolution is not a rule of its own: the chain and branch rules treat an
average pooling next to a convolution as a depthwise kernel (see ``_kernel``). The other direction of the
commutation (a Linear after global pooling, moved before it) is never cheaper, so it is not offered.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from fxrebirth.graph.ops import kind_of
from fxrebirth.rewrite.rules import Match, Rule, RuleContext, describe, producer, users_of

__all__ = ["FoldPadIntoConv", "CommuteGlobalPool", "rules"]


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


def rules() -> list[Rule]:
    """The pooling/padding rules, in the order they should run."""
    return [FoldPadIntoConv(), CommuteGlobalPool()]
