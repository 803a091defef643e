"""The catalog's records: :class:`Case` (one adversarial model and how to check it), :class:`Outcome`
(what :func:`~tests.support.adversarial.run_case` found), the case classes and the outcome statuses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

CLASSES = ("inplace", "hooks", "shapes", "verification", "dtypes", "inputs", "own")
STATUSES = ("ok", "refused", "wrong", "crash", "mutated")
SEVERITY = {"ok": 0, "refused": 1, "wrong": 2, "crash": 3, "mutated": 4}

Size = Any  # an int (square) or a (height, width) tuple


@dataclass
class Case:
    """One adversarial model.

    ``build()`` returns a fresh model; ``inputs(batch, size)`` a fresh, seeded tuple of inputs;
    ``sizes`` are checked at batch 2 and at the example's batch; ``example`` is the ``(batch, size)``
    given to ``optimize``; ``options()`` returns its keyword options (a function, so that each run gets
    fresh rule instances). Optional: ``state(module)`` returns state to compare after every call (a
    buffer the forward increments, train-mode running statistics); ``records()`` returns a list a hook
    fills at run time (compared entry by entry); ``setup()`` installs something global and returns its
    teardown; ``entry(model, inputs, options)`` replaces the call to ``optimize`` (returns the module);
    ``check_format`` compares the output's memory format.
    """

    name: str
    klass: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, Size], tuple]
    sizes: Sequence[Size] = (18, 19, 23)
    example: tuple[int, Size] = (2, 18)
    options: Callable[[], dict] = dict
    description: str = ""
    state: Callable[[nn.Module], Any] | None = None
    records: Callable[[], list] | None = None
    setup: Callable[[], Callable[[], None]] | None = None
    entry: Callable[[nn.Module, tuple, dict], nn.Module] | None = None
    check_format: bool = False

    def __post_init__(self) -> None:
        if self.klass not in CLASSES:
            raise ValueError(f"case {self.name}: unknown class {self.klass!r}")


@dataclass
class Outcome:
    """What :func:`run_case` found: ``status`` is one of :data:`STATUSES`; ``detail`` says why;
    ``guarded`` lists the ``(batch, size)`` at which the result raised a clear error; ``compared`` counts
    the (batch, size) checks that ran."""

    name: str
    klass: str
    status: str
    detail: str = ""
    guarded: list = field(default_factory=list)
    compared: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, "class": self.klass, "status": self.status, "detail": self.detail,
                "guarded": [list(g) for g in self.guarded], "compared": self.compared}
