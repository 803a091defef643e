"""Padding folded into convolutions; global average pooling moved before a 1x1 convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest
import hypothesis
from hypothesis import strategies as st
from torch import nn

import fxrebirth
from fxrebirth.testing import assert_equivalent
from fxrebirth.passes import conv_chain, pooling
from fxrebirth.testing.kit import check_rule
from fxrebirth.testing.strategies import conv_configs


@st.composite
def pad_then_conv(draw):
    cfg = draw(conv_configs(2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    padder = nn.ZeroPad2d((pw, pw, ph, ph)) if draw(st.booleans()) else nn.ConstantPad2d((pw, pw, ph, ph), 0.0)
    return nn.Sequential(padder, cfg.module()), cfg.input()


@pytest.mark.fxrebirth_rule
def test_symmetric_zero_padding_folds_into_the_conv():
    check_rule(pooling.FoldPadIntoConv(), pad_then_conv(), removes=["pad"])


def test_folded_padding_adds_up():
    model = nn.Sequential(nn.ZeroPad2d((2, 2, 1, 1)), nn.Conv2d(2, 3, 3, padding=1)).eval()
    gm, _ = fxrebirth.optimize(model, torch.randn(1, 2, 6, 6))
    (conv,) = [n for n in gm.graph.nodes if fxrebirth.graph.ops.kind_of(n) == "conv"]
    assert conv.kwargs["padding"] == (2, 3)


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


@st.composite
def pointwise_pool_linear(draw):
    groups = draw(st.sampled_from([1, 2]))
    c, f = groups * draw(st.integers(1, 6)), groups * draw(st.integers(1, 6))
    model = nn.Sequential(nn.Conv2d(c, f, 1, groups=groups), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(f, 3))
    return model, torch.randn(2, c, 7, 7)


@pytest.mark.fxrebirth_rule
def test_global_pool_moves_before_pointwise_conv_and_merges_into_linear():
    commute = pooling.CommuteGlobalPool()
    check_rule(commute, pointwise_pool_linear())
    check_rule(conv_chain.MergeFlattenedConvIntoLinear(), pointwise_pool_linear(), before=[commute],
               removes=["conv"])


def test_global_pool_after_padded_or_strided_conv_is_refused():
    x = torch.randn(2, 3, 7, 7)
    for conv in (nn.Conv2d(3, 4, 1, padding=1), nn.Conv2d(3, 4, 1, stride=2), nn.Conv2d(3, 4, 3)):
        model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1)).eval()
        gm, report = fxrebirth.optimize(model, x)
        (refusal,) = report.stats("commute_global_pool").refusals
        assert "is not an unpadded stride-1 1x1 convolution" in refusal.reason
        assert_equivalent(model, gm, x)


def test_ceil_mode_average_pool_merge_is_guarded_at_sizes_with_a_partial_window():
    import io

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AvgPool2d(2, ceil_mode=True),
                                torch.nn.Conv2d(4, 4, 1)).eval()
    gm, report = fxrebirth.optimize(model, torch.randn(1, 3, 18, 18), cost_model=None)
    assert report.stats("merge_conv_chain").rewrites >= 1 and len(report.guards) == 1
    assert "ceil-mode pooling" in report.guards[0]
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # a saved GraphModule is traced again on load
    for module in (gm, loaded):
        for size in (18, 20):  # whole windows: exact
            x = torch.randn(2, 3, size, size)
            assert fxrebirth.relative_error(model(x), module(x)) <= 1e-5
        with pytest.raises(fxrebirth.ShapeGuardError, match="merge_conv_chain"):
            module(torch.randn(2, 3, 19, 19))  # a partial last window: the merged conv would be wrong


# -------------------------------------------- ceil-mode max pooling in floor mode (a lowering for OpenVINO)


@st.composite
def ceil_max_pools(draw):
    """A conv and a ceil-mode max pooling of random geometry at a random size whose output is not empty."""
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = tuple(draw(st.integers(0, ki // 2)) for ki in k)
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    size = (draw(st.integers(1, 11)), draw(st.integers(1, 11)))
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.MaxPool2d(k, s, p, d, ceil_mode=True))
    x = torch.randn(2, 2, *size)
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError:
        hypothesis.assume(False)  # PyTorch's own output would be empty
    return model, x


def _partial_windows(model, x) -> int:
    """1 where PyTorch's ceil mode gives more windows than floor mode would (computed from its output)."""
    pool = model[1]
    with torch.no_grad():
        out = model(x).shape[2:]
    floor = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in
             zip(x.shape[2:], pool.kernel_size, pool.stride, pool.padding, pool.dilation)]
    return int(any(o > f for o, f in zip(out, floor)))


@pytest.mark.fxrebirth_rule
def test_a_ceil_mode_max_pooling_is_floor_mode_after_a_minus_infinity_pad():
    """Exact wherever a last window is partial (f64, f32), guarded to the size it was made at (the kit
    accepts the guard's error at the other sizes), refused where every window is whole."""
    check_rule(pooling.PadCeilMaxPool(), ceil_max_pools(), expected_rewrites=_partial_windows)


def test_the_ceil_pool_lowering_refuses_indices_and_whole_windows_and_guards_other_sizes():
    x = torch.randn(2, 3, 7, 7)
    class Net(nn.Module):
        def __init__(self, pool):
            super().__init__()
            self.pool = pool

        def forward(self, x):
            return self.pool(x)[0] if self.pool.return_indices else self.pool(x)

    reasons = []
    for pool in (nn.MaxPool2d(3, 2, ceil_mode=True, return_indices=True),
                 nn.MaxPool2d(3, 2, ceil_mode=True),  # 7 -> windows at 0, 2, 4: whole
                 nn.MaxPool2d(2, 2, ceil_mode=True)):  # 7 -> a partial last window
        model = Net(pool).eval()
        gm, report = fxrebirth.optimize(model, x, rules=pooling.lowering_rules())
        stats = report.stats("pad_ceil_max_pool")
        reasons.append((stats.rewrites, [r.reason for r in stats.refusals]))
        assert_equivalent(model, gm, x)
    assert reasons[0][0] == 0 and "returns indices" in reasons[0][1][0]
    assert reasons[1][0] == 0 and "no partial window at this size" in reasons[1][1][0]
    assert reasons[2][0] == 1
    with pytest.raises(fxrebirth.ShapeGuardError, match="padded for a 7x7 input"):
        gm(torch.randn(2, 3, 8, 8))
    wider = nn.Sequential(nn.MaxPool2d(3, 2, ceil_mode=True)).eval()
    _, report = fxrebirth.optimize(wider, torch.randn(2, 3, 8, 8), rules=pooling.lowering_rules(wider_only=True))
    assert "fits in its padded input" in report.stats("pad_ceil_max_pool").refusals[0].reason
    _, report = fxrebirth.optimize(wider, torch.randn(2, 3, 2, 8), rules=pooling.lowering_rules(wider_only=True))
    assert report.stats("pad_ceil_max_pool").rewrites == 1
