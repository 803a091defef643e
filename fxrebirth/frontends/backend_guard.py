"""The per-call guards of ``torch.compile(backend="fxrebirth")``: what each call checks before it runs the
graph compiled from folded weights, and the log of BatchNorm statistics that graphs of the backend
updated. The contracts are stated in :mod:`fxrebirth.frontends.backend`'s docstring."""

from __future__ import annotations

import logging
import operator
from typing import Any, Callable, Sequence

import torch

__all__ = ["GUARDS", "STATISTICS", "StatisticsLog", "guarded", "picker"]

log = logging.getLogger("fxrebirth.frontends.backend")

GUARDS = ("weights", "identity", "none")
"""The backend's per-call guards, from the safest: ``weights`` (identity, version counter and storage of
every folded weight, and statistics updated through the backend), ``identity`` (only whether the weight
objects passed are the ones folded) and ``none`` (Inductor's freezing contract: weights are constants)."""

Builder = Callable[[Sequence[Any]], "Callable[..., Any] | None"]
"""``build(inputs)``: the graph with the weights in ``inputs`` folded and compiled, or None when it failed."""


def picker(indices: list[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """``args -> tuple(args[i] for i in indices)`` in C (``itemgetter`` returns a bare item for one index)."""
    if len(indices) > 1:
        return operator.itemgetter(*indices)
    return lambda args: tuple(args[i] for i in indices)


def _same_storage(tensors: list[Any]) -> Callable[[], bool]:
    """``check()``: whether every tensor still has the storage it has now (``p.data = t`` changes it).

    One C++ call over the list where PyTorch has it (``torch._C._tensors_data_ptrs_at_indices_equal``,
    the check CUDA graph trees make of their static inputs; 1.7x faster than ``data_ptr()`` per tensor
    from Python, benchmarks/backend_overhead.py), otherwise ``data_ptr()`` per tensor."""
    pointers = [t.data_ptr() for t in tensors]
    batched = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
    if batched is not None:
        indices = list(range(len(tensors)))
        return lambda: batched(tensors, pointers, indices)
    data_ptr = operator.methodcaller("data_ptr")
    return lambda: list(map(data_ptr, tensors)) == pointers


class StatisticsLog:
    """Which tensors a training-mode normalisation updated through this backend, and when.

    PyTorch's batch_norm updates ``running_mean``/``running_var`` without bumping their version counter,
    and bumping it ourselves breaks the backward pass (eager batch_norm saves them for it). So the
    graphs that update statistics record the tensors here (``updated[id(t)] = generation``); a folded
    graph compares one integer per call (``generation``) and, when it moved, looks whether one of its
    own weights was updated since it last looked. The folded graph holds its weights, so their ids are
    not reused while it looks."""

    def __init__(self) -> None:
        self.generation = 0
        self.updated: dict[int, int] = {}

    def record(self, tensors: Sequence[torch.Tensor]) -> None:
        self.generation += 1
        for t in tensors:
            self.updated[id(t)] = self.generation

    def changed_since(self, generation: int, tensors: Sequence[Any]) -> bool:
        get = self.updated.get
        return any(get(id(t), 0) > generation for t in tensors)


STATISTICS = StatisticsLog()


def _lightly_guarded(guard: str, build: Builder,
                     compiled: Callable[..., Any], pick_weights: Callable[[Sequence[Any]], tuple[Any, ...]],
                     pick_others: Callable[[Sequence[Any]], tuple[Any, ...]],
                     example_inputs: Sequence[Any],
                     unchanged: Callable[[Sequence[Any]], Callable[..., Any]]) -> Callable[..., Any]:
    """``compiled`` under a weaker contract than the default's: ``"none"`` checks nothing (the weights
    are constants until ``torch._dynamo.reset()``, as under Inductor's freezing); ``"identity"`` builds
    again only when another tensor object is passed for a weight (``module.weight = nn.Parameter(...)``,
    ``load_state_dict(..., assign=True)``); in-place updates are not seen."""
    if guard == "none":
        return lambda *args: compiled(*pick_others(args))
    folded = pick_weights(example_inputs)
    is_ = operator.is_
    fallback: Callable[..., Any] | None = None

    def run(*args: Any) -> Any:
        nonlocal compiled, folded, fallback
        if fallback is not None:
            return fallback(*args)
        current = pick_weights(args)
        if not all(map(is_, current, folded)):
            log.info("fxrebirth backend: other weight objects than those folded; optimising again")
            rebuilt = build(args)
            if rebuilt is None:  # logged by build: the graph runs unoptimised from now on
                fallback = unchanged(args)
                return fallback(*args)
            compiled, folded = rebuilt, current
        return compiled(*pick_others(args))

    return run


def guarded(guard: str, example_inputs: Sequence[Any], build: Builder, compiled: Callable[..., Any],
            unchanged: Callable[[Sequence[Any]], Callable[..., Any]], weights: list[int], others: list[int],
            attrs: list[Any], seen: int) -> Callable[..., Any]:
    """``compiled`` (built from the weights in ``example_inputs`` when the statistics log stood at ``seen``)
    behind the per-call guard ``guard`` (:data:`GUARDS`), which builds again when the weights changed, or
    runs ``unchanged(args)`` (the graph compiled without folding) from then on when that build fails.
    ``weights`` and ``others`` are the positions of the weight inputs and of the rest among the graph's;
    ``attrs`` the user's tensors the graph refers to directly.

    The default guard runs on every call, so it is three C-level passes over the weights: the objects passed
    must be the ones folded; then (those being the folded objects) their version counters, bumped by
    every in-place update, and their storage, changed by ``p.data = t``. Inference tensors have no
    version counter: for them only identity and storage are compared. One integer comparison more
    notices statistics updated by a training-mode graph of this backend (:class:`StatisticsLog`)."""
    version = operator.attrgetter("_version")
    pick_weights, pick_others = picker(weights), picker(others)
    if guard != "weights":
        return _lightly_guarded(guard, build, compiled, pick_weights, pick_others, example_inputs, unchanged)
    statistics = STATISTICS

    def watch(current: Sequence[Any]) -> tuple[list[Any], list[Any], list[Any], list[int], Callable[[], bool]]:
        tracked = list(current) + attrs
        versioned = [t for t in tracked if not t.is_inference()]
        return list(current), tracked, versioned, list(map(version, versioned)), _same_storage(tracked)

    folded, tracked, versioned, versions, pointers = watch(pick_weights(example_inputs))
    fallback: Callable[..., Any] | None = None

    def run(*args: Any) -> Any:
        nonlocal compiled, fallback, folded, tracked, versioned, versions, pointers, seen
        if fallback is not None:
            return fallback(*args)
        current = pick_weights(args)
        updated = statistics.generation != seen and statistics.changed_since(seen, tracked)
        if (updated or not all(map(operator.is_, current, folded)) or list(map(version, versioned)) != versions
                or not pointers()):
            log.info("fxrebirth backend: weights changed since they were folded; optimising again")
            generation = statistics.generation
            rebuilt = build(args)
            if rebuilt is None:
                fallback = unchanged(args)
                return fallback(*args)
            compiled = rebuilt
            folded, tracked, versioned, versions, pointers = watch(current)
            seen = generation
        else:
            seen = statistics.generation
        return compiled(*pick_others(args))

    return run
