"""Constant scale/shift folding: equivalence properties and refusals."""

from __future__ import annotations

import operator

import pytest
import torch
from hypothesis import strategies as st
from torch import nn

import fxrebirth
from fxrebirth.testing import assert_equivalent, count_kind
from fxrebirth.passes import affine
from fxrebirth.testing.kit import check_rule
from fxrebirth.testing.strategies import conv_configs, per_channel_constants

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


(PRECEDING,), (FOLLOWING,) = affine.rules("preceding"), affine.rules("following")


@st.composite
def conv_then_constant(draw):
    cfg = draw(conv_configs(st.integers(1, 3)))
    op = draw(st.sampled_from(OPS))
    left = draw(st.booleans()) and op is not operator.truediv
    c = draw(per_channel_constants(cfg.out_channels, cfg.ndim + 2, nonzero=op is operator.truediv))
    return _After(cfg.module(), c, op, left), cfg.input()


@st.composite
def linear_and_constant(draw, constant_first: bool):
    fin, fout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    op = draw(st.sampled_from(OPS))
    c = draw(per_channel_constants(fin if constant_first else fout, 2, channel_dim=-1,
                                   nonzero=op is operator.truediv))
    layer = nn.Linear(fin, fout)
    model = _Before(layer, c, op) if constant_first else _After(layer, c, op, False)
    return model, torch.randn(3, fin)


@st.composite
def constant_then_conv(draw):
    cfg = draw(conv_configs(st.integers(1, 3)))
    op = draw(st.sampled_from(OPS))
    c = draw(per_channel_constants(cfg.in_channels, cfg.ndim + 2, nonzero=op is operator.truediv))
    return _Before(cfg.module(), c, op), cfg.input()


def _exact_before_conv(model: nn.Module, x: torch.Tensor) -> int:
    """1 unless a non-zero shift meets a zero-padded conv."""
    shifts = model.op in (operator.add, operator.sub) and bool((model.c != 0).any())
    return int(not (shifts and any(p != 0 for p in model.layer.padding)))


@pytest.mark.fxrebirth_rule
def test_constant_after_conv_folds():
    check_rule(PRECEDING, conv_then_constant())


@pytest.mark.fxrebirth_rule
def test_constant_around_linear_folds():
    check_rule(PRECEDING, linear_and_constant(constant_first=False))
    check_rule(FOLLOWING, linear_and_constant(constant_first=True))


@pytest.mark.fxrebirth_rule
def test_constant_before_conv_folds_only_where_exact():
    check_rule(FOLLOWING, constant_then_conv(), expected_rewrites=_exact_before_conv)


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
