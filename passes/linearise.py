r"""The student form of depth segments, and their exact merge into one convolution each.

:func:`linearise` rewrites chosen segments (:mod:`fxrebirth.passes.depth`) of a captured graph into their
student form, the network depth compression retrains:

* every activation of the segment becomes the identity; pruned convolutions become the identity and
  dropped residual operands zero (the addition becomes its other operand);
* every convolution and average pooling of the segment loses its padding, and the segment's input is
  padded once by the moved padding ``P``; a value some of whose users demand less padding than it
  carries is cropped for them (``F.pad`` by a negative width). Output sizes are unchanged at every
  input size (the identity is in :mod:`fxrebirth.passes.depth`).

The student form keeps the original weights, so it starts where the original is and differs from it
only near the borders; training it is the caller's business. :func:`merge` then replaces each student
segment by ONE convolution::

    T(pad(a, P)) = conv(a; K, b, stride S, padding P)

where ``K, b`` are the student segment's layers composed (``_kernel.compose``, exact because every layer
after the pad is unpadded; a crop by ``c`` is an unpadded kernel of size ``2c + 1`` with one tap at its
centre) and summed (``_kernel.sum_kernels``, exact because the paths' kernels share size and stride).
Each merge is verified in float64 against the student segment at the example's size and two others, at
batch 2, and raises :class:`fxrebirth.errors.EquivalenceError` naming the segment beyond
:data:`fxrebirth.equivalence.LOCAL_TOLERANCE`. Neither function changes its argument.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxrebirth.equivalence import LOCAL_TOLERANCE, MIN_BATCH, flush_denormals, relative_error
from fxrebirth.errors import EquivalenceError
from fxrebirth.graph.capture import propagate_shapes
from fxrebirth.graph.mutation import eliminate_dead_code, mutated_input, tainted
from fxrebirth.graph.regions import extract
from fxrebirth.graph.surgery import fetch_attr
from fxrebirth.rewrite.rules import RuleContext

from ._kernel import Kernel, compose, identity_kernel, sum_kernels
from .branches import stage_kernel
from .depth import Segment, activation_input, demand_of, demands, members_of, operands_of, stage_of

__all__ = ["StudentSegment", "STUDENT_KEY", "linearise", "merge"]

log = logging.getLogger(__name__)

STUDENT_KEY = "fxrebirth.depth.student"
"""``graph_module.meta`` key: the :class:`StudentSegment` list of a student form."""


@dataclass(frozen=True)
class StudentSegment:
    """A segment in student form: the value it reads (``input``), its one pad node, its nodes (graph order,
    the pad first) and its output; ``segment``: the id of the segment it came from."""

    segment: str
    input: str
    pad: str
    nodes: tuple[str, ...]
    output: str


def _pad_widths(widths: tuple[int, ...]) -> tuple[int, ...]:
    """``F.pad``'s list (last dimension first) for symmetric ``widths`` (first spatial dimension first)."""
    return tuple(w for width in reversed(widths) for w in (width, width))


def _check_disjoint(segments: list[Segment]) -> None:
    """Chosen segments share no node, and one reads another only at its output."""
    owner: dict[str, Segment] = {}
    for seg in segments:
        for name in seg.nodes:
            if name in owner:
                raise ValueError(f"segments {owner[name].id!r} and {seg.id!r} share node {name!r}; "
                                 "choose disjoint ones")
            owner[name] = seg
    for seg in segments:
        other = owner.get(seg.input)
        if other is not None and other.output != seg.input:
            raise ValueError(f"segment {seg.id!r} reads {seg.input!r}, which segment {other.id!r} removes or "
                             "rewrites; choose segments that read each other only at their outputs")


def _remove(node: fx.Node, by: fx.Node) -> None:
    node.replace_all_uses_with(by)
    node.graph.erase_node(node)


def _check_no_write_between(seg: Segment, a: fx.Node, members: list[fx.Node]) -> None:
    """The student reads ``a`` once, just before its first layer that reads it; refused (ValueError naming the
    segment and the write) when an in-place write between that layer and the segment's last node may touch
    ``a`` or a member: the student and the merged convolution would not see it where the original does."""
    inside = set(members)
    node = next((n for n in members if a in n.all_input_nodes), members[-1])
    while node is not members[-1]:
        node = node.next
        if node not in inside and mutated_input(node) is not None:
            touched = tainted(a.graph, [node])
            if a in touched or inside & touched:
                raise ValueError(f"segment {seg.id!r}: {node.name!r} writes in place between its layers; choose "
                                 "a segment that no in-place statement interrupts")


def _insert_pad(graph: fx.Graph, value: fx.Node, widths: tuple[int, ...], before: fx.Node) -> fx.Node:
    """``F.pad`` of ``value``, just before ``before`` (the segment's first layer that reads it): after any
    in-place write to ``value`` before the segment, as the original layers read it."""
    with graph.inserting_before(before):
        return graph.call_function(F.pad, kwargs={"input": value, "pad": _pad_widths(widths), "mode": "constant",
                                                  "value": None})


def _linearise_one(gm: fx.GraphModule, seg: Segment, renamed: dict[str, str]) -> StudentSegment:
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    a, b = by_name[renamed.get(seg.input, seg.input)], by_name[seg.output]
    members = members_of(gm, seg)
    _check_no_write_between(seg, a, members)
    output = b
    roles = {n: stage_of(n) for n in members}  # read before any node is erased

    def remove(node: fx.Node, by: fx.Node) -> None:
        nonlocal output
        output = by if node is output else output  # the output may be removed in turn (a shortcut's activation)
        _remove(node, by)

    for add in [n for n in members if roles[n] == "add" and any(x.name in seg.dropped for x in n.args)]:
        remove(add, next(x for x in add.args if x.name not in seg.dropped))
    for node in [n for n in members if n.name in seg.pruned]:
        remove(node, node.kwargs["input"])
    for node in [n for n in members if roles[n] == "activation"]:
        remove(node, activation_input(node))
    eliminate_dead_code(graph)
    alive = {n.name for n in graph.nodes}
    members = [n for n in members if n.name in alive]
    if output is a:  # the segment became the identity (a dropped branch beside an identity shortcut)
        return StudentSegment(seg.id, a.name, a.name, (), a.name)
    q = demands(a, members)
    inside = set(members)
    users = {n: [u for u in n.users if u in inside] for n in [a] + members}
    pad = _insert_pad(graph, a, q[a], before=next((n for n in members if n in users[a]), members[0]))
    nodes = [pad]
    for node in [a] + members:
        if node is not a:  # listed before the crops that read it (merge() walks the list in order)
            nodes.append(node)
            if stage_of(node) in ("conv", "pool"):
                node.update_kwarg("padding", (0,) * len(q[a]))
        for user in users[node]:
            want = demand_of(user, q)
            source = pad if node is a else node
            if want != q[node]:
                with graph.inserting_before(user):
                    source = graph.call_function(F.pad, kwargs={
                        "input": source, "pad": _pad_widths(tuple(w - q[node][i] for i, w in enumerate(want))),
                        "mode": "constant", "value": None})
                nodes.append(source)
            user.replace_input_with(node, source)
    return StudentSegment(seg.id, a.name, pad.name, tuple(n.name for n in nodes), output.name)


def _example_inputs(gm: fx.GraphModule) -> list[torch.Tensor]:
    """Random inputs of the recorded shapes, in the dtype and on the device of the model's weights (it may
    have been converted since it was captured)."""
    weight = next((p for p in gm.parameters() if p.is_floating_point()), None)
    out = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            meta = node.meta["tensor_meta"]
            dtype = weight.dtype if weight is not None and meta.dtype.is_floating_point else meta.dtype
            device = weight.device if weight is not None else None
            out.append(torch.randn(tuple(meta.shape), device=device).to(dtype))
    return out


def linearise(gm: fx.GraphModule, segments: list[Segment]) -> fx.GraphModule:
    """A copy of ``gm`` with each of ``segments`` (disjoint) in student form; the copy's
    ``meta[STUDENT_KEY]`` lists them (:class:`StudentSegment`) for :func:`merge`."""
    _check_disjoint(segments)
    student = copy.deepcopy(gm)
    position = {n.name: i for i, n in enumerate(student.graph.nodes)}
    # graph order: a segment whose output is gone (its addition became one operand) renames a later one's input
    renamed: dict[str, str] = {}
    done = []
    for seg in sorted(segments, key=lambda s: position[s.output]):
        done.append(_linearise_one(student, seg, renamed))
        renamed[seg.output] = done[-1].output
    student.graph.lint()
    student.delete_all_unused_submodules()  # pruned layers: parameters nothing reads (DDP refuses them)
    student.recompile()
    propagate_shapes(student, _example_inputs(gm))
    student.meta[STUDENT_KEY] = done
    return student


def _crop_kernel(channels: int, crop: tuple[int, ...], device: torch.device) -> Kernel:
    """``x[..., c:-c]`` as an unpadded depthwise kernel of size ``2c + 1`` with one tap at its centre."""
    unit = identity_kernel(channels, len(crop), device)
    size = tuple(2 * c + 1 for c in crop)
    return unit.embedded(size, tuple(crop), (0,) * len(crop))


def _kernel_of(gm: fx.GraphModule, part: StudentSegment, ctx: RuleContext) -> Kernel:
    by_name = {n.name: n for n in gm.graph.nodes}
    pad = by_name[part.pad]
    shape = pad.meta["tensor_meta"].shape
    env = {pad: identity_kernel(shape[1], len(shape) - 2, ctx.device)}
    for name in part.nodes[1:]:
        node = by_name[name]
        role = stage_of(node)
        if node.target is F.pad:
            widths = node.kwargs["pad"][::2][::-1]
            channels = node.kwargs["input"].meta["tensor_meta"].shape[1]  # the cropped value's, inside or at the input
            kernel = compose(env[node.kwargs["input"]], _crop_kernel(channels, tuple(-w for w in widths), ctx.device))
        elif role == "add":
            x, y = node.args
            kernel = sum_kernels([env[x], env[y]], tuple(shape[2:]), tuple(node.meta["tensor_meta"].shape[2:]))
        elif role == "identity":
            kernel = env[operands_of(node)[0]]
        else:
            stage = stage_kernel(node, ctx)
            kernel = stage if isinstance(stage, str) else compose(env[operands_of(node)[0]], stage)
        if isinstance(kernel, str):
            raise EquivalenceError(f"segment {part.segment!r}: cannot merge at {name!r}: {kernel}")
        env[node] = kernel
    P = tuple(pad.kwargs["pad"][::2][::-1])
    return replace(env[by_name[part.output]], padding=P)


def _verify(gm: fx.GraphModule, part: StudentSegment, kernel: Kernel) -> float:
    """Float64 relative error of the merged conv against the student segment, worst of three sizes."""
    sub = extract(gm, part.input, part.nodes, part.output, f"segment {part.segment!r}")
    sub = copy.deepcopy(sub).to(torch.float64)
    shape = list({n.name: n for n in gm.graph.nodes}[part.input].meta["tensor_meta"].shape)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[kernel.ndim]
    worst = 0.0
    with flush_denormals():
        for grow in (0, 1, 5):
            x = torch.randn([max(shape[0], MIN_BATCH), shape[1]] + [n + grow for n in shape[2:]],
                            dtype=torch.float64, device=kernel.weight.device)
            want = sub(x)
            got = conv(x, kernel.weight, kernel.bias, kernel.stride, kernel.padding, kernel.dilation, kernel.groups)
            worst = max(worst, relative_error(want, got) if got.shape == want.shape else float("inf"))
    return worst


def _emit(gm: fx.GraphModule, part: StudentSegment, kernel: Kernel, index: int) -> None:
    by_name = {n.name: n for n in gm.graph.nodes}
    output, x = by_name[part.output], by_name[part.input]
    like = next((by_name[n].kwargs["weight"] for n in part.nodes if stage_of(by_name[n]) == "conv"), None)
    dtype = fetch_attr(gm, like.target).dtype if like is not None else output.meta["tensor_meta"].dtype
    while hasattr(gm, f"depth_merged_{index}_weight"):
        index += 1
    weight_name, bias_name = f"depth_merged_{index}_weight", f"depth_merged_{index}_bias"
    gm.register_parameter(weight_name, torch.nn.Parameter(kernel.weight.to(dtype), requires_grad=False))
    gm.register_parameter(bias_name, torch.nn.Parameter(kernel.bias.to(dtype), requires_grad=False))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[kernel.ndim]
    with gm.graph.inserting_before(output):
        w, b = gm.graph.get_attr(weight_name), gm.graph.get_attr(bias_name)
        new = gm.graph.call_function(conv, kwargs={
            "input": x, "weight": w, "bias": b, "stride": kernel.stride, "padding": kernel.padding,
            "dilation": kernel.dilation, "groups": kernel.groups})
    output.replace_all_uses_with(new)
    new.meta.update(output.meta)


def merge(student: fx.GraphModule) -> fx.GraphModule:
    """A copy of a student form (from :func:`linearise`, trained or not) with each student segment
    replaced by one convolution, each verified (see the module docstring)."""
    parts = student.meta.get(STUDENT_KEY)
    if parts is None:
        raise ValueError("merge() takes the student form linearise() returned (its meta names the segments)")
    gm = copy.deepcopy(student)
    ctx = RuleContext(gm)
    position = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    # last first: a merged segment's output node is replaced, and a later segment may read it. A segment that
    # became the identity has nothing to merge (its value may since be another strategy's renamed output)
    kept = [(index, part) for index, part in enumerate(parts) if part.nodes]
    for index, part in sorted(kept, key=lambda p: -position[p[1].output]):
        kernel = _kernel_of(gm, part, ctx)
        error = _verify(gm, part, kernel)
        if not error <= LOCAL_TOLERANCE:
            raise EquivalenceError(f"segment {part.segment!r}: the merged convolution differs from the student "
                                   f"segment by {error:.2e} (float64; tolerance {LOCAL_TOLERANCE:.0e})")
        log.info("merged %s into one %s convolution (float64 error %.1e)", part.segment,
                 "x".join(map(str, kernel.size)), error)
        _emit(gm, part, kernel, index)
    eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()
    propagate_shapes(gm, _example_inputs(student))
    gm.meta.pop(STUDENT_KEY, None)
    return gm
