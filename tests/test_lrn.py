"""LRN rewritten as a 2-D average pooling (passes/lrn.py): proven by property tests, refused where it must
be, and what it is for: the Caffe networks' LRN loads in ExecuTorch after it and not before."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import fxrebirth
from fxrebirth.frontends.deploy import lower_for, needs_lowering
from fxrebirth.frontends.library import default_rules
from fxrebirth.graph.ops import kind_of
from fxrebirth.passes import lrn
from fxrebirth.testing import assert_equivalent
from fxrebirth.testing.kit import check_rule


@st.composite
def conv_then_lrn(draw):
    channels = draw(st.integers(1, 9))
    size = draw(st.integers(1, 7))  # odd windows pool with padding, even ones pad first (asymmetric)
    alpha = draw(st.floats(0.0, 2.0))
    beta = draw(st.floats(0.1, 1.5))
    k = draw(st.one_of(st.just(0.0), st.floats(0.5, 3.0)))  # k = 0: the base may not be positive, pow stays
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    model = nn.Sequential(nn.Conv2d(2, channels, 1), nn.LocalResponseNorm(size, alpha, beta, k))
    return model, torch.randn(draw(st.integers(2, 3)), 2, h, w)


@pytest.mark.fxrebirth_rule
def test_lrn_of_a_4d_tensor_becomes_an_average_pooling_of_its_squares():
    check_rule(lrn.LrnAsAvgPool2d(), conv_then_lrn(), removes=["lrn"])


def test_the_rewrite_leaves_no_3d_pooling():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.LocalResponseNorm(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 5, 5)
    gm, report = fxrebirth.optimize(model, x, rules=lrn.rules())
    assert report.stats("lrn_as_avg_pool2d").rewrites == 1
    assert not [n for n in gm.graph.nodes if n.target in (F.avg_pool3d, F.local_response_norm)]
    assert [n for n in gm.graph.nodes if n.target is F.avg_pool2d]
    assert [n for n in gm.graph.nodes if n.target is torch.exp] and not [n for n in gm.graph.nodes if n.target is torch.pow]
    for size in (5, 9):  # the rewrite has no size guard: it holds at every input size
        assert_equivalent(model, gm, torch.randn(2, 3, size, size + 2))


def test_the_power_stays_a_power_where_its_base_may_not_be_positive():
    model = nn.LocalResponseNorm(3, alpha=1e-4, beta=0.75, k=0.0).eval()
    x = torch.randn(2, 6, 4, 4)
    gm, _ = fxrebirth.optimize(model, x, rules=lrn.rules())
    assert [n for n in gm.graph.nodes if n.target is torch.pow] and not [n for n in gm.graph.nodes if n.target is torch.log]
    assert_equivalent(model, gm, x)


@pytest.mark.parametrize("shape", [(2, 6, 7), (2, 6, 3, 4, 4)])
def test_lrn_of_another_rank_is_refused(shape):
    model = nn.LocalResponseNorm(3).eval()
    x = torch.randn(*shape)
    gm, report = fxrebirth.optimize(model, x, rules=lrn.rules())
    (refusal,) = report.stats("lrn_as_avg_pool2d").refusals
    assert f"normalises a {len(shape)}-D tensor; only 4-D inputs are rewritten" in refusal.reason
    assert_equivalent(model, gm, x)


def test_the_rule_is_offered_but_not_a_default():
    """Measured faster in eager and slower to nobody yet, but ONNX Runtime and OpenVINO have their own LRN
    kernel: the rule is a lowering for runtimes without one, not part of every optimisation."""
    assert "lrn_as_avg_pool2d" not in {r.name for r in default_rules()}
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LocalResponseNorm(3)).eval()
    gm, _ = fxrebirth.optimize(model, torch.randn(2, 3, 4, 4))
    assert [n for n in gm.graph.nodes if kind_of(n) == "lrn"]


def test_lowering_for_executorch_rewrites_lrn_and_nothing_else():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LocalResponseNorm(3)).eval()
    x = torch.randn(1, 3, 6, 6)
    assert needs_lowering(model, "executorch") and not needs_lowering(model, "openvino")
    same, note = lower_for(model, "onnxruntime", x)
    assert same is model and note == ""
    lowered, note = lower_for(model, "executorch", x)
    assert note == "1 LRN rewritten exactly as avg_pool2d"
    assert [n for n in lowered.graph.nodes if kind_of(n) == "batch_norm"], "only LRN is lowered"
    assert_equivalent(model, lowered, torch.randn(2, 3, 6, 6))


def test_the_user_model_is_not_changed():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LocalResponseNorm(3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxrebirth.optimize(model, torch.randn(2, 3, 4, 4), rules=lrn.rules())
    assert isinstance(model[1], nn.LocalResponseNorm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
