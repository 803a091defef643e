"""The end-to-end check of a program (:func:`check_program`): optimise it at its nominal size, then
compare the result with the original at each size and batch; :class:`Outcome` records what was found.
The functions it calls are passed in, so the same check runs against older versions of fxrebirth."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from tests.support.programs.program import CHECK_BATCHES, Program


@dataclass
class Outcome:
    """What :func:`check_program` found. ``problems`` holds ``(kind, text)`` with kind ``"wrong"``,
    ``"crash"`` or ``"mutated"``; empty when the program passed (matched, or refused clearly)."""

    seed: int
    refused: str | None = None           # optimize() raised the project's error: its message
    checked: int = 0                     # (size, batch) pairs compared
    guarded: int = 0                     # (size, batch) pairs where the result raised the project's error
    worst: float = 0.0
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def kinds(self) -> set[str]:
        return {k for k, _ in self.problems}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:240] if text else ''}"


def _clone(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.clone() for t in inputs)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def _same_state(before: dict[str, torch.Tensor], module: nn.Module) -> str | None:
    after = module.state_dict(keep_vars=True)
    if set(before) != set(after):
        return f"state_dict keys changed: {sorted(set(before) ^ set(after))}"
    for k, v in before.items():
        if after[k].shape != v.shape or after[k].dtype != v.dtype or not torch.equal(after[k].detach(), v):
            return f"{k} changed"
    if module.training:
        return "module left in training mode"
    return None


def check_options(seed: int) -> dict[str, Any]:
    """The optimize() options a seed is checked with: example batch 1 or 2; ``cost_model=None`` (every
    exact merge accepted) on about a third of the seeds."""
    rng = random.Random(f"check options {seed}")
    return {"batch": rng.choice([1, 2]), "accept_all": rng.random() < 0.35}


def check_program(
    program: Program,
    optimize: Callable[..., Any],
    error: type[BaseException],
    relative_error: Callable[[Any, Any], float],
    tolerance: Callable[[torch.dtype], float],
    *,
    batch: int | None = None,
    accept_all: bool | None = None,
) -> Outcome:
    """Optimise ``program.module`` on an example at the nominal size and compare the result with the
    original at every size in ``program.sizes`` where the original runs, at each of
    :data:`CHECK_BATCHES`. Passing means: ``optimize`` raised ``error``, or at every (size, batch) the
    result raised ``error`` or matched (``relative_error <= tolerance(dtype)``); and neither the
    module nor the example inputs were modified. Any other exception is a ``"crash"``."""
    opts = check_options(program.seed)
    batch = opts["batch"] if batch is None else batch
    accept_all = opts["accept_all"] if accept_all is None else accept_all
    outcome = Outcome(program.seed)
    module = program.module
    example = program.inputs(batch, program.nominal, salt=0)
    example_copy = _clone(example)
    state = _state(module)
    kwargs = {"cost_model": None} if accept_all else {}
    gm = _optimize_once(outcome, optimize, error, module, example, f"optimize(batch={batch}, {kwargs})", kwargs)
    changed = _same_state(state, module)
    if changed:
        outcome.problems.append(("mutated", f"optimize() modified the model: {changed}"))
    for i, (a, b) in enumerate(zip(example, example_copy)):
        if not torch.equal(a, b):
            outcome.problems.append(("mutated", f"optimize() modified example input {i}"))
    if gm is None:
        return outcome
    _compare_sizes(outcome, program, gm, error, relative_error, tolerance(program.dtype))
    changed = _same_state(state, module)
    if changed:
        outcome.problems.append(("mutated", f"running the result modified the model: {changed}"))
    return outcome


def _optimize_once(outcome: Outcome, optimize: Callable[..., Any], error: type[BaseException], module: nn.Module,
                   example: tuple[torch.Tensor, ...], call: str, kwargs: dict[str, Any]) -> Any:
    """``optimize(module, example, **kwargs)``'s module, or None: it refused with ``error`` (its message
    in ``outcome.refused``) or raised anything else (a ``"crash"`` naming ``call``)."""
    try:
        gm, _report = optimize(module, example, **kwargs)
        return gm
    except error as exc:
        outcome.refused = _first_line(exc)
    except Exception as exc:  # noqa: BLE001
        outcome.problems.append(("crash", f"{call} raised {_first_line(exc)}"))
    return None


def _compare_sizes(outcome: Outcome, program: Program, gm: Any, error: type[BaseException],
                   relative_error: Callable[[Any, Any], float], tol: float) -> None:
    """The result against the original at every size of ``program`` and every batch of
    :data:`CHECK_BATCHES`, into ``outcome`` (sizes where the original does not run are skipped)."""
    module = program.module
    for size in program.sizes:
        for n in CHECK_BATCHES:
            inputs = program.inputs(n, size, salt=1 + size)
            try:
                with torch.no_grad():
                    expected = module(*_clone(inputs))
            except Exception:  # noqa: BLE001 - the original does not run here: nothing to compare
                continue
            try:
                with torch.set_grad_enabled(n == CHECK_BATCHES[-1]):  # the result runs with and without autograd
                    actual = gm(*_clone(inputs))
            except error:
                outcome.guarded += 1
                continue
            except Exception as exc:  # noqa: BLE001
                outcome.problems.append(("crash", f"result at size {size}, batch {n} raised {_first_line(exc)}"))
                continue
            outcome.checked += 1
            err = relative_error(expected, actual)
            outcome.worst = max(outcome.worst, err)
            if not err <= tol:
                outcome.problems.append(("wrong", f"size {size}, batch {n}: relative error {err:.3g} > {tol:g}"))
