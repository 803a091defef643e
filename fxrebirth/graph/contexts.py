"""What a traced graph does not show: grad-mode and autocast regions, and Python conditions on sizes.

torch.fx runs a module's ``forward`` once with proxies and records the tensor operations. Two things in
real code are then decided once, at trace time, and never recorded:

* **context regions**: ``with torch.no_grad():``, ``torch.enable_grad()``, ``torch.set_grad_enabled(m)``,
  ``torch.inference_mode()`` and ``torch.autocast(...)`` change thread state around the operations they
  hold; the graph has the operations but not the state. :class:`RegionWatch` sees such a region while
  tracing (the grad mode or the autocast nesting depth differs from what it was when the module's
  forward began, or the forward's code names ``enable_grad``/``set_grad_enabled``/``inference_mode``)
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

from fxrebirth.graph.metadata import _PURE_PYTHON, is_metadata_query

__all__ = ["ContextRegion", "RegionWatch", "StaticConditions", "context_state"]


def context_state() -> tuple[bool, int]:
    """The thread state a region changes: the grad mode and the autocast nesting depth (every
    ``torch.autocast`` block, even ``enabled=False`` or one repeating the current dtype, deepens it)."""
    torch.autocast_increment_nesting()
    return torch.is_grad_enabled(), torch.autocast_decrement_nesting()


_GRAD_NAMES = frozenset({"enable_grad", "set_grad_enabled", "inference_mode"})
"""Names whose presence in a forward's code means a grad-mode region the traced state may not show:
the trace runs with gradients on, so an ``enable_grad`` region changes nothing it can see."""


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
            raise ContextRegion(path, "a torch.enable_grad()/set_grad_enabled()/inference_mode() region")
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


class _NotStatic(Exception):
    pass


def _shape_only(node: fx.Node, seen: set[fx.Node]) -> None:
    """Raise :class:`_NotStatic` unless ``node`` is computed from shapes, ranks and dtypes alone (metadata
    queries and the Python arithmetic and comparisons on them: ``getitem`` of a tensor reaches the tensor
    and is refused)."""
    if node in seen or is_metadata_query(node):
        return
    seen.add(node)
    try:
        pure = node.op == "call_function" and node.target in _PURE_PYTHON
    except TypeError:  # an unhashable target
        pure = False
    if not pure:
        raise _NotStatic(node.name)
    for arg in node.all_input_nodes:
        _shape_only(arg, seen)


class StaticConditions:
    """Evaluates conditions on sizes at the example's sizes, on fake tensors (see the module docstring)."""

    def __init__(self, root: nn.Module, inputs: Sequence[Any]) -> None:
        self.root, self.inputs = root, tuple(inputs)
        self.env: dict[fx.Node, Any] = {}
        self.mode: Any = None

    def value(self, node: fx.Node) -> Any:
        """The condition's value at the example, or raise :class:`_NotStatic`."""
        _shape_only(node, set())
        from torch._subclasses.fake_tensor import FakeTensorMode

        if self.mode is None:
            self.mode = FakeTensorMode(allow_non_fake_inputs=False)
        wanted = self._ancestors(node)
        try:
            with self.mode, torch.no_grad():
                for n in wanted:
                    if n not in self.env:
                        self.env[n] = self._run(n)
        except Exception as exc:  # noqa: BLE001 - not evaluable: torch.fx's own error stands
            raise _NotStatic(str(exc)) from None
        result = self.env[node]
        if isinstance(result, bool) or isinstance(result, (int, float)) and not isinstance(result, torch.Tensor):
            return result
        raise _NotStatic(type(result).__name__)

    def _ancestors(self, node: fx.Node) -> list[fx.Node]:
        order = {n: i for i, n in enumerate(node.graph.nodes)}
        found, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n not in found and n not in self.env:
                found.add(n)
                stack += n.all_input_nodes
        return sorted(found, key=order.__getitem__)

    def _fake(self, value: Any) -> Any:
        return self.mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

    def _run(self, n: fx.Node) -> Any:
        args = fx.node.map_arg(n.args, self.env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, self.env.__getitem__)
        if n.op == "placeholder":
            index = [p for p in n.graph.nodes if p.op == "placeholder"].index(n)
            if index < len(self.inputs):
                return self._fake(self.inputs[index])
            if n.args:
                return n.args[0]
            raise _NotStatic(n.name)
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
                raise _NotStatic(f"{n.target} has hooks")  # a hook must not see fake tensors
            state = {k: self._fake(v) for k, v in list(module.named_parameters()) + list(module.named_buffers())}
            return torch.func.functional_call(module, state, args, kwargs)
        raise _NotStatic(n.op)


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

