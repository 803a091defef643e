"""Issue 37, the whole-model check: what float32 makes of an exact fold, models that run only at their
example's batch, and differences the graph does not show (gradients, the caller's autocast).

* A fold of a large constant shift into the following layer is exact, but its float32 result cancels
  (``|shift| * |W|`` against a small output): the rounding criterion (:mod:`fxrebirth.rewrite.precision`)
  refuses it, naming the rewrite, while zoo-like models (normalised inputs, realistic BatchNorms) pass;
  ``report.output_error`` is the float32 figure users see, the float64 one is ``output_error64``.
* A model that runs only at its example's batch is checked there, with the reason in the report.
* Where the model trains, gradients are compared; under the caller's autocast, the float32 runs are.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxrebirth
from fxrebirth.equivalence import NOISE_FACTOR, relative_error, tolerance
from fxrebirth.errors import EquivalenceError
from fxrebirth.testing import randomize_batchnorm
from fxrebirth.rewrite.endtoend import compare, gradient_error
from fxrebirth.rewrite.precision import float32_check, judge


def _float32_error(model: nn.Module, gm: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(original, optimised): each one's float32 distance from the original's float64 output."""
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        return relative_error(exact, model(x)), relative_error(exact, gm(x))


# -- models whose exact fold float32 cannot evaluate ----------------------------------------------------

class ShiftedBatchNorm(nn.Module):
    """BN with a huge running mean (un-normalised sensor data) before a conv without padding. The BN
    kernel cancels too (it computes ``x * s + t``); the folded conv sums ``K = 8 * 5 * 5`` such terms."""

    def __init__(self, mean: float = 1e4) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 5)
        with torch.no_grad():
            self.bn.running_mean.fill_(mean).add_(torch.rand(8))
            self.bn.running_var.uniform_(1.0, 4.0)

    def forward(self, x):
        return self.conv(self.bn(x))


class ScaledShift(nn.Module):
    """``(x - c) * s`` then a Linear: a hand-written normalisation of large raw values."""

    def __init__(self, c: float = 5e4, s: float = 0.01) -> None:
        super().__init__()
        self.c, self.s, self.fc = c, s, nn.Linear(32, 6)

    def forward(self, x):
        return self.fc((x - self.c) * self.s)


class OffsetConv1d(nn.Module):
    """A constant added before a Conv1d (a signal model that re-centres its input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 5)

    def forward(self, x):
        return self.conv(x + 2e4)


CANCELLING = [
    ("bn_mean_1e4", ShiftedBatchNorm, lambda: 1e4 + 2 * torch.randn(1, 8, 12, 12), "bn_into_following"),
    ("scaled_shift_linear", ScaledShift, lambda: 5e4 + 3 * torch.randn(2, 32), "affine_into_following"),
    ("offset_conv1d", OffsetConv1d, lambda: torch.randn(1, 3, 40) - 2e4, "affine_into_following"),
]


@pytest.mark.parametrize("name, make, data, rule", CANCELLING, ids=[c[0] for c in CANCELLING])
def test_a_fold_that_cancels_in_float32_is_rolled_back_naming_it(name, make, data, rule):
    torch.manual_seed(0)
    model, x = make().eval(), data()
    own, _ = _float32_error(model, model, x)
    gm, report = fxrebirth.optimize(model, x)
    (refusal,) = [r for r in report.stats(rule).refusals if "rolled back by the whole-model check" in r.reason]
    assert "from the exact output" in refusal.reason
    assert any(c.startswith(f"{rule!r} at {refusal.node}: rolled back") for c in report.checks)
    _, mine = _float32_error(model, gm, x)
    assert mine <= max(tolerance(torch.float32), NOISE_FACTOR * own)  # the model returned adds no such noise
    assert report.output_error <= max(tolerance(torch.float32), NOISE_FACTOR * own)
    assert report.output_error64 is not None and "rounding: float32" in str(report)


@pytest.mark.parametrize("on_mismatch", ["raise", "fallback"])
def test_without_rollbacks_left_the_rewrite_is_named_in_the_error_or_the_fallback(monkeypatch, on_mismatch):
    from fxrebirth.frontends import library

    monkeypatch.setattr(library, "ROLLBACKS", 0)
    torch.manual_seed(0)
    model, x = OffsetConv1d().eval(), torch.randn(1, 3, 40) - 2e4
    if on_mismatch == "raise":
        with pytest.raises(EquivalenceError, match=r"loses precision in float32.*rule 'affine_into_following'"):
            fxrebirth.optimize(model, x)
        return
    gm, report = fxrebirth.optimize(model, x, on_mismatch="fallback")
    assert any(c.startswith("fallback:") and "affine_into_following" in c for c in report.checks)
    assert report.output_error > tolerance(torch.float32)  # the figure users would have seen
    assert report.output_error64 < report.output_error and "in float64:" in str(report)
    with torch.no_grad():
        assert relative_error(model(x), gm(x)) <= tolerance(torch.float32)


def test_the_criterion_called_directly_sees_the_cancellation_the_float64_check_accepts():
    torch.manual_seed(1)
    model = ShiftedBatchNorm(mean=3e3).eval()
    x = 3e3 + torch.randn(2, 8, 10, 10)
    gm, _ = fxrebirth.optimize(model, x, check_output=False)
    outcome = compare(model, gm, (x,))
    assert outcome.error <= 1e-4  # float64: the algebra is exact up to the folded weights' rounding
    check = float32_check(model, gm, outcome)
    assert check is not None and not check.passed and check.samples >= 8
    assert check.optimised > NOISE_FACTOR * check.original


# -- zoo-like models: must not be flagged ------------------------------------------------------------

def _resnet_block() -> nn.Module:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.a = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            y = self.stem(x)
            y = torch.relu(self.a(y) + y)
            return self.head(y.mean((2, 3)))
    return Block()


class Normalised(nn.Module):
    """torchvision-style input normalisation of 0..255 pixels, then a conv without padding, a
    pre-activation BN before a conv (DenseNet style), a depthwise block (MobileNet style)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([123.7, 116.3, 103.5]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([58.4, 57.1, 57.4]).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                                nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12))

    def forward(self, x):
        y = self.conv((x - self.mean) / self.std)
        return self.dw(torch.relu(self.bn(y)))


ZOO_LIKE = [
    ("resnet_block", _resnet_block, lambda: torch.randn(1, 3, 32, 32)),
    ("normalised_pixels", Normalised, lambda: torch.rand(1, 3, 24, 24) * 255),
    ("bn_before_linear", lambda: nn.Sequential(nn.Flatten(), nn.BatchNorm1d(48), nn.Linear(48, 7)),
     lambda: torch.randn(2, 3, 4, 4) * 3 + 1),
]


@pytest.mark.parametrize("name, make, data", ZOO_LIKE, ids=[c[0] for c in ZOO_LIKE])
def test_zoo_like_models_pass_the_criterion_and_report_the_float32_figure(name, make, data):
    torch.manual_seed(2)
    model = make()
    randomize_batchnorm(model, torch.Generator().manual_seed(3))
    model.eval()
    x = data()
    gm, report = fxrebirth.optimize(model, x)
    assert report.rewrites >= 1
    rounding = [c for c in report.checks if c.startswith("rounding:")]
    assert len(rounding) == 1 and "within the limit" in rounding[0], report.checks
    assert report.output_error64 is not None and report.output_error != report.output_error64
    with torch.no_grad():  # the figure is the float32 one: of the order of what float32 run here gives
        direct = relative_error(model(x), gm(x))
    assert report.output_error <= tolerance(torch.float32) and direct <= tolerance(torch.float32)


def test_a_float64_model_has_no_rounding_criterion_and_keeps_its_float64_figure():
    model = ShiftedBatchNorm().double().eval()
    x = 1e4 + torch.randn(1, 8, 8, 8, dtype=torch.float64)
    _, report = fxrebirth.optimize(model, x)
    assert not any(c.startswith("rounding:") for c in report.checks)
    assert report.output_error == report.output_error64 <= tolerance(torch.float64)


def test_a_check_in_the_models_own_dtype_has_no_float64_figure(monkeypatch):
    from fxrebirth.rewrite import endtoend

    monkeypatch.setattr(endtoend, "FLOAT64_LIMIT", 0)  # as for a model whose float64 copy would not fit
    model = randomize_batchnorm(_resnet_block()).eval()
    _, report = fxrebirth.optimize(model, torch.randn(1, 3, 16, 16))
    assert report.output_error64 is None and not any(c.startswith("rounding:") for c in report.checks)
    assert any("float32 (a float64 copy" in c for c in report.checks)
    assert report.output_error <= tolerance(torch.float32)


# -- models that run only at their example's batch ----------------------------------------------------

class FlattenAll(nn.Module):
    def __init__(self, how: str, batch: int = 1) -> None:
        super().__init__()
        self.how, self.batch = how, batch
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc = nn.Linear((1 if how == "reshape" else batch) * 4 * 6 * 6, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        if self.how == "reshape":
            y = y.reshape(self.batch, -1)
        elif self.how == "view":
            y = y.view(-1)
        else:
            y = torch.flatten(y, 0)
        return self.fc(y)


@pytest.mark.parametrize("how, batch", [("reshape", 1), ("view", 1), ("flatten", 1)])
def test_a_model_that_runs_only_at_its_examples_batch_is_checked_there(how, batch):
    model = FlattenAll(how, batch)
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(batch, 3, 8, 8)
    gm, report = fxrebirth.optimize(model, x)
    assert report.rewrites >= 1
    notes = [c for c in report.checks if "the example's batch only" in c]
    assert notes and "does not run at batch >= 2" in notes[0] and "cannot be multiplied" in notes[0]
    assert report.output_error <= tolerance(torch.float32)
    with torch.no_grad():
        assert relative_error(model(x), gm(x)) <= tolerance(torch.float32)


# -- gradients and autocast: differences the graph does not show -------------------------------------

class Backbone(nn.Module):
    """A frozen feature extractor (run under no_grad in the original) and a trained head."""

    def __init__(self, keep_no_grad: bool = True) -> None:
        super().__init__()
        self.keep = keep_no_grad
        self.backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU())
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        if self.keep:
            with torch.no_grad():
                features = self.backbone(x)
        else:
            features = self.backbone(x)
        return self.head(features)


def _twin_of(model: nn.Module, other: nn.Module) -> nn.Module:
    other.load_state_dict(model.state_dict())
    return other


def test_a_lost_no_grad_region_is_a_gradient_mismatch():
    original = Backbone(True)
    candidate = _twin_of(original, Backbone(False))
    x = torch.randn(1, 3, 8, 8)
    assert compare(original, candidate, (x,)).error == 0.0  # the forward cannot tell them apart
    outcome = compare(original, candidate, (x,), gradients=True)
    assert outcome.error == float("inf") and "gradient reaches" in outcome.detail
    assert compare(original, copy.deepcopy(original), (x,), gradients=True).error == 0.0


def test_a_lost_backward_hook_is_a_gradient_mismatch():
    def make() -> nn.Module:
        torch.manual_seed(4)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))

    original, candidate = make(), make()
    original[2].register_full_backward_hook(lambda m, grad_in, grad_out: (grad_in[0].clamp(-1e-3, 1e-3),))
    x = torch.randn(1, 3, 8, 8)
    error, note = gradient_error(original, candidate, (x,))
    assert error > 1e-3 and "worst at the gradient of" in note
    assert compare(original, candidate, (x,)).error == 0.0


def test_a_parameter_that_stops_training_is_a_gradient_mismatch():
    torch.manual_seed(5)
    original = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    candidate = copy.deepcopy(original)
    candidate[0].weight.requires_grad_(False)  # e.g. a rewrite that turned a parameter into a buffer
    error, note = gradient_error(original, candidate, (torch.randn(2, 4),))
    assert error == float("inf") and "'0.weight'" in note


def test_optimize_compares_gradients_where_the_model_trains():
    model = _resnet_block()
    model.train()
    x = torch.randn(2, 3, 16, 16)
    _, report = fxrebirth.optimize(model, x, frozen=False)
    gradients = [c for c in report.checks if "gradients:" in c]
    assert gradients and float(gradients[0].rsplit("gradients: ", 1)[1].split()[0]) <= 1e-10
    _, frozen = fxrebirth.optimize(model.eval(), x)
    assert not any("gradients:" in c for c in frozen.checks)


class ForcedFloat32Head(nn.Module):
    """A head that forces float32 under any autocast (the idiom for numerically sensitive layers)."""

    def __init__(self, keep_region: bool = True) -> None:
        super().__init__()
        self.keep = keep_region
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        y = torch.tanh(self.fc(x))
        if self.keep:
            with torch.autocast("cpu", enabled=False):
                return self.out(y.float())
        return self.out(y)


def test_a_lost_autocast_region_is_seen_under_the_callers_autocast():
    torch.manual_seed(6)
    original = ForcedFloat32Head(True)
    candidate = _twin_of(original, ForcedFloat32Head(False))
    x = torch.randn(4, 16)
    outcome = compare(original, candidate, (x,))
    assert outcome.error == 0.0  # float64 ignores autocast: the float64 check cannot see it
    assert judge(original, candidate, outcome.references).passed  # nor can a float32 run without autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check = judge(original, candidate, outcome.references)
    assert not check.passed and "autocast (cpu, bfloat16)" in check.context
    assert "bfloat16" in check.detail  # the output's dtype changed


def test_optimize_under_the_callers_autocast_judges_under_it():
    torch.manual_seed(7)
    model = _resnet_block()
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gm, report = fxrebirth.optimize(model, x)
    rounding = [c for c in report.checks if c.startswith("rounding:")]
    assert rounding and "under the caller's autocast (cpu, bfloat16)" in rounding[0]
    assert "within the limit" in rounding[0]
    assert tolerance(torch.float32) < report.output_error <= tolerance(torch.bfloat16)  # bfloat16's noise


def test_the_new_checks_never_run_the_users_hooked_model():
    """Hooks that write to their module (as spectral_norm's does) run on copies only."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    randomize_batchnorm(model)
    model[0].seen = model[3].backward_seen = 0

    def forward_seen(module, args):
        module.seen += 1

    def backward_seen(module, grad_in, grad_out):
        module.backward_seen += 1

    model[0].register_forward_pre_hook(forward_seen)
    model[3].register_full_backward_hook(backward_seen)
    x = torch.randn(1, 3, 8, 8)
    for frozen in (True, False):
        model.train(not frozen)
        _, report = fxrebirth.optimize(model, x, frozen=frozen)
        assert any(c.startswith("rounding:") for c in report.checks) and (frozen or "gradients:" in str(report))
    assert model[0].seen == 0 and model[3].backward_seen == 0
