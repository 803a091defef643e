"""The catalog itself: :data:`CASES`, every family's cases in one list (inplace, hooks, shapes,
verification, dtypes, inputs, own, in that order), and :func:`cases` to select one class."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from tests.support.adversarial.builders import images
from tests.support.adversarial.dtypes import dtype_cases
from tests.support.adversarial.hooks import hook_cases
from tests.support.adversarial.inplace import inplace_cases
from tests.support.adversarial.inputs import input_cases
from tests.support.adversarial.own import own_cases
from tests.support.adversarial.records import Case, Size
from tests.support.adversarial.shapes import shape_cases
from tests.support.adversarial.verification import verification_cases

_FAMILIES = (inplace_cases, hook_cases, shape_cases, verification_cases, dtype_cases, input_cases, own_cases)


def _make_cases() -> list[Case]:
    """Every family's cases, through one ``add``: a case without its own inputs gets
    ``images(3, its index in the catalog)``, so the order of the families is part of the catalog."""
    c: list[Case] = []

    def add(name: str, klass: str, build: Callable[[], nn.Module], inputs: Callable[[int, Size], tuple] | None = None,
            **kw: Any) -> None:
        c.append(Case(name, klass, build, inputs or images(3, len(c)), **kw))

    for family in _FAMILIES:
        family(add)
    return c


CASES: list[Case] = _make_cases()


def cases(klass: str | None = None) -> list[Case]:
    """The catalog (optionally one class)."""
    return [c for c in CASES if klass is None or c.klass == klass]
