"""fxrebirth.validate: each wrong option type is one clear PipelineError naming the option and the fix."""

from __future__ import annotations

import pytest
from torch import nn

import fxrebirth
from fxrebirth.rewrite.cost import RooflineCost, TableCost
from fxrebirth.errors import PipelineError
from fxrebirth.passes import cleanup
from fxrebirth.rewrite.validate import validate_options


def _rule_class():
    return type(cleanup.rules()[0])


def test_good_options_pass():
    validate_options(rules=None, disable=[], force=("merge_conv_chain",), cost_model=None, leaf_modules=[nn.ReLU],
                     verify=True, frozen=False, check_output=True)
    validate_options(rules=fxrebirth.default_rules(), disable={"remove_dropout"}, cost_model=RooflineCost())
    validate_options(cost_model=RooflineCost.onnxruntime())
    validate_options(cost_model=TableCost({}))
    validate_options(rules=(), leaf_modules=())
    validate_options()
    validate_options(example_inputs=object())  # keywords it does not know are not looked at


@pytest.mark.parametrize("options, message", [
    ({"rules": [object]}, r"rules\[0\] is the class object, not a fxrebirth Rule"),
    ({"rules": ["remove_dropout"]}, r"rules\[0\] is str 'remove_dropout', not a fxrebirth Rule.*disable=\[name\]"),
    ({"rules": "remove_dropout"}, r"rules must be a list of Rule instances, got str"),
    ({"rules": iter([])}, r"rules must be a list"),
    ({"disable": "remove_dropout"}, r"disable='remove_dropout' is a string; pass a list of rule names: "
                                    r"disable=\['remove_dropout'\]"),
    ({"force": "merge_conv_chain"}, r"force='merge_conv_chain' is a string; pass a list"),
    ({"disable": None}, r"disable must be a list of rule names"),
    ({"disable": [3]}, r"disable\[0\] is int 3, not a rule name"),
    ({"cost_model": "onnxruntime"}, r"cost_model='onnxruntime' is a string; pass a cost model object: "
                                    r"fxrebirth\.rewrite\.cost\.RooflineCost\.onnxruntime\(\)"),
    ({"cost_model": RooflineCost}, r"cost_model is the class RooflineCost; pass an instance RooflineCost\(\)"),
    ({"cost_model": 3.0}, r"cost_model is float 3.0, which has no node_cost"),
    ({"leaf_modules": [nn.ReLU()]}, r"leaf_modules\[0\] is an instance of ReLU; pass the type: ReLU"),
    ({"leaf_modules": nn.ReLU}, r"leaf_modules is the type ReLU; pass a list: leaf_modules=\[ReLU\]"),
    ({"leaf_modules": nn.ReLU()}, r"leaf_modules is an instance of ReLU"),
    ({"leaf_modules": [int]}, r"leaf_modules\[0\] is the class int, not an nn.Module type"),
    ({"verify": "no"}, r"verify='no' must be True or False"),
    ({"frozen": 0}, r"frozen=0 must be True or False"),
    ({"check_output": None}, r"check_output=None must be True or False"),
])
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(PipelineError, match=message) as info:
        validate_options(**options)
    assert "\n" not in str(info.value)


def test_rule_class_instead_of_instance():
    cls = _rule_class()
    with pytest.raises(PipelineError, match=rf"rules\[1\] is the class {cls.__name__}; pass an instance {cls.__name__}\(\)"):
        validate_options(rules=[cls.__new__(cls), cls])
    with pytest.raises(PipelineError, match=rf"rules is the class {cls.__name__}; pass a list of instances"):
        validate_options(rules=cls)


def test_single_rule_and_set_of_rules():
    rule = cleanup.rules()[0]
    with pytest.raises(PipelineError, match=r"rules is one rule .*; pass a list: rules=\[rule\]"):
        validate_options(rules=rule)
    with pytest.raises(PipelineError, match=r"rules is a set; pass a list \(rules apply in order\)"):
        validate_options(rules=set(cleanup.rules()))
    with pytest.raises(PipelineError, match=rf"disable\[0\] is .*, not a rule name; pass its name: disable=\['{rule.name}'\]"):
        validate_options(disable=[rule])
