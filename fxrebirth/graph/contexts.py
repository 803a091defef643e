"""What a traced graph does not show: grad-mode and autocast regions, and Python conditions on sizes.

torch.fx runs a module's ``forward`` once with proxies and records the tensor operations. Two things in
real code are then decided once, at trace time, and never recorded:

* **context regions**: ``with torch.no_grad():``, ``torch.enable_grad()``, ``torch.set_grad_enabled(m)``,
  ``torch.inference_mode()`` and ``torch.autocast(...)`` change thread state around the operations they
  hold; the graph has the operations but not the state. :class:`RegionWatch` sees such a region while
  tracing (the grad mode or the autocast nesting depth differs from what it was when the module's
  forward began, or the forward's code names ``enable_grad`` or ``set_grad_enabled``)
  and names the innermost module whose forward holds it: the tracer keeps that module as an opaque call
  (its own forward then runs with its own context managers, exactly), or refuses the root.
* **conditions on sizes**: ``if x.shape[-1] != 28: raise ...``, ``assert x.ndim == 4``, ``if x.size(1) % 2``.
  :class:`StaticConditions` evaluates such a condition at the example's sizes (on fake tensors: no data is
  read and nothing is written) when it reads only shapes, ranks and dtypes, and the tracer records a
  ``torch._assert`` that the condition has the same truth at run time, so a size that would take the
  other branch raises instead of running the wrong one. Capture's metadata resolution
  (:mod:`fxrebirth.graph.metadata`) folds the assertions that hold at every size.
"""

from __future__ import annotations

import linecache
import operator
import sys
import types
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from fxrebirth.graph.metadata import PURE_PYTHON, is_constant_value, is_metadata_query, reduced_number
from fxrebirth.graph.variants import batch_of, variant_inputs, varying_dims

__all__ = ["ContextRegion", "RegionWatch", "StaticConditions", "context_state"]


def context_state() -> tuple[bool, int]:
    """The thread state a region changes: the grad mode and the autocast nesting depth (every
    ``torch.autocast`` block, even ``enabled=False`` or one repeating the current dtype, deepens it)."""
    torch.autocast_increment_nesting()
    return torch.is_grad_enabled(), torch.autocast_decrement_nesting()


_GRAD_NAMES = frozenset({"enable_grad", "set_grad_enabled"})
"""Names whose presence in a forward's code means a grad-mode region the traced state may not show:
the trace runs with gradients on, so an ``enable_grad`` region changes nothing it can see. (Not
``inference_mode``: timm's FastViT blocks have an attribute of that name, and an ``inference_mode()``
region turns gradients off, which the state shows.)"""


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


class ContextRegion(Exception):
    """Raised inside a trace: module ``path`` holds a region the graph cannot record (``construct``)."""

    def __init__(self, path: str, construct: str) -> None:
        super().__init__(f"{construct} inside the forward of '{path or '<root>'}'")
        self.path, self.construct = path, construct


class RegionWatch:
    """The state each module's forward began with, checked as nodes are created (cheap: two C calls)."""

    def __init__(self) -> None:
        self.states: list[tuple[bool, int]] = []
        self._scanned: dict[Any, bool] = {}

    def enter(self, path: str, module: nn.Module) -> None:
        """A module's forward begins (its caller checked itself first): its own code is scanned."""
        forward = getattr(type(module).forward, "__code__", None)
        if forward is not None and forward not in self._scanned:
            self._scanned[forward] = bool(_code_names(forward) & _GRAD_NAMES)
        if forward is not None and self._scanned[forward]:
            raise ContextRegion(path, "a torch.enable_grad()/set_grad_enabled() region")
        self.states.append(context_state())

    def check(self, path: str) -> None:
        """Raise :class:`ContextRegion` for ``path`` (the module whose forward runs now) when the state
        differs from what it was when that forward began."""
        if not self.states:
            return
        now, then = context_state(), self.states[-1]
        if now[0] != then[0]:
            raise ContextRegion(path, "a torch.no_grad()/set_grad_enabled()/inference_mode() region")
        if now[1] != then[1]:
            raise ContextRegion(path, "a torch.autocast() region")

    def leave(self) -> None:
        self.states.pop()


class NotStatic(Exception):
    pass


def _shape_only(node: fx.Node, seen: set[fx.Node]) -> None:
    """Raise :class:`NotStatic` unless ``node`` is computed from shapes, ranks and dtypes alone (metadata
    queries and the Python arithmetic and comparisons on them: ``getitem`` of a tensor reaches the tensor
    and is refused)."""
    if node in seen or is_metadata_query(node):
        return
    seen.add(node)
    try:
        pure = node.op == "call_function" and node.target in PURE_PYTHON
    except TypeError:  # an unhashable target
        pure = False
    if not pure:
        raise NotStatic(node.name)
    for arg in node.all_input_nodes:
        _shape_only(arg, seen)


class _Evaluation:
    """Graph values under one fake-tensor mode: concrete sizes (the example's), or symbolic ones."""

    def __init__(self, root: nn.Module, inputs: Sequence[Any], symbolic: bool) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

        self.root, self.env = root, {}
        if symbolic:  # every size the model varies (batch, spatial) a symbol, equal sizes not assumed equal
            self.mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False, specialize_zero_one=False))
            batch = batch_of(inputs)

            def dims(x: torch.Tensor) -> list[Any]:
                varying = varying_dims(x, batch)
                return [DimDynamic.DYNAMIC if d in varying else DimDynamic.STATIC for d in range(x.dim())]

            self.inputs = [self.mode.from_tensor(x, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims(x)))
                           if isinstance(x, torch.Tensor) else x for x in inputs]
        else:
            self.mode = FakeTensorMode()
            self.inputs = [self._fake(x) for x in inputs]

    def value(self, node: fx.Node) -> Any:
        order = {n: i for i, n in enumerate(node.graph.nodes)}
        found, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n not in found and n not in self.env:
                found.add(n)
                stack += n.all_input_nodes
        with self.mode, torch.no_grad():
            for n in sorted(found, key=order.__getitem__):
                self.env[n] = self._run(n)
        return self.env[node]

    def _fake(self, value: Any) -> Any:
        """Weights and buffers keep their sizes (without ``static_shapes`` a shape environment makes them
        symbols too)."""
        return self.mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value

    def _run(self, n: fx.Node) -> Any:
        args = fx.node.map_arg(n.args, self.env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, self.env.__getitem__)
        if n.op == "placeholder":
            index = [p for p in n.graph.nodes if p.op == "placeholder"].index(n)
            if index < len(self.inputs):
                return self.inputs[index]
            if n.args:
                return n.args[0]
            raise NotStatic(n.name)
        if n.op == "get_attr":
            value: Any = self.root
            for part in str(n.target).split("."):
                value = getattr(value, part)
            return self._fake(value)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "call_module":
            module = self.root.get_submodule(n.target)
            if any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()):
                raise NotStatic(f"{n.target} has hooks")  # a hook must not see fake tensors
            state = {k: self._fake(v) for k, v in list(module.named_parameters()) + list(module.named_buffers())}
            return torch.func.functional_call(module, state, args, kwargs)
        raise NotStatic(n.op)


class StaticConditions:
    """Evaluates conditions on sizes (see the module docstring). A condition whose value is the same at
    every input size (it reads ranks, dtypes, or sizes the model fixes, such as a convolution's channels)
    is resolved anywhere. One that depends on a size the model varies (batch, spatial) is resolved only
    in the root's own forward, at the example's sizes (the guard then raises at a size that takes the
    other path); in a submodule it stays torch.fx's error, and the submodule an opaque call that runs at
    every size."""

    def __init__(self, root: nn.Module, inputs: Sequence[Any]) -> None:
        self.root, self.inputs = root, tuple(inputs)
        self.runs: dict[bool, _Evaluation] = {}
        self.evaluating = False  # the tracer passes module calls straight through meanwhile

    def _evaluate(self, node: fx.Node, symbolic: bool) -> Any:
        if symbolic not in self.runs:
            # a batch >= 2 example: a size-1 dim would be specialised by the shape environment's 0/1 rule
            example = variant_inputs(self.inputs, 0) if symbolic and batch_of(self.inputs) is not None else self.inputs
            self.runs[symbolic] = _Evaluation(self.root, example, symbolic)
        self.evaluating = True
        try:
            return self.runs[symbolic].value(node)
        except Exception as exc:  # noqa: BLE001 - not evaluable: torch.fx's own error stands
            raise NotStatic(str(exc)) from None
        finally:
            self.evaluating = False

    def _fixed_varying_size(self) -> bool:
        """Did the symbolic run fix a size the model varies? Then its constants are not trusted."""
        run, batch = self.runs[True], batch_of(self.inputs)
        return any(isinstance(fake, torch.Tensor) and any(is_constant_value(fake.shape[d]) for d in varying_dims(x, batch))
                   for x, fake in zip(self.inputs, run.inputs))

    def value(self, node: fx.Node, in_root: bool) -> Any:
        """The condition's value (static, or at the example in the root's forward), or raise :class:`NotStatic`."""
        _shape_only(node, set())
        value = reduced_number(self._evaluate(node, symbolic=True))
        if not is_constant_value(value) or self._fixed_varying_size():
            if not in_root:
                raise NotStatic("it depends on a size the model varies")
            value = self._evaluate(node, symbolic=False)
        if isinstance(value, (bool, int, float)):
            return value
        raise NotStatic(type(value).__name__)


def where_in_source() -> str:
    """``file:line: source`` of the innermost frame outside torch: the user's line being traced."""
    frame = sys._getframe(1)
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    here = __file__.rsplit("/", 2)[0]
    while frame is not None and (frame.f_code.co_filename.startswith(torch_dir)
                                 or frame.f_code.co_filename.startswith(here)):
        frame = frame.f_back
    if frame is None:
        return "an unknown line"
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} ({line})"


def record_condition(tracer: Any, node: fx.Node, value: Any, path: str) -> bool:
    """Record that ``node`` has the truth of ``value`` (a ``torch._assert`` in the graph) and return it."""
    truth = bool(value)
    if isinstance(value, bool):
        cond = node if truth else tracer.create_node("call_function", torch.sym_not, (node,), {})
    else:
        cond = tracer.create_node("call_function", operator.ne if truth else operator.eq, (node, 0), {})
    shapes = ", ".join(str(tuple(x.shape)) for x in tracer.conditions.inputs if isinstance(x, torch.Tensor))
    message = (f"'{path or '<root>'}': the condition at {where_in_source()} was {truth} when fxrebirth captured "
               f"this model (example input sizes {shapes}); at this input it is {not truth}, and the original "
               "forward takes the other path. Optimise again with an example of this size.")
    tracer.create_node("call_function", torch._assert, (cond, message), {})
    return truth

