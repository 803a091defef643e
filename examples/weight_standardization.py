"""Worked example for docs/tutorial.md: teach fxrebirth a fusion for your own layer, and prove it.

``WSConv2d`` is a weight-standardised convolution (Qiao et al., 2019; NFNets): every forward pass
standardises the weight, ``W_hat = gain * (W - mean(W)) / sqrt(var(W) + eps)`` per output channel, then
convolves. For inference the weight is constant, so the identity

    WSConv2d(x) = conv2d(x; W_hat, b)

lets fxrebirth replace the layer by a plain convolution, which its other rules (BatchNorm folding,
chains, branches) can then merge further.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxrebirth import Match, Rule, RuleContext


def standardize(weight: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """``gain * (W - mean W) / sqrt(var W + eps)``, per output channel."""
    mean = weight.mean(dim=(1, 2, 3), keepdim=True)
    var = weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
    return gain * (weight - mean) / torch.sqrt(var + eps)


class WSConv2d(nn.Conv2d):
    """A convolution whose weight is standardised on every call."""

    def __init__(self, *args, eps: float = 1e-4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, standardize(self.weight, self.gain, self.eps), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class FoldWeightStandardization(Rule):
    """WSConv2d(x) = conv2d(x; gain * (W - mean W) / sqrt(var W + eps), b)."""

    name = "fold_weight_standardization"
    identity = "WSConv2d(x) = conv2d(x; gain * (W - mean W) / sqrt(var W + eps), b)"

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        # Keep WSConv2d a leaf (optimize(..., leaf_modules=[WSConv2d])) so it arrives as one module call.
        if node.op != "call_module" or not isinstance(ctx.gm.get_submodule(node.target), WSConv2d):
            return None
        return Match(output=node, inputs=(node.args[0],), nodes=(node,))

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        module = ctx.gm.get_submodule(match.output.target)
        if module.padding_mode != "zeros":
            return f"{match.output.target} pads with mode {module.padding_mode!r}"
        return None

    def rewrite(self, match: Match, ctx: RuleContext) -> fx.Node:
        module = ctx.gm.get_submodule(match.output.target)
        # the exact value, in float64; fxrebirth stores it in the model's dtype
        exact = standardize(module.weight.detach().double(), module.gain.detach().double(), module.eps)
        weight = ctx.add_tensor(f"{match.output.target}_weight", exact, module.weight)
        bias = ctx.add_tensor(f"{match.output.target}_bias", module.bias.detach().double(), module.bias) \
            if module.bias is not None else None
        return ctx.call(F.conv2d, like=match.output, input=match.inputs[0], weight=weight, bias=bias,
                        stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)

