r"""Cleanup: operations that compute their input unchanged.

    dropout(x, training=False) = x          Identity(x) = x
    flatten(x, a, b) = x        when dims a..b of x are one dimension (a == b after normalisation)
    reshape(x, shape) = x       when every entry of shape is x.size(i) for its own position i, or a
                                literal equal to that size for i > 0, or -1 with all others matching

The reshape identity holds for every batch size: the batch entry must be ``x.size(0)`` or ``-1``, never
a literal that only matches the example input. Dead code is removed by the pipeline after every pass.
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn

from fxrebirth.ops import kind_of
from fxrebirth.rules import Match, Rule, RuleContext

__all__ = ["RemoveDropout", "RemoveIdentity", "RemoveNoopReshape", "rules"]


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
    name = "remove_dropout"
    identity = "dropout(x, training=False) = x"

    def source(self, node: fx.Node, ctx: RuleContext) -> fx.Node | None:
        return node.kwargs["input"] if kind_of(node) == "dropout" else None

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        if match.output.kwargs["training"]:
            return "dropout is in training mode (model.train()); call model.eval() to remove it"
        return None


class RemoveIdentity(_Passthrough):
    name = "remove_identity"
    identity = "Identity(x) = x"

    def source(self, node: fx.Node, ctx: RuleContext) -> fx.Node | None:
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            if type(ctx.gm.get_submodule(node.target)) is nn.Identity:
                return node.args[0]
        return None


def _size_of(entry: object, x: fx.Node, dim: int) -> bool:
    """Is ``entry`` the graph value ``x.size(dim)`` (or ``x.shape[dim]``)?"""
    if not isinstance(entry, fx.Node):
        return False
    if entry.op == "call_method" and entry.target == "size":
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
    name = "remove_noop_reshape"
    identity = "flatten/reshape that keeps the shape = identity, for every batch size"

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


def rules() -> list[Rule]:
    """The cleanup rules, in the order they should run."""
    return [RemoveDropout(), RemoveIdentity(), RemoveNoopReshape()]
