r"""Streamline marking (DeepRebirth's "streamline merging"): conv -> [BN] -> [ReLU] -> {LRN, pool} chains.

The activation may be any element-wise one of the table :data:`fxrebirth.passes.depth.ACTIVATION_FUNCTIONS` /
``ACTIVATION_MODULES`` (ReLU, ReLU6, PReLU, SiLU, Hardswish, GELU, LeakyReLU...; as a function, a module or an
ATen operator of an exported program); the rebirth layer's activation is a ReLU (``relu=True``), which
retraining adapts to.

No identity makes such a chain one layer (LRN and max-pooling are non-linear): the chain is *marked* as a
region, and a later step trains one convolution to replace it. The proposed rebirth layer is

    conv'(x; kernel k', stride s_conv * s_pool, padding p') [+ ReLU when the chain had one]

with ``k'`` chosen by the kernel policy: ``"field"`` (the default) at least the chain's receptive field
``d(k - 1) + 1 + (k_pool - 1) * s_conv`` (one more where ceil-mode pooling needs an even kernel), so the
rebirth layer sees every input pixel the chain did; ``"conv"`` the first convolution's own extent
``d(k - 1) + 1``, as DeepRebirth does (the pooling only multiplies the stride), which costs
``(k' / field)^2`` of the FLOPs and sees less. Every policy ranks first the kernels that give the
chain's output size at every input size, so where no kernel near the target does, the nearest one that
does is taken (AlexNet's unpadded conv1 keeps its 19x19 field under ``"conv"``). ``p'`` is the padding that makes its output size equal
the chain's for every input size the chain accepts (ceil-mode pooling included); where no symmetric
padding does for every size, the proposal records for which input sizes it does (``valid_from``,
``valid_to``).

The ``"pool"`` policy removes less: the rebirth layer is the first convolution as it is (its kernel, stride
and padding) [+ ReLU], followed by the chain's own max-pooling; only the LRN goes (a BatchNorm after the
convolution is folded into it when the rebirth layer starts from the original weights). Since ``maxpool(relu(x)) = relu(maxpool(x))``, the order of ReLU and pooling
in the chain does not matter, and the output size is the chain's at every input size. It keeps the pooling's
invariance, which a strided convolution has to learn back, and marks only chains with an LRN (without one
there is nothing to remove) whose pooling is a max-pooling without dilation and whose convolution has none.
Marking changes nothing in the graph.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch.fx as fx

from fxrebirth.graph.capture import SOURCE_KEY
from fxrebirth.graph.ops import kind_of
from fxrebirth.graph.regions import ConvProposal, PoolStage, Region, check_regions, record

from .depth import activation_input, stage_of

__all__ = ["mark_streamline", "pool_output_size", "chain_output_size", "propose_conv", "Stage", "KERNEL_POLICIES",
           "EVERY_POLICY"]

KERNEL_POLICIES = ("field", "conv", "pool")
EVERY_POLICY = "each"
"""Mark every chain once per kernel policy whose proposal differs (ids after the first: ``<id>@<policy>``): the
variants overlap, so a plan merges at most one of them and the planner's front holds every geometry."""

_FOLLOWERS = ("batch_norm", "relu", "lrn", "max_pool", "avg_pool")
_NONLINEAR = ("lrn", "max_pool", "avg_pool")


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1,
                     ceil_mode: bool = False) -> int:
    """PyTorch's pooling output size (a ceil-mode window must start inside the padded input)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


class Stage(NamedTuple):
    """A shape-changing stage of a chain (a convolution or a pooling), per spatial dimension."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool


def _stages(chain: list[fx.Node]) -> list[Stage]:
    """The shape-changing stages (conv and pooling) of a chain."""
    stages = []
    for node in chain:
        kind, kw = kind_of(node), node.kwargs
        if kind == "conv":
            kernel = tuple(node.kwargs["weight"].meta["tensor_meta"].shape[2:])
            stages.append(Stage(kernel, tuple(kw["stride"]), tuple(kw["padding"]), tuple(kw["dilation"]), False))
        elif kind in ("max_pool", "avg_pool"):
            dilation = kw.get("dilation", (1,) * len(kw["kernel_size"]))
            stages.append(Stage(tuple(kw["kernel_size"]), tuple(kw["stride"]), tuple(kw["padding"]),
                                tuple(dilation), kw["ceil_mode"]))
    return stages


def chain_output_size(stages: list[Stage], size: int, dim: int) -> int:
    """Output size along ``dim`` of the chain for an input of ``size`` (< 1 when the input is too small)."""
    for st in stages:
        if size < 1:
            return size
        size = pool_output_size(size, st.kernel[dim], st.stride[dim], st.padding[dim], st.dilation[dim],
                                st.ceil_mode)
    return size


def propose_conv(stages: list[Stage], size: int, dim: int, max_size: int = 512,
                 kernel_policy: str = "field") -> dict[str, int]:
    """Kernel, stride and padding along ``dim`` whose output size equals the chain's for every input size
    the chain accepts up to ``max_size``, or failing that for the widest run of sizes around ``size``
    (``valid_from`` .. ``valid_to``; ``valid_to`` None means every larger size). The kernel is the one
    nearest the policy's target (see the module docstring) among those, never smaller when a kernel at
    least as large does as well."""
    if kernel_policy not in ("field", "conv"):
        raise ValueError(f"kernel policy {kernel_policy!r}: a merged convolution's kernel is 'field' or 'conv'")
    stride = math.prod(st.stride[dim] for st in stages)
    field, jump = 1, 1
    for st in stages:
        field += st.dilation[dim] * (st.kernel[dim] - 1) * jump
        jump *= st.stride[dim]
    if kernel_policy == "conv":
        field = stages[0].dilation[dim] * (stages[0].kernel[dim] - 1) + 1
    sizes = [n for n in range(1, max_size + 1) if chain_output_size(stages, n, dim) >= 1]
    best: tuple | None = None
    for kernel in sorted(range(max(1, field - 2 * stride), field + 2 * stride + 1), key=lambda k: abs(k - field)):
        for padding in range(0, kernel + 1):
            ok = {n for n in sizes if pool_output_size(n, kernel, stride, padding) == chain_output_size(stages, n, dim)}
            if size not in ok:
                continue
            i = j = sizes.index(size)  # the run of consecutive accepted sizes around the example's
            while i > 0 and sizes[i - 1] in ok:
                i -= 1
            while j + 1 < len(sizes) and sizes[j + 1] in ok:
                j += 1
            score = (j + 1 < len(sizes), sizes[i], kernel < field, abs(kernel - field), padding)
            if best is None or score < best[0]:
                best = (score, {"kernel": kernel, "stride": stride, "padding": padding, "valid_from": sizes[i],
                                "valid_to": None if j + 1 == len(sizes) else sizes[j]})
        if best is not None and best[0][:3] == (False, sizes[0], False):
            break
    if best is None:
        raise ValueError("no convolution reproduces this chain's output size")
    return best[1]


def _role(node: fx.Node) -> tuple[str | None, fx.Node | None]:
    """A chain member's family (``"batch_norm"``, ``"relu"`` for ANY element-wise activation of
    :func:`~fxrebirth.passes.depth.is_activation`'s table, ``"lrn"``, ``"max_pool"``, ``"avg_pool"``) and the
    value it reads, or ``(None, None)``."""
    kind = kind_of(node)
    if kind in _FOLLOWERS:
        return kind, node.kwargs.get("input")  # None: a call capture could not bind (left as written)
    if stage_of(node) == "activation":  # ReLU6, PReLU, SiLU, Hardswish, GELU, LeakyReLU... (functions, modules, ATen)
        return "relu", activation_input(node)
    return None, None


def _follow(conv: fx.Node) -> list[fx.Node]:
    """The longest chain conv -> [BN] -> [activation] -> LRN/pool (each kind at most once, one user each)."""
    chain, seen = [conv], set()
    node = conv
    while len(node.users) == 1:
        (user,) = node.users
        kind, read = _role(user)
        if kind is None or read is not node:
            break
        family = "pool" if kind in ("max_pool", "avg_pool") else kind
        if family in seen or (kind == "batch_norm" and seen - {"batch_norm"}):
            break
        seen.add(family)
        chain.append(user)
        node = user
    while chain and _role(chain[-1])[0] in ("batch_norm", "relu"):
        chain.pop()  # a chain must end on the layer that made it non-linear
    return chain


def _keeping_pool(chain: list[fx.Node], in_shape: tuple[int, ...], out_channels: int) -> ConvProposal | None:
    """The ``"pool"`` policy's proposal: the chain's convolution and max-pooling, its normalisation removed
    (None where the chain has no LRN, or a pooling or dilation this form does not keep)."""
    kinds = [_role(n)[0] for n in chain]
    conv, pools = chain[0], [n for n in chain if kind_of(n) in ("max_pool", "avg_pool")]
    if "lrn" not in kinds or "avg_pool" in kinds or any(d != 1 for d in conv.kwargs["dilation"]):
        return None
    if any(k == "relu" and kind_of(n) != "relu" for k, n in zip(kinds, chain)):
        return None  # the layer keeps a ReLU: exact (the chain less its LRN) only where the chain's activation is one
    pool = None
    if pools:
        kw = pools[0].kwargs
        if any(d != 1 for d in kw.get("dilation", (1,))):
            return None
        pool = PoolStage(list(kw["kernel_size"]), list(kw["stride"]), list(kw["padding"]), bool(kw["ceil_mode"]))
    stages = _stages(chain)
    smallest = [next(n for n in range(1, 513) if chain_output_size(stages, n, d) >= 1) for d in range(2)]
    return ConvProposal(in_channels=in_shape[1], out_channels=out_channels,
                        kernel_size=list(conv.kwargs["weight"].meta["tensor_meta"].shape[2:]),
                        stride=list(conv.kwargs["stride"]), padding=list(conv.kwargs["padding"]),
                        relu="relu" in kinds, valid_from=smallest, valid_to=[None, None], pool=pool)


def _propose(chain: list[fx.Node], x: fx.Node, kernel_policy: str) -> ConvProposal | None:
    """The rebirth layer the policy proposes for ``chain`` (read from ``x``), or None: not marked."""
    in_shape = x.meta["tensor_meta"].shape
    out_channels = chain[-1].meta["tensor_meta"].shape[1]
    if kernel_policy == "pool":
        return _keeping_pool(chain, in_shape, out_channels)
    stages = _stages(chain)
    dims = [propose_conv(stages, in_shape[2 + d], d, kernel_policy=kernel_policy) for d in range(2)]
    return ConvProposal(
        in_channels=in_shape[1], out_channels=out_channels, kernel_size=[d["kernel"] for d in dims],
        stride=[d["stride"] for d in dims], padding=[d["padding"] for d in dims],
        relu=any(_role(n)[0] == "relu" for n in chain), valid_from=[d["valid_from"] for d in dims],
        valid_to=[d["valid_to"] for d in dims])


def mark_streamline(gm: fx.GraphModule, kernel_policy: str = "field") -> list[Region]:
    """Mark every streamline region of ``gm`` (which must carry shape metadata); return the new regions.
    ``kernel_policy``: how large the proposed convolution's kernel is (``"field"`` or ``"conv"``), or
    ``"pool"`` (the convolution as it is and the pooling kept, the normalisation removed; see the module
    docstring), or ``"each"`` (:data:`EVERY_POLICY`: one overlapping candidate per policy)."""
    if kernel_policy not in (*KERNEL_POLICIES, EVERY_POLICY):
        raise ValueError(f"kernel policy {kernel_policy!r}: use one of {', '.join(KERNEL_POLICIES)} or {EVERY_POLICY}")
    policies = KERNEL_POLICIES if kernel_policy == EVERY_POLICY else (kernel_policy,)
    regions, primary, variants, taken = [], [], [], set()
    for node in gm.graph.nodes:
        if kind_of(node) != "conv" or node in taken or len(node.kwargs["weight"].meta["tensor_meta"].shape) != 4:
            continue
        chain = _follow(node)
        if not any(kind_of(n) in _NONLINEAR for n in chain) or any(n in taken for n in chain):
            continue
        x = node.kwargs["input"]
        replaces = tuple(dict.fromkeys(str(n.meta.get(SOURCE_KEY, n.name)) for n in chain))
        name = str(node.meta.get(SOURCE_KEY, node.name))
        proposals: list[ConvProposal] = []
        for policy in policies:
            proposal = _propose(chain, x, policy)
            if proposal is None or proposal in proposals:
                continue
            suffix = "" if not proposals else f"@{policy}"
            regions.append(Region(f"streamline:{name}{suffix}", "streamline", tuple(n.name for n in chain), x.name,
                                  chain[-1].name, replaces, proposal))
            (variants if proposals else primary).append(regions[-1])
            proposals.append(proposal)
        if proposals:
            taken.update(chain)
    for variant in variants:  # each checked on its own: the graph records one region per node
        check_regions(gm.graph, [variant])
    record(gm, primary)
    return regions
