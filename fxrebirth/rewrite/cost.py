"""Static cost estimates from recorded shapes: FLOPs per node and stored tensor sizes.

The estimate counts a multiply-add as 2 FLOPs. Only layer kinds in :data:`_FLOPS` are counted; other
nodes count as one FLOP per output element when they compute a tensor, which is the right order of
magnitude for elementwise ops and a deliberate simplification for anything else.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from fxrebirth.graph.ops import kind_of
from fxrebirth.graph.surgery import device_of, fetch_attr

if TYPE_CHECKING:
    from fxrebirth.rewrite.report import Report

__all__ = [
    "node_flops", "graph_flops", "stored_elements", "node_bytes", "is_view", "node_signature",
    "CostModel", "RooflineCost", "TableCost", "MeasuredCost", "ReplayedCost", "measure_latency", "profile_nodes",
    "median_seconds",
]


def _numel(node: fx.Node) -> int:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return math.prod(shape) if shape is not None else 0


def _shape(value: object) -> tuple[int, ...] | None:
    if isinstance(value, fx.Node):
        shape = getattr(value.meta.get("tensor_meta"), "shape", None)
        return tuple(shape) if shape is not None else None
    return None


def _conv(node: fx.Node) -> int:
    w = _shape(node.kwargs["weight"])
    return 2 * _numel(node) * math.prod(w[1:]) if w else 0


def _conv_transpose(node: fx.Node) -> int:
    w = _shape(node.kwargs["weight"])
    x = _shape(node.kwargs["input"])
    return 2 * math.prod(x) * math.prod(w[1:]) if w and x else 0


def _linear(node: fx.Node) -> int:
    w = _shape(node.kwargs["weight"])
    return 2 * _numel(node) * w[1] if w else 0


def _pool(node: fx.Node) -> int:
    return _numel(node) * math.prod(node.kwargs["kernel_size"])


def _input_size(node: fx.Node) -> int:
    x = _shape(node.kwargs["input"])
    return math.prod(x) if x else 0


_FLOPS: dict[str, Callable[[fx.Node], int]] = {
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "linear": _linear,
    "batch_norm": lambda n: 2 * _numel(n),
    "max_pool": _pool,
    "avg_pool": _pool,
    "adaptive_avg_pool": _input_size,
    "lrn": lambda n: (n.kwargs["size"] + 3) * _numel(n),
    "flatten": lambda n: 0,
    "reshape": lambda n: 0,
    "dropout": lambda n: 0,
}

_FREE = {operator.getitem, getattr}


def node_flops(node: fx.Node) -> int:
    """Estimated FLOPs of one node (0 for placeholders, attributes and outputs)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return 0
    kind = kind_of(node)
    if kind in _FLOPS:
        return _FLOPS[kind](node)
    if node.op == "call_function" and node.target in _FREE:
        return 0
    return _numel(node)


def graph_flops(gm: fx.GraphModule) -> int:
    """Sum of :func:`node_flops` over the graph (needs shape metadata)."""
    return sum(node_flops(n) for n in gm.graph.nodes)


def stored_elements(module: torch.nn.Module) -> int:
    """Number of elements in all parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


# -- latency models for the cost gate -------------------------------------------------------------

_VIEW_KINDS = {"flatten", "reshape"}
_VIEW_TARGETS = {operator.getitem, torch.narrow, torch.Tensor.narrow}


def _bytes(value: object) -> int:
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
    if shape is None or dtype is None:
        return 0
    return math.prod(shape) * (torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 8)


def node_bytes(node: fx.Node) -> int:
    """Bytes a node reads (tensor inputs, weights included) and writes (its output)."""
    return _bytes(node) + sum(_bytes(a) for a in node.all_input_nodes)


def is_view(node: fx.Node) -> bool:
    """Nodes that only re-index their input (no arithmetic): flatten, reshape, narrow, getitem."""
    return kind_of(node) in _VIEW_KINDS or (node.op == "call_function" and node.target in _VIEW_TARGETS)


class CostModel:
    """Estimated latency (seconds) of one node; the cost gate compares sums over replaced and new nodes."""

    def node_cost(self, node: fx.Node) -> float:
        raise NotImplementedError

    def accepts(self, rule: str, site: str, before_s: float, after_s: float) -> bool:
        """The gate's verdict on one rewrite of ``rule`` at ``site``: faster by the estimates."""
        return after_s < before_s


class ReplayedCost(CostModel):
    """The gate verdicts of an earlier run, replayed in order, rule by rule and site by site: a copy of
    the model in another dtype (the float64 twin of the whole-model check) then makes the decisions the
    original run made, although its tensors are twice as wide, and a replay of a measured cost model
    (:class:`MeasuredCost`) does not time again. A decision the earlier run never made is left to
    ``fallback``, which also gives the estimates. One instance serves one run: it consumes the verdicts."""

    def __init__(self, verdicts: Mapping[tuple[str, str], Sequence[bool]], fallback: CostModel) -> None:
        self.pending = {key: list(values) for key, values in verdicts.items()}
        self.fallback = fallback

    @classmethod
    def of(cls, report: "Report", fallback: CostModel) -> "ReplayedCost":
        """The verdicts recorded in ``report`` (:attr:`~fxrebirth.rewrite.report.RuleStats.decisions`)."""
        verdicts: dict[tuple[str, str], list[bool]] = {}
        for rule, stats in report.rules.items():
            for decision in stats.decisions:
                verdicts.setdefault((rule, decision.node), []).append(decision.accepted)
        return cls(verdicts, fallback)

    def node_cost(self, node: fx.Node) -> float:
        return self.fallback.node_cost(node)

    def accepts(self, rule: str, site: str, before_s: float, after_s: float) -> bool:
        pending = self.pending.get((rule, site))
        return pending.pop(0) if pending else self.fallback.accepts(rule, site, before_s, after_s)


class RooflineCost(CostModel):
    """Deterministic default: ``overhead + max(FLOPs / rate, bytes / bandwidth)`` per compute node.

    Convolutions are GEMMs whose row count is the number of output positions ``m``; with few rows the
    vector units idle, so their rate is ``peak * m / (m + m_half)``. The constants were measured on this
    project's 2-core x86 machine in eager PyTorch (oneDNN convolutions peak near 190 GFLOP/s; a 2x2
    stride-2 convolution producing 7x7 outputs ran at 88 GFLOP/s, the same FLOPs as a 1x1 at 14x14
    taking 1.1 ms vs 2.3 ms; a small op costs about 10 us to dispatch). Decisions, and so rewrite counts
    in tests, never depend on the machine's noise.
    """

    def __init__(self, peak_flops_per_s: float = 150e9, bytes_per_s: float = 10e9, op_overhead_s: float = 10e-6,
                 view_overhead_s: float = 2e-6, half_rate_rows: int = 64, slices_copy: bool = False) -> None:
        self.peak_flops_per_s = peak_flops_per_s
        self.bytes_per_s = bytes_per_s
        self.op_overhead_s = op_overhead_s
        self.view_overhead_s = view_overhead_s
        self.half_rate_rows = half_rate_rows
        self.slices_copy = slices_copy

    @classmethod
    def onnxruntime(cls) -> "RooflineCost":
        """For models deployed through ONNX Runtime, where a channel slice is a Slice node that copies its
        output and stands between a convolution and the activation ORT would fuse into it (measured:
        googlenet with sibling fusion ran 1.046x the original in ORT, 0.999x without)."""
        return cls(slices_copy=True)

    def _rate(self, node: fx.Node) -> float:
        if kind_of(node) in ("conv", "conv_transpose"):
            shape = getattr(node.meta.get("tensor_meta"), "shape", None)
            rows = max(shape[0] * math.prod(shape[2:]), 1) if shape is not None else self.half_rate_rows  # an empty batch: no work
            return self.peak_flops_per_s * rows / (rows + self.half_rate_rows)
        return self.peak_flops_per_s

    def node_cost(self, node: fx.Node) -> float:
        if node.op not in ("call_function", "call_method", "call_module"):
            return 0.0
        if is_view(node):
            if self.slices_copy and kind_of(node) not in _VIEW_KINDS:
                return self.op_overhead_s + 2 * _bytes(node) / self.bytes_per_s
            return self.view_overhead_s
        compute = node_flops(node) / self._rate(node)
        return self.op_overhead_s + max(compute, node_bytes(node) / self.bytes_per_s)


def node_signature(node: fx.Node) -> str:
    """A key identifying what a node computes, independent of names: op, argument shapes, options.

    Two nodes with the same signature run the same kernel on the same shapes, so a latency measured for
    one (here, or on the target device) applies to the other.
    """
    def describe(value: object) -> str:
        if isinstance(value, fx.Node):
            shape = getattr(value.meta.get("tensor_meta"), "shape", None)
            return "T" + ("x".join(map(str, shape)) if shape is not None else "?")
        return repr(value)

    target = getattr(node.target, "__name__", str(node.target))
    args = ",".join(describe(a) for a in node.args)
    kwargs = ",".join(f"{k}={describe(v)}" for k, v in node.kwargs.items())
    return f"{node.op}:{target}({args};{kwargs})"


class TableCost(CostModel):
    """Latencies looked up by :func:`node_signature` (measured on the target device, e.g. a phone),
    falling back to ``fallback`` for nodes the table does not list (e.g. a merged layer never run)."""

    def __init__(self, table: dict[str, float], fallback: CostModel | None = None) -> None:
        self.table = dict(table)
        self.fallback = fallback or RooflineCost()

    def node_cost(self, node: fx.Node) -> float:
        measured = self.table.get(node_signature(node))
        return measured if measured is not None else self.fallback.node_cost(node)


class MeasuredCost(CostModel):
    """Latency measured here: each node is run alone on random inputs of its recorded shapes (median
    of ``repeats`` runs, cached by :func:`node_signature`). Decisions follow this machine, noise
    included, so they can differ between runs; use it to tune a deployment, not in tests."""

    def __init__(self, repeats: int = 20) -> None:
        self.repeats = repeats
        self.cache: dict[str, float] = {}

    def node_cost(self, node: fx.Node) -> float:
        if node.op != "call_function":
            return RooflineCost().node_cost(node)
        key = node_signature(node)
        if key not in self.cache:
            self.cache[key] = self._time(node)
        return self.cache[key]

    def _time(self, node: fx.Node) -> float:
        gm = node.graph.owning_module
        device = device_of(gm)

        def value(arg: fx.Node) -> object:
            if arg.op == "get_attr":
                return fetch_attr(gm, arg.target)
            meta = arg.meta.get("tensor_meta")
            return torch.randn(tuple(meta.shape), dtype=meta.dtype, device=device)

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        return median_seconds(lambda: node.target(*args, **kwargs), self.repeats, warmup=3)


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time in seconds of ``run()`` over ``repeats`` calls, after ``warmup`` untimed ones, in
    inference mode: the one timer of the cost models and the planner (benchmarks, which compare
    variants, interleave them instead: :mod:`fxrebirth.measure.timing`)."""
    import statistics
    import time

    samples = []
    with torch.inference_mode():
        for _ in range(warmup):
            run()
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def profile_nodes(gm: fx.GraphModule, inputs: tuple, *, repeats: int = 5) -> dict[str, float]:
    """Median wall time of every compute node of ``gm`` (eager, after one warm-up run), by node name."""
    import statistics
    import time

    samples: dict[str, list[float]] = {}

    class _Timer(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            start = time.perf_counter()
            result = super().run_node(n)
            if n.op in ("call_function", "call_method", "call_module"):
                samples.setdefault(n.name, []).append(time.perf_counter() - start)
            return result

    with torch.inference_mode():
        for _ in range(repeats + 1):
            _Timer(gm).run(*inputs)
    return {name: statistics.median(values[1:]) for name, values in samples.items()}


def measure_latency(gm: fx.GraphModule, inputs: tuple, *, repeats: int = 5) -> dict[str, float]:
    """:func:`profile_nodes` keyed by :func:`node_signature`, the format :class:`TableCost` reads.

    Save the result as JSON and pass it to :class:`TableCost` to gate merges (or plan rebirth) with
    latencies measured on the target.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    return {node_signature(by_name[name]): t for name, t in profile_nodes(gm, inputs, repeats=repeats).items()}
