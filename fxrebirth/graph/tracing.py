"""Tracing: an ``nn.Module`` becomes a raw ``torch.fx`` graph, before :mod:`fxrebirth.graph.capture` makes it
canonical.

This module owns what torch.fx's own tracer lacks or gets wrong for fxrebirth: a proxy that records
in-place operators and ``y[i] = v`` as the mutations they are, a tracer that keeps modules with hooks as
opaque calls (and the root's own hooks on the GraphModule), the refusal of global module hooks, and a
trace error that names the module it failed in. With :mod:`fxrebirth.graph.contexts`, it also keeps what a
trace cannot record (grad-mode and autocast regions: the module holding one stays an opaque call) and
resolves Python conditions on sizes at the example's sizes, guarded. Non-tensor arguments of the root's
``forward`` (``embed=False``, ``mask=None``) are traced as the constants the example or the default gives,
and the graph checks that a call passes the same value.

torch.fx's ``Tracer.trace`` patches process-wide state while it runs (``nn.Module.__call__`` and
``__getattr__``, wrapped functions in module globals, its ``is_fx_tracing`` flag) and puts it back at the
end; two traces overlapping in two threads would put back each other's patches in the wrong order and
leave the process patched. Every trace here holds one process-wide lock, and the tracer passes calls from
other threads (which go through the same patched ``__call__`` meanwhile) straight to the module.
"""

from __future__ import annotations

import inspect
import operator
import threading
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from fxrebirth.errors import CaptureError, first_line
from fxrebirth.graph.contexts import ContextRegion, NotStatic, RegionWatch, StaticConditions, record_condition

__all__ = ["has_hooks", "OPAQUE_KEY"]


_INPLACE_DUNDERS = {
    "__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
    "__itruediv__": operator.itruediv, "__ifloordiv__": operator.ifloordiv, "__imod__": operator.imod,
    "__ipow__": operator.ipow, "__iand__": operator.iand, "__ior__": operator.ior, "__ixor__": operator.ixor,
    "__ilshift__": operator.ilshift, "__irshift__": operator.irshift, "__imatmul__": operator.imatmul,
}


class _Proxy(fx.Proxy):
    """torch.fx's Proxy has no in-place operators, so Python runs ``x += y`` as ``x = x + y`` and the write
    to ``x`` (and to every alias of it) is lost. This one records ``operator.iadd`` and friends, which
    capture then treats as the mutations they are (:mod:`fxrebirth.graph.mutation`)."""


def _inplace_operator(op: Any) -> Any:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


for _name, _op in _INPLACE_DUNDERS.items():
    setattr(_Proxy, _name, _inplace_operator(_op))


def _setitem(self: fx.Proxy, key: Any, value: Any) -> None:
    """``y[i] = v`` recorded as the mutation it is (``operator.setitem``), not a trace error."""
    self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


_Proxy.__setitem__ = _setitem  # type: ignore[method-assign]


_TRACE_LOCK = threading.RLock()
"""Held by every trace (see the module docstring)."""


class _Tracer(fx.Tracer):
    """A tracer that remembers which module it is inside, so errors can name it. Buffers read in traced
    code are graph values (``proxy_buffer_attributes``): otherwise ``self.count.add_(1)`` runs once, on
    the real buffer, at trace time, and the graph never counts."""

    proxy_buffer_attributes = True

    def __init__(self, leaf_modules: Iterable[type[nn.Module]] = (), conditions: StaticConditions | None = None) -> None:
        super().__init__()
        self._extra_leaves = tuple(leaf_modules)
        self._fxr_modules: list[str] = []
        self._thread = threading.get_ident()
        self.regions = RegionWatch()
        self.conditions = conditions
        self.failed_in: str | None = None  # innermost module being traced when tracing failed

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._extra_leaves and isinstance(m, self._extra_leaves):
            return True
        if has_hooks(m):
            return True  # kept as a call of the (copied) module, so its hooks run at every call
        return super().is_leaf_module(m, module_qualified_name)

    def _passing(self) -> bool:
        """Calls that reach torch.fx's patched ``nn.Module`` methods but are not the trace: another thread's,
        and the evaluation of a size condition (:class:`~fxrebirth.graph.contexts.StaticConditions`)."""
        return threading.get_ident() != self._thread or (self.conditions is not None and self.conditions.evaluating)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._passing():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self._passing():
            return forward(*args, **kwargs)
        path = self.path_of_module(m) if self.root is not m else ""
        self.regions.check(self._fxr_modules[-1] if self._fxr_modules else "")
        self._fxr_modules.append(path)
        leaf = self.is_leaf_module(m, path)
        try:
            if not leaf:
                self.regions.enter(path, m)
            try:
                return super().call_module(m, forward, args, kwargs)
            finally:
                if not leaf:
                    self.regions.leave()
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._fxr_modules[-1]
            raise
        finally:
            self._fxr_modules.pop()

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                    type_expr: Any | None = None) -> fx.Node:
        self.regions.check(self._fxr_modules[-1] if self._fxr_modules else "")
        return super().create_node(kind, target, args, kwargs, name, type_expr)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A condition on sizes (``if x.shape[-1] != 28``) is taken at the example's sizes, with a guard."""
        if self.conditions is not None:
            path = self._fxr_modules[-1] if self._fxr_modules else ""
            try:
                value = self.conditions.value(obj.node, in_root=not path)
            except NotStatic:
                pass
            else:
                return record_condition(self, obj.node, value, path)
        return super().to_bool(obj)

    def trace_root(self, root: nn.Module, concrete_args: dict[str, Any]) -> fx.Graph:
        """``trace`` under the process-wide lock, with gradients on (so that a ``no_grad`` region shows)."""
        with _TRACE_LOCK, torch.set_grad_enabled(True):
            self.regions.enter("", root)
            return self.trace(root, concrete_args=concrete_args or None)


def has_hooks(module: nn.Module) -> bool:
    """Does ``module`` have forward hooks or pre-hooks (the old-style ``spectral_norm`` and
    ``weight_norm`` are pre-hooks), or backward hooks (full, pre, or the old ``register_backward_hook``)?
    Such a module is kept as an opaque call: lowering it to a functional call would drop its hooks, and
    tracing through it would run forward hooks once, at trace time, and lose backward hooks (torch
    attaches them to the module call's inputs and outputs)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def keep_root_hooks(root: nn.Module, gm: fx.GraphModule) -> None:
    """The traced graph is the root's ``forward``; the root's own hooks run around it, so the GraphModule
    carries them (each receives the GraphModule as its module: a hook that reads attributes the graph does
    not use fails, and the whole-model check then refuses the model)."""
    for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                 "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
                 "_backward_pre_hooks"):
        if getattr(root, name, None):
            getattr(gm, name).update(getattr(root, name))
    if root._backward_hooks:
        gm._is_full_backward_hook = root._is_full_backward_hook


def refuse_global_hooks() -> None:
    from torch.nn.modules import module as module_mod

    forward = [getattr(module_mod, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")]
    backward = [getattr(module_mod, name, None) for name in ("_global_backward_hooks", "_global_backward_pre_hooks")]
    for hooks, kind, names in ((forward, "forward", "register_module_forward_hook or register_module_forward_pre_hook"),
                               (backward, "backward", "register_module_full_backward_hook, "
                                "register_module_full_backward_pre_hook or register_module_backward_hook")):
        if any(hooks):
            raise CaptureError(
                f"global module {kind} hooks are registered (torch.nn.modules.module.{names}): they run at every "
                "module call, which a rewritten graph cannot keep. Remove them (handle.remove()) before optimizing "
                "and register them again afterwards."
            )


OPAQUE_KEY = "fxrebirth.opaque"
"""``gm.meta`` key: the modules capture kept as opaque calls because torch.fx cannot trace them."""

MAX_OPAQUE = 16
"""Module types capture may make opaque on its own before it gives up with :class:`CaptureError`."""


def trace_module(model: nn.Module, leaf_modules: Sequence[type[nn.Module]],
           inputs: Sequence[Any] = ()) -> tuple[fx.Graph, _Tracer, list[str]]:
    """The traced graph, the tracer, and what was kept opaque: a submodule whose forward torch.fx cannot
    trace (Python control flow on a traced size, as timm's ``Conv2dSame`` computes its padding), or whose
    forward holds a grad-mode or autocast region, becomes an opaque call of its type, which runs exactly
    as written and is never rewritten; the rest is traced. Only the root itself failing, or more than
    :data:`MAX_OPAQUE` such types, is a :class:`CaptureError`."""
    leaves, opaque = list(leaf_modules), []
    concrete = _constant_arguments(model, inputs)
    while True:
        tracer = _Tracer(leaves, StaticConditions(model, inputs))
        try:
            graph = tracer.trace_root(model, concrete)
            _name_constant_arguments(graph, concrete)
            return graph, tracer, opaque
        except ContextRegion as region:
            where = region.path or "<root>"
            why = (f"its forward holds {region.construct}, which a traced graph does not record (the operations "
                   "in it would run in the caller's mode)")
            fix = ("move the region into a submodule's forward (fxrebirth keeps that submodule as an opaque call, "
                   "which runs it exactly), or optimise the modules it calls")
        except Exception as exc:  # torch raises TraceError, TypeError, NotImplementedError... from user code
            where, why = tracer.failed_in or "<root>", f"{type(exc).__name__}: {exc}"
            fix = ("pass leaf_modules=[{name}] so this module is kept as an opaque call (it is then never rewritten), "
                   "or make its control flow independent of tensor values")
        sub = model.get_submodule(where) if where != "<root>" else model
        if where == "<root>" or len(opaque) >= MAX_OPAQUE or type(sub) in leaves:
            raise CaptureError(f"cannot trace module '{where}' ({type(sub).__name__}): {why}\nfxrebirth needs a "
                               f"static graph. Fixes: {fix.format(name=type(sub).__name__)}.") from None
        leaves.append(type(sub))
        opaque.append(f"{type(sub).__name__} (first at '{where}'): torch.fx cannot trace it "
                      f"({first_line(why, 120)}); kept as an opaque call, never rewritten")


_CONSTANT_TYPES = (bool, int, float, str, type(None))


def _constant_arguments(model: nn.Module, inputs: Sequence[Any]) -> dict[str, Any]:
    """The root's non-tensor ``forward`` arguments, as the example (or, past it, the default) gives them:
    traced as constants (``concrete_args``); the graph asserts that a call passes the same value."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    concrete: dict[str, Any] = {}
    for index, parameter in enumerate(parameters):
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            break
        if index < len(inputs):
            if isinstance(inputs[index], _CONSTANT_TYPES):
                concrete[parameter.name] = inputs[index]
        elif parameter.default is not parameter.empty and isinstance(parameter.default, _CONSTANT_TYPES):
            concrete[parameter.name] = parameter.default
    return concrete


def _name_constant_arguments(graph: fx.Graph, concrete: dict[str, Any]) -> None:
    """torch.fx names a constant argument's placeholder ``embed_1`` and checks ``None`` with a function it
    treats as pure (dead-code elimination would drop it): the placeholder gets its own name back and the
    check becomes ``torch._assert``, with a message that says what to do."""
    from torch.fx._symbolic_trace import _assert_is_none

    for node in list(graph.nodes):
        name = node.target[:-2] if node.op == "placeholder" and str(node.target).endswith("_1") else None
        if name not in concrete:
            continue
        node.target = name
        message = (f"forward argument '{name}' was captured as the constant {concrete[name]!r} (the example's or the "
                   "default); this call passes another value. Optimise again with example_inputs that pass the "
                   "value you use.")
        for user in list(node.users):
            if user.target is _assert_is_none:
                with graph.inserting_before(user):
                    same = graph.call_function(operator.is_, (node, None))
                user.target, user.args = torch._assert, (same, message)
            for check in list(user.users) if user.target is operator.eq else ():
                if check.target is torch._assert:
                    check.args = (check.args[0], message)


def has_containers(gm: fx.GraphModule, leaf_modules: Sequence[type[nn.Module]]) -> bool:
    """Whether ``gm`` calls modules fx would trace into (``nn.Sequential``, user modules such as a rebirth
    layer inserted by :func:`fxrebirth.retraining.layers.rebuild`): such a GraphModule is traced again, so that what
    they compute becomes canonical nodes instead of opaque calls."""
    tracer = fx.Tracer()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if not isinstance(module, tuple(leaf_modules)) and not tracer.is_leaf_module(module, node.target):
                return True
    return False
