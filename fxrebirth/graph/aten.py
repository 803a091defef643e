"""Lowering ATen graphs (torch.export programs) to the canonical form.

``torch.export`` records ATen operators: ``aten.conv2d`` and ``aten.batch_norm`` as exported,
``aten.convolution``, ``aten._native_batch_norm_legit_no_training`` + ``getitem``, ``aten.addmm`` on a
transposed weight and friends after ``run_decompositions()``. :func:`lower_aten` rewrites the ones
fxrebirth's rules read into the canonical functional calls of :mod:`fxrebirth.graph.ops`, so the same rules
apply to every entry point. The table :data:`ATEN_LOWERINGS` maps each overload to a function of the
node's arguments; operators not in it stay as they are (opaque to the rules, still run and verified).
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxrebirth.graph.ops import OPS, normalize_kwargs

__all__ = ["ATEN_LOWERINGS", "lower_aten"]

aten = torch.ops.aten
Lowering = Callable[[tuple, dict], "tuple[Callable[..., Any], dict] | None"]


def _bind(names: tuple[str, ...], defaults: dict[str, Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _conv(n: int) -> Lowering:
    def lower(args: tuple, kwargs: dict) -> tuple:
        b = _bind(("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}, args, kwargs)
        return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n], b
    return lower


def _convolution(args: tuple, kwargs: dict) -> tuple:
    b = _bind(("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups"),
              {}, args, kwargs)
    n = len(b["stride"])
    if b.pop("transposed"):
        target = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
        return target, b
    b.pop("output_padding")
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n], b


def _batch_norm(args: tuple, kwargs: dict) -> tuple:
    b = _bind(("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
               "cudnn_enabled"), {}, args, kwargs)
    b.pop("cudnn_enabled")
    return F.batch_norm, b


def _batch_norm_no_training(args: tuple, kwargs: dict) -> tuple:
    b = _bind(("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"), {}, args, kwargs)
    return F.batch_norm, dict(b, training=False)


def _pool(fn: Callable[..., Any], names: tuple[str, ...], defaults: dict[str, Any]) -> Lowering:
    def lower(args: tuple, kwargs: dict) -> tuple:
        b = _bind(names, defaults, args, kwargs)
        if b.get("stride") in ([], ()):
            b["stride"] = None
        return fn, b
    return lower


_MAX_POOL = (("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"),
             {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False})
_AVG_POOL = (("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
             {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None})


def _binary(fn: Callable[[Any, Any], Any]) -> Lowering:
    def lower(args: tuple, kwargs: dict) -> tuple | None:
        if len(args) != 2 or any(k != "alpha" or v != 1 for k, v in kwargs.items()):
            return None
        return fn, {"args": args}
    return lower


def _mean(args: tuple, kwargs: dict) -> tuple | None:
    b = _bind(("input", "dim", "keepdim"), {"keepdim": False}, args, kwargs)
    if sorted(d % 4 for d in b["dim"]) != [2, 3] or not b["keepdim"] or len(b) != 3:
        return None
    return F.adaptive_avg_pool2d, {"input": b["input"], "output_size": (1, 1)}


ATEN_LOWERINGS: dict[Any, Lowering] = {
    aten.conv1d.default: _conv(1),
    aten.conv2d.default: _conv(2),
    aten.conv3d.default: _conv(3),
    aten.convolution.default: _convolution,
    aten.batch_norm.default: _batch_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm_no_training,
    aten.linear.default: lambda a, k: (F.linear, _bind(("input", "weight", "bias"), {"bias": None}, a, k)),
    aten.relu.default: lambda a, k: (F.relu, {"input": a[0]}),
    aten.max_pool2d.default: _pool(F.max_pool2d, *_MAX_POOL),
    aten.max_pool2d_with_indices.default: _pool(F.max_pool2d, *_MAX_POOL),
    aten.avg_pool2d.default: _pool(F.avg_pool2d, *_AVG_POOL),
    aten.adaptive_avg_pool2d.default: lambda a, k: (F.adaptive_avg_pool2d, _bind(("input", "output_size"), {}, a, k)),
    aten.mean.dim: _mean,
    aten.flatten.using_ints: lambda a, k: (torch.flatten, _bind(("input", "start_dim", "end_dim"),
                                                                {"start_dim": 0, "end_dim": -1}, a, k)),
    aten.view.default: lambda a, k: (torch.reshape, _bind(("input", "shape"), {}, a, k)),
    aten.reshape.default: lambda a, k: (torch.reshape, _bind(("input", "shape"), {}, a, k)),
    aten.dropout.default: lambda a, k: (F.dropout, {"input": a[0], "p": a[1], "training": a[2]}),
    aten.add.Tensor: _binary(operator.add),
    aten.sub.Tensor: _binary(operator.sub),
    aten.mul.Tensor: _binary(operator.mul),
    aten.div.Tensor: _binary(operator.truediv),
    aten.cat.default: lambda a, k: (torch.cat, _bind(("tensors", "dim"), {"dim": 0}, a, k)),
}
"""ATen overloads fxrebirth lowers, each to ``(canonical function, arguments)`` or None (keep it)."""

_WITH_INDICES = {aten._native_batch_norm_legit_no_training.default, aten.max_pool2d_with_indices.default}


def _addmm_as_linear(node: fx.Node) -> dict | None:
    """``addmm(b, x, t(W))`` (a decomposed Linear) as ``linear(x, W, b)``."""
    if node.kwargs or len(node.args) != 3:
        return None
    bias, x, mat2 = node.args
    if not isinstance(mat2, fx.Node) or mat2.op != "call_function" or len(mat2.users) != 1:
        return None
    transposed = mat2.target in (aten.t.default, aten.numpy_T.default) or (
        mat2.target is aten.permute.default and list(mat2.args[1]) == [1, 0])
    if not transposed:
        return None
    return {"input": x, "weight": mat2.args[0], "bias": bias}


def _only_user(node: Any, target: Any) -> fx.Node | None:
    """``node`` when it is a call of ``target`` (or one of them) read by one node only, else None."""
    targets = target if isinstance(target, tuple) else (target,)
    ok = isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets and len(node.users) == 1
    return node if ok else None


def _lrn_of(div: fx.Node) -> dict[str, Any] | None:
    """The arguments of ``F.local_response_norm`` whose 4-D decomposition (as torch.export records it) ends at
    ``div``: ``x / (k + alpha * avg_pool3d(pad(view(x * x)), (n, 1, 1)).view(x.shape)) ** beta``, else None."""
    if len(div.args) != 2 or div.kwargs:
        return None
    x, power = div.args
    power = _only_user(power, aten.pow.Tensor_Scalar)
    shift = _only_user(power.args[0], operator.add) if power is not None else None
    scale = _only_user(shift.args[0], operator.mul) if shift is not None else None
    back = _only_user(scale.args[0], torch.reshape) if scale is not None else None
    squeeze = _only_user(back.kwargs.get("input"), (aten.squeeze.dim, aten.squeeze.dims)) if back is not None else None
    pool = _only_user(squeeze.args[0], aten.avg_pool3d.default) if squeeze is not None else None
    pad = _only_user(pool.args[0], (aten.pad.default, aten.constant_pad_nd.default)) if pool is not None else None
    view = _only_user(pad.args[0], torch.reshape) if pad is not None else None
    square = _only_user(view.kwargs.get("input"), operator.mul) if view is not None else None
    if square is None or list(square.args) != [x, x] or not isinstance(x, fx.Node):
        return None
    shape = list(back.kwargs["shape"]) if isinstance(back.kwargs["shape"], (list, tuple)) else []
    numbers = [power.args[1], shift.args[1], scale.args[1]]
    if len(shape) != 4 or list(view.kwargs["shape"]) != [shape[0], 1, shape[1], shape[2], -1] or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in numbers):
        return None
    size = pool.args[1][0] if len(pool.args) in (2, 3) and len(pool.args[1]) == 3 else None
    if size is None or list(pool.args[1]) != [size, 1, 1] or [list(a) for a in pool.args[2:]] not in ([[1, 1, 1]], []) \
            or pool.kwargs or list(pad.args[1]) != [0, 0, 0, 0, size // 2, (size - 1) // 2] \
            or any(v not in (None, 0, 0.0, "constant") for v in pad.args[2:]) \
            or squeeze.args[1] not in (1, [1]):
        return None
    return {"input": x, "size": size, "alpha": numbers[2], "beta": numbers[0], "k": numbers[1]}


def _raise_lrn(graph: fx.Graph) -> int:
    """Replace each decomposed local response normalisation by one ``F.local_response_norm`` call (the same
    operations, so the same values): the streamline marker and the LRN rule look for that call."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not operator.truediv:
            continue
        kwargs = _lrn_of(node)
        if kwargs is None:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(F.local_response_norm, (),
                                      normalize_kwargs(OPS[F.local_response_norm], (), kwargs))
        new.meta.update(node.meta)
        dead = node.args[1]
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        while isinstance(dead, fx.Node) and not dead.users:  # the decomposition, up to the square
            inputs = [a for a in dead.all_input_nodes if a is not kwargs["input"]]
            graph.erase_node(dead)
            dead = inputs[0] if len(inputs) == 1 else None
        count += 1
    return count


def lower_aten(graph: fx.Graph) -> int:
    """Rewrite the ATen nodes of :data:`ATEN_LOWERINGS` in ``graph`` to canonical calls; return how many.

    Operators returning ``(value, extra...)`` (``max_pool2d_with_indices``, the no-training batch norm)
    are lowered only when nothing reads the extra outputs; their ``getitem(..., 0)`` users then read the
    canonical call directly.
    """
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.addmm.default:
            kwargs = _addmm_as_linear(node)
            lowered = (F.linear, kwargs) if kwargs is not None else None
        elif node.target in ATEN_LOWERINGS:
            lowered = ATEN_LOWERINGS[node.target](tuple(node.args), dict(node.kwargs))
        else:
            continue
        if lowered is None:
            continue
        target, kwargs = lowered
        getitems = []
        if node.target in _WITH_INDICES:
            getitems = list(node.users)
            if not all(u.target is operator.getitem and u.args[1] == 0 for u in getitems):
                continue
        with graph.inserting_before(node):
            if target in OPS:
                new = graph.call_function(target, (), normalize_kwargs(OPS[target], (), kwargs))
            else:
                new = graph.call_function(target, tuple(kwargs["args"]), {})
        new.meta.update(node.meta)
        for user in getitems:
            user.replace_all_uses_with(new)
            graph.erase_node(user)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count + _raise_lrn(graph)
