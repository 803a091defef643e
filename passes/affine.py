r"""Constant per-channel scale and shift folding.

Arithmetic with a constant ``c`` (a tensor attribute or a number) is a per-channel affine map when ``c``
varies along at most one dimension and does not broadcast ``x`` to a larger shape::

    x * c = x * c + 0      x + c = x * 1 + c      x - c = x * 1 + (-c)
    c - x = x * (-1) + c   x / c = x * (1 / c)    (refused when c has zeros)

Such a map folds into the conv / conv-transpose / linear layer before it, or the conv / linear layer
after it, by the identities of :mod:`fxrebirth.passes._fold`:

    s * (W x + b) + t = (s W) x + (s b + t)          W (s * x + t) + b = (W diag(s)) x + (b + W t)

A shift before a zero-padded convolution is refused (the padding would see 0, not the shift), and so
is a constant whose dtype would promote the result (``float32 * float64`` is ``float64``).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxrebirth.rewrite.rules import Rule, RuleContext, by_phase, describe

from ._fold import Affine, FoldIntoFollowing, FoldIntoPreceding

__all__ = ["ConstantAffineSource", "rules"]

_OPS = (operator.mul, operator.add, operator.sub, operator.truediv)


def _activation_and_constant(node: fx.Node) -> tuple[fx.Node, object, bool] | None:
    """``(x, c, constant_is_left)`` for a binary op with exactly one graph-computed operand."""
    if node.op != "call_function" or node.target not in _OPS or len(node.args) != 2 or node.kwargs:
        return None
    left, right = node.args
    left_is_value = isinstance(left, fx.Node) and left.op != "get_attr"
    right_is_value = isinstance(right, fx.Node) and right.op != "get_attr"
    if left_is_value == right_is_value:
        return None
    return (left, right, False) if left_is_value else (right, left, True)


class ConstantAffineSource:
    """Recognises ``mul/add/sub/truediv`` nodes with one constant operand."""

    def input_of(self, node: fx.Node) -> fx.Node | None:
        found = _activation_and_constant(node)
        if found is None:
            return None
        x, _, constant_left = found
        if node.target is operator.truediv and constant_left:
            return None  # c / x is not affine in x
        return x

    def affine(self, node: fx.Node, ctx: RuleContext) -> Affine | str:
        x, c_value, constant_left = _activation_and_constant(node)
        c = ctx.constant(c_value)
        if c is None:
            return f"the operand {c_value} of {describe(node)} is not a constant"
        out_meta, x_meta = node.meta.get("tensor_meta"), x.meta.get("tensor_meta")
        if out_meta is None or x_meta is None:
            return f"no recorded shape for {describe(node)}"
        if tuple(out_meta.shape) != tuple(x_meta.shape):
            return f"the constant of {describe(node)} broadcasts its input to a larger shape"
        if out_meta.dtype != x_meta.dtype:
            return f"the constant of {describe(node)} changes the dtype ({x_meta.dtype} -> {out_meta.dtype})"
        c = c.to(torch.float64)
        rank = len(x_meta.shape)
        if node.target is operator.mul:
            return Affine(c, None, rank)
        if node.target is operator.add:
            return Affine(None, c, rank)
        if node.target is operator.sub:
            return Affine(-torch.ones_like(c), c, rank) if constant_left else Affine(None, -c, rank)
        if bool((c == 0).any()):
            return f"{describe(node)} divides by a constant that has zeros"
        return Affine(1.0 / c, None, rank)


def rules(phase: str | None = None) -> list[Rule]:
    """The constant scale/shift folding rules, phase by phase (:data:`fxrebirth.rewrite.rules.PHASES`), or
    one ``phase``'s."""
    source = ConstantAffineSource()
    return by_phase({"preceding": [FoldIntoPreceding("affine_into_preceding", source, "constant scale/shift")],
                     "following": [FoldIntoFollowing("affine_into_following", source, "constant scale/shift")]}, phase)
