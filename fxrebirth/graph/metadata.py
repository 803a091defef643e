"""Metadata is not data: queries of a tensor's shape, rank, dtype or device.

A node such as ``x.ndim``, ``x.shape``, ``x.size(1)``, ``x.dim()``, ``x.dtype`` or ``aten.sym_size.int(x, 2)``
reads no element of ``x``. Models are full of them: timm's ``BatchNormAct2d`` asserts ``x.ndim == 4``
before its batch norm, torchvision's channel shuffle reads ``x.size()``. Counted as users of ``x``, they
would block every rewrite that needs ``x`` to have one user. fxrebirth handles them in two steps, one rule
for every entry point (an ``nn.Module``, a Dynamo graph, a ``torch.export`` program):

1. **Resolve what is static at capture** (:func:`resolve_metadata`). The graph is run once on symbolic
   inputs (torch's fake tensors with a ``ShapeEnv``): every input dimension is a symbol, so a query's value
   is a plain constant only where the run fixed it: a convolution fixes its input's channels, an ``ndim``
   is fixed by the input's rank (which an fx graph cannot vary). Such queries, the Python arithmetic and
   comparisons on them, and the ``torch._assert``/``torch._check`` calls that then read ``True`` are
   folded away. What may vary (the batch, spatial sizes) stays a query in the graph. Shape functions
   may fix more than the model needs (``reshape(-1, 8)`` is taken to need 8 columns), so every input
   size the run fixed gets a size guard (:mod:`fxrebirth.graph.guards`, in the report); a run that fixed a size
   the variants vary (batch, spatial) is not trusted at all: then only ranks, dtypes and devices fold.
2. **Remaining queries read only the shape** (:func:`reads_only_shape`): :func:`fxrebirth.rewrite.rules.users_of`
   does not count them as users, and when a rewrite removes the value they read, the pipeline moves them
   to a value of the same shape, proven by the symbolic shapes recorded here (``node.meta[SYMBOLIC_KEY]``),
   or refuses the rewrite. Size guards (:mod:`fxrebirth.graph.guards`) are handled the same way.

Queries whose answer a rewrite may change without changing the values (strides, contiguity, memory
format, ``requires_grad``) are not metadata here: they are real users, and block rewrites as any read does.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx

from fxrebirth.graph.guards import is_guard
from fxrebirth.graph.mutation import hashable
from fxrebirth.graph.sideeffects import no_side_effects
from fxrebirth.graph.variants import batch_of, variant_inputs, varying_dims

__all__ = ["GUARDS_KEY", "SYMBOLIC_KEY", "is_metadata_query", "reads_only_shape", "resolve_metadata"]

log = logging.getLogger(__name__)

GUARDS_KEY = "fxrebirth.capture_guards"
"""``GraphModule.meta`` key: descriptions of the size guards capture placed on the inputs."""

SYMBOLIC_KEY = "fxrebirth.symbolic_shape"
"""``node.meta`` key: the node's shape as symbolic expressions of the input sizes (strings), where known."""

_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "is_sparse", "is_quantized",
                         "is_meta"})
_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "is_floating_point", "is_complex",
                      "get_device", "element_size"})
_FUNCTIONS = frozenset({torch.numel, torch.is_floating_point, torch.is_complex})
_ATEN = frozenset({torch.ops.aten.sym_size.int, torch.ops.aten.sym_size.default, torch.ops.aten.sym_numel.default,
                   torch.ops.aten.dim.default})
_CHECKS = frozenset({torch._assert, torch._check, torch.ops.aten._assert_scalar.default})
"""Assertions: removed once their condition folds to ``True``."""

PURE_PYTHON = frozenset({
    operator.getitem, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod, operator.neg,
    operator.not_, operator.and_, operator.or_, len, int, float, bool, max, min,
    torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not,
})
"""Python-level operations that may be folded when every argument is a constant (never tensors)."""


def _tensor_arg(node: fx.Node) -> Any:
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return first if isinstance(first, fx.Node) else None


def is_metadata_query(node: object) -> bool:
    """Does ``node`` read only the metadata (shape, rank, dtype, device) of its first argument?"""
    if not isinstance(node, fx.Node) or _tensor_arg(node) is None:
        return False
    if node.op == "call_method":
        return node.target in _METHODS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return len(node.args) >= 2 and node.args[1] in _ATTRIBUTES
    try:
        return node.target in _FUNCTIONS or node.target in _ATEN
    except TypeError:  # an unhashable target
        return False


def reads_only_shape(node: object) -> bool:
    """A reader of a value's shape, never of its elements: a metadata query or a size guard."""
    return is_guard(node) or is_metadata_query(node)


_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def reduced_number(value: Any) -> Any:
    """A symbolic number whose expression the shape environment has reduced to a constant (directly or by
    a later replacement, ``s1 -> 18``), as that constant; anything else unchanged."""
    if isinstance(value, _SYMBOLIC):
        expr = value.node.expr
        if expr.is_number or isinstance(value, torch.SymBool) and not expr.free_symbols:  # sympy's true/false
            kind = {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}[type(value)]
            return kind(expr)
    return value


def is_constant_value(value: Any) -> bool:
    """A plain Python value (no free symbols, no tensors) that a graph's generated code can spell."""
    value = reduced_number(value)
    if isinstance(value, _SYMBOLIC):
        return False
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype, torch.device, torch.layout)):
        return True
    if isinstance(value, (tuple, list)):  # torch.Size is a tuple
        return all(is_constant_value(v) for v in value)
    return False


def _spell(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return tuple(reduced_number(v) for v in value)
    return reduced_number(value)


class _SymbolicRun(fx.Interpreter):
    """Runs the graph on fake tensors with symbolic sizes, keeping every node's value; assertions are not
    run (asserting a symbolic condition would make the shape environment specialise on it). A node that
    cannot run on symbolic sizes (``F.interpolate`` to a symbolic size has no symbolic kernel) gets a
    tensor of fresh symbols: what follows from it is static only if it is static whatever its size."""

    def __init__(self, gm: fx.GraphModule, fresh: Callable[[Sequence[int], torch.dtype], torch.Tensor],
                 budget_s: float | None = None) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.extra_traceback = False
        self.fresh = fresh
        self.opaque: list[fx.Node] = []
        self.deadline = time.monotonic() + (SYMBOLIC_BUDGET_S if budget_s is None else budget_s)

    def run_node(self, n: fx.Node) -> Any:
        if time.monotonic() > self.deadline:
            raise _OutOfTime(f"over {SYMBOLIC_BUDGET_S:g} s at node {n.name}")
        if n.op == "call_function" and hashable(n.target) and n.target in _CHECKS:
            return None
        try:
            return super().run_node(n)
        except _OutOfTime:
            raise
        except Exception:
            meta = n.meta.get("tensor_meta")
            if meta is None or not hasattr(meta, "shape") or n.op in ("placeholder", "output"):
                raise
            self.opaque.append(n)
            return self.fresh(meta.shape, meta.dtype)


SYMBOLIC_BUDGET_S = 10.0
"""Seconds the symbolic run may take. Shape algebra on some graphs (hundreds of floor divisions in a
vision transformer's window partitions) sends sympy's simplifier into minutes; past the budget the run
is abandoned and only ranks, dtypes and devices fold. The budget is a deadline the run checks before
each node (no signal, no timer: the caller's ``SIGALRM`` and other threads are left alone)."""


class _OutOfTime(Exception):
    pass


@contextmanager
def _quiet_fake_tensors() -> Iterator[None]:
    """torch logs an ERROR with a traceback for every op whose meta kernel rejects symbolic sizes (e.g.
    ``F.pad`` by amounts computed from a symbolic size in an opaque module); this run expects and handles
    those (fresh symbols), so they are not the user's errors. A filter drops this thread's records only
    (the logger's level is left alone: another thread may be logging through it)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    thread = threading.get_ident()

    def other_threads(record: logging.LogRecord) -> bool:
        return record.thread != thread

    logger.addFilter(other_threads)
    try:
        yield
    finally:
        logger.removeFilter(other_threads)


def _symbolic_values(gm: fx.GraphModule, inputs: Sequence[Any]) -> dict[fx.Node, Any] | None:
    """Every node's value with all input sizes symbolic, or ``None`` when the graph cannot run on fake
    tensors (an op without a meta kernel, a data-dependent size)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    # a batch >= 2 example: a size-1 dim would be specialised by the shape environment's 0/1 rule
    example = variant_inputs(inputs, 0) if batch_of(inputs) is not None else tuple(inputs)
    env = ShapeEnv(duck_shape=False, specialize_zero_one=False)  # equal sizes are not assumed equal
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)

    device = next((x.device for x in example if isinstance(x, torch.Tensor)), torch.device("cpu"))

    def symbolic(x: torch.Tensor) -> torch.Tensor:
        return mode.from_tensor(x, symbolic_context=StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC] * x.dim()))

    def fresh(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            template = torch.empty(tuple(shape), dtype=dtype, device=device)
        return symbolic(template)

    runner = _SymbolicRun(gm, fresh)
    try:
        with no_side_effects(gm), _quiet_fake_tensors(), mode:
            fakes = [symbolic(x) if isinstance(x, torch.Tensor) else x for x in example]
            runner.run(*fakes)
    except Exception as exc:  # noqa: BLE001 - fall back to what the recorded shapes prove
        log.debug("symbolic shape run failed, only ranks, dtypes and devices are resolved: %s", exc)
        return None
    if runner.opaque:
        log.debug("sizes after %s taken as free symbols (no symbolic kernel)", [n.name for n in runner.opaque])
    # the model runs at other batches and spatial sizes (its variants): if the run fixed one of those to a
    # constant, something in it specialised where the model does not, and nothing it says is trusted
    for x, fake in zip(inputs, fakes):
        if isinstance(x, torch.Tensor) and any(is_constant_value(fake.shape[d]) for d in varying_dims(x, batch_of(inputs))):
            log.debug("symbolic shape run fixed a size the model varies; only ranks, dtypes and devices resolved")
            return None
    return dict(runner.env)


def _fixed_input_dims(gm: fx.GraphModule, values: dict[fx.Node, Any]) -> list[tuple[fx.Node, tuple[int, ...], tuple[int, ...]]]:
    """``(placeholder, dims, sizes)``: the input dims the symbolic run fixed to a constant. Some are fixed by
    the model itself (a convolution's input channels), some only by the path the shape functions took on
    the example (a ``reshape(-1, 8)`` taken to need 8 columns): the folds rely on both, so both are guarded."""
    fixed = []
    for node in gm.graph.nodes:
        value = values.get(node) if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor):
            dims = tuple(d for d in range(1, value.dim()) if is_constant_value(value.shape[d]))
            if dims:
                fixed.append((node, dims, tuple(reduced_number(value.shape[d]) for d in dims)))
    return fixed


def _guard_inputs(gm: fx.GraphModule, fixed: list[tuple[fx.Node, tuple[int, ...], tuple[int, ...]]]) -> list[str]:
    from fxrebirth.graph.guards import SizeGuard, check_size

    described = []
    for placeholder, dims, sizes in fixed:
        guard = SizeGuard(f"capture resolved the model's shape queries with input '{placeholder.name}' at these sizes",
                          equals_dims=dims, equals=sizes)
        anchor = max((n for n in gm.graph.nodes if n.op == "placeholder"))
        with gm.graph.inserting_after(anchor):
            gm.graph.call_function(check_size, (placeholder, guard.as_data(), guard.describe()))
        described.append(f"capture at input '{placeholder.name}': {guard.describe()}")
    return described


def _recorded_value(node: fx.Node) -> tuple[bool, Any]:
    """The value of a rank, dtype or device query from the recorded example shapes (static whatever the
    input sizes): ``(True, value)``, or ``(False, None)`` for any other query."""
    subject = _tensor_arg(node)
    meta = subject.meta.get("tensor_meta") if subject is not None else None
    if meta is None or not hasattr(meta, "shape"):
        return False, None
    name = node.args[1] if node.target is getattr else node.target
    if name in ("ndim", "dim", "ndimension") or node.target is torch.ops.aten.dim.default:
        return True, len(meta.shape)
    if name == "dtype":
        return True, meta.dtype
    if name in ("is_floating_point", torch.is_floating_point):
        return True, meta.dtype.is_floating_point
    if name in ("is_complex", torch.is_complex):
        return True, meta.dtype.is_complex
    return False, None


def _foldable(node: fx.Node, folded: dict[fx.Node, Any], values: dict[fx.Node, Any] | None) -> bool:
    """A metadata query, or Python arithmetic on folded values, or Python arithmetic the symbolic run
    found constant (``x.shape[1]`` is 3 where a convolution fixed the channels, though ``x.shape`` is not
    constant)."""
    if is_metadata_query(node):
        return True
    if node.op != "call_function" or not hashable(node.target) or node.target not in PURE_PYTHON:
        return False
    return all(a in folded for a in node.all_input_nodes) or (
        values is not None and node in values and is_constant_value(values[node]))


def _substitute(node: fx.Node, value: Any) -> None:
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)


def resolve_metadata(gm: fx.GraphModule, inputs: Sequence[Any]) -> int:
    """Fold the metadata queries whose value is static, the Python arithmetic on them and the assertions
    they make true (see the module docstring); record symbolic shapes. Needs recorded shapes
    (``tensor_meta``); returns how many nodes were removed."""
    graph = gm.graph
    if not any(is_metadata_query(n) for n in graph.nodes):
        return 0
    values = _symbolic_values(gm, inputs)
    if values is not None:
        for node, value in values.items():
            if isinstance(value, torch.Tensor):
                node.meta[SYMBOLIC_KEY] = tuple(str(d) for d in value.shape)
    folded: dict[fx.Node, Any] = {}
    for node in graph.nodes:
        if not _foldable(node, folded, values):
            continue
        recorded, value = _recorded_value(node) if is_metadata_query(node) else (False, None)
        if values is not None and not recorded:
            value = values.get(node)
            static = node in values and is_constant_value(value)
        else:
            static = recorded
        if static:
            folded[node] = _spell(value)
    if values is not None:  # the folds and the recorded symbolic shapes hold where these guards do
        gm.meta[GUARDS_KEY] = _guard_inputs(gm, _fixed_input_dims(gm, values))
    removed = 0
    for node, value in folded.items():
        _substitute(node, value)
    for node in list(graph.nodes):
        if node.op == "call_function" and hashable(node.target) and node.target in _CHECKS:
            condition = node.args[0] if node.args else node.kwargs.get("cond", node.kwargs.get("condition"))
            if condition is True:
                graph.erase_node(node)
                removed += 1
    for node in reversed(list(folded)):
        if not node.users:
            graph.erase_node(node)
            removed += 1
    if removed:
        log.debug("resolved %d static metadata queries and assertions", removed)
    return removed
