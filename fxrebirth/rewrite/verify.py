"""Local differential verification of one rewrite, in float64.

A rewrite replaces the value of node ``old`` by the value of node ``new``; both are functions of the
same activations (the match's ``inputs``) and of constants. :func:`local_error` draws random float64
activations with the recorded shapes, evaluates the two backward slices of the graph (only the nodes
between the inputs and ``old``/``new``, never the whole model) in float64, and returns the norm-wise
relative error ``max|new - old| / max|old|``.

New tensors are evaluated from their exact float64 values (see ``RuleContext.add_tensor``), so the
check measures the algebra of the rule, not the rounding of the model's storage dtype: a correct rule
lands near 1e-15 whatever the model's dtype, a wrong one near 1.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from fxrebirth.equivalence import LOCAL_TOLERANCE, flush_denormals, relative_error
from fxrebirth.graph.variants import VARIANTS_KEY
from fxrebirth.graph.copying import copy_module
from fxrebirth.graph.surgery import device_of, fetch_attr

__all__ = ["local_error", "UnverifiableError", "DEFAULT_TOLERANCE"]

DEFAULT_TOLERANCE = LOCAL_TOLERANCE  # the shared definition (fxrebirth.equivalence)


class UnverifiableError(Exception):
    """The slice cannot be evaluated (no recorded shape, an input the rule did not declare...)."""


def _to64(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64)
    return value


class _SliceEvaluator:
    def __init__(self, gm: fx.GraphModule, env: dict[fx.Node, Any], exact: Mapping[fx.Node, torch.Tensor]):
        self.gm = gm
        self.env = env
        self.exact = exact
        self.modules: dict[str, torch.nn.Module] = {}

    def value(self, node: fx.Node) -> Any:
        stack = [node]
        while stack:
            current = stack[-1]
            if current in self.env:
                stack.pop()
                continue
            pending = [a for a in current.all_input_nodes if a not in self.env]
            if pending:
                stack.extend(pending)
                continue
            self.env[current] = self._run(current)
            stack.pop()
        return self.env[node]

    def _arg(self, a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: self.env[n])

    def _run(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            if node in self.exact:
                return self.exact[node]
            return _to64(fetch_attr(self.gm, node.target))
        if node.op == "placeholder":
            raise UnverifiableError(f"slice reaches graph input '{node.name}' that the rule did not declare")
        args, kwargs = self._arg(node.args), self._arg(node.kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        if node.op == "call_module":
            if node.target not in self.modules:
                self.modules[node.target] = copy_module(self.gm.get_submodule(node.target)).to(torch.float64)
            return self.modules[node.target](*args, **kwargs)
        raise UnverifiableError(f"cannot evaluate node '{node.name}' ({node.op})")


def _random_input(node: fx.Node, shape: tuple[int, ...], generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    dtype = getattr(node.meta.get("tensor_meta"), "dtype", torch.float32)
    if not dtype.is_floating_point:
        raise UnverifiableError(f"input '{node.name}' is not floating point ({dtype})")
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(device)


def _shape_sets(inputs: tuple[fx.Node, ...], guards: Sequence[tuple[fx.Node, Any]]) -> list[tuple[tuple[int, ...], ...]]:
    """The input shapes to verify at: every recorded variant (batch >= 2, other sizes) where all inputs
    ran and every guard of the rewrite holds, and the example's own shapes when no variant covers them."""
    for n in inputs:
        if getattr(n.meta.get("tensor_meta"), "shape", None) is None:
            raise UnverifiableError(f"no recorded shape for input '{n.name}'")
    example = tuple(tuple(n.meta["tensor_meta"].shape) for n in inputs)
    sets: list[tuple[tuple[int, ...], ...]] = []
    variants = [n.meta.get(VARIANTS_KEY) for n in inputs]
    count = min((len(v) for v in variants if v is not None), default=0) if all(v is not None for v in variants) else 0
    for i in range(count):
        shapes = tuple(v[i] for v in variants)
        if any(s is None for s in shapes):
            continue
        guarded = [(x.meta.get(VARIANTS_KEY) or [None] * count)[i] for x, _ in guards]
        if any(g is None or not guard.holds(g) for g, (_, guard) in zip(guarded, guards)):
            continue
        sets.append(tuple(tuple(s) for s in shapes))
    return list(dict.fromkeys(sets)) or [example]  # no variant ran: the example's own shapes


def local_error(
    gm: fx.GraphModule,
    old: fx.Node,
    new: fx.Node,
    inputs: tuple[fx.Node, ...],
    exact: Mapping[fx.Node, torch.Tensor] = {},
    *,
    seed: int = 0,
    device: torch.device | None = None,
    guards: Sequence[tuple[fx.Node, Any]] = (),
) -> float:
    """Float64 relative error between the values of ``old`` and ``new`` on random ``inputs``, the worst over
    the example's shapes and its recorded variants (:mod:`fxrebirth.graph.variants`: batch >= 2 and other
    spatial sizes). ``guards`` (``(value, SizeGuard)`` pairs) exclude the variants where the rewrite
    declares itself inexact; it raises :class:`fxrebirth.ShapeGuardError` there at run time."""
    if device is None:
        device = device_of(gm)
    generator = torch.Generator().manual_seed(seed)
    with flush_denormals():
        return max(_error_at(gm, old, new, inputs, shapes, exact, generator, device)
                   for shapes in _shape_sets(inputs, guards))


def _error_at(gm: fx.GraphModule, old: fx.Node, new: fx.Node, inputs: tuple[fx.Node, ...],
              shapes: tuple[tuple[int, ...], ...], exact: Mapping[fx.Node, torch.Tensor],
              generator: torch.Generator, device: torch.device) -> float:
    feeds = {n: _random_input(n, shape, generator, device) for n, shape in zip(inputs, shapes)}
    with torch.no_grad():
        reference = _SliceEvaluator(gm, {n: v.clone() for n, v in feeds.items()}, exact).value(old)
        try:
            candidate = _SliceEvaluator(gm, {n: v.clone() for n, v in feeds.items()}, exact).value(new)
        except Exception:  # noqa: BLE001 - the replacement fails at shapes where the original runs
            return float("inf")
    if not isinstance(reference, torch.Tensor) or not isinstance(candidate, torch.Tensor):
        raise UnverifiableError("the replaced value is not a tensor")
    return relative_error(reference, candidate)
