"""The generator's records and limits: :class:`Program` (one generated program), the batches a program
is built and checked at, the size limits every line must respect, the namespace program lines run in,
and the small records and helpers every part of the builder shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NOMINAL_BATCH = 2
"""Batch at which a program is built (the shapes in its description are at this batch)."""

CHECK_BATCHES = (2, 3)
"""Batches at which :func:`check_program` compares the result with the original, at each size."""

MAX_ELEMENTS = 6000  # per sample, at the nominal size: keeps every forward fast
MAX_CHANNELS = 12
PROGRAM_GLOBALS = {"torch": torch, "F": F, "nn": nn, "__builtins__": __builtins__}


@dataclass
class Program:
    """One generated program: ``module`` (eval mode) and what is needed to run and describe it."""

    seed: int
    module: nn.Module
    dtype: torch.dtype
    dims: int                     # spatial dimensions: 1, 2 or 3
    channels: tuple[int, ...]     # channels of each input
    aspect: tuple[int, ...]       # offsets added to ``size`` for each spatial dimension
    sizes: tuple[int, int, int]   # nominal size first
    runs_at: tuple[int, ...]      # the sizes of ``sizes`` where the original runs
    description: str
    source: str = field(repr=False, default="")
    channels_last: bool = False   # 2-D programs only: inputs and 4-D weights in channels_last memory format

    @property
    def nominal(self) -> int:
        return self.sizes[0]

    def input_shapes(self, batch: int, size: int) -> list[tuple[int, ...]]:
        spatial = tuple(size + a for a in self.aspect)
        return [(batch, c, *spatial) for c in self.channels]

    def inputs(self, batch: int, size: int, salt: int = 0) -> tuple[torch.Tensor, ...]:
        """Seeded standard-normal inputs (the same for the same arguments)."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + batch * 10_007 + size * 101 + salt) % 2**62)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return tuple(torch.randn(s, generator=gen, dtype=torch.float64).to(self.dtype).contiguous(memory_format=fmt)
                     for s in self.input_shapes(batch, size))

    def __str__(self) -> str:
        return self.description


class Abort(Exception):
    """A line that passed its trial failed for real (aliasing): draw the program again."""


@dataclass
class Value:
    name: str
    shape: tuple[int, ...]
    uses: int = 0
    touched: int = 0


def spell(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if x != int(x) else f"{x:.1f}"
    if isinstance(x, (list, tuple)):
        inner = ", ".join(spell(i) for i in x)
        if isinstance(x, list):
            return f"[{inner}]"
        return f"({inner},)" if len(x) == 1 else f"({inner})"
    return repr(x)


def divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]
