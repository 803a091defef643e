"""BatchNorm folding: equivalence properties (float64 and float32), refusals, and correctness cases."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import fxrebirth
from fxrebirth.passes import batchnorm
from fxrebirth.testing import assert_equivalent, count_kind
from fxrebirth.testing.kit import check_rule
from fxrebirth.testing.strategies import batchnorm_modules, conv_configs


def _optimize(model: nn.Module, x: torch.Tensor, **kwargs):
    gm, report = fxrebirth.optimize(model, x, **kwargs)
    gm.graph.lint()
    return gm, report


(PRECEDING,), (FOLLOWING,) = batchnorm.rules("preceding"), batchnorm.rules("following")


@st.composite
def conv_then_bn(draw, transposed: bool = False):
    cfg = draw(conv_configs(st.integers(1, 3), transposed=transposed))
    return nn.Sequential(cfg.module(), draw(batchnorm_modules(cfg.out_channels, cfg.ndim))), cfg.input()


@st.composite
def bn_then_conv(draw):
    cfg = draw(conv_configs(st.integers(1, 3)))
    return nn.Sequential(draw(batchnorm_modules(cfg.in_channels, cfg.ndim)), cfg.module()), cfg.input()


@st.composite
def linear_and_bn(draw, bn_first: bool):
    fin, fout = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    linear = nn.Linear(fin, fout, bias=draw(st.booleans()))
    bn = draw(batchnorm_modules(fin if bn_first else fout, 1))
    return nn.Sequential(*((bn, linear) if bn_first else (linear, bn))), torch.randn(3, fin)


def bn_shift(bn: nn.Module) -> torch.Tensor:
    scale = (bn.weight if bn.affine else 1) / torch.sqrt(bn.running_var + bn.eps)
    return (bn.bias if bn.affine else 0) - bn.running_mean * scale


def _exact_before_conv(model: nn.Module, x: torch.Tensor) -> int:
    """1 when a BatchNorm may fold into the conv after it: no padding, or a zero shift."""
    bn, conv = model[0], model[1]
    return int(all(p == 0 for p in conv.padding) or bool((bn_shift(bn).detach() == 0).all()))


@pytest.mark.fxrebirth_rule
def test_bn_after_conv_folds():
    check_rule(PRECEDING, conv_then_bn(), removes=["batch_norm"])


@pytest.mark.fxrebirth_rule
def test_bn_after_conv_transpose_folds():
    check_rule(PRECEDING, conv_then_bn(transposed=True), removes=["batch_norm"])


@pytest.mark.fxrebirth_rule
def test_bn_around_linear_folds():
    check_rule(PRECEDING, linear_and_bn(bn_first=False), removes=["batch_norm"])
    check_rule(FOLLOWING, linear_and_bn(bn_first=True), removes=["batch_norm"])


@pytest.mark.fxrebirth_rule
def test_bn_before_conv_folds_only_where_exact():
    check_rule(FOLLOWING, bn_then_conv(), expected_rewrites=_exact_before_conv)


def test_bn_before_padded_conv_reports_the_reason():
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
    model = nn.Sequential(bn, nn.Conv2d(3, 4, 3, padding=1)).eval()
    x = torch.randn(1, 3, 6, 6)
    gm, report = _optimize(model, x)
    assert any("zero-pads" in r.reason for r in report.stats("bn_into_following").refusals)
    assert count_kind(gm, "batch_norm") == 1
    assert_equivalent(model, gm, x)


def test_shift_before_padded_conv_is_refused_and_would_be_wrong():
    """The refusal is not caution: folding the shift anyway breaks the border (verification catches it)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.bias.uniform_(-1, 1)
    model = nn.Sequential(bn, nn.Conv2d(3, 4, 3, padding=1)).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    _, report = _optimize(model, x)
    (refusal,) = report.stats("bn_into_following").refusals
    assert "zero-pads (padding=(1, 1))" in refusal.reason

    class Careless(type(FOLLOWING)):
        def check(self, match, ctx):
            return None

    careless = Careless("careless_bn_into_following", batchnorm.BatchNormSource(), "BatchNorm")
    gm, report = _optimize(model, x, rules=[careless])
    stats = report.stats("careless_bn_into_following")
    assert stats.rewrites == 0 and stats.rolled_back == 1
    assert "verification failed" in stats.refusals[0].reason
    assert_equivalent(model, gm, x)


class _TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _CalledTwice(nn.Module):
    """The conv MODULE is called twice; only one call is followed by BN (fx's fuse gets this wrong)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(torch.relu(x))


class _SharedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.b.weight = self.a.weight
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_a(self.a(x)) - self.bn_b(self.b(x))


def _prepared(model: nn.Module) -> nn.Module:
    fxrebirth.testing.randomize_batchnorm(model)
    return model.eval()


def test_conv_output_with_two_users_is_refused():
    model = _prepared(_TwoUsers())
    x = torch.randn(2, 3, 8, 8)
    gm, report = _optimize(model, x)
    (refusal,) = report.stats("bn_into_preceding").refusals
    assert refusal.reason == "the output of 'conv' (node conv2d) has 2 users; folding would change the others"
    assert count_kind(gm, "batch_norm") == 1
    assert_equivalent(model, gm, x)


def test_module_called_twice_stays_equivalent():
    model = _prepared(_CalledTwice())
    x = torch.randn(2, 4, 8, 8)
    gm, report = _optimize(model, x)
    assert report.stats("bn_into_preceding").rewrites == 1
    assert count_kind(gm, "batch_norm") == 0
    assert count_kind(gm, "conv") == 2
    assert_equivalent(model, gm, x)


def test_shared_weights_fold_into_separate_copies():
    model = _prepared(_SharedWeights())
    x = torch.randn(2, 4, 8, 8)
    gm, report = _optimize(model, x)
    assert report.stats("bn_into_preceding").rewrites == 2
    assert_equivalent(model, gm, x)
    assert model.a.weight is model.b.weight  # the user's tie is untouched


def test_training_mode_is_refused_and_statistics_untouched():
    model = fxrebirth.testing.randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.train()
    before = copy.deepcopy(model.state_dict())
    gm, report = _optimize(model, torch.randn(2, 3, 8, 8))
    (refusal,) = report.stats("bn_into_preceding").refusals
    assert "is in training mode" in refusal.reason and "model.eval()" in refusal.reason
    assert report.output_error == 0.0  # checked on copies of the statistics, which a training forward updates
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(gm.get_submodule("1").running_mean, before["1.running_mean"])


def test_batch_statistics_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = torch.randn(4, 3, 8, 8)
    gm, report = _optimize(model, x)
    (refusal,) = report.stats("bn_into_preceding").refusals
    assert "batch statistics (track_running_stats=False)" in refusal.reason
    assert_equivalent(model, gm, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_folds_in_float64_and_casts_back(dtype):
    model = _prepared(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    model = model.to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    gm, report = _optimize(model, x)
    assert report.stats("bn_into_preceding").rewrites == 1
    assert all(p.dtype == dtype for p in gm.parameters())
    assert report.stats("bn_into_preceding").max_error < 1e-12  # the algebra, checked in float64
    # Against a float64 reference, the folded half model is as close as the original half model.
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = reference(x.double())
        err_original = ((model(x).double() - ref).abs().max() / ref.abs().max()).item()
        err_folded = ((gm(x).double() - ref).abs().max() / ref.abs().max()).item()
    assert err_folded <= 2 * err_original + fxrebirth.testing.tolerance(dtype) / 4


def test_channels_last_weights_and_inputs():
    model = _prepared(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    gm, report = _optimize(model, x)
    assert report.stats("bn_into_preceding").rewrites == 1
    (weight,) = [p for p in gm.parameters() if p.dim() == 4]
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert_equivalent(model, gm, x)


def test_folded_parameters_stay_trainable_parameters():
    model = _prepared(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    gm, _ = _optimize(model, torch.randn(1, 3, 8, 8))
    params = dict(gm.named_parameters())
    assert len(params) == 2 and all(p.requires_grad for p in params.values())


def test_standalone_bn_to_affine_is_opt_in():
    model = _prepared(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(2, 4, 5, 5)
    gm, report = _optimize(model, x)
    assert count_kind(gm, "batch_norm") == 1
    rules = fxrebirth.default_rules() + [batchnorm.BatchNormToAffine()]
    gm, report = _optimize(model, x, rules=rules)
    assert report.stats("bn_to_affine").rewrites == 1
    assert count_kind(gm, "batch_norm") == 0
    assert_equivalent(model, gm, x)


def test_eps_passed_as_an_argument_is_the_examples_constant_and_another_value_is_refused():
    """A non-tensor forward argument is traced as the constant the example gives (issue 37): the fold uses
    that eps, and a call with another eps fails with an error naming the argument, never silently."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x, eps):
            bn = self.bn
            return F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, eps)

    model, x = fxrebirth.testing.randomize_batchnorm(M()).eval(), torch.randn(2, 3, 6, 6)
    gm, report = fxrebirth.optimize(model, (x, 1e-3))
    assert report.stats("bn_into_preceding").rewrites == 1
    assert fxrebirth.relative_error(model(x, 1e-3), gm(x, 1e-3)) <= 1e-5
    with pytest.raises(AssertionError, match="'eps'"):
        gm(x, 1e-2)
