"""The inputs fxrebirth checks a model at, beside the user's example.

A batch-1 (or empty) example cannot tell a rule that mixes samples from a correct one, and a rewrite
verified at one input size may be wrong at another (ceil-mode pooling windows, broadcasts, reshapes). So
every check also runs on **variants** of the example (:func:`variant_inputs`):

* variant 0: the example's size at batch ``max(batch, MIN_BATCH)``;
* variants 1 and 2: every spatial dimension (dims 2.. of floating-point inputs of rank >= 3) grown by
  :data:`SPATIAL_OFFSETS`, at the same batch.

Floating-point inputs are drawn at random (seeded) with the example's mean and spread; other inputs
(indices, masks) repeat the example's samples along the batch. A model that does not run at a variant
(a size-specific reshape, a Linear after a flatten) simply has no such variant: its shapes are not
recorded and it is not checked there. :func:`record_variant_shapes` runs the captured graph at each
variant and stores the shapes in ``node.meta[VARIANTS_KEY]`` for local verification.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.fx as fx

from fxrebirth.equivalence import MIN_BATCH

__all__ = ["SPATIAL_OFFSETS", "VARIANTS_KEY", "variant_inputs", "varying_dims", "record_variant_shapes", "batch_of"]

log = logging.getLogger(__name__)

SPATIAL_OFFSETS = (1, 3)
"""How much the spatial sizes of variants 1 and 2 exceed the example's (odd offsets flip the parity of
every feature map of a stride-2 network at 2^k-multiple sizes)."""

VARIANTS_KEY = "fxrebirth.variant_shapes"
"""``node.meta`` key: the node's shape at each variant (``None`` where the graph did not run)."""


def batch_of(inputs: Sequence[Any]) -> int | None:
    """The batch of the example: dim 0 of its first tensor input of rank >= 1."""
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return x.shape[0]
    return None


def _like(x: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if x.is_floating_point() or x.is_complex():
        finite = x.detach()[torch.isfinite(x.detach())] if x.numel() else x.detach().reshape(-1)
        mean = finite.double().mean().item() if finite.numel() else 0.0
        std = finite.double().std().item() if finite.numel() > 1 else 1.0
        values = torch.randn(shape, generator=generator, dtype=torch.float64) * (std or 1.0) + mean
        out = values.to(dtype=x.dtype, device=x.device)
    else:
        if x.numel() == 0:
            out = torch.zeros(shape, dtype=x.dtype, device=x.device)
        else:
            reps = [-(-n // m) for n, m in zip(shape, x.shape)]
            out = x.detach().repeat(*reps)[tuple(slice(0, n) for n in shape)].clone()
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    elif x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last_3d)
    return out


def varying_dims(x: torch.Tensor, batch: int | None) -> tuple[int, ...]:
    """The dims of input ``x`` that the variants change: the batch (dim 0 when it has the batch's size)
    and, for floating-point inputs of rank >= 3, every spatial dim (2..)."""
    dims = (0,) if batch is not None and x.dim() >= 1 and x.shape[0] == batch else ()
    if x.dim() >= 3 and x.is_floating_point():
        dims += tuple(range(2, x.dim()))
    return dims


def variant_inputs(inputs: Sequence[Any], index: int, seed: int = 0) -> tuple[Any, ...] | None:
    """Variant ``index`` of ``inputs`` (see the module docstring); ``None`` when it would not differ from
    what the example already covers (a spatial variant of inputs without spatial dimensions)."""
    batch = batch_of(inputs)
    generator = torch.Generator().manual_seed(seed + 7919 * index)
    grow = 0 if index == 0 else SPATIAL_OFFSETS[index - 1]
    out: list[Any] = []
    grew = False
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            out.append(x)
            continue
        shape = list(x.shape)
        for d in varying_dims(x, batch):
            if d == 0:
                shape[0] = max(batch, MIN_BATCH)
            elif grow:
                shape[d] += grow
                grew = True
        out.append(_like(x, tuple(shape), generator))
    if index > 0 and not grew:
        return None
    return tuple(out)


def record_variant_shapes(gm: fx.GraphModule, inputs: Sequence[Any], run: Any) -> list[bool]:
    """Run ``gm`` at every variant of ``inputs`` through ``run(gm, inputs) -> {node: shape}`` and store the
    shapes under ``node.meta[VARIANTS_KEY]``; return which variants ran."""
    ran: list[bool] = []
    count = 1 + len(SPATIAL_OFFSETS)
    for node in gm.graph.nodes:
        node.meta[VARIANTS_KEY] = [None] * count
    for index in range(count):
        variant = variant_inputs(inputs, index)
        if variant is None:
            ran.append(False)
            continue
        try:
            shapes = run(gm, variant)
        except Exception as exc:  # noqa: BLE001 - a model that only runs at its example's size
            log.debug("variant %d of the example does not run: %s", index, exc)
            ran.append(False)
            continue
        for node, shape in shapes.items():
            node.meta[VARIANTS_KEY][index] = shape
        ran.append(True)
    return ran
