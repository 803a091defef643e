"""The testing kit proves correct rules and catches wrong ones (a small mutation test of the kit),
and the tutorial's worked example is proven with it."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import pytest
import torch
from hypothesis import strategies as st
from torch import nn

from fxrebirth.passes import batchnorm, conv_chain, pooling
from fxrebirth.passes._fold import Affine
from fxrebirth.testing import randomize_batchnorm
from fxrebirth.testing.kit import check_rule
from fxrebirth.testing.strategies import batchnorm_modules, conv_configs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from weight_standardization import FoldWeightStandardization, WSConv2d  # noqa: E402


@st.composite
def pad_then_conv(draw):
    cfg = draw(conv_configs(2))
    p = draw(st.integers(1, 2))
    return nn.Sequential(nn.ZeroPad2d(p), cfg.module()), cfg.input()


@st.composite
def conv_then_bn(draw):
    cfg = draw(conv_configs(2))
    return nn.Sequential(cfg.module(), draw(batchnorm_modules(cfg.out_channels, 2, affine=True))), cfg.input()


@st.composite
def bn_then_grouped_conv(draw):
    groups = draw(st.integers(2, 3))
    cin = groups * draw(st.integers(1, 3))
    conv = nn.Conv2d(cin, groups * draw(st.integers(1, 2)), draw(st.integers(1, 3)), groups=groups)
    return nn.Sequential(draw(batchnorm_modules(cin, 2)), conv), torch.randn(2, cin, 6, 6)


@st.composite
def conv_chains(draw):
    k1 = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    k2 = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    model = nn.Sequential(nn.Conv2d(2, 3, k1), nn.Conv2d(3, 2, k2))
    return model, torch.randn(1, 2, 7, 7)


# -- deliberately wrong variants of real rules --------------------------------------------------

class OffByOnePadding(pooling.FoldPadIntoConv):
    name = "off_by_one_padding"

    def _padding(self, match):
        padding = super()._padding(match)
        return padding if isinstance(padding, str) else tuple(p + 1 for p in padding)


class _NoShift:
    """A BatchNorm reader that forgets the shift: the folded layer misses its bias term."""

    def input_of(self, node):
        return batchnorm.BatchNormSource().input_of(node)

    def affine(self, node, ctx):
        affine = batchnorm.BatchNormSource().affine(node, ctx)
        return affine if isinstance(affine, str) else Affine(affine.scale, None, affine.rank)


def missing_bias_rule():
    return type(batchnorm.rules("preceding")[0])("missing_bias_term", _NoShift(), "BatchNorm")


class TransposedKernel(conv_chain.MergeConvChain):
    name = "transposed_kernel"

    def _merged(self, match, ctx):
        kernel = super()._merged(match, ctx)
        if isinstance(kernel, str):
            return kernel
        weight = kernel.weight.transpose(-1, -2)
        return replace(kernel, weight=weight, stride=kernel.stride[::-1], padding=kernel.padding[::-1])


class ForgottenGroups(type(batchnorm.rules("following")[0])):
    """Folds a BatchNorm into a grouped conv as if every group read all input channels."""

    def rewrite(self, match, ctx):
        layer = match["layer"]
        saved = dict(layer.kwargs)
        layer.kwargs = dict(saved, groups=1)
        try:
            return super().rewrite(match, ctx)
        finally:
            layer.kwargs = saved


MUTANTS = [
    (OffByOnePadding(), pad_then_conv(), "pad"),
    (missing_bias_rule(), conv_then_bn(), "batch_norm"),
    (TransposedKernel(), conv_chains(), None),
    (ForgottenGroups("forgotten_groups", batchnorm.BatchNormSource(), "BatchNorm"), bn_then_grouped_conv(), None),
]


@pytest.mark.fxrebirth_rule
@pytest.mark.parametrize("rule, cases, removes", MUTANTS, ids=[m[0].name for m in MUTANTS])
def test_the_kit_catches_a_wrong_rule_and_shows_a_shrunk_example(rule, cases, removes):
    with pytest.raises(BaseException) as info:
        check_rule(rule, cases, removes=[removes] if removes else (), max_examples=200)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Failing test case" in notes or "Falsifying example" in notes, notes
    assert "original (captured):" in notes and "def forward" in notes  # readable PyTorch of the shrunk case


CORRECT = [
    (pooling.FoldPadIntoConv(), pad_then_conv(), "pad"),
    (batchnorm.rules("preceding")[0], conv_then_bn(), "batch_norm"),
    (conv_chain.MergeConvChain(), conv_chains(), None),
    (batchnorm.rules("following")[0], bn_then_grouped_conv(), "batch_norm"),
]


@pytest.mark.fxrebirth_rule
@pytest.mark.parametrize("rule, cases, removes", CORRECT, ids=[m[0].name for m in CORRECT])
def test_the_correct_rules_pass_the_same_checks(rule, cases, removes):
    """At the profile's number of examples (60 in ci, 600 thorough; it was a fixed 100): each of these
    rules also has its own proof, over the same kind of cases, in its family's test file."""
    expected = (lambda model, x: 0 if _shift_meets_padding(model) else 1) if rule.name == "bn_into_following" else 1
    check_rule(rule, cases, removes=[removes] if removes and rule.name != "bn_into_following" else (),
               expected_rewrites=expected)


def _shift_meets_padding(model):
    bn, conv = model[0], model[1]
    shift = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
        -bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    return any(p != 0 for p in conv.padding) and bool((shift != 0).any())


@st.composite
def ws_convs(draw):
    cfg = draw(conv_configs(2))
    layer = WSConv2d(cfg.in_channels, cfg.out_channels, cfg.kernel_size, cfg.stride, cfg.padding, cfg.dilation,
                     cfg.groups, cfg.bias)
    with torch.no_grad():
        layer.gain.uniform_(0.5, 1.5)
    model = nn.Sequential(layer, nn.BatchNorm2d(cfg.out_channels))
    return randomize_batchnorm(model), cfg.input()


@pytest.mark.fxrebirth_rule
def test_tutorial_rule_is_proven_by_the_kit():
    check_rule(FoldWeightStandardization(), ws_convs(), leaf_modules=[WSConv2d], max_examples=60)


def test_tutorial_rule_composes_with_the_default_rules():
    import fxrebirth
    from fxrebirth.testing import assert_equivalent, count_kind

    model, x = randomize_batchnorm(nn.Sequential(WSConv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))).eval(), \
        torch.randn(2, 3, 8, 8)
    rules = [FoldWeightStandardization()] + fxrebirth.default_rules()
    gm, report = fxrebirth.optimize(model, x, rules=rules, leaf_modules=[WSConv2d])
    assert report.stats("fold_weight_standardization").rewrites == 1
    assert report.stats("bn_into_preceding").rewrites == 1 and count_kind(gm, "batch_norm") == 0
    assert_equivalent(model, gm, x)


def test_plugin_fixtures(check_rule, assert_equivalent, equivalence_tolerance):
    from fxrebirth.testing import TOLERANCES, assert_equivalent as public
    from fxrebirth.testing.kit import check_rule as public_check

    assert check_rule is public_check and assert_equivalent is public and equivalence_tolerance == TOLERANCES


def test_plugin_imports_nothing_heavy():
    import subprocess

    code = "import sys, fxrebirth_pytest; assert 'torch' not in sys.modules and 'fxrebirth' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def _double(builder):
    """A user's own op for the random-graph vocabulary: x * 2 through a custom function."""
    x, c = builder.pick()
    builder.add(builder.graph.call_function(torch.mul, (x, 2.0)), c)


def test_random_graph_vocabulary_is_extensible():
    import fxrebirth
    from hypothesis import given, settings

    from fxrebirth.testing import assert_equivalent
    from fxrebirth.testing.graphs import VOCABULARY, random_graphs

    seen = []

    @settings(max_examples=30)
    @given(gm=random_graphs(ops={**VOCABULARY, "double": _double}))
    def prove(gm):
        seen.append(any(n.target is torch.mul for n in gm.graph.nodes))
        x = torch.randn(2, gm.meta["in_channels"], 6, 6, dtype=torch.float64)
        optimized, _ = fxrebirth.optimize(gm, x)
        assert_equivalent(gm, optimized, x)

    prove()
    assert any(seen)
