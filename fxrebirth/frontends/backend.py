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
     ops that can mutate (:func:`~fxrebirth.frontends.backend_checks._may_mutate`) and confirmed by
     running the graph once on copies of its inputs
     (:func:`~fxrebirth.frontends.backend_checks._mutated_inputs`). Such graphs record the statistics
     BatchNorm updated (:class:`~fxrebirth.frontends.backend_guard.StatisticsLog`; PyTorch's batch_norm
     does not bump their version counter), so a folded inference graph of the same model notices the new
     statistics and folds again;
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

Options (``torch.compile(..., options={...})``): ``compiler`` ("inductor", "eager", "aot_eager", any
backend ``torch._dynamo.list_backends`` names),
``freezing`` (bool, default True; Inductor only), ``verify`` (bool), ``check_output`` (bool, default True:
each graph's whole-model check, as in :func:`fxrebirth.optimize`), ``disable`` / ``force`` (rule names),
``rules`` (a rule list replacing the defaults), ``guard`` (what each call checks, below).

Guards: ``guard="weights"`` (the default) is the contract above, at 27-36 us per call on resnet50,
regnet_y_400mf and mobilenet_v3_large (docs/results.md). ``guard="identity"`` sees only other weight
objects (``module.weight = nn.Parameter(...)``, ``load_state_dict(..., assign=True)``), not in-place
updates (``load_state_dict`` without ``assign``, an optimizer step). ``guard="none"`` checks nothing:
Inductor's own freezing contract, where weights are constants until ``torch._dynamo.reset()``.

Dynamo's own per-call cost comes first, before any of the backend's: by default the weights are graph
inputs, and Dynamo checks every one on every call (a tensor-match and dimension guards, in C++; about 260
tensors on mobilenet_v2). With Inductor's freezing setting on (``torch._inductor.config.freezing = True``,
which Inductor's own freezing needs too), Dynamo installs them as attributes guarded by identity instead,
so a new Parameter object recompiles under every guard, and ``guard="identity"`` costs nothing more. At
batch 1 that setting with ``guard="identity"`` is what matches Inductor with freezing (docs/results.md); the
backend logs this hint once when it is handed weights as inputs.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from fxrebirth.frontends.backend_checks import (
    devices_of, graph_attributes, is_weight, norm_statistics, size_hint, why_not_fold,
)
from fxrebirth.graph.surgery import fetch_attr
from fxrebirth.frontends.backend_guard import GUARDS, STATISTICS, guarded, picker
from fxrebirth.frontends.library import default_rules, optimize
from fxrebirth.errors import PipelineError, ShapeGuardError, first_line
from fxrebirth.graph.guards import guarded_rule, is_guard
from fxrebirth.graph.mutation import eliminate_dead_code
from fxrebirth.rewrite.rules import Rule
from fxrebirth.rewrite.validate import validate_bool, validate_names, validate_rules

__all__ = ["fxrebirth_backend", "BackendOptions", "GUARDS"]

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
    check_output: bool = True
    disable: tuple[str, ...] = ()
    force: tuple[str, ...] = ()
    rules: tuple[Rule, ...] | None = field(default=None)
    guard: str = "weights"
    """What each call checks before it uses the folded weights (:data:`GUARDS`, the module docstring)."""
    mode: str = "default"
    """``torch.compile``'s ``mode``: Inductor's settings for it apply to the inner compile."""

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None, mode: str | None = None) -> "BackendOptions":
        """The options, checked (a :class:`PipelineError` names what is wrong); ``mode`` is ``torch.compile``'s."""
        options = dict(options or {})
        mode = "default" if mode is None else mode
        if mode != "default" and mode not in _modes():
            raise PipelineError(f"torch.compile mode={mode!r} is not a mode torch knows; use one of "
                                f"{', '.join(map(repr, _modes()))}")
        known_options = ("compiler", "freezing", "verify", "check_output", "disable", "force", "rules", "guard")
        unknown = set(options) - set(known_options)
        if unknown:
            raise PipelineError(
                f"unknown fxrebirth backend option(s) {sorted(unknown)}; known: {', '.join(known_options)}"
            )
        if options.get("compiler", "inductor") not in _inner_compilers():
            raise PipelineError(f"compiler={options['compiler']!r}: use a torch.compile backend other than fxrebirth "
                                f"('inductor' by default): {', '.join(_inner_compilers())}")
        if options.get("guard", "weights") not in GUARDS:
            raise PipelineError(f"guard={options['guard']!r}: use one of {', '.join(map(repr, GUARDS))}")
        for key in ("freezing", "verify", "check_output"):
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
        opts = cls(**options, mode=mode)
        known = {r.name for r in (opts.rules if opts.rules is not None else default_rules())}
        for key in ("disable", "force"):
            unknown = sorted(set(getattr(opts, key)) - known)
            if unknown:
                raise PipelineError(f"unknown rule name(s) {unknown} in the backend option {key}; known rules: "
                                    f"{', '.join(sorted(known))}")
        return opts


def _modes() -> dict[str, dict[str, Any]]:
    """``torch.compile``'s modes and the Inductor settings each stands for, as Inductor reads them."""
    from torch._inductor import list_mode_options

    return list_mode_options()


def _inner_compilers() -> list[str]:
    """The inner compilers: every backend ``torch._dynamo`` knows (``inductor``, ``eager``, ``aot_eager``, ...)
    but this one."""
    from torch._dynamo import list_backends

    return [name for name in list_backends(exclude_tags=()) if name != "fxrebirth"]


def _inner(compiler: str, freezing: bool = False,
           mode: str = "default") -> Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]:
    """The inner compiler; Inductor with the settings ``torch.compile`` gives its ``mode`` (as it does when
    Inductor is the backend: ``torch._inductor.list_mode_options``), and ``freezing``; any other backend as
    ``torch._dynamo`` registered it (its ``eager`` returns the graph's ``forward``)."""
    patches = dict(_modes()[mode]) if compiler == "inductor" and mode != "default" else {}
    if compiler == "inductor" and freezing:
        patches["freezing"] = True
    if patches:
        from torch._inductor.compile_fx import compile_fx

        return functools.partial(compile_fx, config_patches=patches)
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(compiler)


def _bake(gm: fx.GraphModule, inputs: Sequence[Any], weights: list[int]) -> fx.GraphModule:
    """A copy of ``gm`` whose weight placeholders are constants (``get_attr``); the graph takes only the
    other inputs, in their order. Handing Inductor hundreds of unused inputs cost a per-call overhead
    (mobilenet_v3_large, batch 1: 1.06-1.08x the time of Inductor with freezing, 1.00x at batch 8).
    The attributes ``gm`` already refers to (Dynamo's own freezing installs the weights that way) are
    carried over."""
    root = graph_attributes(gm)
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
    eliminate_dead_code(baked.graph)  # mutation-aware: torch.fx's own rule deletes y.clamp_(0, 6)
    baked.recompile()
    return baked


def _recording(compiled: Callable[..., Any], gm: fx.GraphModule) -> Callable[..., Any]:
    """``compiled``, recording after every call the statistics it updated
    (:class:`~fxrebirth.frontends.backend_guard.StatisticsLog`)."""
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    at: list[int] = []
    fixed: list[torch.Tensor] = []
    for node in gm.graph.nodes:
        for stat in norm_statistics(node):
            if isinstance(stat, fx.Node) and stat in placeholders:
                at.append(placeholders[stat])
            elif isinstance(stat, fx.Node) and stat.op == "get_attr":
                fixed.append(fetch_attr(gm, stat.target))
    if not at and not fixed:
        return compiled
    pick = picker(at)

    def run(*args: Any) -> Any:
        out = compiled(*args)
        STATISTICS.record([*pick(args), *fixed])
        return out

    return run


def _unchanged(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions) -> Callable[..., Any]:
    return _recording(_inner(opts.compiler, mode=opts.mode)(gm, example_inputs), gm)


def fxrebirth_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
                      mode: str | None = None):
    """The Dynamo backend (see the module docstring). ``torch.compile`` passes ``mode`` (other than
    "default") as a keyword of its own, and never together with ``options``."""
    opts = BackendOptions.from_dict(options, mode)
    if not _may_fold(gm, example_inputs):
        return _unchanged(gm, example_inputs, opts)
    weights, others, attrs = _split_inputs(gm, example_inputs)
    if weights and opts.compiler == "inductor":
        _say_once("weights-as-inputs", "fxrebirth backend: Dynamo passed the weights as graph inputs and checks "
                  "each one on every call; set torch._inductor.config.freezing = True before compiling for "
                  "identity guards instead (less per-call cost at small batch)")
    build = _builder(gm, opts, weights, others)
    generation_at_build = STATISTICS.generation
    compiled = build(example_inputs)
    if compiled is None:
        return _unchanged(gm, example_inputs, opts)
    run = guarded(opts.guard, example_inputs, build, compiled, lambda args: _unchanged(gm, args, opts),
                  weights, others, attrs, generation_at_build)
    return _at_every_size(run, gm)


def _at_every_size(run: Callable[..., Any], gm: fx.GraphModule) -> Callable[..., Any]:
    """``run``, except at a size where a size guard of the folded graph fails (a rewrite exact only at some
    sizes, folded at a size Dynamo then made dynamic): that call runs ``gm``, the graph Dynamo handed over,
    unfolded and uncompiled, so the compiled model runs wherever the original does. Checked by the guard
    itself; the fallback costs nothing until a guard fails."""
    said: list[str] = []

    def call(*args: Any) -> Any:
        try:
            return run(*args)
        except ShapeGuardError as exc:
            if not said:
                said.append(str(exc))
                log.warning("fxrebirth backend: a rewrite folded at another size is not exact at this one (%s); "
                            "calls at such sizes run the graph unfolded", first_line(exc))
            return gm(*args)

    return call


def _may_fold(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
    """Whether the graph's weights may be folded; when not, the log says why (once per reason)."""
    if torch.is_grad_enabled():
        _say_once("training", "fxrebirth backend: gradients are enabled, so weights are not folded; the graph is "
                  "compiled unchanged (call under torch.no_grad() or torch.inference_mode() to fold)")
        return False
    why = why_not_fold(gm, example_inputs)
    if why is not None:
        _say_once(why[0], "fxrebirth backend: %s", why[1])
        return False
    return True


def _has_dynamic_sizes(gm: fx.GraphModule) -> bool:
    """Does Dynamo pass sizes as symbols (``dynamic=None`` after a size changed, or ``dynamic=True``)?"""
    for node in gm.graph.nodes:
        value = node.meta.get("example_value") if node.op == "placeholder" else None
        if isinstance(value, torch.SymInt) or (isinstance(value, torch.Tensor) and
                                               not all(isinstance(d, int) for d in value.shape)):
            return True
    return False


def _guarded_rules(gm: fx.GraphModule) -> set[str]:
    """The rules whose rewrites in ``gm`` are exact only at some sizes (their size guards name them)."""
    return {rule for n in gm.graph.nodes if n.op == "call_function" and is_guard(n)
            for rule in [guarded_rule(str(n.args[2]))] if rule is not None}


def _split_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[list[int], list[int], list[Any]]:
    """(positions of the weight placeholders, positions of the other inputs, the user's tensors the graph
    refers to directly: Dynamo installs them so under Inductor's freezing)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights = [i for i, (n, v) in enumerate(zip(placeholders, example_inputs)) if is_weight(n, v)]
    weight_set = set(weights)
    others = [i for i in range(len(placeholders)) if i not in weight_set]
    attrs = list({id(v): v for v in graph_attributes(gm).values() if isinstance(v, torch.Tensor)}.values())
    return weights, others, attrs


def _builder(gm: fx.GraphModule, opts: BackendOptions, weights: list[int],
             others: list[int]) -> Callable[[Sequence[Any]], Callable[..., Any] | None]:
    """``build(inputs)``: ``gm`` with the weights in ``inputs`` folded, optimised and compiled."""
    inner = _inner(opts.compiler, opts.freezing, opts.mode)
    dynamic = _has_dynamic_sizes(gm)

    def fold(inputs: Sequence[Any], disable: tuple[str, ...]) -> tuple[fx.GraphModule, Any]:
        return optimize(_bake(gm, inputs, weights), tuple(size_hint(inputs[i]) for i in others),
                        rules=opts.rules if opts.rules is not None else default_rules(), disable=disable,
                        force=tuple(r for r in opts.force if r not in disable), verify=opts.verify,
                        check_output=opts.check_output)

    def build(inputs: Sequence[Any]) -> Callable[..., Any] | None:
        """The folded graph compiled, or None (logged) when the pipeline fails on it. With dynamic sizes,
        no rule whose rewrite is exact only at some sizes (a size guard) is applied: the graph is folded
        again without those rules, so it runs at every size (guards of capture remain: a call where one
        fails runs unfolded, :func:`_at_every_size`)."""
        kept = [inputs[i] for i in others]
        try:
            with torch.random.fork_rng(devices=devices_of(inputs)):
                optimized, report = fold(inputs, opts.disable)
                guarded_rules = sorted(_guarded_rules(optimized) - set(opts.disable)) if dynamic else []
                if guarded_rules:
                    log.info("fxrebirth backend: the graph's sizes are dynamic and %s would be exact only at "
                             "some sizes; folded without them", guarded_rules)
                    optimized, report = fold(inputs, opts.disable + tuple(guarded_rules))
        except Exception as exc:  # noqa: BLE001 - a compiler backend falls back rather than break the model
            log.warning("fxrebirth backend: the graph could not be optimised (%s: %s); it is compiled unchanged",
                        type(exc).__name__, first_line(exc))
            return None
        log.info("fxrebirth backend: %d rewrites in a graph of %d nodes", report.rewrites, report.nodes_before)
        return inner(optimized, kept)

    return build
