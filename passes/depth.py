r"""Depth marking: chains of layers that become ONE convolution once the activations between them are removed.

Today's CNNs (ResNet, MobileNetV2/V3, EfficientNet, RegNet) keep, after BatchNorm folding, convolutions
separated by activations. Replacing chosen activations by the identity makes the layers between them a
linear, shift-invariant map, which is one convolution (the depth compression of Kim et al., ICML 2023;
LayerMerge, ICML 2024; DepthShrinker, ICML 2022). This module finds, on any captured graph, the
**segments** where that can happen and computes the merged layer's geometry without touching a weight.

A segment is a single-input, single-output, convex set of nodes made of convolutions, eval BatchNorms,
average poolings (zero padding counted), eval dropouts, additions of two of its own values (residual
connections, whose identity term joins the merged kernel) and the activations it removes.

**Moving the padding.** A chain whose inner layer pads is not one convolution (the inner zeros would see
the outer layer's bias and neighbours; ``_kernel.compose`` refuses it). Its *student form* pads once, at
the segment's input, and runs every inner layer unpadded. Each value ``v`` gets a demand ``Q_v``: how
much padding its output carries (``Q_output = 0``); a layer with padding ``p`` and stride ``s`` whose
output carries ``Q`` demands ``p + s*Q`` of its input; an addition passes its ``Q`` to both operands; a
value read by several users is computed at the largest demand and cropped by the difference for the
others. The input is padded by ``P = Q_input``. Every output size is then unchanged at every input size::

    floor((n + 2(p + s*Q) - d(k - 1) - 1) / s) + 1 = floor((n + 2p - d(k - 1) - 1) / s) + 1 + 2Q

and, every layer after the pad being unpadded, the student form IS one convolution::

    S(a) = conv(a; K, stride S, padding P),   K = 1 + sum over a path of d_i (k_i - 1) S_i
                                              (S_i: the product of the strides before layer i;
                                               a crop of c counts as a 2c+1 kernel)

(exact: each composition is ``_kernel.compose``'s case of an unpadded second layer). The student form
differs from the original only near the border, and retraining absorbs that; the merge after it is exact
(:mod:`fxrebirth.passes.linearise`). Pruning (LayerMerge's remedy for kernel growth) is part of a
segment's choice: a shape-preserving convolution may become the identity, a residual branch zero.

Marking changes nothing in the graph. Segments overlap (a planner chooses among them), so they are not
recorded as regions; :func:`find_segments` returns them.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxrebirth.graph.capture import SOURCE_KEY
from fxrebirth.graph.ops import kind_of

__all__ = ["ACTIVATION_FUNCTIONS", "ACTIVATION_MODULES", "is_activation", "stage_of", "Segment", "Geometry",
           "find_segments", "segment_between", "members_of", "demands", "geometry", "prunable"]

_aten = torch.ops.aten
ACTIVATION_FUNCTIONS = frozenset({
    F.relu, F.relu6, torch.relu, F.hardswish, F.silu, F.gelu, F.leaky_relu, F.hardtanh, F.elu, F.mish, F.selu, F.celu,
    F.softplus, F.prelu, *(getattr(_aten, name).default for name in (  # as torch.export records them (ReLU6: hardtanh)
        "relu", "relu6", "hardtanh", "hardswish", "silu", "gelu", "leaky_relu", "elu", "mish", "selu", "celu",
        "softplus", "prelu", "_prelu_kernel"))})
"""Element-wise activations a segment may remove and a marking pass recognises (called as functions, or as
the ATen operators of an exported program)."""

ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Hardtanh, nn.ELU,
                      nn.Mish, nn.SELU, nn.CELU, nn.Softplus, nn.PReLU)
"""Element-wise activation modules a segment may remove (left as module calls by capture)."""


def _module(node: fx.Node) -> nn.Module | None:
    owner = node.graph.owning_module
    if node.op != "call_module" or owner is None:
        return None
    try:
        return owner.get_submodule(node.target)
    except AttributeError:
        return None


def is_activation(node: fx.Node) -> bool:
    """Whether ``node`` is an element-wise activation of one tensor (its removal keeps every shape)."""
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        return True
    return isinstance(_module(node), ACTIVATION_MODULES)


def activation_input(node: fx.Node) -> fx.Node | None:
    """The tensor an activation node applies to."""
    x = node.kwargs.get("input", node.args[0] if node.args else None)
    return x if isinstance(x, fx.Node) else None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if getattr(meta, "shape", None) is not None else None


def stage_of(node: fx.Node) -> str | None:
    """The linear role of ``node`` in a segment: ``"conv"``, ``"pool"`` (average pooling as a depthwise
    convolution), ``"affine"`` (eval BatchNorm), ``"identity"`` (eval dropout, ``nn.Identity``), ``"add"``, ``"activation"``,
    or ``None`` for anything else (a segment never contains it)."""
    kind = kind_of(node)
    kw = node.kwargs
    if kind == "conv":
        ok = not isinstance(kw["padding"], str) and kw["weight"].op == "get_attr"
        ok = ok and (kw["bias"] is None or kw["bias"].op == "get_attr")
        return "conv" if ok else None
    if kind == "avg_pool":
        whole = not kw["ceil_mode"] or all(s == 1 for s in kw["stride"])
        counted = kw["count_include_pad"] or all(p == 0 for p in kw["padding"])
        return "pool" if whole and counted and kw.get("divisor_override") is None else None
    if kind == "batch_norm":
        return "affine" if not kw["training"] else None
    if kind == "dropout":
        return "identity" if not kw["training"] else None
    if type(_module(node)) is nn.Identity and len(node.args) == 1 and not kw:  # timm's placeholders (drop, aa, se)
        return "identity"
    if node.op == "call_function" and node.target is operator.add and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        same = isinstance(a, fx.Node) and isinstance(b, fx.Node) and _shape(a) == _shape(b) == _shape(node)
        return "add" if same else None
    if is_activation(node) and activation_input(node) is not None and _shape(node) == _shape(activation_input(node)):
        return "activation"
    return None


def operands_of(node: fx.Node) -> list[fx.Node]:
    """The tensors a segment node computes from (weights and statistics left out)."""
    if stage_of(node) == "add":
        return list(node.args)
    if stage_of(node) == "activation":
        return [activation_input(node)]
    return [node.kwargs["input"]] if "input" in node.kwargs else [node.args[0]]


def _window(node: fx.Node) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Kernel size, stride, padding and dilation of a conv or pool node."""
    kw = node.kwargs
    if stage_of(node) == "conv":
        kernel = tuple(kw["weight"].meta["tensor_meta"].shape[2:])
        return kernel, tuple(kw["stride"]), tuple(kw["padding"]), tuple(kw["dilation"])
    kernel = tuple(kw["kernel_size"])
    return kernel, tuple(kw["stride"]), tuple(kw["padding"]), (1,) * len(kernel)


@dataclass(frozen=True)
class Geometry:
    """The merged convolution of a segment: channels, kernel, stride, padding (the moved padding ``P``),
    groups, and its multiply-accumulates beside the segment's own at the example's size."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    groups: int
    macs_now: int
    macs_merged: int

    @property
    def growth(self) -> float:
        """Merged MACs over the segment's (> 1: the merge computes more than the layers it replaces)."""
        return self.macs_merged / max(self.macs_now, 1)


@dataclass(frozen=True)
class Segment:
    """A candidate merge: the nodes (fx names, graph order) from ``input`` to ``output``, the activations it
    removes, its convolutions, the convolutions it prunes to the identity and the residual branches it
    drops (the add operand set to zero), and the merged layer's geometry."""

    input: str
    output: str
    nodes: tuple[str, ...]
    activations: tuple[str, ...]
    convs: tuple[str, ...]
    geometry: Geometry
    replaces: tuple[str, ...] = ()
    pruned: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        cut = "".join(f" -{n}" for n in self.pruned + self.dropped)
        return f"depth:{self.input}->{self.output}{cut}"


def _reach(a: fx.Node, max_convs: int, order: list[fx.Node], position: dict[fx.Node, int]) -> dict[fx.Node, int]:
    """The nodes reachable from ``a`` through segment stages -> convolutions on the longest path from ``a``
    (at most ``max_convs``)."""
    reached: dict[fx.Node, int] = {a: 0}
    horizon = max((position[u] for u in a.users), default=-1)
    i = position[a]
    while i < horizon:
        i += 1
        node = order[i]
        ins = [x for x in (operands_of(node) if stage_of(node) else []) if x in reached]
        if not ins:
            continue
        convs = max(reached[x] for x in ins) + (stage_of(node) == "conv")
        if convs <= max_convs:
            reached[node] = convs
            horizon = max([horizon] + [position[u] for u in node.users])
    return reached


def _members(a: fx.Node, b: fx.Node, reached: dict[fx.Node, int], position: dict[fx.Node, int],
             skip: frozenset[str] = frozenset()) -> list[fx.Node]:
    """The reached nodes on paths from ``a`` to ``b`` (not through the nodes named in ``skip``), graph order."""
    keep, todo = {b}, [b]
    while todo:
        for x in operands_of(todo.pop()):
            if x is not a and x in reached and x not in keep and x.name not in skip:
                keep.add(x)
                todo.append(x)
    return sorted(keep, key=position.__getitem__)


def _valid(a: fx.Node, members: list[fx.Node], b: fx.Node) -> bool:
    inside = set(members)
    if any(x is not a and x not in inside for n in members for x in operands_of(n)):
        return False  # reads a second value
    return all(set(n.users) <= inside for n in members if n is not b)  # one output


def demands(a: fx.Node, members: list[fx.Node], dropped: frozenset[str] = frozenset(),
            pruned: frozenset[str] = frozenset()) -> dict[fx.Node, tuple[int, ...]]:
    """The padding ``Q_v`` each value's output carries in the student form (``a``'s is the moved ``P``;
    ``dropped``: add operands replaced by zero, which demand nothing; ``pruned``: convolutions replaced by
    the identity, which pass their demand through)."""
    rank = len(_shape(a)) - 2
    q: dict[fx.Node, tuple[int, ...]] = {members[-1]: (0,) * rank}
    for node in reversed(members):
        need = demand_of(node, q, pruned)
        for x in operands_of(node):
            if x.name in dropped and stage_of(node) == "add":
                continue
            q[x] = tuple(max(o, n) for o, n in zip(q.get(x, need), need))
    return q


def demand_of(user: fx.Node, q: dict[fx.Node, tuple[int, ...]],
               pruned: frozenset[str] = frozenset()) -> tuple[int, ...]:
    """The padding ``user`` needs its input to carry when its own output carries ``q[user]``."""
    if stage_of(user) in ("conv", "pool") and user.name not in pruned:
        _, stride, padding, _ = _window(user)
        return tuple(p + s * d for p, s, d in zip(padding, stride, q[user]))
    return q[user]


def _macs(node: fx.Node) -> int:
    kernel, _, _, _ = _window(node)
    out = _shape(node)
    weight = node.kwargs["weight"].meta["tensor_meta"].shape
    return int(out[0] * out[1] * weight[1] * math.prod(kernel) * math.prod(out[2:]))


def geometry(a: fx.Node, members: list[fx.Node], pruned: frozenset[str] = frozenset(),
             dropped: frozenset[str] = frozenset()) -> Geometry | None:
    """The merged convolution of the student form (``pruned`` convolutions as the identity; ``dropped``: add
    operands set to zero), or None where its paths do not line up (they always do for a valid segment)."""
    q = demands(a, members, dropped, pruned)
    channels = _shape(a)[1]
    rank = len(_shape(a)) - 2
    receptive: dict[fx.Node, tuple[tuple[int, ...], tuple[int, ...], int]] = {a: ((1,) * rank, (1,) * rank, channels)}
    for node in members:
        reads = []
        for x in operands_of(node):
            if x.name in dropped and stage_of(node) == "add":
                continue
            size, stride, groups = receptive[x]
            crop = tuple(have - want for have, want in zip(q[x], demand_of(node, q, pruned)))
            reads.append((tuple(k + 2 * c * s for k, c, s in zip(size, crop, stride)), stride, groups))
        size, stride, groups = reads[0]
        if stage_of(node) == "add":
            if len({r[:2] for r in reads}) > 1:
                return None
            groups = math.gcd(*(r[2] for r in reads))
        elif stage_of(node) in ("conv", "pool") and node.name not in pruned:
            kernel, own_stride, _, dilation = _window(node)
            size = tuple(k0 + d * (k - 1) * s for k0, d, k, s in zip(size, dilation, kernel, stride))
            stride = tuple(s * t for s, t in zip(stride, own_stride))
            own_groups = node.kwargs["groups"] if stage_of(node) == "conv" else _shape(node)[1]
            groups = math.gcd(groups, own_groups)
        receptive[node] = (size, stride, groups)
    size, stride, groups = receptive[members[-1]]
    out = _shape(members[-1])
    macs_now = sum(_macs(n) for n in members if stage_of(n) == "conv" and n.name not in pruned)  # the student's
    macs_merged = out[0] * out[1] * (channels // groups) * math.prod(size) * math.prod(out[2:])
    return Geometry(channels, out[1], size, stride, q[a], groups, macs_now, int(macs_merged))


def prunable(members: list[fx.Node]) -> list[str]:
    """Convolutions of a segment that the identity can replace (same channels, stride 1, same size)."""
    return [n.name for n in members if stage_of(n) == "conv" and _shape(n) == _shape(n.kwargs["input"])
            and all(s == 1 for s in n.kwargs["stride"])]


def _check_cuts(members: list[fx.Node], pruned: tuple[str, ...], dropped: tuple[str, ...]) -> None:
    inside = set(members)
    # an operand computed inside is dropped with its branch, so nothing else may read it
    operands = {x.name for n in members if stage_of(n) == "add" and len(set(operands_of(n))) == 2 for x in operands_of(n)
                if x not in inside or set(x.users) == {n}}
    for name in pruned:
        if name not in prunable(members):
            raise ValueError(f"cannot prune {name!r}: not a convolution of this segment that keeps its input's "
                             f"shape (prunable: {prunable(members)})")
    for name in dropped:
        if name not in operands:
            raise ValueError(f"cannot drop {name!r}: not an operand of an addition in this segment that only "
                             f"the addition reads (droppable: {sorted(operands)})")


def _splits_a_layer(node: fx.Node) -> bool:
    """Whether ``node``'s only user is a BatchNorm or dropout (a segment never separates them)."""
    return len(node.users) == 1 and stage_of(next(iter(node.users))) in ("affine", "identity")


def _order(graph: fx.Graph) -> tuple[list[fx.Node], dict[fx.Node, int]]:
    order = list(graph.nodes)
    return order, {n: i for i, n in enumerate(order)}


def _segment(a: fx.Node, b: fx.Node, reached: dict[fx.Node, int], position: dict[fx.Node, int],
             pruned: tuple[str, ...] = (), dropped: tuple[str, ...] = ()) -> Segment | None:
    if b not in reached or b is a or stage_of(b) in (None, "activation"):
        return None
    members = _members(a, b, reached, position)
    if not _valid(a, members, b):
        return None
    _check_cuts(members, pruned, dropped)
    live = _members(a, b, reached, position, frozenset(dropped))
    geo = geometry(a, live, frozenset(pruned), frozenset(dropped))
    if geo is None:
        return None
    # what the segment costs now: every convolution of it, the pruned and dropped ones too
    geo = replace(geo, macs_now=sum(_macs(n) for n in members if stage_of(n) == "conv"))
    replaces = tuple(dict.fromkeys(str(n.meta.get(SOURCE_KEY, n.name)) for n in members))
    return Segment(a.name, b.name, tuple(n.name for n in members),
                   tuple(n.name for n in members if stage_of(n) == "activation"),
                   tuple(n.name for n in members if stage_of(n) == "conv"), geo, replaces, tuple(pruned),
                   tuple(dropped))


def segment_between(a: fx.Node, b: fx.Node, max_convs: int = 4, pruned: tuple[str, ...] = (),
                    dropped: tuple[str, ...] = ()) -> Segment | None:
    """The segment from ``a`` (outside it) to ``b``, or None where there is none (a second input, a second
    output, a node no segment may contain, more than ``max_convs`` convolutions on a path). ``pruned``:
    convolutions of it replaced by the identity; ``dropped``: add operands of it replaced by zero."""
    if _shape(a) is None or len(_shape(a)) < 3:
        return None
    order, position = _order(a.graph)
    return _segment(a, b, _reach(a, max_convs, order, position), position, pruned, dropped)


def members_of(gm: fx.GraphModule, segment: Segment) -> list[fx.Node]:
    """The nodes of ``segment`` in ``gm``, in graph order."""
    names = set(segment.nodes)
    return [n for n in gm.graph.nodes if n.name in names]


def _between_layers(segment: Segment, members: list[fx.Node]) -> bool:
    """Whether each activation the segment removes has one of its convolutions before and one after it
    (removing any other saves nothing: no two layers become one)."""
    convs = {n for n in members if stage_of(n) == "conv"}
    inside = set(members)
    for act in (n for n in members if stage_of(n) == "activation"):
        up, todo = False, list(operands_of(act))
        while todo and not up:
            x = todo.pop()
            up = x in convs
            todo += [y for y in operands_of(x) if y in inside] if x in inside else []
        down, todo = False, list(act.users)
        while todo and not down:
            x = todo.pop()
            down = x in convs
            todo += [u for u in x.users if u in inside] if x in inside else []
        if not (up and down):
            return False
    return True


def find_segments(gm: fx.GraphModule, max_convs: int = 4) -> list[Segment]:
    """Every segment of ``gm`` (which must carry shape metadata) with at least two convolutions (at most
    ``max_convs`` on a path) whose every removed activation sits between two of them; ordered by output,
    then input. No segment separates a layer from its BatchNorm or dropout."""
    order, position = _order(gm.graph)
    found = []
    for a in order:
        if a.op == "get_attr" or _splits_a_layer(a) or _shape(a) is None or len(_shape(a)) < 3:
            continue
        reached = _reach(a, max_convs, order, position)
        for b in reached:
            if _splits_a_layer(b):
                continue
            segment = _segment(a, b, reached, position)
            if segment is not None and len(segment.convs) >= 2 and _between_layers(segment, members_of(gm, segment)):
                found.append(segment)
    at = {n.name: i for n, i in position.items()}
    return sorted(found, key=lambda s: (at[s.output], at[s.input]))
