"""Size guards: the run-time conditions of rewrites that are exact only at some input sizes.

A rewrite whose exactness depends on the spatial size states the condition as a :class:`SizeGuard` on
the value it reads. The pipeline inserts one guard node per condition (a call of :func:`check_size`,
marked side-effectful so no dead-code elimination removes it); at run time it raises
:class:`~fxrebirth.errors.ShapeGuardError`, naming the rewrite and the condition, at sizes where the
rewrite would be wrong. Guards are never placed on the batch dimension, and never on the example's own
shape: only on the condition (a ceil-mode window that must not be partial, a reshape whose literal size
must match). The report lists every guard.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch.fx.node import has_side_effect

from fxrebirth.errors import ShapeGuardError

__all__ = ["Geometry", "SizeGuard", "check_size", "is_guard"]


@dataclass(frozen=True)
class Geometry:
    """One sliding-window layer's size map per spatial dimension: ``n -> (n + 2p - d(k-1) - 1) // s + 1``."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    def output(self, sizes: Sequence[int]) -> tuple[int, ...]:
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                     for n, k, s, p, d in zip(sizes, self.kernel, self.stride, self.padding, self.dilation))


def _whole_windows(n: int, k: int, s: int, p: int, d: int) -> bool:
    """Does pooling ``n`` positions in ceil mode give the floor-mode windows (no partial last window)?
    PyTorch's rule: ceil adds ``s - 1`` before dividing, then drops a last window that starts in the
    right padding."""
    span = n + 2 * p - d * (k - 1) - 1
    floor = span // s + 1
    ceil = (span + s - 1) // s + 1
    if (ceil - 1) * s >= n + p:
        ceil -= 1
    return ceil == floor


@dataclass(frozen=True)
class SizeGuard:
    """A condition on a value's shape under which a rewrite is exact.

    ``ceil_pool``: a ceil-mode pooling of that geometry, reached from the guarded value through the
    layers ``through``, has no partial last window. ``equals_dims``/``equals``: those dims of the guarded
    value have those sizes (never the batch dimension).
    """

    why: str
    through: tuple[Geometry, ...] = ()
    ceil_pool: Geometry | None = None
    equals_dims: tuple[int, ...] = ()
    equals: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if 0 in self.equals_dims:
            raise ValueError("a size guard never constrains the batch dimension")

    def after(self, geometry: Geometry) -> "SizeGuard":
        """The same condition read one layer earlier (``geometry`` comes first)."""
        return replace(self, through=(geometry,) + self.through)

    def holds(self, shape: Sequence[int]) -> bool:
        shape = tuple(shape)
        if any(shape[d] != n for d, n in zip(self.equals_dims, self.equals)):
            return False
        if self.ceil_pool is None:
            return True
        sizes = shape[2:]
        for geometry in self.through:
            sizes = geometry.output(sizes)
        pool = self.ceil_pool
        return all(_whole_windows(n, k, s, p, d)
                   for n, k, s, p, d in zip(sizes, pool.kernel, pool.stride, pool.padding, pool.dilation))

    def describe(self) -> str:
        parts = []
        if self.equals_dims:
            parts.append(" and ".join(f"size(dim {d}) == {n}" for d, n in zip(self.equals_dims, self.equals)))
        if self.ceil_pool is not None:
            where = f" after {len(self.through)} layer(s)" if self.through else ""
            parts.append(f"the ceil-mode pooling{where} (kernel {self.ceil_pool.kernel}, stride "
                         f"{self.ceil_pool.stride}, padding {self.ceil_pool.padding}) has no partial window")
        return f"{' and '.join(parts)}: {self.why}"

    def as_data(self) -> tuple:
        """The condition as nested tuples of ints (what a guard node's generated code can spell)."""
        def spell(g: Geometry | None) -> tuple | None:
            return None if g is None else (g.kernel, g.stride, g.padding, g.dilation)

        return tuple(spell(g) for g in self.through), spell(self.ceil_pool), self.equals_dims, self.equals

    @classmethod
    def from_data(cls, data: tuple, why: str = "") -> "SizeGuard":
        through, pool, equals_dims, equals = data
        return cls(why, tuple(Geometry(*g) for g in through), None if pool is None else Geometry(*pool),
                   equals_dims, equals)


@has_side_effect
def check_size(x: torch.Tensor, condition: tuple, message: str) -> None:
    """Raise :class:`ShapeGuardError` with ``message`` unless ``condition`` (:meth:`SizeGuard.as_data`) holds
    for ``x``'s shape. A graph node of its own, with no users; traced again (a saved GraphModule is
    re-traced when loaded) it records itself instead of running."""
    if isinstance(x, torch.fx.Proxy):
        x.tracer.create_proxy("call_function", check_size, (x, condition, message), {})
        return None
    if not SizeGuard.from_data(condition).holds(x.shape):
        raise ShapeGuardError(f"input of shape {tuple(x.shape)} at this point: {message}")


def is_guard(node: object) -> bool:
    """Is ``node`` a size guard (which reads a value only for its shape)?"""
    return getattr(node, "op", None) == "call_function" and getattr(node, "target", None) is check_size
