r"""Cleanup: operations that compute their input unchanged.

    dropout(x, training=False) = x          Identity(x) = x
    x + 0 = 0 + x = x - 0 = x * 1 = 1 * x = x / 1 = x     (Python numbers; the result keeps x's dtype and shape)
    flatten(x, a, b) = x        when dims a..b of x are one dimension (a == b after normalisation)
    reshape(x, shape) = x       when every entry of shape is x.size(i) for its own position i, or a
                                literal equal to that size for i > 0, or -1 with all others matching;
                                a literal holds only where x has that size: a size guard says so
                                (none where capture proved that size static, fxrebirth.graph.metadata)

    cat([y[:, a:b], y[:, b:c]], dim=1) = y[:, a:c]   (= y when the slices cover all of y's channels)

The reshape identity holds for every batch size: the batch entry must be ``x.size(0)`` or ``-1``, never
a literal that only matches the example input. A literal in another position matches the example's
size, not necessarily every size: the rewrite records a guard (:mod:`fxrebirth.graph.guards`) that raises at
sizes where the reshape would not be the identity. Dead code is removed by the pipeline after every pass.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from fxrebirth.graph.guards import SizeGuard
from fxrebirth.graph.metadata import SYMBOLIC_KEY
from fxrebirth.graph.ops import kind_of
from fxrebirth.rewrite.rules import Match, Rule, RuleContext, by_phase, describe

__all__ = ["RemoveDropout", "RemoveIdentity", "RemoveNeutralArithmetic", "RemoveNoopReshape", "CollapseCatOfSlices",
           "rules"]


class _Passthrough(Rule):
    """Base: replace a node by its input."""

    changes_parameters = False

    def source(self, node: fx.Node, ctx: RuleContext) -> fx.Node | None:
        raise NotImplementedError

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        x = self.source(node, ctx)
        if not isinstance(x, fx.Node):
            return None
        return Match(output=node, inputs=(x,), nodes=(node,), bindings={"x": x})

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        return match["x"]


class RemoveDropout(_Passthrough):
    """An eval-mode dropout is the identity; one in training mode is refused (it draws a random mask)."""

    name = "remove_dropout"
    identity = "dropout(x, training=False) = x"

    def source(self, node: fx.Node, ctx: RuleContext) -> fx.Node | None:
        return node.kwargs["input"] if kind_of(node) == "dropout" else None

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        if match.output.kwargs["training"]:
            return "dropout is in training mode (model.train()); call model.eval() to remove it"
        return None


class RemoveIdentity(_Passthrough):
    """A call of an ``nn.Identity`` module (exactly that type: a subclass may override ``forward``)."""

    name = "remove_identity"
    identity = "Identity(x) = x"

    def source(self, node: fx.Node, ctx: RuleContext) -> fx.Node | None:
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            if type(ctx.gm.get_submodule(node.target)) is nn.Identity:
                return node.args[0]
        return None


_NEUTRAL = {operator.add: (0, 0), operator.sub: (0, None), operator.mul: (1, 1), operator.truediv: (1, None)}
"""For each operator, the number that leaves a tensor unchanged on its right and on its left."""


class RemoveNeutralArithmetic(_Passthrough):
    """``x + 0``, ``x * 1`` and friends, as models write them (MobileOne's ``0 + identity(x)`` when a block
    has no scale branch). Exact: ``x + 0`` equals ``x`` for every float (``-0.0 + 0`` is ``+0.0``, the same
    number), and the check that the result keeps ``x``'s recorded dtype and shape rules out promotion
    (``int_tensor + 0.0``) and broadcasting."""

    name = "remove_neutral_arithmetic"
    identity = "x + 0 = 0 + x = x - 0 = x * 1 = 1 * x = x / 1 = x"

    def source(self, node: fx.Node, ctx: RuleContext) -> fx.Node | None:
        if node.op != "call_function" or node.target not in _NEUTRAL or len(node.args) != 2 or node.kwargs:
            return None
        right, left = _NEUTRAL[node.target]
        a, b = node.args
        for x, number, neutral in ((a, b, right), (b, a, left)):
            if isinstance(x, fx.Node) and neutral is not None and type(number) in (int, float) and number == neutral:
                return x
        return None

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        node, x = match.output, match["x"]
        mine, theirs = node.meta.get("tensor_meta"), x.meta.get("tensor_meta")
        if mine is None or theirs is None or not hasattr(mine, "shape") or not hasattr(theirs, "shape"):
            return f"no shape recorded for {describe(x)}"
        if (mine.shape, mine.dtype) != (theirs.shape, theirs.dtype):
            return f"the result's dtype or shape differs from {describe(x)}'s (type promotion or broadcasting)"
        return None


def _size_of(entry: object, x: fx.Node, dim: int) -> bool:
    """Is ``entry`` the graph value ``x.size(dim)`` (or ``x.shape[dim]``)?"""
    if not isinstance(entry, fx.Node):
        return False
    if (entry.op == "call_method" and entry.target == "size") or entry.target is torch.ops.aten.sym_size.int:
        args = tuple(entry.args) + tuple(entry.kwargs.values())
        return len(args) == 2 and args[0] is x and args[1] == dim
    if entry.op == "call_function" and entry.target is operator.getitem:
        shape, index = entry.args
        return (
            isinstance(shape, fx.Node) and shape.op == "call_function" and shape.target is getattr
            and shape.args == (x, "shape") and index == dim
        )
    return False


class RemoveNoopReshape(_Passthrough):
    """A ``flatten`` over dimensions that are one dimension, and a ``reshape``/``view`` to ``x``'s own shape
    at every batch size: each entry is ``x.size(i)``, a single ``-1``, or a literal equal to dim ``i > 0``
    (guarded, since it holds at the example's size only). A literal batch entry is kept: it is not a
    no-op at another batch size."""

    name = "remove_noop_reshape"
    identity = "flatten(x, a, b) = x and reshape(x, shape) = x where x keeps its shape at every batch size"

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        node, x = match.output, match["x"]
        if kind_of(node) == "reshape":
            shape = ctx.shape(x)
            symbolic = x.meta.get(SYMBOLIC_KEY)  # a size capture proved static needs no guard
            literal = [i for i, entry in enumerate(node.kwargs["shape"])
                       if i > 0 and isinstance(entry, int) and entry != -1
                       and not (symbolic is not None and symbolic[i] == str(entry))]
            if literal:
                ctx.guard(x, SizeGuard(f"{describe(node)} reshapes to literal sizes", equals_dims=tuple(literal),
                                       equals=tuple(shape[i] for i in literal)))
        return x

    def source(self, node: fx.Node, ctx: RuleContext) -> fx.Node | None:
        kind = kind_of(node)
        if kind not in ("flatten", "reshape"):
            return None
        x = node.kwargs["input"]
        shape = ctx.shape(x)
        if not isinstance(x, fx.Node) or shape is None:
            return None
        rank = len(shape)
        if kind == "flatten":
            start, end = (d % rank if rank else 0 for d in (node.kwargs["start_dim"], node.kwargs["end_dim"]))
            return x if start == end else None
        target = node.kwargs["shape"]
        if not isinstance(target, (tuple, list)) or len(target) != rank:
            return None
        matching = [
            _size_of(entry, x, i) or (i > 0 and isinstance(entry, int) and entry == shape[i])
            for i, entry in enumerate(target)
        ]
        wildcards = [i for i, entry in enumerate(target) if isinstance(entry, int) and entry == -1]
        if all(matching) or (len(wildcards) == 1 and sum(matching) == rank - 1):
            return x
        return None


def _slice_of(node: object) -> tuple[fx.Node, int, int] | None:
    """``(y, start, length)`` for ``narrow(y, 1, start, length)``."""
    if kind_of(node) != "narrow" or node.kwargs["dim"] != 1 or not isinstance(node.kwargs["input"], fx.Node):
        return None
    return node.kwargs["input"], node.kwargs["start"], node.kwargs["length"]


class CollapseCatOfSlices(Rule):
    """A concatenation along channels of consecutive ``narrow`` slices of one tensor, as
    :class:`~fxrebirth.passes.branches.MergeSiblingConvs` leaves them when the siblings were concatenated:
    the slices' union is one slice, or the tensor itself. Other slicing forms are not matched."""

    name = "collapse_cat_of_slices"
    identity = "cat([narrow(y, 1, a, b - a), narrow(y, 1, b, c - b)], 1) = narrow(y, 1, a, c - a) (= y when it covers all channels)"
    changes_parameters = False

    @staticmethod
    def _run(tensors: list) -> tuple[int, int] | None:
        for i in range(len(tensors) - 1):
            j = i + 1
            while j < len(tensors):
                a, b = _slice_of(tensors[j - 1]), _slice_of(tensors[j])
                if a is None or b is None or a[0] is not b[0] or a[1] + a[2] != b[1]:
                    break
                j += 1
            if j - i >= 2:
                return i, j
        return None

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        if kind_of(node) != "cat" or not isinstance(node.kwargs["tensors"], (list, tuple)):
            return None
        shape = ctx.shape(node)
        if shape is None or node.kwargs["dim"] % len(shape) != 1:
            return None
        run = self._run(list(node.kwargs["tensors"]))
        if run is None:
            return None
        tensors = node.kwargs["tensors"]
        y = _slice_of(tensors[run[0]])[0]
        others = [t for t in tensors[:run[0]] + tensors[run[1]:] if isinstance(t, fx.Node)]
        return Match(output=node, inputs=tuple(dict.fromkeys([y] + others)), nodes=(node,),
                     bindings={"run": run, "y": y})

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        node, y = match.output, match["y"]
        i, j = match["run"]
        tensors = list(node.kwargs["tensors"])
        start = _slice_of(tensors[i])[1]
        length = sum(_slice_of(t)[2] for t in tensors[i:j])
        if start == 0 and length == ctx.shape(y)[1]:
            piece = y
        else:
            piece = ctx.call(torch.narrow, input=y, dim=1, start=start, length=length)
            shape = list(ctx.shape(y))
            shape[1] = length
            ctx.set_shape(piece, tuple(shape), y.meta["tensor_meta"].dtype)
        rest = tensors[:i] + [piece] + tensors[j:]
        if len(rest) == 1:
            return piece
        return ctx.call(torch.cat, like=node, tensors=rest, dim=node.kwargs["dim"])


def rules(phase: str | None = None) -> list[Rule]:
    """The cleanup rules, in the order they run: all in the phase ``cleanup`` of
    :data:`fxrebirth.rewrite.rules.PHASES` (``phase`` names another: none)."""
    return by_phase({"cleanup": [RemoveDropout(), RemoveIdentity(), RemoveNeutralArithmetic(), RemoveNoopReshape(),
                                 CollapseCatOfSlices()]}, phase)
