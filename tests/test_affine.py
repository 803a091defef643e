"""Constant scale/shift folding: equivalence properties and refusals."""

from __future__ import annotations

import operator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxrebirth
from fxrebirth.testing import assert_equivalent, count_kind
from fxrebirth.testing.strategies import conv_configs, dtypes, per_channel_constants

OPS = [operator.mul, operator.add, operator.sub, operator.truediv]


class _After(nn.Module):
    """layer(x) <op> c, or c <op> layer(x)."""

    def __init__(self, layer: nn.Module, c: torch.Tensor, op, constant_left: bool):
        super().__init__()
        self.layer, self.op, self.left = layer, op, constant_left
        self.register_buffer("c", c)

    def forward(self, x):
        y = self.layer(x)
        return self.op(self.c, y) if self.left else self.op(y, self.c)


class _Before(nn.Module):
    """layer(x <op> c)."""

    def __init__(self, layer: nn.Module, c: torch.Tensor, op):
        super().__init__()
        self.layer, self.op = layer, op
        self.register_buffer("c", c)

    def forward(self, x):
        return self.layer(self.op(x, self.c))


def _affine_nodes(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in OPS)


@given(cfg=conv_configs(st.integers(1, 3)), op=st.sampled_from(OPS), left=st.booleans(), dtype=dtypes,
       data=st.data())
def test_constant_after_conv_folds(cfg, op, left, dtype, data):
    left = left and op is not operator.truediv
    c = data.draw(per_channel_constants(cfg.out_channels, cfg.ndim + 2, nonzero=op is operator.truediv))
    model = _After(cfg.module(), c, op, left).to(dtype).eval()
    x = cfg.input(dtype=dtype)
    gm, report = fxrebirth.optimize(model, x)
    assert report.stats("affine_into_preceding").rewrites == 1
    assert _affine_nodes(gm) == 0
    assert_equivalent(model, gm, x)


@given(fin=st.integers(1, 6), fout=st.integers(1, 6), op=st.sampled_from(OPS), dtype=dtypes, data=st.data())
def test_constant_around_linear_folds(fin, fout, op, dtype, data):
    c_in = data.draw(per_channel_constants(fin, 2, channel_dim=-1, nonzero=op is operator.truediv))
    c_out = data.draw(per_channel_constants(fout, 2, channel_dim=-1, nonzero=op is operator.truediv))
    model = _After(_Before(nn.Linear(fin, fout), c_in, op), c_out, op, False).to(dtype).eval()
    x = torch.randn(3, fin, dtype=dtype)
    gm, report = fxrebirth.optimize(model, x)
    assert report.stats("affine_into_preceding").rewrites == 1
    assert report.stats("affine_into_following").rewrites == 1
    assert _affine_nodes(gm) == 0
    assert_equivalent(model, gm, x)


@given(cfg=conv_configs(st.integers(1, 3)), op=st.sampled_from(OPS), dtype=dtypes, data=st.data())
def test_constant_before_conv_folds_only_where_exact(cfg, op, dtype, data):
    c = data.draw(per_channel_constants(cfg.in_channels, cfg.ndim + 2, nonzero=op is operator.truediv))
    model = _Before(cfg.module(), c, op).to(dtype).eval()
    x = cfg.input(dtype=dtype)
    gm, report = fxrebirth.optimize(model, x)
    stats = report.stats("affine_into_following")
    shifts = op in (operator.add, operator.sub) and bool((c != 0).any())
    if shifts and any(p != 0 for p in cfg.padding):
        assert stats.rewrites == 0 and _affine_nodes(gm) == 1
        assert any("zero-pads" in r.reason for r in stats.refusals)
    else:
        assert stats.rewrites == 1 and _affine_nodes(gm) == 0
    assert_equivalent(model, gm, x)


def test_chain_of_constants_collapses_into_one_conv():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("s", torch.rand(4, 1, 1) + 0.5)

        def forward(self, x):
            return (self.conv(x * 0.5 - 0.25) * self.s + 1.0) / 4

    model = Chain().double().eval()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    gm, report = fxrebirth.optimize(model, x)
    assert _affine_nodes(gm) == 0 and count_kind(gm, "conv") == 1
    assert report.rewrites == 5
    assert_equivalent(model, gm, x)


@pytest.mark.parametrize(
    "c, op, reason",
    [
        (torch.tensor([1.0, 0.0, 2.0, 1.0]).reshape(4, 1, 1), operator.truediv, "divides by a constant that has zeros"),
        (torch.rand(4, 5, 5) + 0.5, operator.mul, "is not per-channel along the output channels"),
        (torch.rand(2, 4, 1, 1) + 0.5, operator.mul, "broadcasts its input to a larger shape"),
        (torch.rand(4, 1, 1, dtype=torch.float64) + 0.5, operator.mul, "changes the dtype"),
    ],
)
def test_refusals_after_conv(c, op, reason):
    model = _After(nn.Conv2d(3, 4, 3), c, op, False).eval()
    x = torch.randn(1, 3, 7, 7)
    gm, report = fxrebirth.optimize(model, x)
    (refusal,) = report.stats("affine_into_preceding").refusals
    assert reason in refusal.reason
    assert _affine_nodes(gm) == 1
    assert_equivalent(model, gm, x)


def test_constant_divided_by_value_is_not_matched():
    model = _After(nn.Conv2d(3, 4, 3), torch.rand(4, 1, 1) + 1, operator.truediv, True).eval()
    x = torch.randn(1, 3, 7, 7)
    gm, report = fxrebirth.optimize(model, x)
    assert report.rewrites == 0 and not report.stats("affine_into_preceding").refusals


def test_parameter_operand_is_a_constant_only_when_frozen():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.gamma = nn.Parameter(torch.rand(4, 1, 1) + 0.5)

        def forward(self, x):
            return self.conv(x) * self.gamma

    model, x = Scaled().eval(), torch.randn(1, 3, 6, 6)
    gm, report = fxrebirth.optimize(model, x)
    assert report.stats("affine_into_preceding").rewrites == 1
    assert_equivalent(model, gm, x)
    gm, report = fxrebirth.optimize(model, x, frozen=False)
    (refusal,) = report.stats("affine_into_preceding").refusals
    assert "frozen=False" in refusal.reason
    assert_equivalent(model, gm, x)
