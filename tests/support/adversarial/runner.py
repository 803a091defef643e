"""Running a case (:func:`run_case`): optimise the model at its example, look for what ``optimize``
modified, then compare the result with a copy of the original at every ``(batch, size)`` and classify
what happened (:class:`~tests.support.adversarial.Outcome`)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from fxrebirth.frontends.library import optimize as _optimize
from tests.support.adversarial.builders import height_width
from tests.support.adversarial.compat import FxRebirthError, relative_error, tolerance
from tests.support.adversarial.records import SEVERITY, Case, Outcome, Size
from tests.support.adversarial.snapshots import (
    clone_value,
    diff_inputs,
    diff_model,
    flat_tensors,
    global_state,
    snapshot_inputs,
    snapshot_model,
)


def _first_float_dtype(value: Any) -> torch.dtype:
    for _, t in flat_tensors(value):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _describe_exc(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _memory_formats(value: Any) -> list[bool]:
    return [t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
            for _, t in flat_tensors(value) if t.dim() == 4]


def _fmt_size(size: Size) -> str:
    return str(size) if isinstance(size, int) else "x".join(map(str, size))


def _outcome(case: Case, status: str, detail: str = "", **kw: Any) -> Outcome:
    return Outcome(case.name, case.klass, status, detail, **kw)


def run_case(case: Case) -> Outcome:
    """Optimise ``case``'s model at its example and classify what happens (see the module docstring)."""
    teardown = case.setup() if case.setup is not None else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(case)
    finally:
        if teardown is not None:
            teardown()


def _run(case: Case) -> Outcome:
    model = case.build()
    reference = _original_copy(case, model)
    ex_batch, ex_size = case.example
    example = case.inputs(ex_batch, ex_size)
    model_before, inputs_before, global_before = snapshot_model(model), snapshot_inputs(example), global_state()
    options = case.options()

    result, failure = _optimize_case(case, model, example, options)
    mutated = _mutations(model, model_before, inputs_before, global_before)
    if failure is not None:
        if mutated:
            return _outcome(case, "mutated", f"{mutated} (and optimize: {failure[0]}: {failure[1]})")
        return _outcome(case, *failure)

    comparison = _Comparison(case, reference, result)
    comparison.run()
    return comparison.verdict(mutated)


def _original_copy(case: Case, model: nn.Module) -> nn.Module:
    """The ORIGINAL, taken before optimize could touch it."""
    try:
        return copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - e.g. old-style weight_norm's non-leaf weight: builders are seeded
        return case.build()


def _optimize_case(case: Case, model: nn.Module, example: tuple,
                   options: dict) -> tuple[nn.Module | None, tuple[str, str] | None]:
    """``optimize`` (or the case's own entry) on the example: ``(result, None)``, or ``(None, (status,
    detail))`` when it refused with a clear error or crashed."""
    try:
        if case.entry is not None:
            return case.entry(model, example, options), None
        result, _report = _optimize(model, example, **options)
        return result, None
    except FxRebirthError as exc:
        return None, ("refused", _describe_exc(exc))
    except Exception as exc:  # noqa: BLE001 - anything but a clear error is a crash
        return None, ("crash", "optimize: " + _describe_exc(exc))


def _mutations(model: nn.Module, model_before: dict[str, Any], inputs_before: list,
               global_before: dict[str, Any]) -> str:
    """What ``optimize`` modified of the model, the example inputs and global torch state ("": nothing)."""
    mutations = diff_model(model_before, snapshot_model(model)) + diff_inputs(inputs_before)
    global_after = global_state()
    mutations += [f"global {k} changed ({global_before[k]} -> {global_after[k]})"
                  for k in global_before if global_before[k] != global_after[k]]
    if not mutations:
        return ""
    return "; ".join(mutations[:4]) + (f"; +{len(mutations) - 4} more" if len(mutations) > 4 else "")


class _Comparison:
    """The result of one case checked against its original, one ``(batch, size)`` at a time:
    ``problems`` (``(status, detail)``), the ``(batch, size)`` the result ``guarded``, the checks
    ``compared``."""

    def __init__(self, case: Case, reference: nn.Module, result: nn.Module) -> None:
        self.case, self.reference, self.result = case, reference, result
        self.problems: list[tuple[str, str]] = []  # (status, detail)
        self.guarded: list[tuple[int, Any]] = []
        self.compared = 0

    def run(self) -> None:
        """Every size of the case, at batch 2 and at the example's batch."""
        batches = sorted({2, self.case.example[0]}, key=lambda b: (b != 2, b))
        for size in self.case.sizes:
            for batch in batches:
                self.check(batch, size)
        if self.case.records is not None:
            self.case.records().clear()

    def check(self, batch: int, size: Size) -> None:
        case = self.case
        where = f"batch {batch}, size {_fmt_size(size)}"
        ref_inputs = case.inputs(batch, size)
        res_inputs = clone_value(ref_inputs)
        ref_saved = copy.deepcopy(self.reference) if case.state is not None else None
        if case.records is not None:
            case.records().clear()
        try:
            with torch.no_grad():
                expected = self.reference(*ref_inputs)
        except Exception:  # noqa: BLE001 - the original does not accept this size: skip it
            if ref_saved is not None:
                self.reference = ref_saved
            return
        ref_records = list(case.records()) if case.records is not None else None
        if case.records is not None:
            case.records().clear()
        try:
            with torch.no_grad():
                actual = self.result(*res_inputs)
        except FxRebirthError as exc:
            self._guarded(batch, size, where, exc, ref_saved)
            return
        except Exception as exc:  # noqa: BLE001
            self.problems.append(("crash", f"result at {where}: {_describe_exc(exc)}"))
            return
        self.compared += 1
        problem = self._difference(expected, actual, ref_inputs, res_inputs, ref_records, where)
        if problem is not None:
            self.problems.append(problem)

    def _guarded(self, batch: int, size: Size, where: str, exc: BaseException, ref_saved: nn.Module | None) -> None:
        """The result refused ``size`` with a clear error: a shape guard, but never at the example's size."""
        self.guarded.append((batch, size))
        if ref_saved is not None:
            self.reference = ref_saved
        if height_width(size) == height_width(self.case.example[1]):
            self.problems.append(("crash", f"the result refuses the example's own size ({where}): "
                                           f"{_describe_exc(exc)}"))

    def _difference(self, expected: Any, actual: Any, ref_inputs: tuple, res_inputs: tuple,
                    ref_records: list | None, where: str) -> tuple[str, str] | None:
        """The first way the result's call differs from the original's (outputs, inputs after the call,
        hook records, memory format, state), or None."""
        case = self.case
        bound = tolerance(_first_float_dtype(expected))
        error = relative_error(expected, actual)
        if not error <= bound:
            return ("wrong", f"output error {error:.3g} > {bound:g} at {where}")
        input_error = relative_error(ref_inputs, res_inputs)
        if not input_error <= bound:
            return ("wrong", f"inputs after the call differ from the original's ({input_error:.3g}) at {where}")
        if case.records is not None:
            got = list(case.records())
            rec_error = relative_error(ref_records, got)
            if not rec_error <= bound:
                return ("wrong", f"hook records differ ({len(ref_records)} vs {len(got)} entries, "
                                 f"error {rec_error:.3g}) at {where}")
        if case.check_format and _memory_formats(expected) != _memory_formats(actual):
            return ("wrong", f"output memory format channels_last={_memory_formats(actual)} vs "
                             f"original {_memory_formats(expected)} at {where}")
        if case.state is not None:
            try:
                state_ref, state_res = case.state(self.reference), case.state(self.result)
            except Exception as exc:  # noqa: BLE001
                return ("wrong", f"state not found on the result: {_describe_exc(exc)}")
            state_error = relative_error(state_ref, state_res)
            if not state_error <= bound:
                return ("wrong", f"state after the call differs ({state_error:.3g}) at {where}")
        return None

    def verdict(self, mutated: str) -> Outcome:
        """The worst problem found (after the mutations ``optimize`` made, if any), else ``"ok"``."""
        case, problems, guarded, compared = self.case, self.problems, self.guarded, self.compared
        if problems:
            worst = max(problems, key=lambda p: SEVERITY[p[0]])[0]
            details = [d for s, d in problems if s == worst]
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            if mutated:
                return _outcome(case, "mutated", f"{mutated} (and the result: {worst}: {details[0]}{more})",
                                guarded=guarded, compared=compared)
            return _outcome(case, worst, details[0] + more, guarded=guarded, compared=compared)
        if mutated:
            return _outcome(case, "mutated", mutated, guarded=guarded, compared=compared)
        detail = f"guarded at {[(b, _fmt_size(s)) for b, s in guarded]}" if guarded else ""
        if not compared:
            detail = (detail + "; " if detail else "") + "nothing compared (no size both models accept)"
        return _outcome(case, "ok", detail, guarded=guarded, compared=compared)
