r"""Local response normalisation written in operations every runtime has.

PyTorch computes ``F.local_response_norm`` of a 4-D input through ``avg_pool3d`` over a padded 5-D
view; ExecuTorch has no ``avg_pool3d`` kernel, so a model with LRN (AlexNet, the Caffe GoogLeNet) does
not load there. The channel window is an average pooling of ``x * x`` along the channel dimension,
which a 2-D pooling computes once channels are moved next to a spatial dimension by a transpose. With
``T`` swapping dimensions 1 and 2, ``n`` the window and ``pad`` padding the channel axis with zeros,
``n // 2`` before and ``(n - 1) // 2`` after, as PyTorch does::

    lrn(x) = x / b^beta,  b = k + alpha * T(avg_pool2d(pad(T(x * x)), (n, 1), stride 1))

Every window divides by ``n``, the padded zeros included, as PyTorch's average does. Where ``b`` is
provably positive (``k > 0`` and ``alpha >= 0``, since ``b >= k``), the power is written
``x * exp(-beta * log(b))``, an identity for ``b > 0``; otherwise ``x / pow(b, beta)`` as PyTorch writes it.

Both choices are ExecuTorch's: XNNPACK runs a pooling only with explicit padding before it, and has
``exp`` and ``log`` but no ``pow`` with a fractional exponent. What it does not run falls back to
ExecuTorch's portable kernels, one thread and no vectorisation: measured on googlenet_lrn's first LRN
(1x64x56x56, 2 threads), the pooling with its own padding and ``pow`` took 23.9 ms there, explicit
padding 3.1 ms, and explicit padding with ``exp``/``log`` 1.5 ms, the whole rewrite in XNNPACK
(PyTorch eager's own LRN: 8.2 ms).

The rewrite is exact, but whether it is faster depends on the runtime: ONNX Runtime and OpenVINO have
an LRN kernel of their own, which it would replace. It is therefore not a default rule: :func:`rules`
offers it to pipelines that target a runtime without LRN (``fxrebirth export --to executorch``
applies it).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxrebirth.graph.ops import kind_of
from fxrebirth.rewrite.rules import Match, Rule, RuleContext, describe

__all__ = ["LrnAsAvgPool2d", "rules"]


class LrnAsAvgPool2d(Rule):
    """Local response normalisation of a 4-D tensor as a 2-D average pooling of its squares over a
    transposed view (no ``avg_pool3d``), the power through ``exp`` and ``log`` where its base is positive. Inputs of another rank are refused: PyTorch already computes a
    3-D input's LRN with ``avg_pool2d``, and a 5-D one would need a 3-D pooling again."""

    name = "lrn_as_avg_pool2d"
    identity = ("lrn(x) = x * exp(-beta * log(k + alpha * T(avg_pool2d(pad(T(x * x), (n // 2, (n - 1) // 2)), (n, 1))))), "
                "T = transpose(1, 2)")
    changes_parameters = False

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        if kind_of(node) != "lrn" or not isinstance(node.kwargs.get("input"), fx.Node):
            return None
        return Match(output=node, inputs=(node.kwargs["input"],), nodes=(node,))

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        node = match.output
        shape = ctx.shape(match.inputs[0])
        if shape is None:
            return f"the input shape of {describe(node)} is unknown (no shape propagation)"
        if len(shape) != 4:
            return f"{describe(node)} normalises a {len(shape)}-D tensor; only 4-D inputs are rewritten"
        size = node.kwargs["size"]
        if not isinstance(size, int) or size < 1:
            return f"{describe(node)} has window size {size!r}; a positive integer is required"
        if not all(isinstance(node.kwargs[key], (int, float)) for key in ("alpha", "beta", "k")):
            return f"{describe(node)} has alpha, beta or k computed at run time"
        return None

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        node, x = match.output, match.inputs[0]
        kw = node.kwargs
        size, alpha, beta, k = kw["size"], float(kw["alpha"]), float(kw["beta"]), float(kw["k"])
        squares = ctx.call(torch.mul, input=x, other=x)
        moved = ctx.call(torch.transpose, input=squares, dim0=1, dim1=2)  # (N, H, C, W): channels pool as rows
        padded = ctx.call(F.pad, input=moved, pad=(0, 0, size // 2, (size - 1) // 2), mode="constant", value=0.0)
        pooled = ctx.call(F.avg_pool2d, input=padded, kernel_size=(size, 1), stride=(1, 1), padding=(0, 0))
        average = ctx.call(torch.transpose, input=pooled, dim0=1, dim1=2)
        scaled = ctx.call(torch.mul, input=average, other=alpha)
        base = ctx.call(torch.add, input=scaled, other=k)
        if k > 0 and alpha >= 0:  # base >= k > 0: the power as exp(-beta * log(base)), which XNNPACK runs
            logged = ctx.call(torch.log, input=base)
            factor = ctx.call(torch.exp, input=ctx.call(torch.mul, input=logged, other=-beta))
            return ctx.call(torch.mul, like=node, input=x, other=factor)
        denominator = ctx.call(torch.pow, input=base, exponent=beta)
        return ctx.call(torch.div, like=node, input=x, other=denominator)


def rules() -> list[Rule]:
    """The LRN lowering (not part of :func:`fxrebirth.frontends.library.default_rules`; see the module)."""
    return [LrnAsAvgPool2d()]
