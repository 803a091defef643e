"""``torch.compile(model, backend="fxrebirth")``: the exact tier inside Dynamo.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so it works after
``pip install`` without importing fxrebirth. Dynamo hands each captured graph here with the model's
parameters and buffers either as graph inputs (placeholders holding the real tensors, the default) or,
when the user turned Inductor's own ``freezing`` on (``torch._inductor.config.freezing = True`` or
``TORCHINDUCTOR_FREEZING=1``), as attributes of the graph module (``get_attr`` of the user's tensors).
:func:`fxrebirth_backend`

1. decides whether folding is valid. The graph is handed to the inner compiler **unchanged**, and the
   log says why once per reason, when

   * gradients are enabled at compile time (training): weights are not constants;
   * the graph mutates one of its inputs (a parameter, a buffer or a user input: in-place ops,
     ``copy_``, ``x[i] = ...``, ``self.count += 1``, BatchNorm in training mode updating its running
     statistics, ...): baking would apply the mutation to a private copy. The mutation is found by the
     ops that can mutate (:func:`_may_mutate`) and confirmed by running the graph once on copies of its
     inputs (:func:`_mutated_inputs`). Such graphs record the statistics BatchNorm updated
     (:class:`_StatisticsLog`; PyTorch's batch_norm does not bump their version counter), so a folded
     inference graph of the same model notices the new statistics and folds again;
   * the graph takes unspecialised scalars (``dynamic=True`` makes module float attributes such as
     BatchNorm's ``eps`` graph inputs): they are not constants, so nothing that reads them can be folded.
     Symbolic sizes alone (the default ``dynamic=None`` once a second batch size is seen) do fold;
   * the pipeline fails on the graph (the error's first line is logged as a warning).

2. otherwise turns the weights into constants (``get_attr``), lowers the graph to the canonical form
   (the same :func:`fxrebirth.graph.capture` as every entry point) and runs the exact pipeline;
3. hands the result to the inner compiler (TorchInductor by default, or ``"eager"``/``"aot_eager"``).
   Inductor runs with ``freezing`` on: the weights are constants of the graph by then (step 2), so
   Inductor may fold them further and pre-pack convolution weights for oneDNN. Without it the backend
   measured 0.99x eager on resnet50 where Inductor with freezing measured 0.67x (docs/results.md);
4. guards the baked weights on every call: three C-level passes over them and one integer comparison.

The weight-update contract
--------------------------
Folded weights are **constants**, as under Inductor's own freezing. What the per-call guard sees, and
then folds again from the current weights before running:

* a different tensor object passed for a weight (``module.weight = nn.Parameter(...)``);
* a bumped version counter: every in-place update through autograd-visible ops, e.g. an optimizer
  step or ``with torch.no_grad(): p.mul_(2)`` / ``p.copy_(t)``;
* BatchNorm statistics updated by a training-mode call *through the compiled model* (with or without
  gradients; recorded by the backend, as batch_norm bumps no version counter);
* a changed storage (``data_ptr``): ``p.data = t``.

What it cannot see: writes that bump no version counter and keep the storage, namely
``p.data.copy_(t)`` / ``p.data.mul_(2)`` (``.data`` is a tensor with a version counter of its own),
BatchNorm statistics updated by an *eager* (uncompiled) training-mode call (PyTorch's batch_norm does
not bump the running statistics' version), and in-place updates of inference tensors (made under
``torch.inference_mode()``; they have no version counter). After such a write, call
``torch._dynamo.reset()`` (or compile again), or update the weights in place without ``.data``
(``with torch.no_grad(): p.copy_(t)``).

Options (``torch.compile(..., options={...})``): ``compiler`` ("inductor", "eager", "aot_eager"),
``freezing`` (bool, default True; Inductor only), ``verify`` (bool), ``disable`` / ``force`` (rule names),
``rules`` (a rule list replacing the defaults).
"""

from __future__ import annotations

import copy
import functools
import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxrebirth.frontends.library import default_rules, optimize
from fxrebirth.equivalence import identical
from fxrebirth.errors import PipelineError, first_line
from fxrebirth.graph.mutation import mutated_input
from fxrebirth.rewrite.rules import Rule
from fxrebirth.rewrite.validate import validate_bool, validate_names, validate_rules

__all__ = ["fxrebirth_backend", "BackendOptions"]

log = logging.getLogger(__name__)
_said: set[str] = set()  # reasons already logged (each once per process)


def _say_once(key: str, message: str, *args: Any) -> None:
    if key not in _said:
        _said.add(key)
        log.info(message, *args)


@dataclass(frozen=True)
class BackendOptions:
    """Options of the backend, read from ``torch.compile(..., options=...)``."""

    compiler: str = "inductor"
    freezing: bool = True
    verify: bool = True
    disable: tuple[str, ...] = ()
    force: tuple[str, ...] = ()
    rules: tuple[Rule, ...] | None = field(default=None)

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "BackendOptions":
        options = dict(options or {})
        unknown = set(options) - {"compiler", "freezing", "verify", "disable", "force", "rules"}
        if unknown:
            raise PipelineError(
                f"unknown fxrebirth backend option(s) {sorted(unknown)}; known: compiler, freezing, verify, disable, force, rules"
            )
        if options.get("compiler", "inductor") not in ("inductor", "eager", "aot_eager"):
            raise PipelineError(f"compiler={options['compiler']!r}: use 'inductor', 'eager' or 'aot_eager'")
        for key in ("freezing", "verify"):
            if key in options:
                validate_bool(key, options[key])
        for key in ("disable", "force"):
            if key in options:
                validate_names(key, options[key])
        if "rules" in options:
            validate_rules(options["rules"])
        for key in ("disable", "force", "rules"):
            if key in options and options[key] is not None:
                options[key] = tuple(options[key])
        opts = cls(**options)
        known = {r.name for r in (opts.rules if opts.rules is not None else default_rules())}
        for key in ("disable", "force"):
            unknown = sorted(set(getattr(opts, key)) - known)
            if unknown:
                raise PipelineError(f"unknown rule name(s) {unknown} in the backend option {key}; known rules: "
                                    f"{', '.join(sorted(known))}")
        return opts


def _inner(compiler: str, freezing: bool = False) -> Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]:
    if compiler == "eager":
        return lambda gm, inputs: gm.forward
    if compiler == "inductor" and freezing:
        from torch._inductor.compile_fx import compile_fx

        return functools.partial(compile_fx, config_patches={"freezing": True})
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(compiler)


def _grapharg(node: fx.Node) -> Any:
    return node.meta.get("grapharg")


def _is_weight(node: fx.Node, value: Any) -> bool:
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


def _fetch(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _attributes(gm: fx.GraphModule) -> dict[str, Any]:
    """What the graph's ``get_attr`` and ``call_module`` nodes refer to, by target."""
    return {n.target: _fetch(gm, n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}


def _bake(gm: fx.GraphModule, inputs: Sequence[Any], weights: list[int]) -> fx.GraphModule:
    """A copy of ``gm`` whose weight placeholders are constants (``get_attr``); the graph takes only the
    other inputs, in their order. Handing Inductor hundreds of unused inputs cost a per-call overhead
    (mobilenet_v3_large, batch 1: 1.06-1.08x the time of Inductor with freezing, 1.00x at batch 8).
    The attributes ``gm`` already refers to (Dynamo's own freezing installs the weights that way) are
    carried over."""
    root = _attributes(gm)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weight_set = set(weights)
    for i, node in enumerate(placeholders):
        if i not in weight_set:
            env[node] = graph.node_copy(node, env.__getitem__)
    for i in weights:
        name = f"_fxrebirth_w{i}"
        root[name] = inputs[i].detach()
        attr = graph.get_attr(name)
        attr.meta = dict(placeholders[i].meta)
        env[placeholders[i]] = attr
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, env.__getitem__)
    baked = fx.GraphModule(root, graph)
    baked.graph.eliminate_dead_code()
    baked.recompile()
    return baked


def _picker(indices: list[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """``args -> tuple(args[i] for i in indices)`` in C (``itemgetter`` returns a bare item for one index)."""
    if len(indices) > 1:
        return operator.itemgetter(*indices)
    return lambda args: tuple(args[i] for i in indices)


# -- mutation ---------------------------------------------------------------------------------------

# (function, index of ``training``/``use_input_stats``, indices of the running statistics)
_NORMS = {
    F.batch_norm: (5, "training", (1, 2), ("running_mean", "running_var")),
    torch.batch_norm: (5, "training", (3, 4), ("running_mean", "running_var")),
    F.instance_norm: (5, "use_input_stats", (1, 2), ("running_mean", "running_var")),
    torch.instance_norm: (5, "use_input_stats", (3, 4), ("running_mean", "running_var")),
}


def _norm_statistics(node: fx.Node) -> list[Any]:
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
    if node.target is operator.delitem or _norm_statistics(node):
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


def _devices(values: Sequence[Any]) -> list[int]:
    return sorted({v.device.index or 0 for v in values if isinstance(v, torch.Tensor) and v.is_cuda})


def _mutated_inputs(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[set[int], set[str]] | None:
    """Which placeholders (by position) and attributes (by target) the graph writes into, found by
    running it once on copies (a changed version counter or changed values); None if that run failed."""
    with torch.inference_mode(False), torch.no_grad(), torch.random.fork_rng(devices=_devices(inputs)):
        copies = [_clone(_hint(v)) for v in inputs]
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


class _StatisticsLog:
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


_STATISTICS = _StatisticsLog()


def _recording(compiled: Callable[..., Any], gm: fx.GraphModule) -> Callable[..., Any]:
    """``compiled``, recording after every call the statistics it updated (see :class:`_StatisticsLog`)."""
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    at: list[int] = []
    fixed: list[torch.Tensor] = []
    for node in gm.graph.nodes:
        for stat in _norm_statistics(node):
            if isinstance(stat, fx.Node) and stat in placeholders:
                at.append(placeholders[stat])
            elif isinstance(stat, fx.Node) and stat.op == "get_attr":
                fixed.append(_fetch(gm, stat.target))
    if not at and not fixed:
        return compiled
    pick = _picker(at)

    def run(*args: Any) -> Any:
        out = compiled(*args)
        _STATISTICS.record([*pick(args), *fixed])
        return out

    return run


def _unchanged(gm: fx.GraphModule, example_inputs: Sequence[Any], compiler: str) -> Callable[..., Any]:
    return _recording(_inner(compiler)(gm, example_inputs), gm)


def _why_not_fold(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[str, str] | None:
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
    if any(isinstance(v, torch.SymInt) and _hint(v) is None for v in example_inputs):
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


def _hint(value: Any) -> Any:
    """A concrete example for a symbolic size (no guard is added); the value itself otherwise."""
    if isinstance(value, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        try:
            return optimization_hint(value)
        except Exception:  # noqa: BLE001 - no hint: the caller compiles the graph unchanged
            return None
    return value


def fxrebirth_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None):
    """The Dynamo backend (see the module docstring)."""
    opts = BackendOptions.from_dict(options)
    if torch.is_grad_enabled():
        _say_once("training", "fxrebirth backend: gradients are enabled, so weights are not folded; the graph is "
                  "compiled unchanged (call under torch.no_grad() or torch.inference_mode() to fold)")
        return _unchanged(gm, example_inputs, opts.compiler)
    why = _why_not_fold(gm, example_inputs)
    if why is not None:
        _say_once(why[0], "fxrebirth backend: %s", why[1])
        return _unchanged(gm, example_inputs, opts.compiler)
    inner = _inner(opts.compiler, opts.freezing)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights = [i for i, (n, v) in enumerate(zip(placeholders, example_inputs)) if _is_weight(n, v)]
    weight_set = set(weights)
    others = [i for i in range(len(placeholders)) if i not in weight_set]
    # the user's tensors the graph refers to directly (Dynamo installs them so under Inductor's freezing)
    attrs = list({id(v): v for v in _attributes(gm).values() if isinstance(v, torch.Tensor)}.values())

    def build(inputs: Sequence[Any]) -> Callable[..., Any] | None:
        """The folded graph compiled, or None (logged) when the pipeline fails on it."""
        kept = [inputs[i] for i in others]
        try:
            with torch.random.fork_rng(devices=_devices(inputs)):
                baked = _bake(gm, inputs, weights)
                optimized, report = optimize(
                    baked, tuple(_hint(v) for v in kept),
                    rules=opts.rules if opts.rules is not None else default_rules(),
                    disable=opts.disable, force=opts.force, verify=opts.verify, check_output=True,
                )
        except Exception as exc:  # noqa: BLE001 - a compiler backend falls back rather than break the model
            log.warning("fxrebirth backend: the graph could not be optimised (%s: %s); it is compiled unchanged",
                        type(exc).__name__, first_line(exc))
            return None
        log.info("fxrebirth backend: %d rewrites in a graph of %d nodes", report.rewrites, report.nodes_before)
        return inner(optimized, kept)

    generation_at_build = _STATISTICS.generation
    compiled = build(example_inputs)
    if compiled is None:
        return _unchanged(gm, example_inputs, opts.compiler)

    # The guard runs on every call, so it is three C-level passes over the weights: the objects passed
    # must be the ones folded; then (those being the folded objects) their version counters, bumped by
    # every in-place update, and their storage, changed by ``p.data = t``. Inference tensors have no
    # version counter: for them only identity and storage are compared. One integer comparison more
    # notices statistics updated by a training-mode graph of this backend (:class:`_StatisticsLog`).
    version, data_ptr = operator.attrgetter("_version"), operator.methodcaller("data_ptr")
    pick_weights, pick_others = _picker(weights), _picker(others)
    statistics = _STATISTICS

    def watch(current: Sequence[Any]) -> tuple[list[Any], list[Any], list[Any], list[int], list[int]]:
        tracked = list(current) + attrs
        versioned = [t for t in tracked if not t.is_inference()]
        return list(current), tracked, versioned, list(map(version, versioned)), list(map(data_ptr, tracked))

    folded, tracked, versioned, versions, pointers = watch(pick_weights(example_inputs))
    seen = generation_at_build
    fallback: Callable[..., Any] | None = None

    def run(*args: Any) -> Any:
        nonlocal compiled, fallback, folded, tracked, versioned, versions, pointers, seen
        if fallback is not None:
            return fallback(*args)
        current = pick_weights(args)
        updated = statistics.generation != seen and statistics.changed_since(seen, tracked)
        if (updated or not all(map(operator.is_, current, folded)) or list(map(version, versioned)) != versions
                or list(map(data_ptr, tracked)) != pointers):
            log.info("fxrebirth backend: weights changed since they were folded; optimising again")
            generation = statistics.generation
            rebuilt = build(args)
            if rebuilt is None:
                fallback = _unchanged(gm, args, opts.compiler)
                return fallback(*args)
            compiled = rebuilt
            folded, tracked, versioned, versions, pointers = watch(current)
            seen = generation
        else:
            seen = statistics.generation
        return compiled(*pick_others(args))

    return run
