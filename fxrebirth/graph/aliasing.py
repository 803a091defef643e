"""What a graph's outputs may share memory with, and keeping that unchanged through rewrites.

A rewrite that removes a no-op (``y * 1.0``, ``x + 0``, a same-shape ``reshape``, ``contiguous()``, eval
dropout, ``nn.Identity``) replaces a value by its input. When that value is returned, the output can
become another returned tensor, a view of one, the caller's input, or a parameter: after the user writes
into one output in place (``out[0].sigmoid_()``, ``boxes.clamp_(0, 1)``) another output, their input or
the model changed, where the original's did not.

:func:`output_aliases` records, per returned tensor, the values it may share memory with (its *roots*:
the graph inputs, attributes and new-memory results it is read from through ops that may return a view
or their input itself, :func:`fxrebirth.graph.mutation.returns_new_memory`). :func:`keep_output_aliases`
then, on the rewritten graph, copies (``torch.clone``) each returned tensor that may now share memory
with another output, an input or an attribute where the original's could not. Outputs that could share
memory before may still (``return y, y.view(y.shape)`` may return ``y`` twice once the view is removed:
a write into one is seen through the other, as in the original). It costs one walk over the outputs' non-new-memory ancestors per run, and a copy only where a rewrite
introduced sharing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from fxrebirth.graph.mutation import returns_new_memory

__all__ = ["OutputAliases", "output_aliases", "keep_output_aliases"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputAliases:
    """Per returned value (flattened output, in order): the node returned and its roots (``None`` where the
    output is not a tensor node)."""

    nodes: tuple[fx.Node | None, ...]
    roots: tuple[frozenset[fx.Node] | None, ...]


def _is_tensor(node: object) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta is not None and hasattr(meta, "shape")


def _is_source(node: fx.Node) -> bool:
    """A value that is memory of its own: a graph input, an attribute, or an op's new result."""
    return node.op in ("placeholder", "get_attr") or returns_new_memory(node)


def _roots(node: fx.Node, memo: dict[fx.Node, frozenset[fx.Node]]) -> frozenset[fx.Node]:
    """The sources ``node`` may share memory with (an op not known to return new memory may return a view
    of any tensor argument, or one of them itself; an argument without recorded shapes counts as one)."""
    stack = [node]
    while stack:
        top = stack[-1]
        if top in memo:
            stack.pop()
            continue
        if _is_source(top):
            memo[top] = frozenset((top,))
            stack.pop()
            continue
        args = [a for a in top.all_input_nodes if _is_tensor(a) or a.op in ("placeholder", "get_attr")
                or "tensor_meta" not in a.meta]
        todo = [a for a in args if a not in memo]
        if todo:
            stack += todo
            continue
        memo[top] = frozenset().union(*(memo[a] for a in args)) if args else frozenset((top,))
        stack.pop()
    return memo[node]


def _output(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def output_aliases(graph: fx.Graph) -> OutputAliases:
    """The outputs of ``graph`` and what each may share memory with (see the module docstring)."""
    leaves, _ = tree_flatten(_output(graph).args[0])
    memo: dict[fx.Node, frozenset[fx.Node]] = {}
    nodes = tuple(leaf if _is_tensor(leaf) else None for leaf in leaves)
    return OutputAliases(nodes, tuple(_roots(n, memo) if n is not None else None for n in nodes))


def _inputs(roots: frozenset[fx.Node]) -> bool:
    return any(r.op in ("placeholder", "get_attr") for r in roots)


def keep_output_aliases(gm: fx.GraphModule, before: OutputAliases) -> int:
    """Make the outputs of the rewritten ``gm`` share memory only where ``before`` (the same graph's
    :func:`output_aliases` before the rewrites) says the original's could; return how many outputs were
    given a copy of their own."""
    graph = gm.graph
    output = _output(graph)
    leaves, spec = tree_flatten(output.args[0])
    if len(leaves) != len(before.nodes):
        return 0  # another output structure: nothing to compare with
    now = output_aliases(graph)
    fixed = 0
    for i, node in enumerate(now.nodes):
        old = before.roots[i]
        if node is None or old is None:
            continue
        roots = now.roots[i]
        shares = [j for j in range(len(leaves)) if j != i and now.roots[j] is not None and roots & now.roots[j]
                  and not old & before.roots[j]]
        if not shares and not (_inputs(roots) and not _inputs(old)):
            continue
        leaves[i] = _insert(graph, node, output)
        output.args = (spec.unflatten(leaves),)
        now = output_aliases(graph)
        fixed += 1
    if fixed:
        log.debug("%d outputs given memory of their own: a rewrite had made them share it", fixed)
    return fixed


def _insert(graph: fx.Graph, node: fx.Node, output: fx.Node) -> fx.Node:
    with graph.inserting_before(output):
        new = graph.call_function(torch.clone, (node,))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "val", "example_value")})
    return new
