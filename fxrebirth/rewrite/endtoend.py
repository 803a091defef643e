"""The whole-model check: the optimised model against the original, on inputs the example did not fix.

:func:`compare` runs both models on two random inputs derived from the example (:mod:`fxrebirth.graph.variants`:
the example's size at batch >= 2, and a larger spatial size) and returns the worst norm-wise relative
error (:func:`fxrebirth.equivalence.relative_error`). Both run in float64 when the original can
(parameters, buffers and floating-point inputs cast; the error left is then the rounding of the folded
weights to their storage dtype) and its float64 weights fit in :data:`FLOAT64_LIMIT`; otherwise in the
model's own dtype, which the result says. Neither model
is modified: both run through ``torch.func.functional_call`` on copies of their buffers (and, in float64,
of their parameters), under the same random seed, so state updated by the forward (a counter, training
statistics) starts from the same values in both and leaks into neither; a model with hooks is checked on
a copy (a hook may write to its module), whose hooks run. A forward that changes its state is called
twice, so that the second call sees the update, and a forward that writes to its inputs must leave them
as the original does.

A variant at which the original raises is skipped (the model does not accept it); one at which the
optimised model raises :class:`~fxrebirth.errors.ShapeGuardError` is recorded as guarded; any other
exception of the optimised model is an infinite error. Where the original runs at no variant (a flatten
into a Linear sized for the example's batch), the example itself is checked and the result says why.

The original's output at each checked input is kept (``Comparison.references``: the exact reference of
the rounding criterion, :mod:`fxrebirth.rewrite.precision`). With ``gradients`` the backward passes are
compared too (:func:`gradient_error`): what a lost ``no_grad`` region or backward hook changes.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from fxrebirth.graph.capture import copy_module
from fxrebirth.equivalence import MIN_BATCH, flush_denormals, relative_error, tolerance, unit_roundoff
from fxrebirth.errors import ShapeGuardError, first_line, held_stderr
from fxrebirth.graph.metadata import reads_only_shape
from fxrebirth.graph.variants import variant_inputs

__all__ = ["Comparison", "compare", "gradient_error", "runnable", "copied_state", "calls_from", "check_inputs",
           "storage_dtype", "bound", "describe_inputs", "float_rounding", "weight_rounding", "adopt_weights"]

log = logging.getLogger(__name__)


@dataclass
class Comparison:
    """The outcome of :func:`compare`: the worst error, where it was measured, and what was checked."""

    error: float = 0.0
    worst: tuple[Any, ...] | None = None
    precision: str = "float64"
    checked: list[str] = field(default_factory=list)
    detail: str = ""
    references: list[tuple[tuple[Any, ...], Any]] = field(default_factory=list, repr=False)
    """``(inputs, output)`` of the original's first call at each checked input, in float64 where the check
    ran in float64 (the exact reference of :mod:`fxrebirth.rewrite.precision`)."""

    @property
    def ran(self) -> bool:
        return bool(self.checked)


def storage_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model stores its floating-point weights in (float32 for a model without any)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def check_inputs(example: Sequence[Any], seed: int = 0) -> list[tuple[Any, ...]]:
    """The two inputs of the check: the example's size at batch >= 2, and the first larger spatial size
    (the first at another seed when the inputs have no spatial dimensions)."""
    first = variant_inputs(example, 0, seed)
    other = variant_inputs(example, 1, seed) or variant_inputs(example, 0, seed + 1)
    return [first, other]


def copied_state(model: nn.Module, to64: bool) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer (float64 for floating ones with ``to64``), keyed as
    ``functional_call`` expects; :func:`calls_from` copies the buffers again before each use (a forward may
    update them), parameters are shared between calls."""
    state: dict[str, torch.Tensor] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        dtype = torch.float64 if to64 and t.is_floating_point() else t.dtype
        state[name] = t.detach().to(dtype, copy=True)
    return state


def _cast_inputs(inputs: Sequence[Any], to64: bool) -> tuple[Any, ...]:
    return tuple(x.detach().to(torch.float64, copy=True) if to64 and isinstance(x, torch.Tensor) and
                 x.is_floating_point() else (x.clone() if isinstance(x, torch.Tensor) else x) for x in inputs)


def _run(model: nn.Module, state: dict[str, torch.Tensor], inputs: Sequence[Any], to64: bool, seed: int) -> Any:
    """One call on copies of ``inputs``: the output, and the inputs as the call left them (a model that
    writes to its input must be matched in that too)."""
    inputs = _cast_inputs(inputs, to64)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        return torch.func.functional_call(model, state, inputs, strict=False), inputs


def calls_from(model: nn.Module, state: dict[str, torch.Tensor], inputs: Sequence[Any], to64: bool, seed: int,
           count: int | None = None) -> list[Any]:
    """The results of calling ``model`` on ``inputs`` from a copy of ``state``: once, or twice when the first
    call changed the state (a stateful forward must update it alike), or ``count`` times."""
    buffers = {name for name, _ in model.named_buffers()}
    state = {k: v.clone() if k in buffers else v for k, v in state.items()}
    before = {k: (v.clone() if k in buffers else v._version) for k, v in state.items()}
    outputs = [_run(model, state, inputs, to64, seed)]
    changed = any(not torch.equal(state[k], v) if k in buffers else state[k]._version != v for k, v in before.items())
    if count is None:
        count = 2 if changed else 1
    while len(outputs) < count:
        outputs.append(_run(model, state, inputs, to64, seed + len(outputs)))
    return outputs


FLOAT64_LIMIT = 2**31
"""Bytes of float64 weights above which the check runs in the model's own dtype instead (a 644M-parameter
model would need 5 GiB per float64 copy, one per model)."""


def _float64_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return 8 * sum(t.numel() for t in tensors if t.is_floating_point())


def _has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in model.modules())


def runnable(model: nn.Module) -> nn.Module:
    """``model``, or a copy of it where it has hooks (a hook may write to its module: spectral_norm sets
    ``.weight``): what a check may run without touching the user's model."""
    return copy_module(model) if _has_hooks(model) else model


def _gradients(model: nn.Module, state: dict[str, torch.Tensor], inputs: Sequence[Any], to64: bool,
               seed: int) -> tuple[list[bool], list[Any], dict[str, torch.Tensor | None]]:
    """What a backward pass gives: which outputs require grad, and the gradients of ``<outputs, v>`` (``v`` a
    seeded random cotangent) with respect to the floating-point inputs and to each parameter that requires
    grad (None where no gradient reaches it), from a fresh copy of ``state``."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        leaves = {k: v.detach().clone().requires_grad_(k in trained and v.is_floating_point()) for k, v in state.items()}
        xs = tuple(x.requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                   for x in _cast_inputs(inputs, to64))
        torch.manual_seed(seed)
        outputs = [o for o in torch.utils._pytree.tree_leaves(torch.func.functional_call(model, leaves, xs, strict=False))
                   if isinstance(o, torch.Tensor) and o.is_floating_point()]
        generator = torch.Generator().manual_seed(seed)
        vectors = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o) for o in outputs]
        flags = [o.requires_grad for o in outputs]
        wrt = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad] + [leaves[k] for k in sorted(trained)]
        pairs = [(o, v) for o, v in zip(outputs, vectors) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], wrt, [v for _, v in pairs], allow_unused=True) \
            if pairs and wrt else [None] * len(wrt)
    count = len(wrt) - len(trained)
    return flags, [g.detach() if g is not None else None for g in grads[:count]], \
        {k: (g.detach() if g is not None else None) for k, g in zip(sorted(trained), grads[count:])}


def _nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool((grad != 0).any())


def gradient_error(original: nn.Module, candidate: nn.Module, inputs: Sequence[Any], *, to64: bool = True,
                   seed: int = 0) -> tuple[float, str]:
    """``(error, note)``: how far ``candidate``'s backward pass is from ``original``'s at ``inputs`` (both from
    copies of their state, float64 with ``to64``): the worst relative error over the gradients with respect
    to the inputs and to every parameter (by name). A gradient that reaches a parameter or an input in one
    model and not in the other (a lost ``torch.no_grad()`` region, a lost backward hook that zeroes it),
    or an output that requires grad in one only, is an infinite error, named in ``note``."""
    original = runnable(original)
    with flush_denormals():
        try:
            theirs = _gradients(original, copied_state(original, to64), inputs, to64, seed)
        except Exception as exc:  # noqa: BLE001 - nothing to compare with
            return 0.0, f"not compared: the original's backward raises {type(exc).__name__}: {first_line(exc, 120)}"
        try:
            mine = _gradients(candidate, copied_state(candidate, to64), inputs, to64, seed)
        except Exception as exc:  # noqa: BLE001 - the optimised model's backward fails where the original's runs
            return float("inf"), f"the optimised model's backward raises {type(exc).__name__}: {first_line(exc, 200)}"
    if mine[0] != theirs[0]:
        return float("inf"), f"outputs that require grad: {theirs[0]} in the original, {mine[0]} optimised"
    worst, note = 0.0, ""
    named = [(f"input {i}", a, b) for i, (a, b) in enumerate(zip(theirs[1], mine[1]))]
    named += [(f"parameter {k!r}", theirs[2].get(k), mine[2].get(k)) for k in sorted(set(theirs[2]) | set(mine[2]))]
    for what, reference, actual in named:
        if _nonzero(reference) != _nonzero(actual):
            where = "the optimised model" if _nonzero(actual) else "the original"
            return float("inf"), f"a gradient reaches {what} only in {where}"
        if reference is None or actual is None:
            continue
        error = relative_error(reference, actual)
        if error > worst:
            worst, note = error, f"worst at the gradient of {what}"
    return worst, note


def compare(original: nn.Module, candidate: nn.Module, example: Sequence[Any], *, seed: int = 0,
            exactly: bool = False, gradients: bool = False) -> Comparison:
    """Worst error of ``candidate`` against ``original`` over :func:`check_inputs` (see the module
    docstring); with ``exactly``, at ``example`` itself only (to probe one input that failed). Both run
    with denormals flushed (:func:`fxrebirth.equivalence.flush_denormals`). With ``gradients`` (a model
    that trains) the backward passes are compared too, at the first checked input (:func:`gradient_error`)."""
    with flush_denormals():
        result = _compare(original, candidate, example, seed, exactly)
    if gradients and result.references:
        inputs = result.references[0][0]
        error, note = gradient_error(original, candidate, inputs, to64=result.precision == "float64", seed=seed)
        result.checked.append(f"{describe_inputs(inputs)}, gradients: {error:.1e}" + (f" ({note})" if note else ""))
        if error > result.error:
            result.error, result.worst, result.detail = error, inputs, f"gradients: {note}"
    return result


def _compare(original: nn.Module, candidate: nn.Module, example: Sequence[Any], seed: int,
             exactly: bool) -> Comparison:
    result = Comparison()
    sets = [tuple(example)] if exactly else check_inputs(example, seed)
    original = runnable(original)
    to64 = True
    size = _float64_bytes(original)
    if size > FLOAT64_LIMIT:
        to64 = False
        result.precision = f"{storage_dtype(original)} (a float64 copy of the weights would take {size / 2**30:.1f} GiB)"
    usable: list[tuple[tuple[Any, ...], list[Any]]] = []
    refused = ""
    state = copied_state(original, to64)
    for inputs in sets:
        try:
            with held_stderr():  # a variant the original refuses is skipped, not shown
                usable.append((inputs, calls_from(original, state, inputs, to64, seed)))
        except Exception as exc:  # noqa: BLE001 - float64 impossible, or the model does not accept this variant
            if to64 and not usable:
                try:
                    state32 = copied_state(original, False)  # kept only where it runs: a later fallback reads ``state``
                    usable.append((inputs, calls_from(original, state32, inputs, False, seed)))
                    state, to64 = state32, False
                    result.precision = f"{storage_dtype(original)} (the original does not run in float64: " \
                                       f"{first_line(exc, 120)})"
                    continue
                except Exception:  # noqa: BLE001 - not a dtype matter: this variant does not run
                    pass
            log.debug("the original does not run at %s: %s", describe_inputs(inputs), exc)
            refused = refused or f"{describe_inputs(inputs)}: {first_line(exc, 120)}"
    only = None
    if not usable:  # a model that runs only at its example's batch: the example itself
        inputs = tuple(example)
        usable.append((inputs, calls_from(original, state, inputs, to64, seed)))
        only = f" (the example's batch only: the original does not run at batch >= {MIN_BATCH} or another size: " \
               f"{refused})"
    del state  # the original's float64 copy is not needed beside the candidate's
    result.references = [(inputs, reference[0][0]) for inputs, reference in usable]
    candidate_state = copied_state(candidate, to64)
    for inputs, reference in usable:
        where = describe_inputs(inputs) + (only or "")
        try:
            actual = calls_from(candidate, candidate_state, inputs, to64, seed, len(reference))
        except ShapeGuardError:
            result.checked.append(f"{where}: guarded (a size guard refuses this size)")
            continue
        except Exception as exc:  # noqa: BLE001 - the optimised model fails where the original runs
            error, note = float("inf"), f"raised {type(exc).__name__}: {first_line(exc, 200)}"
        else:
            error = relative_error([r[0] for r in reference], [a[0] for a in actual])
            written = relative_error([r[1] for r in reference], [a[1] for a in actual])
            note = "" if written <= error or written == 0 else \
                "the optimised model does not write to its inputs as the original does"
            error = max(error, written)
        error = float("inf") if error != error else error  # NaN
        result.checked.append(f"{where}: {error:.1e}" + (f" ({note})" if note else ""))
        if error > result.error or result.worst is None:
            result.error, result.worst, result.detail = error, inputs, note
    return result


def float_rounding(original: nn.Module, candidate: nn.Module, inputs: Sequence[Any], seed: int = 0) -> tuple[float, float]:
    """``(own, candidate)``: how far the original and the candidate, each run in its own dtype at ``inputs``,
    are from the original run in float64 (norm-wise relative errors; the float32 rounding each carries)."""
    original = runnable(original)
    with flush_denormals():
        exact = calls_from(original, copied_state(original, True), inputs, True, seed)
        count = len(exact)
        own = calls_from(original, copied_state(original, False), inputs, False, seed, count)
        mine = calls_from(candidate, copied_state(candidate, False), inputs, False, seed, count)
    reference = [r[0] for r in exact]
    return relative_error(reference, [o[0] for o in own]), relative_error(reference, [m[0] for m in mine])


_COMPARISONS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge}


def _computation(module: nn.Module) -> list[tuple[Any, ...]] | None:
    """What ``module``'s graph computes, node by node, up to dtype: each node's op, target and arguments
    (graph values by position, dtypes as one placeholder), less the nodes that only check or query
    shapes (size guards, metadata queries, ``torch._assert``, and comparisons that read nothing but those
    and constants), which the canonical form keeps or resolves depending on how long the symbolic shape
    run was allowed. A comparison of tensor values is computation and is compared. None for a module
    without a graph."""
    graph = getattr(module, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    position: dict[torch.fx.Node, int] = {}
    skipped: set[torch.fx.Node] = set()
    steps = []
    for node in graph.nodes:
        on_shapes = node.op == "call_function" and node.target in _COMPARISONS \
            and all(n in skipped for n in node.all_input_nodes)
        if reads_only_shape(node) or on_shapes or (node.op == "call_function" and node.target is torch._assert):
            skipped.add(node)
            continue
        position[node] = len(position)
        args = torch.fx.node.map_aggregate(
            torch.fx.node.map_arg((node.args, node.kwargs), lambda a: ("value", position.get(a, a.name))),
            lambda v: "dtype" if isinstance(v, torch.dtype) else v)
        steps.append((node.op, str(node.target), str(args)))
    return steps


def _same_program(candidate: nn.Module, exact: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """``{name: (candidate's tensor, exact's)}`` over every parameter and buffer, when ``exact`` (a float64
    twin) is ``candidate`` up to dtype: the same computation (:func:`_computation`) on the same names,
    shapes and non-floating values; otherwise None."""
    ours = dict(candidate.named_parameters()) | dict(candidate.named_buffers())
    theirs = dict(exact.named_parameters()) | dict(exact.named_buffers())
    if ours.keys() != theirs.keys():
        return None
    if _computation(candidate) != _computation(exact):
        return None
    pairs = {}
    for name, mine in ours.items():
        other = theirs[name]
        if mine.shape != other.shape or mine.is_floating_point() != other.is_floating_point():
            return None
        if not mine.is_floating_point() and not torch.equal(mine, other.to(mine.device)):
            return None
        pairs[name] = (mine, other)
    return pairs


def weight_rounding(candidate: nn.Module, exact: nn.Module) -> float | None:
    """How far ``candidate``'s floating-point weights are from those of ``exact``, its float64 twin: the worst
    tensor's ``max|w - exact| / max|exact|`` in units of the roundoff of ``w``'s dtype (at most 1 when every
    element is ``exact`` rounded to nearest; :data:`fxrebirth.equivalence.WEIGHT_ROUNDING`). None when the
    two are not the same program (:func:`_same_program`)."""
    pairs = _same_program(candidate, exact)
    if pairs is None:
        return None
    worst = 0.0
    for mine, other in pairs.values():
        if mine.is_floating_point() and mine.dtype != torch.float64 and mine.numel():
            error = relative_error(other.detach(), mine.detach())
            worst = max(worst, error / unit_roundoff(mine.dtype) if error != float("inf") else error)
    return worst


def adopt_weights(candidate: nn.Module, exact: nn.Module) -> bool:
    """Give ``candidate`` the floating-point weights of ``exact``, its float64 twin, each rounded to nearest
    in its own dtype: the most precise the candidate can store the exact fold in, whatever arithmetic
    computed its own. False (nothing changed) when the two are not the same program."""
    pairs = _same_program(candidate, exact)
    if pairs is None:
        return False
    with torch.no_grad():
        for mine, other in pairs.values():
            if mine.is_floating_point():
                mine.copy_(other.to(device=mine.device, dtype=mine.dtype))
    return True


def bound(model: nn.Module) -> float:
    """The whole-model tolerance for ``model`` (that of its storage dtype)."""
    return tolerance(storage_dtype(model))


def describe_inputs(inputs: Sequence[Any] | None) -> str:
    """The shapes of the tensor inputs, for messages."""
    shapes = [tuple(x.shape) for x in inputs or () if isinstance(x, torch.Tensor)]
    return ", ".join(str(s) for s in shapes) or "no tensor inputs"
