"""Size guards: the run-time conditions of rewrites that are exact only at some input sizes.

A rewrite whose exactness depends on the spatial size states the condition as a :class:`SizeGuard` on
the value it reads. The pipeline inserts one guard node per condition (a call of :func:`check_size`,
marked side-effectful so no dead-code elimination removes it); at run time it raises
:class:`~fxrebirth.errors.ShapeGuardError`, naming the rewrite and the condition, at sizes where the
rewrite would be wrong. Guards are never placed on the batch dimension, and never on the example's own
shape: only on the condition (a ceil-mode window that must not be partial, a reshape whose literal size
must match). The report lists every guard.

A guard is never dropped by an export. Exported with a size it reads left dynamic (``torch.export`` and
the ``dynamo`` ONNX exporter: a symbolic size; the TorchScript ONNX exporter: a ``dynamic_axes`` entry
other than the batch axis), it raises :class:`DynamicSizeGuardError` naming the rewrite and what to do,
since neither ONNX nor an exported program's runtimes evaluate the condition: the exported file would
run silently wrong at the sizes where it fails. Sizes the guard does not read (the batch) may stay
dynamic, and a static export checks the condition at the example's size as any call does.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch.fx.node import has_side_effect

from fxrebirth.errors import ShapeGuardError

__all__ = ["DynamicSizeGuardError", "Geometry", "SizeGuard", "check_size", "guarded_rule", "is_guard"]


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


def _whole_windows(n: Any, k: int, s: int, p: int, d: int) -> Any:
    """Does pooling ``n`` positions in ceil mode give the floor-mode windows (no partial last window)?
    PyTorch's rule: ceil adds ``s - 1`` before dividing, then drops a last window that starts in the
    right padding. So the windows are whole where the span divides by the stride, or where the extra
    window would start in the padding. Branch-free: ``n`` may be a symbolic size (a ``SymBool`` back)."""
    span = n + 2 * p - d * (k - 1) - 1
    return (span % s == 0) | ((span // s + 1) * s >= n + p)


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

    def reads(self, rank: int) -> tuple[int, ...]:
        """The dims of a rank-``rank`` value the condition depends on (never the batch)."""
        spatial = tuple(range(2, rank)) if self.ceil_pool is not None else ()
        return tuple(sorted(set(self.equals_dims) | set(spatial)))

    def condition(self, shape: Sequence[Any]) -> Any:
        """The condition on ``shape``: a bool for integer sizes, a ``SymBool`` for symbolic ones (an export's)."""
        shape = tuple(shape)
        result: Any = True
        for d, n in zip(self.equals_dims, self.equals):
            result = result & (shape[d] == n)
        if self.ceil_pool is None:
            return result
        sizes = shape[2:]
        for geometry in self.through:
            sizes = geometry.output(sizes)
        pool = self.ceil_pool
        for n, k, s, p, d in zip(sizes, pool.kernel, pool.stride, pool.padding, pool.dilation):
            result = result & _whole_windows(n, k, s, p, d)
        return result

    def holds(self, shape: Sequence[int]) -> bool:
        return bool(self.condition(shape))

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


class DynamicSizeGuardError(ShapeGuardError):
    """An export left dynamic a size that a size guard reads: the exported graph could not check the
    condition and would be wrong where it fails. :attr:`rule` names the rewrite's rule (None for a guard
    of capture)."""

    @property
    def rule(self) -> str | None:
        return guarded_rule(str(self).split(" left dynamic: ", 1)[-1])


def guarded_rule(message: str) -> str | None:
    """The rule named by a guard's message (``the rewrite 'name' at ...``), None for a guard of capture."""
    return message.split("'")[1] if message.startswith("the rewrite '") else None


def _dynamic_refusal(what: str, message: str) -> DynamicSizeGuardError:
    """The error of an export that leaves ``what`` dynamic past the guard of ``message`` (plain string
    operations: strict export traces this with Dynamo)."""
    rule = guarded_rule(message)
    advice = "export with those sizes fixed (at the example's)"
    if rule is not None:
        advice += f", or optimise the model with disable=['{rule}'] for a module exact at every size"
    return DynamicSizeGuardError(f"cannot export with {what} left dynamic: "
                                 f"{message.split('; optimise the model again')[0]}; ONNX and exported programs do "
                                 f"not evaluate this guard, so {advice}")


@has_side_effect
def check_size(x: torch.Tensor, condition: tuple, message: str) -> None:
    """Raise :class:`ShapeGuardError` with ``message`` unless ``condition`` (:meth:`SizeGuard.as_data`) holds
    for ``x``'s shape, and :class:`DynamicSizeGuardError` when an export leaves a size it reads dynamic
    (see the module docstring). A graph node of its own, with no users; traced again (a saved
    GraphModule is re-traced when loaded) it records itself instead of running."""
    if isinstance(x, torch.fx.Proxy):
        x.tracer.create_proxy("call_function", check_size, (x, condition, message), {})
        return None
    guard = SizeGuard.from_data(condition)
    shape = x.shape
    if torch.jit.is_tracing():  # sizes are traced tensors; the trace runs at the example's sizes
        if torch.onnx.is_in_onnx_export():
            axes = _onnx_dynamic_axes()
            if axes:
                raise _dynamic_refusal(f"dynamic_axes {axes}", message)
        shape = tuple(int(n) for n in shape)
    elif torch.compiler.is_exporting():
        return _check_exported(guard.condition(shape), x, message)
    if not guard.holds(shape):
        raise ShapeGuardError(f"input of shape {tuple(shape)} at this point: {message}")
    return None


def _check_exported(holds: Any, x: torch.Tensor, message: str) -> None:
    """Under an export, where sizes may be symbols (or, under strict export, ints that Dynamo keeps as
    symbols): pass where the condition holds at every size the export allows, raise
    :class:`ShapeGuardError` where it fails at every one, :class:`DynamicSizeGuardError` otherwise."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if statically_known_true(holds):
        return
    if statically_known_true(torch.sym_not(holds)):
        raise ShapeGuardError(f"input of shape {tuple(x.shape)} at this point: {message}")
    raise _dynamic_refusal(f"the sizes of a value of shape {tuple(x.shape)}", message)


def _onnx_dynamic_axes() -> dict:
    """The axes other than the batch (0) that the TorchScript ONNX export in progress leaves dynamic.

    That exporter traces at the example's sizes and applies its ``dynamic_axes`` only afterwards, so
    they are read from its ``_export`` call's frame. Not found (the exporter changed), every size
    counts as dynamic: a guard refuses rather than be dropped."""
    exporter_folder = os.path.dirname(torch.onnx.__file__)
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_export" and code.co_filename.startswith(exporter_folder) and \
                "dynamic_axes" in frame.f_locals:
            axes = frame.f_locals["dynamic_axes"] or {}
            found = {name: sorted(a for a in (spec if isinstance(spec, (list, tuple)) else spec.keys()) if a != 0)
                     for name, spec in axes.items()}
            return {name: spec for name, spec in found.items() if spec}
        frame = frame.f_back
    return {"(unknown: the exporter's dynamic_axes could not be read)": ["all"]}


def is_guard(node: object) -> bool:
    """Is ``node`` a size guard (which reads a value only for its shape)?"""
    return getattr(node, "op", None) == "call_function" and getattr(node, "target", None) is check_size
