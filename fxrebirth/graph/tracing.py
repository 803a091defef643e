"""Tracing: an ``nn.Module`` becomes a raw ``torch.fx`` graph, before :mod:`fxrebirth.graph.capture` makes it
canonical.

This module owns what torch.fx's own tracer lacks or gets wrong for fxrebirth: a proxy that records
in-place operators and ``y[i] = v`` as the mutations they are, a tracer that keeps modules with hooks as
opaque calls (and the root's own hooks on the GraphModule), the refusal of global module hooks, and a
trace error that names the module it failed in.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Sequence

import torch.fx as fx
from torch import nn

from fxrebirth.errors import CaptureError, first_line

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


class _Tracer(fx.Tracer):
    """A tracer that remembers which module it is inside, so errors can name it. Buffers read in traced
    code are graph values (``proxy_buffer_attributes``): otherwise ``self.count.add_(1)`` runs once, on
    the real buffer, at trace time, and the graph never counts."""

    proxy_buffer_attributes = True

    def __init__(self, leaf_modules: Iterable[type[nn.Module]] = ()) -> None:
        super().__init__()
        self._extra_leaves = tuple(leaf_modules)
        self._fxr_modules: list[str] = []
        self.failed_in: str | None = None  # innermost module being traced when tracing failed

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._extra_leaves and isinstance(m, self._extra_leaves):
            return True
        if has_hooks(m):
            return True  # kept as a call of the (copied) module, so its hooks run at every call
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self._fxr_modules.append(self.path_of_module(m) if self.root is not m else "")
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._fxr_modules[-1]
            raise
        finally:
            self._fxr_modules.pop()


def has_hooks(module: nn.Module) -> bool:
    """Does ``module`` have forward hooks or pre-hooks (the old-style ``spectral_norm`` and
    ``weight_norm`` are pre-hooks)? Such a module is kept as an opaque call: lowering it to a functional
    call would drop its hooks, and tracing through it would run them once, at trace time."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _keep_root_hooks(root: nn.Module, gm: fx.GraphModule) -> None:
    """The traced graph is the root's ``forward``; the root's own hooks run around it, so the GraphModule
    carries them (each receives the GraphModule as its module: a hook that reads attributes the graph does
    not use fails, and the whole-model check then refuses the model)."""
    for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                 "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        if getattr(root, name, None):
            getattr(gm, name).update(getattr(root, name))


def _refuse_global_hooks() -> None:
    from torch.nn.modules import module as module_mod

    hooks = getattr(module_mod, "_global_forward_hooks", {}), getattr(module_mod, "_global_forward_pre_hooks", {})
    if any(hooks):
        raise CaptureError(
            "global module forward hooks are registered (torch.nn.modules.module.register_module_forward_hook "
            "or register_module_forward_pre_hook): they run at every module call, which a rewritten graph "
            "cannot keep. Remove them (handle.remove()) before optimizing and register them again afterwards."
        )


OPAQUE_KEY = "fxrebirth.opaque"
"""``gm.meta`` key: the modules capture kept as opaque calls because torch.fx cannot trace them."""

MAX_OPAQUE = 16
"""Module types capture may make opaque on its own before it gives up with :class:`CaptureError`."""


def _trace(model: nn.Module, leaf_modules: Sequence[type[nn.Module]]) -> tuple[fx.Graph, _Tracer, list[str]]:
    """The traced graph, the tracer, and what was kept opaque: a submodule whose forward torch.fx cannot
    trace (Python control flow on a traced size, as timm's ``Conv2dSame`` computes its padding) becomes an
    opaque call of its type, which runs exactly as written and is never rewritten; the rest is traced.
    Only the root itself failing, or more than :data:`MAX_OPAQUE` such types, is a :class:`CaptureError`."""
    leaves, opaque = list(leaf_modules), []
    while True:
        tracer = _Tracer(leaves)
        try:
            return tracer.trace(model), tracer, opaque
        except Exception as exc:  # torch raises TraceError, TypeError, NotImplementedError... from user code
            where = tracer.failed_in or "<root>"
            sub = model.get_submodule(where) if where != "<root>" else model
            if where == "<root>" or len(opaque) >= MAX_OPAQUE or type(sub) in leaves:
                raise CaptureError(
                    f"cannot trace module '{where}' ({type(sub).__name__}): {type(exc).__name__}: {exc}\n"
                    "fxrebirth needs a static graph. Fixes: pass leaf_modules=[" + type(sub).__name__ + "] so this "
                    "module is kept as an opaque call (it is then never rewritten), or make its control flow "
                    "independent of tensor values."
                ) from None
            leaves.append(type(sub))
            opaque.append(f"{type(sub).__name__} (first at '{where}'): torch.fx cannot trace it "
                          f"({type(exc).__name__}: {first_line(exc, 120)}); kept as an opaque call, never rewritten")


def _has_containers(gm: fx.GraphModule, leaf_modules: Sequence[type[nn.Module]]) -> bool:
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
