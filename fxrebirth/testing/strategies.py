"""Hypothesis strategies for layer hyper-parameters and the modules built from them.

Every strategy draws *valid* configurations (channels divisible by groups, an input large enough for
the kernel, stride and dilation), so a failing example is always a rule bug, never a bad draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

__all__ = ["ConvConfig", "conv_configs", "batchnorm_modules", "per_channel_constants", "dtypes"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

dtypes = st.sampled_from([torch.float64, torch.float32])
"""The two dtypes every exact rule is proven in."""


@dataclass(frozen=True)
class ConvConfig:
    """One convolution's hyper-parameters plus an input size that fits them."""

    ndim: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    size: tuple[int, ...]
    transposed: bool = False

    def module(self) -> nn.Module:
        cls = (_CONV_T if self.transposed else _CONV)[self.ndim]
        kwargs = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                      bias=self.bias)
        return cls(self.in_channels, self.out_channels, self.kernel_size, **kwargs)

    def input(self, batch: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn((batch, self.in_channels) + self.size, dtype=dtype)


@st.composite
def conv_configs(
    draw: st.DrawFn,
    ndim: int | st.SearchStrategy[int] = 2,
    *,
    transposed: bool = False,
    padding: st.SearchStrategy[int] | None = None,
    max_channels: int = 6,
) -> ConvConfig:
    """Convolution hyper-parameters: channels, groups (a common divisor), kernel, stride, padding,
    dilation, bias, and a spatial size the kernel fits in. ``padding`` overrides the padding draw
    (``st.just(0)`` for rules that need no padding)."""
    ndim = draw(ndim) if isinstance(ndim, st.SearchStrategy) else ndim
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_channels = groups * draw(st.integers(1, max(1, max_channels // groups)))
    out_channels = groups * draw(st.integers(1, max(1, max_channels // groups)))
    if draw(st.booleans()) and not transposed:  # depthwise
        groups, out_channels = in_channels, in_channels * draw(st.integers(1, 2))
    per_dim = st.tuples(*[st.integers(1, 3)] * ndim)
    kernel = draw(per_dim)
    stride = draw(st.tuples(*[st.integers(1, 2)] * ndim))
    dilation = draw(st.tuples(*[st.integers(1, 2)] * ndim))
    pad_strategy = padding if padding is not None else st.integers(0, 2)
    pads = tuple(min(draw(pad_strategy), (d * (k - 1)) // 2 if transposed else 2) for k, d in zip(kernel, dilation))
    reach = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    size = tuple(draw(st.integers(max(1, r - 2 * p), max(1, r - 2 * p) + 4)) for r, p in zip(reach, pads))
    return ConvConfig(ndim, in_channels, out_channels, kernel, stride, pads, dilation, groups,
                      draw(st.booleans()), size, transposed)


@st.composite
def batchnorm_modules(draw: st.DrawFn, channels: int, ndim: int = 2, affine: bool | None = None) -> nn.Module:
    """An eval-mode BatchNorm with drawn statistics, including tiny variances and extreme eps."""
    if affine is None:
        affine = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 1e-1]))
    bn = _BN[ndim](channels, eps=eps, affine=affine)
    values = st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False)
    variances = st.one_of(st.floats(1e-6, 4.0), st.just(0.0))
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(draw(st.lists(values, min_size=channels, max_size=channels))))
        bn.running_var.copy_(torch.tensor(draw(st.lists(variances, min_size=channels, max_size=channels))))
        if affine:
            bn.weight.copy_(torch.tensor(draw(st.lists(values, min_size=channels, max_size=channels))))
            bn.bias.copy_(torch.tensor(draw(st.lists(values, min_size=channels, max_size=channels))))
    return bn.eval()


@st.composite
def per_channel_constants(draw: st.DrawFn, channels: int, rank: int, channel_dim: int = 1,
                          nonzero: bool = False) -> torch.Tensor:
    """A constant that broadcasts per channel against a rank-``rank`` tensor: a scalar tensor, a
    ``(C,)``-like vector laid along ``channel_dim``, with or without leading 1s."""
    low = 0.25 if nonzero else 0.0
    magnitudes = st.floats(low, 2.0, allow_nan=False)
    signs = st.sampled_from([-1.0, 1.0])
    if draw(st.booleans()):
        return torch.tensor(draw(magnitudes) * draw(signs))
    values = [draw(magnitudes) * draw(signs) for _ in range(channels)]
    dim = channel_dim % rank
    shape = [1] * rank
    shape[dim] = channels
    drop_leading = draw(st.integers(0, dim))
    return torch.tensor(values).reshape(shape[drop_leading:])
