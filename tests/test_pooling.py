"""Padding folded into convolutions; global average pooling moved before a 1x1 convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxrebirth
from fxrebirth.testing import assert_equivalent, count_kind
from fxrebirth.testing.strategies import conv_configs, dtypes


@given(cfg=conv_configs(2), pad=st.tuples(st.integers(0, 2), st.integers(0, 2)), module=st.booleans(), dtype=dtypes)
def test_symmetric_zero_padding_folds_into_the_conv(cfg, pad, module, dtype):
    ph, pw = pad
    padder = nn.ZeroPad2d((pw, pw, ph, ph)) if module else nn.ConstantPad2d((pw, pw, ph, ph), 0.0)
    model = nn.Sequential(padder, cfg.module()).to(dtype).eval()
    x = cfg.input(dtype=dtype)
    gm, report = fxrebirth.optimize(model, x)
    assert report.stats("fold_pad_into_conv").rewrites == 1 and count_kind(gm, "pad") == 0
    (conv,) = [n for n in gm.graph.nodes if fxrebirth.ops.kind_of(n) == "conv"]
    assert conv.kwargs["padding"] == (cfg.padding[0] + ph, cfg.padding[1] + pw)
    assert_equivalent(model, gm, x)


def _pad_then_conv(pad, **kwargs):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)

        def forward(self, x):
            return self.conv(F.pad(x, pad, **kwargs))

    return M().eval()


def test_asymmetric_nonzero_and_reflect_padding_are_refused():
    x = torch.randn(1, 2, 7, 7)
    cases = [((1, 0, 1, 1), {}, "pads asymmetrically (1, 0)"),
             ((1, 1, 1, 1), {"value": 0.5}, "value=0.5, not zeros"),
             ((1, 1, 1, 1), {"mode": "reflect"}, "mode='reflect'")]
    for pad, kwargs, reason in cases:
        model = _pad_then_conv(pad, **kwargs)
        gm, report = fxrebirth.optimize(model, x)
        (refusal,) = report.stats("fold_pad_into_conv").refusals
        assert reason in refusal.reason, refusal.reason
        assert_equivalent(model, gm, x)


@given(c=st.integers(1, 6), f=st.integers(1, 6), groups=st.sampled_from([1, 2]), dtype=dtypes)
def test_global_pool_moves_before_pointwise_conv_and_merges_into_linear(c, f, groups, dtype):
    c, f = c * groups, f * groups
    model = nn.Sequential(nn.Conv2d(c, f, 1, groups=groups), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(f, 3)).to(dtype).eval()
    x = torch.randn(2, c, 7, 7, dtype=dtype)
    gm, report = fxrebirth.optimize(model, x)
    assert report.stats("commute_global_pool").rewrites == 1
    assert report.stats("merge_flattened_conv_into_linear").rewrites == 1
    assert count_kind(gm, "conv") == 0 and count_kind(gm, "linear") == 1
    assert report.flops_after < report.flops_before
    assert_equivalent(model, gm, x)


def test_global_pool_after_padded_or_strided_conv_is_refused():
    x = torch.randn(2, 3, 7, 7)
    for conv in (nn.Conv2d(3, 4, 1, padding=1), nn.Conv2d(3, 4, 1, stride=2), nn.Conv2d(3, 4, 3)):
        model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1)).eval()
        gm, report = fxrebirth.optimize(model, x)
        (refusal,) = report.stats("commute_global_pool").refusals
        assert "is not an unpadded stride-1 1x1 convolution" in refusal.reason
        assert_equivalent(model, gm, x)
