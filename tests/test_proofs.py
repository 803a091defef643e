"""Every exact rule says what it is and is proven: a docstring that ends with its identity, the same
identity word for word in docs/identities.md, and a property proof through ``check_rule`` (the rules
proven in their own test files are listed in ``PROVEN_IN``; the others are proven here)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st
from torch import nn

import fxrebirth
from fxrebirth import passes
from fxrebirth.passes import affine, batchnorm, branches, cleanup, pooling
from fxrebirth.rewrite.rules import PHASES, Rule
from fxrebirth.testing import randomize_batchnorm
from fxrebirth.testing.kit import check_rule
from fxrebirth.testing.strategies import conv_configs

ROOT = Path(__file__).resolve().parents[1]


def _every_rule() -> list[fxrebirth.Rule]:
    """Every rule of every family of exact rules, the opt-in ones too (lowerings for runtimes that lack an
    operation, proven the same way)."""
    families = [rule for family in passes.EXACT + passes.OPT_IN for rule in family.rules()]
    opt_in = batchnorm.rules(standalone_to_affine=True) + pooling.lowering_rules()
    rules = {r.name: r for r in fxrebirth.default_rules() + families + opt_in}
    return [rules[name] for name in sorted(rules)]


RULES = _every_rule()


def _documented() -> dict[str, str]:
    """``{rule name: identity}`` from the tables of docs/identities.md (``| `name` ... | `identity` |``)."""
    rows = re.findall(r"^\| `(\w+)`[^|]*\| `([^|]*)` \|", (ROOT / "docs" / "identities.md").read_text(), re.M)
    return dict(rows)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_every_rule_states_its_identity_in_its_docstring_and_in_the_docs(rule):
    cls = type(rule)
    assert rule.identity, f"{cls.__name__} declares no identity"
    assert "__doc__" in cls.__dict__ and cls.__dict__["__doc__"], f"{cls.__name__} has no docstring of its own"
    assert rule.identity in inspect.getdoc(cls)
    assert _documented().get(rule.name) == rule.identity, \
        f"docs/identities.md does not give {rule.name}'s identity as `{rule.identity}`"


PROVEN_IN = {
    "merge_flattened_conv_into_linear": "test_pooling.py",  # a conv_chain rule, proven with the poolings it follows
    "bn_past_pool": "test_never_wrong_retraining.py",
}
"""Rules proven neither in their family's file (``tests/test_<family>.py``, where a rule's proof is looked for
first) nor in this one: each file calls ``check_rule`` on the rule's class."""


def _family(rule: fxrebirth.Rule) -> str:
    """The family module a rule comes from: ``batchnorm`` for ``bn_into_preceding`` (whose class is shared)."""
    for family in passes.EXACT + passes.OPT_IN:
        if rule.name in {r.name for r in family.rules()}:
            return family.__name__.rsplit(".", 1)[1]
    return type(rule).__module__.rsplit(".", 1)[1]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_every_rule_has_a_property_proof(rule):
    if rule.name in PROVEN_HERE:
        return
    where = PROVEN_IN.get(rule.name, f"test_{_family(rule)}.py")
    assert (ROOT / "tests" / where).exists(), f"no property proof (check_rule) of {rule.name}: tests/{where} is missing"
    source = (ROOT / "tests" / where).read_text()
    calls = [call.strip() for call in re.findall(r"check_rule\(\s*([^,]+),", source)]
    named = (rule.name, type(rule).__name__)
    assert any(any(n in call for n in named) or call in _ALIASES.get(rule.name, ()) for call in calls), \
        f"tests/{where} has no check_rule call on {rule.name}"


_ALIASES = {  # module-level names those files give the rule they prove
    "bn_into_preceding": ("PRECEDING",), "bn_into_following": ("FOLLOWING",),
    "affine_into_preceding": ("PRECEDING",), "affine_into_following": ("FOLLOWING",),
    "merge_conv_chain": ("CHAIN",), "commute_global_pool": ("commute",),
}


# The proofs of the rules no other file proves.

@st.composite
def _conv_then(draw, middle):
    """A convolution, then ``middle(channels, draw)`` (a module), then a ReLU: the pattern inside a network."""
    config = draw(conv_configs(max_channels=5))
    model = nn.Sequential(config.module(), middle(config.out_channels, draw), nn.ReLU())
    return randomize_batchnorm(model.eval()), config.input()


class _Reshape(nn.Module):
    """``x.reshape`` to its own shape in one of the ways models write it, or a flatten of one dimension."""

    def __init__(self, form: int) -> None:
        super().__init__()
        self.form = form

    def forward(self, x):
        if self.form == 0:
            return torch.flatten(x, 2, 2)
        if self.form == 1:
            return x.reshape(x.size(0), x.size(1), x.size(2), x.size(3))
        return x.view(-1, x.size(1), x.size(2), x.size(3))


class _SlicesConcatenated(nn.Module):
    def __init__(self, channels: int, cuts: list[int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 1)
        self.edges = [0] + sorted(set(cuts)) + [channels]

    def forward(self, x):
        y = self.conv(x)
        pieces = [torch.narrow(y, 1, a, b - a) for a, b in zip(self.edges, self.edges[1:])]
        return torch.relu(torch.cat(pieces, 1))


@st.composite
def _slices(draw):
    channels = draw(st.integers(2, 8))
    cuts = draw(st.lists(st.integers(1, channels - 1), min_size=1, max_size=3))
    return _SlicesConcatenated(channels, cuts).eval(), torch.randn(2, 3, 5, 5)


class _Siblings(nn.Module):
    """Two convolutions of one input with the same geometry, combined non-linearly (nothing else merges them)."""

    def __init__(self, a: nn.Conv2d, b: nn.Conv2d) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) * torch.sigmoid(self.b(x))


@st.composite
def _siblings(draw):
    config = draw(conv_configs(max_channels=5).filter(lambda c: c.groups == 1))
    other = nn.Conv2d(config.in_channels, draw(st.integers(1, 5)), config.kernel_size, config.stride,
                      config.padding, config.dilation, bias=config.bias)
    first = config.module()
    if other.out_channels != first.out_channels:  # the product needs equal channels: widen the narrower
        other = nn.Conv2d(config.in_channels, first.out_channels, config.kernel_size, config.stride,
                          config.padding, config.dilation, bias=config.bias)
    return _Siblings(first, other).eval(), config.input()


PROOFS = {
    "remove_dropout": (cleanup.RemoveDropout(), _conv_then(lambda c, draw: nn.Dropout(0.5)), ["dropout"]),
    "remove_identity": (cleanup.RemoveIdentity(), _conv_then(lambda c, draw: nn.Identity()), []),
    "remove_noop_reshape": (cleanup.RemoveNoopReshape(),
                            _conv_then(lambda c, draw: _Reshape(draw(st.integers(0, 2)))),
                            ["flatten", "reshape"]),
    "collapse_cat_of_slices": (cleanup.CollapseCatOfSlices(), _slices(), ["cat"]),
    "merge_sibling_convs": (branches.MergeSiblingConvs(), _siblings(), []),
    "bn_to_affine": (batchnorm.BatchNormToAffine(), _conv_then(lambda c, draw: nn.Sequential(nn.ReLU(), nn.BatchNorm2d(c))),
                     ["batch_norm"]),
}
PROVEN_HERE = set(PROOFS)


@pytest.mark.fxrebirth_rule
@pytest.mark.parametrize("name", sorted(PROOFS))
def test_property_proof(name):
    rule, cases, removes = PROOFS[name]
    check_rule(rule, cases, removes=removes, max_examples=40)


def _families_with_rules() -> list:
    """Every module of ``fxrebirth.passes`` that offers exact rules (a ``rules`` function)."""
    return [getattr(passes, name) for name in passes.__all__ if callable(getattr(getattr(passes, name), "rules", None))]


def test_default_rules_are_whole_families_phase_by_phase():
    """Every family of exact rules is in the defaults (whole) or opt-in, and the defaults are the families'
    rules phase by phase: nothing is picked by index."""
    names = [r.name for r in fxrebirth.default_rules()]
    assert len(names) == len(set(names))
    for family in _families_with_rules():
        assert family in passes.EXACT + passes.OPT_IN, f"{family.__name__}: list it in passes.EXACT or passes.OPT_IN"
    expected = [r.name for phase in PHASES for family in passes.EXACT for r in family.rules(phase)]
    assert names == expected
    for family in passes.EXACT:
        mine = [r.name for r in family.rules()]
        assert mine and set(mine) <= set(names), f"{family.__name__}: {sorted(set(mine) - set(names))} not in the defaults"
        assert mine == [r.name for phase in PHASES for r in family.rules(phase)]
    assert not {r.name for f in passes.OPT_IN for r in f.rules()} & set(names)


def test_a_rule_added_to_a_family_joins_the_defaults_in_its_phase(monkeypatch):
    class ThirdAffine(Rule):
        """A stand-in for a new rule of the affine family."""

        name = "third_affine"

    family = affine.rules

    def rules(phase=None):
        extra = [ThirdAffine()] if phase in (None, "following") else []
        return family(phase) + extra

    monkeypatch.setattr(affine, "rules", rules)
    names = [r.name for r in fxrebirth.default_rules()]
    assert names.index("affine_into_following") < names.index("third_affine") < names.index("bn_past_pool")
    assert "third_affine" in {r.name for r in _every_rule()}


def test_a_phase_that_does_not_exist_is_refused():
    with pytest.raises(fxrebirth.PipelineError, match="unknown rule phase"):
        affine.rules("after_everything")
