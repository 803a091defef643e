"""Prove a rule in one call: :func:`check_rule`.

Give it your rule and a hypothesis strategy of ``(model, example_input)`` cases that contain the
pattern. For every drawn case and dtype, the kit captures the model, applies ONLY your rule (plus the
``before`` rules you name) with the pipeline's own checks (local verification, the whole-model check)
turned off and the cost gate off -- so it is the kit, not the safety net, that judges the rule -- and
asserts

* the expected number of rewrites (``expected_rewrites``: a number, or a function of the case),
* the absence of nodes the rule must remove (``removes``: canonical kinds such as ``"batch_norm"``),
* equivalence with the original, within the per-dtype tolerance of :data:`fxrebirth.testing.TOLERANCES`,
  on the example and on its variants (:mod:`fxrebirth.graph.variants`: batch >= 2, two larger sizes) wherever
  the original runs; a size the result refuses with :class:`fxrebirth.ShapeGuardError` (a rule that
  records a size guard) is not compared.

On failure hypothesis shrinks the case to a minimal one and the report shows it as readable PyTorch:
the captured graph's code before and after the rewrite.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from fxrebirth.frontends.library import optimize
from fxrebirth.graph.capture import capture
from fxrebirth.errors import ShapeGuardError
from fxrebirth.graph.ops import kind_of
from fxrebirth.rewrite.rules import Rule
from fxrebirth.graph.variants import SPATIAL_OFFSETS, variant_inputs

from fxrebirth.testing import assert_equivalent

__all__ = ["check_rule"]


def check_rule(
    rule: Rule,
    cases: st.SearchStrategy[tuple[torch.nn.Module, torch.Tensor]],
    *,
    expected_rewrites: int | Callable[[torch.nn.Module, torch.Tensor], int] = 1,
    removes: Iterable[str] = (),
    before: Sequence[Rule] = (),
    dtypes: Sequence[torch.dtype] = (torch.float64, torch.float32),
    max_examples: int | None = None,
    leaf_modules: Sequence[type[torch.nn.Module]] = (),
) -> None:
    """Property-check ``rule`` over ``cases`` (see the module docstring); raises on the first
    (shrunk) counterexample. ``leaf_modules`` are kept as module calls, as in :func:`fxrebirth.optimize`."""
    removes = tuple(removes)
    overrides: dict[str, Any] = {"deadline": None, "database": None,
                                 "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
    if max_examples is not None:
        overrides["max_examples"] = max_examples

    @settings(**overrides)
    @given(case=cases, dtype=st.sampled_from(list(dtypes)))
    def prove(case: tuple[torch.nn.Module, torch.Tensor], dtype: torch.dtype) -> None:
        model, x = case
        model, x = model.to(dtype).eval(), x.to(dtype)
        note(f"original (captured):\n{capture(model, x, leaf_modules=leaf_modules).code}")
        gm, report = optimize(model, x, rules=list(before) + [rule], verify=False, check_output=False,
                              cost_model=None, leaf_modules=leaf_modules)
        note(f"after {rule.name}:\n{gm.code}")
        stats = report.stats(rule.name)
        expected = expected_rewrites(model, x) if callable(expected_rewrites) else expected_rewrites
        reasons = "; ".join(r.reason for r in stats.refusals)
        assert stats.rewrites == expected, (
            f"{rule.name}: {stats.rewrites} rewrite(s), expected {expected}" + (f" (refused: {reasons})" if reasons else "")
        )
        left = [n.name for n in gm.graph.nodes if kind_of(n) in removes]
        assert not left, f"{rule.name}: {left} should have been removed"
        assert_equivalent(model, gm, x, msg=f"{rule.name} in {dtype}")
        for index in range(1 + len(SPATIAL_OFFSETS)):
            variant = variant_inputs((x,), index)
            if variant is None:
                continue
            try:
                with torch.no_grad():
                    model(*variant)
            except Exception:  # noqa: BLE001 - the model itself does not run at this size
                continue
            try:
                assert_equivalent(model, gm, variant, msg=f"{rule.name} in {dtype} at {tuple(variant[0].shape)}")
            except ShapeGuardError:
                continue

    prove()
