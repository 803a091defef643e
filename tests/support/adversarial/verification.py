"""Cases of class ``verification``: deliberately wrong user rules (right only at batch 1, at the
example's size, or never; rules that edit weights in place, rewire users themselves, return a wrong
shape) and a float16 fold that overflows: verification must catch each one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxrebirth.frontends.library import default_rules as _default_rules
from fxrebirth.graph.ops import kind_of
from fxrebirth.rewrite.rules import Match, Rule
from tests.support.adversarial.builders import ConvBN, AddCase, seeded_case, conv_bn, images


def _clamp0(ctx, match, value):
    """relu as ``torch.clamp(min=0)``: not a canonical relu, so the wrong rule does not match its own
    output again (an even number of flips or negations would be the identity)."""
    return ctx.call(torch.clamp, like=match.output, input=value, min=0.0)


class _WrongReLURule(Rule):
    """Base of the deliberately wrong rules on ``relu(x)``: a subclass says what it puts in place of ``x``
    (:meth:`wrong`); the result is clamped at 0 (see :func:`_clamp0`)."""

    changes_parameters = False

    def pattern(self, node, ctx):
        if kind_of(node) == "relu" and isinstance(node.kwargs["input"], torch.fx.Node):
            return Match(output=node, inputs=(node.kwargs["input"],), nodes=(node,))
        return None

    def wrong(self, x, match, ctx):
        raise NotImplementedError

    def rewrite(self, match, ctx):
        return _clamp0(ctx, match, self.wrong(match.inputs[0], match, ctx))


class _FlipBatchRule(_WrongReLURule):
    """WRONG: relu(x) -> relu(flip(x, batch)): right only for batch <= 1."""

    name = "adversarial_flip_batch"
    identity = "relu(x) = relu(flip(x, 0))  (false for batch > 1)"

    def wrong(self, x, match, ctx):
        return ctx.call(torch.flip, like=match.output, input=x, dims=[0])


class _BatchMeanRule(_WrongReLURule):
    """WRONG: relu(x) -> relu(mean over the batch of x, broadcast back): right only for batch <= 1."""

    name = "adversarial_batch_mean"
    identity = "relu(x) = relu(mean_batch(x) + 0 * x)  (false for batch > 1)"

    def wrong(self, x, match, ctx):
        mean = ctx.call(torch.mean, like=match.output, input=x, dim=(0,), keepdim=True)
        zeros = ctx.call(torch.mul, like=match.output, input=x, other=0.0)
        return ctx.call(torch.add, like=match.output, input=zeros, other=mean)


class _NegateRule(_WrongReLURule):
    """WRONG for every input: relu(x) -> relu(-x)."""

    name = "adversarial_negate"
    identity = "relu(x) = relu(-x)  (false)"

    def wrong(self, x, match, ctx):
        return ctx.call(torch.neg, like=match.output, input=x)


class _SpatialSpecialisedRule(Rule):
    """WRONG at other sizes: adaptive_avg_pool(x, 1) -> avg_pool(x, kernel = the example's H x W)."""

    name = "adversarial_fixed_window"
    identity = "adaptive_avg_pool(x, 1) = avg_pool(x, kernel=(H, W) of the example)  (false at other sizes)"
    changes_parameters = False

    def pattern(self, node, ctx):
        if kind_of(node) == "adaptive_avg_pool" and tuple(node.kwargs["output_size"]) == (1, 1):
            return Match(output=node, inputs=(node.kwargs["input"],), nodes=(node,))
        return None

    def rewrite(self, match, ctx):
        shape = ctx.shape(match.inputs[0])
        return ctx.call(F.avg_pool2d, like=match.output, input=match.inputs[0], kernel_size=tuple(shape[2:]))


class _EditWeightRule(Rule):
    """Edits a conv weight IN PLACE in rewrite(), then returns a value that fails verification."""

    name = "adversarial_edit_weight"
    identity = "conv(x) = relu(x)  (false; and the weight is edited in place)"

    def pattern(self, node, ctx):
        if kind_of(node) != "conv" or not isinstance(node.kwargs["input"], torch.fx.Node):
            return None
        if ctx.shape(node) != ctx.shape(node.kwargs["input"]):
            return None
        return Match(output=node, inputs=(node.kwargs["input"],), nodes=(node,))

    def rewrite(self, match, ctx):
        with torch.no_grad():
            ctx.stored(match.output.kwargs["weight"]).mul_(3.0)
        return ctx.call(F.relu, like=match.output, input=match.inputs[0])


class _EditConstantRule(_EditWeightRule):
    """Edits the tensor ``ctx.constant`` returned (it shares storage), then fails verification."""

    name = "adversarial_edit_constant"

    def rewrite(self, match, ctx):
        weight = ctx.constant(match.output.kwargs["weight"])
        with torch.no_grad():
            weight.add_(0.5)
        return ctx.call(F.relu, like=match.output, input=match.inputs[0])


class _RewiresItselfRule(_NegateRule):
    """Breaks the contract: rewires the users itself (a wrong value) before returning."""

    name = "adversarial_rewires_itself"

    def rewrite(self, match, ctx):
        new = _NegateRule.rewrite(self, match, ctx)
        match.output.replace_all_uses_with(new)
        return new


class _WrongShapeRule(_EditWeightRule):
    """Returns a node of a different shape (the conv's input, whose channels differ)."""

    name = "adversarial_wrong_shape"

    def pattern(self, node, ctx):
        if kind_of(node) != "conv" or not isinstance(node.kwargs["input"], torch.fx.Node):
            return None
        return Match(output=node, inputs=(node.kwargs["input"],), nodes=(node,))

    def rewrite(self, match, ctx):
        return match.inputs[0]


def _rules_then_defaults(*rules: Rule) -> list:
    return list(rules) + list(_default_rules())


class _ReluNet(ConvBN):
    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.conv2(self.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(self.pool(y), 1))


def _fp16_overflow_stats(model: nn.Module) -> None:
    """running_var 1e-6, weight 2000: BN's scale 2000 / sqrt(1.1e-5) = 6.0e5 > float16's 65504."""
    bn = model[1]
    bn.running_mean.zero_()
    bn.running_var.fill_(1e-6)
    bn.weight.fill_(2000.0)
    bn.bias.zero_()


def verification_cases(add: AddCase) -> None:
    """The ``verification`` cases, in catalog order."""
    add("wrong_rule_flip_batch_b1", "verification", seeded_case(300, _ReluNet), example=(1, 18),
        options=lambda: {"rules": _rules_then_defaults(_FlipBatchRule())},
        description="user rule relu(x) -> relu(flip(x, 0)) (right only at batch 1), batch-1 example")
    add("wrong_rule_batch_mean_b1", "verification", seeded_case(301, _ReluNet), example=(1, 18),
        options=lambda: {"rules": [_BatchMeanRule()]},
        description="user rule relu(x) -> relu(mean over batch), batch-1 example")
    add("wrong_rule_batch0", "verification", seeded_case(302, _ReluNet), example=(0, 18),
        options=lambda: {"rules": _rules_then_defaults(_NegateRule())},
        description="user rule relu(x) -> relu(-x) (always wrong), batch-0 example")
    add("wrong_rule_spatial_specialised", "verification", seeded_case(303, _ReluNet),
        options=lambda: {"rules": _rules_then_defaults(_SpatialSpecialisedRule())},
        description="user rule adaptive_avg_pool(1) -> avg_pool(kernel = example H x W)")
    add("rule_edits_weight_in_place", "verification", seeded_case(304, lambda: nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))),
        options=lambda: {"rules": [_EditWeightRule()]},
        description="rule multiplies a conv weight in place in rewrite(), then fails verification")
    add("rule_edits_constant_in_place", "verification", seeded_case(305, lambda: nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))),
        options=lambda: {"rules": [_EditConstantRule()]},
        description="rule edits the tensor ctx.constant() returned, then fails verification")
    add("rule_rewires_users_itself", "verification", seeded_case(306, _ReluNet),
        options=lambda: {"rules": [_RewiresItselfRule()]},
        description="rule breaks the contract: rewires users to a wrong value itself")
    add("rule_returns_wrong_shape", "verification", seeded_case(307, lambda: nn.Sequential(conv_bn(), nn.ReLU())),
        options=lambda: {"rules": [_WrongShapeRule()]},
        description="rule returns a node of another shape (the conv's input)")
    add("fp16_bn_fold_overflow", "verification", seeded_case(309, lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)),
                dtype=torch.float16, after=_fp16_overflow_stats),
        images(3, 309, dtype=torch.float16, scale=1e-3),
        description="float16 conv->BN with running_var 1e-6, weight 2000: folded weight overflows")
