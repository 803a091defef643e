"""Capture: an ``nn.Module`` and example inputs become ONE canonical ``GraphModule``.

The canonical form (see :mod:`fxrebirth.graph.ops`) is what every pass reads:

* known layers are functional calls (``F.conv2d``, ``F.batch_norm``, ...) with every argument a
  keyword and every default filled in; their weights and statistics are ``get_attr`` nodes, one per
  tensor, so a module called twice shares its weight nodes instead of hiding behind one module name;
* binary arithmetic is ``operator.add/sub/mul/truediv`` whatever way it was written;
* every node carries ``node.meta["tensor_meta"]`` (shape, dtype) from running the example inputs;
* ``node.meta["fxrebirth.source"]`` names the module a node came from, for reports and errors.

Weights stay ``nn.Parameter`` objects (copies: the user's model is never touched), so the same form
serves inference rewrites and, later, retraining. Whether parameters may be treated as constants is a
choice of the pipeline (``frozen``), not of the form.

Tracing itself (the proxy that records in-place operators, the tracer, module hooks) is
:mod:`fxrebirth.graph.tracing`.
"""

from __future__ import annotations

import copy
import logging
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from fxrebirth.graph.aten import lower_aten
from fxrebirth.graph.copying import copy_module
from fxrebirth.errors import CaptureError, first_line
from fxrebirth.graph.metadata import resolve_metadata
from fxrebirth.graph.mutation import eliminate_dead_code, functionalize
from fxrebirth.graph.sideeffects import no_side_effects
from fxrebirth.graph.variants import record_variant_shapes
from fxrebirth.graph.ops import BINARY_ALIASES, METHOD_ALIASES, MODULE_LOWERINGS, OPS, normalize_kwargs
from fxrebirth.graph.tracing import (OPAQUE_KEY, has_containers, has_hooks, keep_root_hooks, refuse_global_hooks,
                                     trace_module)

__all__ = ["capture", "canonicalize", "propagate_shapes", "SOURCE_KEY", "as_input_tuple", "describe"]

log = logging.getLogger(__name__)

SOURCE_KEY = "fxrebirth.source"
"""``node.meta`` key: qualified name of the module the node was lowered from."""


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Accept a tensor or a sequence of inputs; always return a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise CaptureError(
        f"example_inputs must be a tensor or a tuple of inputs, got {type(example_inputs).__name__}"
    )


def _lower_module_calls(graph: fx.Graph, root: nn.Module) -> None:
    """Replace ``call_module`` nodes of known layer types by canonical functional calls."""
    attr_nodes: dict[str, fx.Node] = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None

    def get_attr(path: str) -> fx.Node:
        if path not in attr_nodes:
            ctx = graph.inserting_after(anchor) if anchor is not None else graph.inserting_before()
            with ctx:
                attr_nodes[path] = graph.get_attr(path)
        return attr_nodes[path]

    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = root.get_submodule(node.target)
        lowering = MODULE_LOWERINGS.get(type(module))
        if lowering is None or not lowering.applies(module) or has_hooks(module):
            node.meta[SOURCE_KEY] = node.target
            continue
        if len(node.args) + len(node.kwargs) != 1:
            node.meta[SOURCE_KEY] = node.target
            continue  # e.g. ConvTranspose2d(x, output_size=...): kept as a module call
        (x,) = tuple(node.args) + tuple(node.kwargs.values())
        kwargs: dict[str, Any] = {}
        for name in lowering.tensors:
            value = getattr(module, name)
            kwargs[name] = get_attr(f"{node.target}.{name}") if value is not None else None
        kwargs.update(lowering.options(module))
        with graph.inserting_before(node):
            if getattr(module, "padding_mode", "zeros") != "zeros" and lowering.target in OPS \
                    and OPS[lowering.target].kind == "conv":
                pad = {"pad": tuple(module._reversed_padding_repeated_twice), "mode": module.padding_mode}
                x = graph.call_function(torch.nn.functional.pad, (), normalize_kwargs(OPS[F.pad], (x,), pad))
                x.meta[SOURCE_KEY] = node.target
            new = graph.call_function(lowering.target, (), normalize_kwargs(OPS[lowering.target], (x,), kwargs))
        new.meta[SOURCE_KEY] = node.target
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _canonical_binary(node: fx.Node) -> Any:
    key = node.target
    if node.op == "call_method" and isinstance(key, str):
        return BINARY_ALIASES.get(key)
    if node.op == "call_function":
        if node.target in (operator.add, operator.sub, operator.mul, operator.truediv):
            return node.target
        try:
            return BINARY_ALIASES.get(key)
        except TypeError:
            return None
    return None


def canonicalize(graph: fx.Graph) -> None:
    """Normalise call arguments of every known op in ``graph`` (in place).

    Known functional ops get keyword-only, default-filled arguments; binary arithmetic written as a
    ``Tensor`` method or ``torch.add``-style function becomes the ``operator`` function; ``Tensor``
    methods with a functional twin (``x.flatten(1)``, ``x.view(n, -1)``) become that function.
    Calls whose arguments the table cannot bind are left exactly as they were.
    """
    for node in list(graph.nodes):
        binary = _canonical_binary(node)
        if binary is not None:
            if len(node.args) == 2 and not node.kwargs:
                node.op, node.target = "call_function", binary
            continue
        if node.op == "call_method" and node.target in METHOD_ALIASES:
            fn = METHOD_ALIASES[node.target]
            args = node.args
            if fn is torch.reshape and not node.kwargs:
                shape = args[1:]
                if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                    shape = tuple(shape[0])
                elif len(shape) == 1 and isinstance(shape[0], fx.Node):
                    shape = shape[0]  # x.view(y.size()): a whole torch.Size computed in the graph
                args, kwargs = (args[0], shape if isinstance(shape, fx.Node) else tuple(shape)), {}
            else:
                kwargs = dict(node.kwargs)
            try:
                node.kwargs = normalize_kwargs(OPS[fn], tuple(args), kwargs)
            except (TypeError, ValueError):
                continue
            node.op, node.target, node.args = "call_function", fn, ()
            continue
        if node.op == "call_function":
            try:
                spec = OPS.get(node.target)
            except TypeError:
                spec = None
            if spec is None:
                continue
            try:
                kwargs = normalize_kwargs(spec, tuple(node.args), dict(node.kwargs))
            except (TypeError, ValueError):
                continue
            node.args, node.kwargs = (), kwargs


def describe(node: fx.Node) -> str:
    """``'bn1'`` or ``'bn1' (node batch_norm_3)`` for messages: the module name users know, and the node's
    own name where it differs. Every message of fxrebirth that names a node uses it."""
    source = node.meta.get(SOURCE_KEY)
    if source and source != node.name:
        return f"'{source}' (node {node.name})"
    return f"'{node.name}'"


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """``torch.fx.passes.shape_prop``'s record of a tensor, computed with the tensor's own (C++) checks.

    torch's ``_extract_tensor_metadata`` decides the memory format through Python reference checks
    that took about 0.1 ms a tensor: half of capture's time on a 10k-node graph. Quantized tensors,
    whose record carries quantisation parameters, still go through it.
    """
    if t.is_quantized:
        return _extract_tensor_metadata(t)
    if t.is_contiguous():
        memory_format = torch.contiguous_format
    elif t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        memory_format = torch.channels_last
    elif t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        memory_format = torch.channels_last_3d
    else:
        memory_format = None
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), memory_format, False, {})


class _Recorder(fx.Interpreter):
    """Runs a graph and hands each node's result to ``record``; a failure names the node."""

    def __init__(self, module: fx.GraphModule, record: Callable[[fx.Node, Any], None]) -> None:
        super().__init__(module)
        self.extra_traceback = False  # our error already names the node
        self.record = record

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = fx.Interpreter.run_node(self, n)
        except Exception as exc:
            raise CaptureError(
                f"running the captured graph on the example inputs failed at {describe(n)}: "
                f"{type(exc).__name__}: {first_line(exc)}\nCheck that example_inputs have the shapes and "
                "dtypes the model expects."
            ) from None
        self.record(n, result)
        return result


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """Record shape and dtype of every node (``node.meta["tensor_meta"]``) by running ``inputs``."""

    def record(n: fx.Node, result: Any) -> None:
        found = False

        def meta_of(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return tensor_metadata(obj)
            return obj

        meta = fx.node.map_aggregate(result, meta_of)
        if found:
            n.meta["tensor_meta"] = meta

    with no_side_effects(gm):
        _Recorder(gm, record).run(*_copies(inputs))


def _variant_shapes(gm: fx.GraphModule, inputs: Sequence[Any]) -> dict[fx.Node, tuple[int, ...]]:
    shapes: dict[fx.Node, tuple[int, ...]] = {}

    def record(n: fx.Node, result: Any) -> None:
        if isinstance(result, torch.Tensor):
            shapes[n] = tuple(result.shape)

    with no_side_effects(gm):
        _Recorder(gm, record).run(*_copies(inputs))
    return shapes


def _copies(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Clones of the tensor inputs: a model that writes to its input (``x += y``) must not write to the
    caller's example."""
    return tuple(x.clone() if isinstance(x, torch.Tensor) else copy.deepcopy(x) for x in inputs)


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[type[nn.Module]] = (),
    copy_model: bool = True,
    variants: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` into the canonical GraphModule and annotate it with shapes.

    ``model`` is deep-copied first (``copy_model=False`` shares its parameters instead: the caller then
    owns the consequences of in-place training). ``leaf_modules`` are module types kept as opaque calls.
    Modules with forward hooks or pre-hooks stay opaque calls too, so their hooks run; global module hooks
    are refused. In-place operations are made out of place where that is exact (:mod:`fxrebirth.graph.mutation`)
    and kept, as mutations no rewrite touches, where it is not. ``variants`` also records the shapes at
    the variants of the example (batch >= 2, other sizes: :mod:`fxrebirth.graph.variants`) for verification.
    Raises :class:`CaptureError` naming the module that cannot be traced, or the node at which the
    example inputs fail. Works inside ``torch.inference_mode()`` (the capture itself runs outside it).
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    refuse_global_hooks()
    with torch.inference_mode(False):  # called inside inference_mode: the copy must be ordinary tensors
        return _capture(model, inputs, leaf_modules, copy_model, variants)


def _capture(model: nn.Module, inputs: tuple[Any, ...], leaf_modules: Sequence[type[nn.Module]], copy_model: bool,
             variants: bool) -> fx.GraphModule:
    opaque: list[str] = []
    if isinstance(model, fx.GraphModule) and not has_containers(model, leaf_modules):
        # the copy's graph is already a copy (and the copy is only an attribute source from here on)
        root = copy_module(model) if copy_model else model
        graph = root.graph if copy_model else copy.deepcopy(model.graph)
    else:
        root = copy_module(model) if copy_model else model
        graph, _, opaque = trace_module(root, leaf_modules, inputs)
        if opaque:
            log.info("capture of %s: %s", type(model).__name__, "; ".join(opaque))
    # torch.export programs: ATen operators become canonical calls, also when traced again (an unlifted
    # program calls its ``_guards_fn`` module, which sends it down the tracing path)
    lower_aten(graph)
    _lower_module_calls(graph, root)
    canonicalize(graph)
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)  # generates the code once
    if opaque:
        gm.meta[OPAQUE_KEY] = opaque
    keep_root_hooks(root, gm)
    changed = eliminate_dead_code(gm.graph, unknown_is_tensor=True)
    if changed:
        gm.recompile()
    propagate_shapes(gm, inputs)
    if functionalize(gm, owns_modules=copy_model):
        lower_aten(gm.graph)  # aten.add_ made out of place is aten.add: canonical operator.add
        eliminate_dead_code(gm.graph)
        changed = True
    if resolve_metadata(gm, inputs):
        eliminate_dead_code(gm.graph)
        changed = True
    gm.graph.lint()
    if changed:
        gm.recompile()
    if variants:
        record_variant_shapes(gm, inputs, _variant_shapes)
    log.debug("captured %s: %d nodes", type(model).__name__, len(gm.graph.nodes))
    return gm
