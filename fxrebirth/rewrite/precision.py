"""The rounding criterion of the whole-model check: an exact rewrite must not add the float32 noise that
users would see (the definition: :mod:`fxrebirth.equivalence`, :data:`~fxrebirth.equivalence.NOISE_FACTOR`).

The float64 check (:func:`fxrebirth.rewrite.endtoend.compare`) proves the algebra; it cannot see what the
model's own dtype makes of it. Folding a large constant shift into the following layer is exact, yet in
float32 the folded layer sums products of the unshifted activations (magnitude ``|shift|``) to a result
that is much smaller: cancellation, up to ``|shift| * |W| / |output|`` units of rounding, which the
original never paid. :func:`float32_check` runs the original and the optimised model in the model's own
dtype (under the caller's autocast, when :func:`fxrebirth.optimize` is called inside one) beside the
original in float64 (the exact reference, the one :func:`compare` already computed), and requires

    err(optimised vs exact) <= max(tolerance(dtype), NOISE_FACTOR * err(original vs exact))

on the check's first input; where that fails it judges again on at least
:data:`~fxrebirth.equivalence.NOISE_SAMPLES` samples (float32 noise varies several-fold from input to
input) before refusing. Outputs must also keep their dtypes (a lost autocast region changes them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from fxrebirth.equivalence import NOISE_FACTOR, NOISE_SAMPLES, flush_denormals, relative_error, tolerance
from fxrebirth.graph.variants import batch_of, variant_inputs
from fxrebirth.rewrite.endtoend import Comparison, calls_from, copied_state, describe_inputs, runnable, storage_dtype
from fxrebirth.rewrite.rules import Match, Rule, RuleContext, describe

__all__ = ["Float32Check", "float32_check", "judge", "autocast_context", "first_failing", "ROLLBACKS", "Imprecise",
           "Refusing", "refusing"]

log = logging.getLogger(__name__)


@dataclass
class Float32Check:
    """The float32 criterion's figures: ``error`` is what users see (the optimised model against the
    original, both in the model's dtype); ``original`` and ``optimised`` are each one's distance from the
    exact (float64) output, ``limit`` the most ``optimised`` may be, over ``samples`` samples."""

    error: float
    original: float
    optimised: float
    limit: float
    samples: int
    context: str
    floor: float = 0.0
    worst: tuple[Any, ...] | None = None
    detail: str = ""
    references: list[tuple[tuple[Any, ...], Any]] = field(default_factory=list, repr=False)

    @property
    def passed(self) -> bool:
        return not self.detail and self.optimised <= self.limit

    def describe(self) -> str:
        """One sentence for the report."""
        verdict = "within" if self.passed else "ABOVE"
        text = (f"{self.context}: optimised vs original {self.error:.1e}; from the exact (float64) output the "
                f"optimised model is {self.optimised:.1e}, the original {self.original:.1e} ({verdict} the limit "
                f"max({self.floor:.0e}, {NOISE_FACTOR:g} x the original's) = {self.limit:.1e}, "
                f"{self.samples} sample{'s' if self.samples != 1 else ''})")
        return text + (f"; {self.detail}" if self.detail else "")


def autocast_context() -> str:
    """The dtype the check's runs are in: the model's own, or the caller's autocast where one is on."""
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            return f"under the caller's autocast ({device}, {str(torch.get_autocast_dtype(device)).split('.')[-1]})"
    return ""


def _dtypes(value: Any) -> list[torch.dtype]:
    return [t.dtype for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def judge(original: nn.Module, candidate: nn.Module, references: Sequence[tuple[tuple[Any, ...], Any]], *,
          seed: int = 0) -> Float32Check:
    """The criterion at ``references`` (``(inputs, the original's float64 output)`` pairs): both models run
    in their own dtype from copies of their state, and the worst of each figure over the pairs counts."""
    original = runnable(original)
    dtype = str(storage_dtype(original)).split(".")[-1]
    result = Float32Check(0.0, 0.0, 0.0, 0.0, 0, " ".join(filter(None, [dtype, autocast_context()])),
                          references=list(references))
    with flush_denormals():
        ours, theirs = copied_state(candidate, False), copied_state(original, False)
        for inputs, exact in references:
            own = calls_from(original, theirs, inputs, False, seed, 1)[0][0]
            try:
                mine = calls_from(candidate, ours, inputs, False, seed, 1)[0][0]
            except Exception as exc:  # noqa: BLE001 - the float64 check ran it: a dtype-specific failure
                mine, result.detail = None, f"the optimised model raises in {dtype}: {type(exc).__name__}: {exc}"
            result.samples += batch_of(inputs) or 1
            if mine is None:
                result.optimised = result.error = float("inf")
                continue
            if _dtypes(own) != _dtypes(mine) and not result.detail:
                result.detail = (f"at {describe_inputs(inputs)} the optimised model returns "
                                 f"{_dtypes(mine)} where the original returns {_dtypes(own)}")
            errors = relative_error(exact, own), relative_error(exact, mine), relative_error(own, mine)
            if errors[1] > result.optimised or result.worst is None:
                result.worst = inputs
            result.original = max(result.original, errors[0])
            result.optimised = max(result.optimised, errors[1])
            result.error = max(result.error, errors[2])
    result.floor = tolerance(storage_dtype(original))
    result.limit = max(result.floor, NOISE_FACTOR * result.original)
    return result


def _more(original: nn.Module, first: tuple[Any, ...], seed: int) -> list[tuple[tuple[Any, ...], Any]]:
    """Inputs drawn like ``first`` (its shapes, the example's statistics) until they hold at least
    :data:`NOISE_SAMPLES` samples with it, each with the original's float64 output; only ``first``'s
    shapes, since the model may run at no other."""
    batch = batch_of(first) or 1
    draws = []
    original = runnable(original)
    state = copied_state(original, True)
    with flush_denormals():
        for index in range(1, -(-NOISE_SAMPLES // batch)):
            inputs = variant_inputs(first, 0, seed + index)
            if inputs is None or describe_inputs(inputs) != describe_inputs(first):
                break
            draws.append((inputs, calls_from(original, state, inputs, True, seed, 1)[0][0]))
    return draws


def float32_check(original: nn.Module, candidate: nn.Module, outcome: Comparison, *,
                  seed: int = 0) -> Float32Check | None:
    """The float32 criterion (module docstring) of ``candidate`` after :func:`compare` gave ``outcome``:
    judged at the check's first input, and again on :data:`NOISE_SAMPLES` samples before it fails.
    None where there is nothing to judge: a float64 model, or a check that could not run in float64
    (no exact reference; its own figure is then already in the model's dtype)."""
    if outcome.precision != "float64" or not outcome.references or storage_dtype(original) == torch.float64:
        return None
    first = outcome.references[:1]
    try:
        result = judge(original, candidate, first, seed=seed)
    except Exception as exc:  # noqa: BLE001 - the original itself does not run in its dtype here
        log.info("rounding criterion not judged: the original raises in its own dtype: %s", exc)
        return None
    if result.passed or result.detail or result.samples >= NOISE_SAMPLES:
        return result
    return judge(original, candidate, first + _more(original, first[0][0], seed), seed=seed)


def first_failing(count: int, bad: Callable[[int], bool]) -> int:
    """The smallest ``k`` in ``1..count`` with ``bad(k)`` (the first ``k`` rewrites fail a check that all
    ``count`` fail), found by bisection, assuming that once failing a prefix keeps failing; 0 when
    ``bad(0)`` (the model with no rewrite fails it too)."""
    if count == 0 or bad(0):
        return 0
    low, high = 0, count
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if bad(middle) else (middle, high)
    return high


ROLLBACKS = 8
"""Rewrites :func:`fxrebirth.optimize` rolls back for the rounding criterion before it gives up (each
costs one more capture and pipeline run)."""


class Imprecise(Exception):
    """The rounding criterion failed and names the rewrite that first makes it fail: ``rule`` at ``site``
    (:func:`fxrebirth.rewrite.rules.describe` of its output), for the caller to refuse it and run again."""

    def __init__(self, rule: str, site: str, reason: str) -> None:
        super().__init__(f"{rule!r} at {site}: {reason}")
        self.rule, self.site, self.reason = rule, site, reason


class Refusing(Rule):
    """``rule``, refusing the sites of ``refused`` (``{site: reason}``): how a rewrite that the whole-model
    check rolled back is refused in the next run, with its reason in the report."""

    def __init__(self, rule: Rule, refused: dict[str, str]) -> None:
        self.rule, self.refused = rule, refused
        self.name, self.identity, self.phase = rule.name, rule.identity, rule.phase
        self.changes_parameters, self.gated = rule.changes_parameters, rule.gated

    def pattern(self, node: fx.Node, ctx: RuleContext) -> Match | None:
        return self.rule.pattern(node, ctx)

    def check(self, match: Match, ctx: RuleContext) -> str | None:
        reason = self.refused.get(describe(match.output))
        return reason if reason is not None else self.rule.check(match, ctx)

    def rewrite(self, match: Match, ctx: RuleContext) -> Any:
        return self.rule.rewrite(match, ctx)


def refusing(rules: Sequence[Rule], refused: dict[tuple[str, str], str]) -> tuple[Rule, ...]:
    """``rules`` with each ``(rule, site)`` of ``refused`` refused (:class:`Refusing`), in the same order."""
    sites: dict[str, dict[str, str]] = {}
    for (rule, site), reason in refused.items():
        sites.setdefault(rule, {})[site] = reason
    return tuple(Refusing(r, sites[r.name]) if r.name in sites else r for r in rules)
