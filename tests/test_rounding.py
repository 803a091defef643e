"""The whole-model check on models that float32 cannot evaluate to 1e-5: rounding is not a wrong rewrite.

Folding stores new weights in float32; when a model amplifies that rounding (a large offset removed
later, deep random networks), the optimised model differs from the original by more than 1e-5 even
in float64 arithmetic, although every rewrite is exact. :func:`fxrebirth.optimize` then proves the
rewrites on a float64 twin (the same pipeline on a float64 copy: no rounding at all) and accepts the
float32 model when the twin applied the same rewrites to the same code, giving it the twin's weights
rounded to float32 (``fxrebirth.equivalence.WEIGHT_ROUNDING``). A wrong rewrite fails the twin and is
still refused; so is a rule whose float32 graph is not its float64 one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrebirth
from fxrebirth.equivalence import relative_error
from fxrebirth.graph.ops import kind_of
from fxrebirth.rewrite.cost import RooflineCost

OFFSET = 1e4  # a float32 ulp at 1e4 is 2**-10: one rounding there is ~5e-4 of an O(1) signal


def _offset_model(seed: int = 0) -> nn.Module:
    """conv -> BN that adds OFFSET (folded into the conv's bias, which float32 must round) -> ReLU ->
    BN that removes OFFSET (it follows the ReLU, so it cannot fold): the rounding of the folded bias
    reaches the output undiminished, and so does the original's own rounding of OFFSET + signal."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.BatchNorm2d(6))
    with torch.no_grad():
        first, last = model[1], model[3]
        first.running_mean.uniform_(-0.5, 0.5)
        first.running_var.uniform_(0.5, 2.0)
        first.weight.uniform_(0.5, 1.5)
        first.bias.fill_(OFFSET).add_(torch.rand(6))
        last.running_mean.copy_(first.bias)
        last.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _own_error(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        exact = _double(model)(x.double())
        return relative_error(exact, model(x))


def _double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def _accumulation_bound(model: nn.Module, x: torch.Tensor, exact: torch.Tensor) -> float:
    """What float32 may lose on the folded model, whatever the order a CPU's convolution sums in: each
    output of the folded conv is a sum of K = 27 products and its bias at magnitude ~OFFSET, and a
    float32 sum of n terms errs by at most n * u * (sum of |terms|) (u = 2**-24); one rounding more for the
    stored bias and one for the last BatchNorm's subtraction; that BatchNorm then scales by up to
    max|weight / sqrt(var + eps)|. (It replaced a bound of twice the original's own float32 error, which
    held on an AVX-512 CPU and not on an AVX2 one: the two sum the bias in at different steps.)"""
    conv, first, last = model[0], model[1], model[3]
    with torch.no_grad():
        terms = nn.functional.conv2d(x.double().abs(), conv.weight.double().abs(), None, padding=1)
        scale_1 = (first.weight / torch.sqrt(first.running_var + first.eps)).double().abs()
        shift_1 = (first.bias - first.running_mean * first.weight / torch.sqrt(first.running_var + first.eps)).double()
        magnitude = (terms * scale_1.view(1, -1, 1, 1) + shift_1.abs().view(1, -1, 1, 1)).max().item()
        scale_2 = (last.weight / torch.sqrt(last.running_var + last.eps)).abs().max().item()
    k = conv.weight[0].numel()
    return (k + 3) * 2.0**-24 * magnitude * scale_2 / exact.abs().max().item()


@pytest.mark.parametrize("size", [6, 11])
def test_an_exact_fold_that_float32_rounds_is_accepted_with_its_figures(size):
    model, x = _offset_model(), torch.randn(2, 3, size, size)
    own = _own_error(model, x)
    assert own > 1e-5  # the premise: float32 cannot evaluate this model to 1e-5
    gm, report = fxrebirth.optimize(model, x)
    assert report.stats("bn_into_preceding").rewrites == 1
    assert sum(1 for n in gm.graph.nodes if kind_of(n) == "batch_norm") == 1
    with torch.no_grad():
        exact = _double(model)(x.double())
        assert relative_error(exact, gm(x)) <= _accumulation_bound(model, x, exact)
    text = " ".join(report.checks)
    assert "float64 twin" in text and "float32 rounding" in text and "rounded to torch.float32" in text


def test_the_premise_is_real_without_the_twin():
    """The control: the plain float64 check with the folded weights in float32 is above 1e-5."""
    model, x = _offset_model(), torch.randn(2, 3, 6, 6)
    gm, _ = fxrebirth.optimize(model, x, check_output=False)
    with torch.no_grad():
        assert relative_error(_double(model)(x.double()), _double(gm)(x.double())) > 1e-5


def test_a_wrong_rewrite_hidden_below_float32_rounding_is_still_refused():
    model, x = _offset_model(), torch.randn(2, 3, 6, 6)
    assert _own_error(model, x) > 1e-4  # the wrong rule's error hides inside the original's own rounding
    with pytest.raises(fxrebirth.EquivalenceError, match="slightly_wrong_bn"):
        fxrebirth.optimize(model, x, rules=fxrebirth.default_rules() + [_SlightlyWrongBatchNorm()], verify=False)


def test_a_well_conditioned_model_needs_no_twin():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)).eval()
    _, report = fxrebirth.optimize(model, torch.randn(2, 3, 8, 8))
    assert not any("float64 twin" in c for c in report.checks)


class _BatchNormAfterReLU(fxrebirth.Rule):
    """A BatchNorm after a ReLU as ``x * s + t`` (exact); subclasses get it wrong in float32 only."""

    name = "bn_after_relu"

    def pattern(self, node, ctx):
        if kind_of(node) == "batch_norm" and kind_of(node.kwargs["input"]) == "relu":
            return fxrebirth.Match(output=node, inputs=(node.kwargs["input"],), nodes=(node,))
        return None

    offset = 0.0

    def scale_and_shift(self, match, ctx):
        kw = match.output.kwargs
        mean, var = ctx.constant(kw["running_mean"]).double(), ctx.constant(kw["running_var"]).double()
        weight, bias = ctx.constant(kw["weight"]).double(), ctx.constant(kw["bias"]).double()
        scale = weight / torch.sqrt(var + kw["eps"])
        like = ctx.stored(kw["running_var"])
        shift = ctx.add_tensor("t", (bias - mean * scale + self.offset).reshape(1, -1, 1, 1), like)
        return ctx.add_tensor("s", self.stored_scale(scale, like.dtype).reshape(1, -1, 1, 1), like), shift

    def stored_scale(self, scale, dtype):
        return scale

    def rewrite(self, match, ctx):
        scale, shift = self.scale_and_shift(match, ctx)
        return ctx.call(torch.addcmul, like=match.output, input=shift, tensor1=match.inputs[0], tensor2=scale)


class _SlightlyWrongBatchNorm(_BatchNormAfterReLU):
    """A deliberately wrong rule: the shift ``t`` off by 1e-4, an error smaller than the offset model's own
    float32 rounding, so only the float64 twin can see it."""

    name = "slightly_wrong_bn"
    offset = 1e-4


class _ImpreciseInFloat32(_BatchNormAfterReLU):
    """Right graph, imprecise weights: in float32 the scale is first rounded to bfloat16 (8 bits)."""

    name = "imprecise_bn_after_relu"

    def stored_scale(self, scale, dtype):
        return scale.to(torch.bfloat16).double() if dtype == torch.float32 else scale


class _OtherGraphInFloat32(_BatchNormAfterReLU):
    """Wrong in float32 only, and by its graph: there it drops the shift (``x * s``)."""

    name = "other_graph_bn_after_relu"

    def rewrite(self, match, ctx):
        if ctx.stored(match.output.kwargs["running_var"]).dtype != torch.float32:
            return super().rewrite(match, ctx)
        scale, _ = self.scale_and_shift(match, ctx)
        return ctx.call(torch.mul, like=match.output, input=match.inputs[0], other=scale)


def _conv_relu_bn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(6))
    with torch.no_grad():
        model[2].running_mean.uniform_(-0.5, 0.5)
        model[2].running_var.uniform_(0.5, 2.0)
        model[2].weight.uniform_(0.5, 1.5)
        model[2].bias.uniform_(-1, 1)
    return model.eval()


@pytest.mark.parametrize("size", [6, 11])
def test_imprecise_float32_weights_are_replaced_by_the_twins(size, caplog):
    """A rule with the right graph but weights rounded to bfloat16 in float32: the check sees 1e-3, the
    twin proves the graph, and the returned model carries the twin's weights rounded to float32."""
    model, x = _conv_relu_bn(), torch.randn(2, 3, size, size)
    rules = [_ImpreciseInFloat32()]
    careless, _ = fxrebirth.optimize(model, x, rules=rules, check_output=False, verify=False)
    with torch.no_grad():
        assert relative_error(model(x), careless(x)) > 1e-4  # the premise: bfloat16 weights are visible
    with caplog.at_level("WARNING"):
        gm, report = fxrebirth.optimize(model, x, rules=rules, verify=False)  # the local check would catch it
    assert report.stats("imprecise_bn_after_relu").rewrites == 1
    with torch.no_grad():
        assert relative_error(model(x), gm(x)) <= 1e-6
    assert "replaced by the float64 twin" in caplog.text
    assert any("rounded to torch.float32" in c for c in report.checks)


def test_a_rule_whose_float32_graph_differs_from_its_float64_one_is_refused():
    model, x = _conv_relu_bn(), torch.randn(2, 3, 6, 6)
    with pytest.raises(fxrebirth.EquivalenceError, match="other code.*other_graph_bn_after_relu"):
        fxrebirth.optimize(model, x, rules=[_OtherGraphInFloat32()], verify=False)


def test_weight_rounding_measures_units_of_roundoff():
    from fxrebirth.rewrite.endtoend import adopt_weights, weight_rounding

    exact = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3))).double()
    rounded = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3)))
    big, small = exact.get_submodule("0"), rounded.get_submodule("0")
    with torch.no_grad():
        big.weight.copy_(torch.randn(4, 3, 3, 3, dtype=torch.float64))
        small.weight.copy_(big.weight)
        small.bias.copy_(big.bias)
    assert weight_rounding(rounded, exact) <= 1.0
    with torch.no_grad():
        small.weight[0, 0, 0, 0] += 1e-4 * big.weight.abs().max().item()
    assert weight_rounding(rounded, exact) > 1000
    assert adopt_weights(rounded, exact) and weight_rounding(rounded, exact) <= 1.0
    other = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())).double()
    assert weight_rounding(rounded, other) is None and not adopt_weights(rounded, other)


class _Float32Gate(RooflineCost):
    """A cost gate that accepts every merge in a float32 graph and none in any other dtype: the float64
    twin must replay the float32 run's verdicts, not ask again (float64 doubles every byte count)."""

    dtype = None

    def node_cost(self, node):
        self.dtype = node.meta["tensor_meta"].dtype
        return super().node_cost(node)

    def accepts(self, rule, site, before_s, after_s):
        return self.dtype == torch.float32


def test_the_twin_replays_the_cost_gates_verdicts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 6, 3), nn.ReLU(), nn.BatchNorm2d(6))
    with torch.no_grad():  # the offset passes the ReLU (positive weights) and the last BatchNorm removes it
        model[1].bias.fill_(OFFSET)
        model[2].weight.uniform_(0.0, 0.2)
        model[4].running_mean.copy_(model[2](model[1](model[0](torch.zeros(1, 3, 3, 3)))).flatten())
    model, x = model.eval(), torch.randn(2, 3, 7, 7)
    assert _own_error(model, x) > 1e-5  # the whole-model check needs the twin
    gm, report = fxrebirth.optimize(model, x, cost_model=_Float32Gate())
    assert report.stats("merge_conv_chain").rewrites == 1
    assert any("float64 twin" in c for c in report.checks)
