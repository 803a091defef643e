"""Checks of :func:`fxrebirth.optimize`'s options, each failing with one sentence that names the option
and what to pass instead (:class:`~fxrebirth.errors.PipelineError`).

Wrong types used to surface far from their cause (a rule class passed for an instance failed inside the
pipeline with ``TypeError: ... missing 1 required positional argument``; ``disable="dropout"`` disabled
nothing and complained about the rules ``'d'``, ``'r'``, ...). :func:`validate_options` runs them all.

The numeric options of the retraining tier (``plan``, ``rebirth``) are checked here too,
each against a :class:`Range` (:func:`validate_numbers`): NaN, an infinity, a bool or a value outside the
range is an :class:`OptionError` naming the option and the range, before anything is measured or trained
(a NaN learning rate used to return a model that outputs NaN).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from torch import nn

from fxrebirth.errors import PipelineError

__all__ = ["validate_options", "validate_rules", "validate_names", "validate_cost_model",
           "validate_leaf_modules", "validate_bool", "OptionError", "Range", "POSITIVE", "NOT_NEGATIVE", "COUNT",
           "validate_number", "validate_numbers"]

_CONTAINERS = (list, tuple)
_NAME_CONTAINERS = (list, tuple, set, frozenset)


def _show(value: Any) -> str:
    """``value`` as an error quotes it: short, with its type."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}" if not isinstance(value, type) else f"the class {value.__name__}"


def validate_rules(rules: Any, option: str = "rules") -> None:
    """``rules`` is None or a list/tuple of :class:`~fxrebirth.rewrite.rules.Rule` instances (in the order to apply)."""
    from fxrebirth.rewrite.rules import Rule

    if rules is None:
        return
    if isinstance(rules, type) and issubclass(rules, Rule):
        raise PipelineError(f"{option} is the class {rules.__name__}; pass a list of instances: {option}=[{rules.__name__}()]")
    if isinstance(rules, Rule):
        raise PipelineError(f"{option} is one rule ({rules.name!r}); pass a list: {option}=[rule]")
    if isinstance(rules, (set, frozenset)):
        raise PipelineError(f"{option} is a set; pass a list (rules apply in order), e.g. fxrebirth.default_rules()")
    if not isinstance(rules, _CONTAINERS):
        raise PipelineError(f"{option} must be a list of Rule instances, got {_show(rules)}; pass e.g. "
                            "fxrebirth.default_rules() or [MyRule()] (to drop rules by name, use disable=[name])")
    for i, rule in enumerate(rules):
        if isinstance(rule, type) and issubclass(rule, Rule):
            raise PipelineError(f"{option}[{i}] is the class {rule.__name__}; pass an instance {rule.__name__}()")
        if not isinstance(rule, Rule):
            hint = " (to drop rules by name, use disable=[name])" if isinstance(rule, str) else ""
            raise PipelineError(f"{option}[{i}] is {_show(rule)}, not a fxrebirth Rule; pass Rule instances such as "
                                f"those of fxrebirth.default_rules(){hint}")


def validate_names(option: str, names: Any) -> None:
    """``disable`` / ``force``: a list (tuple, set) of rule names, never a bare string."""
    if isinstance(names, str):
        raise PipelineError(f"{option}={names!r} is a string; pass a list of rule names: {option}=[{names!r}]")
    if not isinstance(names, _NAME_CONTAINERS):
        raise PipelineError(f"{option} must be a list of rule names, got {_show(names)}; pass e.g. "
                            f"{option}=['bn_into_following'] or leave it out")
    for i, name in enumerate(sorted(names, key=str) if isinstance(names, (set, frozenset)) else names):
        if not isinstance(name, str):
            rule_name = getattr(name, "name", None)
            fix = f"its name: {option}=[{rule_name!r}]" if isinstance(rule_name, str) else "rule names (str)"
            raise PipelineError(f"{option}[{i}] is {_show(name)}, not a rule name; pass {fix}")


def validate_cost_model(cost_model: Any) -> None:
    """``cost_model``: None (accept every exact merge) or an object with ``node_cost(node)``."""
    if cost_model is None:
        return
    if isinstance(cost_model, str):
        raise PipelineError(f"cost_model={cost_model!r} is a string; pass a cost model object: "
                            "fxrebirth.rewrite.cost.RooflineCost.onnxruntime() for ONNX Runtime, fxrebirth.rewrite.cost.RooflineCost() "
                            "for eager PyTorch, fxrebirth.rewrite.cost.TableCost(latencies), or None")
    if isinstance(cost_model, type):
        raise PipelineError(f"cost_model is the class {cost_model.__name__}; pass an instance {cost_model.__name__}()")
    if not callable(getattr(cost_model, "node_cost", None)):
        raise PipelineError(f"cost_model is {_show(cost_model)}, which has no node_cost(node) method; pass "
                            "fxrebirth.rewrite.cost.RooflineCost(), RooflineCost.onnxruntime(), TableCost(latencies) or None")


def validate_leaf_modules(leaf_modules: Any) -> None:
    """``leaf_modules``: a list of ``nn.Module`` subclasses (types, not instances)."""
    if isinstance(leaf_modules, type):
        raise PipelineError(f"leaf_modules is the type {leaf_modules.__name__}; pass a list: "
                            f"leaf_modules=[{leaf_modules.__name__}]")
    if isinstance(leaf_modules, nn.Module):
        name = type(leaf_modules).__name__
        raise PipelineError(f"leaf_modules is an instance of {name}; pass a list of module types: leaf_modules=[{name}]")
    if not isinstance(leaf_modules, _NAME_CONTAINERS):
        raise PipelineError(f"leaf_modules must be a list of nn.Module types, got {_show(leaf_modules)}; "
                            "pass e.g. leaf_modules=[MyBlock]")
    for i, kind in enumerate(leaf_modules):
        if isinstance(kind, nn.Module):
            name = type(kind).__name__
            raise PipelineError(f"leaf_modules[{i}] is an instance of {name}; pass the type: {name}")
        if not (isinstance(kind, type) and issubclass(kind, nn.Module)):
            raise PipelineError(f"leaf_modules[{i}] is {_show(kind)}, not an nn.Module type; pass module classes "
                                "such as MyBlock")


def validate_bool(option: str, value: Any) -> None:
    """A flag must be ``True`` or ``False`` (a string such as ``"false"`` would be true)."""
    if not isinstance(value, bool):
        raise PipelineError(f"{option}={value!r} must be True or False")


_BOOLS = ("verify", "frozen", "check_output")


def validate_options(**options: Any) -> None:
    """Validate :func:`fxrebirth.optimize`'s keyword options; raise :class:`PipelineError` on the first bad one.

    Checks ``rules``, ``disable``, ``force``, ``cost_model``, ``leaf_modules`` and the flags ``verify``,
    ``frozen``, ``check_output`` when given; other keywords are not looked at (they are checked where
    they are used). Unknown rule names in ``disable``/``force`` are checked by the pipeline, which knows
    the rule list.
    """
    if "rules" in options:
        validate_rules(options["rules"])
    for key in ("disable", "force"):
        if key in options:
            validate_names(key, options[key])
    if "cost_model" in options:
        validate_cost_model(options["cost_model"])
    if "leaf_modules" in options:
        validate_leaf_modules(options["leaf_modules"])
    for key in _BOOLS:
        if key in options:
            validate_bool(key, options[key])


class OptionError(PipelineError, ValueError):
    """A numeric option outside the values it accepts (a ``ValueError`` too, as such errors were before)."""


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: a finite number (a whole one when ``integer``) between ``low``
    and ``high`` (None: unbounded), each bound included unless ``open_low`` / ``open_high``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    integer: bool = False

    def describe(self) -> str:
        """The range in words, as an error states it (``a number in (0, 1]``, ``a whole number >= 1``)."""
        noun = "a whole number" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            return f"{noun} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{noun} {'>' if self.open_low else '>='} {self.low:g}"
        if self.high is not None:
            return f"{noun} {'<' if self.open_high else '<='} {self.high:g}"
        return f"a finite {noun[2:]}"

    def holds(self, value: Any) -> bool:
        """Whether ``value`` is in the range (never a bool, NaN or an infinity)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        value = float(value)
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)


POSITIVE = Range(0, open_low=True)
"""A finite number > 0."""
NOT_NEGATIVE = Range(0)
"""A finite number >= 0."""
COUNT = Range(1, integer=True)
"""A whole number >= 1."""


def validate_number(owner: str, option: str, value: Any, allowed: Range, *, optional: bool = False) -> None:
    """Raise :class:`OptionError` (one line: ``owner``'s ``option``, the value, the range) unless ``value``
    is in ``allowed`` (or None where ``optional``)."""
    if value is None and optional:
        return
    if not allowed.holds(value):
        unset = " or None" if optional else ""
        raise OptionError(f"{owner}: {option}={value!r} is out of range; give {allowed.describe()}{unset}")


def validate_numbers(owner: str, values: dict[str, Any], ranges: dict[str, Range],
                     optional: tuple[str, ...] = ()) -> None:
    """:func:`validate_number` for each option of ``ranges`` present in ``values`` (those in ``optional`` may
    be None): the one place where the numeric options of ``plan`` and ``rebirth`` are checked."""
    for option, allowed in ranges.items():
        if option in values:
            validate_number(owner, option, values[option], allowed, optional=option in optional)
