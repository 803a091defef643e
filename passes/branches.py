r"""Parallel branches on one input become one convolution.

Summed branches (RepVGG, ACNet, Diverse Branch Block), each a chain of linear stages (convolutions,
average poolings, per-channel affine maps such as eval BatchNorm) on the nearest common input, or that
input itself (each chain first becomes one kernel, see ``_kernel.compose``)::

    conv_a(x) + conv_b(x) = conv(x; pad(W_a) + pad(W_b), b_a + b_b)
    conv_a(x) - conv_b(x) = conv(x; pad(W_a) - pad(W_b), b_a - b_b)     (FastViT's RepMixer)

where ``pad`` places each kernel inside the common kernel so that the centres line up (a ``k`` kernel
with padding ``p`` sits at offset ``(P - p) / d`` in a ``K`` kernel with padding ``P``); the identity is
a kernel with 1 at the centre, ``x * s + t`` one with ``s`` there and bias ``t``.

Concatenated branches (horizontal fusion)::

    cat([conv_a(x), conv_b(x)], dim=1) = conv(x; [pad(W_a); pad(W_b)], [b_a; b_b])

and sibling convolutions with the same geometry that read the same input but feed different places
(an inception module's 1x1 branch and its 1x1 reduce layers)::

    conv_a(x), conv_b(x) = narrow(y, 1, 0, C_a), narrow(y, 1, C_a, C_b)   with y = conv(x; [W_a; W_b], [b_a; b_b])

Requirements: the same stride; kernel centres on a common dilation grid; equal output sizes.
Every merge is gated by the pipeline's cost model.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxrebirth.graph.ops import kind_of
from fxrebirth.rewrite.rules import Match, Rule, RuleContext, by_phase, describe, name_hint, users_of

from ._kernel import (
    Kernel, affine_kernel, compose, emit_conv, identity_kernel, kernel_of_avg_pool, kernel_of_conv, stack_kernels,
    sum_kernels,
)
from .affine import ConstantAffineSource
from .batchnorm import BatchNormSource

__all__ = ["MergeSummedBranches", "MergeConcatBranches", "MergeSiblingConvs", "rules", "stage_kernel"]

_SOURCES = (BatchNormSource(), ConstantAffineSource())


def _step(node: fx.Node) -> fx.Node | None:
    """The input of a node that is one linear stage (conv, average pooling, per-channel affine)."""
    if kind_of(node) in ("conv", "avg_pool"):
        x = node.kwargs["input"]
        return x if isinstance(x, fx.Node) else None
    for source in _SOURCES:
        x = source.input_of(node)
        if isinstance(x, fx.Node):
            return x
    return None


def _ancestry(operand: fx.Node) -> list[fx.Node]:
    """``[operand, its input, ...]`` while each node is a linear stage."""
    chain = [operand]
    while (x := _step(chain[-1])) is not None:
        chain.append(x)
    return chain


def _branches(a: fx.Node, b: fx.Node) -> tuple[fx.Node, list[fx.Node], list[fx.Node]] | None:
    """The nearest common input ``x`` of two operands and each one's stages above it (outermost
    first; empty for ``x`` itself)."""
    seq_a, seq_b = _ancestry(a), _ancestry(b)
    in_b = {n: i for i, n in enumerate(seq_b)}
    for i, node in enumerate(seq_a):
        if node in in_b:
            return node, seq_a[:i], seq_b[:in_b[node]]
    return None


def stage_kernel(node: fx.Node, ctx: RuleContext) -> Kernel | str:
    """The kernel of one linear stage (conv, average pooling, per-channel affine such as eval BatchNorm),
    or why it has none."""
    kind = kind_of(node)
    if kind == "conv":
        return kernel_of_conv(node, ctx)
    if kind == "avg_pool":
        return kernel_of_avg_pool(node, ctx)
    shape = ctx.shape(node)
    if shape is None or len(shape) < 3:
        return f"no spatial shape recorded for {describe(node)}"
    for source in _SOURCES:
        if source.input_of(node) is not None:
            affine = source.affine(node, ctx)
            if isinstance(affine, str):
                return affine
            vectors = affine.per_channel(1, shape[1])
            if vectors is None:
                return f"{describe(node)} is not per-channel"
            return affine_kernel(vectors[0].to(ctx.device), vectors[1].to(ctx.device), len(shape) - 2)
    return f"{describe(node)} is not a linear stage"


def _chain_kernel(x: fx.Node, chain: list[fx.Node], ctx: RuleContext) -> Kernel | str:
    """The kernel of ``chain`` (outermost first) applied to ``x``; the identity for an empty chain."""
    if not chain:
        shape = ctx.shape(x)
        if shape is None or len(shape) < 3:
            return f"no spatial shape recorded for {describe(x)}"
        return identity_kernel(shape[1], len(shape) - 2, ctx.device)
    kernel = stage_kernel(chain[-1], ctx)
    for node in reversed(chain[:-1]):
        if isinstance(kernel, str):
            return kernel
        outer = stage_kernel(node, ctx)
        kernel = outer if isinstance(outer, str) else compose(kernel, outer)
    return kernel


def _spatial(node: fx.Node) -> tuple[int, ...] | None:
    shape = RuleContext.shape(node)
    return tuple(shape[2:]) if shape is not None and len(shape) >= 3 else None


def _first_conv(nodes: list[fx.Node]) -> fx.Node:
    return next(n for n in nodes if kind_of(n) == "conv")


class MergeSummedBranches(Rule):
    """A sum or difference of two branches of one input, each a chain of linear stages (convolutions,
    average pooling, folded BatchNorms) or the input itself (a convolution with a 1 at its centre), as one
    convolution: each chain's kernel is composed, aligned to a common size and centre, and added (a
    difference negates the second, as FastViT's RepMixer ``mixer(x) - norm(x)``). This is RepVGG's,
    ACNet's and the Diverse Branch Block's re-parameterisation written once. Refused on broadcasting,
    different strides or output sizes, and stages with other users. Gated."""

    name = "merge_summed_branches"
    identity = "A(x) ± B(x) = conv(x; align(A) ± align(B)), x itself = conv(x; 1 at the centre)"
    gated = True

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        if node.op != "call_function" or node.target not in (operator.add, operator.sub) or len(node.args) != 2 \
                or node.kwargs:
            return None
        if not all(isinstance(a, fx.Node) for a in node.args):
            return None
        found = _branches(*node.args)
        if found is None:
            return None
        x, chain_a, chain_b = found
        if not any(kind_of(n) == "conv" for n in chain_a + chain_b):
            return None
        return Match(output=node, inputs=(x,), nodes=tuple(chain_a + chain_b) + (node,),
                     bindings={"chains": (chain_a, chain_b)})

    def _merged(self, match: Match, ctx: RuleContext) -> Kernel | str:
        """The summed kernel (computed once per match: check decides with it, rewrite emits it)."""
        return match.computed("merged", lambda: self._sum(match, ctx))

    @staticmethod
    def _sum(match: Match, ctx: RuleContext) -> Kernel | str:
        node, x = match.output, match.inputs[0]
        kernels = [_chain_kernel(x, chain, ctx) for chain in match["chains"]]
        for k in kernels:
            if isinstance(k, str):
                return k
        if len({k.ndim for k in kernels}) > 1:
            return "the branches have different dimensionality"
        if node.target is operator.sub:
            kernels[1] = kernels[1].negated()
        return sum_kernels(kernels, _spatial(x), _spatial(node))

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        node = match.output
        for operand in node.args:
            if ctx.shape(operand) != ctx.shape(node):
                return f"the sum broadcasts {describe(operand)} to a larger shape"
        for chain in match["chains"]:
            for stage in chain:
                if len(users_of(stage)) > 1:
                    return f"the branch {describe(stage)} has {len(users_of(stage))} users; merging would duplicate it"
        merged = self._merged(match, ctx)
        return merged if isinstance(merged, str) else None

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        conv = _first_conv(match["chains"][0] + match["chains"][1])
        return emit_conv(ctx, self._merged(match, ctx), match.inputs[0], like=match.output,
                         hint=name_hint(conv), like_weight=conv.kwargs["weight"])


def _channel_dim(node: fx.Node) -> int | None:
    shape = RuleContext.shape(node)
    return node.kwargs["dim"] % len(shape) if shape is not None else None


class MergeConcatBranches(Rule):
    """Consecutive inputs of a channel concatenation that are convolutions of the same input, with no other
    users, as one convolution whose kernels are aligned and stacked along the output channels (an
    inception module's parallel convolutions). Gated."""

    name = "merge_concat_branches"
    identity = "cat([conv_a(x), conv_b(x)], 1) = conv(x; [align(W_a); align(W_b)], [b_a; b_b])"
    gated = True

    @staticmethod
    def _run(node: fx.Node) -> tuple[int, int] | None:
        """The first run ``[i, j)`` of >= 2 consecutive cat inputs that are convs of one input."""
        tensors = node.kwargs["tensors"]
        i = 0
        while i < len(tensors):
            t = tensors[i]
            j = i + 1
            if kind_of(t) == "conv":
                while j < len(tensors) and kind_of(tensors[j]) == "conv" \
                        and tensors[j].kwargs["input"] is t.kwargs["input"]:
                    j += 1
                if j - i >= 2:
                    return i, j
            i = j
        return None

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        if kind_of(node) != "cat" or not isinstance(node.kwargs["tensors"], (list, tuple)) or _channel_dim(node) != 1:
            return None
        run = self._run(node)
        if run is None:
            return None
        tensors = node.kwargs["tensors"]
        convs = tuple(tensors[run[0]:run[1]])
        others = [t for t in tensors[:run[0]] + tensors[run[1]:] if isinstance(t, fx.Node)]
        inputs = tuple(dict.fromkeys([convs[0].kwargs["input"]] + others))
        return Match(output=node, inputs=inputs, nodes=convs + (node,), bindings={"run": run})

    def _merged(self, match: Match, ctx: RuleContext) -> Kernel | str:
        """The stacked kernel (computed once per match: check decides with it, rewrite emits it)."""
        return match.computed("merged", lambda: self._stack(match, ctx))

    @staticmethod
    def _stack(match: Match, ctx: RuleContext) -> Kernel | str:
        i, j = match["run"]
        convs = match.output.kwargs["tensors"][i:j]
        kernels = [kernel_of_conv(c, ctx) for c in convs]
        for k in kernels:
            if isinstance(k, str):
                return k
        out = {_spatial(c) for c in convs}
        if len(out) > 1:
            return "the concatenated convolutions have different output sizes"
        return stack_kernels(kernels, _spatial(convs[0].kwargs["input"]), out.pop())

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        i, j = match["run"]
        for conv in match.output.kwargs["tensors"][i:j]:
            if len(users_of(conv)) > 1:
                return f"the branch {describe(conv)} has {len(users_of(conv))} users; merging would duplicate it"
        merged = self._merged(match, ctx)
        return merged if isinstance(merged, str) else None

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        node = match.output
        i, j = match["run"]
        tensors = list(node.kwargs["tensors"])
        first = tensors[i]
        merged = emit_conv(ctx, self._merged(match, ctx), first.kwargs["input"], like=first, hint=name_hint(first),
                           like_weight=first.kwargs["weight"])
        shape = list(ctx.shape(first))
        shape[1] = sum(ctx.shape(t)[1] for t in tensors[i:j])
        ctx.set_shape(merged, tuple(shape), first.meta["tensor_meta"].dtype)
        rest = tensors[:i] + [merged] + tensors[j:]
        if len(rest) == 1:
            return merged
        return ctx.call(torch.cat, like=node, tensors=rest, dim=node.kwargs["dim"])


def _geometry(conv: fx.Node, ctx: RuleContext) -> tuple | None:
    weight = ctx.shape(conv.kwargs["weight"])
    if weight is None or conv.kwargs["groups"] != 1 or isinstance(conv.kwargs["padding"], str):
        return None
    kw = conv.kwargs
    return (tuple(weight[2:]), kw["stride"], kw["padding"], kw["dilation"], kw["bias"] is None)


class MergeSiblingConvs(Rule):
    """Convolutions that read the same input with the same kernel size, stride, padding and dilation
    (``groups = 1``, bias on all or none) as one convolution whose output is sliced back into theirs.
    Phase 1, so that the sums and concatenations can absorb those convolutions first. Gated."""

    name = "merge_sibling_convs"
    identity = "conv_a(x), conv_b(x) = narrow(y, 1, 0, C_a), narrow(y, 1, C_a, C_b), y = conv(x; [W_a; W_b], [b_a; b_b])"
    gated = True
    phase = 1  # after the sums and concatenations: fusing siblings first would hide those

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        groups: dict[tuple, list[fx.Node]] = {}
        for user in users_of(node):
            if kind_of(user) == "conv" and user.kwargs["input"] is node:
                geometry = _geometry(user, ctx)
                if geometry is not None:
                    groups.setdefault(geometry, []).append(user)
        for convs in groups.values():
            if len(convs) >= 2:
                convs = sorted(convs)  # graph order (Node.__lt__), without walking the graph
                return Match(output=convs[0], inputs=(node,), nodes=tuple(convs), also_replaced=tuple(convs[1:]))
        return None

    @staticmethod
    def _kernels(match: Match, ctx: RuleContext) -> list[Kernel | str]:
        return match.computed("kernels", lambda: [kernel_of_conv(c, ctx) for c in match.replaced])

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        return next((k for k in self._kernels(match, ctx) if isinstance(k, str)), None)

    def rewrite(self, match: Match, ctx: RuleContext) -> dict[fx.Node, fx.Node]:
        convs = match.replaced
        kernels = self._kernels(match, ctx)
        stacked = stack_kernels(kernels, _spatial(match.inputs[0]), _spatial(convs[0]))
        first = convs[0]
        merged = emit_conv(ctx, stacked, match.inputs[0], like=first, hint=name_hint(first),
                           like_weight=first.kwargs["weight"])
        shape = list(ctx.shape(first))
        shape[1] = stacked.out_channels
        ctx.set_shape(merged, tuple(shape), first.meta["tensor_meta"].dtype)
        out, start = {}, 0
        for conv, kernel in zip(convs, kernels):
            out[conv] = ctx.call(torch.narrow, like=conv, input=merged, dim=1, start=start, length=kernel.out_channels)
            start += kernel.out_channels
        return out


def rules(phase: str | None = None) -> list[Rule]:
    """The branch-merging rules, in the order they run: all in the phase ``branches`` of
    :data:`fxrebirth.rewrite.rules.PHASES` (``phase`` names another: none)."""
    return by_phase({"branches": [MergeSummedBranches(), MergeConcatBranches(), MergeSiblingConvs()]}, phase)
