"""The pipeline: verification and rollback, fixpoint and idempotence, configuration errors, report."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxrebirth
from fxrebirth import Match, Pipeline, PipelineError, Rule
from fxrebirth.graph.ops import kind_of
from fxrebirth.testing import assert_equivalent


def _model():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(),
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 4), nn.BatchNorm1d(4),
    )
    return fxrebirth.testing.randomize_batchnorm(model).eval()


class _WrongReLU(Rule):
    """A deliberately wrong rule: claims relu(x) = x."""

    name = "wrong_relu"
    changes_parameters = False

    def pattern(self, node, ctx):
        if kind_of(node) == "relu":
            return Match(output=node, inputs=(node.kwargs["input"],), nodes=(node,))
        return None

    def rewrite(self, match, ctx):
        return match.inputs[0]


def test_wrong_rewrite_is_rolled_back_logged_and_reported(caplog):
    model, x = _model(), torch.randn(2, 3, 6, 6)
    with caplog.at_level("WARNING", logger="fxrebirth"):
        gm, report = fxrebirth.optimize(model, x, rules=fxrebirth.default_rules() + [_WrongReLU()])
    stats = report.stats("wrong_relu")
    assert stats.rewrites == 0 and stats.rolled_back == 1
    assert "verification failed: relative error" in stats.refusals[0].reason
    assert "wrong_relu" in caplog.text and "rolled back" in caplog.text
    assert sum(1 for n in gm.graph.nodes if kind_of(n) == "relu") == 1
    assert_equivalent(model, gm, x)


def test_without_verification_a_wrong_rule_is_applied():
    """The control for the test above: verification is what stops the wrong rewrite (with both checks
    off it is applied, and the report says what was skipped)."""
    model, x = _model(), torch.randn(2, 3, 6, 6)
    gm, report = fxrebirth.optimize(model, x, rules=[_WrongReLU()], verify=False, check_output=False)
    assert report.stats("wrong_relu").rewrites == 1 and report.verify_s == 0
    assert fxrebirth.relative_error(model(x), gm(x)) > 1e-3
    assert any("verify=False" in c for c in report.checks) and any("check_output=False" in c for c in report.checks)


def test_without_local_verification_the_whole_model_check_names_the_wrong_rule():
    model, x = _model(), torch.randn(2, 3, 6, 6)
    with pytest.raises(fxrebirth.EquivalenceError, match="rule 'wrong_relu'"):
        fxrebirth.optimize(model, x, rules=[_WrongReLU()], verify=False)
    gm, report = fxrebirth.optimize(model, x, rules=[_WrongReLU()], verify=False, on_mismatch="fallback")
    assert report.rewrites == 1 and any("fallback" in c for c in report.checks)
    assert fxrebirth.relative_error(model(x), gm(x)) == 0.0


def test_second_run_changes_nothing():
    model, x = _model(), torch.randn(2, 3, 6, 6)
    gm, report = fxrebirth.optimize(model, x)
    assert report.rewrites == 4  # dropout + three BatchNorms
    code = gm.code
    result, again = Pipeline(tuple(fxrebirth.default_rules())).run(gm)
    assert result.modified is False and again.rewrites == 0 and gm.code == code


def test_duplicate_rule_names_are_rejected():
    rules = fxrebirth.default_rules()
    with pytest.raises(PipelineError, match="repeated: \\['remove_dropout'\\]"):
        Pipeline(tuple(rules + rules[:1]))


def test_disable_by_name_and_unknown_names():
    model, x = _model(), torch.randn(2, 3, 6, 6)
    gm, report = fxrebirth.optimize(model, x, disable=["bn_into_preceding"])
    assert "bn_into_preceding" not in report.rules
    assert sum(1 for n in gm.graph.nodes if kind_of(n) == "batch_norm") == 3  # none has a layer after it
    with pytest.raises(PipelineError, match="unknown rule name.*'bn_into_precedin'.*known rules: remove_dropout"):
        fxrebirth.optimize(model, x, disable=["bn_into_precedin"])


def test_report_is_data_and_a_table():
    model, x = _model(), torch.randn(2, 3, 6, 6)
    _, report = fxrebirth.optimize(model, x)
    data = json.loads(report.to_json())
    assert data["rules"]["bn_into_preceding"]["rewrites"] == 3
    assert data["rules"]["remove_dropout"]["rewrites"] == 1
    assert data["nodes_after"] < data["nodes_before"]
    assert data["flops_after"] < data["flops_before"]
    assert data["params_after"] < data["params_before"]
    assert 0 <= data["output_error"] < 1e-5
    table = str(report)
    assert "bn_into_preceding" in table and "FLOPs" in table and "verification" in table


def test_not_frozen_leaves_parameters_alone():
    model, x = _model(), torch.randn(2, 3, 6, 6)
    gm, report = fxrebirth.optimize(model, x, frozen=False)
    assert report.stats("bn_into_preceding").rewrites == 0
    assert report.stats("remove_dropout").rewrites == 1  # cleanup does not touch parameters
    assert sorted(dict(gm.named_parameters())) == sorted(dict(model.named_parameters()))


def test_rule_passes_and_pipelines_run_under_torch_fx_pass_manager():
    """torch.fx's PassManager calls ``pass(gm)`` and reads ``graph_module``/``modified``: both work."""
    from torch.fx.passes.infra.pass_manager import PassManager

    from fxrebirth import RulePass

    model, x = _model(), torch.randn(2, 3, 6, 6)
    gm = fxrebirth.capture(model, x)
    result = PassManager([RulePass(rule) for rule in fxrebirth.default_rules()], steps=5)(gm)
    assert result.modified
    assert sum(1 for n in result.graph_module.graph.nodes if kind_of(n) == "batch_norm") == 0
    assert_equivalent(model, result.graph_module, x)
    again = fxrebirth.capture(model, x)
    result = PassManager([Pipeline(tuple(fxrebirth.default_rules()))])(again)
    assert result.modified and sum(1 for n in again.graph.nodes if kind_of(n) == "batch_norm") == 0
    assert_equivalent(model, result.graph_module, x)
    one = RulePass(fxrebirth.default_rules()[0])(fxrebirth.capture(model, x))
    assert one.report is not None and one.report.rewrites == one.report.stats(one.report.applied[0][0]).rewrites
