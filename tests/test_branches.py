"""Parallel branches: RepVGG, ACNet and DBB blocks written plainly, sums, concatenations, siblings."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import fxrebirth
from fxrebirth.testing import assert_equivalent, count_kind, randomize_batchnorm
from fxrebirth.passes import branches as branches_rules
from fxrebirth.testing.kit import check_rule


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """RepVGG's training-time block (Ding et al., 2021), written without any re-parameterisation code."""

    def __init__(self, c, stride=1):
        super().__init__()
        self.dense = conv_bn(c, c, 3, stride, 1)
        self.pointwise = conv_bn(c, c, 1, stride, 0)
        self.identity = nn.BatchNorm2d(c) if stride == 1 else None

    def forward(self, x):
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return F.relu(out)


class ACBlock(nn.Module):
    """ACNet's asymmetric convolution block (Ding et al., 2019): 3x3 + 1x3 + 3x1, each with BN."""

    def __init__(self, cin, cout):
        super().__init__()
        self.square = conv_bn(cin, cout, (3, 3), padding=(1, 1))
        self.hor = conv_bn(cin, cout, (1, 3), padding=(0, 1))
        self.ver = conv_bn(cin, cout, (3, 1), padding=(1, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


class DBBBlock(nn.Module):
    """Diverse Branch Block's branch types that zero padding keeps exact (Ding et al., 2021):
    kxk+BN, 1x1+BN, avg-pool+BN, and 1x1 -> kxk with the kxk unpadded (input padded up front)."""

    def __init__(self, c, k=3, stride=1):
        super().__init__()
        self.kxk = conv_bn(c, c, k, stride, k // 2)
        self.one = conv_bn(c, c, 1, stride, 0)
        self.avg = nn.Sequential(nn.AvgPool2d(k, stride, k // 2), nn.BatchNorm2d(c))
        self.one_kxk = nn.Sequential(nn.ZeroPad2d(k // 2), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c),
                                     nn.Conv2d(c, c, k, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return self.kxk(x) + self.one(x) + self.avg(x) + self.one_kxk(x)


def _prepare(model, dtype=torch.float32):
    return randomize_batchnorm(model).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_repvgg_collapses_to_one_3x3_conv_and_relu_per_block(dtype):
    model = _prepare(nn.Sequential(RepVGGBlock(8), RepVGGBlock(8, stride=2), RepVGGBlock(8)), dtype)
    x = torch.randn(2, 8, 16, 16, dtype=dtype)
    gm, report = fxrebirth.optimize(model, x)
    convs = [n for n in gm.graph.nodes if fxrebirth.graph.ops.kind_of(n) == "conv"]
    assert len(convs) == 3 and count_kind(gm, "batch_norm") == 0 and count_kind(gm, "relu") == 3
    assert all(tuple(gm.get_parameter(c.kwargs["weight"].target).shape[2:]) == (3, 3) for c in convs)
    assert sum(1 for n in gm.graph.nodes if n.target is operator.add) == 0
    assert_equivalent(model, gm, x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_acnet_block_collapses_to_one_3x3_conv(dtype):
    model = _prepare(ACBlock(4, 6), dtype)
    x = torch.randn(2, 4, 10, 10, dtype=dtype)
    gm, report = fxrebirth.optimize(model, x)
    assert count_kind(gm, "conv") == 1 and count_kind(gm, "batch_norm") == 0
    assert report.stats("merge_summed_branches").rewrites == 2
    assert_equivalent(model, gm, x)


@pytest.mark.parametrize("stride", [1, 2])
def test_dbb_block_collapses_to_one_conv(stride):
    model = _prepare(DBBBlock(6, stride=stride), torch.float64)
    x = torch.randn(2, 6, 12, 12, dtype=torch.float64)
    gm, report = fxrebirth.optimize(model, x, cost_model=None)
    assert count_kind(gm, "conv") == 1 and count_kind(gm, "avg_pool") == 0 and count_kind(gm, "batch_norm") == 0
    assert_equivalent(model, gm, x)


@st.composite
def summed_branches(draw):
    """Parallel branches on one input whose kernel centres line up: kernel k with padding P - (K - k)/2."""
    c, cout = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    big = draw(st.sampled_from([3, 5]))
    pad = dilation * (big // 2)
    branches = []
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.sampled_from([1, 3, 5]))
        k = min(k, big)
        kh, kw = draw(st.sampled_from([(k, k), (1, k), (k, 1)]))
        padding = (pad - dilation * ((big - kh) // 2), pad - dilation * ((big - kw) // 2))
        branches.append(nn.Conv2d(c, cout, (kh, kw), stride, padding, dilation, bias=draw(st.booleans())))
    extra = draw(st.sampled_from(["none", "identity", "bn", "avg"])) if cout == c and stride == 1 else "none"
    return c, branches, extra


class Summed(nn.Module):
    """Branches combined by ``+`` or ``-`` (``signs[i]`` combines branch ``i + 1``, ``signs[-1]`` the extra
    branch): sums and differences (FastViT's ``mixer(x) - norm(x)``) obey the same identity."""

    def __init__(self, branches, extra, c, signs=None):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.extra = extra
        self.signs = list(signs) if signs is not None else [operator.add] * len(branches)
        self.bn = nn.BatchNorm2d(c)
        self.avg = nn.AvgPool2d(3, 1, 1)

    def forward(self, x):
        out = self.branches[0](x)
        for combine, b in zip(self.signs, self.branches[1:]):
            out = combine(out, b(x))
        combine = self.signs[-1]
        if self.extra == "identity":
            out = combine(out, x)
        elif self.extra == "bn":
            out = combine(out, self.bn(x))
        elif self.extra == "avg":
            out = combine(self.avg(x), out)
        return out


@st.composite
def summed_cases(draw):
    c, branches, extra = draw(summed_branches())
    signs = draw(st.lists(st.sampled_from([operator.add, operator.sub]), min_size=len(branches), max_size=len(branches)))
    return randomize_batchnorm(Summed(branches, extra, c, signs)), torch.randn(2, c, 9, 9)


@pytest.mark.fxrebirth_rule
def test_summed_branches_merge():
    check_rule(branches_rules.MergeSummedBranches(), summed_cases(), removes=["avg_pool", "batch_norm"],
               expected_rewrites=lambda m, x: len(m.branches) - 1 + (m.extra != "none"))


def test_summed_branches_with_different_strides_are_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(3, 4, 1, 2, 0)
            self.c = nn.Conv2d(3, 4, 3, 1, 1)

        def forward(self, x):
            return self.a(x) + self.c(x)[:, :, ::2, ::2] + self.b(x)

    model, x = M().eval(), torch.randn(1, 3, 8, 8)
    gm, report = fxrebirth.optimize(model, x, cost_model=None)
    assert_equivalent(model, gm, x)


def test_branch_with_another_user_is_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.b(x)
            return self.a(x) + y, y

    model, x = M().eval(), torch.randn(1, 3, 8, 8)
    gm, report = fxrebirth.optimize(model, x, cost_model=None)
    (refusal,) = report.stats("merge_summed_branches").refusals
    assert "has 2 users" in refusal.reason
    assert_equivalent(model, gm, x)


class Inception(nn.Module):
    """An inception module's shape: three 1x1 convs on the input (one a branch, two reduce layers),
    a pool-projection branch, concatenated."""

    def __init__(self, c):
        super().__init__()
        self.b1 = nn.Conv2d(c, 4, 1)
        self.r2, self.b2 = nn.Conv2d(c, 3, 1), nn.Conv2d(3, 5, 3, padding=1)
        self.r3, self.b3 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, 3, 5, padding=2)
        self.pool, self.b4 = nn.MaxPool2d(3, 1, 1), nn.Conv2d(c, 2, 1)

    def forward(self, x):
        return torch.cat([F.relu(self.b1(x)), F.relu(self.b2(F.relu(self.r2(x)))),
                          F.relu(self.b3(F.relu(self.r3(x)))), F.relu(self.b4(self.pool(x)))], 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sibling_1x1_convs_of_an_inception_module_merge(dtype):
    model = Inception(6).to(dtype).eval()
    x = torch.randn(2, 6, 8, 8, dtype=dtype)
    gm, report = fxrebirth.optimize(model, x)
    assert report.stats("merge_sibling_convs").rewrites == 1
    assert count_kind(gm, "conv") == 4 and count_kind(gm, "narrow") == 3
    assert_equivalent(model, gm, x)


class _Concat(nn.Module):
    def __init__(self, kernels, others):
        super().__init__()
        self.others = others
        self.convs = nn.ModuleList(nn.Conv2d(3, i + 1, k, padding=k // 2) for i, k in enumerate(kernels))

    def forward(self, x):
        parts = [c(x) for c in self.convs]
        if self.others:
            parts = [x * 2.0] + parts + [F.relu(x)]
        return torch.cat(parts, 1)


@st.composite
def concat_cases(draw):
    kernels = draw(st.lists(st.sampled_from([1, 3, 5]), min_size=2, max_size=4))
    return _Concat(kernels, draw(st.booleans())), torch.randn(2, 3, 7, 7)


@pytest.mark.fxrebirth_rule
def test_concatenated_branches_merge():
    check_rule(branches_rules.MergeConcatBranches(), concat_cases())


def test_slices_of_merged_siblings_collapse_in_a_cat():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            a, b = self.a(x), self.b(x)
            return torch.cat([a, b], 1) * 2.0, a.sum() + b.mean()

    model, x = M().eval(), torch.randn(2, 3, 5, 5)
    gm, report = fxrebirth.optimize(model, x, cost_model=None)
    assert report.stats("merge_sibling_convs").rewrites == 1
    assert report.stats("collapse_cat_of_slices").rewrites == 1
    assert count_kind(gm, "cat") == 0
    assert_equivalent(model, gm, x)
