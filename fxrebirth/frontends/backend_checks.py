"""What the ``torch.compile`` backend (:mod:`fxrebirth.frontends.backend`) reads off a Dynamo graph before it
folds: which placeholders are the model's weights, what the graph's attributes are, whether the graph
may write into its inputs (the ops that can mutate, confirmed by running it once on copies), and so
whether it may be folded at all (:func:`why_not_fold`).
"""

from __future__ import annotations

import copy
import logging
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxrebirth.equivalence import identical
from fxrebirth.errors import first_line
from fxrebirth.graph.mutation import mutated_input
from fxrebirth.graph.surgery import fetch_attr as _fetch

log = logging.getLogger("fxrebirth.frontends.backend")  # the backend's logger: its users listen there


def _grapharg(node: fx.Node) -> Any:
    return node.meta.get("grapharg")


def is_weight(node: fx.Node, value: Any) -> bool:
    """Is this placeholder a module's parameter or buffer (as opposed to a user input)?

    Module float attributes that ``dynamic=True`` passes as fresh 0-d tensors (``pass_arg_as_tensor``)
    are not weights: they are a new object on every call."""
    if not isinstance(value, torch.Tensor) or getattr(_grapharg(node), "pass_arg_as_tensor", False):
        return False
    if isinstance(value, torch.nn.Parameter):
        return True
    source = getattr(_grapharg(node), "source", None)
    while source is not None:
        if "ParamBuffer" in type(source).__name__ or "NNModule" in type(source).__name__:
            return True
        source = getattr(source, "base", None)
    return False


def graph_attributes(gm: fx.GraphModule) -> dict[str, Any]:
    """What the graph's ``get_attr`` and ``call_module`` nodes refer to, by target."""
    return {n.target: _fetch(gm, n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}


# -- mutation ---------------------------------------------------------------------------------------

# (function, index of ``training``/``use_input_stats``, indices of the running statistics)
_NORMS = {
    F.batch_norm: (5, "training", (1, 2), ("running_mean", "running_var")),
    torch.batch_norm: (5, "training", (3, 4), ("running_mean", "running_var")),
    F.instance_norm: (5, "use_input_stats", (1, 2), ("running_mean", "running_var")),
    torch.instance_norm: (5, "use_input_stats", (3, 4), ("running_mean", "running_var")),
}


def norm_statistics(node: fx.Node) -> list[Any]:
    """The running statistics a normalisation call in training mode updates (empty otherwise)."""
    if node.op != "call_function" or node.target not in _NORMS:
        return []
    flag_at, flag, stats_at, stats = _NORMS[node.target]
    training = node.args[flag_at] if len(node.args) > flag_at else node.kwargs.get(flag, node.target is not F.batch_norm)
    if training is False:
        return []
    found = [node.args[i] if len(node.args) > i else node.kwargs.get(k) for i, k in zip(stats_at, stats)]
    return [s for s in found if s is not None]


def _may_mutate(node: fx.Node) -> bool:
    """Can this Dynamo graph node write into one of its arguments? Conservative: the graph is run on
    copies (:func:`_mutated_inputs`) to learn whether what it writes is an input. The one definition of
    a mutation (:func:`fxrebirth.graph.mutation.mutated_input`), plus what only Dynamo and ATen graphs spell:
    module calls, ``__setitem__``-style methods, normalisations in training mode, mutable ATen schemas."""
    if node.op == "call_module" or mutated_input(node, unknown_is_tensor=True) is not None:
        return True
    if node.op == "call_method":
        return node.target in ("__setitem__", "__delitem__") or (
            node.target.startswith("__i") and node.target.endswith("__"))
    if node.op != "call_function":
        return False
    if node.target is operator.delitem or norm_statistics(node):
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is not None and bool(getattr(schema, "is_mutable", False))


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


class _Probe(fx.Interpreter):
    """Runs a graph with copies of its attributes (the user's tensors under Dynamo's freezing)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.copies: dict[str, Any] = {}
        self.modules_copied: dict[str, torch.nn.Module] = {}

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target not in self.copies:
            self.copies[target] = _clone(super().get_attr(target, args, kwargs))
        return self.copies[target]

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target not in self.modules_copied:
            self.modules_copied[target] = copy.deepcopy(self.fetch_attr(target))
        return self.modules_copied[target](*args, **kwargs)


def devices_of(values: Sequence[Any]) -> list[int]:
    return sorted({v.device.index or 0 for v in values if isinstance(v, torch.Tensor) and v.is_cuda})


def _mutated_inputs(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[set[int], set[str]] | None:
    """Which placeholders (by position) and attributes (by target) the graph writes into, found by
    running it once on copies (a changed version counter or changed values); None if that run failed."""
    with torch.inference_mode(False), torch.no_grad(), torch.random.fork_rng(devices=devices_of(inputs)):
        copies = [_clone(size_hint(v)) for v in inputs]
        versions = [v._version if isinstance(v, torch.Tensor) else None for v in copies]
        probe = _Probe(gm)
        try:
            probe.run(*copies)
        except Exception as exc:  # noqa: BLE001 - any failure means: do not trust the graph to be pure
            log.debug("fxrebirth backend: the mutation probe failed: %s", first_line(exc))
            return None
        placeholders = {i for i, (c, v, o) in enumerate(zip(copies, versions, inputs)) if isinstance(c, torch.Tensor)
                        and (c._version != v or not identical(c, o.detach()))}
        attrs = {t for t, c in probe.copies.items() if isinstance(c, torch.Tensor)
                 and (c._version != 0 or not identical(c, _fetch(gm, t).detach()))}
    return placeholders, attrs


def why_not_fold(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[str, str] | None:
    """(key, reason) when the graph must be compiled unchanged; None when it may be folded."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    scalars = [n.name for n, v in zip(placeholders, example_inputs)
               if getattr(_grapharg(n), "pass_arg_as_tensor", False) or isinstance(v, (float, bool, torch.SymFloat,
                                                                                       torch.SymBool))]
    if scalars:
        return ("scalars", f"the graph takes unspecialised scalars ({', '.join(scalars[:3])}"
                f"{', ...' if len(scalars) > 3 else ''}; dynamic=True makes module float attributes such as "
                "BatchNorm's eps graph inputs), which are not constants; it is compiled unchanged. To fold with "
                "dynamic shapes, leave dynamic=None (sizes become dynamic when they change) or set "
                "torch._dynamo.config.specialize_float = True")
    if any(isinstance(v, torch.SymInt) and size_hint(v) is None for v in example_inputs):
        return ("sizes", "a symbolic size has no example value; the graph is compiled unchanged")
    if not any(_may_mutate(n) for n in gm.graph.nodes):
        return None
    mutated = _mutated_inputs(gm, example_inputs)
    if mutated is None:
        return ("probe", "the graph has ops that can mutate their arguments and running it on copies failed; "
                "it is compiled unchanged")
    written, attrs = mutated
    if written or attrs:
        names = [n.name for i, n in enumerate(placeholders) if i in written] + sorted(attrs)
        return ("mutation", f"the graph writes into its inputs ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}:"
                " an in-place op, copy_, setitem, a BatchNorm in training mode, ...), so its weights are not "
                "constants; it is compiled unchanged, and the mutation happens on the model as in eager")
    return None


def size_hint(value: Any) -> Any:
    """A concrete example for a symbolic size (no guard is added); the value itself otherwise."""
    if isinstance(value, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        try:
            return optimization_hint(value)
        except Exception:  # noqa: BLE001 - no hint: the caller compiles the graph unchanged
            return None
    return value
