r"""Branch marking (DeepRebirth's "branch merging"): inception-style modules.

An inception module is parallel branches on one input ``x``, concatenated along channels. The slow
branch is the pool projection, ``pool(x) -> conv1x1``: pooling has no weights but costs time. DeepRebirth
removes it and widens a convolution branch whose kernel is at least the pool's, so that the widened
branch learns the pool branch's channels too (cost about neutral), and thins the 1x1 "reduce" layers::

    cat[b1(x), b2(x), b3(x), proj(pool(x))]  ->  cat[b1(x), b2'(x), b3'(x)]
    b3' = b3 with C_proj more output channels (b3 adjacent to the pool branch, kernel >= pool kernel)
    reduce layers of b2', b3' with ``reduce_ratio`` of their channels

The absorbing branch is a neighbour of the pool branch in the concatenation, so every output channel keeps
its position. Collapsing a reduce + kxk pair into one kxk on the full input is an option
(``collapse_reduce``), not the default: on GoogLeNet it multiplies an inception module's cost about 5x.
The region is the whole module (input ``x``, output the concatenation); nothing in the graph changes.
A branch's activations may be any element-wise ones (:func:`is_branch_activation`); its rebirth layers use ReLU.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch.fx as fx

from fxrebirth.graph.capture import SOURCE_KEY
from fxrebirth.graph.ops import kind_of
from fxrebirth.graph.regions import BranchLayer, InceptionBranch, InceptionProposal, Region, record

from .depth import activation_input, stage_of

__all__ = ["mark_inception", "branch_chain", "is_branch_activation", "DEFAULT_REDUCE_RATIO"]

DEFAULT_REDUCE_RATIO = 0.5
_BRANCH_KINDS = ("conv", "batch_norm", "relu", "max_pool", "avg_pool")


def is_branch_activation(node: fx.Node) -> bool:
    """Whether ``node`` is an element-wise activation (ReLU, or any of :func:`~fxrebirth.passes.depth.is_activation`'s
    table: ReLU6, PReLU, SiLU, Hardswish... as a function, module or ATen operator) of a branch."""
    return kind_of(node) == "relu" or stage_of(node) == "activation"


def _branch_input(node: fx.Node) -> Any:
    """The value a branch node reads, or None when it is not a branch node."""
    if kind_of(node) in _BRANCH_KINDS:
        return node.kwargs["input"]
    return activation_input(node) if is_branch_activation(node) else None


def branch_chain(t: Any) -> tuple[fx.Node, list[fx.Node]] | None:
    """``(x, [nodes from x's user to t])``: walk back from a cat input while nodes have one user."""
    chain: list[fx.Node] = []
    node = t
    while isinstance(node, fx.Node) and len(node.users) == 1 and _branch_input(node) is not None:
        chain.insert(0, node)
        node = _branch_input(node)
    return (node, chain) if chain and isinstance(node, fx.Node) else None


def _conv_layers(chain: list[fx.Node]) -> list[BranchLayer]:
    layers = []
    for i, node in enumerate(chain):
        if kind_of(node) != "conv":
            continue
        shape = node.kwargs["weight"].meta["tensor_meta"].shape
        relu = any(is_branch_activation(n) for n in chain[i + 1:i + 3])
        layers.append(BranchLayer(out_channels=shape[0], kernel_size=list(shape[2:]),
                                  stride=list(node.kwargs["stride"]), padding=list(node.kwargs["padding"]),
                                  relu=relu))
    return layers


def _source(node: fx.Node) -> str:
    return str(node.meta.get(SOURCE_KEY, node.name))


def mark_inception(gm: fx.GraphModule, *, reduce_ratio: float = DEFAULT_REDUCE_RATIO,
                   collapse_reduce: bool = False) -> list[Region]:
    """Mark every inception-style module with a pool-projection branch; return the new regions."""
    regions = []
    for cat in gm.graph.nodes:
        if kind_of(cat) != "cat" or not isinstance(cat.kwargs["tensors"], (list, tuple)) or cat.kwargs["dim"] != 1:
            continue
        found = [branch_chain(t) for t in cat.kwargs["tensors"]]
        if len(found) < 2 or any(f is None for f in found) or len({f[0] for f in found}) != 1:
            continue
        x = found[0][0]
        chains = [f[1] for f in found]
        pools = [i for i, c in enumerate(chains) if kind_of(c[0]) in ("max_pool", "avg_pool")
                 and any(kind_of(n) == "conv" for n in c)]
        if len(pools) != 1:
            continue
        p = pools[0]
        pool_kernel = max(chains[p][0].kwargs["kernel_size"])
        layers = [_conv_layers(c) for c in chains]
        neighbours = [i for i in (p - 1, p + 1) if 0 <= i < len(chains) and i != p and layers[i]
                      and kind_of(chains[i][0]) == "conv" and max(layers[i][-1].kernel_size) >= pool_kernel]
        if not neighbours:
            continue
        into = max(neighbours, key=lambda i: max(layers[i][-1].kernel_size))
        branches = []
        for i, chain in enumerate(chains):
            if i == p:
                continue
            convs = [replace(layer) for layer in layers[i]]
            if collapse_reduce and len(convs) == 2 and convs[0].kernel_size == [1, 1]:
                convs = [convs[1]]
            elif len(convs) >= 2:
                convs[0].out_channels = max(1, round(convs[0].out_channels * reduce_ratio))
            if i == into:
                convs[-1].out_channels += layers[p][-1].out_channels
            branches.append(InceptionBranch(
                source=[_source(n) for n in chain], layers=convs, nodes=[n.name for n in chain],
                absorbs=[_source(n) for n in chains[p]] if i == into else [],
                # where the pool branch's channels sit in the widened output
                absorbed_position=("after" if into < p else "before") if i == into else None))
        nodes = [n for c in chains for n in c] + [cat]
        replaces = tuple(dict.fromkeys(_source(n) for n in nodes))
        proposal = InceptionProposal(
            in_channels=x.meta["tensor_meta"].shape[1], out_channels=cat.meta["tensor_meta"].shape[1],
            branches=branches, reduce_ratio=reduce_ratio, collapse_reduce=collapse_reduce,
            pool=[n.name for n in chains[p]])
        name = _common_prefix([str(n.meta[SOURCE_KEY]) for n in nodes if SOURCE_KEY in n.meta]) or cat.name
        regions.append(Region(f"branch:{name}", "branch", tuple(n.name for n in nodes), x.name, cat.name,
                              replaces, proposal))
    return record(gm, regions)


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)
