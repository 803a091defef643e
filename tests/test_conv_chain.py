"""Chains: conv after conv (and average pooling as a conv), linear after linear, flatten-conv-linear."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn

import fxrebirth
from fxrebirth.testing import assert_equivalent, count_kind
from fxrebirth.passes import conv_chain
from fxrebirth.testing.kit import check_rule
from fxrebirth.testing.strategies import conv_configs

EXACT_ONLY = dict(cost_model=None)  # accept every exact merge: these tests prove the algebra, not the gate


CHAIN = conv_chain.MergeConvChain()


@st.composite
def conv_after_conv(draw):
    first = draw(conv_configs(2))
    conv1 = first.module()
    with torch.no_grad():
        mid = conv1(first.input()).shape[2:]
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if first.out_channels % g == 0]))
    k2 = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    d2 = draw(st.tuples(st.integers(1, 2), st.integers(1, 2)))
    assume(all(m >= d * (k - 1) + 1 for m, k, d in zip(mid, k2, d2)))
    conv2 = nn.Conv2d(first.out_channels, groups * draw(st.integers(1, 3)), k2,
                      stride=draw(st.tuples(st.integers(1, 2), st.integers(1, 2))), dilation=d2, groups=groups,
                      bias=draw(st.booleans()))
    return nn.Sequential(conv1, conv2), first.input()


@st.composite
def pointwise_then_padded(draw):
    cfg = draw(conv_configs(st.integers(1, 3), padding=st.integers(1, 2)))
    cin = draw(st.integers(1, 4))
    pointwise = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[cfg.ndim](cin, cfg.in_channels, 1, bias=False)
    return nn.Sequential(pointwise, cfg.module()), torch.randn((2, cin) + cfg.size)


@pytest.mark.fxrebirth_rule
def test_conv_after_conv_merges():
    check_rule(CHAIN, conv_after_conv())


@pytest.mark.fxrebirth_rule
def test_pointwise_then_padded_conv_merges_with_the_padding():
    check_rule(CHAIN, pointwise_then_padded())


@pytest.mark.parametrize("bias", [True, False])
def test_padded_second_conv_after_a_3x3_is_refused(bias):
    model = nn.Sequential(nn.Conv2d(3, 4, 3 if not bias else 1, bias=bias), nn.Conv2d(4, 5, 3, padding=1)).eval()
    x = torch.randn(1, 3, 9, 9)
    gm, report = fxrebirth.optimize(model, x, **EXACT_ONLY)
    (refusal,) = report.stats("merge_conv_chain").refusals
    assert "zero-pads the first one's output (padding=(1, 1))" in refusal.reason
    assert count_kind(gm, "conv") == 2
    assert_equivalent(model, gm, x)


def test_the_refusal_is_needed_verification_catches_a_forced_padded_merge():
    """With the precondition removed, the composed kernel is wrong at the border: verification rolls it back."""
    from fxrebirth.passes import conv_chain
    from dataclasses import replace

    from fxrebirth.passes._kernel import compose, kernel_of_conv

    class Careless(conv_chain.MergeConvChain):
        name = "careless_chain"

        def _merged(self, match, ctx):
            k1 = kernel_of_conv(match["first"], ctx)
            k2 = kernel_of_conv(match.output, ctx)
            k2 = replace(k2, padding=(0, 0))
            return replace(compose(k1, k2), padding=(1, 1))

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 5, 3, padding=1)).double().eval()
    x = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    gm, report = fxrebirth.optimize(model, x, rules=[Careless()], cost_model=None)
    assert report.stats("careless_chain").rolled_back == 1
    assert_equivalent(model, gm, x)


@st.composite
def conv_then_avg_pool(draw):
    c, k, pool = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(2, 3))
    pad = min(draw(st.integers(0, 1)), pool // 2)
    model = nn.Sequential(nn.Conv2d(c, 3, k), nn.AvgPool2d(pool, draw(st.integers(1, 3)), pad))
    return model, torch.randn(2, c, 9, 9)


@pytest.mark.fxrebirth_rule
def test_average_pooling_after_conv_merges_unless_it_pads():
    check_rule(CHAIN, conv_then_avg_pool(), expected_rewrites=lambda model, x: int(model[1].padding == 0))


def test_average_pooling_before_conv_merges_and_count_include_pad_false_is_refused():
    x = torch.randn(2, 3, 8, 8)
    exact = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.Conv2d(3, 4, 3)).eval()
    gm, report = fxrebirth.optimize(exact, x, **EXACT_ONLY)
    assert report.stats("merge_conv_chain").rewrites == 1
    assert_equivalent(exact, gm, x)
    inexact = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Conv2d(3, 4, 3)).eval()
    gm, report = fxrebirth.optimize(inexact, x, **EXACT_ONLY)
    assert "count_include_pad=False" in report.stats("merge_conv_chain").refusals[0].reason
    assert_equivalent(inexact, gm, x)


@st.composite
def linear_chains(draw):
    sizes = draw(st.lists(st.integers(1, 8), min_size=3, max_size=4))
    bias = draw(st.booleans())
    return nn.Sequential(*(nn.Linear(a, b, bias=bias) for a, b in zip(sizes, sizes[1:]))), torch.randn(3, sizes[0])


@pytest.mark.fxrebirth_rule
def test_linear_chain_merges():
    check_rule(conv_chain.MergeLinearChain(), linear_chains(), expected_rewrites=lambda model, x: len(model) - 1)


def test_cost_gate_refuses_a_slower_merge_and_force_overrides_it():
    """A 1x1 reduce (64 -> 8) before a 3x3 (8 -> 64): merged, the 3x3 would run on all 64 channels."""
    model = nn.Sequential(nn.Conv2d(64, 8, 1), nn.Conv2d(8, 64, 3)).eval()
    x = torch.randn(1, 64, 28, 28)
    gm, report = fxrebirth.optimize(model, x)
    stats = report.stats("merge_conv_chain")
    assert stats.rewrites == 0
    assert stats.refusals[0].reason.startswith("cost gate: estimated")
    (decision,) = stats.decisions
    assert not decision.accepted and decision.after_s > decision.before_s
    assert "merge_conv_chain" in report.table() and "cost gate" in report.table()
    gm, report = fxrebirth.optimize(model, x, force=["merge_conv_chain"])
    assert report.stats("merge_conv_chain").rewrites == 1 and report.stats("merge_conv_chain").decisions[0].forced
    assert_equivalent(model, gm, x)


def test_cost_gate_accepts_a_cheaper_merge():
    """A 3x3 (8 -> 64) then a 1x1 back to 8: merged, one 3x3 8 -> 8."""
    model = nn.Sequential(nn.Conv2d(8, 64, 3), nn.Conv2d(64, 8, 1)).eval()
    x = torch.randn(1, 8, 28, 28)
    gm, report = fxrebirth.optimize(model, x)
    assert report.stats("merge_conv_chain").rewrites == 1
    assert report.flops_after < report.flops_before / 4
    assert_equivalent(model, gm, x)


def test_flattened_full_size_conv_merges_into_the_linear():
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(6, 2)).eval()
    x = torch.randn(5, 4, 3, 3)
    gm, report = fxrebirth.optimize(model, x, **EXACT_ONLY)
    assert report.stats("merge_flattened_conv_into_linear").rewrites == 1
    assert count_kind(gm, "conv") == 0 and count_kind(gm, "linear") == 1
    assert_equivalent(model, gm, x)


def test_measured_and_table_cost_models_drive_the_gate():
    from fxrebirth.rewrite.cost import MeasuredCost, TableCost, measure_latency, node_signature

    model = nn.Sequential(nn.Conv2d(8, 64, 3), nn.Conv2d(64, 8, 1)).eval()
    x = torch.randn(1, 8, 20, 20)
    gm, report = fxrebirth.optimize(model, x, cost_model=MeasuredCost(repeats=3))
    (decision,) = report.stats("merge_conv_chain").decisions
    assert decision.before_s > 0 and decision.after_s > 0
    assert_equivalent(model, gm, x)
    captured = fxrebirth.capture(model, x)
    table = measure_latency(captured, (x,), repeats=2)
    convs = [n for n in captured.graph.nodes if fxrebirth.graph.ops.kind_of(n) == "conv"]
    assert {node_signature(n) for n in convs} <= set(table)
    # A table claiming the two layers are nearly free makes any merged layer look slower: refused.
    cheap = {node_signature(n): 1e-9 for n in convs}
    gm, report = fxrebirth.optimize(model, x, cost_model=TableCost(cheap))
    assert report.stats("merge_conv_chain").rewrites == 0
    assert report.stats("merge_conv_chain").refusals[0].reason.startswith("cost gate")
