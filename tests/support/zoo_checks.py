"""Structural checks of a graph for the model zoo (re-exported by :mod:`tests.support.zoo`), independent
of the rules' own code: :func:`foldable_batchnorms` (what an exact fold could still remove) and
:func:`count_ops` (convolutions and BatchNorms, in canonical, ATen or module form).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fxrebirth.graph.ops import kind_of

__all__ = ["foldable_batchnorms", "count_ops"]


def foldable_batchnorms(gm: fx.GraphModule) -> list[str]:
    """Eval-mode BatchNorms with a single-user conv/linear before them, or a lone conv (no padding) or
    linear consumer after them: what an exact fold could still remove."""
    found = []
    for node in gm.graph.nodes:
        if kind_of(node) != "batch_norm" or node.kwargs["training"]:
            continue
        producer = node.kwargs["input"]
        rank = len(node.meta["tensor_meta"].shape)
        if kind_of(producer) in ("conv", "conv_transpose") and len(producer.users) == 1:
            found.append(node.name)
        elif kind_of(producer) == "linear" and len(producer.users) == 1 and rank == 2:
            found.append(node.name)
        users = list(node.users)
        if len(users) == 1 and users[0].kwargs.get("input") is node:
            consumer = users[0]
            if kind_of(consumer) == "linear" and rank == 2:
                found.append(node.name)
            elif kind_of(consumer) == "conv" and all(p == 0 for p in consumer.kwargs["padding"]):
                found.append(node.name)
    return found


_ATEN_CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
               "conv_transpose2d", "conv_transpose3d"}
_ATEN_BATCH_NORMS = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit",
                     "_native_batch_norm_legit_no_training", "_batch_norm_with_update", "_batch_norm_no_update"}


def _aten_name(node: fx.Node) -> str | None:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    namespace, _, rest = str(node.target).partition(".")
    return rest.split(".")[0] if namespace == "aten" else None


def count_ops(gm: fx.GraphModule) -> dict[str, int]:
    """Convolutions (transposed included) and BatchNorms in a graph: canonical ``call_function`` nodes,
    ATen operators (a ``torch.export`` program's module) and any remaining ``call_module`` calls of
    ``nn.Conv*`` / BatchNorm modules."""
    counts = {"conv": 0, "batch_norm": 0}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        kind = kind_of(node)
        aten_name = _aten_name(node)
        if kind in ("conv", "conv_transpose") or aten_name in _ATEN_CONVS:
            counts["conv"] += 1
        elif kind == "batch_norm" or aten_name in _ATEN_BATCH_NORMS:
            counts["batch_norm"] += 1
        elif node.op == "call_module":
            module = modules.get(node.target)
            if isinstance(module, nn.modules.conv._ConvNd):
                counts["conv"] += 1
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                counts["batch_norm"] += 1
    return counts
