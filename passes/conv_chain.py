r"""Chains of linear layers with nothing non-linear between them become one layer.

Convolutions (average pooling counts as a depthwise convolution, see ``_kernel``)::

    conv2(conv1(x)) = conv(x; M, b)
    M[c2, c0, s1*d2*j + d1*i] = sum_{c1} W2[c2, c1, j] W1[c1, c0, i],   b = b2 + sum_{c1, j} W2[c2, c1, j] b1[c1]
    stride s1*s2, padding p1, kernel s1*d2*(k2-1) + d1*(k1-1) + 1

exact when conv2 has no padding, or conv1 is an unpadded, bias-free 1x1 with stride 1 (then the padding
moves to the merged layer unchanged). Grouped layers stay grouped (gcd of the two group counts) when the
merged weight is block-diagonal. Linear layers::

    L2(L1(x)) = (W2 W1) x + (W2 b1 + b2)
    L(flatten(conv(x))) = (W_L W_c') flatten(x) + (W_L b_c + b_L)    when conv covers its whole input
                                                                    (output 1x1, no padding; W_c' = W_c as a matrix)

Merging can cost more than it saves (a 1x1 reduce followed by a 3x3 is cheaper than the merged 3x3 on the
full width), so every rule here is gated by the pipeline's cost model.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxrebirth.graph.ops import kind_of
from fxrebirth.rewrite.rules import Match, Rule, RuleContext, by_phase, describe, name_hint, producer, users_of

from ._kernel import Kernel, compose, emit_conv, kernel_of_avg_pool, kernel_of_conv, layer_tensors

__all__ = ["MergeConvChain", "MergeLinearChain", "MergeFlattenedConvIntoLinear", "rules"]

_STAGES = ("conv", "avg_pool")


def _kernel(node: fx.Node, ctx: RuleContext) -> Kernel | str:
    return kernel_of_conv(node, ctx) if kind_of(node) == "conv" else kernel_of_avg_pool(node, ctx)


def _single_user(node: fx.Node) -> str | None:
    if len(users_of(node)) > 1:
        return f"the output of {describe(node)} has {len(users_of(node))} users; merging would duplicate it"
    return None


class MergeConvChain(Rule):
    """Two consecutive linear stages (convolutions, or a convolution and an average pooling) as one
    convolution whose kernel is the composition of theirs. Refused when the second pads (its zeros would
    see the first's bias and neighbours) unless the first is a bias-free unpadded stride-1 1x1, and when
    the first's output has another user. Gated: a composed kernel can cost more than the two."""

    name = "merge_conv_chain"
    identity = "conv2(conv1(x)) = conv(x; W2 * W1, b2 + W2 b1), stride s1*s2"  # * : kernel composition
    gated = True

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        first = producer(node, *_STAGES) if kind_of(node) in _STAGES else None
        if first is None or "conv" not in (kind_of(first), kind_of(node)):
            return None
        return Match(output=node, inputs=(first.kwargs["input"],), nodes=(first, node), bindings={"first": first})

    def _merged(self, match: Match, ctx: RuleContext) -> Kernel | str:
        """The composed kernel (computed once per match: check decides with it, rewrite emits it)."""
        return match.computed("merged", lambda: self._compose(match, ctx))

    @staticmethod
    def _compose(match: Match, ctx: RuleContext) -> Kernel | str:
        k1, k2 = _kernel(match["first"], ctx), _kernel(match.output, ctx)
        for k in (k1, k2):
            if isinstance(k, str):
                return k
        return compose(k1, k2)

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        reason = _single_user(match["first"])
        if reason:
            return reason
        merged = self._merged(match, ctx)
        return merged if isinstance(merged, str) else None

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        first, second = match["first"], match.output
        conv = first if kind_of(first) == "conv" else second
        return emit_conv(ctx, self._merged(match, ctx), first.kwargs["input"], like=second,
                         hint=name_hint(conv), like_weight=conv.kwargs["weight"])


def _emit_linear(ctx: RuleContext, weight: torch.Tensor, bias: torch.Tensor, x: fx.Node, like: fx.Node) -> fx.Node:
    stored = ctx.stored(like.kwargs["weight"])
    w = ctx.add_tensor(f"{name_hint(like)}_weight", weight, stored)
    b = ctx.add_tensor(f"{name_hint(like)}_bias", bias, stored)
    return ctx.call(F.linear, like=like, input=x, weight=w, bias=b)


class MergeLinearChain(Rule):
    """Two consecutive Linear layers as one, when the first's output has no other user. Gated: the product
    ``W2 W1`` is larger than the two when the middle dimension is the smallest."""

    name = "merge_linear_chain"
    identity = "L2(L1(x)) = (W2 W1) x + (W2 b1 + b2)"
    gated = True

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        first = producer(node, "linear") if kind_of(node) == "linear" else None
        if first is None:
            return None
        return Match(output=node, inputs=(first.kwargs["input"],), nodes=(first, node), bindings={"first": first})

    @staticmethod
    def _tensors(match: Match, ctx: RuleContext) -> list:
        return match.computed("tensors", lambda: [layer_tensors(layer, ctx) for layer in (match["first"], match.output)])

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        reason = _single_user(match["first"])
        return reason or next((t for t in self._tensors(match, ctx) if isinstance(t, str)), None)

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        (w1, b1), (w2, b2) = self._tensors(match, ctx)
        return _emit_linear(ctx, w2 @ w1, w2 @ b1 + b2, match["first"].kwargs["input"], match.output)


class MergeFlattenedConvIntoLinear(Rule):
    """A convolution whose kernel covers its whole input (padding 0, output 1x1), flattened and fed to a
    Linear layer: the two are one Linear on the flattened input (the head of a network after
    :class:`~fxrebirth.passes.pooling.CommuteGlobalPool`). Gated."""

    name = "merge_flattened_conv_into_linear"
    identity = "L(flatten(conv(x))) = (W_L W_c) flatten(x) + (W_L b_c + b_L) for a conv covering its whole input"
    gated = True

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        flat = producer(node, "flatten") if kind_of(node) == "linear" else None
        if flat is None or flat.kwargs["start_dim"] != 1 or flat.kwargs["end_dim"] != -1:
            return None
        conv = producer(flat, "conv")
        if conv is None:
            return None
        return Match(output=node, inputs=(conv.kwargs["input"],), nodes=(conv, flat, node),
                     bindings={"conv": conv, "flatten": flat})

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        conv, flat = match["conv"], match["flatten"]
        reason = _single_user(conv) or _single_user(flat)
        if reason:
            return reason
        kernel = match.computed("kernel", lambda: kernel_of_conv(conv, ctx))
        if isinstance(kernel, str):
            return kernel
        in_shape = ctx.shape(conv.kwargs["input"])
        kernel = kernel.undilated()
        if any(p != 0 for p in kernel.padding) or tuple(in_shape[2:]) != kernel.size:
            return f"{describe(conv)} does not cover exactly its whole input (padding 0, kernel = input size)"
        tensors = match.computed("linear", lambda: layer_tensors(match.output, ctx))
        return tensors if isinstance(tensors, str) else None

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        conv = match["conv"]
        kernel = match.computed("kernel", lambda: kernel_of_conv(conv, ctx)).undilated().dense()
        w_l, b_l = match.computed("linear", lambda: layer_tensors(match.output, ctx))
        w_c = kernel.weight.reshape(kernel.out_channels, -1)
        flat = ctx.call(torch.flatten, input=conv.kwargs["input"], start_dim=1, end_dim=-1)
        ctx.set_shape(flat, (ctx.shape(conv.kwargs["input"])[0], w_c.shape[1]), conv.meta["tensor_meta"].dtype)
        return _emit_linear(ctx, w_l @ w_c, w_l @ kernel.bias + b_l, flat, match.output)


def rules(phase: str | None = None) -> list[Rule]:
    """The chain-merging rules, in the order they run: all in the phase ``chains`` of
    :data:`fxrebirth.rewrite.rules.PHASES` (``phase`` names another: none)."""
    return by_phase({"chains": [MergeConvChain(), MergeLinearChain(), MergeFlattenedConvIntoLinear()]}, phase)
