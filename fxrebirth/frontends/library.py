"""The library entry point: :func:`optimize` and the default rule list."""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from fxrebirth.graph.capture import as_input_tuple, capture, copy_module, propagate_shapes
from fxrebirth.rewrite.cost import CostModel, ReplayedCost, RooflineCost, graph_flops, stored_elements
from fxrebirth.rewrite.endtoend import (Comparison, adopt_weights, bound, compare, describe_inputs, float_rounding,
                                        storage_dtype, weight_rounding)
from fxrebirth.equivalence import WEIGHT_ROUNDING, relative_error
from fxrebirth.graph.metadata import GUARDS_KEY
from fxrebirth.graph.tracing import OPAQUE_KEY
from fxrebirth.errors import EquivalenceError, PipelineError
from fxrebirth.rewrite.pipeline import Pipeline
from fxrebirth.rewrite.precision import ROLLBACKS, Imprecise, first_failing, float32_check, judge, refusing
from fxrebirth.rewrite.report import Report
from fxrebirth.rewrite.rules import PHASES, Rule
from fxrebirth.rewrite.validate import validate_options

__all__ = ["default_rules", "optimize", "relative_error"]

log = logging.getLogger(__name__)


def default_rules() -> list[Rule]:
    """The exact tier's rules in their default order: every rule of every family of
    :data:`fxrebirth.passes.EXACT`, phase by phase (:data:`~fxrebirth.rewrite.rules.PHASES`: cleanup; folds
    into the preceding layer, always exact; then into the following layer, exact under conditions; moves that
    prepare a fold; padding and pooling; then the cost-gated merges of linear chains and of summed,
    concatenated and sibling branches), the families in that list's order within a phase."""
    from fxrebirth.passes import EXACT

    return [rule for phase in PHASES for family in EXACT for rule in family.rules(phase)]


def _select(rules: Sequence[Rule], disable: Iterable[str]) -> tuple[Rule, ...]:
    disable = set(disable)
    unknown = disable - {r.name for r in rules}
    if unknown:
        names = ", ".join(r.name for r in rules)
        raise PipelineError(f"unknown rule name(s) {sorted(unknown)} in disable=; known rules: {names}")
    return tuple(r for r in rules if r.name not in disable)


ON_MISMATCH = ("raise", "fallback")


def _outside_inference_mode(function: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``function`` with inference mode off (thread-local, restored): called inside
    ``torch.inference_mode()``, every copy and run would make inference tensors, which keep no version
    counter (the mutation checks read it) and cannot be used where autograd records. The result is an
    ordinary module that runs in inference mode as well."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            return function(*args, **kwargs)

    return wrapper


@_outside_inference_mode
def optimize(
    model: nn.Module,
    example_inputs: Any,
    *,
    rules: Sequence[Rule] | None = None,
    disable: Iterable[str] = (),
    verify: bool = True,
    frozen: bool = True,
    leaf_modules: Sequence[type[nn.Module]] = (),
    check_output: bool = True,
    cost_model: CostModel | None = RooflineCost(),
    force: Iterable[str] = (),
    on_mismatch: str = "raise",
) -> tuple[fx.GraphModule, Report]:
    """Apply the exact tier to ``model`` and return ``(graph_module, report)``.

    The model and the example inputs are never modified (the model is copied; every run uses copies of the
    inputs); the result keeps the model's device and dtype. ``rules`` replaces the default rule list,
    ``disable`` drops rules by name; ``frozen=False`` leaves parameters untouched (only cleanup runs);
    ``leaf_modules`` are module types kept as opaque calls; ``cost_model`` gates the merges that can make
    a layer slower (default: the deterministic :class:`~fxrebirth.rewrite.cost.RooflineCost`; a
    :class:`~fxrebirth.rewrite.cost.TableCost` of measured latencies; ``None`` accepts every exact merge);
    ``force`` names gated rules to apply regardless of cost.

    Two checks, each of which can be turned off (the report then says so):

    * ``verify``: every rewrite is checked locally in float64 on random activations, at the example's
      shapes and at its variants (batch >= 2, other spatial sizes; :mod:`fxrebirth.graph.variants`), and rolled
      back if it does not match (:data:`fxrebirth.equivalence.LOCAL_TOLERANCE`);
    * ``check_output``: the whole result is compared with the original on two random inputs (batch >= 2,
      the example's size and a larger one; float64 where the model can be cast,
      :func:`fxrebirth.rewrite.endtoend.compare`). Above the tolerance of the model's dtype
      (:data:`fxrebirth.equivalence.TOLERANCES`), ``on_mismatch="raise"`` (default) raises
      :class:`~fxrebirth.errors.EquivalenceError` naming the first rewrite that makes the model differ
      (found by replaying a prefix of the rewrites, bisecting); ``on_mismatch="fallback"`` returns the
      model captured with no rewrite, with a warning and the reason in the report.
    """
    validate_options(rules=rules, disable=disable, force=force, cost_model=cost_model, leaf_modules=leaf_modules,
                     verify=verify, frozen=frozen, check_output=check_output)
    if on_mismatch not in ON_MISMATCH:
        raise PipelineError(f"on_mismatch={on_mismatch!r}: use 'raise' or 'fallback'")
    inputs = as_input_tuple(example_inputs)
    disable, force = tuple(disable), frozenset(force)
    selected = _select(default_rules() if rules is None else list(rules), disable)
    settings = dict(leaf_modules=leaf_modules, verify=verify, frozen=frozen, cost_model=cost_model, force=force)
    refused: dict[tuple[str, str], str] = {}  # rewrites the rounding criterion rolled back: run again without
    while True:
        try:
            return _attempt(model, inputs, selected, settings, check_output, on_mismatch, refused)
        except Imprecise as rollback:
            log.warning("%s: rewrite %s rolled back", type(model).__name__, rollback)
            refused[rollback.rule, rollback.site] = rollback.reason


def _attempt(model: nn.Module, inputs: tuple[Any, ...], selected: tuple[Rule, ...], settings: dict[str, Any],
             check_output: bool, on_mismatch: str,
             refused: dict[tuple[str, str], str]) -> tuple[fx.GraphModule, Report]:
    """Capture, the pipeline with ``selected`` less the ``refused`` rewrites, and the whole-model check, which
    raises :class:`~fxrebirth.rewrite.precision.Imprecise` to have one more rolled back."""
    rules = refusing(selected, refused)
    gm, report = _captured(model, inputs, settings["leaf_modules"])
    run = _replayer(model, inputs, gm, rules, **settings)
    run(None, report)
    _record_after(gm, inputs, report)
    _note_skipped_checks(report, settings["verify"], check_output)
    report.checks += [f"{rule!r} at {site}: {why}" for (rule, site), why in refused.items()]
    if check_output:
        gm = _check_output(model, gm, inputs, report, run, on_mismatch, lambda: _twin(model, inputs, rules, settings, report),
                           settings["frozen"], len(refused) < ROLLBACKS)
    log.info("optimized %s: %d rewrites", report.model, report.rewrites)
    return gm, report


def _captured(model: nn.Module, inputs: tuple[Any, ...],
              leaf_modules: Sequence[type[nn.Module]]) -> tuple[fx.GraphModule, Report]:
    """The canonical capture of ``model`` and a report that holds its size before any rewrite."""
    start = time.perf_counter()
    gm = capture(model, inputs, leaf_modules=leaf_modules)
    report = Report(model=type(model).__name__)
    report.capture_s = time.perf_counter() - start
    report.guards += gm.meta.get(GUARDS_KEY, [])
    report.checks += [f"kept opaque: {note}" for note in gm.meta.get(OPAQUE_KEY, [])]
    report.nodes_before = len(gm.graph.nodes)
    report.params_before = stored_elements(gm)
    report.flops_before = graph_flops(gm)
    return gm, report


def _replayer(model: nn.Module, inputs: tuple[Any, ...], gm: fx.GraphModule, selected: tuple[Rule, ...], *,
              leaf_modules: Sequence[type[nn.Module]], verify: bool, frozen: bool, cost_model: CostModel | None,
              force: frozenset[str], decided: Report | None = None) -> Callable[[int | None, Report], fx.GraphModule]:
    """``run(limit, into)``: the pipeline on ``gm`` (``limit=None``) or on a fresh capture. Every run after
    the first replays the first one's cost-gate verdicts (:class:`~fxrebirth.rewrite.cost.ReplayedCost`), so
    a replay makes the same decisions; given ``decided`` (another run's report: the float32 run, for
    its float64 twin), every run replays that one's."""
    first: list[Report] = [decided] if decided is not None else []

    def run(limit: int | None, into: Report) -> fx.GraphModule:
        """The pipeline on a fresh capture, stopping after ``limit`` rewrites (deterministic: a prefix)."""
        fresh = gm if limit is None else capture(model, inputs, leaf_modules=leaf_modules)
        gate = ReplayedCost.of(first[0], cost_model) if first and cost_model is not None else cost_model
        Pipeline(selected, verify=verify, frozen=frozen, cost_model=gate, force=force,
                 max_rewrites=limit).run(fresh, into)
        if not first:
            first.append(into)
        return fresh

    return run


def _record_after(gm: fx.GraphModule, inputs: tuple[Any, ...], report: Report) -> None:
    """Shapes of the rewritten graph, and its size in the report."""
    propagate_shapes(gm, inputs)
    report.nodes_after = len(gm.graph.nodes)
    report.params_after = stored_elements(gm)
    report.flops_after = graph_flops(gm)


def _note_skipped_checks(report: Report, verify: bool, check_output: bool) -> None:
    if not verify:
        report.checks.append("verify=False: rewrites were not checked one by one")
    if not check_output:
        report.checks.append("check_output=False: the whole result was not compared with the original")


def _check_output(model: nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...], report: Report,
                  run: Callable[[int | None, Report], fx.GraphModule], on_mismatch: str,
                  twin: Callable[[], "_Twin | None"], frozen: bool = True, refuse: bool = False) -> fx.GraphModule:
    """The whole-model check of :func:`optimize`: ``gm``, or on a mismatch the model captured with no rewrite
    (``on_mismatch="fallback"``); raises :class:`~fxrebirth.errors.EquivalenceError` (``"raise"``). Above
    the bound, the float64 ``twin`` tells float32 rounding from a wrong rewrite (:func:`_within_rounding`);
    the gradients are compared where the model trains (``frozen=False``); then the rounding criterion
    (:func:`~fxrebirth.rewrite.precision.float32_check`) gives the error figure users see; where it fails,
    with ``refuse``, :class:`~fxrebirth.rewrite.precision.Imprecise` names the rewrite to roll back."""
    start = time.perf_counter()
    outcome = compare(model, gm, inputs, gradients=not frozen)
    report.output_error = outcome.error
    report.output_error64 = outcome.error if outcome.precision == "float64" else None
    report.checks += [f"whole model vs original ({outcome.precision}) at {c}" for c in outcome.checked]
    limit = bound(model)
    message = None
    if outcome.error > limit:
        verdict = _within_rounding(model, gm, outcome, limit, report, lambda k: run(k, Report()),
                                   twin() if outcome.precision == "float64" else None)
        if verdict is not None:
            message = (f"the optimised {report.model} differs from the original: relative error {outcome.error:.2e} "
                       f"> {limit:.0e} at input {describe_inputs(outcome.worst)}{' (' + outcome.detail + ')' if outcome.detail else ''}; "
                       f"{verdict}")
    message = message or _rounding_verdict(model, gm, outcome, report, lambda k: run(k, Report()), refuse)
    if message is not None:
        if on_mismatch == "raise":
            raise EquivalenceError(message + ". Pass on_mismatch='fallback' to get the model unoptimised instead.")
        log.warning("%s; returning the model captured with no rewrite (on_mismatch='fallback')", message)
        gm = run(0, Report())
        report.checks.append(f"fallback: {message}; the model is returned with no rewrite")
    report.check_s = time.perf_counter() - start
    return gm


def _rounding_verdict(model: nn.Module, gm: fx.GraphModule, outcome: Comparison, report: Report,
                      replay: Callable[[int], fx.GraphModule], refuse: bool) -> str | None:
    """The rounding criterion on ``gm`` (:func:`~fxrebirth.rewrite.precision.float32_check`): None when it
    holds (its figure becomes ``report.output_error``); else the first rewrite whose result fails it at
    the same inputs is named: raised as :class:`~fxrebirth.rewrite.precision.Imprecise` with ``refuse``
    (the caller runs again without it), or returned in a sentence saying why."""
    check = float32_check(model, gm, outcome)
    if check is None:
        return None
    report.output_error = check.error
    report.checks.append(f"rounding: {check.describe()}")
    if check.passed:
        return None
    applied = len(report.applied)
    index = first_failing(applied, lambda k: not judge(model, replay(k), check.references).passed)
    if index and refuse:
        rule, site = report.applied[index - 1]
        raise Imprecise(rule, site, f"rolled back by the whole-model check: in {check.context} the model with it is "
                                    f"{check.optimised:.1e} from the exact output, the original {check.original:.1e} "
                                    f"(limit {check.limit:.1e}: its new constants cancel in {check.context}, as a large shift folded "
                                    "into the following layer does)")
    where = (f"the first rewrite that makes it so is #{index} of {applied}: rule {report.applied[index - 1][0]!r} "
             f"at {report.applied[index - 1][1]} (disable it with disable=[{report.applied[index - 1][0]!r}])"
             if index else "the captured graph itself (no rewrite) does so; please report this model")
    return (f"the optimised {report.model} loses precision in {check.context} that the original does not: "
            f"{check.describe()}; {where}")


class _Twin:
    """The same pipeline on float64 copies of the model and the inputs: no weight is rounded there, so it
    tells whether the rewrites are exact, whatever float32 makes of the folded weights."""

    def __init__(self, model64: nn.Module, inputs64: tuple[Any, ...], run: Callable[[int | None, Report], fx.GraphModule],
                 gm: fx.GraphModule, report: Report) -> None:
        self.model, self.inputs, self.run, self.gm, self.report = model64, inputs64, run, gm, report


def _twin(model: nn.Module, inputs: tuple[Any, ...], selected: tuple[Rule, ...], settings: dict[str, Any],
          decided: Report) -> _Twin | None:
    """The float64 twin of the run that wrote ``decided`` (its cost-gate verdicts replayed: float64 doubles
    every tensor's bytes, which would change the estimates), or None where the model or its capture cannot
    be cast to float64."""
    try:
        model64 = copy_module(model).double()
        inputs64 = tuple(x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                         for x in inputs)
        gm64, report64 = _captured(model64, inputs64, settings["leaf_modules"])
        run64 = _replayer(model64, inputs64, gm64, selected, decided=decided, **settings)
        run64(None, report64)
    except Exception as exc:  # noqa: BLE001 - float32-only code (a dtype written into the model): no twin
        log.info("no float64 twin of %s: %s", type(model).__name__, exc)
        return None
    return _Twin(model64, inputs64, run64, gm64, report64)


def _within_rounding(model: nn.Module, gm: fx.GraphModule, outcome: Comparison, limit: float, report: Report,
                     replay: Callable[[int], fx.GraphModule], twin: _Twin | None) -> str | None:
    """None when the mismatch is float32 rounding: the twin applied the same rewrites, to the same code, and
    is within ``limit`` of the original; ``gm`` then takes the twin's weights rounded to its dtype
    (:func:`~fxrebirth.rewrite.endtoend.adopt_weights`: the exact model, stored as precisely as float32
    can) and the report gives both models' distance from the exact output. Otherwise why not, naming the
    first wrong rewrite (found on the twin when it is the twin that differs)."""
    if twin is None:
        return _culprit(model, outcome, limit, report, replay)
    same = [rule for rule, _ in twin.report.applied] == [rule for rule, _ in report.applied]
    proof = compare(model, twin.gm, twin.inputs)
    if proof.error > limit:
        return "in float64 too: " + _culprit(model, proof, limit, twin.report, lambda k: twin.run(k, Report()))
    gap = weight_rounding(gm, twin.gm) if same else None
    if gap is None:
        return ("the float64 twin applied other rewrites or produced other code, so it cannot tell rounding from "
                "a wrong rewrite; " + _culprit(model, outcome, limit, report, replay))
    adopt_weights(gm, twin.gm)
    own, mine = float_rounding(model, gm, outcome.worst)
    note = (f"float64 twin: the same {len(report.applied)} rewrites on a float64 copy differ by {proof.error:.1e} "
            f"<= {limit:.0e} (exact); the folded weights are the twin's rounded to {storage_dtype(gm)} (the "
            f"pipeline's own were within {gap:.2g} units of rounding of them); float32 rounding: at "
            f"{describe_inputs(outcome.worst)} the optimised model is {mine:.1e} from the exact output, the "
            f"original {own:.1e}")
    report.checks.append(note)
    if gap > WEIGHT_ROUNDING:
        log.warning("%s: a rule computed folded weights %.3g units of rounding from the exact ones; they were "
                    "replaced by the float64 twin's (please report this model)", report.model, gap)
    log.info("%s: %s", report.model, note)
    return None


def _culprit(model: nn.Module, outcome: Any, limit: float, report: Report,
             replay: Callable[[int], fx.GraphModule]) -> str:
    """Which rewrite first makes the model differ: the smallest prefix of the applied rewrites whose result
    fails the check at the failing input (bisection; each probe captures and rewrites again)."""
    worst = outcome.worst

    def bad(k: int) -> bool:
        return compare(model, replay(k), worst, exactly=True).error > limit

    if not report.applied or bad(0):
        if "write to its inputs" in outcome.detail:
            return ("the captured graph itself (no rewrite) does not write to the model's inputs as its forward "
                    "does; make the forward work on a copy (x = x + y instead of x += y on an input)")
        return ("the captured graph itself (no rewrite) does not reproduce the model: it may update state in "
                "forward (e.g. self.count += 1, which torch.fx cannot trace) or depend on Python values; keep the "
                "module opaque with leaf_modules=[...] or make its forward traceable")
    low, high = 0, len(report.applied)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if bad(middle) else (middle, high)
    rule, node = report.applied[high - 1]
    return (f"the first rewrite that makes it differ is #{high} of {len(report.applied)}: rule {rule!r} at {node} "
            f"(disable it with disable=[{rule!r}] and please report this model)")
