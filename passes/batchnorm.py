r"""BatchNorm folding.

In eval mode BatchNorm is a per-channel affine map::

    BN(x) = g * (x - m) / sqrt(v + eps) + beta = x * s + t,   s = g / sqrt(v + eps),  t = beta - m * s

so it folds into the convolution, transposed convolution or linear layer before it::

    W' = W * s[o],   b' = (b - m) * s + beta          (per output channel o)

and into a convolution or linear layer after it (per input channel i)::

    W' = W * s[i],   b' = b + sum_{i,k} W[o, i, k] * t[i]

the latter exact only when the convolution has no zero padding or ``t = 0`` (padding would see 0
where the original saw ``t``: measured error 1.29 at the border of a 3x3/pad-1 conv, 1e-16 inside).

Refused, with the reason: BatchNorm in training mode (it normalises with batch statistics and updates
its running statistics), BatchNorm without running statistics (``track_running_stats=False``), a
layer output with other users, non-constant statistics.

A BatchNorm after an activation and before a pooling (``relu -> bn -> pool``) has no layer beside it;
:class:`BatchNormPastPool` moves it past the pooling where they commute, so that it meets, and folds into,
the next convolution (or is refused with the reason it does not commute).

A BatchNorm with nothing to fold into can be rewritten as one ``torch.addcmul(t, x, s)``
(:class:`BatchNormToAffine`, opt-in: on this project's CPU the eager BatchNorm kernel measured faster
than ``addcmul``, 70 us vs 184 us on 1x64x112x112, so it is not in the default pipeline).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fxrebirth.graph.ops import kind_of
from fxrebirth.rewrite.rules import Match, Rule, RuleContext, by_phase, describe, name_hint

from ._fold import Affine, FoldIntoFollowing, FoldIntoPreceding

__all__ = ["BatchNormSource", "BatchNormToAffine", "BatchNormPastPool", "scale_and_shift", "fold_batchnorm_", "rules"]

_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def scale_and_shift(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` with ``BN(x) = x * s + t``: ``s = g / sqrt(v + eps)``, ``t = beta - m * s`` (``g = 1`` and
    ``beta = 0`` when the BatchNorm has no affine parameters), in the dtype of the statistics. The one
    place fxrebirth computes the identity: the exact tier folds with it, and so do the training-time
    BatchNorm (:mod:`fxrebirth.retraining.batchnorm`) and the paper's models."""
    scale = (weight if weight is not None else torch.ones_like(mean)) / torch.sqrt(var + eps)
    return scale, (bias if bias is not None else torch.zeros_like(mean)) - mean * scale


@torch.no_grad()
def fold_batchnorm_(weight: torch.Tensor, bias: torch.Tensor, bn: nn.Module) -> None:
    """Fold eval-mode ``bn`` into the layer before it, in place: ``W' = W * s`` along the output channels
    (dim 0), ``b' = b * s + t`` (:func:`scale_and_shift`, from the running statistics)."""
    scale, shift = scale_and_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    weight.mul_(scale.reshape(-1, *([1] * (weight.dim() - 1))))
    bias.copy_(bias * scale + shift)


class BatchNormSource:
    """Recognises canonical ``F.batch_norm`` calls, and BatchNorm modules left as module calls (those in
    training mode, which capture does not lower) so that they are refused with their reason."""

    def input_of(self, node: fx.Node) -> fx.Node | None:
        if kind_of(node) == "batch_norm":
            return node.kwargs["input"]
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            owner = node.graph.owning_module
            if owner is not None and isinstance(owner.get_submodule(node.target), _BN_MODULES):
                return node.args[0]
        return None

    def affine(self, node: fx.Node, ctx: RuleContext) -> Affine | str:
        if node.op == "call_module":
            return f"BatchNorm {describe(node)} is in training mode (model.train()); call model.eval() to fold it"
        kw = node.kwargs
        if kw["training"]:
            return f"BatchNorm {describe(node)} normalises with batch statistics (track_running_stats=False)"
        mean, var = ctx.constant(kw["running_mean"]), ctx.constant(kw["running_var"])
        if mean is None or var is None:
            return f"the running statistics of BatchNorm {describe(node)} are not constants"
        weight = ctx.constant(kw["weight"]) if kw["weight"] is not None else torch.ones_like(mean)
        bias = ctx.constant(kw["bias"]) if kw["bias"] is not None else torch.zeros_like(mean)
        if weight is None or bias is None:
            return f"the affine parameters of BatchNorm {describe(node)} are not constants"
        rank = len(ctx.shape(node) or ())
        if rank < 2:
            return f"no recorded shape for BatchNorm {describe(node)}"
        if isinstance(kw["eps"], bool) or not isinstance(kw["eps"], (int, float)):
            return f"the eps of BatchNorm {describe(node)} is computed at run time, not a number"
        scale, shift = scale_and_shift(*(t.to(torch.float64) for t in (mean, var, weight, bias)), kw["eps"])
        view = (1, -1) + (1,) * (rank - 2)
        return Affine(scale.reshape(view), shift.reshape(view), rank)


class BatchNormToAffine(Rule):
    """A standalone eval-mode BatchNorm becomes ``torch.addcmul(t, x, s)`` (one kernel, no statistics)."""

    name = "bn_to_affine"
    identity = "BN(x) = x * s + t with s = g / sqrt(v + eps), t = beta - m * s"

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        if kind_of(node) != "batch_norm" or not isinstance(node.kwargs["input"], fx.Node):
            return None
        return Match(output=node, inputs=(node.kwargs["input"],), nodes=(node,))

    @staticmethod
    def _affine(match: Match, ctx: RuleContext) -> Affine | str:
        return match.computed("affine", lambda: BatchNormSource().affine(match.output, ctx))

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        affine = self._affine(match, ctx)
        return affine if isinstance(affine, str) else None

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        node = match.output
        affine = self._affine(match, ctx)
        like = ctx.stored(node.kwargs["running_var"])
        scale = ctx.add_tensor(f"{name_hint(node)}_scale", affine.scale, like)
        shift = ctx.add_tensor(f"{name_hint(node)}_shift", affine.shift, like)
        return ctx.call(torch.addcmul, like=node, input=shift, tensor1=node.kwargs["input"], tensor2=scale)


class BatchNormPastPool(Rule):
    """An eval-mode BatchNorm moved past the pooling after it, where they commute: BatchNorm AFTER an
    activation (``conv -> relu -> bn -> pool -> conv``, as many shipped models write it) has no layer before
    it to fold into, and after the move it meets the next convolution, which ``bn_into_following`` folds it
    into (or refuses with its reason, a zero-padded convolution and a non-zero shift). The move alone makes
    the BatchNorm run on the pooled, smaller tensor.

    Max-pooling commutes with ``x * s + t`` when every ``s > 0`` (an increasing map keeps each window's
    maximum); average pooling for any ``s`` when every window averages real inputs only (no padding, no
    ceil-mode windows past the border, no divisor override). Refused otherwise, with that reason."""

    name = "bn_past_pool"
    identity = "pool(x * s + t) = pool(x) * s + t (max-pool: s > 0; average pool: windows of real inputs only)"

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        if kind_of(node) not in ("max_pool", "avg_pool") or not isinstance(node.kwargs.get("input"), fx.Node):
            return None
        bn = node.kwargs["input"]
        x = BatchNormSource().input_of(bn)
        if x is None or len(bn.users) != 1 or not isinstance(x, fx.Node):
            return None
        return Match(output=node, inputs=(x,), nodes=(bn, node))

    @staticmethod
    def _affine(match: Match, ctx: RuleContext) -> Affine | str:
        return match.computed("affine", lambda: BatchNormSource().affine(match.nodes[0], ctx))

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        bn, pool = match.nodes
        affine = self._affine(match, ctx)
        if isinstance(affine, str):
            return affine
        kw = pool.kwargs
        if kind_of(pool) == "max_pool":
            if kw["return_indices"]:
                return f"{describe(pool)} returns its indices"
            if not bool((affine.scale > 0).all()):
                return (f"BatchNorm {describe(bn)} has a scale <= 0 in some channel, which does not commute with the "
                        f"maximum of {describe(pool)}: no layer to fold it into")
            return None
        if any(p != 0 for p in kw["padding"]) or kw["ceil_mode"] or kw.get("divisor_override") is not None:
            return (f"{describe(pool)} averages windows with padding, ceil-mode or a divisor override, where the "
                    f"shift of BatchNorm {describe(bn)} does not commute: no layer to fold it into")
        return None

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        bn, pool = match.nodes
        pooled = ctx.call(pool.target, like=pool, **{**pool.kwargs, "input": match.inputs[0]})
        return ctx.call(bn.target, like=pool, **{**bn.kwargs, "input": pooled})


def rules(phase: str | None = None, *, standalone_to_affine: bool = False) -> list[Rule]:
    """The BatchNorm rules of the default pipeline, phase by phase (:data:`fxrebirth.rewrite.rules.PHASES`):
    the folds into the preceding and the following layer, then :class:`BatchNormPastPool`, which prepares a
    fold; ``phase`` keeps one phase's. ``standalone_to_affine`` appends the opt-in :class:`BatchNormToAffine`."""
    source = BatchNormSource()
    out = by_phase({"preceding": [FoldIntoPreceding("bn_into_preceding", source, "BatchNorm")],
                    "following": [FoldIntoFollowing("bn_into_following", source, "BatchNorm")],
                    "prepare": [BatchNormPastPool()]}, phase)
    if standalone_to_affine:
        out.append(BatchNormToAffine())
    return out
