"""Cleanup rules: dropout, identity, no-op flatten/reshape."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxrebirth
from fxrebirth.testing import assert_equivalent, count_kind


class _Head(nn.Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        self.drop = nn.Dropout(p)
        self.id = nn.Identity()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.flatten(x, 1)  # (N, 8) already: a no-op for every batch size
        x = x.view(x.size(0), -1)  # also a no-op
        x = F.dropout(self.id(self.drop(x)), 0.2, self.training)
        return self.fc(x.reshape(-1, 8))


def test_eval_mode_cleanup_removes_everything_removable():
    model = _Head().eval()
    x = torch.randn(2, 8)
    gm, report = fxrebirth.optimize(model, x)
    assert report.stats("remove_dropout").rewrites == 2
    assert report.stats("remove_identity").rewrites == 1
    assert report.stats("remove_noop_reshape").rewrites == 3
    # only the linear, and the guard of x.reshape(-1, 8): its literal 8 holds where dim 1 is 8
    from fxrebirth.graph.guards import is_guard

    assert [n.op for n in gm.graph.nodes if not is_guard(n)].count("call_function") == 1
    assert len(report.guards) == 1 and "size(dim 1) == 8" in report.guards[0]
    assert_equivalent(model, gm, x)
    for batch in (1, 5):  # the removed reshapes were no-ops for every batch size
        assert_equivalent(model, gm, torch.randn(batch, 8))


def test_training_mode_dropout_is_kept():
    model = _Head().train()
    gm, report = fxrebirth.optimize(model, torch.randn(2, 8))
    assert report.stats("remove_dropout").rewrites == 0
    assert all("training mode" in r.reason for r in report.stats("remove_dropout").refusals)
    assert count_kind(gm, "dropout") == 2


def test_reshape_that_changes_the_shape_is_kept():
    class M(nn.Module):
        def forward(self, x):
            return x.reshape(x.size(0), 4, 2) + x.flatten(0).sum() + x.reshape(2, 8).sum()

    model, x = M(), torch.randn(2, 8)
    gm, report = fxrebirth.optimize(model, x)
    assert report.stats("remove_noop_reshape").rewrites == 0
    assert_equivalent(model, gm, x)


def test_literal_batch_size_is_not_treated_as_noop():
    class M(nn.Module):
        def forward(self, x):
            return x.view(1, 8) * 2

    gm, report = fxrebirth.optimize(M(), torch.randn(1, 8))
    assert report.stats("remove_noop_reshape").rewrites == 0


# -- x + 0, x * 1 and friends ---------------------------------------------------------------------

import operator  # noqa: E402

import pytest  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxrebirth.passes.cleanup import RemoveNeutralArithmetic  # noqa: E402
from fxrebirth.testing.kit import check_rule  # noqa: E402

_NEUTRAL_FORMS = [
    ("x + 0", lambda y: y + 0), ("0 + x", lambda y: 0 + y), ("x - 0", lambda y: y - 0),
    ("x * 1", lambda y: y * 1), ("1 * x", lambda y: 1 * y), ("x / 1", lambda y: y / 1),
    ("x + 0.0", lambda y: y + 0.0), ("x * 1.0", lambda y: y * 1.0),
]


class _Neutral(nn.Module):
    """conv -> a neutral arithmetic op -> BN, so removing the op also lets the BN fold."""

    def __init__(self, form, c: int):
        super().__init__()
        self.conv, self.bn, self.form = nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), form

    def forward(self, x):
        return self.bn(self.form(self.conv(x)))


@st.composite
def neutral_cases(draw):
    _, form = draw(st.sampled_from(_NEUTRAL_FORMS))
    c, size = draw(st.integers(1, 4)), draw(st.integers(4, 9))
    return _Neutral(form, c), torch.randn(2, c, size, size)


@pytest.mark.fxrebirth_rule
def test_neutral_arithmetic_is_removed():
    check_rule(RemoveNeutralArithmetic(), neutral_cases(), removes=[])


@pytest.mark.parametrize("form", [
    lambda y: y + 1, lambda y: y * 2, lambda y: 0 - y, lambda y: 1 / (y.abs() + 1), lambda y: y - 0 * y,
    lambda y: y + True,
], ids=["x+1", "x*2", "0-x", "1/x", "x-0*x", "x+True"])
def test_arithmetic_that_changes_the_value_is_kept(form):
    model, x = _Neutral(form, 3).eval(), torch.randn(2, 3, 6, 6)
    gm, report = fxrebirth.optimize(model, x, rules=[RemoveNeutralArithmetic()], check_output=False)
    assert report.stats("remove_neutral_arithmetic").rewrites == 0
    assert_equivalent(model, gm, x)


def test_neutral_number_that_promotes_the_dtype_is_refused():
    class M(nn.Module):
        def forward(self, idx):
            return (idx + 0.0) * 2, idx * 1  # int + 0.0 is a float tensor; int * 1 stays int

    model, x = M().eval(), torch.arange(6).reshape(2, 3)
    gm, report = fxrebirth.optimize(model, x, rules=[RemoveNeutralArithmetic()])
    stats = report.stats("remove_neutral_arithmetic")
    reasons = {r.node: r.reason for r in stats.refusals}
    assert "dtype" in reasons["'add'"]  # (idx * 1 is exact but integer: local verification cannot check it)
    out = gm(x)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.int64 and torch.equal(out[1], x)
