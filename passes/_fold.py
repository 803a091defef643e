r"""Shared machinery of the folding families: a per-channel affine map folded into a layer.

An *affine-like* node computes ``y = x * s + t`` with ``s`` and ``t`` constant along every dimension
but one (the channel dimension). BatchNorm in eval mode is one (``s = g / sqrt(v + eps)``,
``t = beta - m * s``); so are ``x * c``, ``x + c``, ``x - c``, ``c - x`` and ``x / c`` for a constant
``c``. Both families (``batchnorm`` and ``affine``) differ only in how they *extract* ``(s, t)``; the
folding identities are the same and live here:

Folded into the PRECEDING layer ``L(x) = W * x + b`` (per output channel ``o``)::

    s[o] * (W x + b)[o] + t[o]  =  (s[o] W[o]) x + (s[o] b[o] + t[o])

Folded into the FOLLOWING layer (per input channel ``i``)::

    W (s * x + t) + b  =  (W diag(s)) x + (b + W t)

The second identity holds for a convolution only when every output position sees every input
channel's shift the same number of times, i.e. the convolution has no zero padding (or ``t = 0``):
zero padding would otherwise see ``0`` where the original saw ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.fx as fx

from fxrebirth.graph.ops import kind_of
from fxrebirth.rewrite.rules import Match, Rule, RuleContext, describe, name_hint, users_of

from ._kernel import layer_tensors

__all__ = ["Affine", "AffineSource", "FoldIntoPreceding", "FoldIntoFollowing", "channel_dim"]

LAYER_KINDS = ("conv", "conv_transpose", "linear")


@dataclass(frozen=True)
class Affine:
    """``y = x * scale + shift``; ``scale``/``shift`` are float64 tensors broadcast against ``x``
    (``None`` means 1 and 0). ``rank`` is the rank of ``x``."""

    scale: torch.Tensor | None
    shift: torch.Tensor | None
    rank: int

    def per_channel(self, dim: int, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(s, t)`` as vectors of length ``channels`` along ``dim``, or None if not per-channel there."""
        vectors = []
        for value, neutral in ((self.scale, 1.0), (self.shift, 0.0)):
            if value is None:
                vectors.append(torch.full((channels,), neutral, dtype=torch.float64))
                continue
            if value.dim() > self.rank:
                return None
            full = value.reshape((1,) * (self.rank - value.dim()) + tuple(value.shape))
            if any(size != 1 for d, size in enumerate(full.shape) if d != dim % self.rank):
                return None
            vec = full.reshape(-1)
            if vec.numel() not in (1, channels):
                return None
            vectors.append(vec.to(torch.float64).expand(channels).clone())
        return vectors[0], vectors[1]

    @property
    def has_shift(self) -> bool:
        return self.shift is not None and bool((self.shift != 0).any())


class AffineSource(Protocol):
    """How a family recognises its affine-like nodes."""

    def input_of(self, node: fx.Node) -> fx.Node | None:
        """The activation the node transforms, if the node is of this family (structure only)."""

    def affine(self, node: fx.Node, ctx: RuleContext) -> Affine | str:
        """The node's affine map, or the reason it cannot be treated as one."""


def channel_dim(layer: fx.Node) -> int:
    """The channel dimension of a layer's input and output: 1 for convolutions, -1 for Linear."""
    return -1 if kind_of(layer) == "linear" else 1


def _groups_view(vec: torch.Tensor, groups: int, rows: int) -> torch.Tensor:
    """For grouped layers: entry ``[r, j]`` is ``vec[group(r) * per_group + j]`` (``rows`` rows split
    evenly over ``groups``)."""
    per_group = vec.numel() // groups
    table = vec.reshape(groups, per_group)
    return table.repeat_interleave(rows // groups, dim=0)


def _store(ctx: RuleContext, layer: fx.Node, weight: torch.Tensor, bias: torch.Tensor, hint: str) -> dict:
    like_w = ctx.stored(layer.kwargs["weight"])
    like_b = ctx.stored(layer.kwargs["bias"]) if layer.kwargs["bias"] is not None else like_w
    return {
        "weight": ctx.add_tensor(f"{hint}_weight", weight, like_w),
        "bias": ctx.add_tensor(f"{hint}_bias", bias, like_b),
    }


class _AffineFold(Rule):
    """A folding rule for one family: ``source`` recognises its nodes, ``what`` names them in reasons."""

    def __init__(self, name: str, source: AffineSource, what: str) -> None:
        self.name = name
        self.source = source
        self.what = what

    def _foldable(self, match: Match, ctx: RuleContext, between: fx.Node, side: str) -> Affine | str:
        """The affine map, when ``between`` (the value the fold removes) has no other user and the map is
        per-channel along the layer's ``side`` ("output" or "input") channels; else why the fold is refused."""
        if len(users_of(between)) > 1:
            return f"the output of {describe(between)} has {len(users_of(between))} users; folding would change the others"
        operands = self._operands(match, ctx)
        if isinstance(operands, str):
            return operands
        affine, weight, _ = operands
        layer = match["layer"]
        kind, groups = kind_of(layer), layer.kwargs.get("groups", 1)
        if side == "output":
            channels = weight.shape[1] * groups if kind == "conv_transpose" else weight.shape[0]
        else:
            channels = weight.shape[1] * (groups if kind == "conv" else 1)
        if affine.per_channel(channel_dim(layer), channels) is None:
            return f"the {self.what} is not per-channel along the {side} channels of {describe(layer)}"
        return affine

    def _operands(self, match: Match, ctx: RuleContext) -> tuple[Affine, torch.Tensor, torch.Tensor] | str:
        """The affine map and the layer's (float64) weight and bias, or why either is unavailable; computed
        once per match (check decides with them, rewrite folds them)."""
        return match.computed("operands", lambda: self._read(match["affine"], match["layer"], ctx))

    def _read(self, affine_node: fx.Node, layer: fx.Node, ctx: RuleContext) -> tuple[Affine, torch.Tensor, torch.Tensor] | str:
        affine = self.source.affine(affine_node, ctx)
        if isinstance(affine, str):
            return affine
        tensors = layer_tensors(layer, ctx)
        return tensors if isinstance(tensors, str) else (affine, *tensors)


class FoldIntoPreceding(_AffineFold):
    """Fold an affine-like node into the conv / conv-transpose / linear layer that produces its input."""

    identity = "s * (W x + b) + t = (s W) x + (s b + t), per output channel"

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        x = self.source.input_of(node)
        if not isinstance(x, fx.Node) or kind_of(x) not in LAYER_KINDS:
            return None
        layer_input = x.kwargs["input"]
        if not isinstance(layer_input, fx.Node):
            return None
        return Match(output=node, inputs=(layer_input,), nodes=(x, node), bindings={"layer": x, "affine": node})

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        found = self._foldable(match, ctx, match["layer"], "output")
        return found if isinstance(found, str) else None

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        layer, node = match["layer"], match.output
        affine, weight, bias = self._operands(match, ctx)
        s, t = affine.per_channel(channel_dim(layer), bias.numel())
        s, t = s.to(weight.device), t.to(weight.device)
        extra = (1,) * (weight.dim() - 2)
        if kind_of(layer) == "conv_transpose":
            groups = layer.kwargs["groups"]
            new_weight = weight * _groups_view(s, groups, weight.shape[0]).reshape(weight.shape[:2] + extra)
        else:
            new_weight = weight * s.reshape((-1, 1) + extra)
        new_bias = bias * s + t
        tensors = _store(ctx, layer, new_weight, new_bias, name_hint(layer))
        kwargs = dict(layer.kwargs, **tensors)
        return ctx.call(layer.target, like=node, **kwargs)


class FoldIntoFollowing(_AffineFold):
    """Fold an affine-like node into the conv / linear layer that consumes it."""

    identity = "W (s * x + t) + b = (W diag(s)) x + (b + W t), per input channel (conv padding 0 when t != 0)"

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        x = self.source.input_of(node)
        if not isinstance(x, fx.Node):
            return None
        for user in users_of(node):
            if kind_of(user) in LAYER_KINDS and user.kwargs["input"] is node:
                return Match(output=user, inputs=(x,), nodes=(node, user), bindings={"affine": node, "layer": user})
        return None

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        node, layer = match["affine"], match["layer"]
        if kind_of(layer) == "conv_transpose":
            return f"folding a {self.what} into a following ConvTranspose ({describe(layer)}) is not supported"
        affine = self._foldable(match, ctx, node, "input")
        if isinstance(affine, str):
            return affine
        if kind_of(layer) == "conv" and affine.has_shift:
            padding = layer.kwargs["padding"]
            if isinstance(padding, str) or any(p != 0 for p in padding):
                return (
                    f"the {self.what} shifts its output and {describe(layer)} zero-pads (padding={padding}): "
                    "the padded border would see 0 instead of the shift"
                )
        return None

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        node, layer = match["affine"], match["layer"]
        affine, weight, bias = self._operands(match, ctx)
        out_channels = weight.shape[0]
        if kind_of(layer) == "linear":
            s, t = affine.per_channel(-1, weight.shape[1])
            s, t = s.to(weight.device), t.to(weight.device)
            new_weight = weight * s.reshape(1, -1)
            new_bias = bias + weight @ t
        else:
            groups = layer.kwargs["groups"]
            s, t = affine.per_channel(1, weight.shape[1] * groups)
            s, t = s.to(weight.device), t.to(weight.device)
            extra = (1,) * (weight.dim() - 2)
            s_rows = _groups_view(s, groups, out_channels)  # [o, j] -> s of input channel j of o's group
            t_rows = _groups_view(t, groups, out_channels)
            new_weight = weight * s_rows.reshape(weight.shape[:2] + extra)
            new_bias = bias + (weight.sum(dim=tuple(range(2, weight.dim()))) * t_rows).sum(dim=1)
        tensors = _store(ctx, layer, new_weight, new_bias, name_hint(layer))
        kwargs = dict(layer.kwargs, input=self.source.input_of(node), **tensors)
        return ctx.call(layer.target, like=layer, **kwargs)
