"""Mutation in the canonical graph: which nodes write to a tensor in place, and what that forbids.

torch.fx treats ``call_method`` and ``call_module`` nodes as pure, so its dead-code elimination deletes
``y.relu_()`` or ``self.relu(y)`` (``nn.ReLU(inplace=True)``) when their result is not reassigned, and a
rewrite may move a read of ``y`` across the write. fxrebirth keeps its own rule, used everywhere a node
could be dropped or moved:

* :func:`mutated_input` names the value a node writes to: in-place methods (``y.add_(1)``), in-place
  functions (``torch.relu_``, ``operator.iadd`` from ``y += 1``, ``operator.setitem`` from ``y[0] = 0``),
  ``inplace=True`` arguments and modules, ``out=`` arguments, and the arguments an ATen overload's
  schema marks written (``aten.add_.Tensor(Tensor(a!) self, ...)`` in exported programs; the schema
  also says which overloads return new memory and which alias an argument);
* :func:`is_impure` is torch.fx's purity plus every mutation, module calls with effects (hooks,
  ``inplace=True``, training-mode statistics) and the guards of
  :mod:`fxrebirth.graph.guards`;
* :func:`functionalize` turns a mutation into the out-of-place op where that is exact: the written value
  is a fresh tensor (computed by an op known to return new memory, possibly through ops that may return
  their input itself, such as eval-mode dropout) that nothing else reads after the write, and the
  out-of-place op keeps its dtype. Then every later read of the value reads the op's result instead,
  which is what eager PyTorch computes, and the graph is pure there;
* :func:`tainted` is what stays mutated after that (writes to inputs, parameters, buffers, views, or by
  opaque modules): those values and every value that may alias them. No rewrite may touch them.
"""

from __future__ import annotations

import inspect
import logging
import operator
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxrebirth.graph.ops import OPS

__all__ = ["mutated_input", "is_impure", "functionalize", "tainted", "eliminate_dead_code", "returns_new_memory"]

log = logging.getLogger(__name__)

_INPLACE_OPERATORS: dict[Callable[..., Any], Callable[..., Any]] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor, operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
    operator.imatmul: operator.matmul,
}
"""``x += y`` and friends: in place for tensors, with the out-of-place operator beside each."""

_FRESH_KINDS = frozenset({
    "conv", "conv_transpose", "linear", "batch_norm", "relu", "relu6", "max_pool", "avg_pool", "lrn",
    "adaptive_avg_pool", "cat", "pad",
})
"""Canonical kinds whose result is always new memory (``flatten``/``reshape``/``narrow`` may return views,
dropout in eval mode returns its input itself)."""

_FRESH_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.neg, operator.matmul, torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid,
    torch.tanh, torch.exp, torch.abs, torch.sqrt, torch.clamp, torch.mean, torch.sum, torch.clone,
    F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.hardtanh, F.mish, F.softmax,
    F.sigmoid, F.tanh, F.interpolate, torch.softmax, torch.matmul, torch.stack,
})
"""Further functions that return new memory; values they compute may be functionalised."""

_FRESH_METHODS = frozenset({
    "relu", "sigmoid", "tanh", "exp", "abs", "sqrt", "neg", "add", "sub", "mul", "div", "clamp", "pow",
    "clone", "mean", "sum", "softmax", "hardtanh", "leaky_relu", "matmul", "square",
})
"""``Tensor`` methods that return new memory (the out-of-place twins of the in-place methods handled)."""


_FRESH_MODULES = (
    torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.GELU,
    torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.CELU, torch.nn.SELU,
    torch.nn.Mish, torch.nn.Hardtanh, torch.nn.Softmax, torch.nn.LayerNorm, torch.nn.GroupNorm,
    torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.modules.batchnorm._NormBase,
)
"""Module types whose call returns new memory (activations with ``inplace=False``, layers)."""


def _is_tensor_node(node: Any) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta is not None and hasattr(meta, "shape")


def _traced_tensor(node: Any) -> bool:
    """A tensor by the example value Dynamo (``example_value``) or torch.export (``val``) recorded."""
    meta = node.meta if isinstance(node, fx.Node) else {}
    return isinstance(meta.get("example_value", meta.get("val")), torch.Tensor)


_INPLACE_PARAM: dict[Any, int | None] = {}


def _inplace_position(target: Callable[..., Any]) -> int | None:
    """Position of ``target``'s ``inplace`` parameter (``None`` when it has none), cached per target."""
    if target not in _INPLACE_PARAM:
        try:
            names = list(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            names = []
        _INPLACE_PARAM[target] = names.index("inplace") if "inplace" in names else None
    return _INPLACE_PARAM[target]


def _first_arg(node: fx.Node) -> Any:
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()), None)


def mutated_input(node: fx.Node, *, unknown_is_tensor: bool = False) -> fx.Node | None:
    """The graph value ``node`` writes to in place, or ``None`` when it writes to none it can see.
    ``x += y`` writes only when ``x`` is a tensor: known from the recorded shapes, or, before shapes are
    recorded, assumed with ``unknown_is_tensor``."""
    if node.op == "call_method":
        name = node.target
        if isinstance(name, str) and name.endswith("_") and not name.startswith("_"):
            first = _first_arg(node)
            return first if isinstance(first, fx.Node) else None
        return None
    if node.op == "call_function":
        out = node.kwargs.get("out")
        if isinstance(out, fx.Node):
            return out
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return _written_by_schema(node, target)
        if target in _INPLACE_OPERATORS or target is operator.setitem:
            first = _first_arg(node)
            tensor = _is_tensor_node(first) or _traced_tensor(first) or \
                (unknown_is_tensor and "tensor_meta" not in getattr(first, "meta", {}))
            return first if isinstance(first, fx.Node) and tensor else None
        name = getattr(target, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and \
                str(getattr(target, "__module__", None) or "").startswith("torch"):  # torch.relu_, F.elu_
            first = _first_arg(node)
            return first if isinstance(first, fx.Node) else None
        if node.kwargs.get("inplace") is True:
            spec = OPS.get(target) if hashable(target) else None
            if spec is not None and spec.kind == "dropout" and node.kwargs.get("training") is False:
                return None  # dropout in eval mode returns its input and writes nothing
            return node.kwargs.get("input", _first_arg(node))
        position = _inplace_position(target) if callable(target) else None
        if position is not None and len(node.args) > position and node.args[position] is True:
            first = _first_arg(node)
            return first if isinstance(first, fx.Node) else None
        return None
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target) if node.graph.owning_module else None
        if getattr(module, "inplace", False) is True:
            first = _first_arg(node)
            return first if isinstance(first, fx.Node) else None
    return None


def _written_by_schema(node: fx.Node, op: torch._ops.OpOverload) -> fx.Node | None:
    """The argument an ATen overload writes to, as its schema declares (``Tensor(a!) self``): exported
    programs keep ``aten.add_.Tensor`` and friends, whose Python names do not end in ``_``."""
    for position, argument in enumerate(op._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = node.args[position] if position < len(node.args) else node.kwargs.get(argument.name)
            return value if isinstance(value, fx.Node) else None
    return None


def _schema_fresh(op: torch._ops.OpOverload) -> bool:
    """Does the ATen overload return new memory? Its schema says so: no argument written, no result that
    aliases an argument (views are ``Tensor(a)``)."""
    schema = op._schema
    return not schema.is_mutable and bool(schema.returns) and all(r.alias_info is None for r in schema.returns)


def _schema_twin(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """``aten.add.Tensor`` for ``aten.add_.Tensor``: the out-of-place overload of an in-place one."""
    name = op._schema.name.split("::")[-1]
    if not name.endswith("_"):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    twin = getattr(packet, op._overloadname, None) if packet is not None else None
    return twin if isinstance(twin, torch._ops.OpOverload) and _schema_fresh(twin) else None


def _module_is_impure(module: torch.nn.Module | None) -> bool:
    """A module call with effects beyond its result: hooks, ``inplace=True``, statistics updated in
    training mode. Other opaque modules (``leaf_modules``) are taken to be pure, as torch.fx does."""
    if module is None or module._forward_hooks or module._forward_pre_hooks:
        return True
    if getattr(module, "inplace", False) is True:
        return True
    return module.training and isinstance(module, torch.nn.modules.batchnorm._NormBase)


def is_impure(node: fx.Node, *, unknown_is_tensor: bool = False) -> bool:
    """Whether dead-code elimination must keep ``node`` (see the module docstring)."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module":
        owner = node.graph.owning_module
        return _module_is_impure(owner.get_submodule(node.target) if owner is not None else None)
    return mutated_input(node, unknown_is_tensor=unknown_is_tensor) is not None or \
        (node.op == "call_function" and node.is_impure())


def eliminate_dead_code(graph: fx.Graph, *, unknown_is_tensor: bool = False) -> bool:
    """torch.fx's dead-code elimination with :func:`is_impure` (keeps mutations, module calls, guards);
    ``unknown_is_tensor`` before shapes are recorded."""
    return graph.eliminate_dead_code(
        is_impure_node=lambda n: is_impure(n, unknown_is_tensor=unknown_is_tensor))


def _fresh(node: Any) -> bool:
    """Does ``node`` compute new memory (no alias of any other value)?"""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return _schema_fresh(node.target)
        spec = OPS.get(node.target) if hashable(node.target) else None
        if spec is not None:
            return spec.kind in _FRESH_KINDS and not node.kwargs.get("inplace", False)
        return node.target in _FRESH_FUNCTIONS and mutated_input(node) is None
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    if node.op == "call_module" and node.graph.owning_module is not None:
        module = node.graph.owning_module.get_submodule(node.target)
        return isinstance(module, _FRESH_MODULES) and not getattr(module, "inplace", False) \
            and not (module._forward_hooks or module._forward_pre_hooks)
    return False


def returns_new_memory(node: Any) -> bool:
    """Does ``node`` compute new memory, never a view or an argument itself? (False when unknown.)"""
    return _fresh(node)


def hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def _out_of_place(node: fx.Node) -> tuple[str, Any, tuple[Any, ...], dict[str, Any]] | None:
    """``(op, target, args, kwargs)`` of the out-of-place twin of the mutation ``node``, if fxrebirth knows it."""
    if node.kwargs.get("out") is not None:
        return None
    if node.op == "call_method":
        name = node.target[:-1]
        return ("call_method", name, node.args, dict(node.kwargs)) if name in _FRESH_METHODS else None
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            twin = _schema_twin(target)
            return ("call_function", twin, node.args, dict(node.kwargs)) if twin is not None else None
        if target in _INPLACE_OPERATORS:
            return "call_function", _INPLACE_OPERATORS[target], node.args, dict(node.kwargs)
        if node.kwargs.get("inplace") is True:
            return "call_function", target, node.args, dict(node.kwargs, inplace=False)
        name = getattr(target, "__name__", "")
        for namespace in (torch, F):
            twin = getattr(namespace, name[:-1], None) if name.endswith("_") else None
            if twin is not None and (twin in _FRESH_FUNCTIONS or (hashable(twin) and twin in OPS)):
                return "call_function", twin, node.args, dict(node.kwargs)
    return None


def _same_dtype(node: fx.Node, written: fx.Node) -> bool:
    """In place, the result keeps the written tensor's dtype; out of place, type promotion may change it.
    Accept only operands whose recorded dtypes equal the written one (Python numbers are fine for
    floating tensors, where an in-place op with a float number keeps the dtype)."""
    dtype = written.meta["tensor_meta"].dtype
    for arg in list(node.args[1:]) + list(node.kwargs.values()):
        if isinstance(arg, fx.Node):
            meta = arg.meta.get("tensor_meta")
            if meta is None or getattr(meta, "dtype", None) != dtype:
                return False
        elif isinstance(arg, float) and not dtype.is_floating_point:
            return False
    return True


def functionalize(gm: fx.GraphModule, *, owns_modules: bool = True) -> int:
    """Turn every mutation that can be made exact out of place (see the module docstring); return how many.

    Needs recorded shapes (``tensor_meta``). A module called with ``inplace=True`` (``nn.ReLU(inplace=True)``)
    is made out of place by setting its ``inplace`` to False, which needs ``owns_modules`` (the graph's
    modules are fxrebirth's copies) and every call of that module to qualify.
    """
    graph = gm.graph
    changed = 0
    module_calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and mutated_input(node) is not None:
            module_calls.setdefault(node.target, []).append(node)
    for node in list(graph.nodes):
        written = mutated_input(node)
        if written is None or not _is_tensor_node(written) or not _exclusive(written, node):
            continue
        if node.op == "call_module":
            if not owns_modules or not all(_qualifies(n) for n in module_calls[node.target]):
                continue
            gm.get_submodule(node.target).inplace = False
            for call in module_calls[node.target]:
                _redirect_later_reads(mutated_input(call) or _first_arg(call), call)
            changed += len(module_calls[node.target])
            module_calls[node.target] = []
            continue
        twin = _out_of_place(node)
        if twin is None or not _same_dtype(node, written):
            continue
        node.op, node.target, node.args, node.kwargs = twin[0], twin[1], tuple(twin[2]), twin[3]
        _redirect_later_reads(written, node)
        changed += 1
    if changed:
        log.debug("functionalised %d in-place operations", changed)
    return changed


def _qualifies(call: fx.Node) -> bool:
    written = mutated_input(call)
    return written is not None and _is_tensor_node(written) and _exclusive(written, call)


def _exclusive(written: fx.Node, node: fx.Node) -> bool:
    """May the write of ``node`` to ``written`` be made out of place? ``written`` must be new memory, or
    reach new memory through a chain of single-input ops that may return their input itself (eval
    dropout, torchvision's stochastic depth, ``.contiguous()``, ``nn.Identity``); nothing else may read any value of that
    chain, except ops that return new memory and run before the write, and reads of ``written`` after it
    (which are redirected to the op's result)."""
    chain = [written]
    while not _fresh(chain[-1]):
        value = chain[-1]
        sources = [a for a in value.all_input_nodes if _is_tensor_node(a)]
        if not (value.op in ("call_function", "call_method") or _passes_through(value)) or len(sources) != 1:
            return False  # a graph input, a parameter, or a value of unknown aliasing
        chain.append(sources[0])
    members = set(chain)
    for value in chain:
        for user in value.users:
            if user is node or user in members:
                continue
            if value is written and node < user:
                continue  # a later read of the written value: redirected
            if user < node and _fresh(user):
                continue  # an earlier read that copied what it needed
            return False
    return True


def _passes_through(node: fx.Node) -> bool:
    """A call of an ``nn.Identity`` without hooks (it returns its input itself)."""
    owner = node.graph.owning_module
    if node.op != "call_module" or owner is None:
        return False
    module = owner.get_submodule(node.target)
    return type(module) is torch.nn.Identity and not (module._forward_hooks or module._forward_pre_hooks)


def _redirect_later_reads(written: fx.Node, node: fx.Node) -> None:
    for user in list(written.users):
        if user is not node and node < user:
            user.replace_input_with(written, node)


def _is_value(node: fx.Node) -> bool:
    return _is_tensor_node(node) or node.op in ("placeholder", "get_attr")


def _may_alias(user: fx.Node) -> bool:
    return not _fresh(user) and user.op != "output"


def tainted(graph: fx.Graph, nodes: Iterable[fx.Node] | None = None) -> frozenset[fx.Node]:
    """Every value a remaining mutation writes to, or that may alias one (through views, opaque calls or
    the mutation's own result): the values no rewrite may touch."""
    mutations = [(n, mutated_input(n)) for n in (graph.nodes if nodes is None else nodes)]
    stack: list[fx.Node] = []
    for node, written in mutations:
        if written is not None:
            stack += [node, written]
    seen: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if not _fresh(node):  # a value that may be a view: what it was read from may alias it
            stack += [a for a in node.all_input_nodes if _is_value(a)]
        stack += [u for u in node.users if _may_alias(u) and _is_value(u)]
    return frozenset(seen)
